"""Swapping a new task's importance or anchor into an existing optimizer state."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from wva_jax._checks import check_finite, check_importance_values, check_like_params
from wva_jax.ewc import EWCState
from wva_jax.wva import WVAState

_IMPORTANCE_STATES = (WVAState, EWCState)


def _replace(opt_state, types, field: str, value, check):
  is_target = lambda x: isinstance(x, types)
  found = []

  def swap(s):
    if not is_target(s):
      return s
    old = getattr(s, field)
    check_like_params(value, old, field)
    found.append(s)
    # Keep the state's dtypes (float32 by default; a lower-precision state stays so).
    new = jax.tree_util.tree_map(lambda v, o: jnp.asarray(v, jnp.result_type(o)), value, old)
    return s._replace(**{field: new})

  new_state = jax.tree_util.tree_map(swap, opt_state, is_leaf=is_target)
  if not found:
    names = " or ".join(t.__name__ for t in types)
    raise ValueError(f"opt_state contains no {names}: nothing to set {field} on "
                     "(build the optimizer with wva_scale, add_ewc or implicit_ewc)")
  check(value, field)
  return new_state


def set_importance(opt_state, importance):
  """Returns ``opt_state`` with every WVA/EWC importance replaced by ``importance``.

  The tree structure and dtypes of the state are unchanged, so a jitted step
  taking the state as an argument runs on without retracing.

  Example:
    >>> import jax.numpy as jnp, wva_jax as wj
    >>> params = {'w': jnp.zeros(2)}
    >>> tx = wj.wva_sgd(0.1, None, strength=1.0)
    >>> state = wj.set_importance(tx.init(params), {'w': jnp.ones(2)})
  """
  return _replace(opt_state, _IMPORTANCE_STATES, "importance", importance, check_importance_values)


def set_anchor(opt_state, anchor):
  """Returns ``opt_state`` with every EWC anchor replaced by ``anchor`` (e.g. the current params)."""
  return _replace(opt_state, (EWCState,), "anchor", anchor, check_finite)
