"""Loss, gradient and empirical Fisher from one backward pass, and their running mean.

The empirical Fisher's per-example scores come from the same backward pass as
the training gradient (see ``_engine``): for a dense layer with inputs ``X``
and per-example output cotangents ``D``, the gradient is ``X^T D`` and the
Fisher ``(X^2)^T (D^2)``, one more GEMM of the weight-gradient's size. So the
importance of a task can be accumulated while training on it, with no second
pass over its data.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec

from wva_jax.importance._engine import gradient_sums
from wva_jax.importance._independence import PROBE_EVERY
from wva_jax.importance._mesh import on_auto_axes
from wva_jax.importance.fisher import (
  _as_probs,
  _score_cotangent,
  add_targets,
  checked_targets,
  logits_and_mask,
  poison,
)


@on_auto_axes(('params', 'inputs', 'targets', 'mask'), lambda s: (PartitionSpec(), s, s))
def grad_and_fisher(apply_fn: Callable, params, inputs, targets, *, mask=None,
                    chunk_size: int | None = None, probe: bool | int = PROBE_EVERY):
  r"""``(loss, grads, fisher)`` of a batch, from one forward and one backward pass.

  .. math::
     \ell_b = -\textstyle\sum_t m_{bt} \log p_\theta(y_{bt} \mid x_b), \qquad
     \text{loss} = \frac1N \sum_b \ell_b, \qquad
     \text{grads} = \nabla_\theta\, \text{loss}, \qquad
     \text{fisher} = \frac1N \sum_b (\nabla_\theta \ell_b)^2

  ``fisher`` is what ``fisher(apply_fn, params, inputs, targets, mask=mask)``
  (``mode='empirical'``) returns on the same batch, and ``grads`` what
  ``jax.grad`` of ``loss`` returns; both come from the engine's single
  backward pass (for a dense layer: ``X^T D`` and ``(X^2)^T (D^2)`` from the
  same layer inputs ``X`` and per-example output cotangents ``D``; for other
  parameters, the per-example gradients the Fisher forms anyway, summed).
  Use it in a training step in place of ``jax.value_and_grad``, and
  accumulate ``fisher`` across steps with :func:`fisher_accumulator`.

  Args:
    apply_fn: ``apply_fn(params, inputs) -> logits [B, ..., C]``, as for
      :func:`fisher` (``outputs[b]`` depends on ``inputs[b]`` only).
    params: a pytree of arrays.
    inputs: a pytree of arrays with a leading example axis ``B``.
    targets: integer classes ``[B, ...]`` (``IGNORE_INDEX``, -100, drops a
      position, as for :func:`fisher`) or class probabilities ``[B, ..., C]``.
    mask: optional ``[B, ...]`` weights, 1 for real positions, 0 for padding.
    chunk_size: examples per chunk, as for :func:`fisher` (default: the same
      as :func:`fisher`'s, so all of a typical training batch at once).
    probe: when to run the batch-independence probe: by default (an int,
      ``PROBE_EVERY`` = 50) on the first call inside ``jit`` and every 50th
      after it, so a model that starts to mix examples as it trains is
      refused within 50 steps at about 2% of the step's cost; ``True`` on
      every call with new parameter values (every training step: about one
      step's cost more), ``False`` never.

  Returns:
    ``(loss, grads, fisher)``: a float32 scalar, a pytree like ``params``
    in the parameters' dtypes (as ``jax.grad``), and a float32 pytree like
    ``params``.

  Example:
    >>> import jax, jax.numpy as jnp, wva_jax as wj
    >>> params = {'w': jnp.ones((3, 4)) * 0.1, 'b': jnp.zeros(4)}
    >>> apply_fn = lambda p, x: x @ p['w'] + p['b']
    >>> x, y = jnp.ones((8, 3)), jnp.arange(8) % 4
    >>> loss, grads, F = jax.jit(lambda p: wj.importance.grad_and_fisher(apply_fn, p, x, y))(params)
    >>> round(float(loss), 4), grads['w'].shape, F['w'].shape
    (1.3863, (3, 4), (3, 4))
  """
  n, positions, num_classes, extras = logits_and_mask(apply_fn, params, inputs, mask, probe)
  if targets is None:
    raise ValueError("grad_and_fisher needs targets (the loss is their negative log likelihood)")
  bad = add_targets(extras, checked_targets(targets, n, positions, num_classes), num_classes)
  probs = lambda logits, e: _as_probs(e["targets"], num_classes)
  sums, score, nll = gradient_sums(apply_fn, params, inputs, _score_cotangent(probs), extras,
                                   reduce="square", chunk_size=chunk_size, value_fn=_nll(probs))
  # the score is the gradient of the log likelihood: the loss's gradient is its negative
  grads = jax.tree_util.tree_map(lambda s, p: (-s / n).astype(jnp.result_type(p)), score, params)
  # a traced target outside [0, C) (not IGNORE_INDEX) makes all three NaN: loud under jit
  return poison((nll / n, grads, jax.tree_util.tree_map(lambda s: s / n, sums)), bad)


def loss_and_fisher(apply_fn: Callable, params, inputs, targets, *, mask=None, chunk_size: int | None = None,
                    probe: bool | int = PROBE_EVERY):
  r"""``(loss, fisher)`` of :func:`grad_and_fisher`, differentiable in ``params`` at no extra pass.

  A ``jax.custom_vjp``: the forward runs :func:`grad_and_fisher` and keeps
  its ``grads``; ``jax.grad`` / ``jax.value_and_grad(..., has_aux=True)`` (and
  ``nnx.value_and_grad``) of ``loss`` then return them instead of
  differentiating the engine. ``fisher`` is treated as a constant (its
  cotangent is ignored). This is how a trainer that differentiates the loss
  function itself gets the Fisher from its own step: in tunix's
  ``PeftTrainer``, a loss function ``loss_fn(model, ...)`` that splits the
  model (``graphdef, p, rest = nnx.split(model, nnx.Param, ...)``; with LoRA,
  ``nnx.LoRAParam``) and returns ``loss_and_fisher(lambda p, x:
  nnx.merge(graphdef, p, rest)(x), p, ...)``, set with
  ``trainer.with_loss_fn(loss_fn, has_aux=True)``: the trainer's gradient is
  this pass's, and its aux (the Fisher) goes to a :func:`fisher_accumulator`.

  Args:
    apply_fn, params, inputs, targets, mask, chunk_size, probe: as for
      :func:`grad_and_fisher`.

  Returns:
    ``(loss, fisher)``: a float32 scalar and a float32 pytree like ``params``.

  Example:
    >>> import jax, jax.numpy as jnp, wva_jax as wj
    >>> params = {'w': jnp.ones((3, 4)) * 0.1, 'b': jnp.zeros(4)}
    >>> apply_fn = lambda p, x: x @ p['w'] + p['b']
    >>> x, y = jnp.ones((8, 3)), jnp.arange(8) % 4
    >>> f = lambda p: wj.importance.loss_and_fisher(apply_fn, p, x, y)
    >>> (loss, F), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(params)
    >>> grads['b'].shape, F['b'].shape
    ((4,), (4,))
  """

  def run(p, x, y, m):
    return grad_and_fisher(apply_fn, p, x, y, mask=m, chunk_size=chunk_size, probe=probe)

  @jax.custom_vjp
  def f(p, x, y, m):
    loss, _, fisher = run(p, x, y, m)
    return loss, fisher

  def fwd(p, x, y, m):
    loss, grads, fisher = run(p, x, y, m)
    return (loss, fisher), (grads, x, y, m)

  def bwd(res, ct):
    grads, x, y, m = res
    scaled = jax.tree_util.tree_map(lambda g: (ct[0] * g).astype(g.dtype), grads)
    return (scaled,) + tuple(jax.tree_util.tree_map(_zero_cotangent, a) for a in (x, y, m))

  f.defvjp(fwd, bwd)
  return f(params, inputs, targets, mask)


def _zero_cotangent(a):
  a = jnp.asarray(a)
  if jnp.issubdtype(a.dtype, jnp.inexact):
    return jnp.zeros_like(a)
  return np.zeros(a.shape, jax.dtypes.float0)


def _nll(probs_fn):
  """Per-example ``-sum_t m_t sum_c q_tc log softmax(z_t)_c``."""

  def value_fn(logits, extras):
    z = logits.astype(jnp.float32)
    ll = (probs_fn(z, extras) * jax.nn.log_softmax(z, axis=-1)).sum(-1)
    if "mask" in extras:
      ll = ll * extras["mask"]
    return -ll.reshape(ll.shape[0], -1).sum(-1)

  return value_fn


class FisherAccumulatorState(NamedTuple):
  """Running mean of per-batch Fishers: ``mean`` (in the storage dtype) over ``examples`` seen."""
  mean: optax.Params
  examples: jax.Array  # int32 scalar: examples seen so far


class FisherAccumulator(NamedTuple):
  """``init(params) -> state``, ``update(state, fisher, num_examples) -> state``, ``result(state)``."""
  init: Callable[[optax.Params], FisherAccumulatorState]
  update: Callable[..., FisherAccumulatorState]
  result: Callable[[FisherAccumulatorState], optax.Params]


def fisher_accumulator(dtype=jnp.float32) -> FisherAccumulator:
  r"""A running, example-weighted mean of per-batch Fishers, for a training loop.

  .. math::
     \bar F_{k} = \bar F_{k-1} + \frac{n_k}{N_k}\,(F_k - \bar F_{k-1}), \qquad N_k = N_{k-1} + n_k

  so after batches of ``n_k`` examples with per-batch Fishers ``F_k`` (each a
  mean over its batch, as :func:`grad_and_fisher` returns), ``result`` is the
  mean over every example seen: with equal batches, the mean of the
  ``F_k``. (Each ``F_k`` is taken at that step's parameters: the importance
  of the task along its training path, not at its end point.)

  The state is a :class:`FisherAccumulatorState`: the mean stored in
  ``dtype`` (``jnp.bfloat16`` halves its memory; each update is computed in
  float32 and rounded once, so a bf16 mean has bf16's ~3 significant digits,
  and after ~256 equal batches an increment smaller than half a bf16 step of
  the mean is rounded away: keep float32 for long runs) and an int32 example
  count. ``update`` is jittable, returns new buffers (the state can be
  donated with ``jax.jit(..., donate_argnums=...)``) and never retraces.

  In a trainer that differentiates the loss function itself (tunix's
  ``PeftTrainer``), return :func:`loss_and_fisher` from the loss function
  with ``has_aux=True`` and update the state with the aux it hands back.

  Args:
    dtype: storage dtype of the mean (float32 or bfloat16, say).

  Returns:
    A :class:`FisherAccumulator` ``(init, update, result)``.

  Example:
    >>> import jax, jax.numpy as jnp, wva_jax as wj
    >>> acc = wj.importance.fisher_accumulator()
    >>> state = acc.init({'w': jnp.zeros(2)})
    >>> state = acc.update(state, {'w': jnp.array([1.0, 2.0])}, 10)
    >>> state = acc.update(state, {'w': jnp.array([3.0, 0.0])}, 30)
    >>> acc.result(state)['w'].tolist(), int(state.examples)
    ([2.5, 0.5], 40)
  """
  dtype = jnp.dtype(dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"dtype must be a floating dtype, got {dtype}")

  def init(params) -> FisherAccumulatorState:
    mean = jax.tree_util.tree_map(lambda p: jnp.zeros(jnp.shape(p), dtype), params)
    return FisherAccumulatorState(mean, jnp.zeros((), jnp.int32))

  def update(state: FisherAccumulatorState, fisher, num_examples) -> FisherAccumulatorState:
    n = jnp.asarray(num_examples, jnp.int32)
    count = state.examples + n
    w = n.astype(jnp.float32) / jnp.maximum(count, 1).astype(jnp.float32)
    step = lambda m, f: (m.astype(jnp.float32) + w * (f.astype(jnp.float32) - m.astype(jnp.float32))).astype(dtype)
    return FisherAccumulatorState(jax.tree_util.tree_map(step, state.mean, fisher), count)

  def result(state: FisherAccumulatorState):
    return jax.tree_util.tree_map(lambda m: m.astype(jnp.float32), state.mean)

  return FisherAccumulator(init, update, result)
