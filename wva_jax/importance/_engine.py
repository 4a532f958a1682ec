"""Dispatch of per-example gradient reductions to the fastest correct path.

``gradient_sums`` computes ``sum_b valid_b sum_k R(J_b^T c_{b,k})`` (see
``_per_example.per_example_sum``, the reference) with ``R`` = square or abs.

``engine='vmap'`` is the chunked ``vmap(vjp)`` reference: it materialises
every per-example gradient of every parameter. ``engine='factored'`` (the
``'auto'`` default) avoids that for the parameters it can see in the model's
jaxpr (``_trace.trace``, rules in ``_rules``), with no model rewrite and no
loss registration:

* dense (a ``dot_general`` used once, one position per example): the
  per-example gradient is the outer product ``x_b d_b^T`` of the layer input
  and the output cotangent, so ``sum_b R(x_b d_b^T) = R(X)^T R(D)``: ONE
  matmul per layer for the whole chunk, and for K cotangents
  ``R(X)^T sum_k R(D_k)``. Inside a scan, one such matmul per layer slice.
* everything else it can see (dense over positions (tokens), conv, bias,
  scale (``mul``), embedding (``gather``), a leaf used by several ops (a
  tied embedding: ``gather`` + ``attend``), a leaf closed over by a scan
  body): the per-example gradient of that leaf alone is formed from each
  use's recorded operands and output cotangent by one batched contraction
  over the example's positions (the op's VJP in the parameter, under
  ``vmap``; for a convolution, input patches from strided slices times
  ``D``), the uses' contributions summed (mapped back through the layout
  ops and scans between the leaf and each use), then reduced. Never one
  backward pass per example.
* fallback (a parameter the rules cannot see through: a nonlinear function
  of it, a custom VJP, a ``while`` loop...): per-example gradients of those
  leaves only, through the same backward pass; a ``FallbackWarning`` names
  them once per trace.

``X`` is recorded during the forward pass and ``D`` comes from the same
backward pass as the fallback gradients: a zero perturbation ``eps`` is added
to each factored op's output and the summed cotangent is pulled back to
``eps``. The forward pass runs once per chunk, then K backward passes.
"""
from __future__ import annotations

import dataclasses
import enum
import warnings
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from wva_jax.importance import _independence, _interpret, _model_io, _trace, _transforms, _use_grads, _uses
from wva_jax.importance._mesh import on_auto_axes
from wva_jax.importance._per_example import (
  DEFAULT_CHUNK_SIZE,
  chunked,
  num_examples,
  per_example_sum,
  reducer,
  resolve_chunk_size,
  scan_chunks,
)
from wva_jax.importance._reductions import _outer_sum, _per_example_reduce
from wva_jax.importance._rules import Factor
from wva_jax.importance._transforms import _transform_pullback

ENGINES = ("auto", "factored", "vmap")
# Chunk when every factored parameter is a one-position dense layer or a
# bias: memory per example is then a few activations, so chunks can be big.
DENSE_CHUNK_SIZE = 1024


class FallbackWarning(UserWarning):
  """Some parameter leaves leave the factored engine's fast path.

  Their per-example gradients are then formed by ``vjp`` (exact, but slower
  and chunk_size times their size in memory). Silence it with
  ``warnings.simplefilter('ignore', wj.importance.FallbackWarning)``.
  """


class How(enum.Enum):
  """The path a parameter leaf takes through the engine."""
  OUTER = "outer"  # one dense use, one position per example: one matmul R(X)^T R(D) per chunk
  PER_EXAMPLE = "per-example"  # per-example gradient of the leaf alone, from its uses' captures
  TRANSFORM = "transform"  # read through a parameter transform: pulled back through its VJP
  FALLBACK = "fallback"  # per-example vjp restricted to the leaf
  UNUSED = "unused"  # zero (a float leaf no output depends on, or an integer leaf)


@dataclasses.dataclass(frozen=True)
class LeafRoute:
  """One leaf's path, and what ``engine_report`` says about it (:attr:`label`)."""
  how: How
  uses: tuple = ()  # the label of each use ('dense', 'dense/positions', 'conv', 'bias'...)
  scan: bool = False  # used inside a scan (per layer slice or per iteration)
  reason: str = ""  # FALLBACK: the op it cannot be followed through; TRANSFORM: the transform's op;
  # UNUSED: 'integer' for an integer leaf

  @property
  def label(self) -> str:
    if self.how is How.FALLBACK:
      return f"fallback: used by {self.reason}"
    if self.how is How.TRANSFORM:
      return f"transform ({self.reason})"
    if self.how is How.UNUSED:
      return f"unused ({self.reason})" if self.reason else "unused"
    label = self.uses[0] if len(self.uses) == 1 else "shared: " + " + ".join(self.uses)
    return label + (" (scan)" if self.scan else "")

  @property
  def factored(self) -> bool:
    """On the fast path: its gradients come from the recorded operands and cotangents."""
    return self.how in (How.OUTER, How.PER_EXAMPLE)


def _use_label(u) -> str:
  if u.factor is Factor.MATMUL:
    return "dense" if _use_grads.positions(u) == 1 else "dense/positions"
  return u.kind


def _outer(uses) -> bool:
  """One dense use with one position per example, reached through a permutation."""
  if len(uses) != 1:
    return False
  (u,) = uses
  return u.factor is Factor.MATMUL and _use_grads.positions(u) == 1 and u.path.permutes


def _classify(plan, leaves) -> list[LeafRoute]:
  """The route of each leaf of ``plan``."""
  out = []
  for i, leaf in enumerate(leaves):
    uses = plan.uses.get(i, [])
    blocked = plan.blocked.get(i, [])
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
      out.append(LeafRoute(How.UNUSED, reason="integer"))  # no gradient: zeros
    elif blocked:
      out.append(LeafRoute(How.FALLBACK, reason=blocked[0]))
    elif not uses:
      out.append(LeafRoute(How.UNUSED))
    else:
      outer = _outer(uses)
      # a lone dense use off the one-matmul path (positions, or a non-permuting layout on the
      # way) has its per-example gradient formed over positions
      lone_dense = len(uses) == 1 and uses[0].factor is Factor.MATMUL and not outer
      labels = ("dense/positions",) if lone_dense else tuple(_use_label(u) for u in uses)
      out.append(LeafRoute(How.OUTER if outer else How.PER_EXAMPLE, labels, any(u.loops for u in uses)))
  return out


@dataclasses.dataclass(frozen=True)
class Route:
  """How the engine runs a model: its plan, the leaves it sees, each leaf's route.

  With parameter transforms (``_transforms``) the plan is the split model
  ``G``'s, whose leaves are the model's followed by the transforms' outputs.
  """
  plan: Any
  kinds: list[LeafRoute]  # per leaf of the plan (G's leaves with a split)
  split: Any  # _transforms.Split or None
  report: list[LeafRoute]  # per leaf of the model


def _plan(apply_fn, params, inputs) -> Route:
  leaves = jax.tree_util.tree_leaves(params)
  example = jax.tree_util.tree_map(lambda a: jnp.asarray(a)[:1], inputs)
  plan = _trace.trace(apply_fn, params, example)
  kinds = _classify(plan, leaves)
  split = _transforms.split(plan)
  if split is None:
    return Route(plan, kinds, None, kinds)
  structs = [jax.ShapeDtypeStruct(jnp.shape(l), jnp.result_type(l)) for l in leaves] + list(split.frontier)
  g_plan = _trace.trace(lambda ls, x: split.model(ls, jax.tree_util.tree_leaves(x)), structs, example)
  g_kinds = _classify(g_plan, structs)
  report = [LeafRoute(How.TRANSFORM, reason=split.reasons[i])
            if i in split.reasons and g_kinds[i].how is not How.FALLBACK else g_kinds[i]
            for i in range(len(leaves))]
  return Route(g_plan, g_kinds, split, report)


def engine_report(apply_fn, params, inputs) -> dict[str, str]:
  """Which path the factored engine takes for each parameter leaf: the pre-flight check.

  It runs the checks every estimator runs first, so a model it accepts is one
  the estimators accept: one array of outputs, a float parameter that reaches
  them, and the batch-independence probe (a ``ValueError`` naming the
  operation when ``outputs[b]`` depends on other examples).

  Args:
    apply_fn: ``apply_fn(params, inputs) -> outputs``, batched, with
      ``outputs[b]`` depending on ``inputs[b]`` only.
    params: the parameter pytree.
    inputs: a batch (the probe changes its first examples; the paths are
      traced on its first example).

  Returns:
    ``{'layers/0/kernel': 'dense', ...}``. Paths: ``'dense'`` (one matmul of
    ``R(X)^T R(D)``), ``'dense/positions'``, ``'conv'``, ``'bias'``,
    ``'scale'``, ``'embedding'`` (per-example gradient of that leaf alone, by
    one batched contraction over positions), ``'shared: a + b'`` (a leaf used
    by several ops, e.g. a tied embedding: the uses' per-example gradients
    summed), a ``' (scan)'`` suffix for a leaf used inside a scan (per layer
    slice, inside the scan), ``'unused'`` (zero) and ``'fallback: <reason>'``
    (per-example ``vjp`` restricted to that leaf).

  Example:
    >>> import jax.numpy as jnp
    >>> params = {'w': jnp.ones((3, 2)), 'b': jnp.zeros(2)}
    >>> engine_report(lambda p, x: x @ p['w'] + p['b'], params, jnp.ones((4, 3)))
    {'b': 'bias', 'w': 'dense'}
  """
  num_examples(inputs)
  labels: list[str] = []

  @on_auto_axes(("params", "inputs"), lambda specs: PartitionSpec())
  def run(params, inputs):   # traced under auto_axes on an Explicit mesh: the labels are collected then
    check_model(apply_fn, params, inputs)
    labels.extend(r.label for r in _plan(apply_fn, params, inputs).report)
    return jnp.zeros((), jnp.float32)

  jax.block_until_ready(run(params, inputs))   # a traced probe raises when its result is ready
  return dict(zip(_model_io.leaf_paths(params), labels))


def check_model(apply_fn, params, inputs, what: str = "outputs", probe: bool | int = True):
  """One array of outputs, per example: the contract every estimator relies on."""
  example = jax.tree_util.tree_map(lambda a: jnp.asarray(a)[:1], inputs)
  out = _model_io.check_output(apply_fn, params, example, what)
  _independence.check(apply_fn, params, inputs, probe)
  return out


def _warn_fallback(params, routes):
  names = _model_io.leaf_paths(params)
  slow = [(n, r.reason) for n, r in zip(names, routes) if r.how is How.FALLBACK]
  if slow:
    listed = ", ".join(f"{n!r} ({why})" for n, why in slow[:8])
    more = f" and {len(slow) - 8} more" if len(slow) > 8 else ""
    warnings.warn(
        f"{len(slow)} parameter leaves leave the fast path of the importance engine and get "
        f"per-example gradients by vjp (exact, slower, more memory): {listed}{more}. "
        "See wj.importance.engine_report; silence with "
        "warnings.simplefilter('ignore', wj.importance.FallbackWarning)",
        FallbackWarning, stacklevel=4)


def gradient_sums(apply_fn, params, inputs, cot_fn, extras=None, *, reduce="square",
                  chunk_size=None, engine="auto", value_fn=None):
  """``sum_b valid_b * sum_k R(J_b^T c_{b,k})`` as a float32 pytree like ``params``.

  Same contract as ``per_example_sum`` (the caller divides by the number of
  examples); ``engine`` is ``'auto'`` (= ``'factored'``), ``'factored'`` or
  ``'vmap'`` (the reference path).

  With ``value_fn(outputs_chunk, extras_chunk) -> [chunk]`` (factored engine
  only) it returns ``(sums, plain, value)``: also the unreduced sums
  ``plain = sum_b valid_b sum_k J_b^T c_{b,k}`` (R = identity: for one
  cotangent, the gradient of ``sum_b <c_b, f(x_b)>``) from the same backward
  pass (``X^T D`` beside ``R(X)^T R(D)`` for dense layers), and
  ``value = sum_b valid_b value_fn(...)_b`` (e.g. the loss) from the same
  forward pass.
  """
  if engine not in ENGINES:
    raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
  if value_fn is not None and engine == "vmap":
    raise ValueError("value_fn needs the factored engine (engine='auto')")
  if engine == "vmap":
    return per_example_sum(apply_fn, params, inputs, cot_fn, extras, reduce=reduce,
                           chunk_size=chunk_size)
  R = reducer(reduce)
  # the reductions formed in one pass: R, and the identity for value_fn's gradient
  Rs = [R] if value_fn is None else [R, lambda a: a.astype(jnp.float32)]
  n = num_examples(inputs)
  route = _plan(apply_fn, params, inputs)
  plan, kinds, split = route.plan, route.kinds, route.split
  _warn_fallback(params, route.report)
  treedef = jax.tree_util.tree_structure(params)
  leaves = jax.tree_util.tree_leaves(params)
  n_leaves = len(leaves)
  # Leaves whose per-example gradients must be summed over paths before R:
  # the transforms' outputs (frontier) and the leaves the transforms read.
  pulled, pullback_f = (), None
  if split is not None:
    frontier, pullback_f, pulled = _transform_pullback(split, leaves)
    leaves = leaves + frontier
  joint = set(pulled) | set(range(n_leaves, len(leaves)))
  shapes = [jnp.shape(l) for l in leaves]
  fallback = [i for i, r in enumerate(kinds) if r.how is How.FALLBACK]
  factored = [i for i, r in enumerate(kinds) if r.factored]
  # one matmul R(X)^T R(D) per layer (per layer slice inside a scan); a leaf the transforms'
  # pullback also reaches needs its per-example gradient, summed over paths before R
  outer_leaves = [i for i in factored if kinds[i].how is How.OUTER and i not in joint]
  per_ex_leaves = [i for i in factored if i not in outer_leaves]
  fallback_joint = [j for j, i in enumerate(fallback) if i in joint]
  # what _per_example_reduce returns: the per-example leaves, then the pulled-back ones
  ex_out = [i for i in per_ex_leaves if i not in joint] + list(pulled)
  sites = plan.sites(factored)
  small = not fallback and split is None and all(
      kinds[i].how is How.OUTER or all(u.additive for u in plan.uses[i]) for i in factored)
  chunk = resolve_chunk_size(chunk_size, n, DENSE_CHUNK_SIZE if small else DEFAULT_CHUNK_SIZE)
  back = {u.site: _uses.path_transpose(u.path, shapes[u.leaf]) for u in sites}
  (x_chunks, e_chunks), valid = chunked((inputs, extras), n, chunk)
  f32 = lambda a: a.astype(jnp.float32)

  def one_example(x_leaves, eps, pf):
    ls = list(leaves)
    for j, i in enumerate(fallback):
      ls[i] = pf[j]

    def hook(u, invals, out):
      if u.additive:  # an add's derivative needs none of its operands
        return None
      return [None if k == u.operand else a for k, a in enumerate(invals)]

    return _interpret.evaluate(plan, ls, [a[None] for a in x_leaves], hook, sites, eps)

  def use_grad(u, cap, d, patches):
    """One example's gradient of the leaf through use ``u``, in the leaf's layout."""
    if u.additive:
      g = _uses.looped(u, lambda db: _use_grads.operand_grad(u, None, db))(d)
    elif patches is not None:
      g = _uses.looped(u, lambda pb, db: _use_grads.conv_kernel_grad(u, pb, db))(patches, d)
    elif _use_grads.closed_over(u):  # already summed over the loop, in the leaf's layout
      return _use_grads.closed_over_grad(u, cap, d, shapes[u.leaf])
    else:
      g = _uses.looped(u, lambda ob, db: _use_grads.operand_grad(u, ob, db))(cap, d)
    return back[u.site](g)

  def body(chunk_data):
    x, e, v = chunk_data
    acc = [jnp.zeros(s, jnp.float32) for s in shapes]
    eps0 = {u.site: jnp.zeros((chunk,) + u.loops + u.eqn.outvars[0].aval.shape,
                              u.eqn.outvars[0].aval.dtype) for u in sites}
    pf0 = [jnp.broadcast_to(leaves[i], (chunk,) + shapes[i]) for i in fallback]
    fwd = lambda eps, pf: jax.vmap(one_example)(jax.tree_util.tree_leaves(x), eps, pf)
    out, pullback, caps = jax.vjp(fwd, eps0, pf0, has_aux=True)
    cots = cot_fn(out[:, 0], e)
    cots = cots * v.reshape((1, chunk) + (1,) * (cots.ndim - 2))
    cots = cots.astype(out.dtype)[:, :, None]

    # patches of each conv's input: computed once, shared by the K directions
    patches = {u.site: jax.vmap(_uses.looped(u, lambda ob, u=u: _use_grads.conv_patches(u, ob[0])))(
        caps[u.site]) for i in per_ex_leaves for u in plan.uses[i] if _use_grads.patchable(u)}

    def finish(gs, extra):
      """One example's gradients of the ex_out leaves, the transforms' VJP applied."""
      if pullback_f is None:
        return gs
      direct = dict(zip(per_ex_leaves, gs))
      for j, e in zip(fallback_joint, extra):
        direct[fallback[j]] = f32(e)
      pulled_g = pullback_f([direct.get(k) for k in range(n_leaves, len(leaves))])
      return ([direct[i] for i in per_ex_leaves if i not in joint]
              + [p + direct[i] if i in direct else p for i, p in zip(pulled, pulled_g)])

    def per_direction(c):
      d, g = pullback(c)
      outer_r = {plan.uses[i][0].site: [r(f32(d[plan.uses[i][0].site])) for r in Rs] for i in outer_leaves}
      sums = [[r(f32(gi)).sum(0) for r in Rs] for gi in g]
      ex = _per_example_reduce(per_ex_leaves, plan, use_grad, Rs, [shapes[i] for i in ex_out], caps, d,
                               patches, [g[j] for j in fallback_joint], finish)
      return outer_r, sums, ex

    def step(carry, c):
      return jax.tree_util.tree_map(jnp.add, carry, per_direction(c)), None

    if cots.shape[0] == 1:
      outer_r, sums, ex = per_direction(cots[0])
    else:
      init = jax.tree_util.tree_map(jnp.zeros_like, jax.eval_shape(per_direction, cots[0]))
      (outer_r, sums, ex), _ = jax.lax.scan(step, init, cots)
    out_acc = []
    for r_idx, r in enumerate(Rs):
      acc = [jnp.zeros(s, jnp.float32) for s in shapes]
      for j, i in enumerate(fallback):
        if i not in joint:
          acc[i] = acc[i] + sums[j][r_idx]
      for i, s in zip(ex_out, ex):
        acc[i] = acc[i] + s[r_idx]
      for i in outer_leaves:
        (u,) = plan.uses[i]
        acc[i] = acc[i] + back[u.site](_outer_sum(u, r, caps[u.site], outer_r[u.site][r_idx]))
      out_acc.append(acc)
    if value_fn is None:
      return out_acc[0]
    value = (value_fn(out[:, 0], e).astype(jnp.float32) * v).sum()
    return out_acc, value

  init = [jnp.zeros(s, jnp.float32) for s in shapes]
  unflat = lambda a: jax.tree_util.tree_unflatten(treedef, a[:n_leaves])
  if value_fn is None:
    return unflat(scan_chunks(body, init, (x_chunks, e_chunks, valid)))
  (acc, plain), value = scan_chunks(body, ([init, init], jnp.zeros((), jnp.float32)), (x_chunks, e_chunks, valid))
  return unflat(acc), unflat(plain), value
