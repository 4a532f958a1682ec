"""Hoists parameter-only computation out of calls and loops, so transforms are seen at the top level.

``_transforms.split`` treats the part of a model that reads parameters and no
example (``softplus(a)``, ``sigmoid(g)``, a weight norm) as a prologue whose
VJP carries per-example gradients back to the leaves. It looks at the top
level of the jaxpr only; the same transforms written under ``jax.checkpoint``
(Flax's ``nn.remat``, RecurrentGemma's default), inside a ``jit``-wrapped
function or inside a scan body (a recurrent cell's gate computed from a
closed-over parameter at every step) would take the per-leaf fallback.

This pass rewrites the traced jaxpr, before anything reads it, into an
equivalent one: in each ``jit``/``remat`` call that reads the example, the
equations that read no example move out in front of the call and their
results enter it as new inputs; in each scan, the equations that read only
the scan's constants (loop invariants) and no example move out in front and
enter as new constants. Values and derivatives are unchanged; what moves out
is computed once instead of being rematerialised or recomputed per
iteration (parameter-sized values). A scan's per-layer slices (its ``xs``)
stay inside: their transforms differ per iteration.
"""
from __future__ import annotations

from jax.extend import core as jcore

CALLS = ("jit", "remat2")
LOOPS = ("scan",)


def hoist(closed: jcore.ClosedJaxpr, n_leaves: int) -> jcore.ClosedJaxpr:
  """``closed`` (params first, then the example's inputs) with parameter-only work moved to the top."""
  dep_in = [False] * n_leaves + [True] * (len(closed.jaxpr.invars) - n_leaves)
  jaxpr = _level(closed.jaxpr, dep_in)
  return closed if jaxpr is closed.jaxpr else jcore.ClosedJaxpr(jaxpr, closed.consts)


def _is_var(v) -> bool:
  return isinstance(v, jcore.Var) and not isinstance(v, jcore.DropVar)


def _level(jaxpr: jcore.Jaxpr, dep_in: list[bool]) -> jcore.Jaxpr:
  """One jaxpr level: each call or loop that reads the example gives up its example-free equations."""
  dep = {v for v, d in zip(jaxpr.invars, dep_in) if d}
  out_eqns: list = []
  changed = False
  for eqn in jaxpr.eqns:
    ins = [_is_var(v) and v in dep for v in eqn.invars]
    name = eqn.primitive.name
    if any(ins) and name in CALLS + LOOPS and not eqn.effects:
      new = _hoist_call(eqn, ins) if name in CALLS else _hoist_loop(eqn, ins)
    else:
      new = None
    if new is None:
      out_eqns.append(eqn)
    else:
      out_eqns += new
      changed = True
      eqn = new[-1]
    if any(ins):
      dep.update(v for v in eqn.outvars if _is_var(v))
  return jaxpr.replace(eqns=out_eqns) if changed else jaxpr


def _split(inner: jcore.Jaxpr, free: list[bool]) -> tuple[list, list, list]:
  """Inner equations that read only ``free`` invars (and each other), those that do not, and the
  values the first set hands to the second (or to the outputs): ``(pure, rest, frontier)``."""
  ok = {v for v, f in zip(inner.invars, free) if f}
  pure, rest = [], []
  for e in inner.eqns:
    reads = [v for v in e.invars if _is_var(v)]
    if not e.effects and e.primitive.name not in LOOPS and all(v in ok for v in reads):
      pure.append(e)
      ok.update(v for v in e.outvars if _is_var(v))
    else:
      rest.append(e)
  made = {v for e in pure for v in e.outvars if _is_var(v)}
  frontier: list = []
  for e in rest:
    frontier += [v for v in e.invars if _is_var(v) and v in made and v not in frontier]
  frontier += [v for v in inner.outvars if _is_var(v) and v in made and v not in frontier]
  return pure, rest, frontier


def _moved_out(pure: list, inner_invars: list, outer_invars: list, frontier: list) -> tuple[list, list]:
  """The pure equations rewritten to read the call's outer operands instead of its invars, with fresh
  output vars (one body may serve several calls: each gets its own copies), and the frontier's new names."""
  sub = dict(zip(inner_invars, outer_invars))
  moved = []
  for e in pure:
    outs = [jcore.Var(v.aval) if _is_var(v) else v for v in e.outvars]
    sub.update((v, o) for v, o in zip(e.outvars, outs) if _is_var(v))
    moved.append(e.replace(invars=[sub.get(v, v) if _is_var(v) else v for v in e.invars], outvars=outs))
  return moved, [sub[v] for v in frontier]


def _rebuilt_body(inner: jcore.Jaxpr, rest: list, frontier: list, at: int) -> tuple[jcore.Jaxpr, list]:
  """The body without the moved equations, reading the frontier as new invars inserted at ``at``."""
  fresh = [jcore.Var(v.aval) for v in frontier]
  sub = dict(zip(frontier, fresh))
  swap = lambda vs: [sub.get(v, v) if _is_var(v) else v for v in vs]
  eqns = [e.replace(invars=swap(e.invars)) for e in rest]
  invars = list(inner.invars[:at]) + fresh + list(inner.invars[at:])
  return inner.replace(invars=invars, eqns=eqns, outvars=swap(inner.outvars)), fresh


def _hoist_call(eqn, ins: list[bool]):
  closed = eqn.params["jaxpr"]
  inner = closed.jaxpr if isinstance(closed, jcore.ClosedJaxpr) else closed
  if inner.constvars:
    return None
  inner = _level(inner, ins)   # nested calls first: their free parts come up to this body
  pure, rest, frontier = _split(inner, [not d for d in ins])
  if not pure or not frontier:
    if inner is (closed.jaxpr if isinstance(closed, jcore.ClosedJaxpr) else closed):
      return None
    return [eqn.replace(params={**eqn.params, "jaxpr": _wrap(closed, inner)})]
  body, _ = _rebuilt_body(inner, rest, frontier, len(inner.invars))
  params = {**eqn.params, "jaxpr": _wrap(closed, body)}
  k = len(frontier)
  if eqn.primitive.name == "jit":
    unspecified = [s for s in params["in_shardings"] if type(s).__name__ == "UnspecifiedValue"]
    if not unspecified:   # every input placed by hand: leave the call as it is
      return None
    params["in_shardings"] = tuple(params["in_shardings"]) + (unspecified[0],) * k
    params["in_layouts"] = tuple(params["in_layouts"]) + (None,) * k
    params["donated_invars"] = tuple(params["donated_invars"]) + (False,) * k
  moved, outer = _moved_out(pure, inner.invars, eqn.invars, frontier)
  return moved + [eqn.replace(invars=list(eqn.invars) + outer, params=params)]


def _hoist_loop(eqn, ins: list[bool]):
  closed = eqn.params["jaxpr"]
  inner = closed.jaxpr
  n_consts = eqn.params["num_consts"]
  if inner.constvars or closed.consts:
    return None
  # loop invariants: what reads only the scan's constants that carry no example
  free = [k < n_consts and not ins[k] for k in range(len(inner.invars))]
  pure, rest, frontier = _split(inner, free)
  if not pure or not frontier:
    return None
  body, _ = _rebuilt_body(inner, rest, frontier, n_consts)
  k = len(frontier)
  params = {**eqn.params, "jaxpr": jcore.ClosedJaxpr(body, closed.consts), "num_consts": n_consts + k}
  if "linear" in params:   # older JAX keeps a flag per operand
    linear = tuple(params["linear"])
    params["linear"] = linear[:n_consts] + (False,) * k + linear[n_consts:]
  moved, outer = _moved_out(pure, inner.invars, eqn.invars, frontier)
  invars = list(eqn.invars[:n_consts]) + outer + list(eqn.invars[n_consts:])
  return moved + [eqn.replace(invars=invars, params=params)]


def _wrap(closed, inner):
  return jcore.ClosedJaxpr(inner, closed.consts) if isinstance(closed, jcore.ClosedJaxpr) else inner
