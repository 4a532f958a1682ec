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

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def fsdp_shardings(params, mesh: Mesh, axis: str = "fsdp"):
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


def state_shardings(opt_state, param_shardings, mesh: Mesh):
  """Shardings for an optimizer state (or its ``jax.eval_shape``): params-shaped trees like the params.

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
  pdef = jax.tree_util.tree_structure(param_shardings)
  is_params = lambda x: x is not None and jax.tree_util.tree_structure(x) == pdef
  replicated = NamedSharding(mesh, P())
  return jax.tree_util.tree_map(lambda sub: param_shardings if is_params(sub) else replicated,
                                opt_state, is_leaf=is_params)


def shard_like_params(tree, param_shardings):
  """``jax.device_put`` of a params-shaped tree (importance, anchor) with the params' shardings."""
  return jax.device_put(tree, param_shardings)


def specs(tree):
  """The ``PartitionSpec`` of each array leaf (``None`` for a non-named sharding)."""
  return jax.tree_util.tree_map(lambda x: getattr(x.sharding, "spec", None), tree)
