"""Small models and slow, independent references (Python loops over examples)."""
import jax
import jax.numpy as jnp
import numpy as np


def init_mlp(key, sizes=(6, 5, 4)):
  params = {}
  for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
    key, k1, k2 = jax.random.split(key, 3)
    params[f"l{i}"] = {"w": jax.random.normal(k1, (a, b)) / np.sqrt(a),
                       "b": 0.1 * jax.random.normal(k2, (b,))}
  return params


def mlp(params, x):
  n = len(params)
  for i in range(n):
    x = x @ params[f"l{i}"]["w"] + params[f"l{i}"]["b"]
    if i < n - 1:
      x = jax.nn.leaky_relu(x, 0.2)
  return x


def list_mlp(params, x):
  """The same MLP over a list of layers (the layout Flax-free code often uses)."""
  for i, layer in enumerate(params):
    x = x @ layer["w"] + layer["b"]
    if i < len(params) - 1:
      x = jax.nn.leaky_relu(x, 0.2)
  return x


def init_cnn(key, classes=3):
  k1, k2, k3 = jax.random.split(key, 3)
  return {"c1": 0.3 * jax.random.normal(k1, (3, 3, 1, 4)),
          "c2": 0.3 * jax.random.normal(k2, (3, 3, 4, 5)),
          "d": {"w": 0.1 * jax.random.normal(k3, (5 * 4 * 4, classes)), "b": jnp.zeros(classes)}}


def cnn(params, x):  # x: [B, 8, 8, 1]
  dn = ("NHWC", "HWIO", "NHWC")
  h = jax.lax.conv_general_dilated(x, params["c1"], (1, 1), "SAME", dimension_numbers=dn)
  h = jax.nn.relu(h)
  h = jax.lax.conv_general_dilated(h, params["c2"], (2, 2), "SAME", dimension_numbers=dn)
  h = jnp.tanh(h).reshape(h.shape[0], -1)
  return h @ params["d"]["w"] + params["d"]["b"]


def init_seq(key, features=4, hidden=5, classes=3):
  k1, k2 = jax.random.split(key)
  return {"inp": jax.random.normal(k1, (features, hidden)) / 2,
          "out": {"w": jax.random.normal(k2, (hidden, classes)) / 2, "b": jnp.zeros(classes)}}


def seq(params, x):  # x: [B, T, F] -> logits [B, T, C]; each position sees the past (causal mean)
  h = jnp.tanh(x @ params["inp"])
  h = jnp.cumsum(h, axis=1) / jnp.arange(1, h.shape[1] + 1)[None, :, None]
  return h @ params["out"]["w"] + params["out"]["b"]


def init_shared(key, d=4, classes=3):
  k1, k2 = jax.random.split(key)
  return {"shared": jax.random.normal(k1, (d, d)) / 2, "head": jax.random.normal(k2, (d, classes))}


def shared(params, x):  # the same weight in two layers
  h = jnp.tanh(x @ params["shared"])
  h = jnp.tanh(h @ params["shared"])
  return h @ params["head"]


# --- references: one example at a time, jax.grad of an explicit scalar ---------
# The Python loop over examples (and over positions and classes for the exact
# Fisher) is the reference; each per-example gradient is jitted once per call
# only to keep the loop fast.

def _example(x, b):
  return jax.tree_util.tree_map(lambda a: a[b:b + 1], x)


def _add(acc, g, fn):
  g = jax.tree_util.tree_map(lambda v: fn(np.asarray(v, np.float64)), g)
  return g if acc is None else jax.tree_util.tree_map(np.add, acc, g)


def _mean(acc, n):
  return jax.tree_util.tree_map(lambda v: v / n, acc)


def _n(x):
  return jax.tree_util.tree_leaves(x)[0].shape[0]


def fisher_empirical_ref(apply_fn, params, x, y, mask=None):
  """mean_b (grad sum_t m_bt log p(y_bt | x_b))^2."""
  def ll(p, xb, yb, mb):
    logp = jax.nn.log_softmax(apply_fn(p, xb)[0].astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, yb[..., None], axis=-1)[..., 0]
    return (picked * mb).sum()
  grad = jax.jit(jax.grad(ll))
  acc = None
  for b in range(_n(x)):
    mb = jnp.ones(jnp.shape(y[b])) if mask is None else jnp.asarray(mask[b], jnp.float32)
    acc = _add(acc, grad(params, _example(x, b), jnp.asarray(y[b]), mb), np.square)
  return _mean(acc, _n(x))


def fisher_exact_ref(apply_fn, params, x, mask=None):
  """mean_b sum over positions t and classes c of p_tc (grad log p_tc)^2."""
  def logp(p, xb, flat_index):
    return jax.nn.log_softmax(apply_fn(p, xb)[0], axis=-1).reshape(-1)[flat_index]
  grad = jax.jit(jax.grad(logp))
  acc = None
  for b in range(_n(x)):
    logits = np.asarray(apply_fn(params, _example(x, b))[0], np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    for t in np.ndindex(*logits.shape[:-1]):
      if mask is not None and mask[b][t] == 0:
        continue
      for c in range(logits.shape[-1]):
        flat = np.ravel_multi_index(t + (c,), logits.shape)
        g = grad(params, _example(x, b), flat)
        acc = _add(acc, g, lambda v, w=probs[t + (c,)]: w * np.square(v))
  return _mean(acc, _n(x))


def mas_ref(apply_fn, params, x, mask=None):
  """mean_b |grad sum_t m_bt ||f(x_b)_t||^2|."""
  def sq_norm(p, xb, mb):
    return jnp.sum(mb[..., None] * jnp.square(apply_fn(p, xb)[0]))
  grad = jax.jit(jax.grad(sq_norm))
  acc = None
  for b in range(_n(x)):
    out_shape = jax.eval_shape(apply_fn, params, _example(x, b)).shape[1:-1]
    mb = jnp.ones(out_shape) if mask is None else jnp.asarray(mask[b], jnp.float32)
    acc = _add(acc, grad(params, _example(x, b), mb), np.abs)
  return _mean(acc, _n(x))


def assert_tree_close(actual, expected, rtol=1e-5):
  """Leafwise, relative to each leaf's largest entry (tiny entries are float32 noise)."""
  def check(a, e):
    e = np.asarray(e, np.float64)
    np.testing.assert_allclose(np.asarray(a, np.float64), e, rtol=rtol,
                               atol=rtol * max(np.abs(e).max(), 1e-30))
  jax.tree_util.tree_map(check, actual, expected)
