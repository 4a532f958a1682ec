"""Reads a model's jaxpr to find where each parameter enters it.

The factored importance engine and SIG need, for every parameter leaf, the one
primitive that consumes it (a ``dot_general`` for a Dense kernel, a
``conv_general_dilated`` for a Conv kernel, an ``add`` for a bias...) and, at
run time, that primitive's other operands and its output. Nothing in the
model is rewritten: ``apply_fn`` is traced once on a batch of ONE example and
the resulting jaxpr is re-evaluated by a small interpreter that can (a) record
the operands of chosen equations and (b) add a perturbation ``eps`` to their
outputs, so that ``d loss / d eps`` is the cotangent at that output.

Tracing one example (and ``vmap``-ing the interpreter over a chunk) makes the
example axis explicit everywhere: every captured array gets a leading chunk
axis that is the example axis, whatever the model does with its batch axis.

A parameter reaches its consumer through layout-only primitives (dtype casts,
reshapes, transposes, broadcasts) and through calls whose semantics do not
depend on how they are differentiated (``jit``, ``closed_call``, ``remat``);
these are followed. Custom-derivative calls, control flow and anything else
are not looked into: a parameter used there is reported as such, and the
engine differentiates it the general way.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, Callable

import jax
from jax.extend import core as jcore
import jax.numpy as jnp

# Layout-only primitives a parameter may pass through on its way to its use.
PASS_THROUGH = frozenset({"convert_element_type", "reshape", "transpose", "squeeze",
                          "expand_dims", "broadcast_in_dim", "copy", "copy_p"})
# Calls whose inner jaxpr is evaluated inline without changing any derivative.
TRANSPARENT = frozenset({"jit", "pjit", "closed_call", "core_call", "remat2", "checkpoint"})
# Primitives linear in the parameter operand (given the other operands).
LINEAR_KIND = {"dot_general": "dense", "conv_general_dilated": "conv", "mul": "scale",
               "gather": "embedding"}
# Primitives where the parameter is added to the rest: d out / d param = identity.
ADDITIVE_KIND = {"add": "bias", "sub": "bias"}


@dataclasses.dataclass(frozen=True, eq=False)
class Use:
  """One equation that consumes (an alias of) parameter leaf ``leaf``."""
  leaf: int
  site: tuple  # equation index path: (i,) top level, (i, j) eqn j inside eqn i's jaxpr
  eqn: Any  # the JaxprEqn
  operand: int  # position of the parameter alias among eqn.invars
  chain: tuple  # ((primitive, params), ...) from the leaf to the operand

  @property
  def prim(self) -> str:
    return self.eqn.primitive.name

  @property
  def kind(self) -> str:
    return LINEAR_KIND.get(self.prim) or ADDITIVE_KIND[self.prim]

  @property
  def additive(self) -> bool:
    return self.prim in ADDITIVE_KIND


@dataclasses.dataclass
class Plan:
  closed: Any  # ClosedJaxpr of (param leaves..., input leaves...) -> outputs
  n_leaves: int
  uses: dict  # leaf -> [Use]
  blocked: dict  # leaf -> [reason]: uses the interpreter cannot see through

  def sites(self, leaves) -> list:
    return [u for i in leaves for u in self.uses.get(i, [])]


def leaf_paths(params) -> list[str]:
  """'layers/0/kernel'-style names of the leaves of ``params``."""
  out = []
  for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
    parts = []
    for k in path:
      if isinstance(k, jax.tree_util.DictKey):
        parts.append(str(k.key))
      elif isinstance(k, jax.tree_util.SequenceKey):
        parts.append(str(k.idx))
      elif isinstance(k, jax.tree_util.GetAttrKey):
        parts.append(k.name)
      else:
        parts.append(str(k))
    if len(parts) > 1 and parts[-1] == "value":  # Flax NNX Variable leaves
      parts.pop()
    out.append("/".join(parts) or "<root>")
  return out


def _inner(eqn):
  """(jaxpr, consts) of a transparent call equation."""
  j = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
  if isinstance(j, jcore.ClosedJaxpr):
    return j.jaxpr, j.consts
  return j, ()


def _struct(x):
  return jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))


def trace(apply_fn: Callable, params, example) -> Plan:
  """Traces ``apply_fn(params, example)`` (a batch of one) and maps parameter uses."""
  leaves, treedef = jax.tree_util.tree_flatten(params)
  fn = lambda ls, x: apply_fn(jax.tree_util.tree_unflatten(treedef, ls), x)
  closed = jax.make_jaxpr(fn)([_struct(l) for l in leaves],
                              jax.tree_util.tree_map(_struct, example))
  if len(closed.jaxpr.outvars) != 1:
    raise ValueError("apply_fn must return a single array of outputs "
                     f"(got {len(closed.jaxpr.outvars)} arrays)")
  uses: dict = {}
  blocked: dict = {}

  def block(alias, reason):
    blocked.setdefault(alias[0], []).append(reason)

  def walk(jaxpr, in_alias, prefix):
    env = {v: a for v, a in zip(jaxpr.invars, in_alias) if a is not None}
    for i, eqn in enumerate(jaxpr.eqns):
      ins = [env.get(v) if isinstance(v, jcore.Var) else None for v in eqn.invars]
      idx = [k for k, a in enumerate(ins) if a is not None]
      if not idx:
        continue
      name = eqn.primitive.name
      site = prefix + (i,)
      if name in PASS_THROUGH and idx == [0] and len(eqn.outvars) == 1:
        leaf, chain = ins[0]
        env[eqn.outvars[0]] = (leaf, chain + ((eqn.primitive, eqn.params),))
      elif name in TRANSPARENT:
        inner, _ = _inner(eqn)
        for v, a in zip(eqn.outvars, walk(inner, ins, site)):
          if a is not None:
            env[v] = a
      elif (name in LINEAR_KIND or name in ADDITIVE_KIND) and len(idx) == 1 and \
          not (name == "gather" and idx != [0]):
        leaf, chain = ins[idx[0]]
        uses.setdefault(leaf, []).append(Use(leaf, site, eqn, idx[0], chain))
      else:
        if name == "gather" and 0 not in idx:
          reason = "gather indices"
        elif len(idx) > 1 and (name in LINEAR_KIND or name in ADDITIVE_KIND):
          reason = f"{name} of two parameter operands"
        else:
          reason = name
        for k in idx:
          block(ins[k], reason)
    out = []
    for v in jaxpr.outvars:
      out.append(env.get(v) if isinstance(v, jcore.Var) else None)
    return out

  n = len(leaves)
  in_alias = [(i, ()) for i in range(n)] + [None] * (len(closed.jaxpr.invars) - n)
  for a in walk(closed.jaxpr, in_alias, ()):
    if a is not None:
      block(a, "returned as output")
  return Plan(closed, n, uses, blocked)


def chain_fn(chain):
  """The layout chain as a float32 function of the leaf (dtype casts dropped)."""

  def f(w):
    for prim, params in chain:
      if prim.name == "convert_element_type":
        continue
      w = prim.bind(w, **prim.get_bind_params(params))
    return w

  return f


def chain_transpose(chain, leaf_shape):
  """Maps a float32 cotangent at the operand back to the leaf's layout (summing broadcasts)."""
  f = chain_fn(chain)
  if not any(p.name != "convert_element_type" for p, _ in chain):
    return lambda g: g
  t = jax.linear_transpose(f, jax.ShapeDtypeStruct(leaf_shape, jnp.float32))
  return lambda g: t(g)[0]


def is_permutation(use: Use, leaf_shape) -> bool:
  """True when the chain only permutes elements (no broadcast), so |.| and (.)^2 commute with it."""
  return math.prod(leaf_shape) == math.prod(use.eqn.invars[use.operand].aval.shape)


def bind_f32(use: Use, args):
  """Re-binds the use's primitive on float32 arguments (float32 accumulation)."""
  params = dict(use.eqn.primitive.get_bind_params(use.eqn.params))
  if "preferred_element_type" in params:
    params["preferred_element_type"] = jnp.float32
  return use.eqn.primitive.bind(*args, **params)


def as_f32(x):
  return x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.inexact) else x


def operand_grad(use: Use, others, d):
  """VJP of the use's primitive w.r.t. its parameter operand, in float32.

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


def patchable(use: Use) -> bool:
  """A plain (ungrouped) convolution whose parameter is the kernel."""
  p = use.eqn.params
  return (use.prim == "conv_general_dilated" and use.operand == 1
          and p["feature_group_count"] == 1 and p["batch_group_count"] == 1)


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
  """One example's kernel gradient sum_p patch_p d_p^T, in the kernel's layout."""
  dn = use.eqn.params["dimension_numbers"]
  d = jnp.transpose(d.astype(jnp.float32), (dn.out_spec[1], dn.out_spec[0]) + tuple(dn.out_spec[2:]))
  g = patches @ d.reshape(d.shape[0], -1).T  # [C * window, O]
  kshape = use.eqn.invars[1].aval.shape
  window = tuple(kshape[a] for a in dn.rhs_spec[2:])
  g = g.reshape((kshape[dn.rhs_spec[1]],) + window + (kshape[dn.rhs_spec[0]],))
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


def evaluate(plan: Plan, leaves, x_leaves, hook, sites):
  """Evaluates the traced jaxpr; ``hook(use, invals, out) -> out`` runs at each site."""
  by_site = {u.site: u for u in sites}
  prefixes = {u.site[:k] for u in sites for k in range(1, len(u.site))}

  def run(jaxpr, consts, args, prefix):
    env = {}

    def read(v):
      return v.val if isinstance(v, jcore.Literal) else env[v]

    for v, x in zip(jaxpr.constvars, consts):
      env[v] = x
    for v, x in zip(jaxpr.invars, args):
      env[v] = x
    for i, eqn in enumerate(jaxpr.eqns):
      site = prefix + (i,)
      invals = [read(v) for v in eqn.invars]
      if site in prefixes:
        inner, inner_consts = _inner(eqn)
        outs = run(inner, inner_consts, invals, site)
      else:
        with eqn.ctx.manager:
          outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
        if not eqn.primitive.multiple_results:
          outs = [outs]
        if site in by_site:
          outs = [hook(by_site[site], invals, outs[0])]
      for v, x in zip(eqn.outvars, outs):
        if not isinstance(v, jcore.DropVar):
          env[v] = x
    return [read(v) for v in jaxpr.outvars]

  (out,) = run(plan.closed.jaxpr, plan.closed.consts, list(leaves) + list(x_leaves), ())
  return out
