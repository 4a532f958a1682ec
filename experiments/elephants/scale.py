"""Scale check: Fisher and SIG importance for a >100M-parameter transformer LM on this CPU.

    python -m experiments.elephants scale           # writes benchmarks/results/elephants_scale.{jsonl,md}
    python -m experiments.elephants scale --quick   # tiny sizes, prints only (rows in $TMPDIR)
    (also: python benchmarks/elephants_scale.py [--quick], which runs this module)

Each configuration runs in its own subprocess so its peak resident memory
(``ru_maxrss``) is its own. In the child: build the byte-level GPT of
``experiments.elephants.model`` (d_model 768, 12 heads, ``layers`` blocks),
jit the estimator (``fisher`` sampled with a padding mask, or ``sig``) and
``lower().compile()`` it (timed apart), read XLA's
``memory_analysis().temp_size_in_bytes``, then time one run. Reported:
compile and run seconds, peak RSS, RSS with just the params, and XLA's
temporaries, against model size, sequence length and ``chunk_size`` (the
estimators never hold more than ``chunk_size`` examples' activations and
per-example gradients). Results append to the jsonl as they finish; a
rerun skips finished configurations.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

from experiments.results import ResultStore, light_provenance, with_provenance

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "benchmarks", "results", "elephants_scale")

# (estimator, layers, seq_len, examples, chunk_size); d_model 768 throughout.
FULL = [
    ("sig", 16, 128, 8, 4), ("fisher", 16, 128, 8, 4),
    ("sig", 4, 128, 8, 4), ("fisher", 4, 128, 8, 4),
    ("sig", 8, 128, 8, 4), ("fisher", 8, 128, 8, 4),
    ("sig", 16, 64, 8, 4), ("fisher", 16, 64, 8, 4),
    ("sig", 16, 256, 8, 4), ("fisher", 16, 256, 8, 4),
    ("fisher", 16, 128, 8, 1), ("fisher", 16, 128, 8, 8),
]
QUICK = [("sig", 2, 32, 4, 2), ("fisher", 2, 32, 4, 2), ("fisher", 2, 32, 4, 4)]


NOTES = """\
Reading it (2 shared cores; the 1-minute load average was 4.7-8.8 during these runs,
recorded per row in the jsonl, so times are inflated about 3x and noisy: the 114M Fisher at
L 64 ran slower than at L 128 only because of load):

* A 114M-parameter model's importance runs on a laptop-class CPU: SIG ~2 s and Fisher ~5-10 s
  per 128-byte sequence, peak process memory 1.7 GB (SIG) and 1.8-2.8 GB (Fisher; 3.5 GB at
  L 256), of which
  ~0.9 GB is Python, JAX and the float32 params (456 MB).
* Model size (L 128, chunk 4): time and XLA temporaries grow linearly with parameters
  (SIG temp 55/109/217 MiB, Fisher temp 244/439/830 MiB for 29/57/114M).
* Sequence length: SIG's temporaries do not grow with L (it keeps per-connection sums, not
  activations); Fisher's grow with L (494/830/1931 MiB at 64/128/256), faster than linearly
  at 256 where the L^2 attention scores of a chunk add up.
* chunk_size bounds the memory: Fisher temporaries 341/830/1279 MiB for chunk 1/4/8 at the
  same 8 sequences, with similar run time (the engine's per-chunk cost is batched work).
* The fallback (per-example vmap) path covers only the embedding, LayerNorm scales and
  biases; every dense kernel takes the factored path (``engine_report``), which is why
  Fisher costs only a few forward/backward passes more than SIG.
"""


def rss_bytes() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(estimator: str, layers: int, seq_len: int, examples: int, chunk: int, d_model: int) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np

  import wva_jax as wj
  from experiments.elephants import model as lm

  cfg = lm.Config(seq_len=seq_len, d_model=d_model, heads=max(1, d_model // 64), layers=layers)
  t = time.time()
  apply_fn, params = lm.init(cfg)
  jax.block_until_ready(params)
  init_s = time.time() - t
  rss_params = rss_bytes()
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.integers(1, 256, (examples, seq_len)), jnp.uint8)
  m = jnp.ones((examples, seq_len), jnp.float32).at[::2, seq_len // 2:].set(0.0)  # half padded
  if estimator == "fisher":
    f = lambda p, x, m: wj.importance.fisher(apply_fn, p, x, mode="sampled", key=jax.random.key(0),
                                             mask=m, chunk_size=chunk)
  else:
    f = lambda p, x, m: wj.importance.sig(apply_fn, p, x, chunk_size=chunk)
  t = time.time()
  compiled = jax.jit(f).lower(params, x, m).compile()
  compile_s = time.time() - t
  ma = compiled.memory_analysis()
  t = time.time()
  imp = jax.block_until_ready(compiled(params, x, m))
  run_s = time.time() - t
  finite = bool(all(np.isfinite(np.asarray(a)).all() for a in jax.tree_util.tree_leaves(imp)))
  n = lm.num_params(params)
  return {"estimator": estimator, "layers": layers, "d_model": d_model, "seq_len": seq_len,
          "examples": examples, "chunk_size": chunk, "params": n, "param_mib": 4 * n / 2**20,
          "init_s": init_s, "compile_s": compile_s, "run_s": run_s,
          "s_per_example": run_s / examples,
          "xla_temp_mib": ma.temp_size_in_bytes / 2**20,
          "xla_argument_mib": ma.argument_size_in_bytes / 2**20,
          "xla_output_mib": ma.output_size_in_bytes / 2**20,
          "rss_params_mib": rss_params / 2**20,
          "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
          "finite": finite, "engine": sorted(set(wj.importance.engine_report(apply_fn, params, x[:1]).values()))
          if estimator == "fisher" else None}


def run_config(c, d_model):
  cmd = [sys.executable, "-m", "experiments.elephants.scale", "--child", json.dumps(list(c) + [d_model])]
  out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": ROOT})
  if out.returncode != 0:
    raise RuntimeError(out.stderr[-3000:])
  return json.loads(out.stdout.strip().splitlines()[-1])


def markdown(rows) -> str:
  head = ("| estimator | params | layers | seq len | examples | chunk | compile s | run s | s/example "
          "| XLA temp MiB | RSS params MiB | peak RSS MiB |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
  lines = [head]
  for r in rows:
    lines.append(f"| {r['estimator']} | {r['params'] / 1e6:.1f}M | {r['layers']} | {r['seq_len']} | "
                 f"{r['examples']} | {r['chunk_size']} | {r['compile_s']:.1f} | {r['run_s']:.1f} | "
                 f"{r['s_per_example']:.2f} | {r['xla_temp_mib']:.0f} | {r['rss_params_mib']:.0f} | "
                 f"{r['peak_rss_mib']:.0f} |")
  return "\n".join(lines) + "\n"


def growth(rows) -> str:
  """How time and XLA temporaries grow with model size, sequence length and chunk size."""
  def pick(est, layers, seq, chunk):
    for r in rows:
      if (r["estimator"], r["layers"], r["seq_len"], r["chunk_size"]) == (est, layers, seq, chunk):
        return r
  out = ["| estimator | varied | values | run s | XLA temp MiB | peak RSS MiB |", "|---|---|---|---|---|---|"]
  for est in ("sig", "fisher"):
    for varied, keys in (("params (layers 4/8/16, L 128)", [(est, l, 128, 4) for l in (4, 8, 16)]),
                         ("seq len 64/128/256 (114M)", [(est, 16, s, 4) for s in (64, 128, 256)]),
                         ("chunk 1/4/8 (114M, L 128)", [(est, 16, 128, c) for c in (1, 4, 8)])):
      rs = [pick(*k) for k in keys]
      if sum(r is not None for r in rs) < 2:
        continue
      fmt = lambda f: " / ".join("-" if r is None else f(r) for r in rs)
      vals = fmt(lambda r: f"{r['params'] / 1e6:.0f}M" if "params" in varied else
                 (str(r["seq_len"]) if "seq" in varied else str(r["chunk_size"])))
      run_s = fmt(lambda r: f"{r['run_s']:.1f}")
      temp = fmt(lambda r: f"{r['xla_temp_mib']:.0f}")
      peak = fmt(lambda r: f"{r['peak_rss_mib']:.0f}")
      out.append(f"| {est} | {varied} | {vals} | {run_s} | {temp} | {peak} |")
  return "\n".join(out) + "\n"


def main(quick: bool = False):
  configs, d_model = (QUICK, 64) if quick else (FULL, 768)
  # quick runs check the pipeline: their rows go to a temp file, not the committed results
  path = (os.path.join(tempfile.gettempdir(), "elephants_scale-quick.jsonl") if quick else OUT + ".jsonl")
  store = ResultStore(path)
  rows = store.records()
  done = {(r["estimator"], r["layers"], r["seq_len"], r["examples"], r["chunk_size"]) for r in rows}
  prov = light_provenance("jax", "jaxlib", "optax", "numpy", "wva-jax")   # the children record the rest
  for c in configs:
    if tuple(c) in done:
      continue
    r = run_config(c, d_model)
    r["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_avg_1m": os.getloadavg()[0]}
    r = with_provenance(r, prov)
    rows.append(r)
    store.append(r)
    print(f"{r['estimator']:6s} {r['params'] / 1e6:6.1f}M L={r['seq_len']:4d} chunk={r['chunk_size']}: "
          f"compile {r['compile_s']:.1f} s, run {r['run_s']:.1f} s, XLA temp {r['xla_temp_mib']:.0f} MiB, "
          f"peak RSS {r['peak_rss_mib']:.0f} MiB", flush=True)
  md = markdown(rows)
  if not quick:
    with open(OUT + ".md", "w") as f:
      f.write("# Importance at scale: a >100M-parameter transformer LM on a 2-core CPU\n\n"
              "Command: `python benchmarks/elephants_scale.py` (each row a fresh subprocess). "
              "Byte-level GPT (experiments/elephants/model.py), d_model 768, 12 heads; "
              "Fisher = true Fisher with one sampled continuation per position, per-sequence "
              "log-likelihood with half the sequences half padded (mask); SIG = forward signal. "
              "Run time excludes compilation (given apart). XLA temp = the compiled program's "
              "temporary buffers; RSS params = process memory after building the params; peak "
              "RSS = the process's maximum (params, importance output, XLA buffers, Python).\n\n"
              + md + "\n## Growth\n\n" + growth(rows) + "\n" + NOTES)
  print(md)
  return rows


if __name__ == "__main__":
  p = argparse.ArgumentParser()
  p.add_argument("--quick", action="store_true")
  p.add_argument("--child")
  a = p.parse_args()
  if a.child:
    print(json.dumps(child(*json.loads(a.child))))
  else:
    main(quick=a.quick)
