"""wva-jax on the JAX LLM stack: tunix model code, qwix LoRA adapters and tunix's PeftTrainer.

A tiny tunix Qwen3 (random weights, no hub). qwix's adapters (``w_lora_a`` /
``w_lora_b`` leaves beside the adapted weight ``w``; ``delta W = alpha/rank *
tensordot(A, B, 1)``) are checked against the dense form: the LoRA model's
logits equal the plain model's with ``W + delta W``, and the penalty, its
gradient and the pulled-back importance equal those of the dense penalty
``lambda/2 sum F delta W^2`` (autodiff / NumPy on ``delta W``).
"""
import numpy as np
import pytest

tunix_qwen3 = pytest.importorskip("tunix.models.qwen3.model")
qwix = pytest.importorskip("qwix")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import wva_jax as wj  # noqa: E402

pytestmark = pytest.mark.slow   # tunix model code and PeftTrainer: every test compiles a transformer step

RANK, ALPHA = 3, 6.0
SCALE = ALPHA / RANK
B, L = 2, 6


def config(**kw):
  # Sizes all different, so every kernel's axes are told apart by size alone.
  return tunix_qwen3.ModelConfig(num_layers=1, vocab_size=32, embed_dim=12, hidden_dim=20, num_heads=2,
                                 head_dim=8, num_kv_heads=1, rope_theta=10_000, norm_eps=1e-6,
                                 use_tied_embedding=False, **kw)


def inputs(seed=0, batch=B):
  tokens = jax.random.randint(jax.random.key(seed), (batch, L), 0, 32)
  positions = jnp.broadcast_to(jnp.arange(L), (batch, L))
  mask = jnp.broadcast_to(jnp.tril(jnp.ones((L, L), bool)), (batch, L, L))
  return tokens, positions, mask


def lora_model(seed=0):
  model = tunix_qwen3.Qwen3(config(), rngs=nnx.Rngs(seed))
  tokens, positions, mask = inputs()
  return qwix.apply_lora_to_model(model, qwix.LoraProvider(module_path=".*", rank=RANK, alpha=ALPHA),
                                  tokens, positions, None, mask, rngs=nnx.Rngs(1))


def key_path(path):
  """Plain keys of a tree path, without the ``value`` attribute of an ``nnx.Variable``."""
  keys = (getattr(k, "key", getattr(k, "idx", getattr(k, "name", None))) for k in path)
  return tuple(k for k in keys if k != "value")


def paths(tree):
  return {key_path(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def dense_delta(a, b):
  """qwix's delta W in the kernel's layout: alpha/rank * sum_r A[..., r] B[r, ...] (A's axes, then B's)."""
  return SCALE * np.tensordot(np.asarray(a, np.float64), np.asarray(b, np.float64), axes=1)


@pytest.fixture(scope="module")
def qwix_setup():
  lm = lora_model()
  graphdef, lora, base, rest = nnx.split(lm, nnx.LoRAParam, nnx.Param, ...)
  rng = np.random.default_rng(0)
  # lora_b starts at 0 (delta W = 0): give every adapter a nonzero B.
  lora = jax.tree_util.tree_map(lambda v: jnp.asarray(rng.normal(size=v.shape) * 0.3, v.dtype), lora)
  nnx.update(lm, lora)
  base_imp = jax.tree_util.tree_map(lambda v: jnp.asarray(rng.random(v.shape), jnp.float32), base)
  return lm, lora, base, base_imp


def adapter_table(lora):
  """{kernel path: (A, B)} from the qwix adapters, by plain NumPy walking of the leaf names."""
  flat = paths(lora)
  out = {}
  for p, a in flat.items():
    if p[-1].endswith("_lora_a"):
      w = p[-1][:-len("_lora_a")]
      out[p[:-1] + (w,)] = (a, flat[p[:-1] + (w + "_lora_b",)])
  return out


def test_qwix_delta_w_is_the_dense_update(qwix_setup):
  """The LoRA model's logits equal the plain model's with W + delta W (validates dense_delta, the reference)."""
  lm, lora, base, _ = qwix_setup
  plain = tunix_qwen3.Qwen3(config(), rngs=nnx.Rngs(0))
  table = adapter_table(lora)
  assert len(table) == 8   # q, k, v, o, gate, up, down, lm_head
  merged = jax.tree_util.tree_map_with_path(
      lambda p, v: v + dense_delta(*table[key_path(p)]).astype(np.float32) if key_path(p) in table else v,
      nnx.state(plain, nnx.Param))
  nnx.update(plain, merged)
  tokens, positions, mask = inputs(1)
  want, _ = plain(tokens, positions, None, mask)
  got, _ = lm(tokens, positions, None, mask)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-4, atol=2e-4)


def test_qwix_importance_penalty_and_gradient_match_the_dense_form(qwix_setup):
  _, lora, _, base_imp = qwix_setup
  lam = 0.7
  imp = wj.lora_importance(base_importance=base_imp, adapters=lora, scale=SCALE)
  table = adapter_table(lora)
  base_flat = paths(base_imp)
  imp_flat = paths(imp)
  assert set(imp_flat) == set(table)   # one importance per adapted weight, at the weight's own path
  want = 0.0
  for p, (a, b) in table.items():
    f = base_flat[p].astype(np.float64)
    np.testing.assert_allclose(imp_flat[p], SCALE ** 2 * f, rtol=1e-6)
    want += 0.5 * lam * np.sum(f * dense_delta(a, b) ** 2)
  got = wj.lora_ewc_penalty(lora, imp, lam)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)

  # Gradient: autodiff of the dense penalty in A and B (jnp, float32) vs the closed form.
  def dense_penalty(lora):
    t = adapter_table_jnp(lora)
    return sum(0.5 * lam * jnp.sum(jnp.asarray(base_flat[p]) * (SCALE * jnp.tensordot(a, b, axes=1)) ** 2)
               for p, (a, b) in t.items())
  g_dense = paths(jax.grad(dense_penalty)(lora))
  g_closed = paths(wj.lora_ewc_grad(lora, imp, lam))
  g_auto = paths(jax.grad(lambda ad: wj.lora_ewc_penalty(ad, imp, lam))(lora))
  assert set(g_dense) == set(g_closed) == set(g_auto)
  for k in g_dense:
    np.testing.assert_allclose(g_closed[k], g_dense[k], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(g_auto[k], g_dense[k], rtol=1e-4, atol=1e-6)

  # Pulled-back importance: the diagonal of the dense penalty's Hessian in A (resp. B), divided by lambda.
  omega = paths(wj.lora_pullback(lora, imp))
  for p, (a, b) in table.items():
    f = jnp.asarray(base_flat[p])
    a, b = jnp.asarray(a), jnp.asarray(b)
    pen_a = lambda x: 0.5 * jnp.sum(f * (SCALE * jnp.tensordot(x, b, axes=1)) ** 2)
    pen_b = lambda x: 0.5 * jnp.sum(f * (SCALE * jnp.tensordot(a, x, axes=1)) ** 2)
    ha = jax.hessian(pen_a)(a).reshape(a.size, a.size)
    hb = jax.hessian(pen_b)(b).reshape(b.size, b.size)
    np.testing.assert_allclose(omega[p[:-1] + (p[-1] + "_lora_a",)].ravel(), np.diag(ha), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(omega[p[:-1] + (p[-1] + "_lora_b",)].ravel(), np.diag(hb), rtol=1e-4, atol=1e-6)


def adapter_table_jnp(lora):
  flat = {key_path(p): v for p, v in jax.tree_util.tree_flatten_with_path(lora)[0]}
  return {p[:-1] + (p[-1][:-len("_lora_a")],): (v, flat[p[:-1] + (p[-1][:-len("_lora_a")] + "_lora_b",)])
          for p, v in flat.items() if p[-1].endswith("_lora_a")}


def test_qwix_transforms_accept_the_layout(qwix_setup):
  _, lora, _, base_imp = qwix_setup
  imp = wj.lora_importance(base_importance=base_imp, adapters=lora, scale=SCALE)
  for tx in (wj.add_lora_ewc(imp, 1.0), wj.lora_wva_scale(imp, 1.0), wj.add_lora_ewc(None, 1.0)):
    state = tx.init(lora)
    ones = jax.tree_util.tree_map(jnp.ones_like, lora)
    updates, _ = jax.jit(tx.update)(ones, state, lora)
    assert jax.tree_util.tree_structure(updates) == jax.tree_util.tree_structure(lora)
  zero_state = wj.add_lora_ewc(None, 1.0).init(lora)
  assert jax.tree_util.tree_structure(zero_state.importance) == jax.tree_util.tree_structure(imp)
  # the qwix einsum kernel transposed ('NDH' instead of 'DNH'): found by the axes' sizes, transposed back
  q = ("layers", 0, "attn", "q_proj", "w")
  bi = jax.tree_util.tree_map(lambda x: x, base_imp)
  w = bi["layers"][0]["attn"]["q_proj"]["w"]
  bi["layers"][0]["attn"]["q_proj"]["w"] = w.replace(jnp.transpose(w[...], (1, 0, 2)))
  got = paths(wj.lora_importance(base_importance=bi, adapters=lora))
  np.testing.assert_array_equal(got[q], np.asarray(base_imp["layers"][0]["attn"]["q_proj"]["w"][...]))


# ----------------------------------------------------------------- inside tunix's PeftTrainer

peft_trainer = pytest.importorskip("tunix.sft.peft_trainer")
import optax  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402

STEPS, LR = 6, 1e-2


def batches(n, seed=0):
  """``n`` training examples for tunix's default loss (next-token NLL), one fixed batch of random tokens."""
  tokens, positions, mask = inputs(seed, batch=4)
  ex = {"input_tokens": tokens, "input_mask": jnp.ones_like(tokens), "positions": positions, "attention_mask": mask}
  return [ex] * n


def important(path_keys):
  return "attn" in path_keys


def attn_importance(params, value=1.0, dtype=jnp.float32):
  """1 on the attention weights, 0 elsewhere: a very large strength must freeze attention only."""
  return jax.tree_util.tree_map_with_path(
      lambda p, v: jnp.full(v.shape, value if important(key_path(p)) else 0.0, dtype), params)


def train(tx, *, lora=False, setup=None, steps=STEPS, ckpt=None, data=None):
  model = lora_model() if lora else tunix_qwen3.Qwen3(config(), rngs=nnx.Rngs(0))
  opts = None if ckpt is None else ocp.CheckpointManagerOptions(save_interval_steps=1, max_to_keep=3)
  trainer = peft_trainer.PeftTrainer(model, tx, peft_trainer.TrainingConfig(
      eval_every_n_steps=1000, max_steps=steps, checkpoint_root_directory=ckpt, checkpointing_options=opts,
      pbar_description=None))
  before = nnx.state(model, nnx.LoRAParam if lora else nnx.Param)
  before = jax.tree_util.tree_map(np.asarray, before)
  if setup is not None and trainer.train_steps == 0:   # on resume the restored state already holds them
    setup(trainer, model)
  trainer.train(data if data is not None else batches(steps))
  return trainer, model, before


def moved(before, after, want_important):
  """Largest |after - before| over the important (or the other) parameters."""
  b, a = paths(before), paths(after)
  return max(float(np.max(np.abs(a[k] - b[k]))) for k in b if important(k) == want_important)


@pytest.mark.slow
def test_wva_adam_in_peft_trainer_freezes_the_important_weights():
  _, plain, p0 = train(optax.adam(LR))

  def setup(trainer, model):
    trainer.optimizer = wj.set_importance(trainer.optimizer, attn_importance(nnx.state(model, nnx.Param)))

  trainer, wva, w0 = train(wj.wva_adam(LR, None, 1e6), setup=setup)
  p1, w1 = nnx.state(plain, nnx.Param), nnx.state(wva, nnx.Param)
  assert moved(p0, p1, True) > 10 * STEPS * LR * 1e-2   # plain Adam moves attention
  assert moved(w0, w1, True) < 1e-5 * moved(p0, p1, True)   # WVA at lambda = 1e6 freezes it
  assert moved(w0, w1, False) > 0.5 * moved(p0, p1, False)   # and the rest learns
  m = wj.training_metrics(trainer.optimizer, strength=1e6)
  assert float(m["wva/attenuation_min"]) < 1e-5 and float(m["wva/importance_max"]) == 1.0


@pytest.mark.slow
def test_add_ewc_in_peft_trainer_pulls_the_important_weights_back():
  # SGD with lr * lambda * F = 1: each step lands on the anchor minus one step of the task gradient,
  # where plain SGD accumulates STEPS of them.
  lam = 1.0 / LR
  _, plain, p0 = train(optax.sgd(LR))

  def setup(trainer, model):
    params = nnx.state(model, nnx.Param)
    trainer.optimizer = wj.set_anchor(trainer.optimizer, params)
    trainer.optimizer = wj.set_importance(trainer.optimizer, attn_importance(params))

  trainer, ewc, e0 = train(optax.chain(wj.add_ewc(None, None, lam), optax.sgd(LR)), setup=setup)
  p1, e1 = nnx.state(plain, nnx.Param), nnx.state(ewc, nnx.Param)
  assert moved(e0, e1, True) < 0.4 * moved(p0, p1, True)
  assert moved(e0, e1, False) > 0.8 * moved(p0, p1, False)
  m = wj.training_metrics(trainer.optimizer, nnx.state(ewc, nnx.Param), strength=lam)
  assert float(m["ewc/penalty"]) > 0 and float(m["ewc/drift"]) > 0


def lora_importance_for(model, scale=SCALE):
  _, lora, base, _ = nnx.split(model, nnx.LoRAParam, nnx.Param, ...)
  return wj.lora_importance(base_importance=attn_importance(base), adapters=lora, scale=scale)


def delta_norms(model):
  """||delta W|| per adapted weight (dense, NumPy), split into important and other."""
  _, lora, _, _ = nnx.split(model, nnx.LoRAParam, nnx.Param, ...)
  out = {True: 0.0, False: 0.0}
  for p, (a, b) in adapter_table(lora).items():
    out[important(p)] = max(out[important(p)], float(np.max(np.abs(dense_delta(a, b)))))
  return out


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora_wva", "lora_ewc"])
def test_lora_in_peft_trainer_keeps_the_important_updates_small(method):
  _, plain, _ = train(optax.adam(LR), lora=True)

  def setup(trainer, model):
    trainer.optimizer = wj.set_importance(trainer.optimizer, lora_importance_for(model))

  if method == "lora_wva":
    tx = optax.chain(optax.adam(LR), wj.lora_wva_scale(None, 1e6))
  else:
    tx = optax.chain(wj.add_lora_ewc(None, 1e4), optax.adam(LR))
  trainer, tuned, _ = train(tx, lora=True, setup=setup)
  assert trainer._lora_enabled   # PeftTrainer trains the LoRAParams only
  dp, dt = delta_norms(plain), delta_norms(tuned)
  assert dp[True] > 0 and dp[False] > 0
  limit = 1e-4 if method == "lora_wva" else 0.5
  assert dt[True] < limit * dp[True], (dt, dp)
  assert dt[False] > 0.5 * dp[False], (dt, dp)
  _, lora, _, _ = nnx.split(tuned, nnx.LoRAParam, nnx.Param, ...)
  m = wj.training_metrics(trainer.optimizer, lora, strength=1e6 if method == "lora_wva" else 1e4)
  assert "lora/penalty" in m and "lora/attenuation_min" in m


def opt_leaves(trainer):
  state = nnx.state(trainer.optimizer, nnx.optimizer.OptState)
  return [(jax.tree_util.keystr(p), v.dtype, v.shape, np.asarray(v).tobytes())
          for p, v in jax.tree_util.tree_flatten_with_path(state)[0]]


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True])
def test_tunix_checkpoint_resume_is_bit_identical_and_keeps_dtypes(tmp_path, lora):
  """Train 2N steps at once, or N, stop, restore from tunix's checkpoint and train N more: the same bits.

  The state holds a bfloat16 importance (WVA / LoRA-WVA) and an EWC anchor and importance; the restored
  state must keep every dtype and the tree structure.
  """
  half = 3
  if lora:
    def tx():
      return optax.chain(wj.add_lora_ewc(None, 10.0), optax.adam(LR),
                         wj.lora_wva_scale(None, 10.0, importance_dtype=jnp.bfloat16))

    def setup(trainer, model):
      trainer.optimizer = wj.set_importance(trainer.optimizer, lora_importance_for(model))
  else:
    def tx():
      return optax.chain(wj.add_ewc(None, None, 10.0), optax.adam(LR),
                         wj.wva_scale(None, 10.0, importance_dtype=jnp.bfloat16))

    def setup(trainer, model):
      params = nnx.state(model, nnx.Param)
      trainer.optimizer = wj.set_anchor(trainer.optimizer, params)
      trainer.optimizer = wj.set_importance(trainer.optimizer, attn_importance(params))

  data = batches(1) + batches(1, seed=1) + batches(1, seed=2) + batches(1, seed=3) + batches(2, seed=4)
  straight, straight_model, _ = train(tx(), lora=lora, setup=setup, steps=2 * half, data=data)
  first, _, _ = train(tx(), lora=lora, setup=setup, steps=half, data=data, ckpt=str(tmp_path))
  saved = opt_leaves(first)
  resumed, resumed_model, _ = train(tx(), lora=lora, setup=setup, steps=2 * half, data=data, ckpt=str(tmp_path))
  assert resumed._train_steps == 2 * half
  # the restored state: same structure and dtypes as the one saved (bf16 importance included)
  wvas = wj.state.find_states(resumed.optimizer, (wj.WVAState, wj.LoRAState))
  assert any(jax.tree_util.tree_leaves(s.importance)[0].dtype == jnp.bfloat16 for s in wvas)
  got, want = opt_leaves(resumed), opt_leaves(straight)
  assert [(k, d, s) for k, d, s, _ in got] == [(k, d, s) for k, d, s, _ in want]
  assert [(k, d, s) for k, d, s, _ in saved] == [(k, d, s) for k, d, s, _ in want]
  assert [b for *_, b in got] == [b for *_, b in want]
  kind = nnx.LoRAParam if lora else nnx.Param
  want_params = paths(nnx.state(straight_model, kind))
  for k, a in paths(nnx.state(resumed_model, kind)).items():
    assert a.tobytes() == want_params[k].tobytes(), k


# ----------------------------------------------------------------- wva_jax.tunix: consolidate + ConsolidationMetrics

def _drift(model, anchor):
  got = paths(nnx.state(model, nnx.Param))
  return float(np.sqrt(sum(np.sum((got[k].astype(np.float64) - a) ** 2) for k, a in anchor.items())))


def test_tunix_hook_two_tasks_logs_aligned_metrics_through_tunix_logger(tmp_path):
  """Task A with plain Adam, then task B with EWC set by wjt.consolidate; the hook's ewc/drift at step k is
  ||theta_k - theta_A|| computed here by hand from the params after update k (not the update after it), it is
  what tunix's own logger holds, every 2nd step, and tunix writes one TensorBoard event file."""
  from tunix.sft.metrics_logger import MetricsLoggerOptions

  from wva_jax import tunix as wjt

  model = tunix_qwen3.Qwen3(config(), rngs=nnx.Rngs(0))
  peft_trainer.PeftTrainer(model, optax.adam(LR), peft_trainer.TrainingConfig(
      eval_every_n_steps=1000, max_steps=4, pbar_description=None)).train(batches(4, seed=1))   # task A
  anchor = paths(nnx.state(model, nnx.Param))
  imp = attn_importance(nnx.state(model, nnx.Param))
  lam = 3.0
  trainer = peft_trainer.PeftTrainer(model, optax.chain(wj.add_ewc(None, None, lam), optax.adam(LR)),
                                     peft_trainer.TrainingConfig(
                                         eval_every_n_steps=1000, max_steps=STEPS, pbar_description=None,
                                         metrics_logging_options=MetricsLoggerOptions(log_dir=str(tmp_path))))
  wjt.consolidate(trainer, imp)
  by_hand = {}

  class Recording(wjt.ConsolidationMetrics):
    def on_train_step_start(self, train_ctx):
      by_hand.setdefault(train_ctx.train_steps, _drift(train_ctx.model, anchor))
      super().on_train_step_start(train_ctx)

    def on_train_end(self, train_ctx):
      by_hand.setdefault(train_ctx.train_steps, _drift(train_ctx.model, anchor))
      super().on_train_end(train_ctx)

  hook = Recording(strength=lam, every=2)
  trainer.with_training_hooks(hook)
  trainer.train(batches(STEPS, seed=2))   # task B
  steps = [s for s, _ in hook.history]
  assert steps == [2, 4, 6], steps
  for s, values in hook.history:
    assert values["ewc/drift"] == pytest.approx(by_hand[s], rel=1e-5), (s, values["ewc/drift"], by_hand)
    assert values["ewc/importance_max"] == 1.0 and "ewc/importance_p50" not in values   # no quantiles asked
  assert by_hand[2] != pytest.approx(by_hand[3], rel=1e-3)   # one update apart is told apart
  logged = trainer.metrics_logger.get_metric_history("consolidation", "ewc/drift", "train")
  assert [float(x) for x in logged] == pytest.approx([v["ewc/drift"] for _, v in hook.history])
  events = [p for p in tmp_path.rglob("events.out.tfevents*")]
  assert len(events) == 1, events


def test_tunix_consolidate_lora_pairs_the_base_importance_and_keeps_a_resumed_state(qwix_setup):
  from wva_jax import tunix as wjt

  lm = lora_model()
  _, lora, base, _ = nnx.split(lm, nnx.LoRAParam, nnx.Param, ...)
  imp = attn_importance(base, value=2.0)
  trainer = peft_trainer.PeftTrainer(lm, optax.chain(optax.adam(LR), wj.lora_wva_scale(None, 1.0)),
                                     peft_trainer.TrainingConfig(eval_every_n_steps=1000, max_steps=2,
                                                                 pbar_description=None))
  wjt.consolidate(trainer, imp, lora_scale=SCALE)
  want = paths(wj.lora_importance(lora, imp, scale=SCALE))
  state = [s for s in jax.tree_util.tree_leaves(trainer.optimizer.opt_state, is_leaf=lambda x: isinstance(
      x, wj.LoRAState)) if isinstance(s, wj.LoRAState)]
  got = paths(state[0].importance)
  assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
  trainer.train(batches(2))
  before = paths(state[0].importance)
  wjt.consolidate(trainer, attn_importance(base, value=5.0), lora_scale=SCALE)   # train_steps > 0: kept
  state = [s for s in jax.tree_util.tree_leaves(trainer.optimizer.opt_state, is_leaf=lambda x: isinstance(
      x, wj.LoRAState)) if isinstance(s, wj.LoRAState)]
  assert all(np.array_equal(paths(state[0].importance)[k], before[k]) for k in before)
  with pytest.raises(ValueError, match="every must be an int >= 1"):
    wjt.ConsolidationMetrics(every=0)
