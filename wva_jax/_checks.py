"""Input validation shared by the factories: errors name the bad value.

Checks on values (sign, finiteness) run only on concrete arrays: under
``jit``/``vmap`` the values are tracers and the checks are skipped, so a
validated factory stays traceable (the experiments build optimizers inside
``vmap`` with a traced strength).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def check_strength(strength, name: str = "strength"):
  if isinstance(strength, (str, bytes)) or strength is None:
    raise TypeError(f"{name} must be a number, got {strength!r}")
  if is_concrete(strength):
    arr = np.asarray(strength)
    if arr.shape != ():
      raise ValueError(f"{name} must be a scalar, got shape {arr.shape}")
    value = float(arr)
    if math.isnan(value) or math.isinf(value) or value < 0:
      raise ValueError(f"{name} must be finite and >= 0, got {value!r}")


def check_choice(value, choices, name: str):
  if value not in choices:
    raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_like_params(tree, params, name: str):
  """Same tree structure and leaf shapes as ``params``, else a ValueError naming the path."""
  t_def = jax.tree_util.tree_structure(tree)
  p_def = jax.tree_util.tree_structure(params)
  if t_def != p_def:
    raise ValueError(f"{name} has tree structure {t_def}, but params have {p_def}")
  for (path, t), p in zip(jax.tree_util.tree_leaves_with_path(tree),
                          jax.tree_util.tree_leaves(params)):
    if jnp.shape(t) != jnp.shape(p):
      raise ValueError(f"{name}{jax.tree_util.keystr(path)} has shape {jnp.shape(t)}, "
                       f"but the parameter has shape {jnp.shape(p)}")


def check_importance_values(tree, name: str = "importance"):
  """Importance must be finite and >= 0 (checked on concrete leaves only)."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    if not is_concrete(leaf):
      continue
    arr = np.asarray(leaf, dtype=np.float32)
    where = f"{name}{jax.tree_util.keystr(path)}"
    if np.isnan(arr).any():
      raise ValueError(f"{where} contains NaN ({int(np.isnan(arr).sum())} entries)")
    if np.isinf(arr).any():
      raise ValueError(f"{where} contains inf ({int(np.isinf(arr).sum())} entries)")
    if (arr < 0).any():
      raise ValueError(f"{where} has negative entries (min {arr.min()!r}); importance must be >= 0")


def check_finite(tree, name: str):
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    if is_concrete(leaf) and not np.isfinite(np.asarray(leaf, dtype=np.float32)).all():
      raise ValueError(f"{name}{jax.tree_util.keystr(path)} contains NaN or inf")
