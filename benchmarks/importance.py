"""Speed and memory of the importance estimators: factored engine vs vmap(vjp).

    python benchmarks/importance.py            # full run, writes benchmarks/results/importance.{json,md}
    python benchmarks/importance.py --quick    # small sizes, 2 repetitions, prints only

For each model and estimator it times, interleaved in one process (median of
``--reps`` runs after one warm-up run each):
  * ``engine``:  the public estimator with ``engine='factored'``;
  * ``vmap``:    the same estimator with ``engine='vmap'`` (per-example vjp).
    It is 10-1000x slower, so it is timed on a subset of the examples and
    scaled linearly to N (its cost is linear in N at a fixed chunk size);
  * ``batched``: ONE gradient of the summed loss over the same N examples,
    jitted, over chunks of the same size (loop unrolled): the cost floor.
and reports both as ratios to ``batched``. Memory: XLA's compiled temporary
buffer size (``memory_analysis().temp_size_in_bytes``) of each program.

Peers (``benchmarks/peers.py``; each skipped with its reason when its package
of the optional ``bench`` extra is missing; ``--no-peers`` skips them all): for
the MLP and the CNN, empirical Fisher and MAS by a PyTorch per-example loop,
torch.func ``vmap(grad)``, BackPACK, and kfac-jax's diagonal Fisher, on the
same weights and data. Each is first checked against our engine, then timed
in the same interleaved loop, as a ratio to our batched JAX gradient and (torch
peers) to a torch batched gradient over the same chunks.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import statistics
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import model_zoo as zoo  # benchmarks/model_zoo.py: real model classes (the script's folder is on sys.path)
import numpy as np
import peers as peer_lib  # benchmarks/peers.py

import wva_jax as wj
from wva_jax.importance._per_example import chunked

HERE = os.path.dirname(os.path.abspath(__file__))

# --- models ----------------------------------------------------------------------

def mlp_model(n, rng):
  sizes = (784, 300, 150, 10)
  params = [{"w": jnp.asarray(rng.normal(size=(a, b)) * 2 / np.sqrt(a), jnp.float32),
             "b": jnp.zeros(b, jnp.float32)} for a, b in zip(sizes[:-1], sizes[1:])]

  def apply_fn(p, x):
    for i, layer in enumerate(p):
      x = x @ layer["w"] + layer["b"]
      if i < len(p) - 1:
        x = jax.nn.leaky_relu(x, 0.2)
    return x

  x = jnp.asarray(rng.uniform(size=(n, 784)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, n))
  return apply_fn, params, x, y


class CNN(nn.Module):
  # Strided convs, not pooling: on XLA:CPU the backward of avg_pool (a base-
  # dilated reduce_window) alone takes ~10x the rest of the gradient and would
  # make every method look alike.
  @nn.compact
  def __call__(self, x):  # [B, 28, 28, 1]
    x = nn.relu(nn.Conv(32, (3, 3), strides=(2, 2))(x))
    x = nn.relu(nn.Conv(64, (3, 3), strides=(2, 2))(x))
    return nn.Dense(10)(x.reshape(x.shape[0], -1))


@jax.custom_vjp
def _ruled_matmul(x, w):
  return x @ w


# The plain matmul's own VJP, behind a custom rule (as a fake-quant or gradient-clipping
# dot_general of qwix / AQT has one): the engine cannot see through it, so the kernel takes
# the per-leaf path (one per-example vjp restricted to that leaf).
_ruled_matmul.defvjp(lambda x, w: (x @ w, (x, w)),
                     lambda r, g: (g @ r[1].T, jnp.einsum("...i,...j->ij", r[0], g)))


def ruled_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """``flax.linen.Dense(dot_general=...)`` with a custom VJP (Dense contracts lhs's last axis)."""
  return _ruled_matmul(lhs, rhs)


class Block(nn.Module):
  d: int
  heads: int
  ruled: bool = False  # the MLP's first kernel behind a custom rule: a per-leaf (fallback) leaf

  @nn.compact
  def __call__(self, x, mask):
    x = x + nn.SelfAttention(num_heads=self.heads)(nn.LayerNorm()(x), mask=mask)
    dense = nn.Dense(4 * self.d, dot_general=ruled_dot_general) if self.ruled else nn.Dense(4 * self.d)
    h = dense(nn.LayerNorm()(x))
    return x + nn.Dense(self.d)(jax.nn.gelu(h))


class Transformer(nn.Module):
  vocab: int = 64
  d: int = 128
  heads: int = 4
  layers: int = 2
  seq: int = 64
  ruled_blocks: int = 0  # the first blocks whose MLP kernel is behind a custom rule

  @nn.compact
  def __call__(self, tokens):
    pos = self.param("pos", nn.initializers.normal(0.02), (self.seq, self.d))
    x = nn.Embed(self.vocab, self.d)(tokens) + pos[None, :tokens.shape[1]]
    mask = nn.make_causal_mask(tokens)
    for i in range(self.layers):
      x = Block(self.d, self.heads, ruled=i < self.ruled_blocks)(x, mask)
    return nn.Dense(self.vocab)(nn.LayerNorm()(x))


def fill(shapes, rng):
  return jax.tree_util.tree_map(
      lambda s: jnp.asarray(rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1]) or 1.0),
                            jnp.float32), shapes)


def cnn_model(n, rng):
  m = CNN()
  x = jnp.asarray(rng.uniform(size=(n, 28, 28, 1)), jnp.float32)
  params = fill(jax.eval_shape(m.init, jax.random.key(0), x[:1]), rng)
  return m.apply, params, x, jnp.asarray(rng.integers(0, 10, n))


def transformer_model(n, rng, ruled_blocks=0):
  m = Transformer(ruled_blocks=ruled_blocks)
  x = jnp.asarray(rng.integers(0, m.vocab, (n, m.seq)))
  params = fill(jax.eval_shape(m.init, jax.random.key(0), x[:1]), rng)
  return m.apply, params, x, jnp.asarray(rng.integers(0, m.vocab, (n, m.seq)))


def scanned_mlp_model(n, rng, layers=4, width=256, classes=10):
  """A 4x256 MLP whose layers are stacked [L, ...] and applied by lax.scan (one matmul per layer slice)."""
  params = {"w": jnp.asarray(rng.normal(size=(layers, width, width)) / np.sqrt(width), jnp.float32),
            "b": jnp.zeros((layers, width), jnp.float32),
            "head": jnp.asarray(rng.normal(size=(width, classes)) / np.sqrt(width), jnp.float32)}

  def apply_fn(p, x):
    h, _ = jax.lax.scan(lambda h, wb: (jax.nn.relu(h @ wb[0] + wb[1]), None), x, (p["w"], p["b"]))
    return h @ p["head"]

  x = jnp.asarray(rng.normal(size=(n, width)), jnp.float32)
  return apply_fn, params, x, jnp.asarray(rng.integers(0, classes, n))


def zoo_model(builder, size=zoo.BENCH):
  """A zoo model (benchmarks/model_zoo.py) at benchmark size with N examples (no padding mask)."""

  def build(n, rng):
    c = builder(dataclasses.replace(size, batch=n))
    return c.apply_fn, c.params, c.inputs, c.targets

  return build


LM_ESTS = ("fisher (empirical)", "mas", "sig")
B = zoo.BENCH
LM = f"{B.layers}x{B.d} seq{B.seq} vocab{B.vocab}"
CONV = f"{B.image}x{B.image}x3, {B.channels} channels"

# name: (builder, N, vmap subset, engine chunk candidates, vmap chunk, estimators)
MODELS = {
    "mlp 784-300-150-10": (mlp_model, 4096, 128, (512, 1024, 4096), 64,
                           ("fisher (empirical)", "fisher (exact)", "mas", "sig")),
    "cnn conv32-conv64-dense": (cnn_model, 1024, 64, (32, 64, 128), 32,
                                ("fisher (empirical)", "mas", "sig")),
    "transformer 2x128 seq64": (transformer_model, 256, 16, (16, 32, 64), 8,
                                ("fisher (empirical)", "mas", "sig")),
    # the same with one kernel (block 0's MLP up-projection, 128x512) behind a custom VJP:
    # what one leaf on the per-leaf (fallback) path costs
    "transformer 2x128 seq64, one kernel behind a custom_vjp (per-leaf path)": (
        functools.partial(transformer_model, ruled_blocks=1), 256, 16, (16, 32, 64), 8,
        ("fisher (empirical)", "mas", "sig")),
    # the zoo: model classes from the packages users install
    f"nnx transformer, tied ({LM})": (zoo_model(zoo.nnx_transformer), 64, 8, (16,), 8, LM_ESTS),
    f"nnx.scan(nnx.remat) twin, tied ({LM})": (zoo_model(zoo.nnx_scan_transformer), 64, 8, (16,), 8,
                                                LM_ESTS),
    f"linen nn.scan(nn.remat) LM, tied ({LM})": (zoo_model(zoo.linen_scan_lm), 64, 8, (16,), 8,
                                                  LM_ESTS),
    f"HF FlaxGPT2LMHeadModel ({LM})": (zoo_model(zoo.hf_gpt2), 64, 8, (16,), 8, LM_ESTS),
    f"HF FlaxLlamaForCausalLM ({LM})": (zoo_model(zoo.hf_llama), 64, 8, (16,), 8, LM_ESTS),
    f"HF FlaxGemmaForCausalLM ({LM})": (zoo_model(zoo.hf_gemma), 64, 8, (16,), 8, LM_ESTS),
    f"HF FlaxBertForMaskedLM ({LM})": (zoo_model(zoo.hf_bert_mlm), 64, 8, (16,), 8, LM_ESTS),
    f"equinox MultiheadAttention LM ({LM})": (zoo_model(zoo.eqx_attention_lm), 64, 8, (16,), 8,
                                               LM_ESTS),
    f"haiku layer_stack LM ({LM})": (zoo_model(zoo.haiku_layer_stack), 64, 8, (16,), 8, LM_ESTS),
    f"nnx causal Conv1D LM ({LM})": (zoo_model(zoo.nnx_causal_conv_lm), 64, 8, (16, 64), 8, LM_ESTS),
    f"nnx Conv+BatchNorm(eval) ({CONV})": (zoo_model(zoo.nnx_cnn_batchnorm), 128, 8, (32, 128), 16,
                                           LM_ESTS),
    f"nnx depthwise/grouped/dilated/transposed Conv ({CONV})": (
        zoo_model(zoo.nnx_conv_variants), 128, 8, (32, 128), 16, LM_ESTS),
    f"HF FlaxResNetForImageClassification, eval ({CONV})": (zoo_model(zoo.hf_resnet), 128, 8,
                                                             (32, 128), 16, LM_ESTS),
    # issue 19: a scanned dense stack, parameter transforms, recurrence over time, a cls token
    "scanned mlp 4x256 (lax.scan)": (scanned_mlp_model, 512, 64, (128, 512), 32,
                                     ("fisher (empirical)", "mas", "sig")),
    f"linen WeightNorm(Conv) CNN ({CONV})": (zoo_model(zoo.linen_weightnorm_cnn), 128, 8, (32, 128), 16,
                                             LM_ESTS),
    f"linen RNN(LSTMCell) LM ({LM})": (zoo_model(zoo.linen_lstm), 64, 8, (16,), 8, LM_ESTS),
    f"linen RNN(GRUCell) x2 LM ({LM})": (zoo_model(zoo.linen_gru), 64, 8, (16,), 8, LM_ESTS),
    f"HF FlaxViTForImageClassification, cls token ({CONV}, 4+1 tokens)": (
        zoo_model(zoo.hf_vit), 128, 8, (32, 128), 16, LM_ESTS),
    f"HF FlaxViTForImageClassification, cls token ({CONV}, patch 4: 64+1 tokens)": (
        zoo_model(zoo.hf_vit, dataclasses.replace(B, patch=4)), 128, 8, (32, 128), 16, LM_ESTS),
}


def estimator(name, apply_fn, engine, chunk):
  if name == "fisher (empirical)":
    return lambda p, x, y: wj.importance.fisher(apply_fn, p, x, y, chunk_size=chunk, engine=engine)
  if name == "fisher (exact)":
    return lambda p, x, y: wj.importance.fisher(apply_fn, p, x, mode="exact", chunk_size=chunk,
                                                engine=engine)
  if name == "mas":
    return lambda p, x, y: wj.importance.mas(apply_fn, p, x, chunk_size=chunk, engine=engine)
  if name == "sig":
    return lambda p, x, y: wj.importance.sig(apply_fn, p, x, chunk_size=chunk)
  raise ValueError(name)


def batched_gradient(apply_fn, chunk):
  """One gradient of sum_b loss_b, scanned over chunks like the estimators."""

  def loss(p, x, y):
    logp = jax.nn.log_softmax(apply_fn(p, x).astype(jnp.float32))
    return -jnp.take_along_axis(logp, y[..., None], -1).sum()

  def f(p, x, y):
    n = jax.tree_util.tree_leaves(x)[0].shape[0]
    (xc, yc), _ = chunked((x, y), n, chunk)

    def step(acc, c):
      g = jax.grad(loss)(p, *c)
      return jax.tree_util.tree_map(jnp.add, acc, g), None

    zeros = jax.tree_util.tree_map(jnp.zeros_like, p)
    # Unrolled: inside a while loop XLA:CPU runs the kernel-gradient convolution
    # 10-50x slower (measured), which would flatter every ratio to this baseline.
    return jax.lax.scan(step, zeros, (xc, yc), unroll=True)[0]

  return f


def compile_fn(f, *args):
  c = jax.jit(f).lower(*args).compile()
  mem = c.memory_analysis()
  temp = getattr(mem, "temp_size_in_bytes", None) if mem is not None else None
  return c, temp


def timed(c, *args):
  t0 = time.perf_counter()
  jax.block_until_ready(c(*args))
  return time.perf_counter() - t0


PEER_ESTS = ("fisher (empirical)", "mas")
AGREE = 1e-3  # a peer further off than this is reported, not timed


def rel_err(a, b):
  """Largest relative L2 error over the parameter tensors (b: ours)."""
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(la) == len(lb) and all(np.shape(u) == np.shape(v) for u, v in zip(la, lb))
  return max(float(np.linalg.norm(np.asarray(u, np.float64) - np.asarray(v, np.float64))
                   / np.linalg.norm(np.asarray(v, np.float64))) for u, v in zip(la, lb))


def build_peers(model_name, apply_fn, params, x, y, ests, chunk, vchunk, sub):
  """Peer thunks for this model: (torch batched thunk, {(name, est): (thunk, to_jax, examples)},
  {(name, est): reason skipped})."""
  kind = model_name.split()[0]
  ests = [e for e in ests if e in PEER_ESTS]
  if kind not in ("mlp", "cnn") or not ests:
    return None, {}, {}
  tb, peers, skipped = peer_lib.torch_peers(kind, params, x, y, ests, chunk, vchunk, sub)
  if "fisher (empirical)" in ests:
    key = ("kfac-jax diagonal Fisher", "fisher (empirical)")
    if peer_lib.KFAC:
      skipped[key] = peer_lib.KFAC
    else:
      # one call on all N, as a user would; it never stacks per-example gradients
      fn, to_jax = peer_lib.kfac_fisher(apply_fn, params, x, y)
      peers[key] = ((lambda: fn(params, x, y)), to_jax, x.shape[0])
    if "mas" in ests:  # squared-error curvature gives g^2, not MAS's |g|
      skipped[("kfac-jax", "mas")] = "no MAS: its curvature blocks give squared gradients, not |g|"
  return tb, peers, skipped


def run(quick: bool, reps: int, only=(), with_peers=True):
  rows = []
  rng = np.random.default_rng(0)
  for model_name, (build, n, n_sub, chunks, vchunk, ests) in MODELS.items():
    if only and not any(o in model_name for o in only):
      continue
    if quick:
      n, n_sub, chunks = n // 4, max(n_sub // 4, 4), chunks[:2]
    apply_fn, params, x, y = build(n, rng)
    xs, ys = jax.tree_util.tree_map(lambda a: a[:n_sub], (x, y))
    print(f"\n{model_name}: N={n}, vmap timed on {n_sub} examples", flush=True)
    # Tune the engine's chunk on the first estimator (one timed run per candidate).
    best = None
    for cs in chunks:
      c, _ = compile_fn(estimator(ests[0], apply_fn, "factored", cs), params, x, y)
      timed(c, params, x, y)
      t = min(timed(c, params, x, y) for _ in range(2))
      print(f"  chunk {cs}: {t:.3f}s", flush=True)
      if best is None or t < best[1]:
        best = (cs, t)
    chunk = best[0]
    # The floor at ITS best chunk too: XLA:CPU's kernel-gradient convolution over one
    # large chunk can be 100x slower than over small ones (causal Conv1D LM, 64 examples:
    # 42 s in one chunk), which would flatter the engine.
    bchunk, base, base_mem = None, None, None
    for cs in chunks:
      c, mem = compile_fn(batched_gradient(apply_fn, cs), params, x, y)
      timed(c, params, x, y)
      t = min(timed(c, params, x, y) for _ in range(2))
      if len(chunks) > 1:
        print(f"  batched gradient, chunk {cs}: {t:.3f}s", flush=True)
      if bchunk is None or t < bchunk[1]:
        bchunk, base, base_mem = (cs, t), c, mem
    p_sub = min(n, 4 * n_sub)  # examples for the peers whose cost is linear in N
    tb, peers, skipped = (build_peers(model_name, apply_fn, params, x, y, ests, chunk, vchunk, p_sub)
                          if with_peers else (None, {}, {}))
    for (name, est), why in skipped.items():
      print(f"  skip {name} ({est}): {why}", flush=True)
    for est in ests:
      eng, eng_mem = compile_fn(estimator(est, apply_fn, "factored", chunk), params, x, y)
      vm = vm_mem = None
      if est != "sig":  # sig has no vmap path
        vm, vm_mem = compile_fn(estimator(est, apply_fn, "vmap", vchunk), params, xs, ys)
      times = {"batched": [], "engine": [], "vmap": []}
      calls = [("batched", base, (params, x, y)), ("engine", eng, (params, x, y))]
      if vm is not None:
        calls.append(("vmap", vm, (params, xs, ys)))
      # Peers: the first run is the warm-up and the agreement check.
      prows, scale = [], {"vmap": n / n_sub}
      mine = [(k, v) for k, v in peers.items() if k[1] == est]
      if mine:
        ours = eng(params, x, y)
        ours_sub = {}
        if tb is not None:
          calls.append(("torch batched", tb, ()))
      for (name, _), (fn, to_jax, m) in mine:
        if m != n and m not in ours_sub:
          ours_sub[m] = eng_on(est, apply_fn, chunk, params, x[:m], y[:m])
        err = rel_err(to_jax(fn()), ours if m == n else ours_sub[m])
        ok = err <= AGREE
        print(f"  {name} ({est}): max rel err {err:.1e} on {m} examples"
              + ("" if ok else " -- disagrees, not timed"), flush=True)
        prows.append({"peer": name, "examples": m, "rel_err": err, "timed": ok})
        if ok:
          calls.append((name, fn, ()))
          scale[name] = n / m
      for _, c, a in calls:  # warm-up
        timed(c, *a)
      for _ in range(reps):
        for k, c, a in calls:
          times.setdefault(k, []).append(timed(c, *a))
      med = {k: statistics.median(v) * scale.get(k, 1.0) for k, v in times.items() if v}
      tmed = med.get("torch batched")
      for pr in prows:
        sec = med.get(pr["peer"])
        pr.update(s=sec, x=sec / med["batched"] if sec else None,
                  x_torch=sec / tmed if sec and tmed and not pr["peer"].startswith("kfac") else None)
      for (name, e), why in skipped.items():
        if e == est:
          prows.append({"peer": name, "skipped": why})
      row = {"model": model_name, "estimator": est, "N": n, "chunk": chunk, "batched_chunk": bchunk[0],
             "vmap_chunk": vchunk,
             "vmap_timed_on": n_sub, "reps": reps,
             "batched_s": med["batched"], "engine_s": med["engine"],
             "vmap_s": med.get("vmap"),
             "engine_x": med["engine"] / med["batched"],
             "vmap_x": med["vmap"] / med["batched"] if "vmap" in med else None,
             "batched_temp_mb": mb(base_mem), "engine_temp_mb": mb(eng_mem),
             "vmap_temp_mb": mb(vm_mem),
             "torch_batched_s": tmed, "peers": prows}
      row["load_1min"] = os.getloadavg()[0]  # other jobs on the CPU move single ratios
      rows.append(row)
      print(fmt_row(row), flush=True)
      for line in peer_lines(row):
        print(line, flush=True)
  return rows


def eng_on(est, apply_fn, chunk, params, x, y):
  """Our engine on a subset (the reference for peers timed on that subset)."""
  return jax.jit(estimator(est, apply_fn, "factored", min(chunk, x.shape[0])))(params, x, y)


def mb(b):
  return None if b is None else b / 2**20


def fmt(v, spec):
  return "-" if v is None else format(v, spec)


HEADER = ("| model | estimator | N | chunk | batched grad (s) | engine (s) | engine / batched "
          "| vmap (s) | vmap / batched | temp MB batched / engine / vmap | load | run |")


def fmt_row(r):
  same = r.get("batched_chunk", r["chunk"]) == r["chunk"]
  chunk = r["chunk"] if same else f"{r['chunk']} (grad: {r['batched_chunk']})"
  return (f"| {r['model']} | {r['estimator']} | {r['N']} | {chunk} | {r['batched_s']:.3f} "
          f"| {r['engine_s']:.3f} | {r['engine_x']:.2f}x | {fmt(r['vmap_s'], '.2f')} "
          f"| {fmt(r['vmap_x'], '.0f' if (r['vmap_x'] or 0) >= 10 else '.1f')}x | {fmt(r['batched_temp_mb'], '.1f')} / "
          f"{fmt(r['engine_temp_mb'], '.1f')} / {fmt(r['vmap_temp_mb'], '.1f')} "
          f"| {fmt(r.get('load_1min'), '.1f')} | {r.get('run', '-')} |")


def merge_rows(saved: list, new: list) -> list:
  """``saved`` with every model in ``new`` replaced by its new rows, in ``MODELS`` order."""
  fresh = {r["model"] for r in new}
  rows = [r for r in saved if r["model"] not in fresh] + new
  order = {m: i for i, m in enumerate(MODELS)}
  return sorted(rows, key=lambda r: order.get(r["model"], len(order)))


PEER_HEADER = ("| model | estimator | method | examples timed | agreement (max rel err) | time at N (s) "
               "| / JAX batched | / torch batched |")


def ratio(v):
  return "-" if v is None else (f"{v:.0f}x" if v >= 10 else f"{v:.2f}x")


def peer_lines(r):
  """Peer-table rows for one result row: ours and the torch floor first, for reference."""
  if not r.get("peers"):
    return []
  head = f"| {r['model']} | {r['estimator']} "
  out = [head + f"| **ours: engine** | {r['N']} | - | {r['engine_s']:.3f} | {ratio(r['engine_x'])} | - |"]
  if r.get("torch_batched_s"):
    tb = r["torch_batched_s"]
    out.append(head + f"| torch batched grad | {r['N']} | - | {tb:.3f} "
               f"| {ratio(tb / r['batched_s'])} | 1.00x |")
  for p in r["peers"]:
    if "skipped" in p:
      out.append(head + f"| {p['peer']} | - | skipped: {p['skipped']} | - | - | - |")
    else:
      out.append(head + f"| {p['peer']} | {p['examples']} | {p['rel_err']:.1e} "
                 f"| {fmt(p['s'], '.3f')} | {ratio(p['x'])} | {ratio(p['x_torch'])} |")
  return out


def peer_table(rows):
  lines = [l for r in rows for l in peer_lines(r)]
  return "\n".join([PEER_HEADER, "|" + "---|" * 8] + lines) if lines else ""


def fmt_load(load):
  return "/".join(f"{v:.1f}" for v in load)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--reps", type=int, default=7)
  ap.add_argument("--only", nargs="*", default=(), help="substrings of model names")
  ap.add_argument("--no-peers", action="store_true", help="skip the torch / kfac-jax peers")
  ap.add_argument("--md-only", action="store_true",
                  help="rewrite importance.md from the committed importance.json")
  ap.add_argument("--merge", action="store_true",
                  help="with --only: replace those models' rows in the committed results, keep the rest")
  args = ap.parse_args()
  if args.merge and (args.quick or not args.only):
    ap.error("--merge needs --only and no --quick")
  if args.md_only:
    with open(os.path.join(HERE, "results", "importance.json")) as f:
      saved = json.load(f)
    write_md(os.path.join(HERE, "results", "importance.md"), saved["env"], saved["rows"],
             saved["rows"][0]["reps"])
    return
  reps = 2 if args.quick else args.reps
  load_before = os.getloadavg()
  rows = run(args.quick, reps, args.only, not args.no_peers)
  load_after = os.getloadavg()
  table = "\n".join([HEADER, "|" + "---|" * 12] + [fmt_row(r) for r in rows])
  print("\n" + table + "\n\n" + peer_table(rows))
  if args.quick or (args.only and not args.merge):
    return
  this = {"command": " ".join(["python benchmarks/importance.py"] + sys.argv[1:]),
          "with_peers": not args.no_peers,
          # other jobs share the CPU: ratios come from interleaved runs, but are noisy
          "loadavg_1_5_15_before": load_before, "loadavg_1_5_15_after": load_after}
  env = {"jax": jax.__version__, "backend": jax.default_backend(), "peers": peer_lib.versions(),
         "cpu_count": os.cpu_count(), "platform": platform.platform(),
         "torch_threads": peer_lib.torch.get_num_threads() if peer_lib.torch else None,
         "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "runs": [this]}
  out = os.path.join(HERE, "results")
  os.makedirs(out, exist_ok=True)
  if args.merge:
    with open(os.path.join(out, "importance.json")) as f:
      saved = json.load(f)
    env["runs"] = runs_of(saved["env"]) + [this]
    for r in rows:
      r["run"] = len(env["runs"])
    rows = merge_rows([dict(r, run=r.get("run", 1)) for r in saved["rows"]], rows)
    used = sorted({r["run"] for r in rows})   # drop runs no row comes from any more
    env["runs"] = [env["runs"][i - 1] for i in used]
    for r in rows:
      r["run"] = used.index(r["run"]) + 1
  else:
    for r in rows:
      r["run"] = 1
  with open(os.path.join(out, "importance.json"), "w") as f:
    json.dump({"env": env, "rows": rows}, f, indent=1)
  write_md(os.path.join(out, "importance.md"), env, rows, reps)


NOTES = """
Notes
- `batched grad` is the floor: one gradient of the summed loss, over chunks,
  loop unrolled, at the fastest of the same chunk candidates (`grad:` in the
  `chunk` column when that is not the engine's). Inside a `lax.scan` XLA:CPU
  runs the kernel-gradient convolution 10-50x slower and the input-gradient one 2-3x slower (measured),
  so a scanned baseline would flatter the CNN ratios. The engine keeps its
  scan over chunks (unrolling measured no faster) and forms conv kernel
  gradients from input patches (strided slices), grouped and depthwise ones
  included, not with that convolution. For grouped, dilated and transposed
  convolutions XLA:CPU's own kernel gradient is so slow that the engine runs
  in a fraction of the floor.
- Every parameter of a language model is used at every position (128 here),
  so per-example gradients must be formed: one GEMM per example with inner
  size T instead of one with inner size N*T (the same FLOPs), plus the
  squaring, 1/T of that work. On CPU the engine runs them in a scan over the
  chunk's examples, each reduced while in cache.
  `python benchmarks/per_example_gemm.py` (`results/per_example_gemm.md`)
  times that step alone against the weight gradient: 0.8-1.1x at T = 128,
  1.8x at T = 32, and 2.7-3.3x at T = 5-8, where the squaring and the
  per-example writes no longer hide behind the GEMM. That is the bound of
  the ViT at 4+1 tokens (T = 5); the same ViT at 64+1 tokens sits near 1x.
- Weights a scan body closes over (the LSTM and GRU cells over time): one
  GEMM per example with the time steps as its positions, as for tokens.
- Convolutional models on CPU: XLA:CPU runs a convolution's input and kernel
  gradients 2-50x slower inside a while loop, and the engine loops over
  chunks (the batched gradient above is unrolled). The chunk candidates of
  the convolutional rows include N, one chunk and no loop: the `chunk`
  column says which was faster, `temp MB` what it costs in memory. (Unrolling
  the engine's loop was tried and not kept: every convolutional model's
  temporaries grew 3-4x, and ResNet got slower.)
- `one kernel behind a custom_vjp`: the seq-64 transformer with block 0's
  MLP kernel behind a custom rule the engine cannot see through; that leaf
  alone takes the per-leaf path (per-example vjp of that leaf), the rest the
  fast path. Its difference from the plain row is what one fallback leaf of
  128 x 512 costs.
- Fisher and MAS do the same work (square vs absolute value of the same
  per-example gradients): where their ratios differ on one model, the
  difference is the shared CPU's noise, not the estimator.
- The zoo rows are model classes from the packages users install
  (`benchmarks/model_zoo.py` at `BENCH` size, random weights, no padding mask);
  the `nnx.scan(nnx.remat)` twin stacks the same blocks as `nnx transformer`.
  Scanned models keep the per-layer work inside the model's own scan.
- The CPU was shared with other jobs (load average above): ratios come from
  interleaved runs, but the same baseline varies by up to ~30% across rows.
"""


PEER_NOTES = """
- The per-example loop (the seed's way) and torch.func are timed on the first
  `examples timed` examples and scaled linearly to N, like `vmap` above;
  BackPACK, kfac-jax and both batched gradients run on all N.
- torch.func `vmap(grad)` uses the same chunk as our `vmap` path; BackPACK
  and the torch batched gradient the engine's chunk; kfac-jax takes all N in
  one jitted call (it never stacks per-example gradients).
- Torch runs 2 threads, like XLA. `benchmarks/peers.py` sets
  `OMP_WAIT_POLICY=PASSIVE` (unless set): with OpenMP's default spinning,
  the other jobs on this shared CPU made torch's 2-thread gradient ~20x
  slower than its 1-thread one (measured); passive waiting leaves ~1.5x.
- BackPACK: `SumGradSquared` with `CrossEntropyLoss(reduction='sum')` for the
  Fisher; for MAS `BatchGrad` of `MSELoss(reduction='sum')` against zeros
  (= ||f||^2), then |.| summed over examples.
- kfac-jax needs the loss registered inside the model function
  (`register_softmax_cross_entropy_loss`) and gives the empirical Fisher of
  the batch-mean loss (sum_b g_b^2 / N^2): multiplied by N here. It cannot
  give MAS (its blocks hold squared gradients). kfac-jax 0.0.8 predates jax
  0.10's `Primitive.get_bind_params`; `benchmarks/peers.py` re-points its
  one evaluator that calls it.
"""


def runs_of(env) -> list:
  """The commands behind the rows (results written before ``--merge`` existed came from one run)."""
  if "runs" in env:
    return env["runs"]
  return [{"command": env["command"], "with_peers": True, "loadavg_1_5_15_before": env["loadavg_1_5_15_before"],
           "loadavg_1_5_15_after": env["loadavg_1_5_15_after"]}]


def write_md(path, env, rows, reps):
  table = "\n".join([HEADER, "|" + "---|" * 12] + [fmt_row(r) for r in rows])
  with open(path, "w") as f:
    f.write("# Importance estimators: factored engine vs vmap(vjp) vs one batched gradient\n\n")
    runs = "; ".join(f"run {i}: `{r['command']}` (load average 1/5/15 min before "
                     f"{fmt_load(r['loadavg_1_5_15_before'])}, after {fmt_load(r['loadavg_1_5_15_after'])})"
                     for i, r in enumerate(runs_of(env), 1))
    reps = "/".join(map(str, sorted({r["reps"] for r in rows})))
    f.write(f"{runs}. On {env['cpu_count']} CPU cores ({env['backend']}, "
            f"jax {env['jax']}); median of {reps} interleaved runs after warm-up. "
            "`vmap` is timed on a subset of the examples and scaled linearly to N. "
            "Temp MB: XLA's compiled temporary buffers. `load`: the 1-minute load average "
            "after the row (other jobs shared the CPU); `run`: the command that measured it.\n\n")
    f.write(table + "\n")
    f.write(NOTES)
    ptable = peer_table(rows)
    if ptable:
      vers = ", ".join(f"{k} {v}" for k, v in env["peers"].items())
      f.write("\n## Peers on the same weights and data\n\n"
              f"{vers}; torch with {env.get('torch_threads')} threads, "
              f"`OMP_WAIT_POLICY={env.get('omp_wait_policy')}` (see notes). Same interleaved runs as "
              "above: `/ JAX batched` divides by that row's batched JAX gradient, `/ torch "
              "batched` by a torch gradient of the summed loss over the same chunks (so "
              "framework speed differences show). Agreement: largest relative L2 error over "
              "the parameter tensors against our engine on the same examples.\n\n")
      f.write(ptable + "\n")
      f.write(PEER_NOTES)


if __name__ == "__main__":
  main()
