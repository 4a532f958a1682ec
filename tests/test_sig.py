"""SIG against hand-written references (numpy, loops over examples and positions)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference_models as rm

import wva_jax as wj
from wva_jax.importance.sig import sig

RNG = np.random.default_rng(0)


def arr(*shape, scale=1.0):
  return jnp.asarray(scale * RNG.normal(size=shape), jnp.float32)


def close(a, b, tol=1e-5):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert a.shape == b.shape
  assert np.abs(a - b).max() <= tol * (np.abs(b).max() + 1e-30), np.abs(a - b).max()


def leaky(x):
  return np.where(x > 0, x, 0.2 * x)


mlp = rm.list_mlp


MLP = [{"w": arr(7, 6), "b": arr(6)}, {"w": arr(6, 4), "b": arr(4)}, {"w": arr(4, 3), "b": arr(3)}]
X = arr(11, 7)


def mlp_reference(params, x):
  """Seed rule: |w_ij| * mean_b |a_bi|; bias: mean_b |y_bj| at the pre-activation sum."""
  a = np.asarray(x, np.float64)
  out = []
  for i, layer in enumerate(params):
    w, b = np.asarray(layer["w"], np.float64), np.asarray(layer["b"], np.float64)
    y = a @ w + b
    out.append({"w": np.abs(w) * np.abs(a).mean(0)[:, None], "b": np.abs(y).mean(0)})
    a = leaky(y) if i < len(params) - 1 else y
  return out


@pytest.mark.slow
def test_mlp_matches_hand_reference():
  imp = sig(mlp, MLP, X)
  ref = mlp_reference(MLP, X)
  for got, want in zip(imp, ref):
    close(got["w"], want["w"])
    close(got["b"], want["b"])
    assert got["w"].dtype == jnp.float32
  # chunking with padding (11 = 3+3+3+2) changes nothing
  for got, want in zip(jax.tree_util.tree_leaves(sig(mlp, MLP, X, chunk_size=3)),
                       jax.tree_util.tree_leaves(imp)):
    close(got, want)


@pytest.mark.slow   # issue 20: the default run (the fast subset) stays within 3 minutes on 2 cores
def test_flax_dense_equals_plain_mlp():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = jax.nn.leaky_relu(nn.Dense(6)(x), 0.2)
      x = jax.nn.leaky_relu(nn.Dense(4)(x), 0.2)
      return nn.Dense(3)(x)

  params = {"params": {f"Dense_{i}": {"kernel": l["w"], "bias": l["b"]}
                       for i, l in enumerate(MLP)}}
  imp = sig(Net().apply, params, X)
  for i, want in enumerate(mlp_reference(MLP, X)):
    close(imp["params"][f"Dense_{i}"]["kernel"], want["w"])
    close(imp["params"][f"Dense_{i}"]["bias"], want["b"])


@pytest.mark.slow
def test_cnn_matches_patch_loop():
  dn = ("NHWC", "HWIO", "NHWC")
  params = {"k": arr(3, 3, 2, 4), "c": arr(4), "d": arr(4 * 4 * 4, 3, scale=0.1)}

  def cnn(p, x):
    h = jax.lax.conv_general_dilated(x, p["k"], (2, 2), ((1, 1), (1, 1)), dimension_numbers=dn)
    h = jnp.tanh(h + p["c"])
    return h.reshape(h.shape[0], -1) @ p["d"]

  x = arr(5, 8, 8, 2)
  imp = sig(cnn, params, x, chunk_size=2)
  # each tap (di, dj, c) carries sum over output positions of |input at that tap|
  xp = np.pad(np.abs(np.asarray(x, np.float64)), ((0, 0), (1, 1), (1, 1), (0, 0)))
  signal = np.zeros((3, 3, 2))
  for i in range(4):
    for j in range(4):
      signal += xp[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3, :].sum(0)
  close(imp["k"], np.abs(np.asarray(params["k"]))[..., :] * signal[..., None] / 5)
  y = np.asarray(jax.lax.conv_general_dilated(x, params["k"], (2, 2), ((1, 1), (1, 1)),
                                              dimension_numbers=dn) + params["c"], np.float64)
  close(imp["c"], np.abs(y).sum((1, 2)).mean(0))
  h = np.tanh(y).reshape(5, -1)
  close(imp["d"], np.abs(np.asarray(params["d"])) * np.abs(h).mean(0)[:, None])


@pytest.mark.slow
@pytest.mark.parametrize("masked", [False, True])
def test_sequence_embedding_positions_summed(masked):
  params = {"emb": arr(10, 5), "w": arr(5, 4), "b": arr(4), "out": arr(4, 3)}

  def model(p, tok):
    h = jnp.tanh(p["emb"][tok] @ p["w"] + p["b"])
    return h @ p["out"]

  tok = jnp.asarray(RNG.integers(0, 10, (6, 7)))
  m = (RNG.random((6, 7)) < 0.6).astype(np.float64) if masked else np.ones((6, 7))
  m[:, 0] = 1
  imp = sig(model, params, tok, chunk_size=4, mask=jnp.asarray(m) if masked else None)
  t = np.asarray(tok)
  e = np.asarray(params["emb"], np.float64)
  counts = np.stack([((t == v) * m).sum() for v in range(10)]) / 6
  close(imp["emb"], np.abs(e) * counts[:, None])
  a = e[t]  # [B, T, 5]
  msum = lambda v: (np.abs(v) * m[..., None]).sum((0, 1)) / 6  # padding carries no signal
  close(imp["w"], np.abs(np.asarray(params["w"])) * msum(a)[:, None])
  y = a @ np.asarray(params["w"], np.float64) + np.asarray(params["b"], np.float64)
  close(imp["b"], msum(y))
  close(imp["out"], np.abs(np.asarray(params["out"])) * msum(np.tanh(y))[:, None])
  if masked:  # an all-ones mask is no mask
    full = sig(model, params, tok, chunk_size=4, mask=jnp.ones((6, 7)))
    for k, v in sig(model, params, tok, chunk_size=4).items():
      close(full[k], v)


@pytest.mark.slow  # several probed sig calls
def test_sequence_mask_errors():
  params = {"w": arr(5, 4), "head": arr(4, 3)}
  pooled = lambda p, x: jnp.tanh(x @ p["w"]).mean(1) @ p["head"]   # [B, T, 5] -> [B, 3]
  x = jnp.asarray(RNG.normal(size=(6, 7, 5)))
  with pytest.raises(ValueError, match=r"mask has shape \(6, 8\), expected"):
    sig(lambda p, x: jnp.tanh(x @ p["w"]) @ p["head"], params, x, mask=jnp.ones((6, 8)))
  with pytest.raises(ValueError, match="mask has shape"):
    sig(pooled, params, x, mask=jnp.ones((6, 7)))  # the outputs have no positions
  per_position_head = lambda p, x: jnp.tanh(x @ p["w"]) @ p["head"] + jnp.tanh(
      (x @ p["w"]).mean(1, keepdims=True) @ p["head"])
  with pytest.raises(ValueError, match="parameter 'head' meets a signal of shape \\(1, 4\\)"):
    sig(per_position_head, params, x, mask=jnp.ones((6, 7)))


def test_shared_weight_sums_uses():
  params = {"s": arr(7, 7, scale=0.4)}
  model = lambda p, x: jnp.tanh(x @ p["s"]) @ p["s"]
  a1 = np.abs(np.asarray(X, np.float64)).mean(0)
  a2 = np.abs(np.tanh(np.asarray(X @ params["s"], np.float64))).mean(0)
  close(sig(model, params, X)["s"], np.abs(np.asarray(params["s"])) * (a1 + a2)[:, None])


@pytest.mark.slow
def test_jit_vmap_over_params_and_bf16():
  f = jax.jit(lambda p, x: sig(mlp, p, x, chunk_size=4))
  for got, want in zip(jax.tree_util.tree_leaves(f(MLP, X)),
                       jax.tree_util.tree_leaves(mlp_reference(MLP, X))):
    close(got, want)
  runs = [jax.tree_util.tree_map(lambda a, s=s: a * s, MLP) for s in (1.0, -0.5, 2.0)]
  stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *runs)
  batched = jax.vmap(lambda p: sig(mlp, p, X))(stacked)
  for r, run in enumerate(runs):
    for got, want in zip(jax.tree_util.tree_leaves(batched),
                         jax.tree_util.tree_leaves(mlp_reference(run, X))):
      close(got[r], want)
  bf = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), MLP)
  imp = sig(mlp, bf, X.astype(jnp.bfloat16))
  assert all(l.dtype == jnp.float32 for l in jax.tree_util.tree_leaves(imp))
  for got, want in zip(jax.tree_util.tree_leaves(imp),
                       jax.tree_util.tree_leaves(mlp_reference(MLP, X))):
    close(got, want, tol=5e-2)


def test_errors():
  with pytest.raises(ValueError, match="empty"):
    sig(mlp, MLP, X[:0])
  for bad in (0, -2, 1.5, True):
    with pytest.raises(ValueError, match="chunk_size"):
      sig(mlp, MLP, X, chunk_size=bad)
  # a leaf sig cannot follow gets the magnitude rule |w| with a warning naming it, the
  # rest of the model keeps its signal (never a refusal of the whole model)
  params = {"w": arr(7, 3), "t": arr(3)}
  with pytest.warns(wj.importance.FallbackWarning, match=r"'t' \(exp\)"):
    got = sig(lambda p, x: (x @ p["w"]) * jnp.exp(p["t"]), params, X)
  np.testing.assert_array_equal(np.asarray(got["t"]), np.abs(np.asarray(params["t"])))
  want_w = np.abs(np.asarray(params["w"])) * np.abs(np.asarray(X)).mean(0)[:, None]
  np.testing.assert_allclose(np.asarray(got["w"]), want_w, rtol=1e-6)
