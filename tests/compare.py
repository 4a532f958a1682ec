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


def assert_tree_close(got, want, rtol: float = 1e-4, atol_frac: float = 1e-6) -> None:
  """Element-wise: |got - want| <= atol + rtol |want| per entry, atol = atol_frac * max |want| of the leaf.

  Unlike ``leaf_rel_err``, an error in a small entry is not hidden by a large one elsewhere.
  """
  paths = jax.tree_util.tree_leaves_with_path(want)
  gots = jax.tree_util.tree_leaves(got)
  assert len(gots) == len(paths), (len(gots), len(paths))
  for (path, w), g in zip(paths, gots):
    w, g = np.asarray(w, np.float64), np.asarray(g, np.float64)
    atol = atol_frac * (float(np.abs(w).max()) if w.size else 0.0)
    np.testing.assert_allclose(g, w, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))
