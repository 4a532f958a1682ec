"""Input validation shared by the factories: errors name the bad value.

Checks on values (sign, finiteness) run only on concrete arrays: under
``jit``/``vmap`` the values are tracers and the checks are skipped, so a
validated factory stays traceable (the experiments build optimizers inside
``vmap`` with a traced strength).
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(x: Any) -> bool:
  return not isinstance(x, jax.core.Tracer)


def concrete_scalar(value: Any, name: str) -> float | None:
  """``float(value)`` for a concrete number (Python, NumPy or JAX scalar); ``None`` when traced.

  A string, ``None`` or a non-scalar raises, naming ``name``.
  """
  if isinstance(value, (str, bytes)) or value is None:
    raise TypeError(f"{name} must be a number, got {value!r}")
  if not is_concrete(value):
    return None
  arr = np.asarray(value)
  if arr.shape != ():
    raise ValueError(f"{name} must be a scalar, got shape {arr.shape}")
  return float(arr)


def check_strength(strength: Any, name: str = "strength") -> None:
  """A finite scalar >= 0 (checked when concrete; a traced value passes)."""
  value = concrete_scalar(strength, name)
  if value is not None and (math.isnan(value) or math.isinf(value) or value < 0):
    raise ValueError(f"{name} must be finite and >= 0, got {value!r}")


def check_positive(value: Any, name: str) -> None:
  """A finite scalar > 0 (checked when concrete; a traced value passes)."""
  v = concrete_scalar(value, name)
  if v is not None and not (math.isfinite(v) and v > 0):
    raise ValueError(f"{name} must be finite and > 0, got {v!r}")


def check_scalar_or_schedule(value: Any, name: str) -> None:
  """An ``optax.ScalarOrSchedule``: a callable of the step count, or a scalar >= 0."""
  if not callable(value):
    check_strength(value, name)


def check_tree_arg(value: Any, name: str, factory: str) -> None:
  """``value`` must be a tree of arrays (or ``None``): a bare number here is almost always a strength
  passed by position (``wva_sgd(0.1, 10.0)``), which would otherwise fail later, at ``init``, with a
  tree-structure error that never says ``strength=``."""
  if value is None or isinstance(value, (str, bytes)):
    if value is not None:
      raise TypeError(f"{name} must be a pytree of arrays shaped like the params, got {value!r}")
    return
  if isinstance(value, (int, float, complex)) or (hasattr(value, "shape") and jnp.shape(value) == ()):
    raise ValueError(f"{factory}: {name} must be a pytree of arrays shaped like the params (or None), got the "
                     f"scalar {value!r}; to set the strength, pass it by keyword: {factory}(..., strength={value!r})")


def check_choice(value: Any, choices: Iterable[Any], name: str) -> None:
  choices = tuple(choices)
  if value not in choices:
    raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_like_params(tree: Any, params: Any, name: str) -> None:
  """Same tree structure and leaf shapes as ``params``, else a ValueError naming the path."""
  t_def: Any = jax.tree_util.tree_structure(tree)
  p_def: Any = jax.tree_util.tree_structure(params)
  if t_def != p_def:
    raise ValueError(f"{name} has tree structure {t_def}, but params have {p_def}")
  for (path, t), p in zip(jax.tree_util.tree_leaves_with_path(tree),
                          jax.tree_util.tree_leaves(params)):
    if jnp.shape(t) != jnp.shape(p):
      raise ValueError(f"{name}{jax.tree_util.keystr(path)} has shape {jnp.shape(t)}, "
                       f"but the parameter has shape {jnp.shape(p)}")


# jitted and traced outside compile-time evaluation where possible: there, the reductions'
# constants become device arrays that jax keeps alive for good (a stray live buffer per check)
@jax.jit
def _device_stats(x: jax.Array) -> tuple[jax.Array, ...]:
  x = x.astype(jnp.float32)
  return jnp.isnan(x).sum(), jnp.isinf(x).sum(), (x < 0).sum(), jnp.min(x, initial=jnp.inf)


def _value_stats(leaf: Any) -> tuple[int, int, int, np.float32]:
  """NaN count, inf count, negative count and minimum of a concrete leaf.

  A ``jax.Array`` is reduced where it lives: one spanning several processes
  (multi-host) cannot be fetched to the host at all, and fetching a large
  model's tree only to check it would copy all of it.
  """
  if isinstance(leaf, jax.Array):
    # Inside an outer jit trace (a closed-over concrete importance) every jax op is
    # staged into that trace and int() of its result fails; compile-time evaluation
    # runs the reduction now, on the concrete array.
    stats = _device_stats(leaf)
    if isinstance(stats[0], jax.core.Tracer):
      with jax.ensure_compile_time_eval():  # only then: its constants stay live for good
        stats = _device_stats(leaf)
    nan, inf, neg, lo = stats
    return int(nan), int(inf), int(neg), np.float32(lo)
  arr = np.asarray(leaf, dtype=np.float32)
  return (int(np.isnan(arr).sum()), int(np.isinf(arr).sum()), int((arr < 0).sum()),
          arr.min() if arr.size else np.float32(np.inf))


def check_importance_values(tree: Any, name: str = "importance") -> None:
  """Importance must be finite and >= 0 (checked on concrete leaves only)."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    if not is_concrete(leaf):
      continue
    nan, inf, neg, lo = _value_stats(leaf)
    where = f"{name}{jax.tree_util.keystr(path)}"
    if nan:
      raise ValueError(f"{where} contains NaN ({nan} entries)")
    if inf:
      raise ValueError(f"{where} contains inf ({inf} entries)")
    if neg:
      raise ValueError(f"{where} has negative entries (min {lo!r}); importance must be >= 0")


def check_finite(tree: Any, name: str) -> None:
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    if not is_concrete(leaf):
      continue
    nan, inf, _, _ = _value_stats(leaf)
    if nan or inf:
      raise ValueError(f"{name}{jax.tree_util.keystr(path)} contains NaN or inf")
