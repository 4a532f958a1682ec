"""Batch independence decided by what the model computes: ``outputs[b]`` from ``inputs[b]`` only.

Every estimator is a mean of per-example quantities, and the engine
evaluates each example as a batch of one: a model whose outputs mix
examples (BatchNorm in training mode, ``jnp.roll`` or a reversal along the
batch axis, capacity-limited routing where tokens compete) would get
importance for a different model, silently. Primitive names cannot decide
it: a mixture-of-experts layer that sorts the whole batch's tokens by
expert and restores their order is independent, a ``gather`` along the
batch axis is not.

The probe changes each of (up to) the first ``PROBE_EXAMPLES`` examples in
turn and checks that no other example's output moves:

* float inputs: the other examples' outputs, weighted at random and pulled
  back by reverse mode (a ``custom_vjp`` has no JVP), must give that
  example's input an exactly zero gradient (no tolerance);
* and a finite change, for a discrete dependence that has a zero JVP
  (which tokens an expert's capacity keeps): the example's floats ``v`` become
  ``1 - v`` and its integers (tokens) are shifted within their observed
  range; the other outputs are compared with the unperturbed ones (a
  tolerance for reordered float sums, e.g. ragged groups of another size).
  A competition that this one change does not trigger is not seen.

A model passes once per shape signature (a weak cache keyed by ``apply_fn``).
With concrete arrays the probe runs at once and refuses by ``ValueError``;
inside a trace (the estimator called under ``jax.jit``) it runs with the
computation and a host callback raises the same message at run time. The
message names the first operation that combines or moves values along the
batch axis, found in a trace with a symbolic batch size.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback
from jax.extend import core as jcore

from wva_jax.importance import _rules

PROBE_EXAMPLES = 8
# swap probe (integer inputs): relative change of another example's outputs that counts as moved
SWAP_RTOL = {2: 3e-2, 4: 1e-4, 8: 1e-9}  # by output itemsize


def _batch_dim(d) -> bool:
  return not isinstance(d, int)  # symbolic: its size involves the batch size


def _sub_jaxprs(eqn):
  for v in eqn.params.values():
    for x in (v if isinstance(v, (tuple, list)) else (v,)):
      if isinstance(x, jcore.ClosedJaxpr):
        yield x.jaxpr
      elif isinstance(x, jcore.Jaxpr):
        yield x


def _suspect(jaxpr) -> tuple[str, str] | None:
  """(primitive, how) of the first op that combines or moves values along the batch axis."""
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    shape = eqn.invars[0].aval.shape if eqn.invars and hasattr(eqn.invars[0].aval, "shape") else ()
    entry = _rules.entry(name)
    if entry.along:
      ax = eqn.params[entry.along]
      axes = ax if isinstance(ax, (tuple, list)) else (ax,)
      if any(a < len(shape) and _batch_dim(shape[a]) for a in axes):
        return name, "acts along the batch axis"
    elif entry.factor is _rules.Factor.MATMUL:
      (lc, _), _ = eqn.params["dimension_numbers"]
      if any(_batch_dim(shape[a]) for a in lc):
        return name, "contracts the batch axis"
    elif entry.indexed and any(_batch_dim(d) for d in shape):
      return name, "indexes an array along the batch axis"
    for j in _sub_jaxprs(eqn):
      found = _suspect(j)
      if found:
        return found
  return None


def suspect(apply_fn: Callable, params, example) -> str:
  """Names the first op acting along the batch axis, for the error message ('' if none found)."""
  try:
    (b,) = jax.export.symbolic_shape("b")
    sym = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct((b,) + jnp.shape(a)[1:], jnp.result_type(a)),
                                 example)
    structs = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), params)
    closed = jax.make_jaxpr(apply_fn)(structs, sym)
  except Exception:  # noqa: BLE001 - shape-dependent Python code: no name to give
    return ""
  found = _suspect(closed.jaxpr)
  return f" (first operation along the batch axis: primitive {found[0]!r}, which {found[1]})" if found else ""


def _moved(apply_fn: Callable, params, x) -> jax.Array:
  """Whether any example's output moves when only another example's input changes (a bool scalar).

  Each of the ``k`` examples is changed in turn (a ``scan``, not ``vmap``:
  models with primitives that have no batching rule, e.g. ``ragged_dot``,
  run as they are).
  """
  leaves, treedef = jax.tree_util.tree_flatten(x)
  is_float = [jnp.issubdtype(jnp.result_type(l), jnp.inexact) for l in leaves]
  k = jnp.shape(leaves[0])[0]
  # params are an argument of every transformed function, never closed over: a model built
  # on nnx.scan refuses variables from another trace level
  f = lambda p, *ls: apply_fn(p, jax.tree_util.tree_unflatten(treedef, ls))
  out = f(params, *leaves)
  others = lambda i, a: jnp.arange(k).reshape((k,) + (1,) * (a.ndim - 1)) != i
  only = lambda i, a: ~others(i, a)
  out32 = out.astype(jnp.float32)
  rtol = SWAP_RTOL.get(jnp.dtype(out.dtype).itemsize, 1e-3)
  scale = jnp.max(jnp.abs(out32)) + 1e-30

  # Reverse mode, not forward: a custom_vjp (flash attention...) has no JVP.
  pull = jax.vjp(f, params, *leaves)[1] if all(is_float) else None

  def probe(p, i):
    moved = jnp.zeros((), bool)
    if pull is not None:  # the other examples' outputs, pulled back: example i's input must get exactly zero
      key = jax.random.fold_in(jax.random.key(0), i)
      ct = (jax.random.normal(key, out.shape, jnp.float32) * others(i, out)).astype(out.dtype)
      for g in pull(ct)[1:]:  # the inputs' gradients (the params' are not needed)
        moved = moved | jnp.any((jnp.abs(g) > 0) & only(i, g))
    # A finite change as well: a discrete dependence (routing, capacity) has a zero JVP.
    changed = []
    for l, fl in zip(leaves, is_float):
      if fl:
        changed.append(jnp.where(only(i, l), 1 - l, l))
      else:  # within the observed range, so an embedding index stays valid
        lo, hi = jnp.min(l), jnp.max(l)
        span = jnp.maximum(hi - lo + 1, 1).astype(l.dtype)
        changed.append(jnp.where(only(i, l), lo + (l - lo + 1) % span, l))
    diff = jnp.abs(f(p, *changed).astype(jnp.float32) - out32)
    return p, moved | jnp.any((diff > rtol * scale) & others(i, diff))

  return jnp.any(jax.lax.scan(probe, params, jnp.arange(k))[1])


def _message(detail: str) -> str:
  return ("apply_fn mixes examples: the outputs of other examples changed when only one example's input "
          f"changed{detail}. Importance is a mean of per-example quantities, so outputs[b] must depend on "
          "inputs[b] only: run the model in evaluation mode (e.g. BatchNorm with use_running_average=True), "
          "and do not roll, reverse or index along the batch axis")


# apply_fn -> signatures (shapes and dtypes of params and probe batch) already probed and
# passed: each model is probed once per compiled shape, as the engine compiles once.
_PASSED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _signature(params, x) -> tuple:
  sig = lambda t: (jax.tree_util.tree_structure(t),
                   tuple((jnp.shape(l), str(jnp.result_type(l))) for l in jax.tree_util.tree_leaves(t)))
  return sig(params) + sig(x)


def _passed(apply_fn) -> set:
  try:
    return _PASSED.setdefault(apply_fn, set())
  except TypeError:  # not weak-referenceable (a functools.partial of a builtin...): no cache
    return set()


def check(apply_fn: Callable, params, inputs) -> None:
  """Refuses a model whose outputs mix examples; see the module docstring."""
  leaves = jax.tree_util.tree_leaves(inputs)
  k = min(int(jnp.shape(leaves[0])[0]), PROBE_EXAMPLES)
  if k < 2:
    return
  x = jax.tree_util.tree_map(lambda a: jnp.asarray(a)[:k], inputs)
  signature = _signature(params, x)
  passed = _passed(apply_fn)
  if signature in passed:
    return
  example = jax.tree_util.tree_map(lambda a: a[:1], x)
  # Under an outer trace every op is staged, on concrete arrays too (an unused zero is dropped).
  traced = isinstance(jnp.zeros(()), jax.core.Tracer) or any(
      isinstance(l, jax.core.Tracer) for l in jax.tree_util.tree_leaves((params, x)))
  if not traced:
    if bool(jax.jit(lambda p, x: _moved(apply_fn, p, x))(params, x)):
      raise ValueError(_message(suspect(apply_fn, params, example)))
    passed.add(signature)
    return
  # the op's name only when refusing: no symbolic trace on the traces of a model that passes
  structs = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)),
                                   (params, example))

  def refuse(m):
    if np.any(np.asarray(m)):  # batched under vmap
      raise ValueError(_message(suspect(apply_fn, *structs)))
    # With several processes the callback runs in only some of them: a cache filled there
    # would make the next trace differ between processes, and their collectives hang.
    if jax.process_count() == 1:
      passed.add(signature)

  def probe():
    jax.debug.callback(refuse, jax.jit(lambda p, x: _moved(apply_fn, p, x))(params, x))

  if jax.process_count() > 1:
    # With several processes a host callback runs in only some of them: a flag read or a
    # cache filled there would make the processes' programs diverge and their collectives hang.
    probe()
    return
  # The probe is in a branch taken until it has passed once, decided by a host flag: a jitted
  # training step that calls an estimator pays for it on its first run only (grad_and_fisher in
  # a jitted step of the zoo's nnx transformer: 2.28x value_and_grad with the probe in every
  # step, 1.12x without).
  done = io_callback(lambda: np.bool_(signature in passed), jax.ShapeDtypeStruct((), jnp.bool_),
                     ordered=False)
  jax.lax.cond(done, lambda: None, probe)
