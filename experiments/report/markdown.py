"""The report's text: results/README.md's sections and the main README's study block.

Renders what ``analysis`` computes; the protocol's figures (tasks, steps,
seeds, machine) come from ``experiments.protocol`` and ``experiments.configs``.
"""
from __future__ import annotations

import math
import pathlib

import numpy as np

from experiments.configs import REPORT_SEEDS, SELECT_SEEDS
from experiments.protocol import CPU_CORES, MACHINE, STEPS_PER_TASK, TASKS
from experiments.report import analysis

README_BEGIN = ("<!-- study results: written by `python -m experiments report` from "
                "results/*/runs.jsonl; edits here are overwritten -->")
README_END = "<!-- end of study results -->"


def fmt_ci(m, h, scale=100.0):
  """``mean ± half-width`` in percent (``n/a`` for no value, the mean alone for one seed)."""
  if math.isnan(m):
    return "n/a"
  return f"{scale * m:.2f}" if math.isnan(h) else f"{scale * m:.2f} ± {scale * h:.2f}"


def _lam(lam):
  return "n/a" if math.isnan(lam) else f"{lam:g}"


def experiment_section(name, exp, summary, records, rows, pngs, root: pathlib.Path):
  """One experiment's section of results/README.md.

  ``summary`` and ``rows`` are ``analysis.summarize`` and ``analysis.paired``
  of ``records``; ``pngs`` the plots, linked relative to ``root``.
  """
  question = exp.question if exp else ""
  lines = [f"## {name}", ""]
  if question:
    lines += [question, ""]
  s0 = summary[0]
  lines += [f"{s0['T']} tasks, {s0['steps']} steps per task, batch {s0['batch']}. "
            "Accuracies in %, mean ± 95% Student-t CI over fresh seeds (n).", ""]
  lines += ["| arm | λ (selected) | n | final mean acc | forgetting | mean acc after each task |",
            "|---|---|---|---|---|---|"]
  for s in summary:
    curve = " ".join(f"{100 * c[0]:.1f}" for c in s["curve"])
    lam = f"{s['lambda']:g}" + (" (grid edge)" if s["edge"] else "")
    lines.append(f"| {s['arm']} | {lam} | {s['n']} | {fmt_ci(*s['final'][:2])} | "
                 f"{fmt_ci(*s['forgetting'][:2])} | {curve} |")
  if any(len(s["select"]) > 1 for s in summary):
    lines += ["", "Lambda selection (mean accuracy after the last task on the selection seeds):",
              ""]
    for s in summary:
      if len(s["select"]) > 1:
        pts = ", ".join(f"{lam:g}: {100 * v[0]:.1f}" for lam, v in s["select"].items())
        lines.append(f"- {s['arm']}: {pts}")
  if rows:
    lines += ["", "Paired differences, A - B, in final mean accuracy (points) over the fresh "
              "seeds both arms ran (same init and batch order), each arm at its selected λ:", "",
              "| A | B | A - B (mean ± 95% CI) | n | A ahead on |", "|---|---|---|---|---|"]
    lines += [f"| {a} | {b} | {fmt_ci(*d[:2])} | {d[2]} | {k} of {d[2]} |"
              for a, b, d, k in rows]
  if name.removesuffix("-quick") == "lambda_vs_tasks":
    lines += _lambda_vs_tasks(records)
  wall = [w for s in summary for w in s["wall"]]
  lines += ["", f"{len(wall)} runs, {sum(wall) / 60:.1f} minutes of wall time in total "
            f"({np.mean(wall):.1f} s per run; runs of a batch share its wall time).", "",
            "Produced by:", ""]
  cmds = sorted({c for s in summary for c in s["commands"]})
  lines += [f"    {c}" for c in cmds]
  lines += [""] + [f"![{p.stem}]({p.relative_to(root).as_posix()})" for p in pngs] + [""]
  return lines


def _lambda_vs_tasks(records):
  """Seed exp. 5's tables: lambda selected per task count, and seed noise per lambda."""
  lines = []
  rows = analysis.lambda_by_tasks(records)
  if rows:
    lines += ["", "| arm | tasks k | λ selected at k | acc (selection seeds) | "
              "acc (fresh seeds) | best λ on the fresh seeds | its lead over the next best λ, "
              "paired (points) |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {a} | {k} | {lam:g} | {100 * m:.2f} | {fmt_ci(*f[:2])} | {_lam(b)} | "
              + ("-" if d[2] == 0 else f"{fmt_ci(*d[:2])} over λ {d[3]:g}") + " |"
              for a, k, lam, m, f, b, d in rows]
  noise = analysis.grid_noise(records)
  if noise:
    lines += ["", "Seed noise against lambda steps, final mean accuracy on the fresh seeds "
              f"(points): selecting lambda on {len(SELECT_SEEDS)} seeds is sound where "
              "neighbouring lambdas differ by more than the seeds do.", "",
              "| arm | λ | n | mean | SD over seeds | range over seeds | gap to the next λ |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {a} | {lam:g} | {n} | {100 * m:.2f} | {100 * sd:.2f} | {100 * rg:.2f} | "
              f"{'-' if math.isnan(g) else f'{100 * g:.2f}'} |"
              for a, lam, n, m, sd, rg, g in noise]
  return lines


def study_cost(root: pathlib.Path):
  """The section on the study's plan, runs done and their wall time (none before any run)."""
  c = analysis.cost(root)
  if c is None:
    return []
  plan, total, per_run, medians, by_batch = (c[k] for k in ("plan", "total", "per_run",
                                                             "medians", "by_batch"))
  walls, in_plan = c["walls"], c["in_plan"]
  basis = ("the fastest of the medians per batch size: " + "; ".join(
      f"{m:.0f} s with {b if b else '?'} run{'s' if b != 1 else ''} per program "
      f"({len(by_batch[b])} runs)" for b, m in sorted(medians.items(), key=lambda x: x[1]))
      if medians else "the median of the runs done")
  lines = ["## The study's plan and cost", "",
           f"From `experiments/configs.py`: {TASKS} tasks x {STEPS_PER_TASK} steps; a lambda "
           f"grid x {len(SELECT_SEEDS)} selection seeds, then {len(REPORT_SEEDS)} fresh seeds "
           "at the selected lambda. Runs are keyed by (config, seed, lambda) and shared by the "
           "experiments that have the arm in common. Hours at "
           f"{per_run:.0f} s per run ({basis}) on this {MACHINE}:", "",
           "| experiment | runs it uses | runs not in an earlier experiment | hours |",
           "|---|---|---|---|"]
  lines += [f"| {n} | {used} | {new} | {new * per_run / 3600:.1f} |"
            for n, (used, new) in plan.items()]
  lines += [f"| total | | {total} | {total * per_run / 3600:.1f} |", "",
            f"Runs done: {len(in_plan)} of the {total} planned, "
            f"{sum(walls.values()) / 3600:.1f} hours of wall time in all (a batch's wall time "
            "split evenly over its runs)."
            + (f" {len(walls) - len(in_plan)} more runs outside the plan are in the runs.jsonl "
               "files." if len(walls) > len(in_plan) else ""), "",
            "These are the study's own runs, timed as they ran, some beside other work on "
            f"the {CPU_CORES} cores. One run on a quiet machine, against the seed's way of "
            "running it (a PyTorch step loop, Fisher by a loop over examples): "
            "[benchmarks/results/protocol-full.md](../benchmarks/results/protocol-full.md).", ""]
  return lines


def headline(root) -> list[str]:
  """The main README's summary of the study: each arm once, then the paired answers."""
  h = analysis.study_summary(root)
  done = [f"{n} ({d} runs)" for n, d, u in h["status"] if d >= u]
  going = [f"{n} ({d} of {u} runs)" for n, d, u in h["status"] if d < u]
  lines = [f"Runs done: {h['in_plan']} of the {h['total']} planned. Complete: "
           f"{', '.join(done) or 'none'}."
           + (f" In progress: {', '.join(going)}." if going else ""),
           "", f"Final mean accuracy over the {TASKS} tasks and forgetting (the mean drop from "
           "each task's best accuracy), in %, mean over the fresh seeds ± 95% Student-t "
           f"interval; λ selected on the {len(SELECT_SEEDS)} selection seeds:", "",
           f"| method | λ | n | mean accuracy after {TASKS} tasks | forgetting |",
           "|---|---|---|---|---|"]
  for s in h["arms"].values():
    lam = "-" if s["lambda"] == 0 else f"{s['lambda']:g}" + (" (grid edge)" if s["edge"] else "")
    lines.append(f"| {s['arm']} | {lam} | {s['n']} | {fmt_ci(*s['final'][:2])} | "
                 f"{fmt_ci(*s['forgetting'][:2])} |")
  if h["pending"]:
    lines += ["", "Not yet run on the fresh seeds: " + ", ".join(h["pending"]) + "."]
  if h["answers"]:
    lines += ["", "Paired over the fresh seeds both arms ran (same init and batch order), "
              "final mean accuracy A − B in points:", "",
              "| experiment | A | B | A − B | A ahead on |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {a} | {b} | {fmt_ci(*d[:2])} | {k} of {d[2]} |"
              for (a, b), (name, d, k) in h["answers"].items()]
  for name, rows in h["by_tasks"]:
    arm = rows[0][0]
    rows = [r for r in rows if r[0] == arm]
    lines += ["", f"{name}: the best λ for {arm} after k = {rows[0][1]}..{rows[-1][1]} tasks, "
              f"selected on the selection seeds: {', '.join(f'{r[2]:g}' for r in rows)}"
              + ("; best on the fresh seeds: " + ", ".join(_lam(r[5]) for r in rows)
                 if any(not math.isnan(r[5]) for r in rows) else "") + "."]
  return lines


def update_readme(path, lines, begin=README_BEGIN, end=README_END) -> bool:
  """Replaces the text between the ``begin`` and ``end`` lines in ``path``; False if absent."""
  path = pathlib.Path(path)
  text = path.read_text(encoding="utf-8") if path.exists() else ""
  start, stop = text.find(begin), text.find(end)
  if start < 0 or stop < start:
    return False
  new = text[:start] + "\n".join([begin, "", *lines, ""]) + "\n" + text[stop:]
  path.write_text(new, encoding="utf-8")
  return True


def results_header() -> list[str]:
  """The opening lines of results/README.md."""
  return ["# Results", "",
          "Generated by `python -m experiments report` from `results/*/runs.jsonl`; every "
          "table lists the commands that produced its runs. `-quick` directories hold the "
          "pipeline checks (`--quick`: 3 tasks, 150 steps per task, 3 lambdas, 1 selection "
          "seed, 3 fresh seeds), not study results.", ""]
