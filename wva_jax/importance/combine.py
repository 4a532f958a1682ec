"""Combining importances across tasks and putting them on a common scale."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from wva_jax._checks import (
  check_choice,
  check_importance_values,
  check_like_params,
  check_strength,
  concrete_scalar,
)


def accumulate(total: optax.Params | None, new: optax.Params) -> optax.Params:
  """``total + new``: the seed's rule (importance of every past task adds up).

  ``total`` may be ``None`` (no task yet), which returns ``new`` in float32.

  Example:
    >>> import jax.numpy as jnp, wva_jax as wj
    >>> wj.importance.accumulate({'w': jnp.ones(2)}, {'w': jnp.ones(2)})['w'].tolist()
    [2.0, 2.0]
  """
  return decay(total, new, 1.0)


def decay(total: optax.Params | None, new: optax.Params, gamma: ArrayLike) -> optax.Params:
  r"""Online combination ``gamma * total + new`` (online EWC, Schwarz et al. 2018).

  ``gamma`` in [0, 1]: 1 is :func:`accumulate`, 0 keeps the newest task only.
  A concrete ``gamma`` (Python, NumPy or JAX scalar) outside [0, 1] raises a
  ``ValueError``; a traced one (under ``jit``/``vmap``) is not checked.

  Example:
    >>> import jax.numpy as jnp, wva_jax as wj
    >>> wj.importance.decay({'w': jnp.ones(2)}, {'w': jnp.ones(2)}, 0.5)['w'].tolist()
    [1.5, 1.5]
  """
  check_strength(gamma, "gamma")
  value = concrete_scalar(gamma, "gamma")
  if value is not None and value > 1:
    raise ValueError(f"gamma must be in [0, 1], got {value!r}")
  check_importance_values(new, "new")
  new = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), new)
  if total is None:
    return new
  check_like_params(total, new, "total")
  return jax.tree_util.tree_map(lambda t, n: gamma * t.astype(jnp.float32) + n, total, new)


def normalize(importance: optax.Params, by: str = "mean") -> optax.Params:
  r"""Divides every leaf by one scalar of the whole tree: its ``'mean'`` or ``'max'``.

  Fisher, MAS and SIG live on scales orders of magnitude apart; after
  normalising by the mean, ``strength`` means the same thing for all of them
  (a parameter of average importance is slowed by ``1/(1+strength)``). One
  scalar for the whole tree keeps the relative importance of layers.

  Example:
    >>> import jax.numpy as jnp, wva_jax as wj
    >>> wj.importance.normalize({'a': jnp.array([1.0, 3.0])})['a'].tolist()
    [0.5, 1.5]
  """
  check_choice(by, ("mean", "max"), "by")
  leaves = [jnp.asarray(x, jnp.float32) for x in jax.tree_util.tree_leaves(importance)]
  if not leaves:
    raise ValueError("importance has no leaves")
  if by == "mean":
    scale = sum(x.sum() for x in leaves) / sum(x.size for x in leaves)
  else:
    scale = jnp.max(jnp.stack([x.max() for x in leaves]))
  # An all-zero importance stays zero instead of becoming NaN.
  scale = jnp.where(scale > 0, scale, 1.0)
  return jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32) / scale, importance)
