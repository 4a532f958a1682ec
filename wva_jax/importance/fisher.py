"""Diagonal Fisher information: empirical, sampled (true, Monte Carlo) and exact."""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from wva_jax._checks import check_choice
from wva_jax.importance._engine import check_model, gradient_sums
from wva_jax.importance._mesh import like_params, on_auto_axes
from wva_jax.importance._per_example import num_examples

# Hugging Face's (and PyTorch's cross-entropy's) label for a position that has no loss.
IGNORE_INDEX = -100
MODES = ("empirical", "sampled", "exact", "reversed")


@on_auto_axes(('params', 'inputs', 'targets', 'key', 'mask'), like_params)
def fisher(apply_fn: Callable, params, inputs, targets=None, *, mode: str = "empirical",
           key=None, chunk_size: int | None = None, mask=None, engine: str = "auto",
           probe: bool | int = True):
  r"""Diagonal Fisher information, a mean over examples of squared per-example scores.

  .. math::
     F = \frac1N \sum_b \mathbb{E}_{y \sim q_b}\Big[\big(\nabla_\theta
         \textstyle\sum_t m_{bt} \log p_\theta(y_t \mid x_b)\big)^2\Big]

  with ``q_b`` the given targets (``'empirical'``), one draw from the model's
  own softmax (``'sampled'``: the true Fisher, Monte Carlo) or the full
  expectation over classes (``'exact'``). ``apply_fn(params, inputs)`` returns
  logits ``[B, ..., C]``; the positions ``...`` (tokens, pixels) each carry a
  class, their log-likelihoods add up per example and ``mask`` ``[B, ...]``
  (0/1) drops padding. In ``'exact'`` mode the positions are treated as
  independent given the inputs, so the cross terms vanish in expectation and
  ``F = mean_b sum_t sum_c p_{btc} (grad log p_{btc})^2``; it costs one
  backward pass per (position, class) pair, so prefer ``'sampled'`` for
  language models.

  ``'reversed'`` is EWC-DR's logits reversal: the empirical Fisher with
  ``softmax(-z)`` in place of ``softmax(z)`` (``z`` the logits), i.e. the
  score cotangent per position is ``softmax(-z) - q`` instead of
  ``q - softmax(z)``. It does not vanish on examples the model predicts
  confidently and correctly. This follows the authors' code (``logits *
  -1`` before the cross-entropy of the true labels,
  github.com/scarlet0703/EWC-DR ``models/ewc_dr.py``), with squares taken
  per example as in the other modes (their code squares mini-batch
  gradients) and without their clipping of the result at ``omegamax``.

  Per-example gradients are never stacked beyond ``chunk_size`` examples and
  sums are accumulated in float32. The model is read from its jaxpr (see
  :func:`engine_report`): scans over layers, remat, tied embeddings and
  integer casts are handled without any rewrite; a parameter the engine
  cannot see through takes the exact but slower per-example ``vjp`` path,
  with a :class:`FallbackWarning` naming it. Each eager call traces and
  compiles anew (about a second for a small model); wrap repeated calls in
  ``jax.jit``.

  Args:
    apply_fn: ``apply_fn(params, inputs) -> logits``, one array (a tuple or
      a ``ModelOutput`` is refused with a message: pick the logits, e.g.
      ``lambda p, x: model(x, params=p).logits``); ``outputs[b]`` must
      depend on ``inputs[b]`` only: a model that reduces over the batch axis
      (BatchNorm in training mode) is refused by name.
    params: a pytree of arrays.
    inputs: a pytree of arrays with a leading example axis ``B``.
    targets: for ``'empirical'`` and ``'reversed'``: integer classes ``[B, ...]``
      in ``[0, C)``, or ``IGNORE_INDEX`` (-100, Hugging Face's label for
      positions without a loss): such a position is dropped exactly as
      ``mask`` 0 drops it (the mean still divides by the ``B`` examples, as
      with ``mask``); any other value outside ``[0, C)`` is a ``ValueError``
      on concrete targets and makes the result NaN under ``jit`` (never a
      silently dropped position). Or class probabilities (e.g. one-hot)
      ``[B, ..., C]``. Ignored in the other modes.
    mode: ``'empirical'``, ``'sampled'``, ``'exact'`` or ``'reversed'``.
    key: a ``jax.random`` key, required for ``'sampled'`` (one draw per
      example and position; the draws do not depend on ``chunk_size``).
    chunk_size: examples per chunk (default: up to 1024 when every
      parameter is a one-position Dense layer or a bias, else up to 64; the
      ``'vmap'`` engine: up to 64). Memory grows with it.
    mask: optional ``[B, ...]`` weights, 1 for real positions, 0 for padding.
    engine: ``'auto'`` (fastest available) or ``'vmap'`` (chunked
      ``vmap(vjp)``, the reference path).
    probe: when to run the batch-independence probe (``outputs[b]`` from
      ``inputs[b]`` only): ``True`` whenever the parameter values are new
      (a pass holds for the values it was probed on), an int ``n`` on the
      first and every ``n``-th call inside ``jit``, ``False`` never (you
      vouch for the model).

  Returns:
    A float32 pytree shaped like ``params``.

  Example:
    >>> import jax, jax.numpy as jnp, wva_jax as wj
    >>> params = {'w': jnp.ones((3, 4)) * 0.1, 'b': jnp.zeros(4)}
    >>> apply_fn = lambda p, x: x @ p['w'] + p['b']
    >>> x, y = jnp.ones((8, 3)), jnp.arange(8) % 4
    >>> F = wj.importance.fisher(apply_fn, params, x, y)
    >>> F['w'].shape, F['w'].dtype
    ((3, 4), dtype('float32'))

  References:
    Kirkpatrick et al., "Overcoming catastrophic forgetting in neural
    networks", PNAS 2017. Kunstner et al., "Limitations of the empirical
    Fisher approximation", NeurIPS 2019. Liu and Chang, "Elastic Weight
    Consolidation Done Right for Continual Learning", CVPR 2026
    (arXiv:2603.18596): ``'reversed'``.
  """
  check_choice(mode, MODES, "mode")
  n, positions, num_classes, extras = logits_and_mask(apply_fn, params, inputs, mask, probe)
  if mode in ("empirical", "reversed"):
    if targets is None:
      raise ValueError(f"mode={mode!r} needs targets (use mode='sampled' or 'exact' without labels)")
    bad = add_targets(extras, checked_targets(targets, n, positions, num_classes), num_classes)
    cot_fn = _score_cotangent(lambda logits, e: _as_probs(e["targets"], num_classes), reverse=mode == "reversed")
  elif mode == "sampled":
    if key is None:
      raise ValueError("mode='sampled' needs key=jax.random.key(...) to draw targets")
    extras["key"] = jax.random.split(key, n)
    cot_fn = _score_cotangent(_sampled_probs)
  else:
    cot_fn = _exact_cotangents
  if mode not in ("empirical", "reversed"):
    bad = None

  sums = gradient_sums(apply_fn, params, inputs, cot_fn, extras, reduce="square",
                       chunk_size=chunk_size, engine=engine)
  return poison(jax.tree_util.tree_map(lambda s: s / n, sums), bad)


def logits_and_mask(apply_fn, params, inputs, mask, probe: bool | int = True):
  """``(n, positions, num_classes, extras)`` of a model returning logits; ``extras`` holds the checked mask."""
  n = num_examples(inputs)
  out = check_model(apply_fn, params, inputs, "logits", probe)
  if len(out.shape) < 2:
    raise ValueError(f"apply_fn must return logits [B, ..., C]; got output shape {out.shape}")
  positions, num_classes = out.shape[1:-1], out.shape[-1]
  extras = {}
  if mask is not None:
    mask = jnp.asarray(mask)
    if mask.shape != (n,) + positions:
      raise ValueError(f"mask has shape {mask.shape}, expected {(n,) + positions} "
                       "(examples and positions of the logits)")
    extras["mask"] = mask.astype(jnp.float32)
  return n, positions, num_classes, extras


def checked_targets(targets, n: int, positions: tuple, num_classes: int):
  """Integer classes ``[n, *positions]`` in range, or probabilities ``[n, *positions, C]``, as an array."""
  given, targets = targets, jnp.asarray(targets)
  if targets.ndim == 0 or targets.shape[0] != n:
    raise ValueError(f"targets have leading size {targets.shape[:1]}, but inputs have {n} examples")
  if jnp.issubdtype(targets.dtype, jnp.integer):
    if targets.shape != (n,) + positions:
      raise ValueError(f"integer targets have shape {targets.shape}, expected {(n,) + positions}")
    _check_classes(given, num_classes)
  elif targets.shape != (n,) + positions + (num_classes,):
    raise ValueError(f"probability targets have shape {targets.shape}, expected "
                     f"{(n,) + positions + (num_classes,)}")
  return targets


def _check_classes(targets, num_classes: int) -> None:
  """Integer targets must be in ``[0, num_classes)`` or ``IGNORE_INDEX``: checked where they are concrete.

  (``one_hot`` would turn an out-of-range class into a zero row: a finite,
  silently wrong Fisher.) Inside an outer ``jit`` even a concrete array gives
  traced results, so the reduction runs under ``ensure_compile_time_eval``;
  traced targets are checked by :func:`add_targets` instead (a NaN result).
  """
  if isinstance(targets, jax.core.Tracer):
    return
  with jax.ensure_compile_time_eval():
    t = jnp.asarray(targets)
    t = t[t != IGNORE_INDEX]
    if t.size == 0:
      return
    lo, hi = int(jnp.min(t)), int(jnp.max(t))
  if lo < 0 or hi >= num_classes:
    raise ValueError(f"targets must be class indices in [0, {num_classes}) (the logits' last axis) or "
                     f"IGNORE_INDEX ({IGNORE_INDEX}, a position without a loss), got {lo if lo < 0 else hi}")


def add_targets(extras: dict, targets, num_classes: int):
  """Puts ``targets`` into ``extras``; integer ``IGNORE_INDEX`` positions join ``extras['mask']`` as zeros.

  Returns a bool scalar, true when an integer target lies outside ``[0, C)``
  and is not ``IGNORE_INDEX`` (traced targets: :func:`poison` turns the result
  to NaN), or ``None`` for probability targets.
  """
  if not jnp.issubdtype(targets.dtype, jnp.integer):
    extras["targets"] = targets
    return None
  ignored = targets == IGNORE_INDEX
  keep = (~ignored).astype(jnp.float32)
  extras["mask"] = extras["mask"] * keep if "mask" in extras else keep
  extras["targets"] = jnp.where(ignored, 0, targets)
  return jnp.any(~ignored & ((targets < 0) | (targets >= num_classes)))


def poison(tree, bad):
  """``tree`` with every leaf NaN where ``bad`` is true (a traced out-of-range target): loud, not silent."""
  if bad is None:
    return tree
  return jax.tree_util.tree_map(lambda s: jnp.where(bad, jnp.asarray(jnp.nan, s.dtype), s), tree)


def _as_probs(targets, num_classes):
  if jnp.issubdtype(targets.dtype, jnp.integer):
    return jax.nn.one_hot(targets, num_classes, dtype=jnp.float32)
  return targets.astype(jnp.float32)


def _sampled_probs(logits, extras):
  # One categorical draw per example and position, from that example's own key.
  draw = jax.vmap(lambda k, z: jax.random.categorical(k, z, axis=-1))
  y = draw(extras["key"], jax.lax.stop_gradient(logits).astype(jnp.float32))
  return jax.nn.one_hot(y, logits.shape[-1], dtype=jnp.float32)


def _score_cotangent(probs_fn, reverse=False):
  """Cotangent of sum_t m_t sum_c q_tc log softmax(s z_t)_c w.r.t. the logits z (s = -1 if reverse else 1)."""

  def cot_fn(logits, extras):
    z = logits.astype(jnp.float32)
    q = probs_fn(z, extras)
    if reverse:  # d/dz log softmax(-z) = -(q - sum(q) softmax(-z))
      cot = q.sum(-1, keepdims=True) * jax.nn.softmax(-z, axis=-1) - q
    else:
      cot = q - q.sum(-1, keepdims=True) * jax.nn.softmax(z, axis=-1)
    if "mask" in extras:
      cot = cot * extras["mask"][..., None]
    return cot[None]

  return cot_fn


def _exact_cotangents(logits, extras):
  """One cotangent per (position, class): sqrt(p_c) (e_c - p) placed at that position."""
  z = logits.astype(jnp.float32)
  b, *pos, c = z.shape
  p = jax.nn.softmax(z, axis=-1).reshape(b, -1, c)  # [b, P, C]
  if "mask" in extras:
    m = extras["mask"].reshape(b, -1)[..., None]
  else:
    m = jnp.ones_like(p[..., :1])
  num_pos = p.shape[1]
  eye_c = jnp.eye(c, dtype=jnp.float32)
  # per (t, c): [b, C] vector sqrt(p_btc) (e_c - p_bt) * m_bt
  dirs = jnp.sqrt(p)[..., :, None] * (eye_c[None, None] - p[..., None, :]) * m[..., None]  # [b, P, C, C]
  eye_t = jnp.eye(num_pos, dtype=jnp.float32)
  # place at position t: [P(t), C(c), b, P(t'), C] = delta(t,t') dirs[b,t,c,:]
  cots = jnp.einsum("tu,btck->tcbuk", eye_t, dirs)
  return cots.reshape((num_pos * c, b) + tuple(pos) + (c,))
