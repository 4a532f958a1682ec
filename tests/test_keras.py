"""Keras 3 on the JAX backend (issue 27 items 7, 8): the stateless_call recipe, the traps named.

Real Keras classes (``keras.Sequential``, keras-hub's ``GPT2CausalLM`` and
``GemmaCausalLM`` from small configs, random weights: no download), checked
against per-example loops (Sequential) and the ``vmap`` reference path
(keras-hub). keras-hub needs ``tensorflow-text`` by its metadata, which
pulls TensorFlow; CI installs it ``--no-deps`` (``.ci/run``) and these tests
skip where it is missing.
"""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

os.environ.setdefault("KERAS_BACKEND", "jax")   # before keras is imported anywhere

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import wva_jax as wj  # noqa: E402

keras = pytest.importorskip("keras")
if keras.backend.backend() != "jax":
  pytest.skip(f"Keras runs on the {keras.backend.backend()!r} backend in this process", allow_module_level=True)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sequential():
  keras.utils.set_random_seed(0)
  model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="tanh"),
                            keras.layers.BatchNormalization(), keras.layers.Dropout(0.5), keras.layers.Dense(3)])
  x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 6)), jnp.float32)
  y = jnp.arange(5) % 3
  return model, x, y


def _recipe(model):
  trainable = [v.value for v in model.trainable_variables]
  non_trainable = [v.value for v in model.non_trainable_variables]
  apply_fn = lambda p, x: model.stateless_call(p, non_trainable, x, training=False)[0]
  return apply_fn, trainable


@pytest.mark.slow   # ~7 s; the traps test below stays in the fast suite
def test_stateless_call_recipe_matches_the_per_example_loop():
  model, x, y = _sequential()
  apply_fn, params = _recipe(model)
  got = jax.jit(lambda p: wj.importance.fisher(apply_fn, p, x, y))(params)
  for b in range(len(x)):   # independent reference: one jax.grad per example
    g = jax.grad(lambda p: jax.nn.log_softmax(apply_fn(p, x[b:b + 1])[0])[y[b]])(params)
    if b == 0:
      want = [np.asarray(gi, np.float64) ** 2 for gi in g]
    else:
      want = [w + np.asarray(gi, np.float64) ** 2 for w, gi in zip(want, g)]
  for a, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(a), w / len(x), rtol=2e-5, atol=1e-8)


def test_the_keras_traps_are_named():
  model, x, y = _sequential()
  apply_fn, params = _recipe(model)
  with pytest.raises(ValueError, match="no float parameter reaches.*stateless_call"):
    wj.importance.fisher(lambda p, x: model(x, training=False), params, x, y)
  with pytest.raises(TypeError, match=r"params\[0\] is a keras.*Variable.*v.value for v in"):
    wj.importance.fisher(apply_fn, model.trainable_variables, x, y)
  training = lambda p, x: model.stateless_call(p, [v.value for v in model.non_trainable_variables], x,
                                                training=True)[0]
  with pytest.raises(ValueError, match="training=False"):   # BatchNorm on batch statistics mixes examples
    wj.importance.fisher(training, params, x, y)


@pytest.mark.slow   # three trainings of a Keras MLP in a fresh process: ~30 s
def test_keras_example_keeps_task_a():
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
  out = subprocess.run([sys.executable, os.path.join("examples", "keras_ewc.py")], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=600, check=True).stdout
  import re
  rows = {m: (float(a), float(b)) for m, a, b in re.findall(r"^(\w+)\s*: accuracy on A ([\d.]+), on B ([\d.]+)",
                                                            out, re.M)}
  assert list(rows) == ["plain", "ewc", "wva"], out
  assert rows["plain"][0] < 0.6 and rows["plain"][1] >= 0.9, out   # B learned, A forgotten
  for m in ("ewc", "wva"):
    assert rows[m][0] >= 0.85 and rows[m][1] >= 0.9, out           # B learned, A kept


def _hub_lm(name):
  hub = pytest.importorskip("keras_hub")
  keras.utils.set_random_seed(0)
  if name == "gpt2":
    backbone = hub.models.GPT2Backbone(vocabulary_size=64, num_layers=2, num_heads=2, hidden_dim=32,
                                       intermediate_dim=64, max_sequence_length=16)
    lm = hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
  else:
    backbone = hub.models.GemmaBackbone(vocabulary_size=64, num_layers=2, num_query_heads=2, num_key_value_heads=1,
                                        hidden_dim=32, intermediate_dim=64, head_dim=16)
    lm = hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (4, 12)))
  return lm, {"token_ids": tokens, "padding_mask": jnp.ones((4, 12), jnp.int32)}, tokens


@pytest.mark.slow   # keras-hub imports in ~8 s; two small LMs, each through both engines
@pytest.mark.parametrize("name", ["gpt2", "gemma"])
def test_keras_hub_lm_fisher_on_the_fast_path(name):
  lm, x, tokens = _hub_lm(name)
  apply_fn, params = _recipe(lm)
  report = wj.importance.engine_report(apply_fn, params, x)
  assert not [r for r in report.values() if r.startswith("fallback")], report
  fast = wj.importance.fisher(apply_fn, params, x, tokens, mask=x["padding_mask"])
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    ref = wj.importance.fisher(apply_fn, params, x, tokens, mask=x["padding_mask"], engine="vmap")
  for a, b in zip(fast, ref):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7 * float(jnp.abs(b).max()))
