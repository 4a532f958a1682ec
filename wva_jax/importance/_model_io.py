"""The model's interface as the engine and SIG read it: its leaves' names and its one array of outputs."""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore


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
  """The output's ShapeDtypeStruct; a clear error when ``apply_fn`` returns no single array,
  or when no float parameter reaches it (every importance would be zero)."""
  check_leaves(params)
  closed, out = jax.make_jaxpr(apply_fn, return_shape=True)(params, example)
  out = require_array(out, what)
  n_params = len(jax.tree_util.tree_leaves(params))
  floats = [jnp.issubdtype(jnp.result_type(l), jnp.inexact) for l in jax.tree_util.tree_leaves(params)]
  if any(floats) and not _reaches(closed.jaxpr, floats + [False] * (len(closed.jaxpr.invars) - n_params)):
    raise ValueError(
        f"no float parameter reaches the {what}: apply_fn(params, inputs) ignores `params`, so every "
        "importance would be zero. Pass the parameters into the call instead of reading the model's own "
        "copy: Flax NNX `lambda p, x: nnx.merge(graphdef, p)(x)`; Keras 3 (JAX backend) `lambda p, x: "
        "model.stateless_call(p, non_trainable_values, x)[0]` with p = [v.value for v in "
        "model.trainable_variables], not `lambda p, x: model(x)`")
  return out


def _reaches(jaxpr, marked: list[bool]) -> bool:
  """Whether an output depends on a marked input (a call or loop's outputs all depend on any marked
  operand: conservative, so a model that reads its parameters is never refused)."""
  dep = {v for v, m in zip(jaxpr.invars, marked) if m}
  for eqn in jaxpr.eqns:
    if any(isinstance(v, jcore.Var) and v in dep for v in eqn.invars):
      dep.update(eqn.outvars)
  return any(isinstance(v, jcore.Var) and v in dep for v in jaxpr.outvars)


def check_leaves(params) -> None:
  """Every leaf an array: a framework variable (a Keras ``Variable``, which JAX reads through
  ``__jax_array__``) is refused here, naming the fix, instead of by JAX's opaque error later."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    if isinstance(leaf, (jax.Array, np.ndarray, np.generic)) or not hasattr(leaf, "__jax_array__"):
      continue
    kind = f"{type(leaf).__module__}.{type(leaf).__name__}"
    fix = ("pass their values, e.g. `[v.value for v in model.trainable_variables]`, and call "
           "`model.stateless_call(p, non_trainable_values, x)[0]` in apply_fn"
           if "keras" in kind else "pass a pytree of arrays")
    raise TypeError(f"params{jax.tree_util.keystr(path)} is a {kind}, not an array: {fix}")


def require_array(out, what: str = "outputs"):
  """``out`` (a traced output's shape) if it is one array; else the error that names it."""
  if not isinstance(out, jax.ShapeDtypeStruct):
    raise ValueError(
        f"apply_fn must return one array of {what}, but it returned {describe(out)}. "
        "Pick the array, e.g. `lambda p, x: apply_fn(p, x)[0]` for a tuple or "
        "`lambda p, x: apply_fn(p, x).logits` for a transformers ModelOutput")
  return out
