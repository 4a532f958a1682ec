"""Turns results/*/runs.jsonl into PNG plots and results/README.md.

Every number in the README comes with the command(s) whose runs produced it
(each record stores its command line). Split by job: ``analysis`` computes
(summaries, paired differences, the study's plan and cost), ``plots`` draws
the PNGs, ``markdown`` writes the text; ``build_report`` runs all three.
Importing this package loads no JAX (the report runs where training does not).
"""
from __future__ import annotations

import pathlib

from experiments.report import analysis, markdown, plots
from experiments.report.analysis import grid_noise, lambda_by_tasks, paired, summarize
from experiments.report.markdown import README_BEGIN, README_END, fmt_ci, headline, study_cost, update_readme
from experiments.report.plots import plot_experiment, plot_lambda_by_tasks, plot_paired
from experiments.results import ResultStore
from experiments.study import experiment_records

__all__ = ["build_report", "experiment_section", "summarize", "paired", "lambda_by_tasks",
           "grid_noise", "plot_experiment", "plot_lambda_by_tasks", "plot_paired", "headline",
           "study_cost", "update_readme", "fmt_ci", "README_BEGIN", "README_END",
           "analysis", "markdown", "plots", "EXPERIMENTS"]

EXPERIMENTS = analysis.EXPERIMENTS  # the configured experiments (experiments.configs)


def experiment_section(name, records, out_dir: pathlib.Path, root: pathlib.Path) -> list[str]:
  """One experiment's plots (written to ``out_dir``) and its results/README.md section."""
  exp = analysis.experiment(name)
  summary = summarize(records, exp)
  rows = paired(summary, records, exp.compare if exp is not None else ())
  pngs = plot_experiment(name, summary, out_dir)
  if exp is not None and exp.select_at:
    pngs += plot_lambda_by_tasks(records, out_dir)
  pngs += plot_paired(name, rows, out_dir)
  return markdown.experiment_section(name, exp, summary, records, rows, pngs, root)


def build_report(root="results", readme=None) -> pathlib.Path:
  """Writes ``root``/README.md and the plots; with ``readme``, also its study block."""
  root = pathlib.Path(root)
  lines = markdown.results_header() + study_cost(root)
  # A study experiment reports every run of its design, wherever it was made
  # (it may have no runs.jsonl of its own when other experiments made them all).
  # One outside the study (in_study=False) gets a section once it has runs of its
  # own: before that, the runs it shares (its baselines) would pass for its results.
  experiments = analysis.EXPERIMENTS
  names = sorted({p.parent.name for p in root.glob("*/runs.jsonl")} | set(analysis.study_experiments()))
  for name in names:
    exp = experiments.get(name)
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
