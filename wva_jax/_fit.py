"""Fitting a params-shaped tree into a tree that lives inside an optimizer state, by path.

``set_importance``, ``set_anchor``, ``consolidate``, the factories'
``importance=``/``anchor=`` and ``training_metrics(params=, grads=)`` take a
tree shaped like the params and must put each leaf where the state keeps that
parameter's entry. Matching leaf order is wrong in two everyday cases: keys
that sort differently in the two trees (``'10'`` before ``'2'`` in a dict of
string layer names, ``10`` after ``2`` in an ``nnx.State``; a flat
``{'layers/0/kernel': ...}`` dict read from a file), and a state that holds
only part of the params (``optax.masked``, ``optax.partition``,
``optax.multi_transform`` put an ``optax.MaskedNode`` where a parameter is
not theirs). So leaves are matched by their path's name (:mod:`wva_jax._paths`):
int and str keys alike, nested or flat, ``nnx.Variable`` leaves unwrapped.
Entries of the given tree under a masked node are dropped; any other leaf
that one tree has and the other lacks is a ``ValueError`` naming its path.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from wva_jax._paths import keystr, path_name
from wva_jax._variables import is_variable, unwrap


def _is_masked(x: Any) -> bool:
  return isinstance(x, optax.MaskedNode)


def named_leaves(tree: Any, what: str) -> dict[str, tuple[tuple, Any]]:
  """``{name: (path, leaf)}`` of ``tree``'s leaves (``nnx.Variable`` kept as leaves); a repeated name raises."""
  out: dict[str, tuple[tuple, Any]] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_variable)[0]:
    name = path_name(path)
    if name in out:
      raise ValueError(f"{what}{keystr(path)} and {what}{keystr(out[name][0])} have the same name {name!r}")
    out[name] = (path, leaf)
  return out


def masked_names(like: Any) -> list[str]:
  """Names of the ``optax.MaskedNode`` positions in ``like`` (a masked state's trees)."""
  flat = jax.tree_util.tree_flatten_with_path(like, is_leaf=lambda x: _is_masked(x) or is_variable(x))[0]
  return [path_name(p) for p, x in flat if _is_masked(x)]


def _under(name: str, prefixes: list[str]) -> bool:
  return any(p == "" or name == p or name.startswith(p + "/") for p in prefixes)


def matched_leaves(value: Any, like: Any, name: str, *, what: str = "the optimizer's state") -> list[Any]:
  """``value``'s leaves (arrays) in the order of ``like``'s leaves (``nnx.Variable`` counted as leaves).

  Raises a ``ValueError`` naming the first path that one tree has and the
  other lacks (outside ``like``'s masked nodes), or whose shapes differ.
  """
  if _is_masked(value) or value is None:
    raise ValueError(f"{name} is {value!r}, not a tree of arrays")
  if not hasattr(value, "shape") and not jax.tree_util.tree_leaves(value):
    raise ValueError(f"{name} has no arrays")
  given = named_leaves(value, name)
  names = list(given)
  want = jax.tree_util.tree_flatten_with_path(like, is_leaf=is_variable)[0]
  out = []
  for path, slot in want:
    key = path_name(path)
    if key not in given:
      raise ValueError(f"{name} has no entry for {what}'s {keystr(path)} (name {key!r}); "
                       f"{name} has {_sample(names)}")
    vpath, leaf = given.pop(key)
    leaf = unwrap(leaf)
    if jnp.shape(leaf) != jnp.shape(unwrap(slot)):
      raise ValueError(f"{name}{keystr(vpath)} has shape {jnp.shape(leaf)}, but {what}'s entry for that "
                       f"parameter has shape {jnp.shape(unwrap(slot))}")
    out.append(leaf)
  masked = masked_names(like)
  extra = [(k, p) for k, (p, _) in given.items() if not _under(k, masked)]
  if extra:
    k, p = extra[0]
    raise ValueError(f"{name}{keystr(p)} (name {k!r}) matches no parameter in {what} "
                     f"({len(extra)} such entries; pass a tree shaped like the params the optimizer updates)")
  return out


def fit_like(value: Any, like: Any, name: str, *, what: str = "the optimizer's state") -> Any:
  """``value``'s leaves, matched by path, in ``like``'s tree structure (masked nodes kept)."""
  leaves = matched_leaves(value, like, name, what=what)
  # ``like``'s own structure, nnx.Variable nodes included (each holds one array): a state built
  # from an nnx.State keeps its Param wrappers, so its tree still matches the updates'
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(like), leaves)


def _sample(names: list[str]) -> str:
  shown = ", ".join(repr(n) for n in names[:3])
  return f"{len(names)} entries: {shown}{', ...' if len(names) > 3 else ''}"
