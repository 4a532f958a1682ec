"""WVA for adapters: the base kernels' importance pulled back onto ``A`` and ``B``, and the scaling transform."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.typing import DTypeLike

from wva_jax._checks import check_choice
from wva_jax.lora._adapters import _flatten, _importance_leaves, _unflatten_pairs
from wva_jax.lora._layers import _F32, _HI
from wva_jax.lora._state import _check_lora_factory, _lora_init
from wva_jax.wva import VISCOSITIES, attenuation, next_count, strength_at


def lora_pullback(adapters: optax.Params, kernel_importance: optax.Params) -> optax.Params:
  r"""The adapters' own (diagonal) importance: the base kernels' importance pulled back through ``A @ B``.

  .. math::
     \Omega^A = F\,(B \odot B)^\top, \qquad \Omega^B = (A \odot A)^\top F,

  i.e. :math:`\Omega^A_{ik} = \sum_j F_{ij} B_{kj}^2` and
  :math:`\Omega^B_{kj} = \sum_i A_{ik}^2 F_{ij}`: the diagonal of
  :math:`J^\top \mathrm{diag}(F) J` (:mod:`wva_jax.lora` derives it), equal
  to the Hessian diagonal of :func:`lora_ewc_penalty` divided by
  ``lambda``. No dense ``A @ B`` is formed.

  Args:
    adapters: the adapter pytree.
    kernel_importance: one array per adapter, shaped like its kernel.

  Returns:
    A float32 tree like ``adapters``.

  Example:
    >>> import jax.numpy as jnp, wva_jax as wj
    >>> adapters = {'w': {'A': jnp.array([[2.0]]), 'B': jnp.array([[3.0]])}}
    >>> om = wj.lora_pullback(adapters, {'w': jnp.array([[0.5]])})
    >>> float(om['w']['A'][0, 0]), float(om['w']['B'][0, 0])   # 0.5*9, 4*0.5
    (4.5, 2.0)
  """
  ad = _flatten(adapters)
  f_s = _importance_leaves(kernel_importance, ad, "kernel_importance")
  return _unflatten_pairs(ad, [_pullback(a, b, f) for a, b, f in zip(ad.a, ad.b, f_s)])


def _pullback(a, b, f):
  f = jnp.asarray(f).astype(_F32)
  a2, b2 = jnp.square(a.astype(_F32)), jnp.square(b.astype(_F32))
  return (jnp.einsum("...io,...ro->...ir", f, b2, precision=_HI),
          jnp.einsum("...ir,...io->...ro", a2, f, precision=_HI))


def lora_wva_scale(kernel_importance: optax.Params | None = None, strength: optax.ScalarOrSchedule = 1.0, *,
                   viscosity: str = "hyperbolic", importance_dtype: DTypeLike | None = None
                   ) -> optax.GradientTransformation:
  r"""WVA for adapters: each adapter update scaled by ``1/(1+lambda*Omega)`` with the pulled-back importance.

  .. math::
     u_A \leftarrow \frac{u_A}{1 + \lambda\,\Omega^A}, \quad
     u_B \leftarrow \frac{u_B}{1 + \lambda\,\Omega^B}, \qquad
     \Omega^A = F (B\odot B)^\top,\ \Omega^B = (A\odot A)^\top F

  (or :math:`e^{-\lambda\Omega}`), with :math:`\Omega^A, \Omega^B` from the
  current adapters (:func:`lora_pullback`; derivation in
  :mod:`wva_jax.lora`). ``lambda`` means what it means in
  :func:`wva_jax.wva_scale` on the full weights. Put it after the optimizer
  (it scales increments), as :func:`wva_jax.wva_scale`. The state is the base
  kernels' importance; a step forms no dense ``A @ B``.

  Args:
    kernel_importance: as in :func:`add_lora_ewc`.
    strength: ``lambda`` >= 0, or an optax schedule of the step count.
    viscosity: ``'hyperbolic'`` or ``'exponential'``.
    importance_dtype: storage dtype of the importance (``None``: float32).

  Returns:
    An ``optax.GradientTransformation`` with state :class:`LoRAState`, whose
    ``update`` needs ``params`` (the adapters).

  Example:
    >>> import jax.numpy as jnp, optax, wva_jax as wj
    >>> params = {'w': {'A': jnp.array([[2.0]]), 'B': jnp.array([[3.0]])}}
    >>> tx = optax.chain(optax.sgd(1.0), wj.lora_wva_scale({'w': jnp.array([[0.5]])}, 1.0))
    >>> ones = {'w': {'A': jnp.ones((1, 1)), 'B': jnp.ones((1, 1))}}
    >>> u, _ = tx.update(ones, tx.init(params), params)
    >>> round(float(u['w']['A'][0, 0]), 4), round(float(u['w']['B'][0, 0]), 4)   # -1/(1+4.5), -1/(1+2)
    (-0.1818, -0.3333)
  """
  check_choice(viscosity, VISCOSITIES, "viscosity")
  importance_dtype = _check_lora_factory(kernel_importance, strength, importance_dtype, "lora_wva_scale")

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("lora_wva_scale needs params (the adapters) in update(...)")
    ad = _flatten(params, "params")
    f_s = _importance_leaves(state.importance, ad)
    lam = strength_at(strength, state.count)
    factor = _unflatten_pairs(ad, [attenuation(_pullback(a, b, f), lam, viscosity)
                                   for a, b, f in zip(ad.a, ad.b, f_s)])
    return (jax.tree_util.tree_map(lambda u, s: (u.astype(_F32) * s).astype(u.dtype), updates, factor),
            state._replace(count=next_count(state.count)))

  return optax.GradientTransformation(_lora_init(kernel_importance, importance_dtype, strength), update_fn)
