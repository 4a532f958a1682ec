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

A pass holds for the parameter values it was probed on, not for the model:
a gate that starts at zero or routing that is balanced at init passes, and
the same model mixes examples once training moves it. So the estimators'
``probe`` argument decides when to probe again:

* ``True`` (``fisher``, ``mas``, ``sig``): whenever the parameter values are
  new. The values are recognised by a fingerprint (each leaf's sum and sum of
  squares, in float32): computed where the arrays live, one read of the
  params; under ``jit`` it goes to the host with a callback that decides
  whether the compiled probe branch runs. Repeated calls on the same values
  (chunks, benchmarks, several batches) probe once.
* an int ``n`` (``grad_and_fisher``'s default, ``PROBE_EVERY``): in a trace,
  the first call and every ``n``-th call after it, whatever the values (a
  training step has new ones every call, and probing each would cost more
  than the step); a model that starts to mix is refused within ``n`` steps.
  Concrete calls probe as with ``True``.
* ``False``: never; the caller vouches for the model.

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
          "inputs[b] only: run the model in evaluation mode (Flax: BatchNorm with use_running_average=True, "
          "deterministic=True; Keras: training=False, e.g. model.stateless_call(p, non_trainable, x, "
          "training=False)), "
          "and do not roll, reverse or index along the batch axis")


# How often grad_and_fisher / loss_and_fisher probe inside a trace (a training step): the probe
# costs about one more step (zoo nnx transformer: 2.28x value_and_grad with it in every step,
# 1.12x without), so every 50th step adds about 2%.
PROBE_EVERY = 50


def check_probe(probe) -> None:
  if isinstance(probe, bool):
    return
  if not isinstance(probe, int) or probe < 1:
    raise ValueError(f"probe must be True, False or a positive int (probe every n-th traced call), got {probe!r}")


# apply_fn -> {signature (shapes and dtypes of params and probe batch): _Entry}: what was probed
# and passed, per compiled shape (a weak cache: a model's entries go with its apply_fn).
_PASSED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _Entry:
  """The fingerprint of the parameter values that last passed, and the traced calls counted."""

  def __init__(self):
    self.fingerprint: bytes | None = None
    self.calls = 0


def _signature(params, x) -> tuple:
  sig = lambda t: (jax.tree_util.tree_structure(t),
                   tuple((jnp.shape(l), str(jnp.result_type(l))) for l in jax.tree_util.tree_leaves(t)))
  return sig(params) + sig(x)


def _entries(apply_fn) -> dict:
  try:
    return _PASSED.setdefault(apply_fn, {})
  except TypeError:  # not weak-referenceable (a functools.partial of a builtin...): no cache
    return {}


def _fingerprint(params) -> jax.Array:
  """Each leaf's sum and sum of squares (float32): new parameter values give a new fingerprint."""
  leaves = [jnp.asarray(l).astype(jnp.float32) for l in jax.tree_util.tree_leaves(params)]
  if not leaves:
    return jnp.zeros((0,), jnp.float32)
  return jnp.stack([f(l) for l in leaves for f in (jnp.sum, lambda l: jnp.sum(l * l))])


_jit_fingerprint = jax.jit(_fingerprint)


def check(apply_fn: Callable, params, inputs, probe: bool | int = True) -> None:
  """Refuses a model whose outputs mix examples; see the module docstring."""
  check_probe(probe)
  if probe is False:
    return
  leaves = jax.tree_util.tree_leaves(inputs)
  k = min(int(jnp.shape(leaves[0])[0]), PROBE_EXAMPLES)
  if k < 2:
    return
  x = jax.tree_util.tree_map(lambda a: jnp.asarray(a)[:k], inputs)
  signature = _signature(params, x)
  entries = _entries(apply_fn)
  entry = entries.get(signature) or _Entry()
  example = jax.tree_util.tree_map(lambda a: a[:1], x)
  # Under an outer trace every op is staged, on concrete arrays too (an unused zero is dropped).
  traced = isinstance(jnp.zeros(()), jax.core.Tracer) or any(
      isinstance(l, jax.core.Tracer) for l in jax.tree_util.tree_leaves((params, x)))
  if not traced:
    fingerprint = np.asarray(_jit_fingerprint(params)).tobytes()
    if entry.fingerprint == fingerprint:
      return
    if bool(jax.jit(lambda p, x: _moved(apply_fn, p, x))(params, x)):
      raise ValueError(_message(suspect(apply_fn, params, example)))
    entry.fingerprint = fingerprint
    entries[signature] = entry
    return
  # the op's name only when refusing: no symbolic trace on the traces of a model that passes
  structs = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)),
                                   (params, example))
  several = jax.process_count() > 1

  def refuse(m, fingerprint):
    if np.any(np.asarray(m)):  # batched under vmap
      raise ValueError(_message(suspect(apply_fn, *structs)))
    # With several processes the callback runs in only some of them: a cache filled there
    # would make the next trace differ between processes, and their collectives hang.
    if not several:
      entry.fingerprint = np.asarray(fingerprint).tobytes()
      entries[signature] = entry

  every = probe is not True
  # an interval needs no fingerprint (a training step's values are new every call)
  values = jnp.zeros((0,), jnp.float32) if every else _fingerprint(params)

  def run_probe():
    jax.debug.callback(refuse, jax.jit(lambda p, x: _moved(apply_fn, p, x))(params, x), values)

  if several:
    # With several processes a host callback runs in only some of them: a flag read or a
    # cache filled there would make the processes' programs diverge and their collectives hang.
    run_probe()
    return

  def skip(fp):
    if every:
      entry.calls += 1
      return np.bool_(entry.fingerprint is not None and (entry.calls - 1) % probe != 0)
    return np.bool_(entry.fingerprint == np.asarray(fp).tobytes())

  # The probe sits in a branch that a host callback decides at run time: the compiled step
  # skips it on the same parameter values, or between the n-th calls of a training step.
  done = io_callback(skip, jax.ShapeDtypeStruct((), jnp.bool_), values, ordered=False)
  jax.lax.cond(done, lambda: None, run_probe)
