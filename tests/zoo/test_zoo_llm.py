"""Importance on the JAX LLM stack's own model code: tunix's Qwen3 and Gemma3, and a qwix QAT model.

Tiny random-weight models (2 layers, vocabulary 37, 8 tokens, batch 4, no hub).
Each is checked against two references the factored engine does not compute:

* an explicit Python loop of ``jax.grad`` over one example at a time (the
  strongest reference: nothing batched, nothing vmapped), and
* ``engine='vmap'`` (chunked per-example ``vmap(vjp)``),

for the empirical Fisher (integer targets, padding mask), the sampled Fisher
(the engine draws example ``b``'s classes with ``jax.random.split(key, B)[b]``,
``categorical`` over that example's logits: the loop repeats the same draws)
and MAS; element-wise, ``rtol`` 1e-4 plus ``ATOL_FRAC`` of each leaf's
largest entry. The empirical Fisher is also taken under ``jax.jit`` with the
parameters closed over, and with bfloat16 parameters (against the vmap
engine on the same bfloat16 model; looser tolerance, see ``test_bf16``).

qwix QAT: ``qwix.QtProvider`` with ``QtRule(weight_qtype=int8)`` on every
module: the forward pass multiplies by per-channel int8 fake-quantised
weights and the backward pass is qwix's straight-through estimator (its own
``custom_vjp``), so the references differentiate qwix's rule, not the
float model.
"""
from __future__ import annotations

import dataclasses
import functools
import re
import time
import warnings

import numpy as np
import pytest

tunix_qwen3 = pytest.importorskip("tunix.models.qwen3.model")
tunix_gemma3 = pytest.importorskip("tunix.models.gemma3.model")
qwix = pytest.importorskip("qwix")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from compare import assert_tree_close, leaf_rel_err  # noqa: E402
from flax import nnx  # noqa: E402

import wva_jax as wj  # noqa: E402
from benchmarks import model_zoo  # noqa: E402

pytestmark = [pytest.mark.slow,   # every case compiles a transformer several times
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]   # tunix's Variable.value

B, L, V = 4, 8, 37
RTOL = 1e-4
ATOL_FRAC = 1e-6
BF16_RTOL = 3e-2
BF16_ATOL_FRAC = 1e-3
KEY = jax.random.key(7)


@dataclasses.dataclass
class Case(model_zoo.Case):
  """The zoo's case, with this file's tolerance and the leaves expected to fall back."""
  atol_frac: float = 1e-6
  # regex of the leaf paths the engine must send to its per-example vjp fallback (None: no leaf)
  fallback: str | None = None


def _data(seed=0, vocab=V):
  rng = np.random.default_rng(seed)
  tok = jnp.asarray(rng.integers(0, vocab, size=(B, L)), jnp.int32)
  y = jnp.asarray(rng.integers(0, vocab, size=(B, L)), jnp.int32)
  lengths = np.array([L, L - 1, L // 2, L - 3])[:B]
  mask = jnp.asarray(np.arange(L)[None] < lengths[:, None], jnp.float32)
  return tok, y, mask


def _causal(tokens):
  n, t = tokens.shape
  return jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (n, t, t))


def _positions(tokens):
  return jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)


def _nnx_case(name, model, call, seed=0, **kw):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def apply_fn(p, tokens):
    return call(nnx.merge(graphdef, p, rest), tokens)

  tok, y, mask = _data(seed)
  return Case(name, apply_fn, params, tok, y, mask, **kw)


def qwen3_config(**kw):
  return tunix_qwen3.ModelConfig(num_layers=2, vocab_size=V, embed_dim=16, hidden_dim=24, num_heads=2,
                                 head_dim=8, num_kv_heads=1, rope_theta=10_000, norm_eps=1e-6, **kw)


def _qwen3_call(m, tokens):
  return m(tokens, _positions(tokens), None, _causal(tokens))[0]


def _qwen3_call_cache(m, tokens):
  # prefill into a fresh KV cache (dynamic_update_slice of the projections into zeros)
  cache = m.init_cache(tokens.shape[0], tokens.shape[1], jnp.float32)
  return m(tokens, _positions(tokens), cache, _causal(tokens))[0]


def qwen3():
  """tunix Qwen3, untied lm_head, GQA (2 query heads, 1 KV head), causal mask, no cache."""
  return _nnx_case("tunix Qwen3", tunix_qwen3.Qwen3(qwen3_config(), rngs=nnx.Rngs(0)), _qwen3_call)


def qwen3_tied_cache():
  """tunix Qwen3 with a tied embedding (encode gather + decode matmul) and a KV cache passed in."""
  model = tunix_qwen3.Qwen3(qwen3_config(use_tied_embedding=True), rngs=nnx.Rngs(1))
  return _nnx_case("tunix Qwen3 tied+cache", model, _qwen3_call_cache, seed=1)


def qwen3_moe():
  """tunix Qwen3 with a mixture of experts (4 experts, top 2): on CPU tunix routes densely
  (softmax router, top_k, one_hot dispatch, per-expert einsums over stacked [E, D, F] weights)."""
  model = tunix_qwen3.Qwen3(qwen3_config(num_experts=4, num_experts_per_tok=2), rngs=nnx.Rngs(5))
  return _nnx_case("tunix Qwen3 MoE", model, _qwen3_call, seed=5)


def qwen3_remat():
  """tunix Qwen3 with RematConfig.BLOCK: every decoder layer under nnx.remat (a checkpoint in the jaxpr).

  atol 1e-5 of the leaf's max: a few embedding entries ~2000x below the leaf's max (rows whose
  per-position contributions cancel) differ from the loop by up to 7e-5 relative; against a
  float64 loop (jax_enable_x64, same weights) the engine is off by 9e-5 there and the float32
  loop itself by 1.4e-4, so this is float32 rounding, not the engine (same model without remat:
  every entry within 1e-6).
  """
  model = tunix_qwen3.Qwen3(qwen3_config(remat_config=tunix_qwen3.RematConfig.BLOCK), rngs=nnx.Rngs(6))
  return _nnx_case("tunix Qwen3 remat", model, _qwen3_call, seed=6, atol_frac=1e-5)


def _gemma3_config(**kw):
  return tunix_gemma3.ModelConfig(num_layers=2, num_embed=V, embed_dim=16, hidden_dim=24, num_heads=2,
                                  head_dim=8, num_kv_heads=1, sliding_window_size=4, **kw)


def _gemma3_call(m, t):
  return m(t, _positions(t), None, _causal(t))[0]


def gemma3():
  """tunix Gemma3 (float32 params; the default is bfloat16): both layers local sliding-window attention
  (window 4 < 8 tokens), tied embedding scaled by sqrt(d), pre/post norms, gated GELU MLP."""
  return _nnx_case("tunix Gemma3", tunix_gemma3.Gemma3(_gemma3_config(param_dtype=jnp.float32),
                                                       rngs=nnx.Rngs(2)), _gemma3_call, seed=2)


def gemma3_bf16():
  """tunix Gemma3 with its default bfloat16 parameters (computes in bfloat16, logits bfloat16)."""
  return _nnx_case("tunix Gemma3 bf16", tunix_gemma3.Gemma3(_gemma3_config(), rngs=nnx.Rngs(2)),
                   _gemma3_call, seed=2)


def qwen3_bf16():
  """tunix Qwen3 with bfloat16 parameters and compute (dtype=param_dtype=bfloat16; logits cast to float32)."""
  model = tunix_qwen3.Qwen3(qwen3_config(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16), rngs=nnx.Rngs(0))
  return _nnx_case("tunix Qwen3 bf16", model, _qwen3_call)


def _qat(model, example):
  provider = qwix.QtProvider([qwix.QtRule(module_path=".*", weight_qtype=jnp.int8)])
  return qwix.quantize_model(model, provider, *example)


class _TokenMLP(nnx.Module):
  def __init__(self, rngs):
    self.emb = nnx.Embed(V, 16, rngs=rngs)
    self.l1 = nnx.Linear(16, 24, rngs=rngs)
    self.l2 = nnx.Linear(24, V, rngs=rngs)

  def __call__(self, tokens):
    return self.l2(nnx.gelu(self.l1(self.emb(tokens))))


def qat_mlp():
  """qwix QAT (int8 per-channel fake-quant weights, straight-through backward) on an nnx
  Embed -> Linear -> gelu -> Linear token model (the embedding gather is not quantised)."""
  tok, _, _ = _data(3)
  model = _qat(_TokenMLP(nnx.Rngs(3)), (tok,))
  return _nnx_case("qwix QAT MLP", model, lambda m, t: m(t), seed=3, fallback=r"/kernel$")


def qat_mlp_bwd_per_tensor():
  """qwix QAT with int8 gradients in the backward pass (bwd_qtype) and per-tensor scales
  (disable_channelwise_axes): the cotangent reaching the embedding is rounded to int8 with one
  absmax per tensor (it moves the loop's Fisher of l1/bias and the embedding by 1-2%). Not in
  ALL: see test_qat_quantised_gradients."""
  tok, _, _ = _data(3)
  provider = qwix.QtProvider([qwix.QtRule(module_path=".*", weight_qtype=jnp.int8, bwd_qtype=jnp.int8,
                                          disable_channelwise_axes=True)])
  model = qwix.quantize_model(_TokenMLP(nnx.Rngs(3)), provider, tok)
  return _nnx_case("qwix QAT MLP int8 grads per-tensor", model, lambda m, t: m(t), seed=3, fallback=r"/kernel$")


def qat_qwen3():
  """qwix QAT (int8 weights) on the tiny tunix Qwen3: every Einsum goes through qwix's QT einsum."""
  tok, _, _ = _data(4)
  model = _qat(tunix_qwen3.Qwen3(qwen3_config(), rngs=nnx.Rngs(4)),
               (tok, _positions(tok), None, _causal(tok)))
  return _nnx_case("qwix QAT Qwen3", model, _qwen3_call, seed=4, fallback=r"(_proj/(w|kernel)|lm_head/w)$")


ALL = [qwen3, qwen3_tied_cache, qwen3_moe, qwen3_remat, gemma3, qat_mlp, qat_qwen3]
BF16 = [qwen3_bf16, gemma3_bf16]


# --- references ---------------------------------------------------------------------

def loop_reference(case, key=KEY):
  """Empirical / sampled Fisher and MAS by a Python loop of jax.grad, one example at a time."""
  keys = jax.random.split(key, B)   # the engine's per-example keys

  def logp(p, xb, onehot, mb):
    z = case.apply_fn(p, xb)[0].astype(jnp.float32)           # [T, C]
    return jnp.sum(mb[:, None] * onehot * jax.nn.log_softmax(z, -1))

  def sq_norm(p, xb, mb):
    z = case.apply_fn(p, xb)[0].astype(jnp.float32)
    return jnp.sum(mb[:, None] * z * z)

  score = jax.jit(jax.grad(logp))
  mas_grad = jax.jit(jax.grad(sq_norm))
  logits = jax.jit(case.apply_fn)
  zero = jax.tree_util.tree_map(lambda a: np.zeros(a.shape, np.float64), case.params)
  out = {"fisher": zero, "sampled": zero, "mas": zero}

  def add(acc, g, f):
    return jax.tree_util.tree_map(lambda a, b: a + f(np.asarray(b, np.float64)), acc, g)

  for b in range(B):
    xb, mb = case.inputs[b:b + 1], case.mask[b]
    g = score(case.params, xb, jax.nn.one_hot(case.targets[b], V, dtype=jnp.float32), mb)
    out["fisher"] = add(out["fisher"], g, np.square)
    zb = jax.lax.stop_gradient(logits(case.params, xb)[0]).astype(jnp.float32)
    ys = jax.random.categorical(keys[b], zb, axis=-1)
    g = score(case.params, xb, jax.nn.one_hot(ys, V, dtype=jnp.float32), mb)
    out["sampled"] = add(out["sampled"], g, np.square)
    out["mas"] = add(out["mas"], mas_grad(case.params, xb, mb), np.abs)
  return {k: jax.tree_util.tree_map(lambda a: a / B, v) for k, v in out.items()}


def estimators(case, engine, key=KEY):
  imp = wj.importance

  def run(p, x, y, m):
    return {"fisher": imp.fisher(case.apply_fn, p, x, y, mask=m, engine=engine),
            "sampled": imp.fisher(case.apply_fn, p, x, mode="sampled", key=key, mask=m, engine=engine),
            "mas": imp.mas(case.apply_fn, p, x, mask=m, engine=engine)}

  return jax.jit(run)(case.params, case.inputs, case.targets, case.mask)


def _errs(got, want):
  return {k: leaf_rel_err(got[k], want[k]) for k in want}


def _max_elementwise(got, want):
  """Largest |got - want| / (|want| + ATOL_FRAC * max|want| of the leaf) over all entries."""
  out = 0.0
  for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    out = max(out, float((np.abs(g - w) / (np.abs(w) + ATOL_FRAC * np.abs(w).max() + 1e-30)).max()))
  return out


def _assert_close(got, want, rtol, atol_frac):
  for k in want:
    assert_tree_close(got[k], want[k], rtol=rtol, atol_frac=atol_frac)


# --- tests --------------------------------------------------------------------------

@functools.cache
def _case_and_loop(name):
  case = globals()[name]()
  return case, loop_reference(case)


@pytest.mark.parametrize("build", ALL, ids=[b.__name__ for b in ALL])
def test_llm_matches_loop_and_vmap(build, record_property):
  """Fast path (or the named fallback) equals both references for empirical/sampled Fisher and MAS."""
  case, ref_loop = _case_and_loop(build.__name__)
  report = wj.importance.engine_report(case.apply_fn, case.params, case.inputs)
  record_property("engine_report", report)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always", wj.importance.FallbackWarning)
    t0 = time.perf_counter()
    fast = jax.block_until_ready(estimators(case, "auto"))
    t_fast = time.perf_counter() - t0
  fallbacks = [str(w.message) for w in caught if issubclass(w.category, wj.importance.FallbackWarning)]
  t0 = time.perf_counter()
  ref_vmap = jax.block_until_ready(estimators(case, "vmap"))
  t_vmap = time.perf_counter() - t0
  summary = {"fast_vs_loop": _max_elementwise(fast, ref_loop), "fast_vs_vmap": _max_elementwise(fast, ref_vmap),
             "vmap_vs_loop": _max_elementwise(ref_vmap, ref_loop), "leaf_rel_fast_vs_loop": _errs(fast, ref_loop),
             "times_s": (round(t_fast, 1), round(t_vmap, 1)), "labels": sorted(set(report.values())),
             "fallback_warnings": len(fallbacks)}
  record_property("summary", summary)
  print(case.name, summary)

  # the report: a fallback exactly where expected, named by its cause, and a warning naming the leaves
  slow = {k for k, v in report.items() if v.startswith("fallback")}
  want_slow = {k for k in report if case.fallback and re.search(case.fallback, k)}
  assert slow == want_slow, report
  if slow:
    assert {report[k] for k in slow} == {"fallback: used by custom_vjp_call"}, report
    assert len(fallbacks) == 3 and all("custom_vjp_call" in m for m in fallbacks), fallbacks
    assert all(repr(k) in fallbacks[0] for k in sorted(slow)[:8]), fallbacks[0]
  else:
    assert not fallbacks, fallbacks

  for k in fast:
    assert all(np.all(np.isfinite(np.asarray(a))) for a in jax.tree_util.tree_leaves(fast[k])), k
    assert sum(float(np.abs(np.asarray(a)).sum()) for a in jax.tree_util.tree_leaves(ref_loop[k])) > 0, k
  _assert_close(ref_vmap, ref_loop, RTOL, case.atol_frac)   # the two references agree
  _assert_close(fast, ref_loop, RTOL, case.atol_frac)
  _assert_close(fast, ref_vmap, RTOL, case.atol_frac)


@pytest.mark.parametrize("build", ALL, ids=[b.__name__ for b in ALL])
def test_llm_fisher_under_jit_params_closed_over(build):
  """fisher() inside the user's jax.jit, the parameters closed over as constants, not arguments."""
  case, ref_loop = _case_and_loop(build.__name__)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", wj.importance.FallbackWarning)
    got = jax.jit(lambda x, y, m: wj.importance.fisher(case.apply_fn, case.params, x, y, mask=m))(
        case.inputs, case.targets, case.mask)
  assert_tree_close(got, ref_loop["fisher"], rtol=RTOL, atol_frac=case.atol_frac)


@pytest.mark.parametrize("build", BF16, ids=[b.__name__ for b in BF16])
def test_llm_bf16(build, record_property):
  """bfloat16 models: the engine within BF16_RTOL of both references (elementwise, atol BF16_ATOL_FRAC).

  The references take their per-example gradients in bfloat16 (autodiff keeps the
  parameters' dtype, so each gradient is rounded to 8 mantissa bits before it is squared);
  the engine contracts activations and cotangents into float32. On Qwen3 (bfloat16
  compute, float32 logits) the vmap reference equals the loop to 1e-7 and the engine
  differs from both by <= 0.8% per entry; on Gemma3 (bfloat16 logits) even vmap and
  the loop differ by 0.7% (batched vs one-example bfloat16 forward). About
  2 x 2^-8, the rounding of a squared bfloat16 gradient.
  """
  case, ref_loop = _case_and_loop(build.__name__)
  assert {a.dtype for a in jax.tree_util.tree_leaves(case.params)} == {jnp.dtype(jnp.bfloat16)}
  report = wj.importance.engine_report(case.apply_fn, case.params, case.inputs)
  assert not [k for k, v in report.items() if v.startswith("fallback")], report
  with warnings.catch_warnings():
    warnings.simplefilter("error", wj.importance.FallbackWarning)
    fast = estimators(case, "auto")
  ref_vmap = estimators(case, "vmap")
  record_property("summary", {"fast_vs_loop": _max_elementwise(fast, ref_loop),
                              "fast_vs_vmap": _max_elementwise(fast, ref_vmap),
                              "vmap_vs_loop": _max_elementwise(ref_vmap, ref_loop)})
  for k in fast:
    assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(fast[k])), k
  _assert_close(fast, ref_loop, BF16_RTOL, BF16_ATOL_FRAC)
  _assert_close(fast, ref_vmap, BF16_RTOL, BF16_ATOL_FRAC)


def test_qat_forward_is_quantised():
  """The QAT case is not the float model in disguise: same parameters, int8 fake-quantised
  forward, logits that differ from the float model's by more than rounding."""
  case, _ = _case_and_loop("qat_mlp")
  float_model = _TokenMLP(nnx.Rngs(3))
  _, float_params, _ = nnx.split(float_model, nnx.Param, ...)
  assert_tree_close(case.params, float_params, rtol=0, atol_frac=0)   # qwix QT adds no parameter
  z_qat, z_float = case.apply_fn(case.params, case.inputs), float_model(case.inputs)
  gap = float(jnp.abs(z_qat - z_float).max() / jnp.abs(z_float).max())
  assert 1e-4 < gap < 5e-2, gap


def test_qat_per_tensor_activation_quantisation_is_refused_by_name():
  """act_qtype with per-tensor scales: one absmax over the batch couples the examples' forward
  passes. Refused, naming the primitive; under the user's jit the same message arrives inside
  a JaxRuntimeError (the check runs in a host callback)."""
  tok, y, _ = _data(3)
  provider = qwix.QtProvider([qwix.QtRule(module_path=".*", weight_qtype=jnp.int8, act_qtype=jnp.int8,
                                          disable_channelwise_axes=True)])
  case = _nnx_case("qat act per-tensor", qwix.quantize_model(_TokenMLP(nnx.Rngs(3)), provider, tok),
                   lambda m, t: m(t), seed=3)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", wj.importance.FallbackWarning)
    with pytest.raises(ValueError, match=r"mixes examples.*'reduce_max'"):
      wj.importance.fisher(case.apply_fn, case.params, case.inputs, case.targets)
    with pytest.raises(Exception, match=r"(?s)mixes examples.*'reduce_max'"):
      jax.jit(lambda p, x, t: wj.importance.fisher(case.apply_fn, p, x, t))(case.params, case.inputs, case.targets)


def test_gemma3_needs_an_attention_mask():
  """Argument combination that does not trace: tunix's Gemma3 with attention_mask=None fails in
  tunix itself (jnp.ones_like(None) in the sliding-window branch), before the engine sees it.
  (Qwen3 with attention_mask=None, segment_ids, output_hidden_states=True or a token-padding
  mask all trace and take the fast path.)"""
  model = tunix_gemma3.Gemma3(_gemma3_config(param_dtype=jnp.float32), rngs=nnx.Rngs(2))
  case = _nnx_case("gemma3 no mask", model, lambda m, t: m(t, _positions(t), None, None)[0])
  with pytest.raises(TypeError, match="ones_like"):
    wj.importance.engine_report(case.apply_fn, case.params, case.inputs)


def test_qat_quantised_gradients():
  """int8-rounded gradients (qwix bwd_qtype) make a per-example gradient depend on the compiled
  program: float32 differences between two compilations of the same math flip int8 roundings.
  The one-example jax.grad loop itself moves by up to 1.1e-2 (embedding, per example) between
  eager and jax.jit; jax.vmap(jax.grad) by as much, and wva's engines (both) under jit with the
  parameters closed over by 1.1e-2, while eager and jit-with-arguments happened to round like
  the eager loop (1e-7). Example 0's vmapped gradient is bit-identical whatever examples 1-3
  are: no coupling across examples, only rounding. So: a loose check on every leaf, the fast
  path and the named fallback as for the other QAT cases."""
  case, ref = _case_and_loop("qat_mlp_bwd_per_tensor")
  report = wj.importance.engine_report(case.apply_fn, case.params, case.inputs)
  assert {k for k, v in report.items() if v.startswith("fallback")} == {"l1/kernel", "l2/kernel"}, report
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", wj.importance.FallbackWarning)
    runs = {"args": estimators(case, "auto"),
            "closed": jax.jit(lambda x, y, m: {"fisher": wj.importance.fisher(
                case.apply_fn, case.params, x, y, mask=m)})(case.inputs, case.targets, case.mask)}
  for got in runs.values():
    for k in got:
      assert_tree_close(got[k], ref[k], rtol=3e-2, atol_frac=1e-3)
