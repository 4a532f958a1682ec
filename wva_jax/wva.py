"""Weight velocity attenuation (WVA) as Optax transformations."""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike, DTypeLike

from wva_jax._checks import (
  check_choice,
  check_importance_values,
  check_scalar_or_schedule,
  check_tree_arg,
)
from wva_jax._copy import fresh_tree
from wva_jax._fit import fit_like

VISCOSITIES = ("hyperbolic", "exponential")


class WVAState(NamedTuple):
  """State of :func:`wva_scale`: the importance (float32, shaped like params) and the step count.

  The importance lives in the state, not in a closure, so a new task's
  importance goes in with :func:`wva_jax.set_importance` (or
  :func:`wva_jax.consolidate`) without recompiling a jitted step. ``count``
  counts the updates (int32, as in ``optax.scale_by_schedule``) when
  ``strength`` is a schedule, which is evaluated at it; ``None`` for a
  constant strength (as optax keeps no count for a constant learning rate).
  """
  importance: Any
  count: Any = None


def init_count(*hyperparams: Any) -> jax.Array | None:
  """A state's step count: int32 zero when any of ``hyperparams`` is a schedule (callable), else ``None``."""
  return jnp.zeros([], jnp.int32) if any(callable(h) for h in hyperparams) else None


def next_count(count: Any) -> Any:
  return None if count is None else optax.safe_int32_increment(count)


def strength_at(strength: optax.ScalarOrSchedule, count: Any) -> ArrayLike:
  """``strength`` at step ``count`` (the state's count, never ``None`` for a schedule), or the scalar itself."""
  return strength(count) if callable(strength) else strength


def attenuation(importance: optax.Params, strength: ArrayLike,
                viscosity: str = "hyperbolic") -> optax.Params:
  r"""The per-parameter factor ``a``: ``1/(1+strength*imp)`` or ``exp(-strength*imp)``.

  Example:
    >>> import jax.numpy as jnp, wva_jax as wj
    >>> wj.attenuation({'w': jnp.array([0.0, 1.0])}, 3.0)['w'].tolist()
    [1.0, 0.25]
  """
  check_choice(viscosity, VISCOSITIES, "viscosity")
  if viscosity == "hyperbolic":
    f = lambda i: 1.0 / (1.0 + strength * i.astype(jnp.float32))
  else:
    f = lambda i: jnp.exp(-(strength * i.astype(jnp.float32)))
  return jax.tree_util.tree_map(f, importance)


def check_storage_dtype(dtype: DTypeLike | None, name: str = "importance_dtype") -> jnp.dtype:
  # None (float32) rather than a dtype default: optax.inject_hyperparams would
  # take a dtype object for a numeric hyperparameter.
  if dtype is None:
    return jnp.dtype(jnp.float32)
  if not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
    raise ValueError(f"{name} must be a floating dtype, got {dtype!r}")
  return jnp.dtype(dtype)


def init_importance(importance: optax.Params | None, params: optax.Params,
                    dtype: DTypeLike = jnp.float32, name: str = "importance") -> optax.Params:
  """Validated importance for a state, stored in ``dtype``; ``None`` means zeros."""
  if importance is None:
    # zeros_like keeps each parameter's sharding (jnp.zeros would put it on one device).
    return jax.tree_util.tree_map(lambda p: jnp.zeros_like(p, dtype=dtype), params)
  # matched by path: a flat {'layers/0/kernel': ...} dict fits, and inside optax.masked /
  # partition only the params this transform updates are kept (wva_jax/_fit.py)
  importance = fit_like(importance, params, name, what="params")
  # A copy, never the caller's array: a donated state would delete it (wva_jax/_copy.py).
  return fresh_tree(importance, dtype)


def wva_scale(importance: optax.Params | None = None, strength: optax.ScalarOrSchedule = 1.0, *,
              viscosity: str = "hyperbolic", importance_dtype: DTypeLike | None = None
              ) -> optax.GradientTransformation:
  r"""Scales each update by an attenuation that falls with the parameter's importance.

  .. math::
     u_i \leftarrow a_i u_i, \qquad a_i = \frac{1}{1 + \lambda\, \Omega_i}
     \ (\text{hyperbolic}) \quad\text{or}\quad a_i = e^{-\lambda \Omega_i}
     \ (\text{exponential})

  Important parameters move slowly ("viscosity"); there is no anchor, so the
  state costs one model-sized tree (WVA + SGD holds 2x the model, EWC 3x).

  Where it goes in a chain matters:

  * ``optax.chain(optimizer, wva_scale(...))`` attenuates the *increments*
    (the seed's "deltas"). This is the recommended placement and what
    :func:`wva_sgd` and :func:`wva_adam` build.
  * ``optax.chain(wva_scale(...), optax.adam(...))`` attenuates gradients
    before Adam, whose per-coordinate normalisation ``m / sqrt(v)`` cancels
    any constant per-coordinate scale: under a fixed importance the
    trajectory is identical to plain Adam (up to ``eps``). What protection
    it shows comes from Adam's moments lagging each task's new importance:
    with the moments reset at every task boundary it vanishes (the study's
    ``adam_moments``). This is the seed's failing "Adam-gradients" arm, kept
    for the comparison. Before plain SGD (no momentum) both placements are
    the same.

  On 10 permuted-MNIST tasks (the project's study, ``results/README.md``,
  experiment ``viscosity``) the exponential form beat the hyperbolic one on
  every fresh seed, with SGD and with Adam, each at its own selected
  ``strength`` (about 10x smaller for the exponential form). The default stays
  hyperbolic, the published form.

  Args:
    importance: a pytree like the params (float32, >= 0), or ``None`` for
      zeros until :func:`wva_jax.set_importance` swaps one in. ``init``
      stores a copy (a donated state must not delete the caller's array);
      for a large model pass ``None`` and ``set_importance``, so the closure
      holds no second tree.
    strength: ``lambda`` >= 0 (may be a traced scalar, e.g. under ``vmap``),
      or an optax schedule: a function of the step count (the state's
      ``count``, 0 at the first update) returning ``lambda``.
    viscosity: ``'hyperbolic'`` or ``'exponential'``.
    importance_dtype: how the state stores the importance: ``None`` for
      float32, ``jnp.bfloat16`` to halve its memory for large models; the
      attenuation is always computed in float32.

  Returns:
    An ``optax.GradientTransformation`` with state :class:`WVAState`.

  Example:
    >>> import jax.numpy as jnp, optax, wva_jax as wj
    >>> params = {'w': jnp.zeros(2)}
    >>> tx = optax.chain(optax.sgd(0.1), wj.wva_scale({'w': jnp.array([0.0, 3.0])}, 1.0))
    >>> u, _ = tx.update({'w': jnp.ones(2)}, tx.init(params), params)
    >>> [round(float(v), 6) for v in u['w']]   # -0.1 * [1/(1+0), 1/(1+3)]
    [-0.1, -0.025]

    ``strength`` may follow a schedule of the step count (here 0 at the first
    update, rising to 3 over 10 updates):

    >>> tx = optax.chain(optax.sgd(0.1), wj.wva_scale(strength=optax.linear_schedule(0.0, 3.0, 10)))
    >>> state = wj.set_importance(tx.init(params), {'w': jnp.array([0.0, 3.0])})
    >>> u, state = tx.update({'w': jnp.ones(2)}, state, params)
    >>> [round(float(v), 6) for v in u['w']]   # strength 0: no attenuation yet
    [-0.1, -0.1]

  References:
    The seed study (WVA); Kutalev & Lapina, "Stabilizing Elastic Weight
    Consolidation method in practical ML tasks and using weight importances
    for neural network pruning", 2021.
  """
  check_scalar_or_schedule(strength, "strength")
  check_choice(viscosity, VISCOSITIES, "viscosity")
  check_tree_arg(importance, "importance", "wva_scale")
  importance_dtype = check_storage_dtype(importance_dtype)
  if importance is not None:
    check_importance_values(importance)

  def init_fn(params):
    return WVAState(importance=init_importance(importance, params, importance_dtype),
                    count=init_count(strength))

  def update_fn(updates, state, params=None):
    del params
    factor = attenuation(state.importance, strength_at(strength, state.count), viscosity)
    updates = jax.tree_util.tree_map(lambda u, a: (u * a).astype(u.dtype), updates, factor)
    return updates, state._replace(count=next_count(state.count))

  return optax.GradientTransformation(init_fn, update_fn)


def wva_sgd(learning_rate: optax.ScalarOrSchedule, importance: optax.Params | None = None,
            strength: optax.ScalarOrSchedule = 1.0, *, viscosity: str = "hyperbolic",
            importance_dtype: DTypeLike | None = None) -> optax.GradientTransformation:
  """SGD (no momentum) with WVA: ``optax.chain(optax.sgd(lr), wva_scale(...))``.

  Example:
    >>> import jax.numpy as jnp, wva_jax as wj
    >>> tx = wj.wva_sgd(0.2, {'w': jnp.ones(3)}, strength=10.0)
    >>> state = tx.init({'w': jnp.zeros(3)})
  """
  check_tree_arg(importance, "importance", "wva_sgd")
  return optax.chain(optax.sgd(learning_rate), wva_scale(importance, strength, viscosity=viscosity,
                                                        importance_dtype=importance_dtype))


def _with_nu_dtype(adam: optax.GradientTransformation, nu_dtype: jnp.dtype) -> optax.GradientTransformation:
  """``adam`` whose second moment is stored in ``nu_dtype``.

  optax's ``mu_dtype`` sets only the first moment; the second takes the
  params' dtype. In bfloat16 (8 significant bits) ``b2 * nu`` with b2 = 0.999
  rounds back to ``nu`` once ``nu`` is within 2**-8 of its target, so nu
  stalls short of E[g^2] and the steps come out too large (over 1.2x on a
  steady gradient after 3000 steps: tests/test_consolidation.py).
  """
  is_adam = lambda s: isinstance(s, optax.ScaleByAdamState)
  cast = lambda state: jax.tree_util.tree_map(
      lambda s: s._replace(nu=jax.tree_util.tree_map(lambda v: v.astype(nu_dtype), s.nu)) if is_adam(s) else s,
      state, is_leaf=is_adam)

  def init_fn(params):
    return cast(adam.init(params))

  def update_fn(updates, state, params=None):
    # Recast after the update too: optax before 0.2.4 lets nu promote to the
    # wider of its state and the gradient, which would change the state's type.
    updates, state = adam.update(updates, state, params)
    return updates, cast(state)

  return optax.GradientTransformation(init_fn, update_fn)


def wva_adam(learning_rate: optax.ScalarOrSchedule, importance: optax.Params | None = None,
             strength: optax.ScalarOrSchedule = 1.0, *, viscosity: str = "hyperbolic",
             b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, eps_root: float = 0.0,
             mu_dtype: DTypeLike | None = None, nesterov: bool = False,
             importance_dtype: DTypeLike | None = None,
             nu_dtype: DTypeLike | None = None) -> optax.GradientTransformation:
  """Adam with WVA on its increments: ``optax.chain(optax.adam(...), wva_scale(...))``.

  The attenuation comes after Adam's normalisation, which would otherwise
  cancel it (see :func:`wva_scale`). ``learning_rate`` (a float or an optax
  schedule), ``b1``, ``b2``, ``eps``, ``eps_root``, ``mu_dtype`` and
  ``nesterov`` go to ``optax.adam`` unchanged; ``viscosity``, ``strength``
  and ``importance_dtype`` are :func:`wva_scale`'s.

  ``nu_dtype`` stores Adam's second moment in that dtype (``None``: the
  params' dtype, as optax does). With bfloat16 params pass
  ``mu_dtype=jnp.float32, nu_dtype=jnp.float32``: a bfloat16 second moment
  cannot follow ``b2 = 0.999``'s decay and inflates the steps.

  Example:
    >>> import jax.numpy as jnp, wva_jax as wj
    >>> tx = wj.wva_adam(1e-3, {'w': jnp.ones(3)}, strength=10.0)
    >>> state = tx.init({'w': jnp.zeros(3)})
    >>> bf16 = wj.wva_adam(1e-3, None, 10.0, mu_dtype=jnp.float32, nu_dtype=jnp.float32)
    >>> bf16.init({'w': jnp.zeros(3, jnp.bfloat16)})[0][0].nu['w'].dtype
    dtype('float32')
  """
  check_tree_arg(importance, "importance", "wva_adam")
  adam: optax.GradientTransformation = optax.adam(learning_rate, b1=b1, b2=b2, eps=eps, eps_root=eps_root,
                                                  mu_dtype=mu_dtype, nesterov=nesterov)
  if nu_dtype is not None:
    adam = _with_nu_dtype(adam, check_storage_dtype(nu_dtype, "nu_dtype"))
  return optax.chain(adam, wva_scale(importance, strength, viscosity=viscosity,
                                     importance_dtype=importance_dtype))
