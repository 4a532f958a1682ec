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
