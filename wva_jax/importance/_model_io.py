"""The model's interface as the engine and SIG read it: its leaves' names and its one array of outputs."""
from __future__ import annotations

from collections.abc import Callable

import jax


def leaf_paths(params) -> list[str]:
  """'layers/0/kernel'-style names of the leaves of ``params``."""
  out = []
  for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
    parts = []
    for k in path:
      if isinstance(k, jax.tree_util.DictKey):
        parts.append(str(k.key))
      elif isinstance(k, jax.tree_util.SequenceKey):
        parts.append(str(k.idx))
      elif isinstance(k, jax.tree_util.GetAttrKey):
        parts.append(k.name)
      else:
        parts.append(str(k))
    if len(parts) > 1 and parts[-1] == "value":  # Flax NNX Variable leaves
      parts.pop()
    out.append("/".join(parts) or "<root>")
  return out


def describe(out) -> str:
  """A short description of a non-array model output, for error messages."""
  leaves = jax.tree_util.tree_leaves(out)
  shapes = ", ".join(str(tuple(getattr(l, "shape", ()))) for l in leaves[:4])
  more = ", ..." if len(leaves) > 4 else ""
  return f"a {type(out).__name__} of {len(leaves)} arrays (shapes {shapes}{more})"


def check_output(apply_fn: Callable, params, example, what: str = "outputs"):
  """The output's ShapeDtypeStruct; a clear error when ``apply_fn`` returns no single array."""
  return require_array(jax.eval_shape(apply_fn, params, example), what)


def require_array(out, what: str = "outputs"):
  """``out`` (a traced output's shape) if it is one array; else the error that names it."""
  if not isinstance(out, jax.ShapeDtypeStruct):
    raise ValueError(
        f"apply_fn must return one array of {what}, but it returned {describe(out)}. "
        "Pick the array, e.g. `lambda p, x: apply_fn(p, x)[0]` for a tuple or "
        "`lambda p, x: apply_fn(p, x).logits` for a transformers ModelOutput")
  return out
