"""MoFO against a hand-written NumPy AdamW with the momentum filter, over several steps."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import wva_jax as wj
from wva_jax.mofo import momentum_filter


def params0():
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  return {"w": jax.random.normal(k1, (6, 5)), "conv": jax.random.normal(k2, (3, 3, 2, 4)),
          "b": jax.random.normal(k3, (5,))}


def grads_at(t, params):
  """A different gradient each step, depending on the parameters (so the path matters)."""
  key = jax.random.fold_in(jax.random.key(1), t)
  return jax.tree_util.tree_map(lambda p: jax.random.normal(jax.random.fold_in(key, p.size), p.shape) + 0.3 * p,
                                params)


def numpy_mofo(params, steps, lr, fraction, b1=0.9, b2=0.999, eps=1e-8, wd=0.0, min_ndim=2):
  """The authors' AdamW_MoFO step, in float64 NumPy: filter |m| >= its k-th largest, k = int(size * fraction)."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v = {k: np.zeros_like(v) for k, v in p.items()}
  for t in range(1, steps + 1):
    g = {k: np.asarray(a, np.float64) for k, a in grads_at(t - 1, {k: jnp.asarray(a, jnp.float32)
                                                                    for k, a in p.items()}).items()}
    for k in p:
      m[k] = b1 * m[k] + (1 - b1) * g[k]
      v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
      step = (m[k] / (1 - b1 ** t)) / (np.sqrt(v[k] / (1 - b2 ** t)) + eps)
      if p[k].ndim >= min_ndim:
        kk = max(1, int(p[k].size * fraction))
        threshold = np.sort(np.abs(m[k]).ravel())[::-1][kk - 1]
        step = np.where(np.abs(m[k]) >= threshold, step, 0.0)
      p[k] = p[k] * (1 - lr * wd) - lr * step
  return p


def run(tx, params, steps):
  state = tx.init(params)

  @jax.jit
  def step(p, s, t):
    u, s = tx.update(grads_at(t, p), s, p)
    return optax.apply_updates(p, u), s

  for t in range(steps):
    params, state = step(params, state, t)
  return params, state


@pytest.mark.parametrize("fraction,wd,min_ndim", [(0.15, 0.0, 2), pytest.param(0.3, 0.1, 2, marks=pytest.mark.slow),
                                                  pytest.param(0.5, 0.0, 0, marks=pytest.mark.slow)])
def test_mofo_matches_numpy_over_steps(fraction, wd, min_ndim):
  p0 = params0()
  ours, _ = run(wj.mofo(0.05, fraction=fraction, weight_decay=wd, min_ndim=min_ndim), p0, 6)
  ref = numpy_mofo(p0, 6, 0.05, fraction, wd=wd, min_ndim=min_ndim)
  for k in ref:
    np.testing.assert_allclose(np.asarray(ours[k], np.float64), ref[k], rtol=1e-5, atol=1e-5)


def test_mofo_moves_exactly_the_top_fraction_per_filtered_leaf_and_all_of_a_vector():
  p0 = params0()
  tx = wj.mofo(0.05, fraction=0.2)
  u, _ = jax.jit(tx.update)(grads_at(0, p0), tx.init(p0), p0)
  assert int((u["w"] != 0).sum()) == int(30 * 0.2)
  assert int((u["conv"] != 0).sum()) == int(72 * 0.2)
  assert int((u["b"] != 0).sum()) == 5     # 1-D leaves (biases, norm scales) are not filtered


@pytest.mark.slow  # kept out of the 3-minute default run; CI runs it
def test_mofo_fraction_one_is_adam():
  p0 = params0()
  ours, _ = run(wj.mofo(0.05, fraction=1.0), p0, 4)
  ref, _ = run(optax.adam(0.05), p0, 4)
  for k in ref:
    np.testing.assert_allclose(ours[k], ref[k], rtol=1e-6, atol=1e-7)


def test_scale_by_mofo_composes_and_keeps_adam_state_for_every_coordinate():
  p0 = params0()
  tx = optax.chain(wj.scale_by_mofo(fraction=0.1), optax.scale(-0.05))
  _, state = run(tx, p0, 3)
  mu = state[0].mu
  assert all(np.all(np.asarray(m) != 0) for m in jax.tree_util.tree_leaves(mu))   # moments updated for all


def test_mofo_bf16_params_jit():
  p0 = jax.tree_util.tree_map(lambda p: p.astype(jnp.bfloat16), params0())
  tx = wj.mofo(0.05, fraction=0.2)
  state = tx.init(p0)
  g = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), grads_at(0, params0()))
  u, state = jax.jit(tx.update)(g, state, p0)
  p1 = optax.apply_updates(p0, u)
  assert all(a.dtype == jnp.bfloat16 for a in jax.tree_util.tree_leaves(p1))
  # the moved coordinates are those whose |m| (as stored) reaches the k-th largest
  m = np.abs(np.asarray(state[0].mu["w"], np.float32))
  threshold = np.sort(m.ravel())[::-1][int(30 * 0.2) - 1]
  np.testing.assert_array_equal(np.asarray(u["w"]) != 0, m >= threshold)


@pytest.mark.parametrize("kwargs,name", [({"fraction": 0.0}, "fraction"), ({"fraction": 1.5}, "fraction"),
                                         ({"b1": 1.0}, "b1"), ({"b2": -0.1}, "b2"), ({"eps": -1.0}, "eps"),
                                         ({"min_ndim": -1}, "min_ndim"), ({"weight_decay": -0.1}, "weight_decay")])
def test_mofo_rejects_bad_hyperparameters_by_name(kwargs, name):
  with pytest.raises(ValueError, match=name):
    wj.mofo(0.1, **kwargs)


@pytest.mark.slow  # kept out of the 3-minute default run; CI runs it
def test_mofo_traced_fraction_equals_concrete():
  p0 = params0()
  g = grads_at(0, p0)

  def step(fraction):
    tx = wj.mofo(0.05, fraction=fraction)
    return tx.update(g, tx.init(p0), p0)[0]

  traced = jax.jit(jax.vmap(step))(jnp.array([0.1, 0.5]))
  for i, f in enumerate((0.1, 0.5)):
    concrete = step(f)
    for k in concrete:   # the same coordinates move, by the same step (to float rounding under vmap)
      np.testing.assert_array_equal(np.asarray(traced[k][i]) != 0, np.asarray(concrete[k]) != 0)
      np.testing.assert_allclose(np.asarray(traced[k][i]), np.asarray(concrete[k]), rtol=1e-6)


# ---- issue 27 item 5: per-layer blocks for stacked leaves, the exemption rule, one rounding

def _topk_mask(m, k):
  """NumPy reference: entries at least the k-th largest |m| of the block."""
  a = np.abs(np.asarray(m, np.float64)).ravel()
  return (np.abs(np.asarray(m)) >= np.sort(a)[-k])


def test_stacked_leaves_filter_each_layer():
  rng = np.random.default_rng(0)
  m = rng.normal(size=(3, 4, 5)).astype(np.float32)
  m[0] *= 100.0   # one layer with far larger momentum must not take the whole budget
  u = np.ones_like(m)
  tree = {"layers": {"kernel": jnp.asarray(m), "bias": jnp.asarray(m[:, 0])}, "head": jnp.asarray(m[0])}
  ones = jax.tree_util.tree_map(jnp.ones_like, tree)
  got = momentum_filter(tree, ones, 0.25, stacked={"layers": True, "head": False})
  for layer in range(3):
    np.testing.assert_array_equal(np.asarray(got["layers"]["kernel"][layer]) != 0, _topk_mask(m[layer], 5))
  np.testing.assert_array_equal(np.asarray(got["layers"]["bias"]), u[:, 0])   # a stacked bias: whole
  np.testing.assert_array_equal(np.asarray(got["head"]) != 0, _topk_mask(m[0], 5))
  whole = momentum_filter(tree, ones, 0.25)   # unmarked: one block, the big layer takes it all
  assert int((np.asarray(whole["layers"]["kernel"][1:]) != 0).sum()) == 0


def test_bias_and_norm_names_are_exempt():
  m = {"ln_norm": {"scale": jnp.arange(12.0).reshape(3, 4)}, "dense": {"kernel": jnp.arange(12.0).reshape(3, 4)}}
  got = momentum_filter(m, jax.tree_util.tree_map(jnp.ones_like, m), 0.25)
  assert bool((got["ln_norm"]["scale"] == 1).all())
  assert int((got["dense"]["kernel"] != 0).sum()) == 3
  got = momentum_filter(m, jax.tree_util.tree_map(jnp.ones_like, m), 0.25, exempt_names=())
  assert int((got["ln_norm"]["scale"] != 0).sum()) == 3


@pytest.mark.slow   # ~3 s
def test_one_rounding_for_concrete_and_traced_fractions():
  m = {"w": jnp.asarray(np.random.default_rng(1).permutation(100).reshape(10, 10), jnp.float32)}
  ones = {"w": jnp.ones((10, 10))}
  fractions = jnp.asarray([0.29, 0.57, 0.58])
  traced = jax.vmap(lambda f: (momentum_filter(m, ones, f)["w"] != 0).sum())(fractions)
  concrete = [int((momentum_filter(m, ones, float(f))["w"] != 0).sum()) for f in (0.29, 0.57, 0.58)]
  assert concrete == [29, 57, 58]
  assert [int(t) for t in traced] == concrete


def test_scale_by_mofo_takes_stacked():
  rng = np.random.default_rng(2)
  g = rng.normal(size=(2, 6, 5)).astype(np.float32)
  g[1] *= 50.0
  tx = wj.scale_by_mofo(fraction=0.2, stacked=True)
  u, _ = tx.update(jnp.asarray(g), tx.init(jnp.zeros_like(jnp.asarray(g))))
  for layer in range(2):   # the first step's momentum is (1 - b1) g: each layer's top 6 of 30 move
    np.testing.assert_array_equal(np.asarray(u[layer]) != 0, _topk_mask(g[layer], 6))
