"""Seconds per 10-task permuted-MNIST run: our vmapped program vs a PyTorch loop.

    python benchmarks/protocol.py                # writes benchmarks/results/protocol.{json,md}
    python benchmarks/protocol.py --steps 50     # faster, prints only with --no-save

Both sides do the seed's protocol with WVA-Fisher on SGD (lr 0.2, batch 100,
leaky ReLU MLP 784-300-150-10): train each task, per-example empirical Fisher on
the task's 5,000 validation images, imp += Fisher / mean, attenuate the
increments by 1/(1+lambda*imp), evaluate every seen task on the 10,000 test
images. Steps per task are reduced (default 55 of the protocol's 2200, ratio
stated in the output), so the fixed per-task costs (importance, evaluation)
weigh more than in the full protocol; experiments/ measures the full protocol
itself (``python -m experiments timing``).

* ``jax-vmapN``: ``experiments.runner.run_batch`` with N runs vmapped in one
  program; timed twice, the first call includes compilation.
* ``torch-loop``: a straightforward PyTorch version, one run at a time:
  ``nn.Sequential``, ``torch.optim.SGD``, per-example Fisher with
  ``torch.func.vmap(grad)`` in chunks, WVA as ``p = p_prev + a * (p - p_prev)``
  after each step (the seed's "deltas"). CPU threads: torch's default.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments import data as D  # noqa: E402
from experiments import runner, tasks  # noqa: E402
from experiments.configs import wva  # noqa: E402

LAMBDA = 3.0


def time_jax(split, num_tasks, steps, runs, steady_max_runs=8):
  """Wall seconds of one batch of ``runs``; above ``steady_max_runs`` only the
  first call (with compile, ~15 s here) is timed, to keep the benchmark short."""
  import jax  # pylint: disable=import-outside-toplevel
  data = runner.to_device(split, tasks.permuted(split, num_tasks))
  method = wva("sgd")
  out = {}
  labels = ("first (with compile)", "steady")
  for label in labels[:1] if runs > steady_max_runs else labels:
    t0 = time.perf_counter()
    R, state = runner.run_batch(data, method, [LAMBDA] * runs, list(range(runs)),
                                num_tasks=num_tasks, steps_per_task=steps)
    jax.block_until_ready(state.params)
    out[label] = time.perf_counter() - t0
  out["final_mean_acc"] = float(np.nanmean(R[:, -1, :]))
  return out


def time_torch(split, num_tasks, steps, seed=0):
  import torch  # pylint: disable=import-outside-toplevel
  from torch import nn  # pylint: disable=import-outside-toplevel
  from torch.func import functional_call, grad, vmap  # pylint: disable=import-outside-toplevel
  torch.manual_seed(seed)
  stream = tasks.permuted(split, num_tasks)
  xtr, ytr = torch.from_numpy(split.x_train), torch.from_numpy(split.y_train).long()
  xva, yva = torch.from_numpy(split.x_valid), torch.from_numpy(split.y_valid).long()
  xte, yte = torch.from_numpy(split.x_test), torch.from_numpy(split.y_test).long()
  model = nn.Sequential(nn.Linear(784, 300), nn.LeakyReLU(0.2), nn.Linear(300, 150),
                        nn.LeakyReLU(0.2), nn.Linear(150, 10))
  for m in model:
    if isinstance(m, nn.Linear):
      nn.init.trunc_normal_(m.weight, std=2 / m.in_features ** 0.5,
                            a=-4 / m.in_features ** 0.5, b=4 / m.in_features ** 0.5)
      nn.init.zeros_(m.bias)
  opt = torch.optim.SGD(model.parameters(), lr=0.2)
  loss_fn = nn.CrossEntropyLoss()
  imp = [torch.zeros_like(p) for p in model.parameters()]
  names = [n for n, _ in model.named_parameters()]

  def example_logp(params, x, y):
    logits = functional_call(model, dict(zip(names, params)), (x[None],))
    return torch.gather(torch.log_softmax(logits, -1)[0], 0, y[None])[0]

  per_example = vmap(grad(example_logp), in_dims=(None, 0, 0))
  t0 = time.perf_counter()
  accs = []
  for t in range(num_tasks):
    perm = torch.from_numpy(stream.pixel_map[t].astype(np.int64))
    att = [1.0 / (1.0 + LAMBDA * i) for i in imp]
    g = torch.Generator().manual_seed(seed * 1000 + t)
    order = torch.cat([torch.randperm(len(xtr), generator=g)
                       for _ in range(-(-steps * 100 // len(xtr)))])
    for s in range(steps):
      idx = order[s * 100:(s + 1) * 100]
      x, y = xtr[idx][:, perm], ytr[idx]
      prev = [p.detach().clone() for p in model.parameters()]
      opt.zero_grad()
      loss_fn(model(x), y).backward()
      opt.step()
      with torch.no_grad():
        for p, q, a in zip(model.parameters(), prev, att):
          p.copy_(q + a * (p - q))
    if t < num_tasks - 1:
      params = [p.detach() for p in model.parameters()]
      fisher = [torch.zeros_like(p) for p in params]
      xv = xva[:, perm]
      for c in range(0, len(xv), 500):
        for f, gr in zip(fisher, per_example(params, xv[c:c + 500], yva[c:c + 500])):
          f += (gr ** 2).sum(0)
      fisher = [f / len(xv) for f in fisher]
      mean = sum(f.sum() for f in fisher) / sum(f.numel() for f in fisher)
      imp = [i + f / mean for i, f in zip(imp, fisher)]
    with torch.no_grad():
      row = []
      for j in range(t + 1):
        pj = torch.from_numpy(stream.pixel_map[j].astype(np.int64))
        row.append(float((model(xte[:, pj]).argmax(-1) == yte).float().mean()))
      accs.append(row)
  return {"steady": time.perf_counter() - t0, "final_mean_acc": float(np.mean(accs[-1])),
          "threads": torch.get_num_threads(), "torch": torch.__version__}


def _command():
  return "python benchmarks/protocol.py " + " ".join(sys.argv[1:])


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--steps", type=int, default=55, help="steps per task (protocol: 2200)")
  p.add_argument("--tasks", type=int, default=10)
  p.add_argument("--runs", type=int, nargs="*", default=[1, 8, 32],
                 help="vmapped batch sizes to time (none: skip JAX)")
  p.add_argument("--append", action="store_true",
                 help="merge into the saved rows (same implementation: replaced)")
  p.add_argument("--no-torch", action="store_true")
  p.add_argument("--no-save", action="store_true")
  args = p.parse_args(argv)
  split = D.load_mnist()
  rows = []
  for n in args.runs:
    r = time_jax(split, args.tasks, args.steps, n)
    rows.append({"impl": f"jax-vmap{n}", "runs": n, "command": _command(), **r})
    print(json.dumps(rows[-1]), flush=True)
  if not args.no_torch:
    try:
      r = time_torch(split, args.tasks, args.steps)
      rows.append({"impl": "torch-loop", "runs": 1, "command": _command(), **r})
      print(json.dumps(rows[-1]), flush=True)
    except ImportError as e:
      print(f"torch not installed ({e}); pip install torch==2.13.0", file=sys.stderr)
  out = ROOT / "benchmarks" / "results"
  if args.append and (out / "protocol.json").exists():
    new = {r["impl"] for r in rows}
    old = json.loads((out / "protocol.json").read_text())
    rows = [r for r in old if r["impl"] not in new] + rows
  scale = 2200 / args.steps
  lines = [f"# Seconds per {args.tasks}-task run (WVA-Fisher, SGD)", "",
           f"{args.steps} steps per task ({args.steps}/2200 of the protocol; x{scale:g} "
           f"for the training part of the full protocol; importance and evaluation are the "
           f"same per task at any step count). {os.cpu_count()} CPUs, "
           f"{platform.processor() or platform.machine()}, load average at the end "
           f"{os.getloadavg()[0]:.1f}.", "",
           "| implementation | runs at once | s per run (steady) | s per run incl. compile | "
           "final mean acc |", "|---|---|---|---|---|"]
  for r in rows:
    first = r.get("first (with compile)")
    first = "" if first is None else f"{first / r['runs']:.2f}"
    steady = f"{r['steady'] / r['runs']:.2f}" if "steady" in r else ""
    lines.append(f"| {r['impl']} | {r['runs']} | {steady} | {first} | "
                 f"{100 * r['final_mean_acc']:.1f} |")
  lines += ["", "Commands: " + "; ".join(sorted({f"`{r['command']}`" for r in rows}))]
  print("\n".join(lines))
  if not args.no_save:
    out.mkdir(parents=True, exist_ok=True)
    (out / "protocol.json").write_text(json.dumps(rows, indent=1) + "\n")
    (out / "protocol.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
