"""Swapping a new task's importance or anchor into an existing optimizer state."""
from __future__ import annotations

from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from wva_jax._checks import (
  check_choice,
  check_finite,
  check_importance_values,
  check_strength,
  concrete_scalar,
)
from wva_jax._copy import fresh, fresh_tree
from wva_jax._fit import fit_like, matched_leaves
from wva_jax.ewc import EWCState
from wva_jax.importance.si import PathIntegralState
from wva_jax.lora import LoRAState
from wva_jax.wva import WVAState

_IMPORTANCE_STATES = (WVAState, EWCState, LoRAState)
# An optax state (or an ``nnx.Optimizer``, updated in place), returned as the same type.
_S = TypeVar("_S")


def _nnx_variable_type():
  try:
    from flax import nnx
  except ImportError:  # flax is optional: plain optax states need none of this
    return None
  return nnx.Variable


def _is_nnx_optimizer(x) -> bool:
  try:
    from flax import nnx
  except ImportError:
    return False
  return isinstance(x, nnx.Optimizer)


def find_states(opt_state, types: tuple) -> list:
  """Every state of one of ``types`` inside ``opt_state`` (an optax state or an ``nnx.Optimizer``), in tree order.

  States inside an ``nnx.Optimizer`` hold ``nnx.Variable`` objects; they are
  returned with their values (arrays) instead, so callers see plain arrays
  either way.
  """
  if _is_nnx_optimizer(opt_state):
    opt_state = opt_state.opt_state
  variable = _nnx_variable_type()
  is_target = lambda x: isinstance(x, types)
  found = [s for s in jax.tree_util.tree_leaves(opt_state, is_leaf=is_target) if is_target(s)]
  if variable is None:
    return found
  unwrap = lambda x: x.get_value() if isinstance(x, variable) else x
  return [jax.tree_util.tree_map(unwrap, s, is_leaf=lambda x: isinstance(x, variable)) for s in found]


def _set_in_place(optimizer, types, field: str, value, check):
  """``nnx.Optimizer`` keeps its state in mutable variables: write their values (matched by path)."""
  variable = _nnx_variable_type()
  is_target = lambda x: isinstance(x, types)
  targets = [s for s in jax.tree_util.tree_leaves(optimizer.opt_state, is_leaf=is_target)
             if is_target(s)]
  if not targets:
    raise ValueError(f"the nnx.Optimizer's state contains no {' or '.join(t.__name__ for t in types)}")
  writes = []
  for s in targets:
    tree = getattr(s, field)
    slots = jax.tree_util.tree_leaves(tree, is_leaf=lambda v: isinstance(v, variable))
    writes.append((slots, matched_leaves(value, tree, field)))
  check(value, field)
  for slots, new_leaves in writes:
    for slot, new in zip(slots, new_leaves):
      slot.set_value(fresh(new, slot.get_value().dtype))
  return optimizer


def _replace(opt_state, types, field: str, value, check):
  if _is_nnx_optimizer(opt_state):
    return _set_in_place(opt_state, types, field, value, check)
  is_target = lambda x: isinstance(x, types)
  found = []

  def swap(s):
    if not is_target(s):
      return s
    old = getattr(s, field)
    fitted = fit_like(value, old, field)
    found.append(s)
    # Keep the state's dtypes (float32 by default; a lower-precision state stays so),
    # in new buffers: one per state, never the caller's (a donated state would
    # delete the caller's array or donate the params twice).
    new = jax.tree_util.tree_map(lambda v, o: fresh(v, jnp.result_type(o)), fitted, old)
    return s._replace(**{field: new})

  new_state = jax.tree_util.tree_map(swap, opt_state, is_leaf=is_target)
  if not found:
    names = " or ".join(t.__name__ for t in types)
    raise ValueError(f"opt_state contains no {names}: nothing to set {field} on "
                     "(build the optimizer with wva_scale, add_ewc, implicit_ewc, add_lora_ewc or lora_wva_scale)")
  check(value, field)
  return new_state


def set_importance(opt_state: _S, importance: optax.Params) -> _S:
  """Returns ``opt_state`` with every WVA/EWC importance replaced by ``importance``.

  The tree structure and dtypes of the state are unchanged, so a jitted step
  taking the state as an argument runs on without retracing. An
  ``flax.nnx.Optimizer`` is updated in place (and returned).

  Each state gets its own copy, never ``importance``'s buffers, so a step
  jitted with ``donate_argnums=(0, 1)`` (params and state donated) neither
  deletes the caller's importance nor donates one buffer twice. The copy is
  the state's own tree: eagerly it costs that tree's bytes once (the old
  state's tree is freed when the old state is dropped); under ``jit`` nothing.

  Example:
    >>> import jax.numpy as jnp, wva_jax as wj
    >>> params = {'w': jnp.zeros(2)}
    >>> tx = wj.wva_sgd(0.1, None, strength=1.0)
    >>> state = wj.set_importance(tx.init(params), {'w': jnp.ones(2)})
  """
  return _replace(opt_state, _IMPORTANCE_STATES, "importance", importance, check_importance_values)


def set_anchor(opt_state: _S, anchor: optax.Params) -> _S:
  """Returns ``opt_state`` with every EWC anchor replaced by ``anchor`` (e.g. the current params).

  The anchor is a copy, never ``anchor``'s buffers: ``set_anchor(state,
  params)`` followed by a step jitted with ``donate_argnums=(0, 1)`` would
  otherwise donate the params twice. The copy is the anchor's own bytes.

  Example:
    >>> import jax.numpy as jnp, optax, wva_jax as wj
    >>> params = {'w': jnp.ones(2)}
    >>> tx = optax.chain(wj.add_ewc(None, None, 1.0), optax.sgd(0.1))
    >>> state = wj.set_anchor(tx.init(params), params)
  """
  return _replace(opt_state, (EWCState,), "anchor", anchor, check_finite)


COMBINES = ("sum", "replace")


def consolidate(opt_state: _S, params: optax.Params, importance: optax.Params, *, combine: str = "sum",
                decay: ArrayLike | None = None) -> _S:
  r"""The between-tasks step: folds a finished task's importance into the state and re-anchors it.

  For whatever the state holds (anywhere in an ``optax.chain`` or wrapper):

  * every importance (:class:`~wva_jax.WVAState`, :class:`~wva_jax.EWCState`,
    :class:`~wva_jax.LoRAState`) becomes :math:`\Omega \leftarrow \gamma\,
    \Omega_{\rm old} + \Omega_{\rm new}`, with ``combine="sum"`` and
    ``decay=None`` (:math:`\gamma = 1`: the importance of every past task adds
    up, the seed's raw sums), ``decay=gamma`` in [0, 1] (online EWC), or
    ``combine="replace"`` (:math:`\gamma = 0`: the newest task only); the sum
    is taken in float32 and stored in the state's dtype;
  * every EWC anchor (:func:`~wva_jax.add_ewc`, :func:`~wva_jax.implicit_ewc`)
    becomes a copy of ``params``; LoRA's anchor is the pretrained weights
    (:math:`\Delta W = 0`) and has nothing to move;
  * every SI path (:func:`wva_jax.importance.path_integral`) restarts at
    ``params`` (:func:`wva_jax.importance.restart_path`).

  Everything else (Adam's moments, the step counts that ``strength``
  schedules read) is left as it is. The structure and dtypes of the state do
  not change, so a jitted step runs on without retracing. A
  ``flax.nnx.Optimizer`` is updated in place (and returned).

  It replaces the hand-written sequence::

    total = wj.importance.accumulate(total, importance)   # or decay / the new one alone
    state = wj.set_importance(state, total)
    state = wj.set_anchor(state, params)                  # EWC, implicit EWC
    state = wj.importance.restart_path(state, params)     # SI

  except that the running total is the one in the state (in its dtype: with
  a bfloat16 importance keep a float32 total yourself and pass it with
  ``combine="replace"``).

  Args:
    opt_state: an optax state (or ``nnx.Optimizer``) holding at least one
      WVA, EWC or LoRA state.
    params: the parameters at the end of the task (the adapters for LoRA);
      an ``nnx.State`` for an ``nnx.Optimizer``.
    importance: the finished task's importance, shaped like the states'
      importance (``params`` for WVA/EWC; the kernel importance of
      :func:`wva_jax.lora_importance` for LoRA), finite and >= 0.
    combine: ``"sum"`` or ``"replace"``.
    decay: ``gamma`` in [0, 1] multiplying the old importance before the
      sum (``None``: 1); only with ``combine="sum"``.

  Returns:
    The new state, like ``opt_state``.

  Example:
    >>> import jax.numpy as jnp, optax, wva_jax as wj
    >>> params = {'w': jnp.zeros(2)}
    >>> tx = optax.chain(wj.add_ewc(strength=1.0), optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> state = wj.consolidate(state, {'w': jnp.ones(2)}, {'w': jnp.array([1.0, 2.0])})
    >>> state = wj.consolidate(state, {'w': jnp.ones(2)}, {'w': jnp.array([1.0, 2.0])}, decay=0.5)
    >>> state[0].importance['w'].tolist(), state[0].anchor['w'].tolist()   # 0.5 * [1, 2] + [1, 2]
    ([1.5, 3.0], [1.0, 1.0])
  """
  check_choice(combine, COMBINES, "combine")
  if decay is not None:
    if combine != "sum":
      raise ValueError(f"decay applies to combine='sum' only, got combine={combine!r} with decay={decay!r}")
    check_strength(decay, "decay")
    value = concrete_scalar(decay, "decay")
    if value is not None and value > 1:
      raise ValueError(f"decay must be in [0, 1], got {value!r}")
  replace, gamma = combine == "replace", 1.0 if decay is None else decay
  check_importance_values(importance)
  check_finite(params, "params")
  if _is_nnx_optimizer(opt_state):
    # The optimizer's state holds nnx.Variables: consolidate their values, then write each back into
    # its variable (in place, as nnx.Optimizer.update does); no flax API newer than 0.12.2 needed.
    variable = _nnx_variable_type()
    is_var = lambda x: isinstance(x, variable)
    inner: Any = opt_state.opt_state   # type: ignore[attr-defined]
    slots = jax.tree_util.tree_leaves(inner, is_leaf=is_var)
    pure = jax.tree_util.tree_map(lambda x: x.get_value() if is_var(x) else x, inner, is_leaf=is_var)
    new = _consolidate(pure, params, importance, replace, gamma)
    for slot, value in zip(slots, jax.tree_util.tree_leaves(new), strict=True):
      if is_var(slot):
        slot.set_value(value)
    return opt_state
  return _consolidate(opt_state, params, importance, replace, gamma)


def _consolidate(opt_state, params, importance, replace, gamma):
  fit = fit_like
  types = (*_IMPORTANCE_STATES, PathIntegralState)
  is_target = lambda x: isinstance(x, types)
  found = []

  def one(s):
    if not is_target(s):
      return s
    found.append(s)
    if isinstance(s, PathIntegralState):
      start = fit(params, s.start, "params")
      return s._replace(inner_state=jax.tree_util.tree_map(one, s.inner_state, is_leaf=is_target),
                        omega=jax.tree_util.tree_map(jnp.zeros_like, s.omega), start=fresh_tree(start))
    imp = fit(importance, s.importance, "importance")
    if replace:
      new_imp = jax.tree_util.tree_map(lambda n, o: fresh(n, jnp.result_type(o)), imp, s.importance)
    else:   # a new buffer too (the sum is one)
      new_imp = jax.tree_util.tree_map(
          lambda n, o: (gamma * o.astype(jnp.float32) + jnp.asarray(n, jnp.float32)).astype(o.dtype),
          imp, s.importance)
    s = s._replace(importance=new_imp)
    if isinstance(s, EWCState):
      anchor = fit(params, s.anchor, "params")
      s = s._replace(anchor=jax.tree_util.tree_map(lambda p, a: fresh(p, jnp.result_type(a)), anchor, s.anchor))
    return s

  new_state = jax.tree_util.tree_map(one, opt_state, is_leaf=is_target)
  if not any(isinstance(s, _IMPORTANCE_STATES) for s in found):
    raise ValueError("opt_state contains no WVAState, EWCState or LoRAState: nothing to consolidate "
                     "(build the optimizer with wva_scale, add_ewc, implicit_ewc, add_lora_ewc or lora_wva_scale)")
  return new_state
