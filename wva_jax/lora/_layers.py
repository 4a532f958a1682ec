"""The adapters' float32 algebra one layer at a time, and the EWC penalty's ``custom_vjp``.

Layers are sequenced (:func:`_sequenced`) so that at most one layer's dense
``A @ B`` is live: see :func:`wva_jax.lora_ewc_penalty` for the memory this
keeps.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

_F32 = jnp.float32
_HI = lax.Precision.HIGHEST


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
  it: XLA's CPU pipeline drops it before scheduling.) The loop carries one
  flat float32 buffer of all the outputs (adapter-sized gradients or
  scalars), each branch writing its own slice: carrying the outputs as a list
  made every branch pass all the others through, and compiling took time
  cubic in the adapter count (30 adapters 1.6 s, 120 adapters 136 s; a
  30-layer model with 7 adapted matrices a layer did not finish in 6 minutes).
  """
  if len(a_s) <= 1:
    return [_per_layer(fn, a, b, f) for a, b, f in zip(a_s, b_s, f_s)]
  shapes = [jax.eval_shape(partial(_per_layer, fn), a, b, f) for a, b, f in zip(a_s, b_s, f_s)]
  flat_shapes = [jax.tree_util.tree_flatten(s) for s in shapes]
  sizes = [[math.prod(x.shape) for x in leaves] for leaves, _ in flat_shapes]
  offsets = [0]
  for sz in sizes:
    offsets.append(offsets[-1] + sum(sz))

  def branch(l):
    def run(buf):
      leaves = jax.tree_util.tree_leaves(_per_layer(fn, a_s[l], b_s[l], f_s[l]))
      flat = jnp.concatenate([jnp.ravel(x).astype(_F32) for x in leaves])
      return lax.dynamic_update_slice(buf, flat, (offsets[l],))
    return run

  branches = [branch(l) for l in range(len(a_s))]
  buf = lax.fori_loop(0, len(a_s), lambda i, buf: lax.switch(i, branches, buf), jnp.zeros(offsets[-1], _F32))
  out = []
  for l, ((leaves, treedef), sz) in enumerate(zip(flat_shapes, sizes)):
    at, parts = offsets[l], []
    for x, n in zip(leaves, sz):
      parts.append(buf[at:at + n].reshape(x.shape).astype(x.dtype))
      at += n
    out.append(jax.tree_util.tree_unflatten(treedef, parts))
  return out


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
