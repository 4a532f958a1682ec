"""grad_and_fisher, fisher_accumulator and fisher(mode='reversed') against independent references.

``loss`` and ``grads`` against ``jax.value_and_grad`` of a loss written here;
``fisher`` against the per-example Python loop of ``reference_models`` and
against ``wj.importance.fisher``; the reversed Fisher against a NumPy MLP with
hand-written backpropagation, one example at a time.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference_models as rm

import wva_jax as wj

N = 7


def nll_mean(apply_fn, mask=None):
  """mean_b of -sum_t m_bt log softmax(f(x_b))_{y_bt}: the loss, written independently."""

  def loss(p, x, y):
    logp = jax.nn.log_softmax(apply_fn(p, x).astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, y[..., None], axis=-1)[..., 0]
    if mask is not None:
      picked = picked * mask
    return -picked.reshape(picked.shape[0], -1).sum(-1).mean()

  return loss


def close_overall(actual, expected, rtol):
  """Leafwise, with atol relative to the largest entry of any leaf: some leaves' exact gradients
  are 0 (an attention key bias: softmax ignores a shift) and come out as float32 noise both ways."""
  scale = max(float(np.abs(np.asarray(e)).max()) for e in jax.tree_util.tree_leaves(expected))
  jax.tree_util.tree_map(lambda a, e: np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(e, np.float64),
                                                                 rtol=rtol, atol=rtol * scale), actual, expected)


def check_all(apply_fn, params, x, y, mask=None, rtol=1e-5, chunk_size=None):
  loss, grads, F = jax.jit(lambda p: wj.importance.grad_and_fisher(apply_fn, p, x, y, mask=mask,
                                                                    chunk_size=chunk_size))(params)
  ref_loss, ref_grads = jax.value_and_grad(nll_mean(apply_fn, mask))(params, x, y)
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=rtol)
  close_overall(grads, ref_grads, rtol)
  close_overall(F, rm.fisher_empirical_ref(apply_fn, params, x, y, mask), rtol)
  close_overall(F, wj.importance.fisher(apply_fn, params, x, y, mask=mask), rtol)
  assert all(l.dtype == jnp.float32 for l in jax.tree_util.tree_leaves(F))
  return loss, grads, F


def test_grad_and_fisher_mlp():
  params = rm.init_mlp(jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (N, 6))
  check_all(rm.mlp, params, x, jnp.arange(N) % 4)


@pytest.mark.slow
def test_grad_and_fisher_cnn_chunked():
  params = rm.init_cnn(jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (N, 8, 8, 1))
  check_all(rm.cnn, params, x, jnp.arange(N) % 3, rtol=1e-4, chunk_size=3)  # 7 = 3 + 3 + 1 (padded)


@pytest.mark.slow  # kept out of the 3-minute default run; CI runs it
def test_grad_and_fisher_sequence_with_padding_mask():
  params = rm.init_seq(jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (N, 5, 4))
  y = jax.random.randint(jax.random.key(2), (N, 5), 0, 3)
  mask = (jnp.arange(5)[None] < jnp.array([5, 3, 1, 4, 5, 2, 5])[:, None]).astype(jnp.float32)
  check_all(rm.seq, params, x, y, mask)


@pytest.mark.slow
def test_grad_and_fisher_scanned_transformer_with_padding_mask():
  from benchmarks import model_zoo as zm
  case = zm.linen_scan_lm()
  assert case.scanned
  check_all(case.apply_fn, case.params, case.inputs, case.targets, case.mask, rtol=1e-4)


def test_grad_and_fisher_probability_targets_equal_integer_targets():
  params = rm.init_mlp(jax.random.key(0))
  x, y = jax.random.normal(jax.random.key(1), (N, 6)), jnp.arange(N) % 4
  a = wj.importance.grad_and_fisher(rm.mlp, params, x, y)
  b = wj.importance.grad_and_fisher(rm.mlp, params, x, jax.nn.one_hot(y, 4))
  rm.assert_tree_close(b, a)


@pytest.mark.slow  # kept out of the 3-minute default run; CI runs it
def test_grad_and_fisher_bf16_params_give_bf16_grads_float32_fisher():
  params = jax.tree_util.tree_map(lambda p: p.astype(jnp.bfloat16), rm.init_mlp(jax.random.key(0)))
  x = jax.random.normal(jax.random.key(1), (N, 6)).astype(jnp.bfloat16)
  loss, grads, F = wj.importance.grad_and_fisher(rm.mlp, params, x, jnp.arange(N) % 4)
  assert loss.dtype == jnp.float32
  assert all(g.dtype == jnp.bfloat16 for g in jax.tree_util.tree_leaves(grads))
  assert all(f.dtype == jnp.float32 for f in jax.tree_util.tree_leaves(F))


@pytest.mark.parametrize("bad", ["mask", "targets", "none"])
def test_grad_and_fisher_errors_name_the_bad_input(bad):
  params = rm.init_mlp(jax.random.key(0))
  x, y = jnp.ones((N, 6)), jnp.arange(N) % 4
  kwargs = {"mask": jnp.ones((N, 2))} if bad == "mask" else {}
  targets = {"targets": y[:3], "none": None}.get(bad, y)
  with pytest.raises(ValueError, match="mask|targets"):
    wj.importance.grad_and_fisher(rm.mlp, params, x, targets, **kwargs)


# --- running form -------------------------------------------------------------------

def _batches():
  params = rm.init_mlp(jax.random.key(0))
  xs = jax.random.normal(jax.random.key(1), (3, 5, 6))
  ys = jax.random.randint(jax.random.key(2), (3, 5), 0, 4)
  fishers = [wj.importance.grad_and_fisher(rm.mlp, params, xs[i], ys[i])[2] for i in range(3)]
  return params, fishers


@pytest.mark.slow  # kept out of the 3-minute default run; CI runs it
def test_accumulator_is_the_mean_over_equal_batches_and_example_weighted_otherwise():
  params, fishers = _batches()
  acc = wj.importance.fisher_accumulator()
  update = jax.jit(acc.update, donate_argnums=0)   # donation-safe: the state is replaced, never aliased
  state = acc.init(params)
  for f in fishers:
    state = update(state, f, 5)
  mean = jax.tree_util.tree_map(lambda *fs: np.mean(np.stack(fs), 0), *fishers)
  rm.assert_tree_close(acc.result(state), mean)
  assert int(state.examples) == 15
  state = acc.init(params)
  for f, n in zip(fishers, (1, 2, 7)):
    state = update(state, f, n)
  weighted = jax.tree_util.tree_map(lambda *fs: (fs[0] * 1 + fs[1] * 2 + fs[2] * 7) / 10, *fishers)
  rm.assert_tree_close(acc.result(state), weighted)


def test_accumulator_in_a_jitted_train_step_equals_the_separate_pass_on_each_batch():
  params, _ = _batches()
  acc = wj.importance.fisher_accumulator()
  xs = jax.random.normal(jax.random.key(3), (4, 6, 6))
  ys = jax.random.randint(jax.random.key(4), (4, 6), 0, 4)

  @jax.jit
  def step(p, s, x, y):
    _, g, f = wj.importance.grad_and_fisher(rm.mlp, p, x, y)
    return jax.tree_util.tree_map(lambda a, b: a - 0.1 * b, p, g), acc.update(s, f, x.shape[0])

  p, s, ref = params, acc.init(params), []
  for i in range(4):
    ref.append(rm.fisher_empirical_ref(rm.mlp, p, xs[i], ys[i]))
    p, s = step(p, s, xs[i], ys[i])
  rm.assert_tree_close(acc.result(s), jax.tree_util.tree_map(lambda *fs: sum(fs) / 4, *ref), 1e-5)


def test_accumulator_bf16_storage():
  params, fishers = _batches()
  acc = wj.importance.fisher_accumulator(jnp.bfloat16)
  state = acc.init(params)
  for f in fishers:
    state = acc.update(state, f, 5)
  assert all(m.dtype == jnp.bfloat16 for m in jax.tree_util.tree_leaves(state.mean))
  assert all(m.dtype == jnp.float32 for m in jax.tree_util.tree_leaves(acc.result(state)))
  mean = jax.tree_util.tree_map(lambda *fs: np.mean(np.stack(fs), 0), *fishers)
  rm.assert_tree_close(acc.result(state), mean, 2e-2)


def test_accumulator_rejects_integer_storage():
  with pytest.raises(ValueError, match="int32"):
    wj.importance.fisher_accumulator(jnp.int32)


# --- EWC-DR: logits reversal ----------------------------------------------------------

def _np_mlp_reversed_fisher(params, x, y, classes):
  """Per-example loop, hand-written backprop of log softmax(-z)_y through tanh(x W1 + b1) W2 + b2."""
  w1, b1, w2, b2 = (np.asarray(params[k], np.float64) for k in ("w1", "b1", "w2", "b2"))
  acc = {k: 0.0 for k in ("w1", "b1", "w2", "b2")}
  for xb, yb in zip(np.asarray(x, np.float64), np.asarray(y)):
    h = np.tanh(xb @ w1 + b1)
    z = h @ w2 + b2
    q = np.exp(-z - (-z).max())
    q /= q.sum()
    dz = q - np.eye(classes)[yb]          # d/dz log softmax(-z)_y = softmax(-z) - e_y
    dh = (w2 @ dz) * (1 - h ** 2)
    grads = {"w1": np.outer(xb, dh), "b1": dh, "w2": np.outer(h, dz), "b2": dz}
    for k in acc:
      acc[k] = acc[k] + grads[k] ** 2
  return {k: v / len(y) for k, v in acc.items()}


def _tanh_mlp(p, x):
  return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def test_fisher_reversed_matches_numpy_loop():
  k1, k2, k3, k4 = jax.random.split(jax.random.key(5), 4)
  params = {"w1": jax.random.normal(k1, (6, 5)), "b1": 0.1 * jax.random.normal(k2, (5,)),
            "w2": 2 * jax.random.normal(k3, (5, 4)), "b2": jnp.zeros(4)}
  x, y = jax.random.normal(k4, (N, 6)), jnp.arange(N) % 4
  F = wj.importance.fisher(_tanh_mlp, params, x, y, mode="reversed")
  rm.assert_tree_close(F, _np_mlp_reversed_fisher(params, x, y, 4))
  rm.assert_tree_close(wj.importance.fisher(_tanh_mlp, params, x, y, mode="reversed", engine="vmap"), F)


@pytest.mark.slow  # kept out of the 3-minute default run; CI runs it
def test_fisher_reversed_keeps_gradient_on_confident_correct_examples():
  params = {"w": jnp.array([[20.0, 0.0, -20.0]]), "b": jnp.zeros(3)}
  apply_fn = lambda p, x: x @ p["w"] + p["b"]
  x, y = jnp.ones((4, 1)), jnp.zeros(4, jnp.int32)      # predicted class 0 with p ~ 1
  emp = wj.importance.fisher(apply_fn, params, x, y)
  rev = wj.importance.fisher(apply_fn, params, x, y, mode="reversed")
  assert float(emp["w"].sum()) < 1e-15
  assert float(rev["w"].sum()) > 0.5


@pytest.mark.slow  # kept out of the 3-minute default run; CI runs it
def test_fisher_reversed_sequence_with_padding_mask_matches_grad_loop():
  params = rm.init_seq(jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (N, 5, 4))
  y = jax.random.randint(jax.random.key(2), (N, 5), 0, 3)
  mask = (jnp.arange(5)[None] < jnp.array([5, 3, 1, 4, 5, 2, 5])[:, None]).astype(jnp.float32)

  def ll(p, xb, yb, mb):   # log softmax(-z)_y of one example, summed over its real positions
    logp = jax.nn.log_softmax(-rm.seq(p, xb[None])[0], axis=-1)
    return (jnp.take_along_axis(logp, yb[:, None], -1)[:, 0] * mb).sum()

  ref = None
  for b in range(N):
    g = jax.tree_util.tree_map(lambda v: np.asarray(v, np.float64) ** 2,
                               jax.grad(ll)(params, x[b], y[b], mask[b]))
    ref = g if ref is None else jax.tree_util.tree_map(np.add, ref, g)
  ref = jax.tree_util.tree_map(lambda v: v / N, ref)
  rm.assert_tree_close(wj.importance.fisher(rm.seq, params, x, y, mode="reversed", mask=mask), ref)


def test_fisher_reversed_needs_targets():
  params = rm.init_mlp(jax.random.key(0))
  with pytest.raises(ValueError, match="reversed"):
    wj.importance.fisher(rm.mlp, params, jnp.ones((N, 6)), mode="reversed")


# --- the loss as a custom_vjp, for trainers that differentiate the loss themselves ------

@pytest.mark.slow  # kept out of the 3-minute default run; CI runs it
def test_loss_and_fisher_gradient_is_grad_and_fishers():
  params = rm.init_seq(jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (N, 5, 4))
  y = jax.random.randint(jax.random.key(2), (N, 5), 0, 3)
  mask = (jnp.arange(5)[None] < jnp.array([5, 3, 1, 4, 5, 2, 5])[:, None]).astype(jnp.float32)
  f = lambda p: wj.importance.loss_and_fisher(rm.seq, p, x, y, mask=mask)
  (loss, F), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(params)
  ref_loss, ref_grads = jax.value_and_grad(nll_mean(rm.seq, mask))(params, x, y)
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
  rm.assert_tree_close(grads, ref_grads)
  rm.assert_tree_close(F, rm.fisher_empirical_ref(rm.seq, params, x, y, mask))
  g2 = jax.grad(lambda p: 3.0 * f(p)[0])(params)   # the incoming cotangent scales the gradient
  rm.assert_tree_close(g2, jax.tree_util.tree_map(lambda g: 3 * g, ref_grads))


@pytest.mark.slow  # kept out of the 3-minute default run; CI runs it
def test_loss_and_fisher_under_nnx_value_and_grad():
  """The pattern of tunix's PeftTrainer: nnx.value_and_grad of loss_fn(model, ...) with has_aux."""
  from flax import nnx

  class MLP(nnx.Module):
    def __init__(self, rngs):
      self.l1, self.l2 = nnx.Linear(6, 5, rngs=rngs), nnx.Linear(5, 4, rngs=rngs)

    def __call__(self, x):
      return self.l2(jnp.tanh(self.l1(x)))

  model = MLP(nnx.Rngs(0))
  x, y = jax.random.normal(jax.random.key(1), (N, 6)), jnp.arange(N) % 4

  def loss_fn(model, x, y):
    graphdef, p, rest = nnx.split(model, nnx.Param, ...)
    return wj.importance.loss_and_fisher(lambda q, xb: nnx.merge(graphdef, q, rest)(xb), p, x, y)

  (loss, F), grads = nnx.jit(nnx.value_and_grad(loss_fn, has_aux=True))(model, x, y)
  ref_loss, ref_grads = nnx.value_and_grad(lambda m: nll_mean(lambda _, xb: m(xb))(None, x, y))(model)
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
  rm.assert_tree_close(nnx.to_pure_dict(grads), nnx.to_pure_dict(ref_grads))
  graphdef, p = nnx.split(model, nnx.Param)
  ref_F = rm.fisher_empirical_ref(lambda q, xb: nnx.merge(graphdef, q)(xb), p, x, y)
  rm.assert_tree_close(nnx.to_pure_dict(F), nnx.to_pure_dict(ref_F))


@pytest.mark.slow  # kept out of the 3-minute default run; CI runs it
def test_grad_and_fisher_parameter_transform():
  """A weight used through a nonlinear function of itself (tanh(w)): the engine pulls back through it."""
  k1, k2 = jax.random.split(jax.random.key(3))
  params = {"w": jax.random.normal(k1, (6, 4)), "b": 0.1 * jax.random.normal(k2, (4,))}
  apply_fn = lambda p, x: jnp.tanh(x @ jnp.tanh(p["w"]) + p["b"]) * 3.0
  x = jax.random.normal(jax.random.key(4), (N, 6))
  check_all(apply_fn, params, x, jnp.arange(N) % 4)
