"""Elastic weight consolidation (EWC): explicit penalty and implicit (proximal) step."""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike, DTypeLike

from wva_jax._checks import (
  check_finite,
  check_importance_values,
  check_like_params,
  check_scalar_or_schedule,
  check_strength,
  check_tree_arg,
)
from wva_jax._copy import fresh_tree
from wva_jax._fit import fit_like
from wva_jax.wva import check_storage_dtype, init_count, init_importance, next_count, strength_at


class EWCState(NamedTuple):
  """State of :func:`add_ewc` and :func:`implicit_ewc`: anchor and importance.

  Both live in the state so :func:`wva_jax.set_anchor` and
  :func:`wva_jax.set_importance` (or :func:`wva_jax.consolidate`) swap in a
  new task's values without recompiling. ``count`` counts the updates
  (int32, as in ``optax.scale_by_schedule``) when ``strength`` or
  :func:`implicit_ewc`'s ``learning_rate`` is a schedule, which is evaluated
  at it; ``None`` otherwise.
  """
  anchor: Any
  importance: Any
  count: Any = None


def ewc_penalty(params: optax.Params, anchor: optax.Params, importance: optax.Params,
                strength: ArrayLike = 1.0) -> jax.Array:
  r"""The EWC penalty :math:`\frac{\lambda}{2} \sum_i \Omega_i (\theta_i - \theta^*_i)^2`.

  Add it to the task loss; computed in float32 whatever the params' dtype.

  Example:
    >>> import jax.numpy as jnp, wva_jax as wj
    >>> p, a = {'w': jnp.array([1.0, 2.0])}, {'w': jnp.zeros(2)}
    >>> float(wj.ewc_penalty(p, a, {'w': jnp.array([1.0, 0.5])}, 2.0))   # 1*1 + 0.5*4
    3.0

  References:
    Kirkpatrick et al., "Overcoming catastrophic forgetting in neural
    networks", PNAS 2017.
  """
  check_strength(strength)
  check_like_params(anchor, params, "anchor")
  check_like_params(importance, params, "importance")
  check_importance_values(importance)
  terms = jax.tree_util.tree_map(
      lambda p, a, i: jnp.sum(i.astype(jnp.float32)
                              * jnp.square(p.astype(jnp.float32) - a.astype(jnp.float32))),
      params, anchor, importance)
  return jnp.asarray(0.5 * strength * sum(jax.tree_util.tree_leaves(terms)))


def _ewc_factory(anchor, importance, strength, importance_dtype, learning_rate=None, factory="add_ewc"):
  check_tree_arg(anchor, "anchor", factory)
  check_tree_arg(importance, "importance", factory)
  check_scalar_or_schedule(strength, "strength")
  importance_dtype = check_storage_dtype(importance_dtype)
  if importance is not None:
    check_importance_values(importance)
  if anchor is not None:
    check_finite(anchor, "anchor")

  def init_fn(params):
    fitted = None if anchor is None else fit_like(anchor, params, "anchor", what="params")
    # No anchor yet: anchor at the initial params (the penalty is zero anyway
    # while the importance is zero). Always a copy, never the caller's buffers:
    # a step jitted with donate_argnums=(0, 1) would otherwise donate the
    # params twice (wva_jax/_copy.py).
    return EWCState(anchor=fresh_tree(params if anchor is None else fitted),
                    importance=init_importance(importance, params, importance_dtype),
                    count=init_count(strength, learning_rate))

  return init_fn


def add_ewc(anchor: optax.Params | None = None, importance: optax.Params | None = None,
            strength: optax.ScalarOrSchedule = 1.0, *,
            importance_dtype: DTypeLike | None = None) -> optax.GradientTransformation:
  r"""Adds the gradient of the EWC penalty to the updates: ``g + lambda * imp * (theta - anchor)``.

  Put it first in a chain, so every optimizer (SGD, Adam, anything) sees the
  penalised gradient, exactly as if :func:`ewc_penalty` had been added to the
  loss. It costs two model-sized trees (anchor and importance): with SGD the
  training state is 3x the model.

  Args:
    anchor: parameters to pull towards (the end of the previous task), or
      ``None`` to anchor at the params given to ``init``. ``init`` stores a
      copy (so params and state can both be donated to a jitted step); for a
      large model pass ``None`` and :func:`wva_jax.set_anchor` later, so the
      transform's closure holds no second tree.
    importance: like params, >= 0, or ``None`` for zeros.
    strength: ``lambda`` >= 0 (may be traced), or an optax schedule of the
      step count (the state's ``count``, 0 at the first update).
    importance_dtype: storage dtype of the importance (``jnp.bfloat16`` to
      save memory); the pull is computed in float32. The anchor keeps the
      params' dtype.

  Returns:
    An ``optax.GradientTransformation`` whose ``update`` needs ``params``.

  Example:
    >>> import jax.numpy as jnp, optax, wva_jax as wj
    >>> params = {'w': jnp.array([1.0])}
    >>> tx = optax.chain(wj.add_ewc({'w': jnp.zeros(1)}, {'w': jnp.ones(1)}, 2.0), optax.sgd(0.1))
    >>> u, _ = tx.update({'w': jnp.zeros(1)}, tx.init(params), params)
    >>> round(float(u['w'][0]), 6)   # -0.1 * 2 * 1 * (1 - 0)
    -0.2

    The usual set-up: nothing known before the first task, the between-tasks
    step (:func:`wva_jax.consolidate`) fills in importance and anchor:

    >>> tx = optax.chain(wj.add_ewc(strength=2.0), optax.adam(1e-3))
    >>> state = wj.consolidate(tx.init(params), params, {'w': jnp.ones(1)})
  """
  init_fn = _ewc_factory(anchor, importance, strength, importance_dtype)

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("add_ewc needs params in update(...) to compute the pull to the anchor")
    lam = strength_at(strength, state.count)
    pull = jax.tree_util.tree_map(
        lambda u, p, a, i: (u.astype(jnp.float32) + lam * i.astype(jnp.float32)
                            * (p.astype(jnp.float32) - a.astype(jnp.float32))).astype(u.dtype),
        updates, params, state.anchor, state.importance)
    return pull, state._replace(count=next_count(state.count))

  return optax.GradientTransformation(init_fn, update_fn)


def implicit_ewc(anchor: optax.Params | None = None, importance: optax.Params | None = None,
                 strength: optax.ScalarOrSchedule = 1.0, *, learning_rate: optax.ScalarOrSchedule,
                 importance_dtype: DTypeLike | None = None) -> optax.GradientTransformation:
  r"""Implicit (proximal) EWC: the unconditionally stable step of the EWC penalty.

  Explicit EWC with SGD takes :math:`\theta_{k+1} = \theta_k - \eta\nabla L -
  \eta\lambda\Omega(\theta_k - \theta^*)`, which diverges once
  :math:`\eta\lambda\Omega_i > 2` (the seed's large-lambda instability).
  Treating the quadratic term implicitly (backward Euler),

  .. math::
     \theta_{k+1} = \theta_k - \eta\nabla L(\theta_k) - \eta\lambda\Omega
     (\theta_{k+1} - \theta^*)
     \;\Longrightarrow\;
     \theta_{k+1} = \theta^* + a\,(\tilde\theta_{k+1} - \theta^*),
     \quad a = \frac{1}{1 + \eta\lambda\Omega},

  with :math:`\tilde\theta_{k+1} = \theta_k + u` the step of the task loss
  alone. ``0 < a <= 1`` for every ``lambda >= 0``: stable for any strength.
  As an increment: :math:`a u - (1-a)(\theta_k - \theta^*)`. With the anchor
  at the previous iterate (:math:`\theta^* = \theta_k`) this is exactly WVA
  with hyperbolic viscosity and strength :math:`\eta\lambda`: WVA is the
  limit of EWC whose "task" is one step on one batch, as the seed says.

  Put it *last* in a chain, after the optimizer (it transforms increments).

  Args:
    anchor: ``theta*`` (like params) or ``None`` for the params at ``init``.
    importance: like params, >= 0, or ``None`` for zeros.
    strength: ``lambda`` >= 0, or an optax schedule of the step count
      (evaluated at the state's ``count``, as ``learning_rate``).
    learning_rate: ``eta``, the step size that ``lambda`` is measured
      against: pass the float or ``optax`` schedule you gave the optimizer
      it follows, and ``strength`` means what it means in :func:`add_ewc`
      and :func:`ewc_penalty`. A schedule is evaluated at this
      transformation's own step count (kept in the state), which is the
      count ``optax.sgd(schedule)`` uses when both see every update. With an
      adaptive optimizer (Adam), whose preconditioner the implicit step does
      not model, pass ``learning_rate=1.0`` and give ``strength`` as
      ``eta * lambda`` directly: the attenuation's own units, as in
      :func:`wva_jax.wva_scale`. It has no default, as in every optax
      optimizer: a default of 1.0 would silently measure ``lambda`` against
      a step of 1, a pull 100x stronger than :func:`add_ewc`'s under
      ``optax.sgd(0.01)``.
    importance_dtype: storage dtype of the importance.

  Example:
    >>> import jax.numpy as jnp, optax, wva_jax as wj
    >>> params = {'w': jnp.array([1.0])}
    >>> tx = optax.chain(optax.sgd(0.1),
    ...                  wj.implicit_ewc({'w': jnp.zeros(1)}, {'w': jnp.ones(1)}, 10.0, learning_rate=0.1))
    >>> u, _ = tx.update({'w': jnp.zeros(1)}, tx.init(params), params)
    >>> round(float(u['w'][0]), 6)   # a = 1/2: halfway back to the anchor
    -0.5

    With a schedule (the same one the optimizer gets):

    >>> lr = optax.linear_schedule(0.1, 0.0, transition_steps=10)
    >>> tx = optax.chain(optax.sgd(lr), wj.implicit_ewc(strength=10.0, learning_rate=lr))
    >>> state = tx.init(params)
  """
  check_scalar_or_schedule(learning_rate, "learning_rate")
  init_fn = _ewc_factory(anchor, importance, strength, importance_dtype, learning_rate, "implicit_ewc")

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("implicit_ewc needs params in update(...)")
    eta_lam = strength_at(learning_rate, state.count) * strength_at(strength, state.count)
    state = state._replace(count=next_count(state.count))

    def step(u, p, a, i):
      att = 1.0 / (1.0 + eta_lam * i.astype(jnp.float32))
      off = p.astype(jnp.float32) - a.astype(jnp.float32)
      return (att * u.astype(jnp.float32) - (1.0 - att) * off).astype(u.dtype)

    return jax.tree_util.tree_map(step, updates, params, state.anchor, state.importance), state

  return optax.GradientTransformation(init_fn, update_fn)
