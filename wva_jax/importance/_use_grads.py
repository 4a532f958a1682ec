"""One use's algebra, for ONE iteration (``_uses.looped`` maps it over the loop axes).

Its primitive re-bound in float32, its VJP in the parameter operand, a
convolution's input patches and kernel gradient, and the positions a dense
use sums over per example.
"""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp

from wva_jax.importance import _rules, _uses
from wva_jax.importance._uses import Use


def bind_f32(use: Use, args):
  """Re-binds the use's primitive on float32 arguments (float32 accumulation)."""
  params = dict(use.eqn.primitive.get_bind_params(use.eqn.params))
  if "preferred_element_type" in params:
    params["preferred_element_type"] = jnp.float32
  return use.eqn.primitive.bind(*args, **params)


def as_f32(x):
  return x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.inexact) else x


def operand_grad(use: Use, others, d):
  """VJP of the use's primitive w.r.t. its parameter operand, in float32, for ONE iteration.

  ``others`` are the other operands (None for additive uses, whose derivative
  does not depend on them); the primitive is linear in the parameter operand,
  so the point of linearisation does not matter.
  """
  avals = [v.aval for v in use.eqn.invars]

  def op(w):
    args = []
    for k, a in enumerate(avals):
      if k == use.operand:
        args.append(w)
      elif others is None:
        args.append(jnp.zeros(a.shape, jnp.float32))
      else:
        args.append(as_f32(others[k]))
    return bind_f32(use, args)

  w0 = jnp.zeros(avals[use.operand].shape, jnp.float32)
  return jax.vjp(op, w0)[1](d.astype(jnp.float32))[0]


def closed_over(use: Use) -> bool:
  """A use inside loops whose parameter is closed over by every one of them (no stacked axis).

  A recurrent cell's weights in a time scan: the same operand in every
  iteration, so the loop axes are positions of one example.
  """
  return bool(use.loops) and all(s[0] in ("bind", "const") for s in use.path.steps)


def closed_over_grad(use: Use, others, d, leaf_shape):
  """One example's gradient of a ``closed_over`` use's leaf: the loop sum as one contraction.

  The layout ops on the path are hoisted out of the loops (they see the same
  value in every iteration) and the operand is left unbatched under ``vmap``,
  so the VJP contracts over the loop axes, ``X^T D`` with the iterations as
  rows, instead of forming one ``x_t d_t^T`` per iteration and summing.
  """
  layout = _uses.path_fn(_uses.Path(tuple(s for s in use.path.steps if s[0] == "bind")))

  def f(w):
    wl = layout(w)
    op = lambda ob: bind_f32(use, [wl if k == use.operand else as_f32(o) for k, o in enumerate(ob)])
    return _uses.looped(use, op)(others)

  w0 = jnp.zeros(leaf_shape, jnp.float32)
  return jax.vjp(f, w0)[1](d.astype(jnp.float32))[0]


def patchable(use: Use) -> bool:
  """A convolution (grouped or not) whose parameter is the kernel."""
  p = use.eqn.params
  return (use.factor is _rules.Factor.PATCHES and use.operand == 1
          and p["batch_group_count"] == 1)


def conv_patches(use: Use, lhs):
  """The input patches of one example's convolution, [C * window, positions].

  Built from strided slices of the padded input (one per window offset):
  plain memory moves, where XLA:CPU's patch-extraction and kernel-gradient
  convolutions are slow (the latter 10-50x slower inside a scan, measured).
  Rows are ordered (channel, *window), positions (batch, *output spatial).
  """
  p = use.eqn.params
  dn = p["dimension_numbers"]
  kshape = use.eqn.invars[1].aval.shape
  oshape = use.eqn.outvars[0].aval.shape
  window = [kshape[a] for a in dn.rhs_spec[2:]]
  out = [oshape[a] for a in dn.out_spec[2:]]
  x = jnp.transpose(as_f32(lhs), dn.lhs_spec)  # [N, C, *spatial]
  pads = [(0, 0, 0), (0, 0, 0)] + [(lo, hi, d - 1) for (lo, hi), d in
                                   zip(p["padding"], p["lhs_dilation"])]
  x = jax.lax.pad(x, jnp.zeros((), x.dtype), pads)
  slices = []
  for offset in itertools.product(*[range(w) for w in window]):
    start = [0, 0] + [k * d for k, d in zip(offset, p["rhs_dilation"])]
    stop = [x.shape[0], x.shape[1]] + [s + (o - 1) * st + 1 for s, o, st in
                                       zip(start[2:], out, p["window_strides"])]
    slices.append(jax.lax.slice(x, start, stop, [1, 1] + list(p["window_strides"])))
  patches = jnp.stack(slices, axis=2)  # [N, C, window, *out]
  patches = jnp.moveaxis(patches, 0, 2)  # [C, window, N, *out]
  c = x.shape[1]
  return patches.reshape(c * len(slices), -1)


def conv_kernel_grad(use: Use, patches, d):
  """One example's kernel gradient sum_p patch_p d_p^T, in the kernel's layout.

  For ``feature_group_count`` G (depthwise: G = channels) group g's output
  channels see only group g's input channels: one contraction per group.
  """
  p = use.eqn.params
  dn = p["dimension_numbers"]
  groups = p["feature_group_count"]
  d = jnp.transpose(d.astype(jnp.float32), (dn.out_spec[1], dn.out_spec[0]) + tuple(dn.out_spec[2:]))
  d = d.reshape(d.shape[0], -1)  # [O, P]
  kshape = use.eqn.invars[1].aval.shape
  window = tuple(kshape[a] for a in dn.rhs_spec[2:])
  n_out, n_in = kshape[dn.rhs_spec[0]], kshape[dn.rhs_spec[1]]  # n_in = C / G
  if groups == 1:
    g = patches @ d.T  # [C * window, O]
  else:
    pg = patches.reshape(groups, -1, patches.shape[-1])  # [G, C/G * window, P]
    dg = d.reshape(groups, n_out // groups, -1)  # [G, O/G, P]
    g = jnp.einsum("gkp,gop->kgo", pg, dg).reshape(pg.shape[1], n_out)
  g = g.reshape((n_in,) + window + (n_out,))
  # g axes: (I, *spatial, O); kernel axis rhs_spec[1] is I, rhs_spec[2+i] spatial i, rhs_spec[0] O
  src = {dn.rhs_spec[1]: 0, dn.rhs_spec[0]: len(kshape) - 1}
  src.update({a: 1 + i for i, a in enumerate(dn.rhs_spec[2:])})
  return jnp.transpose(g, [src[a] for a in range(len(kshape))])


def positions(use: Use) -> int:
  """Terms summed in each entry of the per-example gradient of a dot_general parameter.

  The free (non-contracting, non-batch) dims of the OTHER operand, per example.
  1 means each per-example gradient entry is one product x_i * d_j.
  """
  (lc, rc), (lb, rb) = use.eqn.params["dimension_numbers"]
  other = 1 - use.operand
  contract, batch = (lc, lb) if other == 0 else (rc, rb)
  shape = use.eqn.invars[other].aval.shape
  p = 1
  for k, s in enumerate(shape):
    if k not in contract and k not in batch:
      p *= s
  return p
