"""What bounds per-example gradients of a weight used at T positions, on this machine.

    python benchmarks/per_example_gemm.py   # writes benchmarks/results/per_example_gemm.md

For a Dense weight W [d_in, d_out] used at T positions per example, Fisher needs
sum_b (X_b^T D_b)^2 with X_b [T, d_in], D_b [T, d_out]. One batched gradient
computes sum_b X_b^T D_b as ONE GEMM with inner size N*T. Per-example squares
need N GEMMs with inner size T (the same FLOPs) plus N squarings of d_in x d_out
(1/T of the GEMM work). Timed, each jitted over chunks like the engine:

* ``batched``: X^T D over the chunk (the weight gradient, the floor);
* ``vmap``:    einsum('btd,bte->bde') then square and sum over the chunk
               (how the engine reduced before, and still does on accelerators);
* ``scan``:    a scan over the chunk's examples accumulating (x_b^T d_b)^2
               (what the engine does on CPU).
Median of 7 interleaved runs; ratios to ``batched``.
"""
from __future__ import annotations

import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
N, CHUNK = 64, 16
SHAPES = [(128, 256, 256), (128, 256, 1024), (128, 1024, 256), (32, 256, 256), (8, 256, 256), (5, 256, 256)]


def programs(t, di, do):
  def chunks(a, w):
    return a.reshape(-1, CHUNK, t, w)

  def batched(x, d):
    def step(acc, c):
      return acc + jnp.einsum("btd,bte->de", *c), None
    return jax.lax.scan(step, jnp.zeros((di, do)), (chunks(x, di), chunks(d, do)))[0]

  def vmapped(x, d):
    def step(acc, c):
      return acc + jnp.square(jnp.einsum("btd,bte->bde", *c)).sum(0), None
    return jax.lax.scan(step, jnp.zeros((di, do)), (chunks(x, di), chunks(d, do)))[0]

  def scanned(x, d):
    def step(acc, c):
      def one(a, xd):
        g = xd[0].T @ xd[1]
        return a + g * g, None
      return jax.lax.scan(one, acc, c)[0], None
    return jax.lax.scan(step, jnp.zeros((di, do)), (chunks(x, di), chunks(d, do)))[0]

  return {"batched": batched, "vmap": vmapped, "scan": scanned}


def main():
  rng = np.random.default_rng(0)
  rows = []
  for t, di, do in SHAPES:
    x = jnp.asarray(rng.normal(size=(N, t, di)), jnp.float32)
    d = jnp.asarray(rng.normal(size=(N, t, do)), jnp.float32)
    comp = {k: jax.jit(f).lower(x, d).compile() for k, f in programs(t, di, do).items()}
    ref = np.asarray(comp["vmap"](x, d))
    assert np.allclose(np.asarray(comp["scan"](x, d)), ref, rtol=1e-4)
    times = {k: [] for k in comp}
    for c in comp.values():
      c(x, d).block_until_ready()
    for _ in range(7):
      for k, c in comp.items():
        t0 = time.perf_counter()
        c(x, d).block_until_ready()
        times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    rows.append((t, di, do, med))
    print(t, di, do, {k: f"{v * 1e3:.1f} ms ({v / med['batched']:.2f}x)" for k, v in med.items()},
          flush=True)
  load = "/".join(f"{v:.1f}" for v in os.getloadavg())
  lines = ["# Per-example gradients of a weight used at T positions: what bounds them", "",
           f"`python benchmarks/per_example_gemm.py` ({jax.default_backend()}, jax {jax.__version__}, "
           f"{os.cpu_count()} cores, load average after {load}): N = {N} examples in chunks of "
           f"{CHUNK}; median of 7 interleaved runs; see the script's docstring.", "",
           "| T | d_in | d_out | batched X^T D (ms) | vmap einsum + square | scan over examples |",
           "|---|---|---|---|---|---|"]
  for t, di, do, med in rows:
    b = med["batched"]
    lines.append(f"| {t} | {di} | {do} | {b * 1e3:.1f} | {med['vmap'] / b:.2f}x | {med['scan'] / b:.2f}x |")
  with open(os.path.join(HERE, "results", "per_example_gemm.md"), "w") as f:
    f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
