"""Adapter trees: finding the ``(A, B)`` pairs (plain, ``nnx`` and qwix layouts) and writing trees like them.

Every LoRA function reads its adapters through :func:`_flatten` (the pairs as
stacks of ``[d_in, r]`` / ``[r, d_out]`` matrices, with their paths and kernel
shapes) and writes its results back in the adapters' own containers.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from wva_jax._variables import is_variable as _is_variable
from wva_jax._variables import unwrap as _unwrap

_PAIRS = (("A", "B"), ("lora_a", "lora_b"))
_QWIX = ("_lora_a", "_lora_b")   # qwix: <w>_lora_a, <w>_lora_b beside the adapted weight <w>


def _pair_keys(node: Any) -> tuple[str, str] | None:
  if isinstance(node, Mapping):
    keys = set(node.keys())
    for ka, kb in _PAIRS:
      if keys == {ka, kb}:
        return ka, kb
  return None


def _qwix_names(node: Any) -> list[str] | None:
  """The weights ``w`` of a qwix-adapted module's mapping ``{w_lora_a, w_lora_b, ...}``, else None.

  ``qwix.apply_lora_to_model`` adds ``nnx.LoRAParam`` leaves ``<w>_lora_a`` and
  ``<w>_lora_b`` beside the adapted weight ``<w>``; in the adapters' tree
  (``nnx.split(model, nnx.LoRAParam, ...)``) the module's mapping holds only
  those pairs.
  """
  if not isinstance(node, Mapping) or not node:
    return None
  keys = set(node.keys())
  if not all(isinstance(k, str) and k.endswith(_QWIX) for k in keys):
    return None
  names = sorted({k[:-len(_QWIX[0])] for k in keys})
  if keys != {n + suffix for n in names for suffix in _QWIX} or "" in names:
    return None
  return names


def _is_adapter(node: Any) -> bool:
  return _pair_keys(node) is not None or _qwix_names(node) is not None


def _key(k: Any) -> Any:
  for attr in ("key", "idx", "name"):
    if hasattr(k, attr):
      return getattr(k, attr)
  return str(k)


def _path(path: tuple) -> tuple:
  return tuple(_key(k) for k in path)


def _show(path: tuple) -> str:
  return "".join(f"[{k!r}]" for k in path) or "<root>"


class _Adapters(NamedTuple):
  treedef: Any
  paths: list    # plain key tuples, one per adapter (a qwix adapter's ends in its weight's name)
  nodes: list    # the adapter mappings, one per node
  a: list        # A arrays (unwrapped) as stacks of [d_in, r] matrices
  b: list        # B arrays as stacks of [r, d_out]
  kshape: list   # the importance's (kernel's) shape per adapter
  keys: list     # (key of A, key of B) in its node, per adapter
  groups: list   # per node: (the weight names for a qwix node or None, indices of its adapters)
  shapes: list   # per adapter: A's and B's own shapes (a qwix einsum adapter is reshaped to matrices)
  einsum: list   # per adapter: a qwix adapter with delta W = tensordot(A, B, 1) (its kernel may be transposed)


def _flatten(adapters: Any, name: str = "adapters") -> _Adapters:
  """The adapter pairs of ``adapters``, in tree order; anything else is a ValueError naming its path."""
  with_path, treedef = jax.tree_util.tree_flatten_with_path(adapters, is_leaf=_is_adapter)
  ad = _Adapters(treedef, [], [], [], [], [], [], [], [], [])
  for path, node in with_path:
    keys = _pair_keys(node)
    qwix = None if keys is not None else _qwix_names(node)
    if keys is None and qwix is None:
      raise ValueError(f"{name}{jax.tree_util.keystr(path)} is not part of an adapter pair: every leaf must sit "
                       f"in a mapping with exactly the keys {{'A', 'B'}} or {{'lora_a', 'lora_b'}}, or be one of "
                       "qwix's '<w>_lora_a' / '<w>_lora_b' pairs "
                       "(train other parameters with a separate transform, e.g. optax.partition)")
    pairs: list[tuple[str | None, tuple[str, str]]]
    if qwix is None:
      pairs = [(None, keys)]   # type: ignore[list-item]
    else:
      pairs = [(w, (w + _QWIX[0], w + _QWIX[1])) for w in qwix]
    ad.nodes.append(node)
    ad.groups.append((qwix, list(range(len(ad.paths), len(ad.paths) + len(pairs)))))
    for w, (ka, kb) in pairs:
      a, b = jnp.asarray(_unwrap(node[ka])), jnp.asarray(_unwrap(node[kb]))
      p = _path(path) + ((w,) if w is not None else ())
      where = f"{name}{_show(p)}"
      if a.ndim >= 2 and b.ndim >= 2 and a.shape[-1] == b.shape[-2] and a.shape[:-2] == b.shape[:-2]:
        am, bm, kshape = a, b, a.shape[:-1] + b.shape[-1:]
      elif w is not None and a.ndim >= 2 and b.ndim >= 2 and a.shape[-1] == b.shape[0]:
        # qwix on an einsum: A [contracted dims..., r], B [r, other dims...], delta W = tensordot(A, B, 1).
        r = a.shape[-1]
        am, bm, kshape = a.reshape(-1, r), b.reshape(r, -1), a.shape[:-1] + b.shape[1:]
      else:
        raise ValueError(f"{where}: A {a.shape} and B {b.shape} are not a stack of [d_in, r] and [r, d_out] "
                         "(delta W = A @ B, see wva_jax.lora)"
                         + ("" if w is None else " nor qwix's einsum form A [..., r], B [r, ...]"))
      ad.paths.append(p)
      ad.a.append(am)
      ad.b.append(bm)
      ad.kshape.append(tuple(kshape))
      ad.keys.append((ka, kb))
      ad.shapes.append((a.shape, b.shape))
      ad.einsum.append(w is not None and (a.ndim == b.ndim == 2 or kshape != a.shape[:-1] + b.shape[-1:]))
  return ad


def _kernel_shape(a: jax.Array, b: jax.Array) -> tuple:
  return a.shape[:-1] + b.shape[-1:]


def _as_matrix(leaf: Any, ad: _Adapters, i: int) -> Any:
  """An importance leaf (kernel shape) in the [..., d_in, d_out] shape of adapter ``i``'s matrices."""
  want = ad.a[i].shape[:-1] + ad.b[i].shape[-1:]
  return leaf if jnp.shape(leaf) == want else jnp.reshape(leaf, want)


def _importance_leaves(importance: Any, ad: _Adapters, name: str = "importance") -> list:
  """``importance``'s arrays in the adapters' order, checked to sit at the adapters' paths with kernel shapes.

  Returned in the adapters' matrix shapes (``[..., d_in, d_out]``).
  """
  with_path = jax.tree_util.tree_flatten_with_path(importance, is_leaf=_is_variable)[0]
  paths = [_path(p) for p, _ in with_path]
  if paths != ad.paths:
    raise ValueError(f"{name} must have one array per adapter at the adapter's path; adapters at "
                     f"{[_show(p) for p in ad.paths]}, {name} at {[_show(p) for p in paths]} "
                     "(build it with wva_jax.lora_importance)")
  leaves = []
  for i, (path, (_, leaf)) in enumerate(zip(paths, with_path)):
    leaf = _unwrap(leaf)
    if jnp.shape(leaf) != ad.kshape[i]:
      raise ValueError(f"{name}{_show(path)} has shape {jnp.shape(leaf)}, but the adapter's kernel "
                       f"A @ B has shape {ad.kshape[i]}")
    leaves.append(_as_matrix(leaf, ad, i))
  return leaves


def _importance_tree(ad: _Adapters, leaves: list) -> Any:
  """One leaf per adapter at its place: a pair's node replaced by its leaf, a qwix node by ``{w: leaf}``."""
  return ad.treedef.unflatten([leaves[idx[0]] if names is None else {w: leaves[i] for w, i in zip(names, idx)}
                               for names, idx in ad.groups])


def _rebuild(node: Any, values: dict) -> Any:
  """``node`` (same container, same Variable wrappers) holding ``values[key]`` at each key."""
  with_path, nd = jax.tree_util.tree_flatten_with_path(node)
  return jax.tree_util.tree_unflatten(nd, [values[_key(p[0])] for p, _ in with_path])


def _unflatten_pairs(ad: _Adapters, new: list) -> Any:
  """A tree like the adapters from one ``(for A, for B)`` per adapter, in the matrix shapes of ``ad.a``/``ad.b``."""
  nodes = []
  for node, (_, idx) in zip(ad.nodes, ad.groups):
    values = {}
    for i in idx:
      na, nb = new[i]
      (sa, sb), (ka, kb) = ad.shapes[i], ad.keys[i]
      values[ka], values[kb] = jnp.reshape(na, sa), jnp.reshape(nb, sb)
    nodes.append(_rebuild(node, values))
  return jax.tree_util.tree_unflatten(ad.treedef, nodes)
