"""Seconds per 10-task permuted-MNIST run: our vmapped program vs a PyTorch loop.

    python benchmarks/protocol.py                # writes benchmarks/results/protocol.{json,md}
    python benchmarks/protocol.py --steps 5 --tasks 2 --runs 1 2 --repeat 1 --no-save   # a check
    python benchmarks/protocol.py --steps 2200 --runs 1 8 --steady-max-runs 1 --repeat 1 \
        --out-name protocol-full    # the full protocol, about 15 minutes

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
* ``torch-loop``: a straightforward PyTorch version written the way the seed's
  code works, one run at a time: ``nn.Sequential``, ``torch.optim.SGD``, a
  Python loop over steps, WVA as ``p = p_prev + a * (p - p_prev)`` after each
  step (the seed's "deltas"), and Fisher by a Python loop over the 5,000
  validation examples (one backward pass each).
* ``torch-vmap``: the same with the Fisher from ``torch.func.vmap(grad)`` in
  chunks of 500, the fastest per-example route torch offers.
  CPU threads: torch's default.

``--repeat N`` times every implementation N times, interleaved (jax, torch,
jax, torch, ...), and reports the median: on a shared machine, load that drifts
over minutes then hits every implementation alike.
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


def jax_runner(split, num_tasks, steps, runs):
  """A function timing one batch of ``runs`` vmapped runs: (seconds, final mean acc)."""
  import jax  # pylint: disable=import-outside-toplevel
  data = runner.to_device(split, tasks.permuted(split, num_tasks))
  method = wva("sgd")

  def once():
    t0 = time.perf_counter()
    R, state = runner.run_batch(data, method, [LAMBDA] * runs, list(range(runs)),
                                num_tasks=num_tasks, steps_per_task=steps)
    jax.block_until_ready(state.params)
    return time.perf_counter() - t0, float(np.nanmean(R[:, -1, :]))
  return once


def time_torch(split, num_tasks, steps, seed=0, fisher="loop"):
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

  def fisher_sums(xv, yv):
    params = [p.detach() for p in model.parameters()]
    sums = [torch.zeros_like(p) for p in params]
    if fisher == "vmap":
      for c in range(0, len(xv), 500):
        for f, gr in zip(sums, per_example(params, xv[c:c + 500], yv[c:c + 500])):
          f += (gr ** 2).sum(0)
      return sums
    for i in range(len(xv)):  # the seed's way: one backward pass per example
      model.zero_grad()
      torch.log_softmax(model(xv[i:i + 1]), -1)[0, yv[i]].backward()
      for f, p in zip(sums, model.parameters()):
        f += p.grad ** 2
    return sums

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
      xv = xva[:, perm]
      fisher = [f / len(xv) for f in fisher_sums(xv, yva)]
      mean = sum(f.sum() for f in fisher) / sum(f.numel() for f in fisher)
      imp = [i + f / mean for i, f in zip(imp, fisher)]
    with torch.no_grad():
      row = []
      for j in range(t + 1):
        pj = torch.from_numpy(stream.pixel_map[j].astype(np.int64))
        row.append(float((model(xte[:, pj]).argmax(-1) == yte).float().mean()))
      accs.append(row)
  return time.perf_counter() - t0, float(np.mean(accs[-1])), {
      "threads": torch.get_num_threads(), "torch": torch.__version__}


def _command():
  return "python benchmarks/protocol.py " + " ".join(sys.argv[1:])


def measure(split, args):
  """Rows of seconds per batch: JAX's first call (with compile) once, then
  ``args.repeat`` interleaved rounds of every implementation; medians."""
  impls = {f"jax-vmap{n}": (n, jax_runner(split, args.tasks, args.steps, n)) for n in args.runs}
  if args.torch_fisher:
    try:
      import torch  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
      for f in args.torch_fisher:
        impls[f"torch-{f}"] = (1, lambda f=f: time_torch(split, args.tasks, args.steps, fisher=f))
    except ImportError as e:
      print(f"torch not installed ({e}); pip install torch==2.13.0", file=sys.stderr)
  rows = {k: {"impl": k, "runs": n, "command": _command(), "steady_all": []}
          for k, (n, _) in impls.items()}
  for k, (_, fn) in impls.items():
    if k.startswith("jax"):
      rows[k]["first (with compile)"], rows[k]["final_mean_acc"] = fn()
      print(json.dumps(rows[k]), flush=True)
  for _ in range(args.repeat):
    for k, (n, fn) in impls.items():
      if k.startswith("jax") and n > args.steady_max_runs:
        continue  # its first call is already minutes long; compile is a small part
      out = fn()
      rows[k]["steady_all"].append(round(out[0], 3))
      rows[k]["final_mean_acc"] = out[1]
      if len(out) > 2:
        rows[k].update(out[2])
      print(json.dumps(rows[k]), flush=True)
  for r in rows.values():
    if r["steady_all"]:
      r["steady"] = float(np.median(r["steady_all"]))
  return list(rows.values())


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--steps", type=int, default=55, help="steps per task (protocol: 2200)")
  p.add_argument("--tasks", type=int, default=10)
  p.add_argument("--runs", type=int, nargs="*", default=[1, 8, 32],
                 help="vmapped batch sizes to time (none: skip JAX)")
  p.add_argument("--steady-max-runs", type=int, default=8,
                 help="larger batches are timed once, compile included")
  p.add_argument("--torch-fisher", nargs="*", default=["loop", "vmap"], choices=["loop", "vmap"],
                 help="PyTorch variants to time (none: skip PyTorch)")
  p.add_argument("--repeat", type=int, default=3, help="interleaved rounds; medians reported")
  p.add_argument("--append", action="store_true",
                 help="merge into the saved rows (same implementation: replaced)")
  p.add_argument("--no-save", action="store_true")
  p.add_argument("--out-name", default="protocol",
                 help="results file stem in benchmarks/results (e.g. protocol-full for 2200 steps)")
  args = p.parse_args(argv)
  if args.repeat < 1:
    p.error(f"--repeat must be >= 1, got {args.repeat}")
  split = D.load_mnist()
  rows = measure(split, args)
  out = ROOT / "benchmarks" / "results"
  json_path, md_path = out / f"{args.out_name}.json", out / f"{args.out_name}.md"
  if args.append and json_path.exists():
    new = {r["impl"] for r in rows}
    old = json.loads(json_path.read_text())
    rows = [r for r in old if r["impl"] not in new] + rows
  scale = 2200 / args.steps
  base = next((r["steady"] / r["runs"] for r in rows if r["impl"] == "jax-vmap1" and "steady" in r),
              None)
  steps = ("2200 steps per task, the full protocol." if args.steps == 2200 else
           f"{args.steps} steps per task ({args.steps}/2200 of the protocol; x{scale:g} "
           f"for the training part of the full protocol; importance and evaluation are the "
           f"same per task at any step count).")
  lines = [f"# Seconds per {args.tasks}-task run (WVA-Fisher, SGD)", "",
           f"{steps} {os.cpu_count()} CPUs, "
           f"{platform.processor() or platform.machine()}, load average at the end "
           f"{os.getloadavg()[0]:.1f}.", "",
           f"Medians of {args.repeat} interleaved rounds; the ratio is to jax-vmap1's "
           "steady seconds per run, measured in the same command.", "",
           "| implementation | runs at once | s per run (steady) | s per run incl. compile | "
           "x jax-vmap1 | final mean acc |", "|---|---|---|---|---|---|"]
  for r in rows:
    first = r.get("first (with compile)")
    per_run = (r["steady"] if "steady" in r else first) / r["runs"]
    first = "" if first is None else f"{first / r['runs']:.2f}"
    steady = f"{r['steady'] / r['runs']:.2f}" if "steady" in r else ""
    ratio = "" if base is None else f"{per_run / base:.2f}"
    lines.append(f"| {r['impl']} | {r['runs']} | {steady} | {first} | {ratio} | "
                 f"{100 * r['final_mean_acc']:.1f} |")
  lines += ["", "Commands: " + "; ".join(sorted({f"`{r['command']}`" for r in rows}))]
  print("\n".join(lines))
  if not args.no_save:
    out.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(rows, indent=1) + "\n")
    md_path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
