"""Turns results/*/runs.jsonl into PNG plots and results/README.md.

Every number in the README comes with the command(s) whose runs produced it
(each record stores its command line).
"""
from __future__ import annotations

import math
import pathlib
from collections import defaultdict

import numpy as np

from experiments import stats
from experiments.configs import EXPERIMENTS, QUICKSTART
from experiments.results import ResultStore
from experiments.study import experiment_records, study_plan


def _fmt(m, h, scale=100.0):
  if math.isnan(m):
    return "n/a"
  return f"{scale * m:.2f}" if math.isnan(h) else f"{scale * m:.2f} ± {scale * h:.2f}"


def _lam(lam):
  return "n/a" if math.isnan(lam) else f"{lam:g}"


def _forgetting(R):
  R = np.asarray([[np.nan if v is None else v for v in row] for row in R], float)
  if R.shape[0] < 2:
    return math.nan
  best = np.nanmax(R[:-1, :-1], axis=0)
  return float(np.mean(best - R[-1, :-1]))


def _arms(records, exp=None):
  """Arm names in the experiment's order, then any others in first-seen order."""
  order = [a.name for a in exp.arms] if exp is not None else []
  order = [a for a in order if any(r["arm"] == a for r in records)]
  for r in records:
    if r["arm"] not in order:
      order.append(r["arm"])
  return order


def _selected(recs_select, recs_report, T, at=None):
  """The lambda the report phase used for task count ``at`` (default last)."""
  if recs_select:
    return stats.select_lambda(recs_select, at)[0]
  lams = sorted({r["lambda"] for r in recs_report})
  return lams[0] if lams else math.nan


def _experiment(name):
  base = name.removesuffix("-quick")
  return QUICKSTART if base == "quickstart" else EXPERIMENTS.get(base)


def summarize(records, exp=None):
  """Per arm: selected lambda, fresh-seed stats, selection curve."""
  out = []
  for arm in _arms(records, exp):
    rs = [r for r in records if r["arm"] == arm]
    sel = [r for r in rs if r["phase"] == "select"]
    rep_all = [r for r in rs if r["phase"] == "report"]
    T = len(rs[0]["mean_acc"])
    lam = _selected(sel, rep_all, T)
    rep = [r for r in rep_all if r["lambda"] == lam]
    curves = np.array([r["mean_acc"] for r in rep], float) if rep else np.zeros((0, T))
    final = stats.mean_ci(curves[:, -1]) if len(rep) else (math.nan, math.nan, 0)
    forget = stats.mean_ci([_forgetting(r["R"]) for r in rep])
    grid = defaultdict(list)
    for r in sel:
      grid[r["lambda"]].append(r["final_mean_acc"])
    lams = sorted({r["lambda"] for r in sel})
    edge = len(lams) > 1 and lam in (lams[0], lams[-1])
    out.append({"arm": arm, "lambda": lam, "edge": edge, "n": final[2], "final": final, "forgetting": forget,
                "curve": [stats.mean_ci(curves[:, k]) for k in range(T)] if len(rep) else [],
                "select": {k: stats.mean_ci(v) for k, v in sorted(grid.items())},
                "commands": sorted({r["command"] for r in rs}),
                "wall": [r["wall_time_s"] for r in rs], "T": T,
                "steps": rs[0]["config"]["steps_per_task"]})
  return out


def _pyplot():
  """pyplot on the file-only Agg backend (imported late: only the report plots)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def _save(fig, path: pathlib.Path) -> pathlib.Path:
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  _pyplot().close(fig)
  return path


def plot_experiment(name, summary, out_dir: pathlib.Path):
  plt = _pyplot()
  paths = []
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  for s in summary:
    if not s["curve"]:
      continue
    k = np.arange(1, s["T"] + 1)
    m = np.array([c[0] for c in s["curve"]]) * 100
    h = np.nan_to_num(np.array([c[1] for c in s["curve"]]) * 100)
    lam = "" if s["lambda"] == 0 else f" (λ={s['lambda']:g})"
    ax.plot(k, m, marker="o", ms=3, label=s["arm"] + lam)
    ax.fill_between(k, m - h, m + h, alpha=0.2)
  ax.set_xlabel("tasks learned")
  ax.set_ylabel("mean test accuracy over tasks seen (%)")
  one = all(s["n"] <= 1 for s in summary)
  ax.set_title(f"{name}: " + ("one seed" if one else "fresh seeds, mean ± 95% CI"))
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  paths.append(_save(fig, out_dir / "curves.png"))
  if any(len(s["select"]) > 1 for s in summary):
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for s in summary:
      if len(s["select"]) > 1:
        lams = np.array(list(s["select"]))
        m = np.array([v[0] for v in s["select"].values()]) * 100
        ax.plot(lams, m, marker="o", ms=3, label=s["arm"])
    ax.set_xscale("log")
    _clip_diverged(ax, [100 * v[0] for s in summary for v in s["select"].values()])
    ax.set_xlabel("λ")
    ax.set_ylabel("mean accuracy after the last task (%)")
    ax.set_title(f"{name}: lambda selection (selection seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    paths.append(_save(fig, out_dir / "lambda_selection.png"))
  return paths


def _clip_diverged(ax, values):
  """Keep the axis on working runs; diverged ones (chance level) fall below it."""
  good = [v for v in values if v > 30]
  if good and len(good) < len(values):
    ax.set_ylim(min(good) - 2, max(good) + 1)
    ax.text(0.01, 0.98, "points below the axis: runs that diverged (chance level)", va="top",
            transform=ax.transAxes, fontsize=7, color="gray")


def plot_lambda_by_tasks(records, out_dir: pathlib.Path, ks=(2, 4, 6, 8, 10)):
  """Seed exp. 5: accuracy after k tasks vs lambda, one line per k.

  Lines and 95% bands are the fresh seeds where they cover the grid (an
  experiment with ``report_grid``), else the selection seeds' means; stars mark
  the lambda selected at k on the selection seeds.
  """
  plt = _pyplot()
  sel = [r for r in records if r["phase"] == "select"]
  if not sel:
    return []
  arm = sel[0]["arm"]
  sel = [r for r in sel if r["arm"] == arm]
  lams = sorted({r["lambda"] for r in sel})
  rep = [r for r in records if r["arm"] == arm and r["phase"] == "report"]
  fresh = {r["lambda"] for r in rep} >= set(lams)
  shown = rep if fresh else sel
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  values = []
  T = len(sel[0]["mean_acc"])
  for k in [k for k in ks if k <= T]:
    stat = [stats.mean_ci([r["mean_acc"][k - 1] for r in shown if r["lambda"] == lam])
            for lam in lams]
    m = np.array([100 * c[0] for c in stat])
    h = np.nan_to_num(np.array([100 * c[1] for c in stat])) if fresh else np.zeros_like(m)
    values += m.tolist()
    line, = ax.plot(lams, m, marker="o", ms=3, label=f"{k} tasks")
    ax.fill_between(lams, m - h, m + h, alpha=0.15, color=line.get_color())
    best = lams.index(stats.select_lambda(sel, k)[0])
    ax.plot(lams[best], m[best], "*", ms=11, color=line.get_color())
  ax.set_xscale("log")
  _clip_diverged(ax, values)
  ax.set_xlabel("λ")
  ax.set_ylabel("mean accuracy after k tasks (%)")
  what = (f"fresh seeds (n={len(rep) // len(lams)}), mean ± 95% CI" if fresh
          else "selection seeds")
  ax.set_title(f"{arm}: {what}; stars: λ selected at k", fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, ncol=2)
  return [_save(fig, out_dir / "lambda_by_tasks.png")]


def lambda_by_tasks(records):
  """For seed exp. 5: per task count k, the lambda selected at k and its fresh-seed accuracy."""
  rows = []
  for arm in _arms(records):
    sel = [r for r in records if r["arm"] == arm and r["phase"] == "select"]
    if not sel:
      continue
    rep = [r for r in records if r["arm"] == arm and r["phase"] == "report"]
    for k in range(2, len(sel[0]["mean_acc"]) + 1):
      lam, means = stats.select_lambda(sel, k)
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
  for arm in _arms(records):
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


def plot_paired(name, rows, out_dir: pathlib.Path):
  """The paired differences A - B with their 95% intervals: the answer at a glance."""
  plt = _pyplot()
  rows = [r for r in rows if r[2][2] > 1]  # an interval needs two seeds
  if not rows:
    return []
  fig, ax = plt.subplots(figsize=(8.4, 1.1 + 0.4 * len(rows)))
  y = np.arange(len(rows))[::-1]
  m = np.array([100 * d[0] for _, _, d, _ in rows])
  h = np.array([100 * d[1] for _, _, d, _ in rows])
  ax.errorbar(m, y, xerr=h, fmt="o", ms=4, capsize=3)
  ax.axvline(0.0, color="0.4", lw=0.8)
  ax.set_yticks(y, [f"{a}  −  {b}  (n={d[2]})" for a, b, d, _ in rows], fontsize=7)
  ax.set_xlabel("A − B, final mean accuracy (points; fresh seeds, paired; 95% CI)", fontsize=8)
  ax.set_title(f"{name}: paired differences", fontsize=9)
  ax.grid(axis="x", alpha=0.3)
  return [_save(fig, out_dir / "paired.png")]


def experiment_section(name, records, out_dir: pathlib.Path, root: pathlib.Path):
  exp = _experiment(name)
  summary = summarize(records, exp)
  pngs = plot_experiment(name, summary, out_dir)
  if exp is not None and exp.select_at:
    pngs += plot_lambda_by_tasks(records, out_dir)
  question = exp.question if exp else ""
  lines = [f"## {name}", ""]
  if question:
    lines += [question, ""]
  s0 = summary[0]
  lines += [f"{s0['T']} tasks, {s0['steps']} steps per task, batch 100. "
            "Accuracies in %, mean ± 95% Student-t CI over fresh seeds (n).", ""]
  lines += ["| arm | λ (selected) | n | final mean acc | forgetting | mean acc after each task |",
            "|---|---|---|---|---|---|"]
  for s in summary:
    curve = " ".join(f"{100 * c[0]:.1f}" for c in s["curve"])
    lam = f"{s['lambda']:g}" + (" (grid edge)" if s["edge"] else "")
    lines.append(f"| {s['arm']} | {lam} | {s['n']} | {_fmt(*s['final'][:2])} | "
                 f"{_fmt(*s['forgetting'][:2])} | {curve} |")
  if any(len(s["select"]) > 1 for s in summary):
    lines += ["", "Lambda selection (mean accuracy after the last task on the selection seeds):",
              ""]
    for s in summary:
      if len(s["select"]) > 1:
        pts = ", ".join(f"{lam:g}: {100 * v[0]:.1f}" for lam, v in s["select"].items())
        lines.append(f"- {s['arm']}: {pts}")
  rows = paired(summary, records, exp.compare if exp is not None else ())
  pngs += plot_paired(name, rows, out_dir)
  if rows:
    lines += ["", "Paired differences, A - B, in final mean accuracy (points) over the fresh "
              "seeds both arms ran (same init and batch order), each arm at its selected λ:", "",
              "| A | B | A - B (mean ± 95% CI) | n | A ahead on |", "|---|---|---|---|---|"]
    lines += [f"| {a} | {b} | {_fmt(*d[:2])} | {d[2]} | {k} of {d[2]} |"
              for a, b, d, k in rows]
  if name.removesuffix("-quick") == "lambda_vs_tasks":
    rows = lambda_by_tasks(records)
    if rows:
      lines += ["", "| arm | tasks k | λ selected at k | acc (selection seeds) | "
                "acc (fresh seeds) | best λ on the fresh seeds | its lead over the next best λ, "
                "paired (points) |", "|---|---|---|---|---|---|---|"]
      lines += [f"| {a} | {k} | {lam:g} | {100 * m:.2f} | {_fmt(*f[:2])} | {_lam(b)} | "
                + ("-" if d[2] == 0 else f"{_fmt(*d[:2])} over λ {d[3]:g}") + " |"
                for a, k, lam, m, f, b, d in rows]
    noise = grid_noise(records)
    if noise:
      lines += ["", "Seed noise against lambda steps, final mean accuracy on the fresh seeds "
                "(points): selecting lambda on 2 seeds is sound where neighbouring lambdas "
                "differ by more than the seeds do.", "",
                "| arm | λ | n | mean | SD over seeds | range over seeds | gap to the next λ |",
                "|---|---|---|---|---|---|---|"]
      lines += [f"| {a} | {lam:g} | {n} | {100 * m:.2f} | {100 * sd:.2f} | {100 * rg:.2f} | "
                f"{'-' if math.isnan(g) else f'{100 * g:.2f}'} |"
                for a, lam, n, m, sd, rg, g in noise]
  wall = [w for s in summary for w in s["wall"]]
  lines += ["", f"{len(wall)} runs, {sum(wall) / 60:.1f} minutes of wall time in total "
            f"({np.mean(wall):.1f} s per run; runs of a batch share its wall time).", "",
            "Produced by:", ""]
  cmds = sorted({c for s in summary for c in s["commands"]})
  lines += [f"    {c}" for c in cmds]
  lines += [""] + [f"![{p.stem}]({p.relative_to(root).as_posix()})" for p in pngs] + [""]
  return lines


def study_cost(root: pathlib.Path):
  """The plan, runs done (each counted once) and their wall time."""
  walls, batch = {}, {}
  for path in sorted(root.glob("*/runs.jsonl")):
    if path.parent.name in EXPERIMENTS:
      for r in ResultStore(path).records():
        walls[r["run_id"]], batch[r["run_id"]] = r["wall_time_s"], r.get("batch_runs")
  in_plan = _runs_in_plan(root)
  plan = study_plan(EXPERIMENTS.values())
  total = sum(new for _, new in plan.values())
  if not walls:
    return []
  # Per batch size: how many runs share one program changes the cost per run.
  by_batch = defaultdict(list)
  for rid, w in walls.items():
    by_batch[batch[rid]].append(w)
  medians = {b: float(np.median(v)) for b, v in by_batch.items() if len(v) >= 5}
  per_run = min(medians.values()) if medians else float(np.median(list(walls.values())))
  basis = ("the fastest of the medians per batch size: " + "; ".join(
      f"{m:.0f} s with {b if b else '?'} run{'s' if b != 1 else ''} per program "
      f"({len(by_batch[b])} runs)" for b, m in sorted(medians.items(), key=lambda x: x[1]))
      if medians else "the median of the runs done")
  lines = ["## The study's plan and cost", "",
           "From `experiments/configs.py`: 10 tasks x 2200 steps; a lambda grid x 2 selection "
           "seeds, then 10 fresh seeds at the selected lambda. Runs are keyed by (config, seed, "
           "lambda) and shared by the experiments that have the arm in common. Hours at "
           f"{per_run:.0f} s per run ({basis}) on this 2-core CPU:", "",
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
            "the 2 cores. One run on a quiet machine, against the seed's way of running it "
            "(a PyTorch step loop, Fisher by a loop over examples): "
            "[benchmarks/results/protocol-full.md](../benchmarks/results/protocol-full.md).", ""]
  return lines


def _planned(records, exp):
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
    lams = {stats.select_lambda(sel, k)[0] for k in (exp.select_at or [None])}
    keep += sel + [r for r in rs if r["phase"] == "report" and r["lambda"] in lams]
  return keep


def _runs_in_plan(root) -> set:
  return {r["run_id"] for e in EXPERIMENTS.values()
          for r in _planned(experiment_records(e, root), e)}


README_BEGIN = ("<!-- study results: written by `python -m experiments report` from "
                "results/*/runs.jsonl; edits here are overwritten -->")
README_END = "<!-- end of study results -->"


def headline(root) -> list[str]:
  """The main README's summary of the study: each arm once, then the paired answers.

  An arm's numbers are the same in every experiment that has it (runs are
  pooled by config, seed and lambda), so it is listed once, in the order the
  experiments first name it; a comparison made by several experiments, once.
  """
  root = pathlib.Path(root)
  plan = study_plan(EXPERIMENTS.values())
  arms, answers, status, by_tasks, in_plan = {}, {}, [], [], set()
  for name, exp in EXPERIMENTS.items():
    records = experiment_records(exp, root)
    mine = _planned(records, exp)
    in_plan |= {r["run_id"] for r in mine}
    status.append((name, len(mine), plan[name][0]))
    if not records:
      continue
    summary = summarize(records, exp)
    for s in summary:
      if s["n"]:
        arms.setdefault(s["arm"], s)
    for a, b, d, k in paired(summary, records, exp.compare):
      answers.setdefault((a, b), (name, d, k))
    if exp.select_at:
      by_tasks += [(name, rows) for rows in [lambda_by_tasks(records)] if rows]
  names = [a.name for exp in EXPERIMENTS.values() for a in exp.arms]
  pending = [a for a in dict.fromkeys(names) if a not in arms]
  done = [f"{n} ({d} runs)" for n, d, u in status if d >= u]
  going = [f"{n} ({d} of {u} runs)" for n, d, u in status if d < u]
  total = sum(new for _, new in plan.values())
  in_plan = len(in_plan)
  lines = [f"Runs done: {in_plan} of the {total} planned. Complete: "
           f"{', '.join(done) or 'none'}." + (f" In progress: {', '.join(going)}." if going else ""),
           "", "Final mean accuracy over the 10 tasks and forgetting (the mean drop from each "
           "task's best accuracy), in %, mean over the fresh seeds ± 95% Student-t interval; "
           "λ selected on the 2 selection seeds:", "",
           "| method | λ | n | mean accuracy after 10 tasks | forgetting |", "|---|---|---|---|---|"]
  for s in arms.values():
    lam = "-" if s["lambda"] == 0 else f"{s['lambda']:g}" + (" (grid edge)" if s["edge"] else "")
    lines.append(f"| {s['arm']} | {lam} | {s['n']} | {_fmt(*s['final'][:2])} | "
                 f"{_fmt(*s['forgetting'][:2])} |")
  if pending:
    lines += ["", "Not yet run on the fresh seeds: " + ", ".join(pending) + "."]
  if answers:
    lines += ["", "Paired over the fresh seeds both arms ran (same init and batch order), "
              "final mean accuracy A − B in points:", "",
              "| experiment | A | B | A − B | A ahead on |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {a} | {b} | {_fmt(*d[:2])} | {k} of {d[2]} |"
              for (a, b), (name, d, k) in answers.items()]
  for name, rows in by_tasks:
    arm = rows[0][0]
    rows = [r for r in rows if r[0] == arm]
    lines += ["", f"{name}: the best λ for {arm} after k = {rows[0][1]}..{rows[-1][1]} tasks, "
              f"selected on the selection seeds: {', '.join(f'{r[2]:g}' for r in rows)}"
              + ("; best on the fresh seeds: " + ", ".join(_lam(r[5]) for r in rows)
                 if any(not math.isnan(r[5]) for r in rows) else "") + "."]
  return lines


def update_readme(path, lines) -> bool:
  """Replaces the text between README_BEGIN and README_END in ``path``; False if absent."""
  path = pathlib.Path(path)
  text = path.read_text(encoding="utf-8") if path.exists() else ""
  start, end = text.find(README_BEGIN), text.find(README_END)
  if start < 0 or end < start:
    return False
  new = text[:start] + "\n".join([README_BEGIN, "", *lines, ""]) + "\n" + text[end:]
  path.write_text(new, encoding="utf-8")
  return True


def build_report(root="results", readme=None) -> pathlib.Path:
  """Writes ``root``/README.md and the plots; with ``readme``, also its study block."""
  root = pathlib.Path(root)
  lines = ["# Results", "",
           "Generated by `python -m experiments report` from `results/*/runs.jsonl`; every "
           "table lists the commands that produced its runs. `-quick` directories hold the "
           "pipeline checks (`--quick`: 3 tasks, 150 steps per task, 3 lambdas, 1 selection "
           "seed, 3 fresh seeds), not study results.", ""]
  lines += study_cost(root)
  # A study experiment reports every run of its design, wherever it was made
  # (it may have no runs.jsonl of its own when other experiments made them all).
  names = sorted({p.parent.name for p in root.glob("*/runs.jsonl")} | set(EXPERIMENTS))
  for name in names:
    exp = EXPERIMENTS.get(name)
    records = (experiment_records(exp, root) if exp is not None
               else ResultStore(root / name / "runs.jsonl").records())
    if records:
      (root / name).mkdir(exist_ok=True)
      lines += experiment_section(name, records, root / name, root)
  out = root / "README.md"
  out.write_text("\n".join(lines) + "\n", encoding="utf-8")
  if readme is not None and not update_readme(readme, headline(root)):
    raise ValueError(f"{readme} has no study block: add the lines {README_BEGIN!r} and "
                     f"{README_END!r} where the study's results should go")
  return out
