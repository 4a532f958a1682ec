"""Comparing importance pytrees in tests."""
import jax
import numpy as np


def leaf_rel_err(a, b) -> float:
  """Largest over leaves of max |a - b| / max |b| (b: the reference), in float64."""
  out = 0.0
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    out = max(out, float(np.abs(x - y).max() / (np.abs(y).max() + 1e-30)))
  return out
