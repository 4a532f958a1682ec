"""Parameter transforms and custom rules: the engine against a per-example loop.

A model may compute its effective weights from its parameters before it
meets the data (``tanh(w)``, a weight norm, a merged ``W + A @ B``) or wrap
a weight in a ``custom_jvp`` / ``custom_vjp`` whose rule is not its body's
derivative (a straight-through fake-quant, a gradient scaling). The
reference is one ``jax.grad`` per example of the model as JAX
differentiates it (custom rules included), squared or absolute, summed in
float64 NumPy; compared element-wise.
"""
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import wva_jax as wj

C = 3


@jax.custom_jvp
def scale_grad(w):
  return w


@scale_grad.defjvp
def _scale_grad_jvp(primals, tangents):
  return primals[0], 0.1 * tangents[0]


@jax.custom_jvp
def ste_round(w):
  """Fake quantisation to a grid of 1/4 with a straight-through gradient."""
  return jnp.round(w * 4) / 4


@ste_round.defjvp
def _ste_jvp(primals, tangents):
  return ste_round(primals[0]), tangents[0]


@jax.custom_vjp
def clip_grad(w):
  return w


clip_grad.defvjp(lambda w: (w, None), lambda _, g: (jnp.clip(g, -0.05, 0.05),))


@jax.custom_jvp
def gated(x, w):
  """A layer with its own rule in the activation path: data and a weight together."""
  return jnp.tanh(x @ w)


@gated.defjvp
def _gated_jvp(primals, tangents):
  x, w = primals
  dx, dw = tangents
  y = gated(x, w)
  return y, 0.5 * (dx @ w + x @ dw)  # deliberately not the body's derivative


def reference(apply_fn, params, x, y, what):
  """sum_b R(g_b) / n in float64, one jax.grad per example."""
  if what == "fisher":
    f = lambda p, xb, yb: jax.nn.log_softmax(apply_fn(p, xb))[0, yb]
    R = np.square
  else:
    f = lambda p, xb, yb: jnp.sum(apply_fn(p, xb) ** 2)
    R = np.abs
  grad = jax.jit(jax.grad(f))
  acc = jax.tree.map(lambda a: np.zeros(a.shape, np.float64), params)
  for b in range(x.shape[0]):
    g = grad(params, x[b:b + 1], y[b])
    acc = jax.tree.map(lambda a, v: a + R(np.asarray(v, np.float64)), acc, g)
  return jax.tree.map(lambda a: a / x.shape[0], acc)


def engine(apply_fn, params, x, y, what):
  if what == "fisher":
    return jax.jit(lambda p: wj.importance.fisher(apply_fn, p, x, y, chunk_size=5))(params)
  return jax.jit(lambda p: wj.importance.mas(apply_fn, p, x, chunk_size=5))(params)


def assert_close(got, want, rtol=1e-4):
  for path, g in jax.tree_util.tree_leaves_with_path(got):
    w = np.asarray(_at(want, path))
    atol = 1e-6 * max(float(np.abs(w).max()), 1e-12)
    np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=rtol, atol=atol,
                               err_msg=jax.tree_util.keystr(path))


def _at(tree, path):
  for k in path:
    tree = tree[k.key if hasattr(k, "key") else k.idx]
  return tree


def _data(seed=0, n=13, d=5):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
  y = jnp.asarray(rng.integers(0, C, n))
  p = {"w": jnp.asarray(rng.normal(size=(d, C)), jnp.float32), "b": jnp.asarray(rng.normal(size=C), jnp.float32),
       "g": jnp.asarray(rng.normal(size=C) + 2, jnp.float32), "a": jnp.asarray(rng.normal(size=(d, 2)), jnp.float32),
       "u": jnp.asarray(rng.normal(size=(2, C)), jnp.float32)}
  return p, x, y


MODELS = {
    "gradient scaling (custom_jvp)": lambda p, x: x @ scale_grad(p["w"]) + p["b"],
    "straight-through fake-quant (custom_jvp)": lambda p, x: x @ ste_round(p["w"]) + p["b"],
    "clipped gradient (custom_vjp)": lambda p, x: x @ clip_grad(p["w"]) + p["b"],
    "tanh of a weight": lambda p, x: x @ jnp.tanh(p["w"]) + p["b"],
    "weight norm": lambda p, x: x @ (p["g"] * p["w"] / jnp.linalg.norm(p["w"], axis=0)) + p["b"],
    "merged W + A @ B": lambda p, x: x @ (p["w"] + p["a"] @ p["u"]) + p["b"],
    "transform and direct use": lambda p, x: jnp.tanh(x @ jnp.tanh(p["w"]) + p["b"]) @ (p["u"].T @ p["u"]),
    "bf16 cast after a transform": lambda p, x: (x.astype(jnp.bfloat16) @ jnp.tanh(p["w"]).astype(jnp.bfloat16)
                                                 ).astype(jnp.float32) + p["b"],
    "custom rule in the activation path": lambda p, x: gated(x, p["w"]) @ p["u"].T @ p["u"] + p["b"],
    # issue 19's "common linear ops on weights": a scale by a constant divisor, a static window
    # of a larger table (dynamic_slice at constant offsets), a negated bias
    "div by a constant and dynamic_slice": lambda p, x: (
        x @ (p["w"] / 3.0) + jax.lax.dynamic_slice(p["a"] @ p["u"], (1, 0), (1, C))[0] - p["b"]),
}


@pytest.mark.slow  # 18 cases, each compiling the engine and the reference
@pytest.mark.parametrize("what", ["fisher", "mas"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_transform_and_custom_rule_match_per_example_loop(name, what):
  params, x, y = _data()
  model = MODELS[name]
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", wj.importance.FallbackWarning)
    got = engine(model, params, x, y, what)
  rtol = 2e-2 if "bf16" in name else 1e-4
  assert_close(got, reference(model, params, x, y, what), rtol=rtol)


@pytest.mark.slow  # three engine compiles; the transform cases are in the slow matrix too
def test_custom_rules_are_respected_not_their_bodies():
  """The numbers the issue reported: gradient x0.1 gives Fisher x0.01; STE is not zero."""
  params, x, y = _data(1)
  plain = engine(lambda p, x: x @ p["w"] + p["b"], params, x, y, "fisher")["w"]
  scaled = engine(MODELS["gradient scaling (custom_jvp)"], params, x, y, "fisher")["w"]
  np.testing.assert_allclose(np.asarray(scaled), 0.01 * np.asarray(plain), rtol=1e-5)
  ste = engine(MODELS["straight-through fake-quant (custom_jvp)"], params, x, y, "fisher")["w"]
  assert float(jnp.min(ste)) > 0


def test_report_names_transforms_and_no_fallback_for_them():
  params, x, _ = _data()
  report = wj.importance.engine_report(MODELS["weight norm"], params, x)
  assert report["w"].startswith("transform") and report["g"].startswith("transform"), report
  assert report["b"] == "bias"
  # a divisor or a window at constant offsets is a parameter transform, on the fast path
  report = wj.importance.engine_report(MODELS["div by a constant and dynamic_slice"], params, x)
  assert report["w"] == "transform (div)" and report["a"].startswith("transform"), report
  with warnings.catch_warnings():
    warnings.simplefilter("error", wj.importance.FallbackWarning)
    wj.importance.fisher(MODELS["straight-through fake-quant (custom_jvp)"], params, x, _data()[2])
  # a weight inside a custom rule that also reads the data leaves the fast path, with a warning
  report = wj.importance.engine_report(MODELS["custom rule in the activation path"], params, x)
  assert report["w"] == "fallback: used by custom_jvp_call", report


@pytest.mark.slow
def test_flax_weight_norm_convolution():
  """flax.linen.WeightNorm around a Conv: kernel, bias and the norm's scale."""
  model = nn.WeightNorm(nn.Conv(4, (3,)))
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(9, 6, 3)), jnp.float32)
  y = jnp.asarray(rng.integers(0, C, 9))
  variables = model.init(jax.random.key(0), x)
  head = jnp.asarray(rng.normal(size=(24, C)) / 5, jnp.float32)
  apply_fn = lambda p, x: model.apply(p, x).reshape(x.shape[0], -1) @ head
  report = wj.importance.engine_report(apply_fn, variables, x)
  assert all(v.startswith("transform") or v == "bias" for v in report.values()), report
  for what in ("fisher", "mas"):
    with warnings.catch_warnings():
      warnings.simplefilter("error", wj.importance.FallbackWarning)
      got = engine(apply_fn, variables, x, y, what)
    assert_close(got, reference(apply_fn, variables, x, y, what))


# ---- issue 27 item 9: the same transforms under remat, inside jit and in a scan's body

def _gates(p, x):
  return x @ (jax.nn.softplus(p["a"]) @ (jax.nn.sigmoid(p["g"]) * p["u"])) + p["b"]


@jax.jit
def _jitted_gates(p, x):
  return _gates(p, x)


def _recurrent(p, x):
  """A recurrent cell whose gates are computed from closed-over parameters at every step."""
  def cell(h, _):
    gate = jax.nn.sigmoid(p["a"])   # [d, 2], recomputed at every step inside the scan body
    return jnp.tanh(h @ (gate @ gate.T) * 0.3 + x), None
  h, _ = jax.lax.scan(cell, x, None, length=3)
  return h @ (jax.nn.softplus(p["g"]) * p["w"])


HOISTED = {
    "under jax.checkpoint (nn.remat)": lambda p, x: jax.checkpoint(_gates)(p, x),
    "under remat inside jit": lambda p, x: jax.jit(jax.checkpoint(_gates))(p, x),
    "one jitted layer called twice": lambda p, x: _jitted_gates(p, x) + _jitted_gates(p, 2 * x),
    "loop invariants of a time scan": _recurrent,
}


@pytest.mark.parametrize("name", [n if n.startswith("under jax.checkpoint") else pytest.param(n, marks=pytest.mark.slow)
                                  for n in sorted(HOISTED)])   # ~4 s each: one in the fast suite
def test_transforms_under_remat_jit_and_scan_are_on_the_fast_path(name):
  params, x, y = _data()
  model = HOISTED[name]
  report = wj.importance.engine_report(model, params, x)
  assert not [r for r in report.values() if r.startswith("fallback")], report
  with warnings.catch_warnings():
    warnings.simplefilter("error", wj.importance.FallbackWarning)
    got = engine(model, params, x, y, "fisher")
  assert_close(got, reference(model, params, x, y, "fisher"))
