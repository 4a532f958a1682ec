"""Parameter transforms: the part of a model that reads parameters and no example.

A model may compute its effective weights before it meets the data:
``tanh(w)``, a weight norm ``g * v / ||v||``, a merged ``W + A @ B``, a
straight-through fake-quant or a gradient scaling written as a
``custom_jvp`` / ``custom_vjp``. The walk of ``_trace.trace`` cannot see
through such an op (it is not linear in one parameter), and differentiating
its body would ignore a custom rule. Instead the model is split in two::

    F: leaves -> frontier            (parameters only: the transforms)
    G: (leaves, frontier, x) -> out  (the model, the frontier as new leaves)

The frontier is every value computed by the transforms that the rest of the
model reads. ``G`` goes through the fast path like any model (the frontier
values are plain leaves there, e.g. a Dense kernel), giving each example's
gradient ``g_b`` at the frontier; the leaves' per-example gradients are then
``vjp(F)(g_b)`` (chain rule; JAX's own VJP of the transforms, custom rules
included) plus what ``G`` gives them directly, reduced afterwards. The cost
is one per-example VJP of the transforms, which read no data.

Only the top level of the model's jaxpr is split; ``_hoist`` has already
moved the parameter-only work of ``jit``/``remat`` calls and the loop
invariants of scans there. A transform of a scan's per-layer slices keeps
the general per-leaf path.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

from wva_jax.importance import _uses


@dataclasses.dataclass(frozen=True)
class Split:
  prologue: Callable  # F: list of leaves -> list of frontier values
  model: Callable  # G: (leaves + frontier, x_leaves) -> output
  frontier: tuple  # ShapeDtypeStructs of the frontier values
  inputs: tuple  # indices of the leaves F reads (their gradients need F's VJP)
  reasons: dict  # leaf -> the op that made it a transform


def _read(env, v):
  return v.val if isinstance(v, jcore.Literal) else env[v]


def _run(eqns, env):
  """Binds ``eqns`` in order on the values in ``env`` (updated in place)."""
  for eqn in eqns:
    with eqn.ctx.manager:
      outs = eqn.primitive.bind(*[_read(env, v) for v in eqn.invars],
                                **eqn.primitive.get_bind_params(eqn.params))
    if not eqn.primitive.multiple_results:
      outs = [outs]
    for v, x in zip(eqn.outvars, outs):
      if not isinstance(v, jcore.DropVar):
        env[v] = x


def _needed(eqns, outvars, given=frozenset()) -> list:
  """The equations needed to compute ``outvars`` when the vars in ``given`` are known."""
  need = {v for v in outvars if isinstance(v, jcore.Var) and v not in given}
  keep = []
  for eqn in reversed(eqns):
    if any(v in need for v in eqn.outvars):
      keep.append(eqn)
      need.update(v for v in eqn.invars if isinstance(v, jcore.Var) and v not in given)
  return keep[::-1]


def split(plan: _uses.Plan) -> Split | None:
  """The transform / model split of a traced model; ``None`` if no leaf needs it."""
  jaxpr, n = plan.closed.jaxpr, plan.n_leaves
  eqns = jaxpr.eqns
  example = lambda v: isinstance(v, jcore.Var) and ((), v) in plan.depends
  param_only = [not any(example(v) for v in e.invars) for e in eqns]
  # seeds: top-level, parameter-only equations at which (or inside which: jnp.where is a
  # jit of select_n) the walk stopped a leaf
  seeds: set = set()
  reasons: dict = {}  # leaf -> the op that made it a transform
  for leaf, sites in plan.block_sites.items():
    for site, reason in zip(sites, plan.blocked[leaf]):
      if site is not None and param_only[site[0]]:
        seeds.add(site[0])
        reasons.setdefault(leaf, reason)
  if not seeds:
    return None
  # everything computed from a seed's outputs without reading the example
  tainted: set = set()
  inside = set()  # equations of F
  for i, e in enumerate(eqns):
    if i in seeds or (param_only[i] and any(isinstance(v, jcore.Var) and v in tainted for v in e.invars)):
      inside.add(i)
      tainted.update(v for v in e.outvars if not isinstance(v, jcore.DropVar))
  frontier = []
  for i, e in enumerate(eqns):
    if i not in inside:
      frontier += [v for v in e.invars if isinstance(v, jcore.Var) and v in tainted and v not in frontier]
  frontier += [v for v in jaxpr.outvars if isinstance(v, jcore.Var) and v in tainted and v not in frontier]
  f_eqns = _needed(eqns, frontier)
  reads = {v for e in f_eqns for v in e.invars if isinstance(v, jcore.Var)}
  leaf_vars = jaxpr.invars[:n]
  inputs = tuple(i for i, v in enumerate(leaf_vars) if v in reads)
  g_eqns = _needed(eqns, jaxpr.outvars, frozenset(frontier))
  consts = dict(zip(jaxpr.constvars, plan.closed.consts))

  def prologue(leaves):
    env = dict(consts)
    env.update(zip(leaf_vars, leaves))
    _run(f_eqns, env)
    return [env[v] for v in frontier]

  def model(g_leaves, x_leaves):
    env = dict(consts)
    env.update(zip(leaf_vars, g_leaves[:n]))
    env.update(zip(frontier, g_leaves[n:]))
    env.update(zip(jaxpr.invars[n:], x_leaves))
    _run(g_eqns, env)
    (out,) = [_read(env, v) for v in jaxpr.outvars]
    return out

  for i in inputs:  # read by F through a layout op or a constant-operand use
    reasons.setdefault(i, "a parameter transform")
  shapes = tuple(jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in frontier)  # type: ignore[attr-defined]
  return Split(prologue, model, shapes, inputs, reasons)


def _transform_pullback(split, leaves):
  """The transforms' outputs, and one example's map from their gradients to the leaves'.

  Returns ``(frontier, pullback, pulled)``: ``pullback(grads)`` (one float32
  gradient or ``None`` per frontier value) gives float32 gradients of the
  leaves ``pulled`` (the float leaves the transforms read), by JAX's VJP of
  the transforms (custom rules included), linearised once.
  """
  pulled = tuple(i for i in split.inputs if jnp.issubdtype(jnp.result_type(leaves[i]), jnp.inexact))
  fl = [k for k, s in enumerate(split.frontier) if jnp.issubdtype(s.dtype, jnp.inexact)]

  def f(ts):
    ls = list(leaves)
    for i, t in zip(pulled, ts):
      ls[i] = t
    out = split.prologue(ls)
    return [out[k] for k in fl]

  frontier = split.prologue(list(leaves))
  _, vjp = jax.vjp(f, [leaves[i] for i in pulled])

  def pullback(grads):
    # cotangents in the transforms' output dtype, as autodiff of the model has them
    cts = [jnp.zeros(split.frontier[k].shape, split.frontier[k].dtype) if grads[k] is None
           else grads[k].astype(split.frontier[k].dtype) for k in fl]
    (gs,) = vjp(cts)
    return [g.astype(jnp.float32) for g in gs]

  return frontier, pullback, pulled
