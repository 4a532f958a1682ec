"""Runs an experiment: lambda selection, then fresh seeds; resumable.

Jobs are (arm, phase, lambda, seed). Jobs of one arm share a compiled program
and go in vmapped batches of up to ``batch_runs``; each finished run is
appended to ``<out>/runs.jsonl`` at once, and jobs whose run id is already
there, or in a sibling experiment's ``runs.jsonl``, are skipped: re-running a
command after a crash resumes it, and experiments share the arms they have in
common. Lambda selection is defined here (``selected``, ``fresh_lambdas``);
the report (``experiments/report/``) reads it rather than re-deriving it.
"""
from __future__ import annotations

import dataclasses
import pathlib
import sys
import time
from collections.abc import Sequence

from experiments import protocol, stats
from experiments import results as res
from experiments.configs import Arm, Experiment
from experiments.methods import Method


@dataclasses.dataclass(frozen=True)
class Job:
  arm: Arm
  phase: str
  lam: float
  seed: int


def run_config(exp: Experiment, method: Method) -> dict:
  """What a run's result depends on (hashed into its run id)."""
  return {"method": method.to_dict(), "stream": exp.stream, "tasks": exp.tasks,
          "steps_per_task": exp.steps_per_task, "batch_size": protocol.BATCH_SIZE,
          "data_seed": exp.data_seed, "model": protocol.MODEL, "split": protocol.SPLIT}


def experiment_records(exp: Experiment, root) -> list[dict]:
  """The runs of ``exp`` found anywhere under ``root`` (every ``*/runs.jsonl``).

  A run is identified by (config, seed, lambda) alone, so a run made for one
  experiment serves every other experiment with the same arm: the study pools
  them and never trains the same run twice. Only runs that fit ``exp``'s design
  are returned: selection runs on its selection seeds and lambda grid, report
  runs on its fresh seeds. Their ``phase`` and ``arm`` are set from ``exp``.
  """
  root = pathlib.Path(root)
  by_cid = {res.config_id(run_config(exp, a.method)): a for a in exp.arms}
  select, report = set(exp.select_seeds), set(exp.report_seeds)
  out, seen = [], set()
  for path in sorted(root.glob("*/runs.jsonl")):
    for r in res.ResultStore(path).records():
      arm = by_cid.get(r["run_id"].split("-", 1)[0])
      if arm is None or r["run_id"] in seen:
        continue
      grid = len(arm.lambdas) > 1
      if grid and r["seed"] in select and r["lambda"] in arm.lambdas:
        phase = "select"
      elif r["seed"] in report:
        phase = "report"
      else:
        continue
      seen.add(r["run_id"])
      out.append({**r, "arm": arm.name, "phase": phase})
  return out


def select_at(exp: Experiment) -> list[int]:
  """The task counts lambda is selected for: ``exp.select_at``, else the last task."""
  return list(exp.select_at) if exp.select_at else [exp.tasks]


def selected(select_records, at: Sequence[int]) -> dict[int, float]:
  """{k: the lambda selected after k tasks} for each ``k`` in ``at``.

  The study's selection rule: the lambda with the best mean accuracy after
  ``k`` tasks over the selection runs (``select_records``, one arm's), ties
  to the smaller lambda.
  """
  return {k: stats.select_lambda(select_records, k)[0] for k in at}


def fresh_lambdas(exp: Experiment, arm: Arm, select_records) -> list[float]:
  """The lambdas ``arm``'s fresh seeds run at: every lambda of its grid with
  ``report_grid`` (or its only lambda), else those selected at ``select_at(exp)``."""
  if exp.report_grid or len(arm.lambdas) == 1:
    return list(arm.lambdas)
  return sorted(set(selected(select_records, select_at(exp)).values()))


def study_plan(experiments) -> dict[str, tuple[int, int]]:
  """{name: (runs the experiment uses, runs not already used by an earlier one)}.

  Counts the selection grid and, per arm, one lambda per ``select_at`` task
  count at most (fewer when several counts select the same lambda), or every
  lambda with ``report_grid``.
  """
  planned: set = set()
  out = {}
  for exp in experiments:
    mine = set()
    for a in exp.arms:
      cid = res.config_id(run_config(exp, a.method))
      grid = len(a.lambdas) > 1
      if grid:
        mine |= {(cid, s, lam) for lam in a.lambdas for s in exp.select_seeds}
      picks = 1 if not grid else (len(a.lambdas) if exp.report_grid
                                  else min(len(exp.select_at or [exp.tasks]), len(a.lambdas)))
      mine |= {(cid, s, f"pick{i}") for i in range(picks) for s in exp.report_seeds}
    out[exp.name] = (len(mine), len(mine - planned))
    planned |= mine
  return out


class Study:
  """Holds the data on device and runs jobs of one experiment."""

  def __init__(self, exp: Experiment, out_dir, *, batch_runs: int = 8, progress: bool = True,
               split=None):
    self.exp, self.out = exp, pathlib.Path(out_dir)
    self.store = res.ResultStore(self.out / "runs.jsonl")
    self.batch_runs, self.progress = batch_runs, progress
    self._split, self._data, self._prov = split, None, None

  @property
  def data(self):
    if self._data is None:
      # Imported here so that `report` and `--help` never start JAX.
      from experiments import data as D  # pylint: disable=import-outside-toplevel
      from experiments import runner, tasks
      split = self._split if self._split is not None else D.load_mnist()
      stream = tasks.make_stream(self.exp.stream, split, self.exp.tasks, self.exp.data_seed)
      self._data = runner.to_device(split, stream)
      self._prov = res.provenance()
      self._prov["data_source"] = split.source
      import jax  # pylint: disable=import-outside-toplevel
      self._prov.setdefault("machine", {})["device"] = jax.devices()[0].device_kind
    return self._data

  def arm_records(self, arm: Arm, phase: str | None = None) -> list[dict]:
    return [r for r in experiment_records(self.exp, self.out.parent)
            if r["arm"] == arm.name and (phase is None or r["phase"] == phase)]

  def pending(self, jobs: Sequence[Job]) -> list[Job]:
    done = set().union(*(res.ResultStore(p).done()
                         for p in self.out.parent.glob("*/runs.jsonl")))
    seen, out = set(), []
    for j in jobs:
      rid = res.run_id(run_config(self.exp, j.arm.method), j.seed, j.lam)
      if rid not in done and rid not in seen:
        seen.add(rid)
        out.append(j)
    return out

  def run_jobs(self, jobs: Sequence[Job], desc: str) -> int:
    """Runs the jobs not yet in the store; returns how many ran."""
    from experiments import runner  # pylint: disable=import-outside-toplevel
    todo = self.pending(jobs)
    if not todo:
      return 0
    T = self.exp.tasks
    bar = _bar(len(todo), T, desc, self.progress)
    by_arm: dict[str, list[Job]] = {}
    for j in todo:
      by_arm.setdefault(j.arm.name, []).append(j)
    t_start, finished = time.perf_counter(), 0
    for group in by_arm.values():
      for i in range(0, len(group), self.batch_runs):
        batch = group[i:i + self.batch_runs]
        arm = batch[0].arm
        step = lambda t, n=len(batch): bar.update(n)  # noqa: B008 (binds this batch's size)
        t0 = time.perf_counter()
        R, _ = runner.run_batch(self.data, arm.method, [j.lam for j in batch],
                                [j.seed for j in batch], num_tasks=T,
                                steps_per_task=self.exp.steps_per_task, on_task=step)
        wall = time.perf_counter() - t0
        for j, Rj in zip(batch, R):
          self.store.append(res.make_record(
              experiment=self.exp.name, arm=arm.name, phase=j.phase,
              config=run_config(self.exp, arm.method), seed=j.seed, lam=j.lam, R=Rj,
              wall_time_s=wall / len(batch), batch_runs=len(batch), prov=self._prov))
        finished += len(batch)
        if not self.progress:  # logs of background runs: one line per batch
          spent = time.perf_counter() - t_start
          left = spent / finished * (len(todo) - finished)
          print(f"{desc}: {finished}/{len(todo)} runs ({arm.name}), {spent / 60:.0f} min, "
                f"~{left / 60:.0f} min left", flush=True)
    bar.close()
    return len(todo)

  def run(self) -> None:
    # Arm by arm (selection, then its fresh seeds), so a run cut short (a timed
    # device call) leaves whole arms behind; the set of runs is the same.
    exp = self.exp
    for a in exp.arms:
      select = [Job(a, "select", lam, s) for lam in (a.lambdas if len(a.lambdas) > 1 else ())
                for s in exp.select_seeds]
      self.run_jobs(select, f"{exp.name}: select lambda")
      report = [Job(a, "report", lam, s)
                for lam in fresh_lambdas(exp, a, self.arm_records(a, "select"))
                for s in exp.report_seeds]
      self.run_jobs(report, f"{exp.name}: fresh seeds")


def _bar(runs, tasks, desc, enabled):
  """Counts finished tasks of runs (integers), displayed as runs; ``enabled=False``: a silent bar."""
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel  (the experiments extra)
  fmt = "{l_bar}{bar}| {n:.1f}/{total:.0f} runs [{elapsed}<{remaining}]"
  return tqdm(total=runs * tasks, unit_scale=1.0 / tasks, desc=desc, bar_format=fmt,
              file=sys.stderr, smoothing=0.1, disable=not enabled)
