"""Memory aware synapses (MAS): sensitivity of the output norm."""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from wva_jax.importance._engine import check_model, gradient_sums
from wva_jax.importance._mesh import like_params, on_auto_axes
from wva_jax.importance._per_example import num_examples


@on_auto_axes(('params', 'inputs', 'mask'), like_params)
def mas(apply_fn: Callable, params, inputs, *, chunk_size: int | None = None,
        mask=None, engine: str = "auto", probe: bool | int = True):
  r"""MAS importance: mean over examples of the absolute per-example gradient
  of the squared L2 norm of the output.

  .. math::
     \Omega = \frac1N \sum_b \Big| \nabla_\theta \, \lVert f_\theta(x_b) \rVert_2^2 \Big|

  The absolute value is taken per example, as in the MAS paper (the seed's
  code took it of the batch gradient, which lets examples cancel). To measure
  the norm of probabilities rather than logits, pass
  ``lambda p, x: jax.nn.softmax(apply_fn(p, x))``. For sequences the norm is
  summed over positions, ``sum_t m_bt ||f_theta(x_b)_t||^2``, with ``mask``
  dropping padding.

  Args:
    apply_fn: ``apply_fn(params, inputs) -> outputs [B, ...]``, one array;
      ``outputs[b]`` must depend on ``inputs[b]`` only (a model that reduces
      over the batch axis is refused by name). Each eager call compiles
      anew: wrap repeated calls in ``jax.jit``.
    params: a pytree of arrays.
    inputs: a pytree of arrays with a leading example axis (no labels needed).
    chunk_size: examples per chunk (default: up to 1024 when every
      parameter is a one-position Dense layer or a bias, else up to 64).
    mask: optional ``[B, ...]`` weights of the output positions (the output's
      shape without its last, feature axis), 1 for real positions, 0 for padding.
    engine: ``'auto'`` or ``'vmap'`` (the reference path).
    probe: when to run the batch-independence probe (``outputs[b]`` from
      ``inputs[b]`` only): ``True`` whenever the parameter values are new
      (a pass holds for the values it was probed on), an int ``n`` on the
      first and every ``n``-th call inside ``jit``, ``False`` never (you
      vouch for the model).

  Returns:
    A float32 pytree shaped like ``params``.

  Example:
    >>> import jax.numpy as jnp, wva_jax as wj
    >>> params = {'w': jnp.ones((3, 2))}
    >>> imp = wj.importance.mas(lambda p, x: x @ p['w'], params, jnp.ones((5, 3)))
    >>> float(imp['w'][0, 0])   # |d (3^2 + 3^2) / d w_00| = 2 * 3 * 1
    6.0

  References:
    Aljundi et al., "Memory Aware Synapses: Learning what (not) to forget",
    ECCV 2018.
  """
  n = num_examples(inputs)
  out = check_model(apply_fn, params, inputs, probe=probe)
  extras = None
  if mask is not None:
    mask = jnp.asarray(mask)
    expected = (n,) + tuple(out.shape[1:-1])
    if len(out.shape) < 2 or mask.shape != expected:
      raise ValueError(f"mask has shape {mask.shape}, expected {expected} (examples and "
                       f"positions of the outputs, whose shape is {out.shape[1:]} per example)")
    extras = {"mask": mask.astype(jnp.float32)}

  def cot_fn(outputs, extras):
    cot = 2.0 * outputs.astype(jnp.float32)
    if extras is not None:
      cot = cot * extras["mask"][..., None]  # d/df of sum_t m_t ||f_t||^2, m_t in {0, 1}
    return cot[None]

  sums = gradient_sums(apply_fn, params, inputs, cot_fn, extras, reduce="abs",
                       chunk_size=chunk_size, engine=engine)
  return jax.tree_util.tree_map(lambda s: s / n, sums)
