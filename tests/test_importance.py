"""Fisher (all modes) and MAS against per-example Python loops; SI against a manual loop."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference_models as rm

import wva_jax as wj

KEY = jax.random.key(0)
N = 7  # not a multiple of the chunk sizes used below: exercises padding


def _data(shape, classes, key=1):
  k1, k2 = jax.random.split(jax.random.key(key))
  return jax.random.normal(k1, shape), jax.random.randint(k2, shape[:1], 0, classes)


# (apply_fn, init, input shape, classes); params are built on first use, not at
# import: each eager jax.random call compiles, and the CNN alone costs seconds
# that a `-m "not slow"` run (which skips the CNN cases) would pay at collection.
_CASES = {
    "mlp": (rm.mlp, rm.init_mlp, (N, 6), 4),
    "cnn": (rm.cnn, rm.init_cnn, (N, 8, 8, 1), 3),
    "shared": (rm.shared, rm.init_shared, (N, 4), 3),
}


@functools.cache
def case(name):
  fn, init, shape, classes = _CASES[name]
  return fn, init(KEY), shape, classes


@pytest.mark.parametrize("name", ["mlp", pytest.param("cnn", marks=pytest.mark.slow),
                                  pytest.param("shared", marks=pytest.mark.slow)])
@pytest.mark.parametrize("engine", ["auto", "vmap"])
def test_fisher_empirical_matches_loop(name, engine):
  fn, params, shape, classes = case(name)
  x, y = _data(shape, classes)
  got = wj.importance.fisher(fn, params, x, y, chunk_size=3, engine=engine)
  rm.assert_tree_close(got, rm.fisher_empirical_ref(fn, params, x, y))


@pytest.mark.parametrize("name", ["mlp", pytest.param("shared", marks=pytest.mark.slow)])
def test_fisher_exact_matches_loop(name):
  fn, params, shape, classes = case(name)
  x, _ = _data(shape, classes)
  got = wj.importance.fisher(fn, params, x, mode="exact", chunk_size=4)
  rm.assert_tree_close(got, rm.fisher_exact_ref(fn, params, x))


@pytest.mark.slow
def test_fisher_sequence_with_padding_mask():
  params = rm.init_seq(KEY)
  x = jax.random.normal(jax.random.key(2), (5, 4, 4))
  y = jax.random.randint(jax.random.key(3), (5, 4), 0, 3)
  mask = jnp.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]])
  got = wj.importance.fisher(rm.seq, params, x, y, mask=mask, chunk_size=2)
  rm.assert_tree_close(got, rm.fisher_empirical_ref(rm.seq, params, x, y, mask))
  exact = wj.importance.fisher(rm.seq, params, x, mode="exact", mask=mask, chunk_size=2)
  rm.assert_tree_close(exact, rm.fisher_exact_ref(rm.seq, params, x, mask))
  # Padding really is dropped: garbage targets at masked positions change nothing.
  y_garbage = jnp.where(mask == 1, y, 2 - y)
  rm.assert_tree_close(wj.importance.fisher(rm.seq, params, x, y_garbage, mask=mask), got)


def test_fisher_one_hot_targets_equal_integer_targets():
  fn, params, shape, classes = case("mlp")
  x, y = _data(shape, classes)
  a = wj.importance.fisher(fn, params, x, y)
  b = wj.importance.fisher(fn, params, x, jax.nn.one_hot(y, classes))
  rm.assert_tree_close(a, b)


@pytest.mark.slow
def test_fisher_sampled_draws_per_example_keys_independent_of_chunking():
  fn, params, shape, classes = case("mlp")
  x, _ = _data(shape, classes)
  key = jax.random.key(7)
  got = wj.importance.fisher(fn, params, x, mode="sampled", key=key, chunk_size=2)
  # Documented draw: example b uses split(key, N)[b] over its logits.
  keys = jax.random.split(key, N)
  y = jnp.stack([jax.random.categorical(keys[b], fn(params, x[b:b + 1])[0]) for b in range(N)])
  rm.assert_tree_close(got, rm.fisher_empirical_ref(fn, params, x, y))
  rm.assert_tree_close(wj.importance.fisher(fn, params, x, mode="sampled", key=key, chunk_size=5), got)


@pytest.mark.slow
def test_fisher_sampled_averages_to_exact():
  fn, params, shape, classes = case("mlp")
  x, _ = _data(shape, classes)
  exact = wj.importance.fisher(fn, params, x, mode="exact")
  sample = jax.jit(lambda k: wj.importance.fisher(fn, params, x, mode="sampled", key=k))
  draws = [sample(k) for k in jax.random.split(jax.random.key(11), 300)]
  mean = jax.tree_util.tree_map(lambda *d: np.mean(d, axis=0), *draws)
  for m, e in zip(jax.tree_util.tree_leaves(mean), jax.tree_util.tree_leaves(exact)):
    assert np.abs(m - e).sum() / np.abs(e).sum() < 0.1


@pytest.mark.parametrize("name", ["mlp", pytest.param("cnn", marks=pytest.mark.slow),
                                  pytest.param("shared", marks=pytest.mark.slow)])
def test_mas_matches_loop(name):
  fn, params, shape, _ = case(name)
  x, _ = _data(shape, 3)
  rm.assert_tree_close(wj.importance.mas(fn, params, x, chunk_size=3), rm.mas_ref(fn, params, x))


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["auto", "vmap"])
def test_mas_sequence_with_padding_mask(engine):
  params = rm.init_seq(KEY)
  x = jax.random.normal(jax.random.key(2), (5, 4, 4))
  mask = jnp.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]])
  got = wj.importance.mas(rm.seq, params, x, mask=mask, chunk_size=2, engine=engine)
  rm.assert_tree_close(got, rm.mas_ref(rm.seq, params, x, mask))
  # The seq model is causal: garbage inputs at padded positions change nothing.
  x_garbage = jnp.where(mask[..., None] == 1, x, 100.0)
  rm.assert_tree_close(wj.importance.mas(rm.seq, params, x_garbage, mask=mask, engine=engine),
                       got)


@pytest.mark.parametrize("fn", [lambda p, x: x @ p["w"] + 1.0,      # dense: the fast engine
                                lambda p, x: jnp.tanh(p["w"][0] * x) + 1.0],  # elementwise
                         ids=["dense", "elementwise"])
def test_mas_takes_abs_per_example_not_of_the_batch_gradient(fn):
  params = {"w": jnp.array([[1.0]])}
  # d||f(w, x)||^2/dw has opposite signs for these two examples (for the
  # dense one, 2 (x w + 1) x = 1.5 and -0.5): the mean of the absolute values
  # differs from the absolute value of the mean, so the test can fail.
  x = jnp.array([[0.5], [-0.5]])
  per_ex = [float(jax.grad(lambda p: jnp.sum(fn(p, x[b:b + 1]) ** 2))(params)["w"][0, 0]) for b in range(2)]
  assert per_ex[0] * per_ex[1] < 0
  assert np.mean(np.abs(per_ex)) > 1.5 * abs(np.mean(per_ex))
  got = float(wj.importance.mas(fn, params, x)["w"][0, 0])
  assert got == pytest.approx(np.mean(np.abs(per_ex)), rel=1e-6)


@pytest.mark.slow   # issue 20: the default run (the fast subset) stays within 3 minutes on 2 cores
def test_estimators_jit_and_vmap_over_params():
  fn, params, shape, classes = case("mlp")
  x, y = _data(shape, classes)
  stacked = jax.tree_util.tree_map(lambda p: jnp.stack([p, 2 * p]), params)
  batched = jax.jit(jax.vmap(lambda p: wj.importance.fisher(fn, p, x, y)))(stacked)
  for i, scale in enumerate([1, 2]):
    p_i = jax.tree_util.tree_map(lambda p: scale * p, params)
    rm.assert_tree_close(jax.tree_util.tree_map(lambda a: a[i], batched),
                         rm.fisher_empirical_ref(fn, p_i, x, y))


@pytest.mark.slow   # issue 20: the default run (the fast subset) stays within 3 minutes on 2 cores
def test_bf16_params_give_float32_importance_close_to_float32():
  fn, params, shape, classes = case("mlp")
  x, y = _data(shape, classes)
  p16 = jax.tree_util.tree_map(lambda p: p.astype(jnp.bfloat16), params)
  f16 = wj.importance.fisher(fn, p16, x.astype(jnp.bfloat16), y)
  f32 = wj.importance.fisher(fn, jax.tree_util.tree_map(lambda p: p.astype(jnp.float32), p16), x, y)
  for a, b in zip(jax.tree_util.tree_leaves(f16), jax.tree_util.tree_leaves(f32)):
    assert a.dtype == jnp.float32
    assert np.abs(a - b).sum() / np.abs(b).sum() < 0.05


def test_estimators_accept_pytree_inputs():
  params = rm.init_mlp(KEY)
  x, y = _data((N, 6), 4)
  fn = lambda p, inp: rm.mlp(p, inp["a"] + inp["b"])
  got = wj.importance.fisher(fn, params, {"a": x, "b": 0.5 * x}, y, chunk_size=3)
  rm.assert_tree_close(got, rm.fisher_empirical_ref(rm.mlp, params, 1.5 * x, y))


@pytest.mark.slow
def test_path_integral_matches_manual_loop_and_si_formula():
  loss = lambda p, x: jnp.sum((x @ p["w"] - 1.0) ** 2)
  params = {"w": jnp.array([0.5, -0.3, 0.2])}
  xs = jax.random.normal(jax.random.key(4), (15, 3))
  opt = wj.importance.path_integral(optax.adam(0.05))
  state = opt.init(params)
  start = params
  ref_opt = optax.adam(0.05)
  ref_state, ref_params, omega = ref_opt.init(params), params, np.zeros(3)
  penalty = lambda p: 3.0 * jnp.sum(p["w"] ** 2)  # must not leak into omega
  for x in xs:
    g_task = jax.grad(loss)(params, x)
    g_all = jax.tree_util.tree_map(jnp.add, g_task, jax.grad(penalty)(params))
    u, state = opt.update(g_all, state, params, task_grads=g_task)
    params = optax.apply_updates(params, u)
    # reference: plain loop
    rg = jax.grad(loss)(ref_params, x)
    ru, ref_state = ref_opt.update(jax.tree_util.tree_map(jnp.add, rg, jax.grad(penalty)(ref_params)),
                                   ref_state, ref_params)
    omega += -np.asarray(rg["w"]) * np.asarray(ru["w"])
    ref_params = optax.apply_updates(ref_params, ru)
  np.testing.assert_allclose(state.omega["w"], omega, rtol=1e-5)
  delta = np.asarray(params["w"]) - np.asarray(start["w"])
  expected = np.maximum(omega, 0) / (delta ** 2 + 0.1)
  np.testing.assert_allclose(wj.importance.si(state, params, damping=0.1)["w"], expected, rtol=1e-5)
  restarted = wj.importance.restart_path(state, params)
  assert float(jnp.abs(restarted.omega["w"]).sum()) == 0.0
  np.testing.assert_array_equal(restarted.start["w"], params["w"])


@pytest.mark.parametrize("damping", [0.0, -0.1, float("nan"), np.float32(0.0), jnp.float32(0.0)])
def test_si_rejects_damping_that_is_not_positive(damping):
  # damping 0 turns a weight that never moved into 0/0 = NaN importance.
  params = {"w": jnp.array([1.0, 1.0])}
  opt = wj.importance.path_integral(optax.sgd(1.0))
  _, state = opt.update({"w": jnp.array([0.5, 0.0])}, opt.init(params), params)
  with pytest.raises(ValueError, match=f"damping must be finite and > 0, got {float(damping)}"):
    wj.importance.si(state, params, damping=damping)
  assert np.isfinite(np.asarray(wj.importance.si(state, params, damping=1e-8)["w"])).all()


def test_combine_accumulate_decay_normalize():
  a, b = {"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([3.0, 0.0])}
  np.testing.assert_allclose(wj.importance.accumulate(a, b)["w"], [4.0, 2.0])
  np.testing.assert_allclose(wj.importance.accumulate(None, b)["w"], [3.0, 0.0])
  np.testing.assert_allclose(wj.importance.decay(a, b, 0.5)["w"], [3.5, 1.0])
  two = {"x": jnp.array([1.0, 3.0]), "y": jnp.array([[2.0, 6.0]])}
  mean_n = wj.importance.normalize(two)
  assert float(sum(v.sum() for v in jax.tree_util.tree_leaves(mean_n))) == pytest.approx(4.0)
  np.testing.assert_allclose(wj.importance.normalize(two, by="max")["y"], [[1 / 3, 1.0]])
  np.testing.assert_allclose(wj.importance.normalize({"z": jnp.zeros(2)})["z"], [0.0, 0.0])


@pytest.mark.parametrize("gamma", [1.5, np.float32(1.5), np.array(1.5), jnp.float32(1.5), jnp.array(1.5)],
                         ids=["python", "numpy-scalar", "numpy-0d", "jax-scalar", "jax-0d"])
def test_decay_rejects_a_factor_above_one_whatever_its_type(gamma):
  a, b = {"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([3.0, 0.0])}
  with pytest.raises(ValueError, match=r"gamma must be in \[0, 1\], got 1.5"):
    wj.importance.decay(a, b, gamma)


def test_decay_traced_factor_is_not_checked_and_works_under_jit():
  a, b = {"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([3.0, 0.0])}
  got = jax.jit(wj.importance.decay)(a, b, jnp.float32(0.5))
  np.testing.assert_allclose(got["w"], [3.5, 1.0])
