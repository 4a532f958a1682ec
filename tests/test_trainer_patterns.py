"""State plumbing in the patterns real trainers use (issue 27 items 1, 4, 12).

Each case builds the state the way a trainer does (``nnx.Optimizer``,
``optax.masked``, ``optax.multi_transform``, a flat ``{name: array}`` dict
read from a file another tool wrote) and checks, element-wise against
hand-written NumPy, that every parameter's entry landed at its own path.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import wva_jax as wj
from wva_jax.state import find_states

N_LAYERS = 12   # '10' and '11' sort before '2' as strings


class Stack(nnx.Module):
  def __init__(self, rngs):
    self.layers = nnx.List([nnx.Linear(3, 3, rngs=rngs) for _ in range(N_LAYERS)])

  def __call__(self, x):
    for l in self.layers:
      x = l(x)
    return x


def _layer_values(i: int, what: str) -> np.ndarray:
  """A distinct value per layer and leaf, so a swap between layers of equal shape shows."""
  shape = (3, 3) if what == "kernel" else (3,)
  return np.full(shape, 10.0 * i + (1.0 if what == "kernel" else 0.5), np.float32)


def _str_keyed():
  return {"layers": {str(i): {"kernel": _layer_values(i, "kernel"), "bias": _layer_values(i, "bias")}
                     for i in range(N_LAYERS)}}


def _flat_named():
  return {f"layers/{i}/{w}": _layer_values(i, w) for i in range(N_LAYERS) for w in ("kernel", "bias")}


def _check_state_importance(imp_tree, scale=1.0):
  """``imp_tree`` (an nnx-layout importance from the state) holds layer i's values at layer i."""
  for i in range(N_LAYERS):
    for w in ("kernel", "bias"):
      got = np.asarray(imp_tree["layers"][i][w])
      np.testing.assert_array_equal(got, scale * _layer_values(i, w), err_msg=f"layer {i} {w}")


@pytest.mark.parametrize("given", ["str_keys", "flat_names"])
@pytest.mark.parametrize("how", ["consolidate", "set_importance"])
def test_nnx_optimizer_matches_by_path(given, how):
  model = Stack(nnx.Rngs(0))
  opt = nnx.Optimizer(model, wj.wva_adam(1e-3, None, strength=1.0), wrt=nnx.Param)
  imp = _str_keyed() if given == "str_keys" else _flat_named()
  if how == "consolidate":
    wj.consolidate(opt, nnx.state(model, nnx.Param), imp)
  else:
    wj.set_importance(opt, imp)
  _check_state_importance(find_states(opt, (wj.WVAState,))[0].importance)


def test_nnx_optimizer_anchor_by_path():
  model = Stack(nnx.Rngs(0))
  opt = nnx.Optimizer(model, optax.chain(wj.add_ewc(strength=1.0), optax.sgd(0.1)), wrt=nnx.Param)
  wj.set_anchor(opt, _str_keyed())
  _check_state_importance(find_states(opt, (wj.EWCState,))[0].anchor)


def test_file_written_by_another_tool(tmp_path):
  """A safetensors file written without wva_jax (flat names) goes into an optax and an nnx state by name."""
  from safetensors.numpy import save_file
  path = os.path.join(tmp_path, "fisher.safetensors")
  save_file(_flat_named(), path)
  loaded = wj.load_importance(path)
  model = Stack(nnx.Rngs(0))
  _, params = nnx.split(model, nnx.Param)
  state = wj.set_importance(wj.wva_sgd(0.1, None).init(nnx.to_pure_dict(params)), loaded)
  _check_state_importance(find_states(state, (wj.WVAState,))[0].importance)
  opt = nnx.Optimizer(model, wj.wva_sgd(0.1, None), wrt=nnx.Param)
  wj.set_importance(opt, loaded)
  _check_state_importance(find_states(opt, (wj.WVAState,))[0].importance)


def test_mismatch_names_the_path():
  model = Stack(nnx.Rngs(0))
  opt = nnx.Optimizer(model, wj.wva_sgd(0.1, None), wrt=nnx.Param)
  bad = _flat_named()
  bad["layers/3/kernal"] = bad.pop("layers/3/kernel")
  with pytest.raises(ValueError, match=r"no entry for .*\['layers'\]\[3\]\['kernel'\]"):
    wj.set_importance(opt, bad)
  bad = _flat_named()
  bad["layers/3/extra"] = np.zeros(2, np.float32)
  with pytest.raises(ValueError, match="layers/3/extra"):
    wj.set_importance(opt, bad)
  bad = _flat_named()
  bad["layers/3/kernel"] = np.zeros((3, 4), np.float32)
  with pytest.raises(ValueError, match=r"\(3, 4\)"):
    wj.set_importance(opt, bad)


# ---------------------------------------------------------------- masked states

def _params():
  return {"dense": {"kernel": jnp.arange(6.0).reshape(2, 3) / 10, "bias": jnp.ones(3)},
          "norm": {"scale": jnp.ones(3)}}


def _importance():
  return {"dense": {"kernel": jnp.arange(1.0, 7.0).reshape(2, 3), "bias": jnp.full(3, 5.0)},
          "norm": {"scale": jnp.full(3, 7.0)}}


_KERNELS_ONLY = {"dense": {"kernel": True, "bias": False}, "norm": {"scale": False}}
_LABELS = {"dense": {"kernel": "wva", "bias": "plain"}, "norm": {"scale": "plain"}}


def _masked_wva(strength, importance=None):
  return optax.chain(optax.sgd(0.1), optax.masked(wj.wva_scale(importance, strength), _KERNELS_ONLY))


def _partitioned_wva(strength, importance=None):
  return optax.multi_transform({"wva": optax.chain(optax.sgd(0.1), wj.wva_scale(importance, strength)),
                                "plain": optax.sgd(0.1)}, _LABELS)


def _partition_wva(strength, importance=None):
  return optax.partition({"wva": optax.chain(optax.sgd(0.1), wj.wva_scale(importance, strength)),
                          "plain": optax.sgd(0.1)}, _LABELS)


def _expected_update(grads, strength):
  """Hand-written: kernels attenuated by 1/(1 + s*imp), biases and norms plain SGD."""
  imp = jax.tree_util.tree_map(np.asarray, _importance())
  g = jax.tree_util.tree_map(np.asarray, grads)
  return {"dense": {"kernel": -0.1 * g["dense"]["kernel"] / (1 + strength * imp["dense"]["kernel"]),
                    "bias": -0.1 * g["dense"]["bias"]},
          "norm": {"scale": -0.1 * g["norm"]["scale"]}}


_NO_PARTITION = pytest.mark.skipif(not hasattr(optax, "partition"), reason="optax.partition: optax >= 0.2.4")


@pytest.mark.parametrize("build", [_masked_wva, _partitioned_wva, pytest.param(_partition_wva, marks=_NO_PARTITION)],
                         ids=["masked", "multi_transform", "partition"])
@pytest.mark.parametrize("how", ["consolidate", "set_importance", "factory"])
def test_masked_states_take_a_params_shaped_tree(build, how):
  params, strength = _params(), 0.5
  grads = jax.tree_util.tree_map(lambda p: jnp.full_like(p, 2.0), params)
  if how == "factory":
    tx = build(strength, _importance())
    state = tx.init(params)
  else:
    tx = build(strength)
    state = tx.init(params)
    if how == "consolidate":
      state = wj.consolidate(state, params, _importance())
    else:
      state = wj.set_importance(state, _importance())
  updates, _ = jax.jit(tx.update)(grads, state, params)
  want = _expected_update(grads, strength)
  for (path, u), w in zip(jax.tree_util.tree_leaves_with_path(updates), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(np.asarray(u), w, rtol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_masked_ewc_anchor_and_metrics():
  params = _params()
  tx = optax.chain(optax.masked(wj.add_ewc(strength=2.0), _KERNELS_ONLY), optax.sgd(0.1))
  state = tx.init(params)
  anchor = jax.tree_util.tree_map(jnp.zeros_like, params)
  state = wj.consolidate(state, anchor, _importance())
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  m = wj.training_metrics(state, params, grads, strength=2.0, quantiles=())
  k, imp_k = np.asarray(params["dense"]["kernel"]), np.asarray(_importance()["dense"]["kernel"])
  np.testing.assert_allclose(float(m["ewc/drift"]), np.sqrt((k ** 2).sum()), rtol=1e-6)
  np.testing.assert_allclose(float(m["ewc/fisher_drift"]), 0.5 * (imp_k * k ** 2).sum(), rtol=1e-6)
  np.testing.assert_allclose(float(m["ewc/pull_to_grad_ratio"]),
                             np.sqrt(((2.0 * imp_k * k) ** 2).sum()) / np.sqrt(6.0), rtol=1e-6)
  np.testing.assert_allclose(float(m["ewc/importance_max"]), 6.0)


def test_metrics_read_a_schedule_at_the_state_count():
  params = {"w": jnp.zeros(4)}
  schedule = optax.linear_schedule(0.0, 10.0, 10)
  tx = wj.wva_sgd(0.1, {"w": jnp.array([0.0, 1.0, 2.0, 3.0])}, strength=schedule)
  state = tx.init(params)
  for _ in range(3):
    _, state = tx.update({"w": jnp.ones(4)}, state, params)
  count = int(find_states(state, (wj.WVAState,))[0].count)
  m = wj.training_metrics(state, params, strength=schedule, quantiles=())
  lam = float(schedule(count))
  np.testing.assert_allclose(float(m["wva/attenuation_min"]), 1 / (1 + lam * 3.0), rtol=1e-6)


@pytest.mark.parametrize("factory", [lambda: wj.wva_sgd(0.1, 10.0), lambda: wj.wva_adam(1e-3, 10.0),
                                     lambda: wj.wva_scale(10.0), lambda: wj.add_ewc(1000.0),
                                     lambda: wj.implicit_ewc(0.1, 5.0, learning_rate=0.1), lambda: wj.add_lora_ewc(3.0),
                                     lambda: wj.lora_wva_scale(3.0)])
def test_strength_by_position_is_named(factory):
  with pytest.raises(ValueError, match=r"strength="):
    factory()


def test_optax_state_over_an_nnx_state_keeps_its_variables():
  """optax over ``nnx.split`` params (nnx.State of Params): the fitted importance keeps the Param
  wrappers, so a jitted update's trees still match (a plain-array importance broke tree_map)."""
  model = Stack(nnx.Rngs(0))
  _, params = nnx.split(model, nnx.Param)
  tx = wj.wva_adam(1e-2, strength=2.0)
  state = wj.set_importance(tx.init(params), jax.tree_util.tree_map(jnp.ones_like, params))
  state = wj.consolidate(state, params, jax.tree_util.tree_map(jnp.ones_like, params))
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  updates, _ = jax.jit(tx.update)(grads, state, params)
  first = jax.tree_util.tree_leaves(updates)[0]
  # Adam's first step is -lr * sign(g) = -0.01; WVA with importance 1 + 1 = 2 at strength 2: / (1 + 4)
  np.testing.assert_allclose(np.asarray(first), -0.01 / 5, rtol=1e-5)
