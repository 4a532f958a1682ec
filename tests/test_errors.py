"""Bad input gets a ValueError/TypeError that names the bad value."""
import jax
import jax.numpy as jnp
import optax
import pytest

import wva_jax as wj

PARAMS = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
APPLY = lambda p, x: x @ p["w"] + p["b"]
X, Y = jnp.ones((4, 3)), jnp.array([0, 1, 0, 1])
GOOD = {"w": jnp.ones((3, 2)), "b": jnp.ones(2)}


@pytest.mark.parametrize("factory", [
    lambda imp: wj.wva_scale(imp, 1.0),
    lambda imp: wj.add_ewc(PARAMS, imp, 1.0),
    lambda imp: wj.implicit_ewc(PARAMS, imp, 1.0, learning_rate=0.1),
])
@pytest.mark.parametrize("bad,match", [
    ({"w": -jnp.ones((3, 2)), "b": jnp.ones(2)}, r"importance\['w'\] has negative"),
    ({"w": jnp.full((3, 2), jnp.nan), "b": jnp.ones(2)}, r"importance\['w'\] contains NaN"),
    ({"w": jnp.ones((3, 2)), "b": jnp.array([1.0, jnp.inf])}, r"importance\['b'\] contains inf"),
])
def test_bad_importance_values(factory, bad, match):
  with pytest.raises(ValueError, match=match):
    factory(bad)


@pytest.mark.parametrize("bad,match", [
    ({"w": jnp.ones((2, 3)), "b": jnp.ones(2)}, r"importance\['w'\] has shape \(2, 3\).*\(3, 2\)"),
    ({"w": jnp.ones((3, 2))}, "tree structure"),
])
def test_importance_not_shaped_like_params(bad, match):
  tx = wj.wva_scale(bad, 1.0)
  with pytest.raises(ValueError, match=match):
    tx.init(PARAMS)
  state = wj.wva_scale(GOOD, 1.0).init(PARAMS)
  with pytest.raises(ValueError, match=match):
    wj.set_importance(state, bad)


def test_anchor_not_shaped_like_params():
  with pytest.raises(ValueError, match=r"anchor\['b'\] has shape \(3,\)"):
    wj.add_ewc({"w": jnp.ones((3, 2)), "b": jnp.ones(3)}, GOOD, 1.0).init(PARAMS)
  with pytest.raises(ValueError, match="anchor"):
    wj.ewc_penalty(PARAMS, {"w": jnp.ones((3, 2))}, GOOD, 1.0)
  with pytest.raises(ValueError, match=r"anchor\['w'\] contains NaN"):
    wj.add_ewc({"w": jnp.full((3, 2), jnp.nan), "b": jnp.ones(2)}, GOOD, 1.0)


@pytest.mark.parametrize("strength", [-1.0, float("nan"), float("inf")])
def test_bad_strength(strength):
  for make in (lambda: wj.wva_scale(GOOD, strength), lambda: wj.add_ewc(PARAMS, GOOD, strength),
               lambda: wj.wva_adam(1e-3, GOOD, strength), lambda: wj.ewc_penalty(PARAMS, PARAMS, GOOD, strength)):
    with pytest.raises(ValueError, match=f"strength must be finite and >= 0, got {strength}"):
      make()


def test_non_numeric_strength():
  with pytest.raises(TypeError, match="strength must be a number, got 'big'"):
    wj.wva_scale(GOOD, "big")


def test_unknown_viscosity_mode_engine_reduce():
  with pytest.raises(ValueError, match="viscosity must be one of .* got 'cubic'"):
    wj.wva_scale(GOOD, 1.0, viscosity="cubic")
  with pytest.raises(ValueError, match="mode must be one of .* got 'true'"):
    wj.importance.fisher(APPLY, PARAMS, X, Y, mode="true")
  with pytest.raises(ValueError, match="engine must be one of .* got 'gpu'"):
    wj.importance.fisher(APPLY, PARAMS, X, Y, engine="gpu")
  with pytest.raises(ValueError, match="by must be one of .* got 'median'"):
    wj.importance.normalize(GOOD, by="median")


def test_fisher_input_errors():
  with pytest.raises(ValueError, match="needs key"):
    wj.importance.fisher(APPLY, PARAMS, X, mode="sampled")
  with pytest.raises(ValueError, match="needs targets"):
    wj.importance.fisher(APPLY, PARAMS, X)
  with pytest.raises(ValueError, match=r"targets have leading size \(3,\), but inputs have 4"):
    wj.importance.fisher(APPLY, PARAMS, X, Y[:3])
  with pytest.raises(ValueError, match=r"probability targets have shape \(4, 3\), expected \(4, 2\)"):
    wj.importance.fisher(APPLY, PARAMS, X, jnp.ones((4, 3)))
  with pytest.raises(ValueError, match=r"mask has shape \(4, 2\), expected \(4,\)"):
    wj.importance.fisher(APPLY, PARAMS, X, Y, mask=jnp.ones((4, 2)))
  with pytest.raises(ValueError, match=r"mask has shape \(4, 2\), expected \(4,\)"):
    wj.importance.mas(APPLY, PARAMS, X, mask=jnp.ones((4, 2)))
  with pytest.raises(ValueError, match="logits"):
    wj.importance.fisher(lambda p, x: (x @ p["w"]).sum(-1), PARAMS, X, Y)


@pytest.mark.parametrize("estimator", [
    lambda x: wj.importance.fisher(APPLY, PARAMS, x, jnp.zeros((0,), jnp.int32)),
    lambda x: wj.importance.mas(APPLY, PARAMS, x),
])
def test_empty_batch(estimator):
  with pytest.raises(ValueError, match="empty batch"):
    estimator(jnp.ones((0, 3)))


@pytest.mark.parametrize("chunk", [0, -2, 2.5, True])
def test_bad_chunk_size(chunk):
  with pytest.raises(ValueError, match=f"chunk_size must be a positive int or None, got {chunk!r}"):
    wj.importance.mas(APPLY, PARAMS, X, chunk_size=chunk)


def test_inputs_with_mismatched_leading_sizes():
  with pytest.raises(ValueError, match=r"different leading sizes \[3, 4\]"):
    wj.importance.mas(lambda p, d: APPLY(p, d["a"]), PARAMS, {"a": X, "b": jnp.ones((3, 1))})


def test_set_importance_without_a_consolidation_state():
  with pytest.raises(ValueError, match="contains no WVAState or EWCState"):
    wj.set_importance(optax.adam(1e-3).init(PARAMS), GOOD)
  with pytest.raises(ValueError, match="contains no EWCState"):
    wj.set_anchor(wj.wva_sgd(0.1, GOOD).init(PARAMS), PARAMS)


def test_set_importance_rejects_negative_values():
  state = wj.wva_sgd(0.1, GOOD).init(PARAMS)
  with pytest.raises(ValueError, match=r"importance\['b'\] has negative"):
    wj.set_importance(state, {"w": jnp.ones((3, 2)), "b": jnp.array([1.0, -1.0])})


def test_path_integral_and_si_errors():
  opt = wj.importance.path_integral(optax.sgd(0.1))
  state = opt.init(PARAMS)
  with pytest.raises(ValueError, match="needs params"):
    opt.update(PARAMS, state)
  with pytest.raises(ValueError, match="exactly one PathIntegralState, found 0"):
    wj.importance.si(optax.sgd(0.1).init(PARAMS), PARAMS)
  with pytest.raises(ValueError, match="damping must be finite and > 0, got -1.0"):
    wj.importance.si(state, PARAMS, damping=-1.0)


def test_metrics_need_a_square_matrix():
  with pytest.raises(ValueError, match=r"square \[..., T, T\] accuracy matrix, got shape \(2, 3\)"):
    wj.metrics.average_accuracy(jnp.ones((2, 3)))
  with pytest.raises(ValueError, match="at least 2 tasks"):
    wj.metrics.forgetting([[1.0]])


def test_checks_do_not_break_tracing():
  # Under jit the importance is a tracer: value checks are skipped, not crashed on.
  @jax.jit
  def f(imp, lam):
    tx = wj.wva_scale(imp, lam)
    return tx.update(PARAMS, tx.init(PARAMS))[0]
  assert f(GOOD, 1.0)["w"].shape == (3, 2)
