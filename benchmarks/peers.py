"""Peers a user would otherwise pick for per-example importance (optional `bench` extra).

Each peer is a thunk computing the estimate plus ``to_jax(out)``, which turns
its result into our parameter pytree (numpy, our layout and normalisation: a
mean over examples) for the agreement check; a peer whose package is missing
comes back as a reason instead. The torch models are twins of the JAX models
with the same weights, so every peer computes exactly our quantity:
  * fisher (empirical): mean_b (grad_theta log p(y_b | x_b))^2;
  * mas: mean_b |grad_theta ||f(x_b)||^2|.
"""
from __future__ import annotations

import os
import warnings

import numpy as np

# Before torch loads OpenMP: on a shared CPU, spinning OpenMP workers starve each
# other and a 2-thread torch gradient of the MLP ran ~20x slower than 1 thread
# (measured at load average 5); with passive waiting, ~1.5x slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

try:
  import torch
  import torch.nn.functional as F
  from torch import nn
  TORCH = None
  torch.set_num_threads(2)  # the machine's cores; XLA uses them all too
except ImportError as e:  # pragma: no cover - optional
  torch = None
  TORCH = f"torch not installed ({e.name})"

try:
  import backpack
  from backpack.extensions import BatchGrad, SumGradSquared
  BACKPACK = None
except ImportError as e:  # pragma: no cover - optional
  backpack = None
  BACKPACK = f"backpack-for-pytorch not installed ({e.name})"

try:
  import kfac_jax
  KFAC = None
except ImportError as e:  # pragma: no cover - optional
  kfac_jax = None
  KFAC = f"kfac-jax not installed ({e.name})"


def _kfac_jax_compat():
  """kfac-jax 0.0.8 unpacks ``Primitive.get_bind_params`` as ``(subfuns, params)``;
  newer jax returns the params alone. Re-point its one evaluator at a version
  that accepts both (nothing else in kfac-jax calls it)."""
  import jax
  from kfac_jax._src import tag_graph_matcher as tgm

  def eval_eqn(eqn, in_values):
    bound = eqn.primitive.get_bind_params(eqn.params)
    subfuns, params = bound if isinstance(bound, tuple) else ((), bound)
    with jax.extend.source_info_util.user_context(eqn.source_info.traceback):
      out = eqn.primitive.bind(*subfuns, *in_values, **params)
    return out if isinstance(out, list) else [out]

  tgm.eval_jaxpr_eqn = eval_eqn


if kfac_jax is not None:
  _kfac_jax_compat()


def versions():
  """Installed versions of the peers' distributions (for pinning the extra)."""
  from importlib import metadata
  out = {}
  for name, mod in (("torch", torch), ("backpack-for-pytorch", backpack), ("kfac-jax", kfac_jax)):
    if mod is not None:
      out[name] = metadata.version(name)
  return out


# --- torch twins of the JAX models --------------------------------------------------

def t(a):
  return torch.from_numpy(np.array(a, np.float32))  # a copy: jax buffers are read-only


def torch_mlp(params):
  """nn.Sequential twin of benchmarks.importance.mlp_model (torch Linear is [out, in])."""
  layers = []
  for i, p in enumerate(params):
    w = np.asarray(p["w"])
    lin = nn.Linear(*w.shape)
    with torch.no_grad():
      lin.weight.copy_(t(w.T))
      lin.bias.copy_(t(p["b"]))
    layers.append(lin)
    if i < len(params) - 1:
      layers.append(nn.LeakyReLU(0.2))
  model = nn.Sequential(*layers)

  def to_jax(grads):  # list in model.parameters() order: w, b per Linear
    return [{"w": grads[2 * i].T, "b": grads[2 * i + 1]} for i in range(len(params))]

  return model, to_jax


# Flax 'SAME' padding for a 3x3 kernel at stride 2 on an even size pads one
# row/column at the end only; torch Conv2d pads symmetrically, hence ZeroPad2d.
def torch_cnn(params):
  """nn.Sequential twin of benchmarks.importance.CNN (NCHW; dense rows permuted from HWC)."""
  p = params["params"]

  def conv(q):
    k = np.asarray(q["kernel"])  # [kh, kw, in, out]
    c = nn.Conv2d(k.shape[2], k.shape[3], k.shape[:2], stride=2)
    with torch.no_grad():
      c.weight.copy_(t(k.transpose(3, 2, 0, 1)))
      c.bias.copy_(t(q["bias"]))
    return c

  k = np.asarray(p["Dense_0"]["kernel"])  # [7*7*64 (h, w, c), 10]
  hwc = (7, 7, k.shape[0] // 49)
  dense = nn.Linear(*k.shape)
  with torch.no_grad():
    dense.weight.copy_(t(k.reshape(*hwc, -1).transpose(2, 0, 1, 3).reshape(k.shape).T))
    dense.bias.copy_(t(p["Dense_0"]["bias"]))
  model = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), conv(p["Conv_0"]), nn.ReLU(),
                        nn.ZeroPad2d((0, 1, 0, 1)), conv(p["Conv_1"]), nn.ReLU(),
                        nn.Flatten(), dense)

  def to_jax(g):
    def ck(w):
      return w.transpose(2, 3, 1, 0)
    dk = g[4].T.reshape(hwc[2], 7, 7, -1).transpose(1, 2, 0, 3).reshape(k.shape)
    return {"params": {"Conv_0": {"kernel": ck(g[0]), "bias": g[1]},
                       "Conv_1": {"kernel": ck(g[2]), "bias": g[3]},
                       "Dense_0": {"kernel": dk, "bias": g[5]}}}

  return model, to_jax


# --- torch peers ----------------------------------------------------------------

def chunks(n, size):
  return [(s, min(s + size, n)) for s in range(0, n, size)]


def per_example_loss(est):
  """Loss of one example's output whose gradient is the per-example score."""
  if est == "fisher (empirical)":
    return lambda out, y: F.cross_entropy(out, y, reduction="sum")
  return lambda out, y: (out * out).sum()


def reduce_fn(est):
  return (lambda g: g * g) if est == "fisher (empirical)" else torch.abs


def torch_batched(model, x, y, chunk):
  """One gradient of the summed log-loss over all N, in chunks: torch's floor."""
  def fn():
    model.zero_grad(set_to_none=True)
    for s, e in chunks(len(x), chunk):
      F.cross_entropy(model(x[s:e]), y[s:e], reduction="sum").backward()
    return [p.grad for p in model.parameters()]
  return fn


def torch_loop(model, x, y, est):
  """The seed's way: one backward pass per example."""
  loss, red = per_example_loss(est), reduce_fn(est)

  def fn():
    acc = [torch.zeros_like(p) for p in model.parameters()]
    for i in range(len(x)):
      model.zero_grad(set_to_none=True)
      loss(model(x[i:i + 1]), y[i:i + 1]).backward()
      for a, p in zip(acc, model.parameters()):
        a += red(p.grad)
    return acc
  return fn


def torch_func(model, x, y, est, chunk):
  """torch.func vmap(grad) over chunks of examples."""
  from torch.func import functional_call, grad, vmap
  loss, red = per_example_loss(est), reduce_fn(est)
  names = [n for n, _ in model.named_parameters()]

  def one(params, xb, yb):
    out = functional_call(model, dict(zip(names, params)), (xb[None],))
    return loss(out, yb[None])

  per_ex = vmap(grad(one), in_dims=(None, 0, 0))

  def fn():
    params = tuple(p.detach() for p in model.parameters())
    acc = [torch.zeros_like(p) for p in params]
    with torch.no_grad():
      for s, e in chunks(len(x), chunk):
        for a, g in zip(acc, per_ex(params, x[s:e], y[s:e])):
          a += red(g).sum(0)
    return acc
  return fn


def torch_backpack(model, x, y, est, chunk):
  """BackPACK: SumGradSquared for the Fisher; BatchGrad (then |.|) for MAS."""
  from backpack import extend
  # BackPACK's module hooks fire although the inputs need no gradient: expected.
  warnings.filterwarnings("ignore", message="Full backward hook is firing")
  model = extend(model)
  if est == "fisher (empirical)":
    lossf, ext = extend(nn.CrossEntropyLoss(reduction="sum")), SumGradSquared
    target, attr = (lambda s, e, out: y[s:e]), "sum_grad_squared"
  else:  # MSE to zero with reduction='sum' is ||f||^2, summed over the chunk
    lossf, ext = extend(nn.MSELoss(reduction="sum")), BatchGrad
    target, attr = (lambda s, e, out: torch.zeros_like(out)), "grad_batch"

  def fn():
    acc = [torch.zeros_like(p) for p in model.parameters()]
    for s, e in chunks(len(x), chunk):
      model.zero_grad(set_to_none=True)
      out = model(x[s:e])
      with backpack.backpack(ext()):
        lossf(out, target(s, e, out)).backward()
      for a, p in zip(acc, model.parameters()):
        v = getattr(p, attr)
        a += v if attr == "sum_grad_squared" else v.abs().sum(0)
    return acc
  return fn


def torch_peers(kind, params, x, y, ests, chunk, vchunk, sub):
  """Torch twins and peers over JAX data ``x, y``. Returns (batched, peers, skipped).

  ``peers[(name, est)] = (fn, to_jax, examples)``: the per-example loop and
  torch.func run on the first ``sub`` examples (their cost is linear in N; the
  caller scales), BackPACK and the batched gradient on all N.
  """
  names = ["torch loop", "torch.func vmap(grad)", "BackPACK"]
  if torch is None:
    return None, {}, {(n, e): TORCH for e in ests for n in names}
  build = torch_mlp if kind == "mlp" else torch_cnn
  xn = np.asarray(x, np.float32)
  xt = t(xn if kind == "mlp" else xn.transpose(0, 3, 1, 2))
  yt = torch.from_numpy(np.asarray(y, np.int64))
  n = len(xn)
  model, to_jax = build(params)

  def mean(m):  # our estimators average over examples
    return lambda out: to_jax([a.detach().numpy() / m for a in out])

  peers, skipped = {}, {}
  batched = torch_batched(model, xt, yt, chunk)
  for est in ests:
    peers[(names[0], est)] = (torch_loop(model, xt[:sub], yt[:sub], est), mean(sub), sub)
    peers[(names[1], est)] = (torch_func(model, xt[:sub], yt[:sub], est, vchunk), mean(sub), sub)
    if BACKPACK:
      skipped[(names[2], est)] = BACKPACK
    else:
      bp_model, _ = build(params)  # extend() hooks the modules: keep them off the others
      name = "BackPACK " + ("SumGradSquared" if est == "fisher (empirical)" else "BatchGrad")
      peers[(name, est)] = (torch_backpack(bp_model, xt, yt, est, chunk), mean(n), n)
  return batched, peers, skipped


# --- kfac-jax ------------------------------------------------------------------

def kfac_fisher(apply_fn, params, x, y):
  """kfac-jax's diagonal empirical Fisher. The user must register the loss in the model.

  Returns ``(fn, to_jax)`` with ``fn(params, x, y)`` jitted. kfac-jax's
  'fisher_empirical' is that of the batch-mean loss, sum_b g_b^2 / N^2, so
  ``to_jax`` multiplies by N.
  """
  import jax
  import jax.numpy as jnp
  n = x.shape[0]

  def loss(p, batch):
    xb, yb = batch
    logits = apply_fn(p, xb)
    # kfac-jax finds the layers itself but needs to be told where the loss is.
    kfac_jax.register_softmax_cross_entropy_loss(logits, yb)
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), yb[:, None], -1).mean()

  est = kfac_jax.BlockDiagonalCurvature(
      loss, default_estimation_mode="fisher_empirical",
      layer_tag_to_block_ctor={"dense": kfac_jax.DenseDiagonal,
                               "conv2d": kfac_jax.Conv2DDiagonal})
  state0 = est.init(jax.random.key(0), (params, (x, y)), None, None)

  @jax.jit
  def fn(p, xb, yb):
    st = est.update_curvature_matrix_estimate(
        state0, ema_old=0.0, ema_new=1.0, identity_weight=0.0, batch_size=n,
        rng=jax.random.key(0), func_args=(p, (xb, yb)))
    # diag(F) @ ones = diag(F), in the parameters' layout
    ones = jax.tree_util.tree_map(jnp.ones_like, p)
    return est.multiply(st, ones, identity_weight=0.0, exact_power=True, use_cached=False,
                        pmap_axis_name=None)

  return fn, lambda out: jax.tree_util.tree_map(lambda a: np.asarray(a) * n, out)
