"""EWC on the adapters' effective update ``A @ B``: the penalty, its closed-form gradient, and the transform."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike, DTypeLike

from wva_jax._checks import check_importance_values, check_strength
from wva_jax.lora._adapters import _Adapters, _flatten, _importance_leaves, _unflatten_pairs
from wva_jax.lora._layers import _F32, _layer_grads, _penalty, _sequenced
from wva_jax.lora._state import _check_lora_factory, _lora_init
from wva_jax.wva import next_count, strength_at


def lora_ewc_penalty(adapters: optax.Params, kernel_importance: optax.Params, strength: ArrayLike = 1.0
                     ) -> jax.Array:
  r"""EWC on the adapters' effective update: :math:`\frac{\lambda}{2}\sum_l \sum_{ij} F^{(l)}_{ij} (A_l B_l)_{ij}^2`.

  The anchor is the pretrained weights (:math:`\Delta W = A B = 0`), ``F``
  the importance of the frozen base kernels. Add it to the task loss; or use
  :func:`add_lora_ewc`, which adds its gradient without a second backward
  pass. Computed in float32 (``A``, ``B`` cast before the product, full
  matmul precision) whatever the adapters' dtype.

  Memory: layers are computed one after another (a ``fori_loop`` over the
  adapters switching to each one's computation; a stacked ``[L, ...]``
  adapter goes through ``lax.map``), so under ``jit`` the peak extra memory
  is one layer's float32 ``[d_in, d_out]`` product and its ``F``-weighted
  copy, whatever the number of layers (measured: 1.3x one layer's product
  for value and gradient over 8 layers; ``tests/test_lora.py``). Its gradient (``jax.grad``) is the
  closed form of :func:`lora_ewc_grad` (a ``custom_vjp``), layer by layer
  too: autodiff of the dense form would keep every layer's product for the
  backward pass.

  Args:
    adapters: the adapter pytree (see :mod:`wva_jax.lora`).
    kernel_importance: the base kernels' importance, one array per adapter
      shaped like its kernel (:func:`lora_importance`), >= 0.
    strength: ``lambda`` >= 0 (may be traced).

  Returns:
    A float32 scalar.

  Example:
    >>> import jax.numpy as jnp, wva_jax as wj
    >>> adapters = {'w': {'A': jnp.array([[1.0], [2.0]]), 'B': jnp.array([[1.0, 3.0]])}}
    >>> imp = {'w': jnp.array([[1.0, 0.0], [0.5, 0.0]])}   # A @ B = [[1, 3], [2, 6]]
    >>> float(wj.lora_ewc_penalty(adapters, imp, 2.0))   # 1*1 + 0.5*4
    3.0

  References:
    Kirkpatrick et al., PNAS 2017 (EWC); Hu et al., arXiv:2106.09685 (LoRA).
  """
  check_strength(strength)
  ad = _flatten(adapters)
  f_s = _importance_leaves(kernel_importance, ad, "kernel_importance")
  check_importance_values(f_s, "kernel_importance")
  return _penalty(jnp.asarray(strength, _F32), ad.a, ad.b, [jnp.asarray(f) for f in f_s])


def lora_ewc_grad(adapters: optax.Params, kernel_importance: optax.Params, strength: ArrayLike = 1.0
                  ) -> optax.Params:
  r"""The exact gradient of :func:`lora_ewc_penalty` in closed form, layer by layer.

  With :math:`P = F \odot (A B)` (float32):

  .. math::
     \frac{\partial}{\partial A} = \lambda\, P B^\top, \qquad
     \frac{\partial}{\partial B} = \lambda\, A^\top P

  (in the paper's orientation :math:`\Delta W = BA`: :math:`\lambda (F\odot
  BA) A^\top` and :math:`\lambda B^\top (F\odot BA)`). Peak memory as in
  :func:`lora_ewc_penalty`.

  Args:
    adapters: the adapter pytree.
    kernel_importance: one array per adapter, shaped like its kernel.
    strength: ``lambda`` >= 0.

  Returns:
    A tree like ``adapters`` (each gradient in its adapter's dtype).

  Example:
    >>> import jax.numpy as jnp, wva_jax as wj
    >>> adapters = {'w': {'A': jnp.array([[1.0]]), 'B': jnp.array([[3.0]])}}
    >>> g = wj.lora_ewc_grad(adapters, {'w': jnp.array([[2.0]])}, 1.0)
    >>> float(g['w']['A'][0, 0]), float(g['w']['B'][0, 0])   # 2*3*3, 1*2*3
    (18.0, 6.0)
  """
  check_strength(strength)
  ad = _flatten(adapters)
  f_s = _importance_leaves(kernel_importance, ad, "kernel_importance")
  check_importance_values(f_s, "kernel_importance")
  return _grad_tree(ad, f_s, strength)


def _grad_tree(ad: _Adapters, f_s: list, strength) -> Any:
  grads = _sequenced(_layer_grads, ad.a, ad.b, [jnp.asarray(f) for f in f_s])
  return _unflatten_pairs(ad, [((strength * da).astype(a.dtype), (strength * db).astype(b.dtype))
                               for (da, db), a, b in zip(grads, ad.a, ad.b)])


def add_lora_ewc(kernel_importance: optax.Params | None = None, strength: optax.ScalarOrSchedule = 1.0, *,
                 importance_dtype: DTypeLike | None = None) -> optax.GradientTransformation:
  r"""Adds the gradient of :func:`lora_ewc_penalty` to the adapters' updates.

  ``g_A += lambda * (F * (A @ B)) @ B.T``, ``g_B += lambda * A.T @ (F * (A @
  B))`` (:func:`lora_ewc_grad`), exactly as if the penalty were in the loss.
  Put it first in a chain so every optimizer sees the penalised gradient.
  The state is the base kernels' importance (no anchor: it is ``delta W =
  0``); a step needs one layer's dense product at a time on top of it.

  Args:
    kernel_importance: one array per adapter shaped like its base kernel
      (:func:`lora_importance`), >= 0, or ``None`` for zeros until
      :func:`wva_jax.set_importance` (or :func:`wva_jax.consolidate`) swaps
      one in. ``init`` stores a copy.
    strength: ``lambda`` >= 0 (may be traced), or an optax schedule of the
      step count (the state's ``count``, 0 at the first update).
    importance_dtype: storage dtype (``None``: float32; ``jnp.bfloat16``
      halves it); the gradient is computed in float32.

  Returns:
    An ``optax.GradientTransformation`` with state :class:`LoRAState`, whose
    ``update`` needs ``params`` (the adapters).

  Example:
    >>> import jax.numpy as jnp, optax, wva_jax as wj
    >>> params = {'w': {'A': jnp.array([[1.0]]), 'B': jnp.array([[3.0]])}}
    >>> tx = optax.chain(wj.add_lora_ewc({'w': jnp.array([[2.0]])}, 1.0), optax.sgd(0.1))
    >>> zero = {'w': {'A': jnp.zeros((1, 1)), 'B': jnp.zeros((1, 1))}}
    >>> u, _ = tx.update(zero, tx.init(params), params)
    >>> round(float(u['w']['A'][0, 0]), 4), round(float(u['w']['B'][0, 0]), 4)   # -0.1 * (18, 6)
    (-1.8, -0.6)
  """
  importance_dtype = _check_lora_factory(kernel_importance, strength, importance_dtype, "add_lora_ewc")

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("add_lora_ewc needs params (the adapters) in update(...)")
    ad = _flatten(params, "params")
    pull = _grad_tree(ad, _importance_leaves(state.importance, ad), strength_at(strength, state.count))
    return (jax.tree_util.tree_map(lambda u, p: (u.astype(_F32) + p.astype(_F32)).astype(u.dtype), updates, pull),
            state._replace(count=next_count(state.count)))

  return optax.GradientTransformation(_lora_init(kernel_importance, importance_dtype, strength), update_fn)
