"""Reads a model's jaxpr to find where each parameter enters it: :func:`trace` builds the ``_uses.Plan``.

The factored importance engine and SIG need, for every parameter leaf, the
primitives that consume it (a ``dot_general`` for a Dense kernel, a
``conv_general_dilated`` for a Conv kernel, an ``add`` for a bias, a
``gather`` and a ``dot_general`` for a tied embedding...) and, at run time,
those primitives' other operands and outputs. Nothing in the model is
rewritten: ``apply_fn`` is traced once on a batch of ONE example and the
resulting jaxpr is re-evaluated by a small interpreter
(``_interpret.evaluate``) that can (a) record the operands of chosen
equations and (b) add a perturbation ``eps`` to their outputs, so that
``d loss / d eps`` is the cotangent at that output.

Tracing one example (and ``vmap``-ing the interpreter over a chunk) makes the
example axis explicit everywhere: every captured array gets a leading chunk
axis that is the example axis, whatever the model does with its batch axis.

How each primitive is treated is decided in one place, ``_rules.REGISTRY``. A
``scan`` (layers stacked along a leading axis: ``nnx.scan``, ``nn.scan``,
``hk.layer_stack``, ``lax.scan``) is entered: a use inside its body gets
leading "loop" axes (one per enclosing scan), its ``eps`` is scanned in with
the layer slices and its captures are scanned out, so the per-layer work
happens inside the model's own scan.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

from wva_jax.importance import _hoist, _rules
from wva_jax.importance._model_io import require_array
from wva_jax.importance._uses import Path, Plan, Use


def _inner(eqn):
  """(jaxpr, consts) of a call or scan equation's body."""
  j = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
  if isinstance(j, jcore.ClosedJaxpr):
    return j.jaxpr, j.consts
  return j, ()


def _struct(x):
  return jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))


def _dependence(jaxpr, in_dep, prefix, out: dict) -> list:
  """Marks ``out[(prefix, var)]`` for every var that depends on the example; returns the outvars'."""
  dep = {v for v, d in zip(jaxpr.invars, in_dep) if d}
  for i, eqn in enumerate(jaxpr.eqns):
    ins = [isinstance(v, jcore.Var) and v in dep for v in eqn.invars]
    name = eqn.primitive.name
    treatment = _rules.entry(name).treatment
    if treatment in (_rules.LOOP, _rules.CALL):
      inner, _ = _inner(eqn)
      body_in = list(ins)
      if treatment is _rules.LOOP:  # a carry may pick up the example in a later iteration
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
  # parameter-only work under remat / jit / in a scan's constants, moved to the top level where
  # _transforms.split finds it (an equivalent program: same values, same derivatives)
  closed = _hoist.hoist(closed, len(leaves))
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
          permutes = _rules.permutes(name, in_size, math.prod(v.aval.shape))
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
        elif _rules.entry(name).factor is _rules.Factor.ROWS:
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
