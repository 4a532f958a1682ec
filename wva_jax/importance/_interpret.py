"""Re-evaluates a traced jaxpr (``_trace.trace``) for one example, recording use sites and perturbing them.

At each use site the interpreter can (a) record the operands of the
equation and (b) add a perturbation ``eps`` to its output, so that
``d loss / d eps`` is the cotangent at that output. Calls are entered (a
``checkpoint`` keeps its rematerialisation) and scans re-run as scans, with
``eps`` scanned in and the captures scanned out.
"""
from __future__ import annotations

import jax
from jax.extend import core as jcore

from wva_jax.importance import _rules
from wva_jax.importance._trace import _inner
from wva_jax.importance._uses import Plan


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
        entry = _rules.entry(eqn.primitive.name)
        if entry.treatment is _rules.LOOP:
          outs, inner_caps = _run_scan(run, eqn, site, invals, inner_eps)
        else:
          inner, inner_consts = _inner(eqn)
          call = lambda a, e, inner=inner, ic=inner_consts, site=site: run(inner, ic, a, site, e)
          if entry.remat:
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
