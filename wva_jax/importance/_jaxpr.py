"""Reads a model's jaxpr to find where each parameter enters it.

The factored importance engine and SIG need, for every parameter leaf, the
primitives that consume it (a ``dot_general`` for a Dense kernel, a
``conv_general_dilated`` for a Conv kernel, an ``add`` for a bias, a
``gather`` and a ``dot_general`` for a tied embedding...) and, at run time,
those primitives' other operands and outputs. Nothing in the model is
rewritten: ``apply_fn`` is traced once on a batch of ONE example and the
resulting jaxpr is re-evaluated by a small interpreter that can (a) record
the operands of chosen equations and (b) add a perturbation ``eps`` to their
outputs, so that ``d loss / d eps`` is the cotangent at that output.

Tracing one example (and ``vmap``-ing the interpreter over a chunk) makes the
example axis explicit everywhere: every captured array gets a leading chunk
axis that is the example axis, whatever the model does with its batch axis.

How each primitive is treated is decided in one place, ``_rules.rule``. A
``scan`` (layers stacked along a leading axis: ``nnx.scan``, ``nn.scan``,
``hk.layer_stack``, ``lax.scan``) is entered: a use inside its body gets
leading "loop" axes (one per enclosing scan), its ``eps`` is scanned in with
the layer slices and its captures are scanned out, so the per-layer work
happens inside the model's own scan.

Each use carries the linear map from the leaf to the operand it feeds
(``Path``): layout ops on the way, and for a scan either the layer slicing
(a stacked leaf: a permutation) or a broadcast over iterations (a leaf
closed over by the body: used once per layer). Its transpose maps stacked
operand cotangents back to the leaf, summing the uses.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

from wva_jax.importance import _rules


@dataclasses.dataclass(frozen=True)
class Path:
  """The linear map from a parameter leaf to one alias of it, with its loop axes.

  ``steps`` are ``('bind', primitive, params)`` (a layout op, applied under
  ``vmap`` over the loop axes in place at that point), ``('xs',)`` (entering
  a scan as a scanned operand: the leading axis becomes a loop axis) and
  ``('const', length)`` (entering a scan as a closed-over operand: broadcast
  along a new loop axis) and ``('ys',)`` (leaving a scan as a stacked output:
  the loop axis becomes an array axis again).
  """
  steps: tuple = ()
  loops: tuple = ()  # lengths of the enclosing scans' loop axes, outermost first
  permutes: bool = True  # each leaf element appears exactly once in the alias

  def then(self, step, loops=None, permutes=True) -> Path:
    return Path(self.steps + (step,), self.loops if loops is None else loops,
                self.permutes and permutes)


@dataclasses.dataclass(frozen=True, eq=False)
class Use:
  """One equation that consumes (an alias of) parameter leaf ``leaf``."""
  leaf: int
  site: tuple  # equation index path: (i,) top level, (i, j) eqn j inside eqn i's jaxpr
  eqn: Any  # the JaxprEqn
  operand: int  # position of the parameter alias among eqn.invars
  path: Path
  data: bool = True  # the other operands depend on the example (not a constant like 1 + w)

  @property
  def prim(self) -> str:
    return self.eqn.primitive.name

  @property
  def kind(self) -> str:
    return _rules.kind(self.prim)

  @property
  def additive(self) -> bool:
    return _rules.is_additive(self.prim)

  @property
  def loops(self) -> tuple:
    return self.path.loops


@dataclasses.dataclass
class Plan:
  closed: Any  # ClosedJaxpr of (param leaves..., input leaves...) -> outputs
  n_leaves: int
  uses: dict  # leaf -> [Use]
  blocked: dict  # leaf -> [reason]: uses the interpreter cannot see through
  block_sites: dict = dataclasses.field(default_factory=dict)  # leaf -> [site] of those uses
  depends: dict = dataclasses.field(default_factory=dict)  # {(prefix, var): True}: depends on the example
  aliases: frozenset = frozenset()  # top-level vars that are layout aliases of one leaf

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
  """(jaxpr, consts) of a call or scan equation's body."""
  j = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
  if isinstance(j, jcore.ClosedJaxpr):
    return j.jaxpr, j.consts
  return j, ()


def _struct(x):
  return jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))


def describe(out) -> str:
  """A short description of a non-array model output, for error messages."""
  leaves = jax.tree_util.tree_leaves(out)
  shapes = ", ".join(str(tuple(getattr(l, "shape", ()))) for l in leaves[:4])
  more = ", ..." if len(leaves) > 4 else ""
  return f"a {type(out).__name__} of {len(leaves)} arrays (shapes {shapes}{more})"


def check_output(apply_fn: Callable, params, example, what: str = "outputs"):
  """The output's ShapeDtypeStruct; a clear error when ``apply_fn`` returns no single array."""
  return require_array(jax.eval_shape(apply_fn, params, example), what)


def require_array(out, what: str = "outputs"):
  """``out`` (a traced output's shape) if it is one array; else the error that names it."""
  if not isinstance(out, jax.ShapeDtypeStruct):
    raise ValueError(
        f"apply_fn must return one array of {what}, but it returned {describe(out)}. "
        "Pick the array, e.g. `lambda p, x: apply_fn(p, x)[0]` for a tuple or "
        "`lambda p, x: apply_fn(p, x).logits` for a transformers ModelOutput")
  return out


def _dependence(jaxpr, in_dep, prefix, out: dict) -> list:
  """Marks ``out[(prefix, var)]`` for every var that depends on the example; returns the outvars'."""
  dep = {v for v, d in zip(jaxpr.invars, in_dep) if d}
  for i, eqn in enumerate(jaxpr.eqns):
    ins = [isinstance(v, jcore.Var) and v in dep for v in eqn.invars]
    name = eqn.primitive.name
    if name in ("scan",) or _rules.rule_is_call(name):
      inner, _ = _inner(eqn)
      body_in = list(ins)
      if name == "scan":  # a carry may pick up the example in a later iteration
        n_consts, n_carry = eqn.params["num_consts"], eqn.params["num_carry"]
        for k in range(n_consts, n_consts + n_carry):
          body_in[k] = any(ins)
      outs = _dependence(inner, body_in, prefix + (i,), out)
    else:
      outs = [any(ins)] * len(eqn.outvars)
    for v, d in zip(eqn.outvars, outs):
      if d:
        dep.add(v)
        out[(prefix, v)] = True
  for v in jaxpr.invars:
    if v in dep:
      out[(prefix, v)] = True
  return [isinstance(v, jcore.Var) and v in dep for v in jaxpr.outvars]


def trace(apply_fn: Callable, params, example) -> Plan:
  """Traces ``apply_fn(params, example)`` (a batch of one) and maps parameter uses."""
  leaves, treedef = jax.tree_util.tree_flatten(params)
  fn = lambda ls, x: apply_fn(jax.tree_util.tree_unflatten(treedef, ls), x)
  # one trace gives both the program and the output's shape
  closed, out = jax.make_jaxpr(fn, return_shape=True)([_struct(l) for l in leaves],
                                                      jax.tree_util.tree_map(_struct, example))
  require_array(out)
  uses: dict = {}
  blocked: dict = {}
  n = len(leaves)
  depends: dict = {}
  _dependence(closed.jaxpr, [False] * n + [True] * (len(closed.jaxpr.invars) - n), (), depends)

  block_sites: dict = {}
  top_env: dict = {}

  def block(alias, reason, site=None):
    blocked.setdefault(alias[0], []).append(reason)
    block_sites.setdefault(alias[0], []).append(site)

  def walk(jaxpr, in_alias, prefix):
    env = {v: a for v, a in zip(jaxpr.invars, in_alias) if a is not None}
    if not prefix:
      top_env.update(env)
      env = top_env
    for i, eqn in enumerate(jaxpr.eqns):
      ins = [env.get(v) if isinstance(v, jcore.Var) else None for v in eqn.invars]
      idx = [k for k, a in enumerate(ins) if a is not None]
      if not idx:
        continue
      name = eqn.primitive.name
      site = prefix + (i,)
      rules = {k: _rules.rule(eqn, k) for k in idx}
      live = [k for k in idx if rules[k] != _rules.ZERO]
      if not live:
        continue  # every alias dies here (zero derivative)
      kinds = {rules[k] for k in live}
      if kinds == {_rules.LAYOUT}:
        (k,) = live
        leaf, path = ins[k]
        in_size = math.prod(eqn.invars[0].aval.shape)
        for j, v in enumerate(eqn.outvars):
          # one step per output; a multi-output op (split) keeps output j
          permutes = name in _rules.PERMUTING or in_size == math.prod(v.aval.shape)
          step = ("bind", eqn.primitive, eqn.params) + ((j,) if len(eqn.outvars) > 1 else ())
          env[v] = (leaf, path.then(step, permutes=permutes))
      elif kinds == {_rules.CALL}:
        inner, _ = _inner(eqn)
        call_ins = [a if k in live else None for k, a in enumerate(ins)]
        for v, a in zip(eqn.outvars, walk(inner, call_ins, site)):
          if a is not None:
            env[v] = a
      elif kinds == {_rules.LOOP}:
        inner, _ = _inner(eqn)
        n_consts, n_carry = eqn.params["num_consts"], eqn.params["num_carry"]
        length = eqn.params["length"]
        body_ins = [None] * len(ins)
        for k in live:
          leaf, path = ins[k]
          loops = path.loops + (length,)
          if k < n_consts:
            body_ins[k] = (leaf, path.then(("const", length), loops, permutes=False))
          elif k < n_consts + n_carry:
            block(ins[k], "scan carry", site)
          else:
            body_ins[k] = (leaf, path.then(("xs",), loops))
        for j, a in enumerate(walk(inner, body_ins, site)):
          if a is None:
            continue
          if j < n_carry:
            block(a, "scan carry", site)
          else:  # stacked back as a scan output (nnx.scan returns its state): an alias again
            leaf, path = a
            env[eqn.outvars[j]] = (leaf, path.then(("ys",), path.loops[:-1]))
      elif kinds <= {_rules.LINEAR, _rules.ADDITIVE} and len(live) == 1:
        (k,) = live
        leaf, path = ins[k]
        data = any((prefix, v) in depends for j, v in enumerate(eqn.invars)
                   if j != k and isinstance(v, jcore.Var))
        uses.setdefault(leaf, []).append(Use(leaf, site, eqn, k, path, data))
      else:
        if len(live) > 1 and kinds <= {_rules.LINEAR, _rules.ADDITIVE}:
          reason = f"{name} of two parameter operands"
        elif name == "gather":
          reason = "gather indices"
        else:
          reason = name
        for k in live:
          block(ins[k], reason, site)
    return [env.get(v) if isinstance(v, jcore.Var) else None for v in jaxpr.outvars]

  in_alias = [(i, Path()) for i in range(n)] + [None] * (len(closed.jaxpr.invars) - n)
  for a in walk(closed.jaxpr, in_alias, ()):
    if a is not None:
      block(a, "returned as output")
  return Plan(closed, n, uses, blocked, block_sites, depends, frozenset(top_env))


def _under_loops(f, n: int):
  for _ in range(n):
    f = jax.vmap(f)
  return f


def path_fn(path: Path):
  """The path as a float32 function of the leaf: leaf -> stacked operand [*loops, ...].

  A ``('bind', primitive, params, j)`` step keeps output ``j`` of a
  multi-output op (``split``).
  """

  def f(w):
    n = 0  # loop axes in place so far
    for step in path.steps:
      if step[0] == "bind":
        _, prim, params, *out = step
        if prim.name == "convert_element_type":
          continue  # computed in float32
        bound = lambda x, prim=prim, params=params, out=out: (
            prim.bind(x, **prim.get_bind_params(params))[out[0]] if out else
            prim.bind(x, **prim.get_bind_params(params)))
        w = _under_loops(bound, n)(w)
      elif step[0] == "xs":
        n += 1
      elif step[0] == "ys":  # stacked as a scan output: the loop axis is an array axis again
        n -= 1
      else:  # ("const", length): the same value in every iteration
        w = jnp.broadcast_to(jnp.expand_dims(w, n), w.shape[:n] + (step[1],) + w.shape[n:])
        n += 1
    return w

  return f


def path_transpose(path: Path, leaf_shape):
  """Maps float32 cotangents of the stacked operand back to the leaf (summing copies)."""
  if not any(s[0] not in ("xs", "ys") and not (s[0] == "bind" and s[1].name == "convert_element_type")
             for s in path.steps):
    return lambda g: g
  t = jax.linear_transpose(path_fn(path), jax.ShapeDtypeStruct(leaf_shape, jnp.float32))
  return lambda g: t(g)[0]


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


def looped(use: Use, f):
  """``f`` (one iteration's arrays -> one iteration's result) mapped over the use's loop axes."""
  return _under_loops(f, len(use.loops))


def patchable(use: Use) -> bool:
  """A convolution (grouped or not) whose parameter is the kernel."""
  p = use.eqn.params
  return (use.prim == "conv_general_dilated" and use.operand == 1
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


def evaluate(plan: Plan, leaves, x_leaves, hook, sites, eps=None):
  """Evaluates the traced jaxpr for one example; returns ``(output, captures)``.

  At each use site ``hook(use, invals, out)`` returns what to capture; then
  ``eps[site]`` (if given) is added to the output. Inside a scan, ``eps`` of
  the sites in its body is scanned in along the loop axis and the captures
  are scanned out, so both carry the site's loop axes in front.
  """
  by_site = {u.site: u for u in sites}
  prefixes = {u.site[:k] for u in sites for k in range(1, len(u.site))}
  eps = eps or {}

  def run(jaxpr, consts, args, prefix, eps_here):
    env, caps = {}, {}

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
        inner_eps = {s: e for s, e in eps_here.items() if s[:len(site)] == site}
        if eqn.primitive.name == "scan":
          outs, inner_caps = _run_scan(run, eqn, site, invals, inner_eps)
        else:
          inner, inner_consts = _inner(eqn)
          call = lambda a, e, inner=inner, ic=inner_consts, site=site: run(inner, ic, a, site, e)
          if eqn.primitive.name in ("checkpoint", "remat2"):
            # keep the model's rematerialisation: captures are recomputed too
            call = jax.checkpoint(call, prevent_cse=eqn.params.get("prevent_cse", True),
                                  policy=eqn.params.get("policy"))
          outs, inner_caps = call(invals, inner_eps)
        caps.update(inner_caps)
      else:
        with eqn.ctx.manager:
          outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
        if not eqn.primitive.multiple_results:
          outs = [outs]
        if site in by_site:
          caps[site] = hook(by_site[site], invals, outs[0])
          if site in eps_here:
            outs = [outs[0] + eps_here[site]]
      for v, x in zip(eqn.outvars, outs):
        if not isinstance(v, jcore.DropVar):
          env[v] = x
    return [read(v) for v in jaxpr.outvars], caps

  (out,), caps = run(plan.closed.jaxpr, plan.closed.consts,
                     list(leaves) + list(x_leaves), (), eps)
  return out, caps


def _run_scan(run, eqn, site, invals, eps_here):
  """A scan equation re-run by the interpreter, with eps scanned in and captures out."""
  p = eqn.params
  body, body_consts = _inner(eqn)
  n_consts, n_carry = p["num_consts"], p["num_carry"]
  consts, carry, xs = invals[:n_consts], invals[n_consts:n_consts + n_carry], invals[n_consts + n_carry:]

  def step(c, x):
    xs_t, eps_t = x
    outs, caps = run(body, body_consts, list(consts) + list(c) + list(xs_t), site, eps_t)
    return outs[:n_carry], (outs[n_carry:], caps)

  carry_out, (ys, caps) = jax.lax.scan(step, list(carry), (list(xs), eps_here),
                                       length=p["length"], reverse=p["reverse"],
                                       unroll=p["unroll"])
  return list(carry_out) + list(ys), caps
