"""Dispatch of per-example gradient reductions to the fastest correct path.

``gradient_sums`` computes ``sum_b valid_b sum_k R(J_b^T c_{b,k})`` (see
``_per_example.per_example_sum``, the reference) with ``R`` = square or abs.

``engine='vmap'`` is the chunked ``vmap(vjp)`` reference: it materialises
every per-example gradient of every parameter. ``engine='factored'`` (the
``'auto'`` default) avoids that for the parameters it can see in the model's
jaxpr (``_jaxpr.trace``), with no model rewrite and no loss registration:

* dense (a ``dot_general`` used once, one position per example): the
  per-example gradient is the outer product ``x_b d_b^T`` of the layer input
  and the output cotangent, so ``sum_b R(x_b d_b^T) = R(X)^T R(D)``: ONE
  matmul per layer for the whole chunk, and for K cotangents
  ``R(X)^T sum_k R(D_k)``.
* dense over positions (tokens), conv, bias, scale (``mul``), embedding
  (``gather``): the per-example gradient of that parameter alone is formed by
  one batched contraction over the example's positions (the op's VJP in the
  parameter, under ``vmap``; for a convolution, input patches from strided
  slices times ``D``, einsum('bkp,bop->bko')), then reduced. Never one
  backward pass per example.
* fallback (a parameter used by several ops, or inside control flow or a
  custom-derivative call...): per-example gradients of those leaves only.

``X`` is recorded during the forward pass and ``D`` comes from the same
backward pass as the fallback gradients: a zero perturbation ``eps`` is added
to each factored op's output and the summed cotangent is pulled back to
``eps``. The forward pass runs once per chunk, then K backward passes.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from wva_jax.importance import _jaxpr
from wva_jax.importance._per_example import (DEFAULT_CHUNK_SIZE, chunked, num_examples, per_example_sum, reducer,
                                             resolve_chunk_size, scan_chunks)

ENGINES = ("auto", "factored", "vmap")
# Chunk when every factored parameter is a one-position dense layer or a
# bias: memory per example is then a few activations, so chunks can be big.
DENSE_CHUNK_SIZE = 1024


def _classify(plan, leaves) -> list[str]:
  """The path each leaf takes: 'dense', 'dense/positions', 'conv', ... or 'fallback: <why>'."""
  out = []
  for i, leaf in enumerate(leaves):
    uses = plan.uses.get(i, [])
    blocked = plan.blocked.get(i, [])
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
      out.append("unused (integer)")  # integer leaves carry no gradient: zeros
    elif blocked:
      out.append(f"fallback: used by {blocked[0]}")
    elif not uses:
      out.append("unused")
    elif len(uses) > 1:
      out.append(f"fallback: used by {len(uses)} ops")
    else:
      u = uses[0]
      if u.prim == "dot_general":
        one = _jaxpr.positions(u) == 1 and _jaxpr.is_permutation(u, jnp.shape(leaf))
        out.append("dense" if one else "dense/positions")
      else:
        out.append(u.kind)
  return out


def _plan(apply_fn, params, inputs):
  leaves = jax.tree_util.tree_leaves(params)
  example = jax.tree_util.tree_map(lambda a: jnp.asarray(a)[:1], inputs)
  plan = _jaxpr.trace(apply_fn, params, example)
  return plan, leaves, _classify(plan, leaves)


def engine_report(apply_fn, params, inputs) -> dict[str, str]:
  """Which path the factored engine takes for each parameter leaf.

  Args:
    apply_fn: ``apply_fn(params, inputs) -> outputs``, batched, with
      ``outputs[b]`` depending on ``inputs[b]`` only.
    params: the parameter pytree.
    inputs: a batch (only its first example is used, to trace the model).

  Returns:
    ``{'layers/0/kernel': 'dense', ...}``. Paths: ``'dense'`` (one matmul of
    ``R(X)^T R(D)``), ``'dense/positions'``, ``'conv'``, ``'bias'``,
    ``'scale'``, ``'embedding'`` (per-example gradient of that leaf alone, by
    one batched contraction over positions), ``'unused'`` (zero) and
    ``'fallback: <reason>'`` (per-example ``vjp`` restricted to that leaf).

  Example:
    >>> import jax.numpy as jnp
    >>> params = {'w': jnp.ones((3, 2)), 'b': jnp.zeros(2)}
    >>> engine_report(lambda p, x: x @ p['w'] + p['b'], params, jnp.ones((4, 3)))
    {'b': 'bias', 'w': 'dense'}
  """
  num_examples(inputs)
  plan, _, kinds = _plan(apply_fn, params, inputs)
  return dict(zip(_jaxpr.leaf_paths(params), kinds))


def gradient_sums(apply_fn, params, inputs, cot_fn, extras=None, *, reduce="square",
                  chunk_size=None, engine="auto"):
  """``sum_b valid_b * sum_k R(J_b^T c_{b,k})`` as a float32 pytree like ``params``.

  Same contract as ``per_example_sum`` (the caller divides by the number of
  examples); ``engine`` is ``'auto'`` (= ``'factored'``), ``'factored'`` or
  ``'vmap'`` (the reference path).
  """
  if engine not in ENGINES:
    raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
  if engine == "vmap":
    return per_example_sum(apply_fn, params, inputs, cot_fn, extras, reduce=reduce,
                           chunk_size=chunk_size)
  R = reducer(reduce)
  n = num_examples(inputs)
  plan, leaves, kinds = _plan(apply_fn, params, inputs)
  treedef = jax.tree_util.tree_structure(params)
  shapes = [jnp.shape(l) for l in leaves]
  fallback = [i for i, k in enumerate(kinds) if k.startswith("fallback")]
  factored = [i for i, k in enumerate(kinds)
              if not k.startswith("fallback") and not k.startswith("unused")]
  sites = plan.sites(factored)
  outer = [u for u in sites if kinds[u.leaf] == "dense"]
  per_ex = [u for u in sites if kinds[u.leaf] != "dense"]
  small = not fallback and all(kinds[u.leaf] in ("dense", "bias") for u in sites)
  chunk = resolve_chunk_size(chunk_size, n, DENSE_CHUNK_SIZE if small else DEFAULT_CHUNK_SIZE)
  chunk_t = {u.site: _jaxpr.chain_transpose(u.chain, shapes[u.leaf]) for u in sites}
  (x_chunks, e_chunks), valid = chunked((inputs, extras), n, chunk)
  f32 = lambda a: a.astype(jnp.float32)

  def one_example(x_leaves, eps, pf):
    ls = list(leaves)
    for j, i in enumerate(fallback):
      ls[i] = pf[j]
    caps = {}

    def hook(u, invals, out):
      if not u.additive:  # an add's derivative needs none of its operands
        caps[u.site] = [None if k == u.operand else a for k, a in enumerate(invals)]
      return out + eps[u.site]

    out = _jaxpr.evaluate(plan, ls, [a[None] for a in x_leaves], hook, sites)
    return out, caps

  def body(chunk_data):
    x, e, v = chunk_data
    acc = [jnp.zeros(s, jnp.float32) for s in shapes]
    eps0 = {u.site: jnp.zeros((chunk,) + u.eqn.outvars[0].aval.shape,
                              u.eqn.outvars[0].aval.dtype) for u in sites}
    pf0 = [jnp.broadcast_to(leaves[i], (chunk,) + shapes[i]) for i in fallback]
    fwd = lambda eps, pf: jax.vmap(one_example)(jax.tree_util.tree_leaves(x), eps, pf)
    out, pullback, caps = jax.vjp(fwd, eps0, pf0, has_aux=True)
    cots = cot_fn(out[:, 0], e)
    cots = cots * v.reshape((1, chunk) + (1,) * (cots.ndim - 2))
    cots = cots.astype(out.dtype)[:, :, None]

    # patches of each plain conv's input: computed once, shared by the K directions
    patches = {u.site: jax.vmap(lambda ob: _jaxpr.conv_patches(u, ob[0]))(caps[u.site])
               for u in per_ex if _jaxpr.patchable(u)}

    def per_direction(c):
      d, g = pullback(c)
      outer_r = {u.site: R(f32(d[u.site])) for u in outer}
      sums = [R(f32(gi)).sum(0) for gi in g]
      ex = []
      for u in per_ex:
        t = chunk_t[u.site]
        if u.additive:
          grads = jax.vmap(lambda db: t(_jaxpr.operand_grad(u, None, db)))(d[u.site])
        elif u.site in patches:
          grads = jax.vmap(lambda pb, db: t(_jaxpr.conv_kernel_grad(u, pb, db)))(
              patches[u.site], d[u.site])
        else:
          grads = jax.vmap(lambda ob, db: t(_jaxpr.operand_grad(u, ob, db)))(
              caps[u.site], d[u.site])
        ex.append(R(grads).sum(0))
      return outer_r, sums, ex

    def step(carry, c):
      return jax.tree_util.tree_map(jnp.add, carry, per_direction(c)), None

    if cots.shape[0] == 1:
      outer_r, sums, ex = per_direction(cots[0])
    else:
      init = jax.tree_util.tree_map(jnp.zeros_like, jax.eval_shape(per_direction, cots[0]))
      (outer_r, sums, ex), _ = jax.lax.scan(step, init, cots)
    for j, i in enumerate(fallback):
      acc[i] = acc[i] + sums[j]
    for u, s in zip(per_ex, ex):
      acc[u.leaf] = acc[u.leaf] + s
    for u in outer:
      # sum_b R(x_b d_b^T) = R(X)^T R(D): the layer's own VJP on (R(X), sum_k R(D_k)).
      rx = [None if o is None else R(_jaxpr.as_f32(o)) for o in caps[u.site]]
      shared = lambda w: jax.vmap(
          lambda ob: _jaxpr.bind_f32(u, [w if k == u.operand else a for k, a in enumerate(ob)])
      )(rx)
      w0 = jnp.zeros(u.eqn.invars[u.operand].aval.shape, jnp.float32)
      (gw,) = jax.vjp(shared, w0)[1](outer_r[u.site])
      acc[u.leaf] = acc[u.leaf] + chunk_t[u.site](gw)
    return acc

  init = [jnp.zeros(s, jnp.float32) for s in shapes]
  acc = scan_chunks(body, init, (x_chunks, e_chunks, valid))
  return jax.tree_util.tree_unflatten(treedef, acc)
