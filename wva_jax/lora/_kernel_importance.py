"""Pairing each adapter with its base kernel's importance (:func:`lora_importance`), qwix layouts included."""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from wva_jax._checks import check_strength
from wva_jax._variables import is_variable as _is_variable
from wva_jax._variables import unwrap as _unwrap
from wva_jax.lora._adapters import _Adapters, _flatten, _importance_tree, _path, _show
from wva_jax.lora._layers import _F32


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
