"""What the batch-independence probe costs inside a training step, by ``probe`` setting.

    python benchmarks/probe_cost.py            # writes benchmarks/results/probe_cost.md
    python benchmarks/probe_cost.py --steps 20 # shorter, prints only

A jitted SGD step that calls ``wj.importance.grad_and_fisher`` and applies
its gradient, so the parameter values are new on every call (as in training),
run ``--steps`` times per setting, the settings interleaved in rounds:
  * ``probe=False``: never probed, no host callback: the step itself;
  * ``probe=10**9``: the 0.2.0 code's policy, a host callback in every call that
    skips the probe after the first (so a model that began to mix was never
    refused);
  * ``probe=50`` (the default, ``PROBE_EVERY``): the first and every 50th call;
  * ``probe=True``: every call (the values are new each time).
The headline is ``default / 0.2.0``: the price of re-probing a model whose
mixing may change as it trains (issue 27 item 2: within 5% of 0.2.0's cost).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import time

import importance as bench  # benchmarks/importance.py (the script's folder is on sys.path)
import jax
import numpy as np

import wva_jax as wj

HERE = os.path.dirname(os.path.abspath(__file__))
zoo = bench.zoo
LM_SIZE = dataclasses.replace(zoo.BENCH, batch=16)
MODELS = {
    "mlp 784-300-150-10": (bench.mlp_model, 1024),
    f"nnx transformer, tied ({LM_SIZE.layers}x{LM_SIZE.d} seq{LM_SIZE.seq} vocab{LM_SIZE.vocab})":
        (bench.zoo_model(zoo.nnx_transformer, LM_SIZE), 16),
}
# probe=10**9 is the 0.2.0 code's policy: the host callback in every call, the probe on the first only
SETTINGS = {"never (probe=False)": False, "0.2.0 policy (first call only)": 10**9,
            "default (probe=50)": wj.importance.PROBE_EVERY, "every call (probe=True)": True}


def _step(apply_fn, x, y, probe):
  def step(p):
    _, grads, _ = wj.importance.grad_and_fisher(apply_fn, p, x, y, probe=probe)
    return jax.tree_util.tree_map(lambda w, g: w - 1e-3 * g, p, grads)
  return jax.jit(step)


def run(name, builder, n, steps, rounds):
  apply_fn, params, x, y = builder(n, np.random.default_rng(0))
  # a fresh apply_fn per setting: each starts with nothing cached
  fns = {s: _step(lambda p, x, f=apply_fn: f(p, x), x, y, probe) for s, probe in SETTINGS.items()}
  for f in fns.values():   # compile and the first (probed) call, outside the timing
    jax.block_until_ready(f(params))
  per = {s: [] for s in SETTINGS}
  p = {s: params for s in SETTINGS}
  for _ in range(rounds):
    for s, f in fns.items():
      t0 = time.perf_counter()
      for _ in range(steps):
        p[s] = f(p[s])
      jax.block_until_ready(p[s])
      per[s].append((time.perf_counter() - t0) / steps)
  med = {s: statistics.median(v) for s, v in per.items()}
  return {"model": name, "N": n, "steps": steps, "rounds": rounds, **med}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=100)
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--only", nargs="*")
  args = ap.parse_args()
  load = os.getloadavg()
  rows = []
  for name, (builder, n) in MODELS.items():
    if args.only and not any(o in name for o in args.only):
      continue
    steps = args.steps if name.startswith("mlp") else max(args.steps // 10, 5)
    rows.append(run(name, builder, n, steps, args.rounds))
    print(rows[-1], flush=True)
  never, old, default, every = SETTINGS
  lines = [
      "# The batch-independence probe in a training step, by `probe` setting",
      "",
      f"`python benchmarks/probe_cost.py --steps {args.steps} --rounds {args.rounds}` on {os.cpu_count()} CPU "
      f"cores ({platform.machine()}, jax {jax.__version__}); load average before "
      f"{load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}, after "
      + "/".join(f"{v:.1f}" for v in os.getloadavg()) + ". A jitted SGD step with `grad_and_fisher`, "
      "new parameter values every call; seconds per step, median of the rounds (each round runs the steps "
      "of every setting in turn).",
      "",
      f"| model | N | steps a round | {never} (s) | {old} (s) | {default} (s) | {every} (s) | "
      "**default / 0.2.0** | 0.2.0 / never | every / never |",
      "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(f"| {r['model']} | {r['N']} | {r['steps']} | {r[never]:.4f} | {r[old]:.4f} | {r[default]:.4f} "
                 f"| {r[every]:.4f} | **{r[default] / r[old]:.3f}x** | {r[old] / r[never]:.2f}x "
                 f"| {r[every] / r[never]:.2f}x |")
  lines += ["", "`0.2.0 / never` is the host callback's own price (a device-to-host round trip in every step, "
            "which 0.2.0 paid too); `probe=False` removes it for a model you vouch for."]
  text = "\n".join(lines) + "\n"
  print(text)
  if not args.only and args.steps >= 50:
    with open(os.path.join(HERE, "results", "probe_cost.md"), "w") as f:
      f.write(text)


if __name__ == "__main__":
  sys.exit(main())
