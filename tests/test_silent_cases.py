"""The last silent cases of the estimators (issue 27 items 6, 7, 11), against per-example loops."""
from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import wva_jax as wj

B, T, D, C = 6, 5, 4, 7


def _model(p, x):   # [B, T, D] -> logits [B, T, C]
  return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]


def _setup():
  rng = np.random.default_rng(0)
  p = {"w1": jnp.asarray(rng.normal(size=(D, 8)), jnp.float32), "b1": jnp.zeros(8),
       "w2": jnp.asarray(rng.normal(size=(8, C)), jnp.float32)}
  x = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
  y = rng.integers(0, C, size=(B, T))
  y[0, 1] = y[2, 4] = y[3, 0] = -100   # Hugging Face's ignored positions
  return p, x, jnp.asarray(y)


def _loop_fisher(p, x, y):
  """Per-example loop: (d/dtheta sum over the non-ignored positions of log p(y_t | x_b))^2, mean over B."""
  total = jax.tree_util.tree_map(lambda a: np.zeros(a.shape, np.float64), p)
  for b in range(B):
    def ll(p, b=b):
      logp = jax.nn.log_softmax(_model(p, x[b:b + 1])[0], axis=-1)
      return sum(logp[t, int(y[b, t])] for t in range(T) if int(y[b, t]) != -100)
    g = jax.grad(ll)(p)
    total = jax.tree_util.tree_map(lambda s, gg: s + np.asarray(gg, np.float64) ** 2, total, g)
  return jax.tree_util.tree_map(lambda s: s / B, total)


def _close(a, b):
  for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(np.asarray(u), v, rtol=2e-5, atol=1e-7)


@pytest.mark.slow   # ~11 s (jit) and ~12 s (eager) of compiles: CI's whole-suite run
@pytest.mark.parametrize("jit", [False, True])
def test_ignore_index_drops_positions(jit):
  p, x, y = _setup()
  want = _loop_fisher(p, x, y)
  f = lambda p: wj.importance.fisher(_model, p, x, y)
  _close((jax.jit(f) if jit else f)(p), want)
  g = lambda p: wj.importance.grad_and_fisher(_model, p, x, y)
  loss, grads, fisher = (jax.jit(g) if jit else g)(p)
  _close(fisher, want)
  logp = jax.nn.log_softmax(_model(p, x), axis=-1)
  keep = np.asarray(y) != -100
  nll = -sum(float(logp[b, t, int(y[b, t])]) for b in range(B) for t in range(T) if keep[b, t]) / B
  np.testing.assert_allclose(float(loss), nll, rtol=1e-5)


@pytest.mark.slow   # four compiles of the engine (~11 s)
def test_out_of_range_targets_are_loud_under_jit():
  p, x, y = _setup()
  y = y.at[1, 2].set(C)   # one class past the end (not IGNORE_INDEX)
  with pytest.raises(ValueError, match=r"targets must be class indices in \[0, 7\)"):
    wj.importance.fisher(_model, p, x, y)
  f = jax.jit(lambda p, y: wj.importance.fisher(_model, p, x, y))
  assert all(np.isnan(np.asarray(l)).all() for l in jax.tree_util.tree_leaves(f(p, y)))
  loss, grads, fisher = jax.jit(lambda p, y: wj.importance.grad_and_fisher(_model, p, x, y))(p, y)
  assert np.isnan(float(loss))
  assert all(np.isnan(np.asarray(l)).all() for l in jax.tree_util.tree_leaves((grads, fisher)))
  with pytest.raises(ValueError, match="contains NaN"):   # and it cannot reach an optimizer quietly
    wj.set_importance(wj.wva_sgd(0.1).init(p), f(p, y))


class _OwnVariables:
  """What a Keras model looks like to JAX: it reads its own weights, not the ``params`` argument."""

  def __init__(self, p):
    self.p = p

  def __call__(self, x):
    return _model(self.p, x)


@pytest.mark.parametrize("estimator", ["fisher", *(pytest.param(e, marks=pytest.mark.slow)
                                                   for e in ("fisher_vmap", "mas", "sig", "grad_and_fisher"))])
def test_params_that_never_reach_the_outputs_are_refused(estimator):
  p, x, y = _setup()
  model = _OwnVariables(p)
  apply_fn = lambda params, x: model(x)   # the Keras trap: params ignored, every importance zero
  call = {"fisher": lambda: wj.importance.fisher(apply_fn, p, x, y),
          "fisher_vmap": lambda: wj.importance.fisher(apply_fn, p, x, y, engine="vmap"),
          "mas": lambda: wj.importance.mas(apply_fn, p, x),
          "sig": lambda: wj.importance.sig(apply_fn, p, x),
          "grad_and_fisher": lambda: jax.jit(lambda q: wj.importance.grad_and_fisher(apply_fn, q, x, y))(p)}
  with pytest.raises(ValueError, match="no float parameter reaches"):
    call[estimator]()


@pytest.mark.slow   # ~8 s
def test_a_model_reading_some_params_is_accepted():
  p, x, y = _setup()
  partly = lambda q, x: _model({**q, "w1": p["w1"]}, x)   # w1 closed over, b1 and w2 read
  f = wj.importance.fisher(partly, p, x, y)
  assert float(jnp.abs(f["w1"]).max()) == 0.0 and float(f["w2"].max()) > 0


class _JaxArrayLike:
  """A framework variable JAX reads through ``__jax_array__`` (Keras's ``Variable`` does)."""

  def __init__(self, value):
    self.value = value

  def __jax_array__(self):
    return self.value


def test_variable_objects_as_params_name_the_fix():
  p, x, y = _setup()
  wrapped = {k: _JaxArrayLike(v) for k, v in p.items()}
  with pytest.raises(TypeError, match=r"params\['b1'\] is a .*_JaxArrayLike, not an array"):
    wj.importance.fisher(_model, wrapped, x, y)


@pytest.mark.slow   # ~4 s
def test_engine_report_runs_the_batch_independence_probe():
  p, x, _ = _setup()
  rolled = lambda q, x: jnp.roll(_model(q, x), 1, axis=0)
  with pytest.raises(ValueError, match="mixes examples"):
    wj.importance.engine_report(rolled, p, x)
  assert wj.importance.engine_report(_model, p, x)["w2"] == "dense/positions"


# ---- issue 27 item 10: ragged_dot (sorted MoE) under sig and the vmap reference path

def _moe_parts():
  from test_independence import P as MP
  from test_independence import X as MX
  from test_independence import Y as MY
  from test_independence import moe_sorted
  return moe_sorted, MP, MX, MY


def _moe_dense(p, x):
  """The same MoE without ragged_dot: every expert on every token, the routed one selected."""
  b, t, d = x.shape
  tokens = x.reshape(b * t, d)
  logits = tokens @ p["router"]
  expert = jnp.argmax(logits, -1)
  gate = jnp.take_along_axis(jax.nn.softmax(logits), expert[:, None], -1)
  h = jnp.einsum("nd,edh->neh", tokens, p["experts"])
  h = jnp.take_along_axis(h, expert[:, None, None], 1)[:, 0]
  return (jnp.tanh(h) * gate @ p["head"]).reshape(b, t, -1)


@pytest.mark.slow   # a per-example loop and four estimator compiles (~25 s)
def test_ragged_dot_under_the_vmap_reference_and_sig():
  moe_sorted, p, x, y = _moe_parts()
  n = x.shape[0]
  want = jax.tree_util.tree_map(lambda a: np.zeros(a.shape), p)   # per-example loop on the ragged model
  for b in range(n):
    g = jax.grad(lambda q: jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(moe_sorted(q, x[b:b + 1])[0]),
                                                       y[b][:, None], -1)))(p)
    want = jax.tree_util.tree_map(lambda s, gg: s + np.asarray(gg, np.float64) ** 2 / n, want, g)
  for engine in ("vmap", "auto"):
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", wj.importance.FallbackWarning)
      _close(wj.importance.fisher(moe_sorted, p, x, y, engine=engine), want)
  with pytest.warns(wj.importance.FallbackWarning, match="experts"):
    got = wj.importance.sig(moe_sorted, p, x)
  ref = wj.importance.sig(_moe_dense, p, x)   # the same signals, through dense ops
  for k in ("router", "head"):
    np.testing.assert_allclose(np.asarray(got[k]), np.asarray(ref[k]), rtol=1e-5, err_msg=k)
  np.testing.assert_allclose(np.asarray(got["experts"]), np.abs(np.asarray(p["experts"])), rtol=1e-6)
