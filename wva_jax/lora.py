r"""Consolidation of low-rank adapters (LoRA) on frozen pretrained weights.

Convention (the Flax/JAX one): a dense kernel is ``W [d_in, d_out]`` used as
``x @ W``; its adapter is ``A [d_in, r]``, ``B [r, d_out]``, and the effective
weight is ``W + A @ B``. This is how ``flax.nnx.LoRA`` / ``nnx.LoRALinear``
store them (``lora_a [in, rank]``, ``lora_b [rank, out]``, output
``x @ lora_a @ lora_b``), so :math:`\Delta W = A B`. The LoRA paper writes
:math:`\Delta W = B A` for ``W [d_out, d_in]``: the same matrix transposed,
with the same penalty.

Adapters are any pytree whose adapted layers are mappings with exactly the
keys ``{"A", "B"}`` or ``{"lora_a", "lora_b"}`` (what
``nnx.split(model, nnx.LoRAParam, ...)`` gives for ``nnx.LoRA`` and
``nnx.LoRALinear``; ``nnx.Variable`` values are unwrapped). Every leaf of the
adapters tree must belong to such a pair: train other parameters with a
separate transform (``optax.partition``). A pair may be stacked over leading
axes (``A [L, d_in, r]``, ``B [L, r, d_out]``, e.g. from ``nnx.scan``); its
importance is then ``[L, d_in, d_out]``.

qwix (``qwix.apply_lora_to_model``) stores a weight ``w``'s adapter as leaves
``w_lora_a`` / ``w_lora_b`` beside ``w``: a mapping whose keys are all such
pairs is an adapter node, one adapter per weight, at the path ``module path +
('w',)`` (the weight's own path); its importance sits there too
(``{'w': F}``). On an ``einsum`` weight qwix's ``A`` is ``[contracted axes...,
r]`` and ``B`` ``[r, other axes...]`` with ``delta W = tensordot(A, B, 1)``,
handled as the matrix ``A.reshape(-1, r) @ B.reshape(r, -1)``; its importance
has the shape ``A.shape[:-1] + B.shape[1:]``. (A qwix ``dot_general`` adapter
with batch axes, ``A [batch..., d_in, r]``, ``B [batch..., r, d_out]``, is a
stack as above; the stacked reading is tried first.) qwix scales the update
by ``alpha / rank``: see :func:`lora_importance`'s ``scale``.

The importance tree has one array per adapter, shaped like the base kernel
(``A.shape[:-1] + B.shape[-1:]``), at the adapter's place in the tree: build
it from the base model's importance (any :mod:`wva_jax.importance`
estimator run on the frozen weights) with :func:`lora_importance`. Every
function here takes the adapters first and calls this tree
``kernel_importance``.

EWC on the effective update (:func:`lora_ewc_penalty`, :func:`add_lora_ewc`)
anchors at the pretrained weights (:math:`\Delta W = 0`), so the anchor costs
nothing and the state is the base kernels' importance.

WVA for adapters (:func:`lora_wva_scale`): WVA scales each parameter's
update by :math:`1/(1+\lambda\Omega)`, with :math:`\Omega` the diagonal of
the parameter's Fisher. ``A`` and ``B`` have no importance of their own, but
if the base kernel's Fisher is :math:`\mathrm{diag}(F)` (the diagonal
approximation every estimator here makes), the Fisher of the adapter is the
pull-back :math:`J^\top \mathrm{diag}(F) J` through
:math:`J = \partial\,\mathrm{vec}(AB) / \partial(A, B)`, whose diagonal is

.. math::
   \Omega^A_{ik} = \sum_j F_{ij} B_{kj}^2, \qquad
   \Omega^B_{kj} = \sum_i A_{ik}^2 F_{ij}

(:func:`lora_pullback`). It is also exactly the diagonal of the Hessian of
:math:`\frac12\sum F\odot(AB)^2` in ``A`` (resp. ``B``), the penalty being
quadratic in each factor, so WVA on the adapters is to LoRA-EWC what WVA is to
EWC. Keeping only the diagonal is the one approximation added (the same one
WVA makes on full weights); the importance changes with ``A`` and ``B`` and
is recomputed each step from the current adapters (two rank-``r`` products per
layer, no dense ``A @ B``). At ``B = 0`` (LoRA's initialisation)
:math:`\Omega^A = 0`: moving ``A`` alone does not change ``W``.

References:
  Kirkpatrick et al., "Overcoming catastrophic forgetting in neural networks",
  PNAS 2017 (EWC). Hu et al., "LoRA: Low-Rank Adaptation of Large Language
  Models", arXiv:2106.09685, 2021 (ICLR 2022).
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.typing import ArrayLike, DTypeLike

from wva_jax._checks import check_choice, check_importance_values, check_scalar_or_schedule, check_strength
from wva_jax._copy import fresh_tree
from wva_jax._variables import is_variable as _is_variable
from wva_jax._variables import unwrap as _unwrap
from wva_jax.wva import VISCOSITIES, attenuation, check_storage_dtype, init_count, next_count, strength_at

_PAIRS = (("A", "B"), ("lora_a", "lora_b"))
_QWIX = ("_lora_a", "_lora_b")   # qwix: <w>_lora_a, <w>_lora_b beside the adapted weight <w>
_F32 = jnp.float32
_HI = lax.Precision.HIGHEST


class LoRAState(NamedTuple):
  """State of :func:`add_lora_ewc` and :func:`lora_wva_scale`: the base kernels' importance and the step count.

  ``importance``: one array per adapter, shaped like its base kernel. It
  lives in the state so :func:`wva_jax.set_importance` (or
  :func:`wva_jax.consolidate`) swaps in a new task's importance without
  recompiling. ``count`` counts the updates (int32) when ``strength`` is a
  schedule, which is evaluated at it; ``None`` otherwise.
  """
  importance: Any
  count: Any = None


# ----------------------------------------------------------------- adapter trees

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


# ----------------------------------------------------------------- one layer at a time

def _delta(a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.matmul(a.astype(_F32), b.astype(_F32), precision=_HI)


def _layer_sum(a, b, f):
  d = _delta(a, b)
  return jnp.sum(f.astype(_F32) * d * d)


def _layer_grads(a, b, f):
  """Gradients of ``1/2 sum F (A B)^2`` in A and B, float32."""
  a32, b32 = a.astype(_F32), b.astype(_F32)
  p = f.astype(_F32) * jnp.matmul(a32, b32, precision=_HI)
  return jnp.matmul(p, b32.T, precision=_HI), jnp.matmul(a32.T, p, precision=_HI)


def _per_layer(fn: Callable, a, b, f):
  """``fn`` on one ``[d_in, r], [r, d_out], [d_in, d_out]`` layer; stacked layers go through ``lax.map``."""
  lead = f.shape[:-2]
  if not lead:
    return fn(a, b, f)
  n = math.prod(lead)
  out = lax.map(lambda abf: fn(*abf), (a.reshape((n,) + a.shape[-2:]), b.reshape((n,) + b.shape[-2:]),
                                       f.reshape((n,) + f.shape[-2:])))
  return jax.tree_util.tree_map(lambda o: o.reshape(lead + o.shape[1:]), out)


def _sequenced(fn: Callable, a_s: list, b_s: list, f_s: list) -> list:
  """``_per_layer(fn, ...)`` for each adapter, one adapter after another.

  A ``fori_loop`` over the adapters whose body ``lax.switch``-es to the
  adapter's own computation: XLA cannot schedule two adapters' dense products
  side by side, so at most one layer's ``A @ B`` (and its ``F``-weighted
  copy) is live. (An ``optimization_barrier`` between layers does not do
  it: XLA's CPU pipeline drops it before scheduling.) The loop carries only
  the outputs (adapter-sized gradients or scalars).
  """
  if len(a_s) <= 1:
    return [_per_layer(fn, a, b, f) for a, b, f in zip(a_s, b_s, f_s)]
  zeros = lambda s: jnp.zeros(s.shape, s.dtype)
  init = [jax.tree_util.tree_map(zeros, jax.eval_shape(partial(_per_layer, fn), a, b, f))
          for a, b, f in zip(a_s, b_s, f_s)]

  def branch(l):
    def run(outs):
      outs = list(outs)
      outs[l] = _per_layer(fn, a_s[l], b_s[l], f_s[l])
      return outs
    return run

  return lax.fori_loop(0, len(a_s), lambda i, outs: lax.switch(i, [branch(l) for l in range(len(a_s))], outs),
                       init)


@jax.custom_vjp
def _penalty(strength, a_s, b_s, f_s):
  return _penalty_fwd(strength, a_s, b_s, f_s)[0]


def _penalty_fwd(strength, a_s, b_s, f_s):
  half = 0.5 * sum((jnp.sum(s) for s in _sequenced(_layer_sum, a_s, b_s, f_s)), jnp.zeros([], _F32))
  return strength * half, (strength, a_s, b_s, f_s, half)


def _penalty_bwd(res, g):
  strength, a_s, b_s, f_s, half = res
  scale = g * strength
  grads = _sequenced(_layer_grads, a_s, b_s, f_s)
  ga = [(scale * da).astype(a.dtype) for (da, _), a in zip(grads, a_s)]
  gb = [(scale * db).astype(b.dtype) for (_, db), b in zip(grads, b_s)]
  # d/dF = strength/2 (A B)^2: only computed when asked for (unused outputs are dropped under jit).
  gf = [(0.5 * scale * _per_layer(lambda a, b, f: jnp.square(_delta(a, b)), a, b, f)).astype(f.dtype)
        for a, b, f in zip(a_s, b_s, f_s)]
  return (g * half).astype(strength.dtype), ga, gb, gf


_penalty.defvjp(_penalty_fwd, _penalty_bwd)


# ----------------------------------------------------------------- public API

def lora_importance(adapters: optax.Params, base_importance: optax.Params, *,
                    kernel_path: Callable[[tuple], tuple] | None = None, scale: ArrayLike = 1.0) -> optax.Params:
  r"""Pairs each adapter with its base kernel's importance: the importance tree of the LoRA transforms.

  Run any :mod:`wva_jax.importance` estimator on the frozen base weights
  (with ``nnx``: ``graphdef, lora, base = nnx.split(model, nnx.LoRAParam,
  nnx.Param)`` and ``apply_fn = lambda p, x: nnx.merge(graphdef, lora,
  p)(x)``; with ``lora_b`` at its zero initialisation that is the pretrained
  model), then pass its result here. For an adapter at key path ``P`` the
  kernel's importance is looked up, in order, at ``P`` itself (an importance
  tree already laid out like the adapters), ``P + ('kernel',)``,
  ``P + ('base_module', 'kernel')`` (``nnx.LoRA(base_module=...)``) and,
  when ``P`` ends in ``'lora'``, ``P[:-1] + ('kernel',)``
  (``nnx.LoRALinear``). ``kernel_path`` overrides this.

  qwix (``qwix.apply_lora_to_model``): a weight ``w`` adapted by
  ``w_lora_a`` / ``w_lora_b`` has its adapter at ``P = module path + ('w',)``,
  the weight's own path, so the base importance is found there. On an
  ``einsum`` weight qwix stores ``A [contracted dims..., r]`` and ``B [r,
  other dims...]`` (``delta W = tensordot(A, B, 1)``); the kernel's
  importance is taken as is when its axes are in that order, else transposed
  (the contracted axes and the others each in the kernel's order, as qwix
  builds them) or, for a ``dot_general`` weight with several contracted axes,
  reshaped. qwix scales the adapters' output by ``alpha / rank``: pass
  ``scale=alpha / rank``, since every LoRA function here assumes ``delta W =
  A B`` and ``F (s A B)^2 = (s^2 F) (A B)^2``.

  Args:
    adapters: the adapter pytree (see :mod:`wva_jax.lora`).
    base_importance: the base model's importance (a pytree; ``nnx.State``
      and ``nnx.Variable`` leaves are fine).
    kernel_path: optional ``f(P) -> key path`` of the kernel in
      ``base_importance``, keys as plain strings / ints.
    scale: ``s`` in ``delta W = s A B`` (qwix and PEFT: ``alpha / rank``);
      the importance is multiplied by ``s**2``.

  Returns:
    The ``kernel_importance`` of the other LoRA functions: one array per
    adapter, shaped like its kernel (``A.shape[:-1] + B.shape[-1:]``; for a
    qwix einsum adapter ``A.shape[:-1] + B.shape[1:]``), in the adapters'
    containers (a qwix module's mapping becomes ``{'w': importance}``). With
    ``scale=1`` and no transpose the arrays are ``base_importance``'s own (no
    copy; the transforms copy at ``init``).

  Example:
    >>> import jax.numpy as jnp, wva_jax as wj
    >>> base_imp = {'dense': {'kernel': jnp.ones((3, 4)), 'bias': jnp.ones(4)}}
    >>> adapters = {'dense': {'A': jnp.zeros((3, 2)), 'B': jnp.zeros((2, 4))}}
    >>> wj.lora_importance(adapters, base_imp)['dense'].shape
    (3, 4)
  """
  check_strength(scale, "scale")
  ad = _flatten(adapters)
  table = {_path(p): _unwrap(leaf)
           for p, leaf in jax.tree_util.tree_flatten_with_path(base_importance, is_leaf=_is_variable)[0]}
  out = []
  for i, path in enumerate(ad.paths):
    if kernel_path is not None:
      candidates = [tuple(kernel_path(path))]
    else:
      candidates = [path, path + ("kernel",), path + ("base_module", "kernel")]
      if path and path[-1] == "lora":
        candidates.append(path[:-1] + ("kernel",))
    found = next((c for c in candidates if c in table), None)
    if found is None:
      raise ValueError(f"no base importance for the adapter at {_show(path)}: looked at "
                       f"{[_show(c) for c in candidates]} (pass kernel_path=...)")
    leaf = _kernel_layout(table[found], ad, i, f"base_importance{_show(found)}", _show(path))
    out.append(leaf if isinstance(scale, (int, float)) and scale == 1
               else (jnp.asarray(leaf).astype(_F32) * jnp.square(jnp.asarray(scale, _F32))).astype(leaf.dtype))
  return _importance_tree(ad, out)


def _kernel_layout(leaf: Any, ad: _Adapters, i: int, what: str, where: str) -> Any:
  """``leaf`` (a base kernel's importance) in adapter ``i``'s kernel shape: as is, transposed or reshaped."""
  shape, want = tuple(jnp.shape(leaf)), ad.kshape[i]
  if shape == want:
    return leaf
  if math.prod(shape) == math.prod(want):
    if ad.einsum[i] and len(shape) == len(want):
      # qwix einsum: A's axes and B's axes, each in the kernel's order.
      n_a = len(ad.shapes[i][0]) - 1
      perms = [list(c) + [d for d in range(len(shape)) if d not in c]
               for c in itertools.combinations(range(len(shape)), n_a)]
      perms = [p for p in perms if tuple(shape[d] for d in p) == want]
      if len(perms) == 1:
        return jnp.transpose(leaf, perms[0])
      if len(perms) > 1:
        raise ValueError(f"{what} has shape {shape}: its axes can be ordered as the adapter at {where} "
                         f"needs ({want}) in {len(perms)} ways; transpose it yourself or pass kernel_path=...")
    grouped = _group(shape, want)
    if grouped:
      return jnp.reshape(leaf, want)
  raise ValueError(f"{what} has shape {shape}, but the adapter at {where} updates a kernel of shape "
                   f"{want} (delta W = A @ B)")


def _group(shape: tuple, want: tuple) -> bool:
  """Whether consecutive axes of ``shape`` multiply to each axis of ``want`` in turn (a plain reshape)."""
  j, acc = 0, 1
  for d in shape:
    acc *= d
    if j < len(want) and acc == want[j]:
      j, acc = j + 1, 1
    elif j >= len(want) or acc > want[j]:
      return d == 1 and acc == 1
  return j == len(want) and acc == 1


def lora_ewc_penalty(adapters: optax.Params, kernel_importance: optax.Params, strength: ArrayLike = 1.0
                     ) -> jax.Array:
  r"""EWC on the adapters' effective update: :math:`\frac{\lambda}{2}\sum_l \sum_{ij} F^{(l)}_{ij} (A_l B_l)_{ij}^2`.

  The anchor is the pretrained weights (:math:`\Delta W = A B = 0`), ``F``
  the importance of the frozen base kernels. Add it to the task loss; or use
  :func:`add_lora_ewc`, which adds its gradient without a second backward
  pass. Computed in float32 (``A``, ``B`` cast before the product, full
  matmul precision) whatever the adapters' dtype.

  Memory: layers are computed one after another (a ``fori_loop`` over the
  adapters switching to each one's computation; a stacked ``[L, ...]``
  adapter goes through ``lax.map``), so under ``jit`` the peak extra memory
  is one layer's float32 ``[d_in, d_out]`` product and its ``F``-weighted
  copy, whatever the number of layers (measured: 1.3x one layer's product
  for value and gradient over 8 layers; ``tests/test_lora.py``). Its gradient (``jax.grad``) is the
  closed form of :func:`lora_ewc_grad` (a ``custom_vjp``), layer by layer
  too: autodiff of the dense form would keep every layer's product for the
  backward pass.

  Args:
    adapters: the adapter pytree (see :mod:`wva_jax.lora`).
    kernel_importance: the base kernels' importance, one array per adapter
      shaped like its kernel (:func:`lora_importance`), >= 0.
    strength: ``lambda`` >= 0 (may be traced).

  Returns:
    A float32 scalar.

  Example:
    >>> import jax.numpy as jnp, wva_jax as wj
    >>> adapters = {'w': {'A': jnp.array([[1.0], [2.0]]), 'B': jnp.array([[1.0, 3.0]])}}
    >>> imp = {'w': jnp.array([[1.0, 0.0], [0.5, 0.0]])}   # A @ B = [[1, 3], [2, 6]]
    >>> float(wj.lora_ewc_penalty(adapters, imp, 2.0))   # 1*1 + 0.5*4
    3.0

  References:
    Kirkpatrick et al., PNAS 2017 (EWC); Hu et al., arXiv:2106.09685 (LoRA).
  """
  check_strength(strength)
  ad = _flatten(adapters)
  f_s = _importance_leaves(kernel_importance, ad, "kernel_importance")
  check_importance_values(f_s, "kernel_importance")
  return _penalty(jnp.asarray(strength, _F32), ad.a, ad.b, [jnp.asarray(f) for f in f_s])


def lora_ewc_grad(adapters: optax.Params, kernel_importance: optax.Params, strength: ArrayLike = 1.0
                  ) -> optax.Params:
  r"""The exact gradient of :func:`lora_ewc_penalty` in closed form, layer by layer.

  With :math:`P = F \odot (A B)` (float32):

  .. math::
     \frac{\partial}{\partial A} = \lambda\, P B^\top, \qquad
     \frac{\partial}{\partial B} = \lambda\, A^\top P

  (in the paper's orientation :math:`\Delta W = BA`: :math:`\lambda (F\odot
  BA) A^\top` and :math:`\lambda B^\top (F\odot BA)`). Peak memory as in
  :func:`lora_ewc_penalty`.

  Args:
    adapters: the adapter pytree.
    kernel_importance: one array per adapter, shaped like its kernel.
    strength: ``lambda`` >= 0.

  Returns:
    A tree like ``adapters`` (each gradient in its adapter's dtype).

  Example:
    >>> import jax.numpy as jnp, wva_jax as wj
    >>> adapters = {'w': {'A': jnp.array([[1.0]]), 'B': jnp.array([[3.0]])}}
    >>> g = wj.lora_ewc_grad(adapters, {'w': jnp.array([[2.0]])}, 1.0)
    >>> float(g['w']['A'][0, 0]), float(g['w']['B'][0, 0])   # 2*3*3, 1*2*3
    (18.0, 6.0)
  """
  check_strength(strength)
  ad = _flatten(adapters)
  f_s = _importance_leaves(kernel_importance, ad, "kernel_importance")
  check_importance_values(f_s, "kernel_importance")
  return _grad_tree(ad, f_s, strength)


def _grad_tree(ad: _Adapters, f_s: list, strength) -> Any:
  grads = _sequenced(_layer_grads, ad.a, ad.b, [jnp.asarray(f) for f in f_s])
  return _unflatten_pairs(ad, [((strength * da).astype(a.dtype), (strength * db).astype(b.dtype))
                               for (da, db), a, b in zip(grads, ad.a, ad.b)])


def lora_pullback(adapters: optax.Params, kernel_importance: optax.Params) -> optax.Params:
  r"""The adapters' own (diagonal) importance: the base kernels' importance pulled back through ``A @ B``.

  .. math::
     \Omega^A = F\,(B \odot B)^\top, \qquad \Omega^B = (A \odot A)^\top F,

  i.e. :math:`\Omega^A_{ik} = \sum_j F_{ij} B_{kj}^2` and
  :math:`\Omega^B_{kj} = \sum_i A_{ik}^2 F_{ij}`: the diagonal of
  :math:`J^\top \mathrm{diag}(F) J` (:mod:`wva_jax.lora` derives it), equal
  to the Hessian diagonal of :func:`lora_ewc_penalty` divided by
  ``lambda``. No dense ``A @ B`` is formed.

  Args:
    adapters: the adapter pytree.
    kernel_importance: one array per adapter, shaped like its kernel.

  Returns:
    A float32 tree like ``adapters``.

  Example:
    >>> import jax.numpy as jnp, wva_jax as wj
    >>> adapters = {'w': {'A': jnp.array([[2.0]]), 'B': jnp.array([[3.0]])}}
    >>> om = wj.lora_pullback(adapters, {'w': jnp.array([[0.5]])})
    >>> float(om['w']['A'][0, 0]), float(om['w']['B'][0, 0])   # 0.5*9, 4*0.5
    (4.5, 2.0)
  """
  ad = _flatten(adapters)
  f_s = _importance_leaves(kernel_importance, ad, "kernel_importance")
  return _unflatten_pairs(ad, [_pullback(a, b, f) for a, b, f in zip(ad.a, ad.b, f_s)])


def _pullback(a, b, f):
  f = jnp.asarray(f).astype(_F32)
  a2, b2 = jnp.square(a.astype(_F32)), jnp.square(b.astype(_F32))
  return (jnp.einsum("...io,...ro->...ir", f, b2, precision=_HI),
          jnp.einsum("...ir,...io->...ro", a2, f, precision=_HI))


def _lora_init(importance, importance_dtype, strength):
  def init_fn(params):
    ad = _flatten(params, "params")
    if importance is None:
      imp = _importance_tree(ad, [jnp.zeros(k, importance_dtype) for k in ad.kshape])
    else:
      _importance_leaves(importance, ad, "kernel_importance")
      # A copy, never the caller's array: a donated state would delete it (wva_jax/_copy.py).
      imp = fresh_tree(importance, importance_dtype)
    return LoRAState(importance=imp, count=init_count(strength))
  return init_fn


def _check_lora_factory(kernel_importance, strength, importance_dtype):
  check_scalar_or_schedule(strength, "strength")
  importance_dtype = check_storage_dtype(importance_dtype)
  if kernel_importance is not None:
    check_importance_values(kernel_importance, "kernel_importance")
  return importance_dtype


def add_lora_ewc(kernel_importance: optax.Params | None = None, strength: optax.ScalarOrSchedule = 1.0, *,
                 importance_dtype: DTypeLike | None = None) -> optax.GradientTransformation:
  r"""Adds the gradient of :func:`lora_ewc_penalty` to the adapters' updates.

  ``g_A += lambda * (F * (A @ B)) @ B.T``, ``g_B += lambda * A.T @ (F * (A @
  B))`` (:func:`lora_ewc_grad`), exactly as if the penalty were in the loss.
  Put it first in a chain so every optimizer sees the penalised gradient.
  The state is the base kernels' importance (no anchor: it is ``delta W =
  0``); a step needs one layer's dense product at a time on top of it.

  Args:
    kernel_importance: one array per adapter shaped like its base kernel
      (:func:`lora_importance`), >= 0, or ``None`` for zeros until
      :func:`wva_jax.set_importance` (or :func:`wva_jax.consolidate`) swaps
      one in. ``init`` stores a copy.
    strength: ``lambda`` >= 0 (may be traced), or an optax schedule of the
      step count (the state's ``count``, 0 at the first update).
    importance_dtype: storage dtype (``None``: float32; ``jnp.bfloat16``
      halves it); the gradient is computed in float32.

  Returns:
    An ``optax.GradientTransformation`` with state :class:`LoRAState`, whose
    ``update`` needs ``params`` (the adapters).

  Example:
    >>> import jax.numpy as jnp, optax, wva_jax as wj
    >>> params = {'w': {'A': jnp.array([[1.0]]), 'B': jnp.array([[3.0]])}}
    >>> tx = optax.chain(wj.add_lora_ewc({'w': jnp.array([[2.0]])}, 1.0), optax.sgd(0.1))
    >>> zero = {'w': {'A': jnp.zeros((1, 1)), 'B': jnp.zeros((1, 1))}}
    >>> u, _ = tx.update(zero, tx.init(params), params)
    >>> round(float(u['w']['A'][0, 0]), 4), round(float(u['w']['B'][0, 0]), 4)   # -0.1 * (18, 6)
    (-1.8, -0.6)
  """
  importance_dtype = _check_lora_factory(kernel_importance, strength, importance_dtype)

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("add_lora_ewc needs params (the adapters) in update(...)")
    ad = _flatten(params, "params")
    pull = _grad_tree(ad, _importance_leaves(state.importance, ad), strength_at(strength, state.count))
    return (jax.tree_util.tree_map(lambda u, p: (u.astype(_F32) + p.astype(_F32)).astype(u.dtype), updates, pull),
            state._replace(count=next_count(state.count)))

  return optax.GradientTransformation(_lora_init(kernel_importance, importance_dtype, strength), update_fn)


def lora_wva_scale(kernel_importance: optax.Params | None = None, strength: optax.ScalarOrSchedule = 1.0, *,
                   viscosity: str = "hyperbolic", importance_dtype: DTypeLike | None = None
                   ) -> optax.GradientTransformation:
  r"""WVA for adapters: each adapter update scaled by ``1/(1+lambda*Omega)`` with the pulled-back importance.

  .. math::
     u_A \leftarrow \frac{u_A}{1 + \lambda\,\Omega^A}, \quad
     u_B \leftarrow \frac{u_B}{1 + \lambda\,\Omega^B}, \qquad
     \Omega^A = F (B\odot B)^\top,\ \Omega^B = (A\odot A)^\top F

  (or :math:`e^{-\lambda\Omega}`), with :math:`\Omega^A, \Omega^B` from the
  current adapters (:func:`lora_pullback`; derivation in
  :mod:`wva_jax.lora`). ``lambda`` means what it means in
  :func:`wva_jax.wva_scale` on the full weights. Put it after the optimizer
  (it scales increments), as :func:`wva_jax.wva_scale`. The state is the base
  kernels' importance; a step forms no dense ``A @ B``.

  Args:
    kernel_importance: as in :func:`add_lora_ewc`.
    strength: ``lambda`` >= 0, or an optax schedule of the step count.
    viscosity: ``'hyperbolic'`` or ``'exponential'``.
    importance_dtype: storage dtype of the importance (``None``: float32).

  Returns:
    An ``optax.GradientTransformation`` with state :class:`LoRAState`, whose
    ``update`` needs ``params`` (the adapters).

  Example:
    >>> import jax.numpy as jnp, optax, wva_jax as wj
    >>> params = {'w': {'A': jnp.array([[2.0]]), 'B': jnp.array([[3.0]])}}
    >>> tx = optax.chain(optax.sgd(1.0), wj.lora_wva_scale({'w': jnp.array([[0.5]])}, 1.0))
    >>> ones = {'w': {'A': jnp.ones((1, 1)), 'B': jnp.ones((1, 1))}}
    >>> u, _ = tx.update(ones, tx.init(params), params)
    >>> round(float(u['w']['A'][0, 0]), 4), round(float(u['w']['B'][0, 0]), 4)   # -1/(1+4.5), -1/(1+2)
    (-0.1818, -0.3333)
  """
  check_choice(viscosity, VISCOSITIES, "viscosity")
  importance_dtype = _check_lora_factory(kernel_importance, strength, importance_dtype)

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("lora_wva_scale needs params (the adapters) in update(...)")
    ad = _flatten(params, "params")
    f_s = _importance_leaves(state.importance, ad)
    lam = strength_at(strength, state.count)
    factor = _unflatten_pairs(ad, [attenuation(_pullback(a, b, f), lam, viscosity)
                                   for a, b, f in zip(ad.a, ad.b, f_s)])
    return (jax.tree_util.tree_map(lambda u, s: (u.astype(_F32) * s).astype(u.dtype), updates, factor),
            state._replace(count=next_count(state.count)))

  return optax.GradientTransformation(_lora_init(kernel_importance, importance_dtype, strength), update_fn)
