"""The elephants scenario's parts: real text data, a causal LM, masked per-sequence Fisher, memory multiples."""
import dataclasses
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import wva_jax as wj
from experiments import optim
from experiments.elephants import adapters, data, memory, report, scenario, train
from experiments.elephants import model as lm
from experiments.methods import Method

TINY = lm.Config(d_model=16, heads=2, layers=1, seq_len=8)


def test_sequences_are_overlapping_windows_with_padding_masked():
  seqs, mask = data.to_sequences(["abcdefghijklmnopq", "0123456789"], seq_len=8)
  doc = b"abcdefghijklmnopq\n"
  assert seqs.shape == mask.shape and seqs.shape[1] == 9
  assert bytes(seqs[0]) == doc[:9] and bytes(seqs[1]) == doc[8:17]   # targets continue the inputs
  # every masked-in byte is the text's, every masked-out one is padding
  for s, m in zip(seqs, mask):
    assert (s[m == 0] == data.PAD).all()
  assert data.decode(seqs[-1][mask[-1] == 1]).startswith("0123456789"[:int(mask[-1].sum())])


def test_domains_are_real_prose_and_python():
  a, b = data.load_domain("prose", 32), data.load_domain("code", 32)
  prose, code = " ".join(data.decode(r) for r in a.train[:400]), " ".join(data.decode(r) for r in b.train[:400])
  assert prose.count(" the ") > 50 and code.count("def ") > 5 and code.count("self") > 10
  assert prose.count("def ") < code.count("def ") / 4
  assert len(a.test) > 100 and len(b.test) > 100
  assert data.load_domain("prose", 32).sha256 == a.sha256   # cached and stable


@pytest.mark.slow
def test_model_is_causal():
  apply_fn, params = lm.init(TINY)
  x = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 8)), jnp.uint8)
  y = x.at[:, 5].set((x[:, 5] + 1) % 256)
  a, b = jax.jit(apply_fn)(params, x), jax.jit(apply_fn)(params, y)
  assert a.shape == (2, 8, 256)
  np.testing.assert_array_equal(a[:, :5], b[:, :5])
  assert np.abs(np.asarray(a[:, 5:] - b[:, 5:])).max() > 1e-4


@pytest.mark.slow
def test_per_sequence_fisher_sums_masked_positions():
  apply_fn, params = lm.init(TINY)
  rng = np.random.default_rng(1)
  seqs = rng.integers(1, 256, (3, 9)).astype(np.uint8)
  mask = np.ones_like(seqs)
  mask[1, 5:] = 0
  seqs = seqs * mask
  x, y, m = lm.split_batch(seqs, mask)
  fisher = wj.importance.fisher(apply_fn, params, x, y, mask=m)
  # reference: per sequence, the gradient of the masked sum of log-likelihoods, squared
  def loglik(p, xi, yi, mi):
    logp = jax.nn.log_softmax(apply_fn(p, xi[None])[0])
    return jnp.sum(jnp.take_along_axis(logp, yi[:, None], -1)[:, 0] * mi)
  grad = jax.jit(jax.grad(loglik))
  grads = [grad(params, x[i], y[i], m[i]) for i in range(3)]
  ref = jax.tree_util.tree_map(lambda *g: sum(jnp.square(v) for v in g) / 3, *grads)
  for f, r in zip(jax.tree_util.tree_leaves(fisher), jax.tree_util.tree_leaves(ref)):
    np.testing.assert_allclose(f, r, rtol=2e-4, atol=1e-9)
  # what sits in the padding does not matter
  x2 = x.at[1, 6:].set(77)
  y2 = y.at[1, 5:].set(3)
  f2 = wj.importance.fisher(apply_fn, params, x2, y2, mask=m)
  for a, b in zip(jax.tree_util.tree_leaves(fisher), jax.tree_util.tree_leaves(f2)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-10)


# state bytes / param bytes, per (optimizer, consolidation, importance dtype)
EXPECTED = {("sgd", "none", None): 1.0, ("sgd", "wva", None): 2.0, ("sgd", "wva", "bfloat16"): 1.5,
            ("sgd", "ewc", None): 3.0, ("sgd", "ewc", "bfloat16"): 2.5,
            ("adam", "none", None): 3.0, ("adam", "wva", None): 4.0, ("adam", "wva", "bfloat16"): 3.5,
            ("adam", "ewc", None): 5.0, ("adam", "ewc", "bfloat16"): 4.5,
            ("adam", "implicit_ewc", None): 5.0, ("mofo", "none", None): 3.0}   # MoFO: Adam's moments


@pytest.mark.slow
def test_memory_multiples_measured_from_compiled_step():
  # compiling costs seconds each: compile the claims' five, count live bytes for all
  compiled = [("sgd", "wva", None), ("sgd", "ewc", None), ("adam", "none", None),
              ("adam", "wva", "bfloat16"), ("adam", "ewc", None)]
  res = memory.measure_all(TINY, batch_size=2, compile_configs=compiled, lora=())
  assert len(res["rows"]) == len(EXPECTED)
  assert sum("compiled_state_multiple" in r for r in res["rows"]) == len(compiled)
  for row, (key, want) in zip(res["rows"], EXPECTED.items()):
    assert (row["optimizer"], row["consolidation"], None if row["importance_dtype"] == "float32"
            else row["importance_dtype"]) == key
    # live arrays and the compiled program's arguments agree; Adam's step count adds a few bytes
    assert row["state_multiple"] == pytest.approx(want, abs=1e-3), row["name"]
    if "compiled_state_multiple" in row:
      assert row["compiled_state_multiple"] == pytest.approx(want, abs=1e-3), row["name"]


def _tiny_finetune():
  """``(apply_fn, params, schedule, (train_b, eval_a, eval_b))``: a TINY model, 4 steps on real B windows."""
  a = data.load_domain("prose", TINY.seq_len)
  b = data.load_domain("code", TINY.seq_len)
  apply_fn, params = lm.init(TINY)
  sched = train.Schedule(batch=4, steps=4, eval_every=2, eval_size=8)
  ev = lambda d: (jnp.asarray(d.test[:8]), jnp.asarray(d.test_mask[:8]))
  return apply_fn, params, sched, ((jnp.asarray(b.train[:64]), jnp.asarray(b.train_mask[:64])), ev(a), ev(b))


@pytest.mark.slow
def test_finetune_run_compiles_once_and_wva_zero_is_adam():
  apply_fn, params, sched, args = _tiny_finetune()
  imp = jax.tree_util.tree_map(jnp.ones_like, params)
  key = jax.random.key(0)
  _, plain = train.make_run(apply_fn, "plain", sched)(params, None, 0.0, key, *args)
  wva = train.make_run(apply_fn, "wva", sched)
  _, zero = wva(params, imp, jnp.float32(0.0), key, *args)
  # lambda 0 is plain fine-tuning for every method: the report uses plain as each curve's start
  for method in ("ewc", "implicit_ewc"):
    _, z = train.make_run(apply_fn, method, sched)(params, imp, jnp.float32(0.0), key, *args)
    np.testing.assert_allclose(z, plain, rtol=1e-6, err_msg=method)
  p_frozen, frozen = wva(params, imp, jnp.float32(1e9), key, *args)
  assert plain.shape == (3, 2)
  np.testing.assert_allclose(zero, plain, rtol=1e-6)
  np.testing.assert_allclose(frozen, np.repeat(frozen[:1], 3, 0), rtol=1e-6)  # nothing moves
  assert wva._cache_size() == 1   # lambda is traced: one compile for the grid
  assert not np.allclose(plain[0], plain[-1])


def test_pareto_front():
  pts = [(1.0, 5.0), (2.0, 4.0), (2.5, 4.5), (3.0, 1.0), (3.0, 1.0)]
  assert report.pareto(pts) == [0, 1, 3, 4]


# --- seeds: the resume key and the multi-seed report -------------------------------------------

SMALL = dataclasses.replace(scenario.QUICK, arms=(("plain", None, "float32", (0.0,)),
                                                  ("wva", "fisher", "float32", (1.0, 10.0))))


def _fake_pipeline(monkeypatch, calls):
  """Replace pretraining, importance and fine-tuning by instant fakes; record what runs."""
  dom = types.SimpleNamespace(test=np.zeros((4, 9), np.uint8), test_mask=np.ones((4, 9), np.uint8),
                              train=np.zeros((8, 9), np.uint8), train_mask=np.ones((8, 9), np.uint8),
                              source="fake", sha256="0" * 64)
  params = {"w": jnp.zeros(3)}
  pre = {"seconds": 0.0, "history": [1.0]}

  def prepare(sc, log=print):
    calls.append(("prepare", sc.seed))
    return dom, dom, None, params, pre, f"tag{sc.seed}"

  def make_run(apply_fn, method, sched, dtype=None):
    def fn(p, imp, strength, key, *data_args):
      calls.append(("run", method, float(strength), int(jax.random.key_data(key).sum())))
      return p, np.log(np.full((3, 2), 5.0 + float(strength)))
    return fn

  monkeypatch.setattr(scenario, "prepare", prepare)
  monkeypatch.setattr(scenario, "importance", lambda *a, **k: (params, 0.0))
  monkeypatch.setattr(train, "make_run", make_run)


def test_resume_key_includes_the_seed(tmp_path, monkeypatch):
  calls = []
  _fake_pipeline(monkeypatch, calls)
  out = tmp_path / "scenario.jsonl"
  scenario.run_seeds(SMALL, seeds=[0], log=lambda *_: None, out=out)
  assert [c[0] for c in calls] == ["prepare", "run", "run", "run"]
  # seed 0 is done: seed 1 must still run every arm and lambda, and seed 0 nothing
  calls.clear()
  scenario.run_seeds(SMALL, seeds=[0, 1], log=lambda *_: None, out=out)
  assert calls[0] == ("prepare", 1) and sum(c[0] == "run" for c in calls) == 3
  runs = report.load(out)
  assert sorted(scenario.run_key(r) for r in runs) == sorted(
      (s, m, k, "float32", lam) for s in (0, 1) for m, k, lam in
      [("plain", None, 0.0), ("wva", "fisher", 1.0), ("wva", "fisher", 10.0)])
  # everything done: resuming runs nothing and does not even pretrain
  calls.clear()
  scenario.run_seeds(SMALL, seeds=[0, 1], log=lambda *_: None, out=out)
  assert calls == []
  assert len(report.load(out)) == 6


def test_fine_tuning_key_is_seed_plus_one(tmp_path, monkeypatch):
  # seed 0's committed runs used jax.random.key(1): the resumed study must keep that
  calls = []
  _fake_pipeline(monkeypatch, calls)
  scenario.run_seeds(SMALL, seeds=[0, 2], log=lambda *_: None, out=tmp_path / "s.jsonl")
  keys = {s: int(jax.random.key_data(jax.random.key(s + 1)).sum()) for s in (0, 2)}
  assert [c[3] for c in calls if c[0] == "run"] == [keys[0]] * 3 + [keys[2]] * 3
  assert [r["config"]["seed"] for r in report.load(tmp_path / "s.jsonl")] == [0] * 3 + [2] * 3


def test_committed_runs_are_unique_by_seed_and_arm():
  path = scenario.RESULTS / "scenario.jsonl"
  if not path.exists():
    pytest.skip("no committed results")
  keys = [scenario.run_key(r) for r in report.load(path)]
  assert len(keys) == len(set(keys))
  assert not scenario.todo(scenario.Scenario(seed=0), set(keys))   # seed 0's grid is complete


def _tiny_kernels(cfg=TINY) -> list[tuple[int, int]]:
  """The blocks' dense kernels of ``model.Block``, written out: qkv, out, up, down per layer."""
  d, h = cfg.d_model, cfg.mlp_ratio * cfg.d_model
  return [(d, 3 * d), (d, d), (d, h), (h, d)] * cfg.layers


@pytest.mark.slow   # issue 20: the default run (the fast subset) stays within 3 minutes on 2 cores
def test_adapters_merge_is_w_plus_a_b_on_the_blocks_kernels_only():
  _, params = lm.init(TINY)
  ad = adapters.init_adapters(params, jax.random.key(0), rank=3)
  ad = jax.tree_util.tree_map(lambda x: x + 0.1, ad)      # B starts at 0: make A @ B non-zero
  merged = adapters.merge(params, ad)
  flat = {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  got = {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(merged)[0]}
  pairs = {f"['blocks'][0]['{m}']" if m in ("up", "down") else f"['blocks'][0]['attn']['{m}']": m
           for m in ("qkv", "out", "up", "down")}
  changed = 0
  for key, w in flat.items():
    prefix = key.rsplit("['kernel']", 1)[0]
    if key.endswith("['kernel'].value") and prefix in pairs:
      node = ad["blocks"][0] if pairs[prefix] in ("up", "down") else ad["blocks"][0]["attn"]
      a, b = np.asarray(node[pairs[prefix]]["A"]), np.asarray(node[pairs[prefix]]["B"])
      np.testing.assert_allclose(got[key], w + a @ b, rtol=1e-6, atol=1e-6)
      changed += 1
    else:
      assert np.array_equal(got[key], w), key     # embeddings, LayerNorms, biases, head: frozen
  assert changed == len(_tiny_kernels()) == len(adapters.adapted_kernels(params))
  with pytest.raises(ValueError, match="rank must be >= 1, got 0"):
    adapters.init_adapters(params, jax.random.key(0), rank=0)


@pytest.mark.slow
def test_lora_run_trains_only_a_low_rank_update_and_lambda_zero_is_plain_lora():
  apply_fn, params, sched, args = _tiny_finetune()
  imp = jax.tree_util.tree_map(jnp.ones_like, params)
  key = jax.random.key(0)
  merged, plain = train.make_run(apply_fn, "lora", sched)(params, None, 0.0, key, *args)
  assert not np.allclose(plain[0], plain[-1])
  for method in ("lora_ewc", "lora_wva"):   # lambda 0: plain LoRA, the report's lambda-0 point for these arms
    _, z = train.make_run(apply_fn, method, sched)(params, imp, jnp.float32(0.0), key, *args)
    np.testing.assert_allclose(z, plain, rtol=1e-6, err_msg=method)
  # only the adapted kernels moved, each by a matrix of rank <= RANK
  for (path, w), w2 in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree_util.tree_leaves(merged)):
    delta = np.asarray(w2, np.float64) - np.asarray(w, np.float64)
    if adapters._plain(path) in adapters.adapted_kernels(params):
      assert 0 < np.linalg.matrix_rank(delta, tol=1e-6) <= adapters.RANK
    else:
      assert not delta.any(), path
  # LoRA-WVA at a huge lambda: B's pulled-back importance A^2 F > 0 stops B, so W + A B stays put
  _, frozen = train.make_run(apply_fn, "lora_wva", sched)(params, imp, jnp.float32(1e9), key, *args)
  np.testing.assert_allclose(frozen, np.repeat(frozen[:1], 3, 0), rtol=1e-5)


@pytest.mark.slow
def test_lora_memory_rows_agree_three_ways_and_with_the_shapes():
  res = memory.measure_all(TINY, batch_size=2, configs=())
  p = res["model"]["param_bytes"]
  kernels = _tiny_kernels()
  adapter = 4 * adapters.RANK * sum(i + o for i, o in kernels)     # float32 A [i, r] and B [r, o]
  importance = 4 * sum(i * o for i, o in kernels)                  # one float32 per base-kernel entry
  assert [r["consolidation"] for r in res["rows"]] == list(adapters.LORA_METHODS)
  for row in res["rows"]:
    assert row["adapter_bytes"] == adapter and row["params_bytes"] == p + adapter
    assert row["optimizer_bytes"] == pytest.approx(2 * adapter, abs=16)   # Adam's mu, nu (+ its step count)
    assert row["consolidation_bytes"] == (0 if row["consolidation"] in ("lora", "lora_mofo") else importance)
    # leaf count, the compiled donated step's arguments and the live arrays after two donated steps
    assert row["compiled_state_multiple"] == pytest.approx(row["state_multiple"], abs=1e-3), row["name"]
    assert row["live_after_donated_steps_multiple"] == pytest.approx(row["state_multiple"], abs=1e-3), row["name"]


def _synthetic_runs(shifts):
  """Two methods crossing the matched-learning target, plus plain; ``shifts[seed]`` moves method y."""
  runs = []
  for seed, shift in enumerate(shifts):
    def rec(method, kind, lam, b, a):
      return {"method": method, "importance": kind, "dtype": "float32", "strength": lam,
              "steps": [0, 10], "ppl_a": [4.0, a], "ppl_b": [10.0, b],
              "seconds": 1.0, "config": {"seed": seed}}
    runs.append(rec("plain", None, 0.0, 6.0, 7.0))               # target B = 6.6
    runs += [rec("wva", "fisher", 1.0, 6.2, 6.0), rec("wva", "fisher", 10.0, 7.0, 5.0)]   # A 5.5
    runs += [rec("ewc", "fisher", 1.0, 6.2, 6.0 + shift), rec("ewc", "fisher", 10.0, 7.0, 5.0 + shift)]
  return runs


def test_matched_learning_per_seed_mean_ci_and_orderings():
  runs = _synthetic_runs([0.2, 0.4, -0.1])
  vals = report.matched_by_seed(runs)
  assert vals["WVA-Fisher"] == pytest.approx({0: 5.5, 1: 5.5, 2: 5.5})
  assert vals["EWC-Fisher"] == pytest.approx({0: 5.7, 1: 5.9, 2: 5.4})
  (o,) = report.orderings(runs)
  assert (o["ahead"], o["behind"], o["wins"], o["n"], o["every_seed"]) == ("WVA-Fisher", "EWC-Fisher", 2, 3, False)
  m, hw, n = report.mean_ci([0.2, 0.4, -0.1])
  assert o["mean_diff"] == pytest.approx(m) and o["ci"] == pytest.approx(hw) and n == 3
  assert report.orderings(_synthetic_runs([0.2, 0.4, 0.1]))[0]["every_seed"]


def test_plain_closes_each_curve_at_lambda_zero():
  # a grid whose smallest lambda already learns less than the target: plain (lambda 0) brackets it
  rs = [r for r in _synthetic_runs([0.0]) if r["method"] == "wva"]
  plain = next(r for r in _synthetic_runs([0.0]) if r["method"] == "plain")   # B 6.0, A 7.0
  assert report.matched(rs, 6.1) == (None, False)
  assert report.matched(rs, 6.1, plain) == (pytest.approx(6.5), True)     # halfway to (6.2, 6.0)
  assert report.matched(rs, 6.6, plain) == (pytest.approx(5.5), False)    # inside the grid: unchanged


def test_multi_seed_report_builds_from_jsonl(tmp_path):
  path = tmp_path / "scenario.jsonl"
  runs = _synthetic_runs([0.2, 0.4, -0.1])
  for r in runs:
    r["config"] = {"seed": r["config"]["seed"], "params": 3, "model": {}, "pretrain_steps": 1,
                   "importance_examples": 2, "pretrain_final_nll": 1.0, "pretrain_seconds": 1.0,
                   "schedule": {"steps": 10, "lr": 1e-3, "batch": 4, "eval_size": 4},
                   "data": {d: {"source": "s", "sha256": "0" * 64, "train": 8} for d in "AB"}}
  path.write_text("".join(json.dumps(r) + "\n" for r in runs))
  runs = report.load(path)
  md = report.markdown(runs)
  assert "scenario --seeds 0 1 2" in md
  assert "| WVA-Fisher | 5.500 | 5.500 | 5.500 | 5.500 ± 0.000 | 3 |" in md   # same on every seed
  m, hw, _ = report.mean_ci([5.7, 5.9, 5.4])
  assert f"| EWC-Fisher | 5.700 | 5.900 | 5.400 | {m:.3f} ± {hw:.3f} | 3 |" in md
  assert "| WVA-Fisher | EWC-Fisher | +0.200, +0.400, -0.100 |" in md and "| no (2/3) | no |" in md
  assert sum(line.startswith("| 2 | ") for line in md.splitlines()) == 5   # every run of seed 2 listed
  report.plots(runs, tmp_path)
  assert (tmp_path / "pareto.png").stat().st_size > 0 and (tmp_path / "curves.png").stat().st_size > 0
  # the notebook's records: one seed, no config
  single = [{k: v for k, v in r.items() if k != "config"} for r in runs if r["config"]["seed"] == 0]
  assert "| WVA-Fisher | 1 | 6.000 | 6.200 | 1 |" in report.table(single)


def test_consolidated_state_surfaces_a_shape_error():
  params, imp = {"w": jnp.zeros(2)}, {"w": jnp.ones(2)}
  # WVA has no anchor: importance in, nothing else asked of the state.
  state = train.consolidated_state(train.make_tx("wva", 1.0, 1e-3), params, imp)
  np.testing.assert_array_equal(optax.tree_utils.tree_get(state, "importance")["w"], imp["w"])
  # An EWC state whose anchor does not fit the params is an error, not skipped.
  ewc = wj.add_ewc(None, None, 1.0)
  bad = optax.GradientTransformation(
      lambda p: ewc.init(p)._replace(anchor={"w": jnp.zeros(3)}), ewc.update)
  with pytest.raises(ValueError, match="shape"):
    train.consolidated_state(bad, params, imp)


@pytest.mark.parametrize("consolidation", ["none", "wva", "ewc", "implicit_ewc"])
def test_study_and_elephants_build_the_same_optimizer(consolidation):
  params = {"w": jnp.array([0.5, -1.0, 2.0])}
  imp = {"w": jnp.array([0.0, 1.0, 4.0])}
  txs = [train.make_tx("plain" if consolidation == "none" else consolidation, 2.0, 1e-2),
         memory.build_tx("adam", consolidation, None, lr=1e-2, strength=2.0),
         optim.build_optimizer(Method("adam", learning_rate=1e-2, consolidation=consolidation), 2.0)]
  outs = []
  for tx in txs:
    p, st = params, train.consolidated_state(tx, params, None if consolidation == "none" else imp)
    for g in ([1.0, 2.0, -1.0], [0.5, -0.5, 3.0]):
      u, st = tx.update({"w": jnp.array(g)}, st, p)
      p = optax.apply_updates(p, u)
    outs.append(p["w"])
  for o in outs[1:]:
    np.testing.assert_array_equal(o, outs[0])
  assert not np.allclose(outs[0], params["w"])
