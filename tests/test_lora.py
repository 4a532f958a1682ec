"""LoRA consolidation: EWC on the effective update A @ B and WVA on adapters (wva_jax/lora/).

References are independent of the module: the dense form
``strength/2 * sum F * (A @ B)^2`` differentiated by ``jax.grad``, the
Hessian of that form for the pulled-back importance, and for ``nnx`` the
effective update read off the model's own forward pass.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import wva_jax as wj

HI = jax.lax.Precision.HIGHEST


def dense_delta(a, b):
  return jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32), precision=HI)


def dense_penalty(adapters, importance, strength):
  """The dense reference: every layer's A @ B formed, summed, differentiated by autodiff."""
  return 0.5 * strength * sum(jnp.sum(importance[k].astype(jnp.float32) * dense_delta(v["A"], v["B"]) ** 2)
                              for k, v in adapters.items())


def random_adapters(seed, dtype=jnp.float32):
  """Three adapters of random small shapes, one of them stacked over layers [L, d_in, r]."""
  rng = np.random.default_rng(seed)
  adapters, imp = {}, {}
  for name, lead in (("q", ()), ("v", ()), ("mlp", (int(rng.integers(2, 4)),))):
    d_in, d_out, r = (int(x) for x in rng.integers(1, 9, size=3))
    adapters[name] = {"A": jnp.asarray(rng.normal(size=lead + (d_in, r)), dtype),
                      "B": jnp.asarray(rng.normal(size=lead + (r, d_out)), dtype)}
    imp[name] = jnp.asarray(rng.exponential(size=lead + (d_in, d_out)), jnp.float32)
  return adapters, imp


def max_rel(x, y):
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  return float(np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-30))


@pytest.mark.parametrize("dtype", [jnp.float32, pytest.param(jnp.bfloat16, marks=pytest.mark.slow)])
# the second random draw and bfloat16 only in the full run: each case compiles for ~5 s
@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_closed_form_gradient_equals_autodiff_of_dense_form(seed, dtype):
  adapters, imp = random_adapters(seed, dtype)
  strength = 0.7
  want_val = dense_penalty(adapters, imp, strength)
  want = jax.grad(dense_penalty)(adapters, imp, strength)   # in the adapters' dtype (bf16 rounded once)
  # The reference computed in float32 from the same (bf16) values, rounded once to the adapters' dtype.
  want32 = jax.grad(lambda ad: dense_penalty(jax.tree.map(lambda x: x.astype(jnp.float32), ad), imp, strength))(
      adapters)
  closed = wj.lora_ewc_grad(adapters, imp, strength)
  by_vjp = jax.grad(wj.lora_ewc_penalty)(adapters, imp, strength)   # the custom_vjp
  val = wj.lora_ewc_penalty(adapters, imp, strength)
  assert val.dtype == jnp.float32
  assert max_rel(val, want_val) < 1e-6
  tol = 1e-6 if dtype == jnp.float32 else 2 ** -8   # one bf16 rounding of the same float32 number
  for got in (closed, by_vjp):
    assert jax.tree.map(lambda x: x.dtype, got) == jax.tree.map(lambda x: x.dtype, adapters)
    for k in adapters:
      for ab in "AB":
        assert max_rel(got[k][ab], want32[k][ab]) < tol, (k, ab)
        if dtype == jnp.float32:
          assert max_rel(got[k][ab], want[k][ab]) < 1e-6, (k, ab)


@pytest.mark.slow   # issue 20: the default run (the fast subset) stays within 3 minutes on 2 cores
def test_gradient_in_importance_and_strength_equals_dense_form():
  adapters, imp = random_adapters(7)
  got_imp, got_s = jax.grad(wj.lora_ewc_penalty, argnums=(1, 2))(adapters, imp, 0.3)
  want_imp, want_s = jax.grad(dense_penalty, argnums=(1, 2))(adapters, imp, 0.3)
  assert max_rel(got_s, want_s) < 1e-6
  for k in imp:
    assert max_rel(got_imp[k], want_imp[k]) < 1e-6
  # strength traced (under vmap, as the experiments build optimizers): same numbers.
  vals = jax.vmap(lambda s: wj.lora_ewc_penalty(adapters, imp, s))(jnp.array([0.3, 1.0]))
  assert max_rel(vals, jnp.stack([dense_penalty(adapters, imp, s) for s in (0.3, 1.0)])) < 1e-6


def test_one_layer_product_at_a_time():
  """Compiled peak of value-and-grad over many layers stays at about one layer's dense product."""
  layers, d, r = 8, 128, 2
  key = jax.random.key(0)
  adapters = {f"l{i}": {"A": jax.random.normal(jax.random.fold_in(key, i), (d, r)),
                        "B": jax.random.normal(jax.random.fold_in(key, 100 + i), (r, d))} for i in range(layers)}
  imp = {k: jnp.ones((d, d)) for k in adapters}
  one = d * d * 4   # one layer's float32 product
  step = jax.jit(jax.value_and_grad(wj.lora_ewc_penalty))
  temp = step.lower(adapters, imp, 1.0).compile().memory_analysis().temp_size_in_bytes
  assert temp < 3 * one, (temp, one)
  stacked = {"s": {"A": jnp.stack([v["A"] for v in adapters.values()]),
                   "B": jnp.stack([v["B"] for v in adapters.values()])}}
  temp_s = step.lower(stacked, {"s": jnp.ones((layers, d, d))}, 1.0).compile().memory_analysis().temp_size_in_bytes
  assert temp_s < 3 * one, (temp_s, one)
  val, g = step(stacked, {"s": jnp.ones((layers, d, d))}, 1.0)
  val_l, g_l = step(adapters, imp, 1.0)
  assert max_rel(val, val_l) < 1e-6
  assert max_rel(g["s"]["B"][3], g_l["l3"]["B"]) < 1e-6


@pytest.mark.slow   # lowers two programs of 20 and 80 adapters
def test_program_size_linear_in_adapters():
  """A real LLM has hundreds of adapters (SmolLM2: 30 layers x 7 matrices = 210): the sequenced program's
  size must grow linearly with their count. Carrying every output through every branch grew it
  quadratically, and XLA's compile time cubically (120 adapters: 136 s; 210 did not finish in 6 min)."""
  def size(n):
    adapters = {f"l{i}": {"A": jnp.ones((6, 2)), "B": jnp.ones((2, 5 + i % 3))} for i in range(n)}
    imp = {k: jnp.ones((6, v["B"].shape[1])) for k, v in adapters.items()}
    tx = wj.add_lora_ewc(imp, 1.0)
    step = jax.jit(lambda p, s: tx.update(p, s, p))
    return len(step.lower(adapters, tx.init(adapters)).as_text())
  small, large = size(20), size(80)
  assert large < 5 * small, (small, large)   # linear: about 4x; quadratic: about 16x


class Net(nnx.Module):
  def __init__(self, rngs):
    self.l1 = nnx.LoRALinear(5, 6, lora_rank=2, rngs=rngs)
    self.l2 = nnx.LoRA(6, 3, 4, base_module=nnx.Linear(6, 4, rngs=rngs), rngs=rngs)

  def __call__(self, x):
    return self.l2(jnp.tanh(self.l1(x)))


# slow: it also needs nnx.as_pure, which flax 0.12.2 (the oldest supported, where
# CI runs only the fast subset) lacks
@pytest.mark.slow
def test_nnx_lora_penalty_equals_dense_formula_on_merged_minus_base():
  model = Net(nnx.Rngs(0))
  graphdef, lora, base = nnx.split(model, nnx.LoRAParam, nnx.Param)
  apply_fn = lambda p, x: nnx.merge(graphdef, lora, p)(x)   # lora_b = 0 at init: the pretrained model
  x = jax.random.normal(jax.random.key(1), (32, 5))
  y = jax.random.randint(jax.random.key(2), (32,), 0, 4)
  base_imp = wj.importance.fisher(apply_fn, base, x, y)
  imp = wj.lora_importance(lora, base_imp)
  np.testing.assert_array_equal(imp["l1"]["lora"], base_imp["l1"]["kernel"][...])
  np.testing.assert_array_equal(imp["l2"], base_imp["l2"]["base_module"]["kernel"][...])

  # Train-like adapters: non-zero lora_b.
  for i, layer in enumerate((model.l1.lora, model.l2)):
    layer.lora_b[...] = jax.random.normal(jax.random.key(10 + i), layer.lora_b[...].shape)
  lora = nnx.state(model, nnx.LoRAParam)
  # The effective update from the model's own forward pass (no orientation assumed): W_eff - W_base.
  merged_minus_base = {"l1": model.l1(jnp.eye(5)) - nnx.Linear.__call__(model.l1, jnp.eye(5)),
                       "l2": model.l2(jnp.eye(6)) - model.l2.base_module(jnp.eye(6))}
  kernel_imp = {"l1": base_imp["l1"]["kernel"][...], "l2": base_imp["l2"]["base_module"]["kernel"][...]}
  want = 0.5 * 1.5 * sum(jnp.sum(kernel_imp[k] * merged_minus_base[k] ** 2) for k in ("l1", "l2"))
  got = wj.lora_ewc_penalty(lora, imp, 1.5)
  assert max_rel(got, want) < 1e-5

  # nnx.Optimizer over the adapters only; set_importance reaches its LoRAState.
  opt = nnx.Optimizer(model, optax.chain(wj.add_lora_ewc(None, 1.5), optax.sgd(0.1)), wrt=nnx.LoRAParam)
  wj.set_importance(opt, imp)
  before = nnx.as_pure(nnx.state(model, nnx.LoRAParam))   # arrays: a snapshot (the State's Variables are the model's)
  zero_grads = jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.LoRAParam))   # LoRAParam-wrapped, as nnx.grad gives
  opt.update(model, zero_grads)
  after = nnx.as_pure(nnx.state(model, nnx.LoRAParam))
  want_step = jax.grad(wj.lora_ewc_penalty)(before, imp, 1.5)
  moved = jax.tree.map(lambda a, b: (a - b) / -0.1, after, before)
  for k in ("l1", "l2"):
    node_m = moved[k]["lora"] if k == "l1" else moved[k]
    node_w = want_step[k]["lora"] if k == "l1" else want_step[k]
    for ab in ("lora_a", "lora_b"):
      assert max_rel(node_m[ab], node_w[ab]) < 1e-5


def _step_fn(tx, loss):
  def step(params, state, x):
    g = jax.grad(loss)(params, x)
    u, state = tx.update(g, state, params)
    return optax.apply_updates(params, u), state
  return step


def _task_loss(params, x):
  """A toy loss through the effective updates (a two-adapter linear model on the identity base)."""
  h = x + x @ params["q"]["A"] @ params["q"]["B"]
  return jnp.mean((h + h @ params["v"]["A"] @ params["v"]["B"]) ** 2)


def _toy():
  key = jax.random.key(3)
  params = {k: {"A": 0.3 * jax.random.normal(jax.random.fold_in(key, i), (4, 2)),
                "B": 0.3 * jax.random.normal(jax.random.fold_in(key, 10 + i), (2, 4))}
            for i, k in enumerate(("q", "v"))}
  imps = [{k: jax.random.uniform(jax.random.fold_in(key, 100 * t + i), (4, 4)) for i, k in enumerate(("q", "v"))}
          for t in range(2)]
  xs = [jax.random.normal(jax.random.fold_in(key, 500 + t), (8, 4)) for t in range(2)]
  return params, imps, xs


def _run(tx, step_fn, params, imps, xs, donate):
  traces = []
  step = jax.jit(lambda *a: (traces.append(1), step_fn(*a))[1], donate_argnums=(0, 1) if donate else ())
  params = jax.tree.map(jnp.copy, params)
  state = tx.init(params)
  for imp, x in zip(imps, xs):
    state = wj.set_importance(state, imp)
    for _ in range(3):
      old = params
      params, state = step(params, state, x)
  if donate:
    assert old["q"]["A"].is_deleted()
  return params, len(traces)


@pytest.mark.slow  # compile-heavy (10-20 s): the full run and CI keep it
def test_add_lora_ewc_in_chain_with_donation_equals_penalty_in_loss():
  params, imps, xs = _toy()
  strength = 2.0
  tx = optax.chain(wj.add_lora_ewc(None, strength), optax.adam(0.05))
  step = _step_fn(tx, _task_loss)
  got, n_traces = _run(tx, step, params, imps, xs, donate=True)
  undonated, _ = _run(tx, step, params, imps, xs, donate=False)
  assert n_traces == 1   # a new task's importance does not retrace
  # Reference: the dense penalty in the loss, plain Adam, the importance swapped per task by hand.
  ref = jax.tree.map(jnp.copy, params)
  adam = optax.adam(0.05)
  st = adam.init(ref)
  for imp, x in zip(imps, xs):
    for _ in range(3):
      g = jax.grad(lambda p: _task_loss(p, x) + dense_penalty(p, imp, strength))(ref)
      u, st = adam.update(g, st, ref)
      ref = optax.apply_updates(ref, u)
  for k in ("q", "v"):
    for ab in "AB":
      np.testing.assert_array_equal(got[k][ab], undonated[k][ab])
      assert max_rel(got[k][ab], ref[k][ab]) < 1e-5
  for imp in imps:   # the caller's importance survived donation
    assert not imp["q"].is_deleted()


@pytest.mark.slow  # compile-heavy (10-20 s): the full run and CI keep it
def test_pullback_is_hessian_diagonal_of_penalty():
  adapters, imp = random_adapters(11)
  adapters = {k: v for k, v in adapters.items() if k != "mlp"}
  imp = {k: imp[k] for k in adapters}
  om = wj.lora_pullback(adapters, imp)
  for k, v in adapters.items():
    for ab in "AB":
      def f(x):
        return dense_penalty({k: {**v, ab: x}}, {k: imp[k]}, 1.0)
      x = v[ab]
      h = jax.hessian(f)(x).reshape(x.size, x.size)
      assert max_rel(om[k][ab], jnp.diag(h).reshape(x.shape)) < 1e-5
  # stacked: each layer's own pull-back
  st, st_imp = random_adapters(12)
  om = wj.lora_pullback({"mlp": st["mlp"]}, {"mlp": st_imp["mlp"]})
  one = wj.lora_pullback({"m": {"A": st["mlp"]["A"][1], "B": st["mlp"]["B"][1]}}, {"m": st_imp["mlp"][1]})
  assert max_rel(om["mlp"]["A"][1], one["m"]["A"]) < 1e-6


@pytest.mark.parametrize("viscosity", ["hyperbolic", "exponential"])
def test_lora_wva_scale_in_chain_with_donation(viscosity):
  params, imps, xs = _toy()
  strength = 3.0
  tx = optax.chain(optax.sgd(0.1), wj.lora_wva_scale(None, strength, viscosity=viscosity))
  step = _step_fn(tx, _task_loss)
  got, n_traces = _run(tx, step, params, imps, xs, donate=True)
  undonated, _ = _run(tx, step, params, imps, xs, donate=False)
  assert n_traces == 1
  # Reference: SGD with the per-entry Hessian-diagonal attenuation written out by hand.
  ref = jax.tree.map(jnp.copy, params)
  for imp, x in zip(imps, xs):
    for _ in range(3):
      g = jax.grad(_task_loss)(ref, x)
      new = {}
      for k, v in ref.items():
        b2, a2 = v["B"] ** 2, v["A"] ** 2
        om = {"A": imp[k] @ b2.T, "B": a2.T @ imp[k]}
        att = {ab: (1 / (1 + strength * om[ab]) if viscosity == "hyperbolic" else jnp.exp(-strength * om[ab]))
               for ab in "AB"}
        new[k] = {ab: v[ab] - 0.1 * att[ab] * g[k][ab] for ab in "AB"}
      ref = new
  for k in ("q", "v"):
    for ab in "AB":
      np.testing.assert_array_equal(got[k][ab], undonated[k][ab])
      assert max_rel(got[k][ab], ref[k][ab]) < 1e-5


def test_bf16_importance_storage_and_bf16_adapters_in_transform():
  params, imps, _ = _toy()
  p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  tx = wj.add_lora_ewc(imps[0], 1.0, importance_dtype=jnp.bfloat16)
  state = tx.init(p16)
  assert state.importance["q"].dtype == jnp.bfloat16
  zeros = jax.tree.map(jnp.zeros_like, p16)
  u, _ = jax.jit(tx.update)(zeros, state, p16)
  assert u["q"]["A"].dtype == jnp.bfloat16
  want = wj.lora_ewc_grad(jax.tree.map(lambda x: x.astype(jnp.float32), p16),
                          jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), imps[0]), 1.0)
  assert max_rel(u["q"]["A"], want["q"]["A"]) < 2 ** -8


def test_errors_name_the_bad_value():
  params, imps, _ = _toy()
  imp = imps[0]
  with pytest.raises(ValueError, match="strength"):
    wj.add_lora_ewc(imp, -1.0)
  with pytest.raises(ValueError, match="strength"):
    wj.lora_wva_scale(imp, float("nan"))
  with pytest.raises(ValueError, match="viscosity"):
    wj.lora_wva_scale(imp, 1.0, viscosity="linear")
  with pytest.raises(ValueError, match=r"importance\['q'\].*negative"):
    wj.add_lora_ewc({**imp, "q": -imp["q"]}, 1.0)
  with pytest.raises(ValueError, match="importance_dtype"):
    wj.add_lora_ewc(imp, 1.0, importance_dtype=jnp.int32)
  with pytest.raises(ValueError, match=r"importance\['v'\] has shape \(4, 3\)"):
    wj.lora_ewc_penalty(params, {**imp, "v": jnp.ones((4, 3))}, 1.0)
  with pytest.raises(ValueError, match="one array per adapter"):
    wj.lora_ewc_penalty(params, {"q": imp["q"]}, 1.0)
  with pytest.raises(ValueError, match=r"\['head'\].*not part of an adapter pair"):
    wj.lora_ewc_penalty({**params, "head": jnp.ones(3)}, imp, 1.0)
  with pytest.raises(ValueError, match=r"A \(4, 2\) and B \(3, 4\)"):
    wj.lora_ewc_penalty({**params, "q": {"A": params["q"]["A"], "B": jnp.ones((3, 4))}}, imp, 1.0)
  with pytest.raises(ValueError, match="needs params"):
    tx = wj.add_lora_ewc(imp, 1.0)
    tx.update(params, tx.init(params))
  with pytest.raises(ValueError, match=r"no base importance for the adapter at \['q'\]"):
    wj.lora_importance({"q": params["q"]}, {"q": {"bias": jnp.ones(4)}})
  with pytest.raises(ValueError, match=r"has shape \(4, 4\).*kernel of shape \(4, 5\)"):
    wj.lora_importance({"q": {"A": jnp.ones((4, 2)), "B": jnp.ones((2, 5))}},
                       {"q": {"kernel": jnp.ones((4, 4))}})
  with pytest.raises(ValueError, match="LoRAState"):
    wj.set_importance(optax.sgd(0.1).init(params), imp)
