"""The report's numbers: per-arm summaries, paired differences, lambda against
task count, seed noise, and the study's plan and cost.

No plots and no text here. The selected lambda is the study's
(``experiments.study.selected``), forgetting is ``wva_jax.metrics.forgetting``.
The experiments reported are ``EXPERIMENTS`` (``experiments.configs``'s): the
whole report reads them from here.
"""
from __future__ import annotations

import math
import pathlib
from collections import defaultdict

import numpy as np

from experiments import stats, study
from experiments.configs import EXPERIMENTS, QUICKSTART
from experiments.results import ResultStore


def experiment(name):
  """The configured experiment of a results directory (``-quick`` included), or None."""
  base = name.removesuffix("-quick")
  return QUICKSTART if base == "quickstart" else EXPERIMENTS.get(base)


def arms(records, exp=None):
  """Arm names in the experiment's order, then any others in first-seen order."""
  order = [a.name for a in exp.arms] if exp is not None else []
  order = [a for a in order if any(r["arm"] == a for r in records)]
  for r in records:
    if r["arm"] not in order:
      order.append(r["arm"])
  return order


def forgetting(R) -> float:
  """``wva_jax.metrics.forgetting`` of a stored accuracy matrix (None: not evaluated);
  NaN for a single task."""
  if len(R) < 2:
    return math.nan
  # Imported here: wva_jax's package import loads JAX, which `import
  # experiments.report` must not (the metric itself is NumPy).
  from wva_jax import metrics  # pylint: disable=import-outside-toplevel
  return float(metrics.forgetting(np.asarray(R, dtype=np.float64)))


def selected_lambda(select_records, report_records, tasks: int) -> float:
  """The lambda the fresh seeds ran at: the study's selection after the last task,
  or, for an arm without selection runs, its (lowest) fresh-seed lambda."""
  if select_records:
    return study.selected(select_records, [tasks])[tasks]
  lams = sorted({r["lambda"] for r in report_records})
  return lams[0] if lams else math.nan


def summarize(records, exp=None):
  """Per arm: selected lambda, fresh-seed stats, selection curve."""
  out = []
  for arm in arms(records, exp):
    rs = [r for r in records if r["arm"] == arm]
    sel = [r for r in rs if r["phase"] == "select"]
    rep_all = [r for r in rs if r["phase"] == "report"]
    T = len(rs[0]["mean_acc"])
    lam = selected_lambda(sel, rep_all, T)
    rep = [r for r in rep_all if r["lambda"] == lam]
    curves = np.array([r["mean_acc"] for r in rep], float) if rep else np.zeros((0, T))
    final = stats.mean_ci(curves[:, -1]) if len(rep) else (math.nan, math.nan, 0)
    forget = stats.mean_ci([forgetting(r["R"]) for r in rep])
    grid = defaultdict(list)
    for r in sel:
      grid[r["lambda"]].append(r["final_mean_acc"])
    lams = sorted({r["lambda"] for r in sel})
    edge = len(lams) > 1 and lam in (lams[0], lams[-1])
    out.append({"arm": arm, "lambda": lam, "edge": edge, "n": final[2], "final": final,
                "forgetting": forget,
                "curve": [stats.mean_ci(curves[:, k]) for k in range(T)] if len(rep) else [],
                "select": {k: stats.mean_ci(v) for k, v in sorted(grid.items())},
                "commands": sorted({r["command"] for r in rs}),
                "wall": [r["wall_time_s"] for r in rs], "T": T,
                "steps": rs[0]["config"]["steps_per_task"],
                "batch": rs[0]["config"]["batch_size"]})
  return out


def lambda_by_tasks(records):
  """For seed exp. 5: per task count k, the lambda selected at k and its fresh-seed accuracy."""
  rows = []
  for arm in arms(records):
    sel = [r for r in records if r["arm"] == arm and r["phase"] == "select"]
    if not sel:
      continue
    rep = [r for r in records if r["arm"] == arm and r["phase"] == "report"]
    ks = range(2, len(sel[0]["mean_acc"]) + 1)
    for k, lam in study.selected(sel, ks).items():
      means = stats.select_lambda(sel, k)[1]
      fresh = stats.mean_ci([r["mean_acc"][k - 1] for r in rep if r["lambda"] == lam])
      # With fresh seeds at every lambda: which lambda they would have picked,
      # and its lead over the runner-up, paired by seed.
      best_fresh, lead = math.nan, (math.nan, math.nan, 0)
      if {r["lambda"] for r in rep} >= set(means):
        best_fresh, fresh_means = stats.select_lambda(rep, k)
        runner_up = max((l for l in fresh_means if l != best_fresh),
                        key=lambda l: (fresh_means[l], -l))
        acc = defaultdict(dict)
        for r in rep:
          acc[r["lambda"]][r["seed"]] = r["mean_acc"][k - 1]
        seeds = sorted(set(acc[best_fresh]) & set(acc[runner_up]))
        lead = stats.mean_ci([acc[best_fresh][s] - acc[runner_up][s] for s in seeds]) + (runner_up,)
      rows.append((arm, k, lam, means[lam], fresh, best_fresh, lead))
  return rows


def grid_noise(records, k=None):
  """Seed noise against lambda steps, from fresh seeds run at every lambda of a grid.

  Per (arm, lambda): the mean accuracy after ``k`` tasks (default last), its
  standard deviation and range over seeds, and the gap to the next lambda's
  mean. Selecting lambda on a few seeds is sound where the gaps exceed the
  spread. Rows (arm, lambda, n, mean, sd, range, gap to the next or nan).
  """
  rows = []
  for arm in arms(records):
    rep = [r for r in records if r["arm"] == arm and r["phase"] == "report"]
    lams = sorted({r["lambda"] for r in rep})
    if len(lams) < 2:
      continue
    acc = {lam: np.array([r["mean_acc"][(k or len(r["mean_acc"])) - 1] for r in rep
                          if r["lambda"] == lam], float) for lam in lams}
    for i, lam in enumerate(lams):
      a = acc[lam]
      gap = abs(acc[lams[i + 1]].mean() - a.mean()) if i + 1 < len(lams) else math.nan
      rows.append((arm, lam, len(a), float(a.mean()),
                   float(a.std(ddof=1)) if len(a) > 1 else math.nan, float(np.ptp(a)), float(gap)))
  return rows


def paired(summary, records, pairs):
  """Per (A, B): final mean accuracy A - B over the fresh seeds both have.

  Fresh seeds share init and batch order across arms, so the difference is
  paired: its interval is the t interval of the per-seed differences.
  Returns rows (A, B, (mean, half-width, n), seeds where A is ahead).
  """
  lam = {s["arm"]: s["lambda"] for s in summary}
  final = defaultdict(dict)
  for r in records:
    if r["phase"] == "report" and r["arm"] in lam and r["lambda"] == lam[r["arm"]]:
      final[r["arm"]][r["seed"]] = r["final_mean_acc"]
  rows = []
  for a, b in pairs:
    seeds = sorted(set(final[a]) & set(final[b]))
    if not seeds:
      continue
    diffs = [final[a][s] - final[b][s] for s in seeds]
    rows.append((a, b, stats.mean_ci(diffs), sum(d > 0 for d in diffs)))
  return rows


def planned(records, exp):
  """The records ``exp`` itself runs: its selection grid, and the fresh seeds at
  the lambdas it selects (at every lambda with ``report_grid``). Pooled records
  can hold more: another experiment's fresh seeds at other lambdas."""
  by_arm = defaultdict(list)
  for r in records:
    by_arm[r["arm"]].append(r)
  keep = []
  for rs in by_arm.values():
    sel = [r for r in rs if r["phase"] == "select"]
    if not sel or exp.report_grid:
      keep += rs
      continue
    lams = set(study.selected(sel, study.select_at(exp)).values())
    keep += sel + [r for r in rs if r["phase"] == "report" and r["lambda"] in lams]
  return keep


def study_experiments() -> dict:
  """The experiments of the study's plan, cost and headline (``in_study``)."""
  return {n: e for n, e in EXPERIMENTS.items() if getattr(e, "in_study", True)}


def runs_in_plan(root) -> set:
  """Run ids of every study experiment's planned records under ``root``."""
  return {r["run_id"] for e in study_experiments().values()
          for r in planned(study.experiment_records(e, root), e)}


def cost(root: pathlib.Path):
  """The study's plan and its cost so far, or None before any run.

  Returns a dict: ``plan`` ({experiment: (runs it uses, runs not in an earlier
  one)}), ``total`` planned, ``per_run`` (seconds: the fastest of the medians
  per batch size with at least 5 runs, else the median of all), ``medians``
  ({batch size: median seconds}), ``by_batch`` ({batch size: wall times}),
  ``walls`` ({run id: seconds}, each run once) and ``in_plan`` (run ids).
  """
  walls, batch = {}, {}
  for path in sorted(root.glob("*/runs.jsonl")):
    if path.parent.name in study_experiments():
      for r in ResultStore(path).records():
        walls[r["run_id"]], batch[r["run_id"]] = r["wall_time_s"], r.get("batch_runs")
  in_plan = runs_in_plan(root)
  plan = study.study_plan(study_experiments().values())
  total = sum(new for _, new in plan.values())
  if not walls:
    return None
  # Per batch size: how many runs share one program changes the cost per run.
  by_batch = defaultdict(list)
  for rid, w in walls.items():
    by_batch[batch[rid]].append(w)
  medians = {b: float(np.median(v)) for b, v in by_batch.items() if len(v) >= 5}
  per_run = min(medians.values()) if medians else float(np.median(list(walls.values())))
  return {"plan": plan, "total": total, "per_run": per_run, "medians": medians,
          "by_batch": by_batch, "walls": walls, "in_plan": in_plan}


def study_summary(root):
  """What the main README states about the study, gathered over its experiments.

  An arm's numbers are the same in every experiment that has it (runs are
  pooled by config, seed and lambda), so it is kept once, from the first
  experiment that names it; a comparison made by several experiments, once.
  Returns a dict: ``arms`` ({arm: summary}), ``answers`` ({(A, B): (experiment,
  paired difference, seeds A is ahead on)}), ``status`` ([(experiment, planned
  runs done, planned runs)]), ``by_tasks`` ([(experiment, lambda_by_tasks
  rows)]), ``pending`` (arms with no fresh seeds yet), ``in_plan`` (runs done
  of the plan) and ``total`` (runs planned).
  """
  root = pathlib.Path(root)
  experiments = study_experiments()
  plan = study.study_plan(experiments.values())
  found, answers, status, by_tasks, in_plan = {}, {}, [], [], set()
  for name, exp in experiments.items():
    records = study.experiment_records(exp, root)
    mine = planned(records, exp)
    in_plan |= {r["run_id"] for r in mine}
    status.append((name, len(mine), plan[name][0]))
    if not records:
      continue
    summary = summarize(records, exp)
    for s in summary:
      if s["n"]:
        found.setdefault(s["arm"], s)
    for a, b, d, k in paired(summary, records, exp.compare):
      answers.setdefault((a, b), (name, d, k))
    if exp.select_at:
      by_tasks += [(name, rows) for rows in [lambda_by_tasks(records)] if rows]
  names = [a.name for exp in experiments.values() for a in exp.arms]
  pending = [a for a in dict.fromkeys(names) if a not in found]
  return {"arms": found, "answers": answers, "status": status, "by_tasks": by_tasks,
          "pending": pending, "in_plan": len(in_plan),
          "total": sum(new for _, new in plan.values())}
