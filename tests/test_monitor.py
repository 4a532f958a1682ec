"""wj.training_metrics against hand computation (NumPy), in optax chains, inject_hyperparams and nnx.Optimizer."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import wva_jax as wj

RNG = np.random.default_rng(0)
P = {"a": RNG.normal(size=(3, 4)).astype(np.float32), "b": RNG.normal(size=5).astype(np.float32)}
F = {"a": RNG.random((3, 4)).astype(np.float32), "b": RNG.random(5).astype(np.float32)}
ANCHOR = {"a": RNG.normal(size=(3, 4)).astype(np.float32), "b": RNG.normal(size=5).astype(np.float32)}
G = {"a": RNG.normal(size=(3, 4)).astype(np.float32), "b": RNG.normal(size=5).astype(np.float32)}


def cat(t):
  return np.concatenate([np.ravel(t["a"]), np.ravel(t["b"])]).astype(np.float64)


def jtree(t):
  return jax.tree_util.tree_map(jnp.asarray, t)


def test_wva_and_ewc_in_a_chain_match_numpy():
  lam = 3.0
  tx = optax.chain(wj.add_ewc(jtree(ANCHOR), jtree(F), lam), optax.adam(1e-3), wj.wva_scale(jtree(F), lam))
  state = tx.init(jtree(P))
  m = jax.jit(lambda s, p, g: wj.training_metrics(s, p, g, strength=lam))(state, jtree(P), jtree(G))
  f, d, g = cat(F), cat(P) - cat(ANCHOR), cat(G)
  a = 1 / (1 + lam * f)
  want = {
      "wva/importance_mean": f.mean(), "wva/importance_max": f.max(),
      "wva/importance_p50": np.quantile(f, 0.5), "wva/importance_p90": np.quantile(f, 0.9),
      "wva/importance_p99": np.quantile(f, 0.99),
      "wva/attenuation_mean": a.mean(), "wva/attenuation_min": a.min(),
      "wva/attenuated_grad_ratio": np.linalg.norm(a * g) / np.linalg.norm(g),
      "ewc/drift": np.linalg.norm(d), "ewc/fisher_drift": 0.5 * np.sum(f * d * d),
      "ewc/penalty": 0.5 * lam * np.sum(f * d * d),
      "ewc/pull_to_grad_ratio": np.linalg.norm(lam * f * d) / np.linalg.norm(g),
  }
  for k, v in want.items():
    np.testing.assert_allclose(float(m[k]), v, rtol=2e-5, err_msg=k)
  assert set(m) == set(want) | {"ewc/importance_mean", "ewc/importance_max", "ewc/importance_p50",
                                "ewc/importance_p90", "ewc/importance_p99"}
  assert all(v.shape == () and v.dtype == jnp.float32 for v in m.values())
  # the penalty equals the library's own ewc_penalty only as a cross-check (the reference is NumPy above)
  np.testing.assert_allclose(float(m["ewc/penalty"]), float(wj.ewc_penalty(jtree(P), jtree(ANCHOR), jtree(F), lam)),
                             rtol=1e-6)


def test_per_kind_strength_exponential_and_inject_hyperparams():
  tx = optax.inject_hyperparams(lambda learning_rate: wj.wva_adam(learning_rate, jtree(F), 2.0,
                                                                  viscosity="exponential"))(learning_rate=1e-3)
  m = wj.training_metrics(tx.init(jtree(P)), strength={"wva": 2.0}, viscosity="exponential", quantiles=(0.25,))
  f = cat(F)
  np.testing.assert_allclose(float(m["wva/attenuation_min"]), np.exp(-2.0 * f.max()), rtol=1e-6)
  np.testing.assert_allclose(float(m["wva/importance_p25"]), np.quantile(f, 0.25), rtol=1e-6)
  assert "wva/importance_p50" not in m


def test_two_states_of_a_kind_and_si():
  inner = optax.chain(optax.sgd(0.1), wj.wva_scale(jtree(F), 1.0), wj.wva_scale(None, 1.0))
  tx = wj.importance.path_integral(inner)
  state = tx.init(jtree(ANCHOR))
  updates, state = tx.update(jtree(G), state, jtree(ANCHOR))
  new = optax.apply_updates(jtree(ANCHOR), updates)
  m = wj.training_metrics(state, new, quantiles=())
  np.testing.assert_allclose(float(m["wva/importance_max"]), cat(F).max(), rtol=1e-6)
  assert float(m["wva_1/importance_max"]) == 0.0
  # SI: omega = -g * delta, delta = -0.1 * g / (1 + F) on the first WVA, and the second's importance is 0
  delta = -0.1 * cat(G) / (1 + cat(F))
  np.testing.assert_allclose(float(m["si/omega_mean"]), np.mean(-cat(G) * delta), rtol=1e-5)
  np.testing.assert_allclose(float(m["si/drift"]), np.linalg.norm(delta), rtol=1e-5)


def test_lora_state_matches_the_dense_form():
  a = RNG.normal(size=(4, 2)).astype(np.float32)
  b = RNG.normal(size=(2, 3)).astype(np.float32)
  f = RNG.random((4, 3)).astype(np.float32)
  adapters = {"w": {"lora_a": jnp.asarray(a), "lora_b": jnp.asarray(b)}}
  tx = optax.chain(optax.adam(1e-3), wj.lora_wva_scale({"w": jnp.asarray(f)}, 0.5))
  m = wj.training_metrics(tx.init(adapters), adapters, strength=0.5)
  dw = a.astype(np.float64) @ b
  np.testing.assert_allclose(float(m["lora/fisher_drift"]), 0.5 * np.sum(f * dw * dw), rtol=1e-5)
  np.testing.assert_allclose(float(m["lora/penalty"]), 0.25 * np.sum(f * dw * dw), rtol=1e-5)
  om_a = f @ (b * b).T          # Omega^A_ik = sum_j F_ij B_kj^2
  om_b = (a * a).T @ f          # Omega^B_kj = sum_i A_ik^2 F_ij
  att = 1 / (1 + 0.5 * np.concatenate([om_a.ravel(), om_b.ravel()]))
  np.testing.assert_allclose(float(m["lora/attenuation_min"]), att.min(), rtol=1e-5)
  np.testing.assert_allclose(float(m["lora/attenuation_mean"]), att.mean(), rtol=1e-5)


def test_nnx_optimizer():
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  opt = nnx.Optimizer(model, wj.wva_adam(1e-3, None, 4.0), wrt=nnx.Param)
  _, params = nnx.split(model, nnx.Param)
  imp = jax.tree_util.tree_map(lambda p: jnp.full(p.shape, 0.5), params)
  wj.set_importance(opt, imp)
  m = wj.training_metrics(opt, strength=4.0)
  np.testing.assert_allclose(float(m["wva/attenuation_mean"]), 1 / 3, rtol=1e-6)
  m2 = wj.training_metrics(opt.opt_state, strength=4.0)   # its opt_state too
  assert float(m2["wva/importance_p90"]) == 0.5


def test_errors():
  with pytest.raises(ValueError, match="contains no WVAState"):
    wj.training_metrics(optax.sgd(0.1).init(jtree(P)))
  state = wj.wva_scale(jtree(F), 1.0).init(jtree(P))
  with pytest.raises(ValueError, match="quantiles"):
    wj.training_metrics(state, quantiles=(1.5,))
  with pytest.raises(ValueError, match="strength has keys"):
    wj.training_metrics(state, strength={"wvaa": 1.0})
  with pytest.raises(ValueError, match=r"grads has no entry for the wva state.s \[.b.\]"):
    wj.training_metrics(state, grads={"a": jnp.ones((3, 4))}, strength=1.0)
