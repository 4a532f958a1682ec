"""Swapping a new task's importance or anchor into an existing optimizer state."""
from __future__ import annotations

from typing import TypeVar

import jax
import jax.numpy as jnp
import optax

from wva_jax._checks import check_finite, check_importance_values, check_like_params
from wva_jax._copy import fresh
from wva_jax.ewc import EWCState
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
  """``nnx.Optimizer`` keeps its state in mutable variables: write their values."""
  variable = _nnx_variable_type()
  is_target = lambda x: isinstance(x, types)
  targets = [s for s in jax.tree_util.tree_leaves(optimizer.opt_state, is_leaf=is_target)
             if is_target(s)]
  if not targets:
    raise ValueError(f"the nnx.Optimizer's state contains no {' or '.join(t.__name__ for t in types)}")
  new_leaves = jax.tree_util.tree_leaves(value)
  for s in targets:
    slots = jax.tree_util.tree_leaves(getattr(s, field), is_leaf=lambda v: isinstance(v, variable))
    if len(slots) != len(new_leaves):
      raise ValueError(f"{field} has {len(new_leaves)} leaves, the optimizer's state has {len(slots)}")
    for slot, new in zip(slots, new_leaves):
      if jnp.shape(new) != jnp.shape(slot.get_value()):
        raise ValueError(f"{field} leaf of shape {jnp.shape(new)} does not fit "
                         f"the state's {jnp.shape(slot.get_value())}")
  check(value, field)
  for s in targets:
    slots = jax.tree_util.tree_leaves(getattr(s, field), is_leaf=lambda v: isinstance(v, variable))
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
    check_like_params(value, old, field)
    found.append(s)
    # Keep the state's dtypes (float32 by default; a lower-precision state stays so),
    # in new buffers: one per state, never the caller's (a donated state would
    # delete the caller's array or donate the params twice).
    new = jax.tree_util.tree_map(lambda v, o: fresh(v, jnp.result_type(o)), value, old)
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
