"""Bad input gets a ValueError/TypeError that names the bad value."""
import jax
import jax.numpy as jnp
import numpy as np
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
    ({"w": jnp.ones((3, 2))}, r"importance has no entry for .*\['b'\]"),
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


def test_value_checks_leave_no_live_buffers():
  # the checks reduce on device; op-by-op (or traced under compile-time evaluation) jax
  # kept the reductions' inf constants alive for good, one per leaf shape: a memory
  # accounting of a donated step (benchmarks/elephants_1b.py) found them
  params = {f"w{i}": jnp.ones((i + 1, 3)) for i in range(5)}
  state = wj.wva_sgd(0.1, None, 1.0).init(params)
  before = {id(a) for a in jax.live_arrays()}
  state = wj.set_importance(state, {k: v * 2 for k, v in params.items()})
  new = [a for a in jax.live_arrays() if id(a) not in before]
  assert sorted(a.shape for a in new) == sorted(v.shape for v in params.values())  # the state's copy only


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


def test_fisher_refuses_out_of_range_targets():
  # one_hot would turn class 2 of 2 (or -1) into a zero row: a finite, wrong Fisher.
  # (Few calls: each one traces the model.)
  for targets, value in ((jnp.array([0, 1, 2, 1]), 2), (np.array([0, -1, 0, 1]), -1), ([0, 7, -3, 1], -3)):
    with pytest.raises(ValueError, match=rf"class indices in \[0, 2\).*got {value}(\D|$)"):
      wj.importance.fisher(APPLY, PARAMS, X, targets)
  # concrete targets closed over by a jitted function are still checked
  # (inside the trace, jnp ops on them would give tracers)
  closed = jnp.array([0, 1, 2, 1])
  with pytest.raises(ValueError, match=r"got 2(\D|$)"):
    jax.jit(lambda p: wj.importance.fisher(APPLY, p, X, closed))(PARAMS)
  # sequence targets [B, T] too
  seq_apply = lambda p, x: jnp.stack([APPLY(p, x)] * 3, axis=1)
  with pytest.raises(ValueError, match=r"got -1(\D|$)"):
    wj.importance.fisher(seq_apply, PARAMS, X, jnp.array([[0, 1, 1], [1, 0, -1], [0, 0, 0], [1, 1, 1]]))


def test_fisher_with_traced_targets_works_under_jit():
  """Traced targets cannot be checked (no error); in-range ones give the eager result, by hand."""
  w = jnp.array([[0.3, -0.2], [0.1, 0.5], [-0.4, 0.2]])
  params = {"w": w, "b": jnp.array([0.1, -0.1])}
  x = jnp.array([[1.0, 0.5, -1.0], [0.2, -0.3, 0.8], [0.0, 1.0, 1.0], [-0.5, 0.5, 0.0]])
  y = jnp.array([0, 1, 1, 0])
  jitted = jax.jit(lambda p, x, y: wj.importance.fisher(APPLY, p, x, y))
  got = jitted(params, x, y)
  # by hand: d log softmax(z)_y / dz = e_y - p; dW = x (e_y - p)^T, db = e_y - p
  xs, ys = np.asarray(x, np.float64), np.asarray(y)
  z = xs @ np.asarray(w, np.float64) + np.array([0.1, -0.1])
  p = np.exp(z - z.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  d = np.eye(2)[ys] - p
  want_w = np.mean([np.outer(xs[b], d[b]) ** 2 for b in range(4)], axis=0)
  want_b = np.mean(d ** 2, axis=0)
  np.testing.assert_allclose(got["w"], want_w, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(got["b"], want_b, rtol=1e-5, atol=1e-7)
  # out of range but traced: not checked (the documented limit), no error
  jitted(params, x, jnp.array([0, 1, 2, 0]))
