"""The report's PNGs: accuracy curves, lambda selection, lambda against task
count, paired differences. Each function returns the paths it wrote.

matplotlib is imported when the first plot is drawn, on the file-only Agg backend.
"""
from __future__ import annotations

import pathlib

import numpy as np

from experiments import stats, study


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


def _clip_diverged(ax, values):
  """Keep the axis on working runs; diverged ones (chance level) fall below it."""
  good = [v for v in values if v > 30]
  if good and len(good) < len(values):
    ax.set_ylim(min(good) - 2, max(good) + 1)
    ax.text(0.01, 0.98, "points below the axis: runs that diverged (chance level)", va="top",
            transform=ax.transAxes, fontsize=7, color="gray")


def plot_experiment(name, summary, out_dir: pathlib.Path):
  """``curves.png`` (mean accuracy after each task, per arm) and, where arms
  selected lambda on a grid, ``lambda_selection.png``."""
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
  ks = [k for k in ks if k <= T]
  chosen = study.selected(sel, ks)
  for k in ks:
    stat = [stats.mean_ci([r["mean_acc"][k - 1] for r in shown if r["lambda"] == lam])
            for lam in lams]
    m = np.array([100 * c[0] for c in stat])
    h = np.nan_to_num(np.array([100 * c[1] for c in stat])) if fresh else np.zeros_like(m)
    values += m.tolist()
    line, = ax.plot(lams, m, marker="o", ms=3, label=f"{k} tasks")
    ax.fill_between(lams, m - h, m + h, alpha=0.15, color=line.get_color())
    best = lams.index(chosen[k])
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
