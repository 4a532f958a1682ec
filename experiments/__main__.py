"""Command line: ``python -m experiments <name> [options]``.

Names: ``quickstart`` (the README's main job), the study's experiments
(``methods``, ``aa_sgd``, ``ab_adam``, ``viscosity``, ``lambda_vs_tasks``,
``importance``, ``importance_exponential``) and ``report`` (plots and
results/README.md from results/*/runs.jsonl). Seconds per full-protocol run,
against a PyTorch loop, are ``benchmarks/protocol.py``'s.
Every run is appended to ``results/<name>/runs.jsonl`` as soon as it finishes;
running the same command again skips finished runs (quickstart: with --resume).
"""
from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import time

from experiments.configs import EXPERIMENTS, QUICKSTART, Experiment
from experiments.protocol import BATCH_SIZE, STEPS_PER_TASK

NAMES = ["quickstart", *EXPERIMENTS, "report"]


def parse_args(argv):
  p = argparse.ArgumentParser(prog="python -m experiments", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("name", choices=NAMES)
  p.add_argument("--quick", action="store_true",
                 help="small version (3 tasks, 150 steps/task, 3 lambdas, 1+3 seeds) "
                      "to check the pipeline; results go to results/<name>-quick")
  p.add_argument("--lambdas", type=float, nargs="+",
                 help="lambda grid for every protected arm")
  p.add_argument("--seeds", type=int, nargs="+", help="fresh seeds the report is made on")
  p.add_argument("--select-seeds", type=int, nargs="+", help="seeds lambda is selected on")
  p.add_argument("--tasks", type=int, help="number of tasks")
  p.add_argument("--steps-per-task", type=int,
                 help=f"SGD steps per task (protocol: {STEPS_PER_TASK})")
  p.add_argument("--stream", choices=["permuted", "rotated", "split"])
  p.add_argument("--arms", nargs="+", help="only arms whose name contains one of these")
  p.add_argument("--batch-runs", type=int,
                 help="runs vmapped in one program (default: 1 at 1000+ steps per task, "
                      "where the matmuls dominate and vmapping does not pay, else 8; "
                      "benchmarks/results/protocol*.md)")
  p.add_argument("--out", help="results directory (default results/<name>[-quick])")
  p.add_argument("--no-progress", action="store_true")
  p.add_argument("--resume", action="store_true",
                 help="quickstart: keep the runs already in its runs.jsonl (by default it "
                      "trains afresh, so the main job always trains); the study's "
                      "experiments always resume")
  return p.parse_args(argv)


def configure(args) -> Experiment:
  exp = QUICKSTART if args.name == "quickstart" else EXPERIMENTS[args.name]
  if args.quick and args.name != "quickstart":
    exp = exp.quick()
  changes = {}
  if args.lambdas:
    changes["arms"] = tuple(dataclasses.replace(a, lambdas=tuple(args.lambdas))
                            if a.method.protected else a for a in exp.arms)
  if args.seeds:
    changes["report_seeds"] = tuple(args.seeds)
  if args.select_seeds:
    changes["select_seeds"] = tuple(args.select_seeds)
  if args.tasks:
    changes["tasks"] = args.tasks
    if exp.select_at:
      changes["select_at"] = tuple(k for k in exp.select_at if k <= args.tasks)
  if args.steps_per_task:
    changes["steps_per_task"] = args.steps_per_task
  if args.stream:
    changes["stream"] = args.stream
  exp = dataclasses.replace(exp, **changes)
  if args.arms:
    exp = dataclasses.replace(exp, arms=tuple(a for a in exp.arms
                                              if any(s in a.name for s in args.arms)))
  if args.name == "quickstart" and args.quick:
    exp = dataclasses.replace(exp, tasks=min(exp.tasks, 3), steps_per_task=100)
  return exp


def batch_runs(args, exp: Experiment) -> int:
  # Measured (benchmarks/protocol.py): at the protocol's 2200 steps per task one
  # run per program is the fastest per run; at 55 steps, 8 vmapped runs are.
  if args.batch_runs is None:
    return 1 if exp.steps_per_task >= 1000 else 8
  if args.batch_runs < 1:
    raise SystemExit(f"--batch-runs must be at least 1, got {args.batch_runs}")
  return args.batch_runs


def out_dir(args) -> pathlib.Path:
  if args.out:
    return pathlib.Path(args.out)
  return pathlib.Path("results") / (args.name + ("-quick" if args.quick else ""))


def quickstart(args, exp: Experiment) -> None:
  from experiments import report  # pylint: disable=import-outside-toplevel
  from experiments.study import Study  # pylint: disable=import-outside-toplevel
  out = out_dir(args)
  print(f"quickstart: {exp.tasks} {exp.stream}-MNIST tasks, {exp.steps_per_task} steps per task "
        f"(the protocol has {STEPS_PER_TASK}; reduced so it runs in minutes on a CPU), "
        f"batch {BATCH_SIZE}, "
        f"seed {exp.report_seeds[0]}; results in {out}/", flush=True)
  t0 = time.perf_counter()
  study = Study(exp, out, batch_runs=batch_runs(args, exp), progress=not args.no_progress)
  if not args.resume and study.store.path.exists():
    study.store.path.unlink()  # deterministic runs: the same numbers come back
  study.run()
  summary = report.summarize(study.store.records(), exp)
  names = [f"{s['arm']}" + ("" if s["lambda"] == 0 else f" λ={s['lambda']:g}") for s in summary]
  width = max(len(n) for n in names)
  print("\nmean test accuracy (%) over the tasks seen so far, after each task:")
  print(" " * width + " " + "".join(f"{k:>6d}" for k in range(1, exp.tasks + 1)))
  for n, s in zip(names, summary):
    print(n.ljust(width) + " " + "".join(f"{100 * c[0]:6.1f}" for c in s["curve"]))
  pngs = report.plot_experiment("quickstart", summary, out)
  print(f"\nplot: {pngs[0]}; runs: {study.store.path}; "
        f"wall time {time.perf_counter() - t0:.0f} s")


def main(argv=None) -> None:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  if args.name == "report":
    from experiments import report  # pylint: disable=import-outside-toplevel
    # The repository's README carries the study's summary between markers;
    # a report written elsewhere (--out) leaves it alone.
    readme = pathlib.Path(__file__).resolve().parents[1] / "README.md"
    readme = (readme if args.out is None and readme.exists()
              and report.README_BEGIN in readme.read_text(encoding="utf-8") else None)
    print(f"wrote {report.build_report(pathlib.Path(args.out or 'results'), readme)}"
          + (f" and the study block of {readme}" if readme else "")
          + "; docs/study.rst's copy of the summary: python docs/study_tables.py")
    return
  exp = configure(args)
  if args.name == "quickstart":
    quickstart(args, exp)
    return
  from experiments.study import Study  # pylint: disable=import-outside-toplevel
  study = Study(exp, out_dir(args), batch_runs=batch_runs(args, exp),
                progress=not args.no_progress)
  study.run()
  print(f"{exp.name}: {len(study.store.records())} runs in {study.store.path}; "
        "`python -m experiments report` updates results/README.md")


if __name__ == "__main__":
  main()
