"""Sharding helpers: importance, anchors and WVA/EWC state laid out like the parameters.

With parameters sharded FSDP-style (each leaf split over a mesh axis), every
params-shaped tree in the optimizer state (Adam's moments, WVA's importance,
EWC's anchor and importance) should be split the same way, or each device
holds a full copy of what FSDP saved. ``jax.jit(tx.init)(params)`` does not
guarantee that: measured on 8 CPU devices, it puts every zero-initialised
leaf on one device, and even an eager ``tx.init`` leaves the default
importance (``jnp.zeros(shape)``, no sharded input) on one device. Pass
:func:`state_shardings` as ``out_shardings`` (or ``jax.device_put`` the
state) to pin each state leaf to its parameter's sharding.

Importance estimation is data-parallel by jitting the estimator with the
batch sharded over a mesh axis and ``out_shardings`` like the params: each
device reduces its own examples and XLA adds the cross-device sum.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def fsdp_shardings(params: optax.Params, mesh: Mesh, axis: str = "fsdp") -> Any:
  """A ``NamedSharding`` per leaf: its largest dimension divisible by the axis size is split.

  Leaves with no such dimension (scalars, odd sizes) are replicated.

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, wva_jax as wj
    >>> mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ('fsdp',))
    >>> s = wj.sharding.fsdp_shardings({'w': jnp.zeros((4, 6))}, mesh)
    >>> s['w'].spec
    P(None, 'fsdp')
  """
  size = mesh.shape[axis]

  def one(x):
    shape = jax.numpy.shape(x)
    dims = sorted((d for d in range(len(shape)) if shape[d] % size == 0 and shape[d] >= size),
                  key=lambda d: (-shape[d], d))
    if not dims:
      return NamedSharding(mesh, P())
    spec = [None] * len(shape)
    spec[dims[0]] = axis
    return NamedSharding(mesh, P(*spec))

  return jax.tree_util.tree_map(one, params)


def _fits(x: Any, sharding: Any, shape: tuple[int, ...] | None) -> bool:
  """Whether leaf ``x`` can take ``sharding`` (and, given ``shape``, has exactly that shape)."""
  if not hasattr(x, "shape"):
    return False
  if shape is not None:
    return tuple(x.shape) == tuple(shape)
  spec = getattr(sharding, "spec", None)
  if spec is None:
    return True
  if len(spec) > len(x.shape):
    return False
  for dim, names in zip(x.shape, spec):
    if names is None:
      continue
    names = names if isinstance(names, tuple) else (names,)
    if dim % math.prod(sharding.mesh.shape[n] for n in names):
      return False
  return True


def state_shardings(opt_state: optax.OptState, param_shardings: Any, mesh: Mesh, *,
                    params: optax.Params | None = None) -> Any:
  """Shardings for an optimizer state (or its ``jax.eval_shape``): params-shaped trees like the params.

  A subtree of the state takes the params' shardings when it has the params'
  tree structure *and* each of its leaves fits its parameter's sharding: the
  same shape as the parameter when ``params`` (arrays or
  ``jax.ShapeDtypeStruct``, e.g. ``jax.eval_shape`` of the initialiser) is
  given, else a rank and sizes the sharding can split. Structure alone is not
  enough: with a bare array as params every state leaf has the params'
  structure, and Adam's scalar step count must not get a matrix's sharding.
  Scalars and any other leaf (Adam's step count, ...) are replicated.

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, optax, wva_jax as wj
    >>> mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ('fsdp',))
    >>> params = {'w': jnp.zeros((4, 6))}
    >>> tx = wj.wva_adam(1e-3, None, 1.0)
    >>> ps = wj.sharding.fsdp_shardings(params, mesh)
    >>> ss = wj.sharding.state_shardings(jax.eval_shape(tx.init, params), ps, mesh)
    >>> state = jax.jit(tx.init, out_shardings=ss)(jax.device_put(params, ps))
    >>> state[1].importance['w'].sharding.spec == ps['w'].spec
    True
  """
  pdef: Any = jax.tree_util.tree_structure(param_shardings)
  sharding_leaves = jax.tree_util.tree_leaves(param_shardings)
  if params is None:
    shapes: list[Any] = [None] * len(sharding_leaves)
  else:
    if jax.tree_util.tree_structure(params) != pdef:
      raise ValueError(f"params have tree structure {jax.tree_util.tree_structure(params)}, "
                       f"but param_shardings have {pdef}")
    shapes = [tuple(jax.numpy.shape(p)) for p in jax.tree_util.tree_leaves(params)]

  def is_params(x: Any) -> bool:
    if x is None or jax.tree_util.tree_structure(x) != pdef:
      return False
    # Same structure as the shardings: the leaves line up one to one.
    return all(_fits(leaf, sh, shape) for leaf, sh, shape
               in zip(jax.tree_util.tree_leaves(x), sharding_leaves, shapes))

  replicated = NamedSharding(mesh, P())
  return jax.tree_util.tree_map(lambda sub: param_shardings if is_params(sub) else replicated,
                                opt_state, is_leaf=is_params)


def shard_like_params(tree: optax.Params, param_shardings: Any) -> optax.Params:
  """``jax.device_put`` of a params-shaped tree (importance, anchor) with the params' shardings."""
  return jax.device_put(tree, param_shardings)


def specs(tree: Any) -> Any:
  """The ``PartitionSpec`` of each array leaf (``None`` for a non-named sharding)."""
  return jax.tree_util.tree_map(lambda x: getattr(x.sharding, "spec", None), tree)
