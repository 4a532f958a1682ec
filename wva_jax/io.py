r"""Importance files: save once, reuse across runs, machines and tools (safetensors).

Layout (readable with the ``safetensors`` package alone, no wva-jax needed):

* **One file** (default): ``path`` is a safetensors file holding one tensor
  per leaf of the importance tree, in the leaf's own dtype (bfloat16 stays
  bfloat16: safetensors' ``BF16``), shape and row-major bytes.
* **Sharded** (``max_shard_bytes`` given and the tree larger): files
  ``<stem>-00001-of-0000N.safetensors`` beside ``path`` plus
  ``<path>.index.json``, the Hugging Face layout (``model.safetensors.index.json``):
  ``{"metadata": {"total_size": <bytes>, ...}, "weight_map": {name: file}}``.
  No file is written at ``path`` itself.

Tensor names are the tree paths, keys joined by ``/``: dict keys and
attribute names as they are, sequence indices as decimal numbers, an
``nnx.Variable``'s value under its own path (no ``value`` suffix). So
``{'layers': [{'kernel': w}]}`` stores ``w`` as ``layers/0/kernel`` and
``nnx.split(model, nnx.Param)[1]`` gives the names the model's parameter paths
have (``linear/kernel``). A key containing ``/`` or two paths naming the same
string are a ``ValueError``.

Header metadata (safetensors ``__metadata__``, strings only, in every file):
``format`` (``wva_jax.importance``), ``wva_jax_version``, ``wva_jax_structure``
(the tree's containers as JSON, below) and the caller's ``metadata`` (e.g.
``estimator``, ``num_examples``; a non-string value is stored as its JSON).
The structure lets :func:`load_importance` rebuild the tree without ``like``:
mappings (``dict``, ``nnx.State``, any pytree node with keys) come back as
``dict``, lists as ``list`` and tuples as ``tuple``; pass ``like`` to get the
exact containers (``nnx.State`` with its ``nnx.Variable`` types, NamedTuples).
Its grammar: a leaf is its tensor name (a JSON string), ``null`` an empty
subtree, ``{"dict": [[key, child], ...]}`` (key a string or an integer),
``{"list": [...]}`` and ``{"tuple": [...]}``.

Other tools' names (``names=``): a dict ``{tree name: file name}`` or a
callable ``f(name, shape) -> file name`` or ``(file name, axes)``, ``axes``
a permutation the tensor is transposed by on its way to the file (PyTorch
keeps a linear layer's weight ``[out, in]``, Flax its kernel ``[in, out]``).
:func:`hf_names` is the Hugging Face convention (transformers' own
Flax-to-PyTorch conversion): ``/`` becomes ``.``, a ``kernel`` becomes a
transposed ``weight``, an ``embedding`` or a norm's ``scale`` a ``weight``,
with optional regex renames first for trees whose module names differ.
The header's ``wva_jax_names`` (JSON ``{file name: [tree name, axes]}``)
lets :func:`load_importance` undo both, so a renamed file loads back as the
tree it came from. Save the parameters with the same ``names`` and a merging
tool finds each importance beside its weight.

Reading elsewhere: ``safetensors.numpy.load_file(path)`` gives ``{name:
array}``; a bfloat16 file needs ``import ml_dtypes`` first (it registers
numpy's ``bfloat16``; without it safetensors fails with ``data type
'bfloat16' not understood``). For the sharded layout, read ``weight_map``
from the index and load each file it names.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from wva_jax._paths import key_name as _key_name
from wva_jax._variables import is_variable as _is_variable
from wva_jax._variables import unwrap as _unwrap

FORMAT = "wva_jax.importance"
_RESERVED = ("format", "wva_jax_version", "wva_jax_structure", "wva_jax_names")
Names = Mapping[str, str] | Callable[[str, tuple], "str | tuple[str, Sequence[int]]"]


def hf_names(renames: Sequence[tuple[str, str]] = ()) -> Callable[[str, tuple], tuple[str, tuple[int, ...] | None]]:
  r"""The Hugging Face (PyTorch) names and layouts of a Flax tree's tensors, for ``save_importance(names=...)``.

  transformers' Flax-to-PyTorch rule: each ``(pattern, replacement)`` of
  ``renames`` is applied to the ``/``-joined name first (``re.sub``, in
  order); then a 2-D ``kernel`` becomes ``weight`` transposed to ``[out,
  in]`` (a 4-D one ``[out, in, h, w]``), an ``embedding`` or ``scale`` becomes
  ``weight``, and ``/`` becomes ``.``. A transformers Flax model's tree
  (``FlaxLlamaForCausalLM``: ``model/layers/0/self_attn/q_proj/kernel``)
  needs no renames; an NNX tree with other module names passes them.

  Example:
    >>> import wva_jax as wj
    >>> f = wj.io.hf_names([(r"^blocks/(\d+)/q/", r"model/layers/\1/self_attn/q_proj/")])
    >>> f("blocks/3/q/kernel", (576, 576))
    ('model.layers.3.self_attn.q_proj.weight', (1, 0))
  """
  compiled = [(re.compile(p), r) for p, r in renames]

  def name(tree_name: str, shape: tuple) -> tuple[str, tuple[int, ...] | None]:
    for pattern, repl in compiled:
      tree_name = pattern.sub(repl, tree_name)
    *head, last = tree_name.split("/")
    axes = None
    if last == "kernel":
      last, axes = "weight", {2: (1, 0), 4: (3, 2, 0, 1)}.get(len(shape))
    elif last in ("embedding", "scale"):
      last = "weight"
    return ".".join(head + [last]), axes

  return name


def _file_names(named: list[tuple[str, Any]], names: Names | None) -> list[tuple[str, tuple[int, ...] | None]]:
  """``(file name, axes or None)`` of each ``(tree name, leaf)``; a clash or a bad axes is a ``ValueError``."""
  out: list[tuple[str, tuple[int, ...] | None]] = []
  seen: dict[str, str] = {}
  for tree_name, leaf in named:
    shape = tuple(jnp.shape(_unwrap(leaf)))
    if names is None:
      got: Any = tree_name
    elif isinstance(names, Mapping):
      if tree_name not in names:
        raise ValueError(f"names has no entry for the tensor {tree_name!r} (a dict must name every tensor; "
                         f"{len(named)} in all)")
      got = names[tree_name]
    else:
      got = names(tree_name, shape)
    new, axes = (got, None) if isinstance(got, str) else (got[0], None if got[1] is None else tuple(got[1]))
    if not isinstance(new, str) or not new:
      raise ValueError(f"names gave {got!r} for {tree_name!r}: expected a non-empty string or (string, axes)")
    if axes is not None and sorted(axes) != list(range(len(shape))):
      raise ValueError(f"names gave axes {axes} for {tree_name!r} of shape {shape}: not a permutation of its axes")
    if new in seen:
      raise ValueError(f"names maps both {seen[new]!r} and {tree_name!r} to {new!r}")
    seen[new] = tree_name
    out.append((new, axes))
  return out


def _name(path: tuple) -> str:
  parts = []
  for k in path:
    part = _key_name(k)
    if isinstance(part, str) and ("/" in part or part == ""):
      raise ValueError(f"key {part!r} at {jax.tree_util.keystr(path)} cannot be a tensor name part "
                       "(names join keys with '/'; rename it)")
    parts.append(str(part))
  return "/".join(parts)


def _named_leaves(tree: Any, what: str) -> list[tuple[str, Any]]:
  """``(name, leaf)`` in tree order; ``nnx.Variable`` leaves kept (unwrapped by the caller)."""
  out: list[tuple[str, Any]] = []
  seen: dict[str, str] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_variable)[0]:
    name = _name(path)
    if name in seen:
      raise ValueError(f"{what}{jax.tree_util.keystr(path)} and {what}{seen[name]} both make the tensor "
                       f"name {name!r}")
    seen[name] = jax.tree_util.keystr(path)
    out.append((name, leaf))
  return out


def _structure(node: Any, path: tuple = ()) -> Any:
  """The JSON description of ``node``'s containers (module docstring), leaves as their names."""
  if node is None:
    return None
  if isinstance(node, Mapping):
    return {"dict": [[k if isinstance(k, int) else str(k), _structure(v, path + (jax.tree_util.DictKey(k),))]
                     for k, v in node.items()]}
  if isinstance(node, list):
    return {"list": [_structure(v, path + (jax.tree_util.SequenceKey(i),)) for i, v in enumerate(node)]}
  if isinstance(node, tuple) and not hasattr(node, "_fields"):
    return {"tuple": [_structure(v, path + (jax.tree_util.SequenceKey(i),)) for i, v in enumerate(node)]}
  if _is_variable(node) or not _has_children(node):
    return _name(path)
  # Any other pytree node (NamedTuple, dataclass, ...): its children by key, as a dict.
  children = jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)[0]
  return {"dict": [[_key_name(p[0]), _structure(c, path + (p[0],))] for p, c in children]}


def _has_children(node: Any) -> bool:
  leaves = jax.tree_util.tree_leaves(node, is_leaf=lambda x: x is not node)
  return not (len(leaves) == 1 and leaves[0] is node)


def _rebuild(desc: Any, arrays: dict[str, Any]) -> Any:
  if desc is None:
    return None
  if isinstance(desc, str):
    return arrays[desc]
  if "dict" in desc:
    return {k: _rebuild(v, arrays) for k, v in desc["dict"]}
  if "list" in desc:
    return [_rebuild(v, arrays) for v in desc["list"]]
  return tuple(_rebuild(v, arrays) for v in desc["tuple"])


def _header_metadata(metadata: Mapping[str, Any] | None, structure: Any) -> dict[str, str]:
  from wva_jax import __version__
  out = {"format": FORMAT, "wva_jax_version": __version__, "wva_jax_structure": json.dumps(structure)}
  for k, v in (metadata or {}).items():
    if not isinstance(k, str):
      raise ValueError(f"metadata keys must be strings, got {k!r}")
    if k in _RESERVED:
      raise ValueError(f"metadata key {k!r} is reserved (the library writes it)")
    try:
      out[k] = v if isinstance(v, str) else json.dumps(v)
    except TypeError as e:
      raise ValueError(f"metadata[{k!r}] = {v!r} is neither a string nor JSON-serialisable") from e
  return out


def _index_path(path: str) -> str:
  return path + ".index.json"


def _shard_name(path: str, i: int, n: int) -> str:
  stem = os.path.basename(path)
  stem = stem[:-len(".safetensors")] if stem.endswith(".safetensors") else stem
  return f"{stem}-{i:05d}-of-{n:05d}.safetensors"


def save_importance(path: str | os.PathLike, importance: Any, *, metadata: Mapping[str, Any] | None = None,
                    max_shard_bytes: int | None = None, names: Names | None = None) -> list[str]:
  """Writes an importance (any pytree of arrays) as safetensors, dtypes and shapes kept.

  The layout, the tensor names and the header are described in
  :mod:`wva_jax.io`. Each leaf is copied to the host (a sharded ``jax.Array``
  is gathered; one spanning several processes cannot be); a shard's arrays
  are held on the host while that file is written. A previous save at
  ``path`` in the other layout (a single file or an index) is removed, so
  :func:`load_importance` cannot find a stale one.

  Args:
    path: the file (``'fisher.safetensors'``); the sharded layout writes its
      shards beside it and ``<path>.index.json``.
    importance: a pytree of arrays (dicts, lists, tuples, ``nnx.State``;
      ``nnx.Variable`` leaves are unwrapped).
    metadata: extra header entries (string keys; values strings or
      JSON-serialisable), e.g. ``{'estimator': 'fisher', 'num_examples': 4096}``.
    max_shard_bytes: if given and the tensors' bytes exceed it, write several
      files of at most this many bytes each (a larger single tensor gets a
      file of its own).
    names: other tools' tensor names (and layouts): a dict ``{tree name:
      file name}`` or ``f(tree name, shape) -> name | (name, axes)``, e.g.
      :func:`hf_names`; :mod:`wva_jax.io` describes it.

  Returns:
    The paths written (the file, or the shards then the index).

  Example:
    >>> import os, tempfile, jax.numpy as jnp, wva_jax as wj
    >>> path = os.path.join(tempfile.mkdtemp(), 'imp.safetensors')
    >>> _ = wj.save_importance(path, {'dense': {'kernel': jnp.ones((2, 3), jnp.bfloat16)}},
    ...                        metadata={'estimator': 'fisher', 'num_examples': 128})
    >>> wj.load_importance(path)['dense']['kernel'].dtype
    dtype(bfloat16)
    >>> wj.importance_metadata(path)['num_examples']
    '128'
  """
  from safetensors.numpy import save_file

  path = os.fspath(path)
  if max_shard_bytes is not None and (not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0):
    raise ValueError(f"max_shard_bytes must be a positive int, got {max_shard_bytes!r}")
  named = _named_leaves(importance, "importance")
  if not named:
    raise ValueError("importance has no arrays to save")
  header = _header_metadata(metadata, _structure(importance))
  mapped = _file_names(named, names)
  if names is not None:
    header["wva_jax_names"] = json.dumps({new: [old, axes] for (old, _), (new, axes) in zip(named, mapped)})
  sizes = []
  for name, leaf in named:
    leaf = _unwrap(leaf)
    if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
      raise ValueError(f"importance leaf {name!r} is {type(leaf).__name__}, not an array")
    sizes.append(math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize)
  total = sum(sizes)

  sharded = max_shard_bytes is not None and total > max_shard_bytes
  groups: list[list[int]] = [[]]
  if max_shard_bytes is not None and sharded:
    used = 0
    for i, size in enumerate(sizes):
      if groups[-1] and used + size > max_shard_bytes:
        groups.append([])
        used = 0
      groups[-1].append(i)
      used += size
  else:
    groups = [list(range(len(named)))]

  def host(i: int) -> np.ndarray:
    x = np.asarray(jax.device_get(_unwrap(named[i][1])))
    if mapped[i][1] is not None:
      x = np.transpose(x, mapped[i][1])
    return np.asarray(x, order="C")   # (ascontiguousarray makes 0-d 1-d)

  directory = os.path.dirname(path)
  if not sharded:
    if os.path.isfile(_index_path(path)):
      os.remove(_index_path(path))
    save_file({mapped[i][0]: host(i) for i in groups[0]}, path, metadata=header)
    return [path]
  if os.path.isfile(path):
    os.remove(path)
  written, weight_map = [], {}
  for g, idx in enumerate(groups):
    fname = _shard_name(path, g + 1, len(groups))
    save_file({mapped[i][0]: host(i) for i in idx}, os.path.join(directory, fname), metadata=header)
    written.append(os.path.join(directory, fname))
    weight_map.update({mapped[i][0]: fname for i in idx})
  with open(_index_path(path), "w") as f:
    json.dump({"metadata": {"total_size": total, **header}, "weight_map": weight_map}, f, indent=1)
  written.append(_index_path(path))
  return written


def _files(path: str) -> tuple[dict[str, str], dict[str, str]]:
  """(name -> file, header metadata) for either layout."""
  from safetensors import safe_open

  if path.endswith(".index.json"):
    path = path[:-len(".index.json")]
  if os.path.isfile(path):
    with safe_open(path, framework="numpy") as f:
      return {k: path for k in f.keys()}, dict(f.metadata() or {})
  if os.path.isfile(_index_path(path)):
    with open(_index_path(path)) as fh:
      index = json.load(fh)
    directory = os.path.dirname(path)
    meta = {k: v for k, v in index.get("metadata", {}).items() if k != "total_size"}
    return {k: os.path.join(directory, v) for k, v in index["weight_map"].items()}, meta
  raise FileNotFoundError(f"no importance at {path!r}: neither that file nor {_index_path(path)!r} exists")


def importance_metadata(path: str | os.PathLike) -> dict[str, str]:
  """The header metadata of an importance saved by :func:`save_importance` (strings, as stored).

  Example:
    >>> import os, tempfile, jax.numpy as jnp, wva_jax as wj
    >>> path = os.path.join(tempfile.mkdtemp(), 'imp.safetensors')
    >>> _ = wj.save_importance(path, {'w': jnp.ones(2)}, metadata={'estimator': 'mas'})
    >>> wj.importance_metadata(path)['estimator']
    'mas'
  """
  return _files(os.fspath(path))[1]


def _reader(files: dict[str, str]):
  from safetensors import safe_open

  handles: dict[str, Any] = {}

  def handle(name: str):
    fname = files[name]
    if fname not in handles:
      handles[fname] = safe_open(fname, framework="numpy").__enter__()
    return handles[fname]

  # whole tensors by get_tensor: safetensors 0.8 refuses to slice a 0-d tensor with [:]
  return (lambda name: handle(name).get_slice(name)), (lambda name: handle(name).get_tensor(name)), handles


def load_importance(path: str | os.PathLike, like: Any = None) -> Any:
  """Reads an importance written by :func:`save_importance` (either layout), dtypes kept.

  Without ``like`` the tree is rebuilt from the header's structure (mappings
  as ``dict``, lists, tuples; :mod:`wva_jax.io`). With ``like`` (a tree of
  the same names: arrays, ``jax.ShapeDtypeStruct``\\ s or ``nnx.Variable``\\ s,
  e.g. the params) the result has ``like``'s exact structure, each leaf
  checked against ``like``'s shape; where a ``like`` leaf has a
  ``sharding`` (a ``jax.Array`` or ``ShapeDtypeStruct`` with one) the array
  is built with that sharding by ``jax.make_array_from_callback``, each
  device reading only its own slice from the file. The dtype is the file's
  (cast afterwards if you want ``like``'s).

  Args:
    path: what was passed to :func:`save_importance` (or the index file).
    like: optional template tree.

  Returns:
    The importance tree of ``jax.Array``\\ s.

  Raises:
    ValueError: a name of ``like`` missing from the file (or one in the file
      missing from ``like``), or a shape that differs from ``like``'s; each
      names the tensor.

  Example:
    >>> import os, tempfile, jax.numpy as jnp, wva_jax as wj
    >>> path = os.path.join(tempfile.mkdtemp(), 'imp.safetensors')
    >>> _ = wj.save_importance(path, {'w': jnp.arange(3.0)})
    >>> wj.load_importance(path, like={'w': jnp.zeros(3)})['w'].tolist()
    [0.0, 1.0, 2.0]
  """
  files, meta = _files(os.fspath(path))
  # a file saved with names=: tree name -> (file name, axes); read back in the tree's names and layout
  renamed = {old: (new, None if axes is None else tuple(axes))
             for new, (old, axes) in json.loads(meta.get("wva_jax_names", "{}")).items()}
  files_by_tree = {old: new for old, (new, _) in renamed.items() if new in files} if renamed else \
      {n: n for n in files}
  raw_get, raw_whole, handles = _reader(files)
  inverse = lambda axes: None if axes is None else tuple(int(i) for i in np.argsort(axes))
  axes_of = lambda name: renamed.get(name, (name, None))[1]

  def whole(name):
    x = raw_whole(files_by_tree[name])
    return x if axes_of(name) is None else np.transpose(x, inverse(axes_of(name)))

  def get(name):
    return _Transposed(raw_get(files_by_tree[name]), axes_of(name))

  try:
    if like is None:
      arrays = {name: jnp.asarray(whole(name)) for name in files_by_tree}
      structure = meta.get("wva_jax_structure")
      if structure is None:   # written by another tool: a flat dict of names
        return arrays
      return _rebuild(json.loads(structure), arrays)
    named = _named_leaves(like, "like")
    missing = [n for n, _ in named if n not in files_by_tree]
    if missing:
      raise ValueError(f"{path!s} has no tensor {missing[0]!r} (that like needs; {len(missing)} missing in all), "
                       f"it has {sorted(files_by_tree)[:8]}{' ...' if len(files_by_tree) > 8 else ''}")
    extra = sorted(set(files_by_tree) - {n for n, _ in named})
    if extra:
      raise ValueError(f"{path!s} has tensor {extra[0]!r} that like has no leaf for "
                       f"({len(extra)} in all); pass a like with every saved name, or like=None")
    leaves = []
    for name, leaf in named:
      template = _unwrap(leaf)
      sl = get(name)
      shape = tuple(sl.get_shape())
      if tuple(jnp.shape(template)) != shape:
        raise ValueError(f"tensor {name!r} in {path!s} has shape {shape}, but like{_show(name)} has "
                         f"shape {tuple(jnp.shape(template))}")
      sharding = getattr(template, "sharding", None)
      value: Any
      if isinstance(sharding, jax.sharding.Sharding) and shape:
        value = jax.make_array_from_callback(shape, sharding, partial(_read_slice, sl))
      elif isinstance(sharding, jax.sharding.Sharding):  # a scalar: nothing to split
        value = jax.device_put(whole(name), sharding)
      else:
        value = jnp.asarray(whole(name))
      leaves.append(leaf.replace(value) if _is_variable(leaf) else value)
    treedef = jax.tree_util.tree_structure(like, is_leaf=_is_variable)
    return jax.tree_util.tree_unflatten(treedef, leaves)
  finally:
    for h in handles.values():
      h.__exit__(None, None, None)


class _Transposed:
  """A safetensors slice read in the tree's layout: the file holds ``transpose(x, axes)``."""

  def __init__(self, sl: Any, axes: tuple[int, ...] | None):
    self.sl, self.axes = sl, axes

  def get_shape(self) -> list[int]:
    shape = list(self.sl.get_shape())
    return shape if self.axes is None else [shape[int(i)] for i in np.argsort(self.axes)]

  def __getitem__(self, index: Any) -> np.ndarray:
    if self.axes is None:
      return self.sl[index]
    index = index if isinstance(index, tuple) else (index,)
    index = index + (slice(None),) * (len(self.axes) - len(index))
    block = self.sl[tuple(index[a] for a in self.axes)]   # file axis k is the tree's axis axes[k]
    return np.transpose(block, tuple(int(i) for i in np.argsort(self.axes)))


def _read_slice(sl: Any, index: Any) -> np.ndarray:
  return sl[index]


def _show(name: str) -> str:
  return "".join(f"[{p!r}]" for p in name.split("/"))
