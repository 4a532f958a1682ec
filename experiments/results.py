"""Crash-safe results: one JSON line per finished run, appended at once.

Each line carries everything needed to trust and reuse it: the run id (a hash
of the configuration + seed + lambda, the key that resume skips on), the
config, the accuracy matrix, wall time, git commit and library versions, and
the command that produced it.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import pathlib
import platform
import subprocess
import sys
import time

RESULTS_DIR = pathlib.Path("results")


def config_id(config: dict) -> str:
  blob = json.dumps(config, sort_keys=True, separators=(",", ":"))
  return hashlib.sha1(blob.encode()).hexdigest()[:12]


def run_id(config: dict, seed: int, lam: float) -> str:
  return f"{config_id(config)}-s{int(seed)}-l{float(lam)!r}"


def git_commit(cwd=None) -> str:
  try:
    out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                         timeout=5, cwd=cwd, check=False)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=5, cwd=cwd, check=False)
    sha = out.stdout.strip() or "unknown"
    return sha + ("-dirty" if dirty.stdout.strip() else "")
  except (OSError, subprocess.SubprocessError):
    return "unknown"


def provenance() -> dict:
  """Git commit, library versions and machine: attached to every record."""
  import jax
  import numpy as np  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel,multiple-imports

  import wva_jax  # pylint: disable=import-outside-toplevel
  return {"git_commit": git_commit(pathlib.Path(__file__).parent),
          "versions": {"python": platform.python_version(), "jax": jax.__version__,
                       "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__")
                       else jax.__version__,
                       "optax": optax.__version__, "numpy": np.__version__,
                       "wva_jax": getattr(wva_jax, "__version__", "?")},
          "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                      "backend": jax.default_backend()}}


def light_provenance(*packages: str) -> dict:
  """Git commit, installed versions of ``packages`` and the machine, importing nothing.

  Versions come from the installed distributions' metadata, so no JAX backend
  starts: for a parent process whose children own the device (the benchmarks'
  per-configuration subprocesses record their own backend) and for the seed
  author's TensorFlow venv, which has no JAX. Packages not installed are left out.
  """
  from importlib import metadata  # pylint: disable=import-outside-toplevel
  versions = {"python": platform.python_version()}
  for name in packages:
    try:
      versions[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      pass
  return {"git_commit": git_commit(pathlib.Path(__file__).parent), "versions": versions,
          "machine": {"platform": platform.platform(), "cpus": os.cpu_count()}}


def with_provenance(record: dict, prov: dict) -> dict:
  """``record`` with ``prov``'s keys added; the record's own values win, its ``machine`` is merged in."""
  out = {**prov, **record}
  if isinstance(prov.get("machine"), dict) and isinstance(record.get("machine"), dict):
    out["machine"] = {**prov["machine"], **record["machine"]}
  return out


def _clean(x):
  """JSON-safe: NaN -> None (strict JSON has no NaN)."""
  if isinstance(x, float) and math.isnan(x):
    return None
  if isinstance(x, list):
    return [_clean(v) for v in x]
  return x


class ResultStore:
  """Append-only ``runs.jsonl`` of one experiment."""

  def __init__(self, path):
    self.path = pathlib.Path(path)

  def records(self) -> list[dict]:
    if not self.path.exists():
      return []
    out = []
    with open(self.path, encoding="utf-8") as f:
      for line in f:
        line = line.strip()
        if not line:
          continue
        try:
          out.append(json.loads(line))
        except json.JSONDecodeError:
          # A crash mid-write leaves at most one torn last line: skip it.
          continue
    return out

  def done(self) -> set[str]:
    return {r["run_id"] for r in self.records()}

  def append(self, record: dict) -> None:
    self.path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, sort_keys=True)
    with open(self.path, "a", encoding="utf-8") as f:
      # A torn line from an earlier crash must not glue onto this one.
      if f.tell() > 0:
        with open(self.path, "rb") as r:
          r.seek(-1, os.SEEK_END)
          if r.read(1) != b"\n":
            f.write("\n")
      f.write(line + "\n")
      f.flush()
      os.fsync(f.fileno())


def make_record(*, experiment: str, arm: str, phase: str, config: dict, seed: int,
                lam: float, R, wall_time_s: float, batch_runs: int, prov: dict) -> dict:
  import numpy as np  # pylint: disable=import-outside-toplevel
  R = np.asarray(R, dtype=float)
  T = R.shape[0]
  seen = np.tril(np.ones((T, T), bool))
  curve = [float(R[i][seen[i]].mean()) for i in range(T)]
  return {"run_id": run_id(config, seed, lam), "experiment": experiment, "arm": arm,
          "phase": phase, "config": config, "seed": int(seed), "lambda": float(lam),
          "R": _clean(np.round(R, 6).tolist()), "mean_acc": curve,
          "final_mean_acc": curve[-1], "wall_time_s": round(wall_time_s, 3),
          "batch_runs": batch_runs, "command": " ".join(["python", "-m", "experiments"]
                                                        + sys.argv[1:]),
          "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **prov}
