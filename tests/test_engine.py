"""The factored importance engine against the vmap reference and a Python loop."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference_models as rm
from flax import nnx

import wva_jax as wj
from wva_jax.importance._engine import FallbackWarning, engine_report, gradient_sums
from wva_jax.importance._per_example import per_example_sum

C = 3


def score(out, e):
  """Empirical-Fisher cotangent onehot(y) - softmax(z), K = 1; padding masked."""
  cot = jax.nn.one_hot(e["y"], out.shape[-1]) - jax.nn.softmax(out)
  if "mask" in e:
    cot = cot * e["mask"][..., None]
  return cot[None]


def exact(out, e):
  """K = C cotangents sqrt(p_c) (onehot_c - p) (one sample per example: out [B, C])."""
  p = jax.nn.softmax(out)
  eye = jnp.eye(out.shape[-1])
  return jnp.sqrt(p).T[:, :, None] * (eye[:, None, :] - p[None])


def mas_cot(out, e):
  return 2 * out[None]


def rel_err(a, b):
  a, b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(a) == len(b)
  return max(float(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)).max()
                   / (np.abs(np.asarray(y, np.float64)).max() + 1e-30)) for x, y in zip(a, b))


def python_loop(apply_fn, params, x, cot_fn, extras, reduce):
  """Independent reference: one jax.grad per example and per cotangent direction."""
  n = jax.tree_util.tree_leaves(x)[0].shape[0]
  R = np.square if reduce == "square" else np.abs
  grad = jax.jit(jax.grad(lambda p, xb, c: jnp.sum(apply_fn(p, xb) * c)))
  cotangents = jax.jit(lambda p, xb, eb: cot_fn(apply_fn(p, xb), eb))
  acc = None
  for b in range(n):
    xb = jax.tree_util.tree_map(lambda a: a[b:b + 1], x)
    eb = jax.tree_util.tree_map(lambda a: a[b:b + 1], extras)
    cots = cotangents(params, xb, eb)
    for c in cots:
      g = grad(params, xb, c)
      g = jax.tree_util.tree_map(lambda v: R(np.asarray(v, np.float64)), g)
      acc = g if acc is None else jax.tree_util.tree_map(np.add, acc, g)
  return acc


# --- models --------------------------------------------------------------------

def mlp_init(seed, sizes=(7, 6, 5, C)):
  rng = np.random.default_rng(seed)
  return [{"w": jnp.asarray(rng.normal(size=(a, b)) / np.sqrt(a), jnp.float32),
           "b": jnp.asarray(0.3 * rng.normal(size=b), jnp.float32)}
          for a, b in zip(sizes[:-1], sizes[1:])]


mlp = rm.list_mlp


class CNN(nn.Module):
  @nn.compact
  def __call__(self, x):  # [B, 8, 8, 1]
    x = nn.relu(nn.Conv(4, (3, 3))(x))
    x = nn.tanh(nn.Conv(5, (3, 3), strides=(2, 2))(x))
    return nn.Dense(C)(x.reshape(x.shape[0], -1))


class Seq(nn.Module):
  """Embedding, LayerNorm, per-position Dense and a causal mean: logits [B, T, C]."""

  @nn.compact
  def __call__(self, tokens):
    h = nn.Embed(11, 6)(tokens)
    h = nn.LayerNorm()(h)
    h = jnp.tanh(nn.Dense(5)(h))
    h = jnp.cumsum(h, axis=1) / jnp.arange(1, h.shape[1] + 1)[None, :, None]
    return nn.Dense(C)(h)


def shared(params, x):  # the same weight in two layers
  h = jnp.tanh(x @ params["shared"])
  h = jnp.tanh(h @ params["shared"])
  return h @ params["head"]


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)  # numpy: eager jax.random would compile op by op
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  return {"x": f32(rng.normal(size=(11, 7))), "y": jnp.asarray(rng.integers(0, C, 11)),
          "img": f32(rng.normal(size=(9, 8, 8, 1))),
          "tok": jnp.asarray(rng.integers(0, 11, (7, 6))),
          "ty": jnp.asarray(rng.integers(0, C, (7, 6))),
          "mask": f32(np.arange(6)[None] < np.array([6, 3, 5, 1, 6, 2, 4])[:, None])}


def fill(shapes, seed):
  """Random float32 values for a pytree of shapes (compiling Flax's initialisers is slow)."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda s: jnp.asarray(rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1]) or 1.0),
                            jnp.float32), shapes)


def init(model, x, seed):
  return fill(jax.eval_shape(model.init, jax.random.key(0), x[:1]), seed)


def both(apply_fn, params, x, cot_fn, extras, reduce="square", chunk_size=4):
  kw = dict(reduce=reduce, chunk_size=chunk_size)
  fast = jax.jit(lambda p, x, e: gradient_sums(apply_fn, p, x, cot_fn, e, engine="factored",
                                               **kw))(params, x, extras)
  ref = jax.jit(lambda p, x, e: per_example_sum(apply_fn, p, x, cot_fn, e, **kw))(
      params, x, extras)
  return fast, ref


# --- tests ---------------------------------------------------------------------

@pytest.mark.parametrize("cot,reduce", [(score, "square"), pytest.param(exact, "abs", marks=pytest.mark.slow)],
                         ids=["K=1-square", "K=C-abs"])
def test_mlp_matches_python_loop_and_vmap(data, cot, reduce):
  params = mlp_init(1)
  e = {"y": data["y"]}
  fast, ref = both(mlp, params, data["x"], cot, e, reduce, chunk_size=4)  # 11 = 4+4+3: padding
  loop = python_loop(mlp, params, data["x"], cot, e, reduce)
  assert rel_err(fast, loop) <= 1e-5
  assert rel_err(ref, loop) <= 1e-5
  assert all(l.dtype == jnp.float32 for l in jax.tree_util.tree_leaves(fast))
  assert engine_report(mlp, params, data["x"]) == {
      "0/w": "dense", "0/b": "bias", "1/w": "dense", "1/b": "bias", "2/w": "dense", "2/b": "bias"}


@pytest.mark.slow
def test_cnn_conv_path(data):
  model = CNN()
  params = init(model, data["img"], 2)
  e = {"y": data["y"][:9]}
  fast, ref = both(model.apply, params, data["img"], score, e, chunk_size=4)
  assert rel_err(fast, ref) <= 1e-5
  loop = python_loop(model.apply, params, data["img"], score, e, "square")
  assert rel_err(fast, loop) <= 1e-5
  report = engine_report(model.apply, params, data["img"])
  assert report["params/Conv_0/kernel"] == "conv" and report["params/Conv_1/bias"] == "bias"
  assert report["params/Dense_0/kernel"] == "dense"


@pytest.mark.slow
def test_conv_layouts_strides_dilation_and_grouped(data):
  """Kernel gradients from input patches must land in the kernel's own layout."""
  rng = np.random.default_rng(10)
  params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), {
      "k1": rng.normal(size=(4, 1, 3, 2)) / 2,  # OIHW, non-square window
      "k2": rng.normal(size=(2, 2, 2, 4)) / 2,  # HWIO, grouped (2 groups): vmap(vjp) path
      "d": rng.normal(size=(3 * 3 * 4, C)) / 6})

  def model(p, x):  # x: [B, 8, 8, 1] NHWC -> NCHW
    h = jax.lax.conv_general_dilated(jnp.transpose(x, (0, 3, 1, 2)), p["k1"], (1, 2),
                                     ((1, 1), (0, 1)), rhs_dilation=(2, 1),
                                     dimension_numbers=("NCHW", "OIHW", "NCHW"))
    h = jnp.tanh(h)  # [B, 4, 6, 4] -> [B, 3, 3, 4] below
    h = jax.lax.conv_general_dilated(jnp.transpose(h, (0, 2, 3, 1)), p["k2"], (2, 1), "VALID",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     feature_group_count=2)
    return h.reshape(h.shape[0], -1) @ p["d"]

  report = engine_report(model, params, data["img"])
  assert report == {"k1": "conv", "k2": "conv", "d": "dense"}
  e = {"y": data["y"][:9]}
  for cot, reduce in ((exact, "square"), (mas_cot, "abs")):
    fast, ref = both(model, params, data["img"], cot, e, reduce)
    assert rel_err(fast, ref) <= 1e-5


@pytest.mark.slow
def test_sequence_embedding_layernorm_with_padding_mask(data):
  model = Seq()
  params = init(model, data["tok"], 3)
  e = {"y": data["ty"], "mask": data["mask"]}
  fast, ref = both(model.apply, params, data["tok"], score, e, "square", chunk_size=3)
  assert rel_err(fast, ref) <= 1e-5
  report = engine_report(model.apply, params, data["tok"])
  assert report == {"params/Embed_0/embedding": "embedding",
                    "params/LayerNorm_0/scale": "scale", "params/LayerNorm_0/bias": "bias",
                    "params/Dense_0/kernel": "dense/positions", "params/Dense_0/bias": "bias",
                    "params/Dense_1/kernel": "dense/positions", "params/Dense_1/bias": "bias"}
  sub = lambda t: jax.tree_util.tree_map(lambda a: a[:4], t)
  loop = python_loop(model.apply, params, sub(data["tok"]), score, sub(e), "square")
  fast4 = jax.jit(lambda p, x, e: gradient_sums(model.apply, p, x, score, e, chunk_size=3))(
      params, sub(data["tok"]), sub(e))
  assert rel_err(fast4, loop) <= 1e-5
  # the mask matters: dropping it changes the result
  unmasked = jax.jit(lambda p, x, e: gradient_sums(model.apply, p, x, score, e, chunk_size=3))(
      params, data["tok"], {"y": data["ty"]})
  assert rel_err(unmasked, fast) > 1e-3


def test_shared_weight_sums_uses_per_example_and_is_exact(data):
  rng = np.random.default_rng(4)
  params = {"shared": jnp.asarray(rng.normal(size=(7, 7)) / 2, jnp.float32),
            "head": jnp.asarray(rng.normal(size=(7, C)), jnp.float32)}
  e = {"y": data["y"]}
  fast, ref = both(shared, params, data["x"], exact, e)
  assert rel_err(fast, ref) <= 1e-5
  # sum_b (g1_b + g2_b)^2 != sum_b g1_b^2 + g2_b^2: a wrong factoring would show here
  assert engine_report(shared, params, data["x"]) == {"head": "dense",
                                                      "shared": "shared: dense + dense"}


def test_unseen_uses_fall_back_with_a_warning(data):
  """A parameter inside a custom_vjp call, or under a nonlinearity, is differentiated the general way."""

  @jax.custom_vjp
  def scaled(x, s):
    return x * s

  scaled.defvjp(lambda x, s: (x * s, (x, s)), lambda r, g: (g * r[1], (g * r[0]).sum(0)))

  def model(p, x):
    h = scaled(x, p["s"])
    h, _ = jax.lax.scan(lambda c, _: (jnp.tanh(c @ p["rec"]), None), h, None, length=2)
    return h @ jnp.tanh(p["out"])

  rng = np.random.default_rng(5)
  params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), {
      "s": rng.normal(size=7), "rec": rng.normal(size=(7, 7)) / 3, "out": rng.normal(size=(7, C))})
  report = engine_report(model, params, data["x"])
  # tanh of a weight is a parameter transform (pulled back through its VJP), not a fallback
  assert report["out"] == "transform (tanh)"
  assert report["s"] == "fallback: used by custom_vjp_call"
  # closed over by the scan body: used once per iteration, summed per example
  assert report["rec"] == "dense/positions (scan)"
  with pytest.warns(FallbackWarning, match="1 parameter leaves .* 's' \\(custom_vjp_call\\)"):
    fast, ref = both(model, params, data["x"], score, {"y": data["y"]})
  assert rel_err(fast, ref) <= 1e-5


def test_unused_and_integer_leaves_are_zero(data):
  params = {"mlp": mlp_init(11), "spare": jnp.ones(4), "step": jnp.array(3, jnp.int32)}
  model = lambda p, x: mlp(p["mlp"], x)
  report = engine_report(model, params, data["x"])
  assert report["spare"] == "unused" and report["step"] == "unused (integer)"
  f = lambda p, m: gradient_sums(m, p, data["x"], score, {"y": data["y"]}, chunk_size=4)
  out = jax.jit(lambda p: f(p, model))(params)
  assert not np.any(out["spare"]) and not np.any(out["step"])
  assert rel_err(out["mlp"], jax.jit(lambda p: f(p, mlp))(params["mlp"])) <= 1e-6


def test_jit_wrapped_remat_and_dtype_cast(data):
  """Uses are followed through jit, remat and convert_element_type."""
  params = mlp_init(6)

  @jax.jit
  def model(p, x):
    h = jax.checkpoint(lambda x: jax.nn.leaky_relu(x @ p[0]["w"] + p[0]["b"], 0.2))(x)
    h = mlp(p[1:], h.astype(jnp.bfloat16).astype(jnp.float32))
    return h

  assert set(engine_report(model, params, data["x"]).values()) == {"dense", "bias"}
  fast, ref = both(model, params, data["x"], score, {"y": data["y"]})
  assert rel_err(fast, ref) <= 1e-5


def test_nnx_linear_and_conv(data):
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.conv = nnx.Conv(1, 3, (3, 3), rngs=rngs)
      self.lin = nnx.Linear(3 * 8 * 8, C, rngs=rngs)

    def __call__(self, x):
      h = jax.nn.relu(self.conv(x))
      return self.lin(h.reshape(h.shape[0], -1))

  graphdef, shapes = nnx.split(nnx.eval_shape(lambda: Net(nnx.Rngs(0))), nnx.Param)
  p = fill(shapes, 9)
  apply_fn = lambda p, x: nnx.merge(graphdef, p)(x)
  e = {"y": data["y"][:9]}
  fast, ref = both(apply_fn, p, data["img"], exact, e)
  assert rel_err(fast, ref) <= 1e-5
  assert jax.tree_util.tree_structure(fast) == jax.tree_util.tree_structure(p)
  assert engine_report(apply_fn, p, data["img"]) == {
      "conv/bias": "bias", "conv/kernel": "conv", "lin/bias": "bias", "lin/kernel": "dense"}


@pytest.mark.slow
def test_bf16_params_accumulate_in_f32(data):
  params = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), mlp_init(7))
  x = data["x"].astype(jnp.bfloat16)
  e = {"y": data["y"]}
  fast = jax.jit(lambda p, x, e: gradient_sums(mlp, p, x, score, e, chunk_size=4))(params, x, e)
  assert all(l.dtype == jnp.float32 for l in jax.tree_util.tree_leaves(fast))
  # bf16 forward/backward: agree with the f32 computation at bf16 precision
  p32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), params)
  ref = python_loop(mlp, p32, x.astype(jnp.float32), score, e, "square")
  assert rel_err(fast, ref) <= 3e-2


def test_jit_and_validation(data):
  params = mlp_init(8)
  f = jax.jit(functools.partial(gradient_sums, mlp, cot_fn=score, chunk_size=5))
  out = f(params, data["x"], extras={"y": data["y"]})
  ref = per_example_sum(mlp, params, data["x"], score, {"y": data["y"]}, chunk_size=5)
  assert rel_err(out, ref) <= 1e-5
  with pytest.raises(ValueError, match="engine"):
    gradient_sums(mlp, params, data["x"], score, {"y": data["y"]}, engine="fast")
  with pytest.raises(ValueError, match="chunk_size"):
    gradient_sums(mlp, params, data["x"], score, {"y": data["y"]}, chunk_size=0)
  with pytest.raises(ValueError, match="reduce"):
    gradient_sums(mlp, params, data["x"], score, {"y": data["y"]}, reduce="sq")
  with pytest.raises(ValueError, match="empty"):
    gradient_sums(mlp, params, data["x"][:0], score, {"y": data["y"][:0]})


# --- soundness and refusals (issue: real model code) ---------------------------------

def _int_cast_model(p, x):
  # w only reaches the output through an integer cast (fake quantisation without
  # a straight-through estimator): its true gradient is exactly zero
  wq = p["w"].astype(jnp.int32).astype(jnp.float32)
  return x @ wq + x @ jnp.round(p["r"]) + x @ jax.lax.stop_gradient(p["s"]) + x @ p["v"]


def test_integer_cast_round_and_stop_gradient_give_exact_zero(data):
  rng = np.random.default_rng(9)
  params = {k: jnp.asarray(rng.normal(size=(7, C)) * 3, jnp.float32) for k in "wrsv"}
  report = engine_report(_int_cast_model, params, data["x"])
  assert report == {"w": "unused", "r": "unused", "s": "unused", "v": "dense"}
  for engine in ("factored", "vmap"):
    f = wj.importance.fisher(_int_cast_model, params, data["x"], data["y"], engine=engine)
    for k in "wrs":
      assert not np.any(np.asarray(f[k])), (engine, k)
    assert np.all(np.asarray(f["v"]) > 0)
  sig = wj.importance.sig(_int_cast_model, params, data["x"])
  assert not np.any(np.asarray(sig["w"])) and np.all(np.asarray(sig["v"]) > 0)


def _estimator_calls(apply_fn, params, x, y):
  imp = wj.importance
  return {
      "fisher": lambda: imp.fisher(apply_fn, params, x, y),
      "fisher-vmap": lambda: imp.fisher(apply_fn, params, x, y, engine="vmap"),
      "mas": lambda: imp.mas(apply_fn, params, x),
      "mas-vmap": lambda: imp.mas(apply_fn, params, x, engine="vmap"),
      "sig": lambda: imp.sig(apply_fn, params, x),
  }


@pytest.mark.slow
def test_batch_mixing_model_is_refused_by_name_on_every_path(data):
  """Linen BatchNorm in training mode normalises over the batch: outputs mix examples."""

  class Net(nn.Module):
    train: bool

    @nn.compact
    def __call__(self, x):
      h = nn.BatchNorm(use_running_average=not self.train)(nn.Dense(5)(x))
      return nn.Dense(C)(h)

  def split(train):
    model = Net(train)
    variables = model.init(jax.random.key(0), data["x"][:2])
    stats = variables["batch_stats"]
    apply_fn = lambda p, x: model.apply({"params": p, "batch_stats": stats}, x,
                                        mutable=["batch_stats"])[0]
    return apply_fn, variables["params"]

  apply_fn, params = split(train=True)
  for _name, call in _estimator_calls(apply_fn, params, data["x"], data["y"]).items():
    with pytest.raises(ValueError, match="mixes examples.*primitive 'reduce_sum'"):
      call()
  # the same model in evaluation mode is accepted
  apply_fn, params = split(train=False)
  for call in _estimator_calls(apply_fn, params, data["x"], data["y"]).values():
    call()


def test_non_array_outputs_get_the_same_clear_error_on_every_path(data):
  params = mlp_init(3)
  tupled = lambda p, x: (jnp.zeros(x.shape[0]), mlp(p, x))
  for _name, call in _estimator_calls(tupled, params, data["x"], data["y"]).items():
    with pytest.raises(ValueError, match=r"returned a tuple of 2 arrays \(shapes \(1,\), \(1, 3\)\)"):
      call()
  dicted = lambda p, x: {"logits": mlp(p, x)}
  with pytest.raises(ValueError, match=r"returned a dict of 1 arrays.*\.logits"):
    wj.importance.fisher(dicted, params, data["x"], data["y"])
