"""SIG: forward-only signal importance, found by reading the model's jaxpr."""
from __future__ import annotations

import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp

from wva_jax.importance import _interpret, _model_io, _rules, _trace, _use_grads, _uses
from wva_jax.importance._engine import FallbackWarning, check_model
from wva_jax.importance._mesh import like_params, on_auto_axes
from wva_jax.importance._per_example import chunked, map_examples, num_examples, resolve_chunk_size, scan_chunks
from wva_jax.importance._rules import Factor

# SIG keeps only per-site sums of |activations| between chunks, so chunks can be big.
SIG_CHUNK_SIZE = 1024


@on_auto_axes(('params', 'inputs', 'mask'), like_params)
def sig(apply_fn: Callable, params, inputs, *, chunk_size: int | None = None, mask=None,
        probe: bool | int = True):
  r"""Signal importance: how much input signal flows through each parameter.

  The seed's SIG: a weight ``w_ij`` (input ``i`` -> unit ``j``) matters in
  proportion to its magnitude times the mean magnitude of the signal it
  carries, ``|w_ij| * mean_b |a_bi|`` with ``a`` the layer's input. Forward
  pass only; the model is not rewritten: each parameter's use is found in the
  jaxpr of ``apply_fn`` (through ``jit``, ``remat``, ``scan`` over stacked
  layers, float casts, reshapes; an integer cast carries no signal).
  A scanned ``[L, ...]`` parameter gets each layer slice's own signal.

  For a parameter ``W`` entering an op linear in it, ``y = op(a, W)``
  (``dot_general``: Dense, Einsum, attention projections; ``conv``; ``mul``:
  scales; ``gather``: embeddings)::

      sig(W) = |W| * VJP_W[ op(|a|, .) ](1) / N

  i.e. ``|W|`` times the total absolute input that reaches each connection:
  ``|w_ij| * sum_b sum_p |a_bpi| / N`` for a Dense kernel (positions ``p`` of
  a sequence are summed within an example), the same per kernel tap for a
  convolution (sum over output positions of the input patch entry),
  ``|e_v| * count_v / N`` for an embedding row. For a parameter added to a
  signal, ``y = a + b`` (biases)::

      sig(b) = sum_p |y_bp| / N   (summed over the positions b broadcasts to)

  ``y`` is the sum the bias enters, i.e. the pre-activation: the seed measured
  the output after the activation (softmax on the last layer), which a model-
  agnostic tracer cannot identify; the pre-activation magnitude is what the
  bias directly adds to. A parameter used several times gets the sum over its
  uses. Unused parameters get zeros. For ``mul`` the "signal" is the operand
  the parameter is multiplied with in the jaxpr (for Flax ``LayerNorm`` that
  is the inverse standard deviation, the scale being applied before the
  centred input).

  Args:
    apply_fn: ``apply_fn(params, inputs) -> outputs`` for a batch, with
      ``outputs[b]`` depending on ``inputs[b]`` only.
    params: the parameter pytree (any float dtype).
    inputs: the batch, leading axis = examples (N >= 1).
    chunk_size: examples per forward pass (memory bound); ``None`` = up to
      1024.
    mask: optional ``[B, P...]`` weights of the positions of a sequence (1 for
      real positions, 0 for padding), the leading axes after the example axis
      of the outputs. Each parameter's signal is weighted position by
      position, so padding carries none; a parameter whose signal has no such
      position axes (it acts after pooling, say) is an error, and one whose
      signal does not depend on the example (``1 + w`` in Gemma's RMSNorm)
      is not weighted.
    probe: when to run the batch-independence probe (``outputs[b]`` from
      ``inputs[b]`` only): ``True`` whenever the parameter values are new
      (a pass holds for the values it was probed on), an int ``n`` on the
      first and every ``n``-th call inside ``jit``, ``False`` never (you
      vouch for the model).

  Returns:
    A float32 pytree shaped like ``params``.

  Raises:
    ValueError: empty ``inputs``, bad ``chunk_size``, a ``mask`` of the wrong
      shape or one a parameter's signal cannot be weighted by, outputs that
      are not one array or that mix examples (BatchNorm in training mode).

  A parameter concatenated to the activations (a ViT's cls or register
  tokens, prefix tuning) is itself part of the signal: the bias rule with
  ``y`` the concatenation gives ``sig(w) = |w|``. A parameter whose use the
  tracer cannot see through (a custom rule, a ``while`` loop, a nonlinear
  function of it) gets that magnitude rule ``|w|``, with a
  :class:`~wva_jax.importance.FallbackWarning` naming it and the primitive;
  the other parameters keep their signal.

  Example:
    >>> import jax.numpy as jnp
    >>> import wva_jax as wj
    >>> params = {'w': jnp.array([[1., -2.], [3., 0.]]), 'b': jnp.zeros(2)}
    >>> x = jnp.array([[1., 0.], [-1., 2.]])
    >>> imp = wj.importance.sig(lambda p, x: x @ p['w'] + p['b'], params, x)
    >>> imp['w']  # |w_ij| * mean_b |x_bi| = |w| * [[1], [1]]
    Array([[1., 2.],
           [3., 0.]], dtype=float32)

  Works under ``jax.jit`` and ``jax.vmap`` over a stack of ``params``.

  References:
    Kutalev, A. "Natural Way to Overcome the Catastrophic Forgetting in
    Neural Networks" (2020), arXiv:2005.07107 (WVA with signal importance);
    Kutalev & Lapina, "Stabilizing Elastic Weight Consolidation method in
    practical ML tasks and using weight importances for neural network
    pruning" (2021), arXiv:2109.10021 (EWC with SIG).
  """
  n = num_examples(inputs)
  chunk = resolve_chunk_size(chunk_size, n, SIG_CHUNK_SIZE)
  leaves, treedef = jax.tree_util.tree_flatten(params)
  out = check_model(apply_fn, params, inputs, probe=probe)
  example = jax.tree_util.tree_map(lambda a: jnp.asarray(a)[:1], inputs)
  plan = _trace.trace(apply_fn, params, example)
  names = _model_io.leaf_paths(params)
  floats = [i for i, l in enumerate(leaves) if jnp.issubdtype(jnp.result_type(l), jnp.inexact)]
  # integer leaves (step counters...) carry no signal: zeros. A leaf the tracer cannot
  # follow gets the magnitude rule |w| (below).
  magnitude = _magnitude_leaves(plan, floats, names)
  sites = plan.sites([i for i in floats if i not in magnitude])
  mask = _checked_mask(mask, n, out)
  (x_chunks, m_chunks), valid = chunked((inputs, mask), n, chunk)
  body = _chunk_sums(plan, leaves, sites, names)
  init = {u.site: jnp.zeros(u.loops + (u.eqn.invars[0].aval.shape if u.factor is Factor.ROWS else
                                       (u.eqn.outvars[0] if u.additive else
                                        u.eqn.invars[1 - u.operand]).aval.shape), jnp.float32)
          for u in sites}
  sums = scan_chunks(body, init, (x_chunks, m_chunks, valid))
  imp = [i / n for i in _to_leaves(sites, sums, leaves)]
  for i in magnitude:
    imp[i] = jnp.abs(_use_grads.as_f32(jnp.asarray(leaves[i])))
  return jax.tree_util.tree_unflatten(treedef, imp)


def _magnitude_leaves(plan, floats: list[int], names: list[str]) -> list[int]:
  """The float leaves the tracer cannot follow (they get |w|), with a warning naming them."""
  magnitude = [i for i in floats if i in plan.blocked]
  if magnitude:
    listed = ", ".join(f"{names[i]!r} ({plan.blocked[i][0]})" for i in magnitude[:8])
    warnings.warn(f"sig cannot follow {len(magnitude)} parameter leaves into the model and gives them "
                  f"the magnitude rule |w| instead of |w| x signal: {listed}. sig follows "
                  f"{', '.join(_rules.uses())} (through jit, remat, scan and layout ops)",
                  FallbackWarning, stacklevel=4)
  return magnitude


def _checked_mask(mask, n: int, out):
  if mask is None:
    return None
  mask = jnp.asarray(mask, jnp.float32)
  if mask.ndim < 2 or mask.shape[0] != n or out.shape[1:mask.ndim] != mask.shape[1:]:
    raise ValueError(f"mask has shape {mask.shape}, expected ({n}, P...) with P the "
                     f"leading positions of the outputs, whose shape is {out.shape[1:]} "
                     "per example")
  return mask


def _signal(use, invals, out):
  """|signal| at a use: |output| for an additive use (a bias), else the other operand (|.| unless indices)."""
  if use.additive:
    return jnp.abs(_use_grads.as_f32(out))
  (other,) = [a for k, a in enumerate(invals) if k != use.operand]
  return other if use.factor is Factor.ROWS else jnp.abs(_use_grads.as_f32(other))


def _position_weights(m, shape, use, names):
  """``m`` [P...] shaped to broadcast against one iteration's signal ``shape`` (1, P..., rest)."""
  if tuple(shape[1:1 + m.ndim]) != m.shape:
    raise ValueError(f"sig with a mask: parameter {names[use.leaf]!r} meets a signal of "
                     f"shape {tuple(shape[1:])} per example, which does not start with the "
                     f"mask's positions {m.shape}")
  return m.reshape((1,) + m.shape + (1,) * (len(shape) - 1 - m.ndim))


def _chunk_sums(plan, leaves, sites, names):
  """``body(chunk)``: each site's signal summed over a chunk's examples (row counts for indices)."""

  def one_example(x_leaves, m):
    def hook(use, invals, out):
      c = _signal(use, invals, out)
      if m is None or not use.data:  # a signal that is not the example's (1 + w): no positions
        return c, None
      if use.factor is Factor.ROWS:  # indices: weight the rows they pick
        return c, _position_weights(m, out.shape, use, names)
      return c * _position_weights(m, c.shape, use, names), None

    return _interpret.evaluate(plan, leaves, [a[None] for a in x_leaves], hook, sites)[1]

  def body(chunk_data):
    x, m, v = chunk_data
    caps = map_examples(one_example, jax.tree_util.tree_leaves(x), m)
    acc = {}
    for u in sites:
      c, weights = caps[u.site]  # [chunk, *loops, ...]
      if u.factor is Factor.ROWS:
        acc[u.site] = _row_counts(u, c, weights, v)
      else:  # op is linear in the signal too: sum |signal| over examples first
        acc[u.site] = jnp.tensordot(v, c, axes=1)
    return acc

  return body


def _row_counts(u, c, weights, v):
  """Indices are not linear: count the rows each example picks (ones masked by valid and the mask)."""
  w0 = jnp.zeros(u.eqn.invars[0].aval.shape, jnp.float32)
  out_shape = u.eqn.outvars[0].aval.shape
  ones = jnp.broadcast_to(v.reshape((-1,) + (1,) * (len(u.loops) + len(out_shape))),
                          c.shape[:1 + len(u.loops)] + out_shape)
  if weights is not None:
    ones = ones * weights

  def rows(i, o):  # one iteration: the chunk's indices [chunk, ...] -> row counts
    gather = lambda w: jax.vmap(lambda ib: _use_grads.bind_f32(u, [w, ib]))(i)
    return jax.vjp(gather, w0)[1](o.astype(jnp.float32))[0]

  inner = lambda a: jnp.moveaxis(a, 0, len(u.loops))
  return _uses.looped(u, rows)(inner(c), inner(ones))


def _to_leaves(sites, sums, leaves) -> list:
  """Each site's summed signal carried back to its leaf: |w| x the total signal reaching each entry."""
  imp = [jnp.zeros(jnp.shape(l), jnp.float32) for l in leaves]
  for u in sites:
    back = _uses.path_transpose(u.path, jnp.shape(leaves[u.leaf]))
    s = sums[u.site]
    if u.additive:  # reduce |y| to the operand's shape (the add may broadcast it); sub negates
      g = _uses.looped(u, lambda sl: jnp.abs(_use_grads.operand_grad(u, None, sl)))(s)
      imp[u.leaf] = imp[u.leaf] + back(g)
      continue
    if u.factor is not Factor.ROWS:
      ones = jnp.ones(u.eqn.outvars[0].aval.shape, jnp.float32)
      w0 = jnp.zeros(u.eqn.invars[u.operand].aval.shape, jnp.float32)

      def reach(sl):  # one iteration: total |signal| reaching each entry of the operand
        op = lambda w: _use_grads.bind_f32(u, [w if k == u.operand else sl for k in range(2)])
        return jax.vjp(op, w0)[1](ones)[0]

      s = _uses.looped(u, reach)(s)
    w = jnp.abs(_use_grads.as_f32(jnp.asarray(leaves[u.leaf])))
    imp[u.leaf] = imp[u.leaf] + w * back(s)
  return imp
