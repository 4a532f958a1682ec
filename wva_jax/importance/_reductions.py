"""The factored engine's reductions: per-example gradients of the per-leaf paths reduced, and dense layers' outer sums.

``_per_example_reduce`` forms each example's gradient of a leaf from its
uses' captures and cotangents and reduces it (``sum_b R(g_b)``);
``_outer_sum`` gives a one-position dense layer's ``sum_b R(x_b d_b^T)`` as
one matmul of ``R(X)`` and ``R(D)``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from wva_jax.importance import _use_grads, _uses


def _sequential() -> bool:
  """Loop over a chunk's examples (CPU) rather than batch them (accelerators).

  On XLA:CPU a batched per-example contraction ``einsum('btd,bte->bde')``
  followed by the reduction took 5.1x the chunk's weight gradient, and a
  ``scan`` over the examples accumulating ``R(x_b^T d_b)`` 1.2x (64 examples
  x 128 positions, 256 -> 1024, chunks of 16): each example is then one
  plain GEMM whose result is reduced while it is in cache.
  """
  return jax.default_backend() == "cpu"


def _per_example_reduce(leaves, plan, use_grad, Rs, out_shapes, caps, d, patches, extra=(), finish=None):
  """``[sum_b R(sum_u g_{u,b}) for R in Rs]`` for each leaf, ``g_{u,b}`` its gradient through use ``u``.

  ``finish(grads_b, extra_b)``, if given, maps one example's gradients of
  ``leaves`` (and its slices of the per-example arrays ``extra``) to the
  gradients that are reduced, shaped ``out_shapes``.
  """
  if not out_shapes:
    return []
  sites = [u.site for i in leaves for u in plan.uses[i]]
  sel = lambda t: {s: t[s] for s in sites if s in t}
  xs = (sel(caps), sel(d), sel(patches), list(extra))

  def grads(x):
    cap_b, d_b, p_b, e_b = x
    gs = [sum(use_grad(u, cap_b[u.site], d_b[u.site], p_b.get(u.site)) for u in plan.uses[i])
          for i in leaves]
    return gs if finish is None else finish(gs, e_b)

  if not _sequential():
    return [[r(g).sum(0) for r in Rs] for g in jax.vmap(grads)(xs)]

  def step(acc, x):
    return [[a_r + r(g) for a_r, r in zip(a, Rs)] for a, g in zip(acc, grads(x))], None

  init = [[jnp.zeros(s, jnp.float32) for _ in Rs] for s in out_shapes]
  return jax.lax.scan(step, init, xs)[0]


def _outer_sum(u, R, cap, dr):
  """``sum_b R(x_b d_b^T)`` = the layer's own VJP on ``(R(X), sum_k R(D_k))``, per loop slice."""
  n_loops = len(u.loops)
  # chunk axis after the loop axes, so each loop slice sees [chunk, ...]
  to_inner = lambda a: None if a is None else jnp.moveaxis(a, 0, n_loops)
  rx = [None if o is None else R(_use_grads.as_f32(to_inner(o))) for o in cap]
  dr = to_inner(dr)
  w0 = jnp.zeros(u.eqn.invars[u.operand].aval.shape, jnp.float32)

  def one_slice(rx_l, dr_l):
    shared = lambda w: jax.vmap(
        lambda ob: _use_grads.bind_f32(u, [w if k == u.operand else a for k, a in enumerate(ob)])
    )(rx_l)
    (gw,) = jax.vjp(shared, w0)[1](dr_l)
    return gw

  return _uses.looped(u, one_slice)(rx, dr)
