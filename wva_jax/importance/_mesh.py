"""Estimators on meshes with Explicit axes (``jax.make_mesh``'s default from JAX 0.10).

The engine slices examples out of the batch (one example to trace the model,
the probe's first examples, chunks), and on an Explicit axis JAX's sharding
types refuse such a slice of a sharded dimension (``ShardingTypeError``:
"provide out_sharding for the gather"), whereas ``jax.grad`` never slices.
Every estimator therefore runs its body under ``jax.sharding.auto_axes``
when an Explicit axis is in play: inside, the compiler places the slices as
it does on an Auto mesh; the results come back with the parameters' own
shardings (an FSDP-sharded kernel's importance sharded like the kernel).
Nothing changes without a mesh or on Auto meshes.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import PartitionSpec


def _explicit_mesh(mesh: Any) -> bool:
  types = getattr(mesh, "axis_types", ()) or ()
  return any("Explicit" in str(t) for t in types)


def _leaf_mesh(leaf: Any) -> Any:
  """The mesh of ``leaf``'s sharding, if it has Explicit axes: the concrete one of a placed array,
  else (a tracer) the abstract one of its type."""
  if isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer):
    mesh = getattr(getattr(leaf, "sharding", None), "mesh", None)
    if _explicit_mesh(mesh):
      return mesh
  try:
    sharding = jax.typeof(leaf).sharding
  except Exception:  # noqa: BLE001 - not an array (a Python scalar, a key's data...)
    return None
  mesh = getattr(sharding, "mesh", None)
  return mesh if _explicit_mesh(mesh) else None


def _spec(leaf: Any) -> PartitionSpec:
  try:
    spec = jax.typeof(leaf).sharding.spec
  except Exception:  # noqa: BLE001
    return PartitionSpec()
  return spec if isinstance(spec, PartitionSpec) else PartitionSpec()


def on_auto_axes(arrays: tuple[str, ...], out: Callable[[Any], Any]) -> Callable:
  """Decorates an estimator: with an Explicit mesh axis in play, its body runs under ``auto_axes``.

  ``arrays`` names the arguments that are arrays (passed through ``auto_axes``);
  the others (``apply_fn``, modes, sizes) are closed over. ``out(specs)`` gives
  the results' ``PartitionSpec`` pytree from the params' specs.
  """

  def decorate(fn: Callable) -> Callable:
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
      bound = signature.bind(*args, **kwargs)
      bound.apply_defaults()
      given = {k: v for k, v in bound.arguments.items() if k in arrays and v is not None}
      context = jax.sharding.get_abstract_mesh()
      mesh = context if _explicit_mesh(context) else None
      if mesh is None:
        for leaf in jax.tree_util.tree_leaves(given):
          mesh = _leaf_mesh(leaf)
          if mesh is not None:
            break
      if mesh is None:
        return fn(*args, **kwargs)
      specs = jax.tree_util.tree_map(_spec, bound.arguments["params"])

      def body(given):
        return fn(**{**bound.arguments, **given})

      # arrays placed by device_put on an Explicit mesh, called outside `jax.set_mesh`: enter
      # their (concrete) mesh, which auto_axes reads from the context
      if _explicit_mesh(context):
        enter: Any = contextlib.nullcontext()
      elif isinstance(mesh, jax.sharding.Mesh):
        enter = jax.set_mesh(mesh)
      else:   # traced arrays under jit, no mesh in the context: their type's abstract mesh
        enter = jax.sharding.use_abstract_mesh(mesh)
      with enter:
        return jax.sharding.auto_axes(body, out_sharding=out(specs))(given)

    return wrapper

  return decorate


def like_params(specs: Any) -> Any:
  """``out`` for an estimator whose result is shaped like its params: their specs as they are."""
  return specs
