"""The 1B benchmark's pipeline (``benchmarks/elephants_1b.py --quick``) and its generated report.

The real run takes an hour on 2 cores; ``--quick`` runs the same code (Fisher
to a file, then donated Adam / WVA / EWC steps, each in its own subprocess)
on a tiny bf16 GPT, with its rows in ``$TMPDIR``.
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from benchmarks import elephants_1b as bench  # the checkout's root is on sys.path (pytest's pythonpath)

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _results_snapshot():
  out = {}
  for suffix in (".jsonl", ".md"):
    p = pathlib.Path(bench.OUT + suffix)
    out[suffix] = p.read_bytes() if p.exists() else None
  return out


@pytest.mark.slow
def test_quick_pipeline(tmp_path):
  before = _results_snapshot()
  env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "elephants_1b.py"), "--quick"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = {r["arm"]: r for r in map(json.loads, (tmp_path / "elephants_1b-quick.jsonl").read_text().splitlines())}
  assert set(rows) == set(bench.ARMS)
  f = rows["fisher"]
  assert f["importance_finite"] and abs(f["importance_mean"] - 1.0) < 1e-2   # normalised, then bf16
  for arm, trees in (("adam", 3), ("wva", 4), ("ewc", 5)):   # params + 2 moments (+ importance, + anchor), all bf16
    r = rows[arm]
    assert r["finite"] and len(r["step_s"]) == bench.QUICK["tiny"]["steps"]
    assert r["params_bytes"] == 2 * r["params"]
    assert r["state_bytes"] - r["other_state_bytes"] == trees * r["params_bytes"]
    assert r["importance_bytes"] == (0 if arm == "adam" else r["params_bytes"])
    assert r["anchor_bytes"] == (r["params_bytes"] if arm == "ewc" else 0)
    # the live arrays after the donated steps are exactly the state and the last batch: nothing copied, nothing shared
    assert r["live_after_steps_bytes"] == r["state_bytes"] + r["batch_bytes"]
    # donation: the compiled step writes params and state over its arguments
    assert r["xla_alias_bytes"] == r["state_bytes"]
  # the first step starts at the anchor, so EWC's pull is zero there: the same loss after it as Adam
  assert rows["ewc"]["losses"][1] == pytest.approx(rows["adam"]["losses"][1], rel=1e-6)
  assert "What a 7B model needs" in out.stdout
  assert _results_snapshot() == before          # --quick writes nothing to benchmarks/results


def _row(arm, n, comps, **extra):
  names = ("params", "adam_moments", "importance", "anchor", "other_state")
  row = {"size": "s", "arm": arm, "params": n, "batch": 2, "seq_len": 8, "s_per_step": 1.0, "compile_s": 1.0,
         "load_avg_1m": [0.0, 0.0], "peak_rss_bytes": 10 * n, "xla_temp_bytes": 4 * n, "xla_peak_bytes": 12 * n,
         "live_after_steps_bytes": sum(comps) * n, **{f"{k}_bytes": v * n for k, v in zip(names, comps)}, **extra}
  row["state_bytes"] = sum(comps) * n
  for k in ("xla_argument_bytes", "xla_output_bytes", "xla_alias_bytes"):
    row.setdefault(k, 0)
  return row


def test_projection_arithmetic():
  n = 1000
  rows = [_row("adam", n, (2, 4, 0, 0, 0)), _row("wva", n, (2, 4, 2, 0, 0)), _row("ewc", n, (2, 4, 2, 2, 0))]
  md = bench.projection(rows, "s", target=7e9)
  lines = {}
  for l in md.splitlines():           # the first table's rows (the second has the same arm names)
    if l.startswith("| ") and "B/param" not in l:
      lines.setdefault(l.split("|")[1].strip(), [c.strip() for c in l.split("|")[2:-1]])
  # state GB at 7B: 6 / 8 / 10 bytes per parameter; overhead over Adam 0 / 14 / 28 GB (0 / 33 / 67%)
  assert lines["adam"][5:10] == ["6.000", "3.00x", "42.0", "0.0", "0%"]
  assert lines["wva"][5:10] == ["8.000", "4.00x", "56.0", "14.0", "33%"]
  assert lines["ewc"][5:10] == ["10.000", "5.00x", "70.0", "28.0", "67%"]
  assert "plain Adam 70.0 GB, WVA 84.0 GB, EWC 98.0 GB" in md     # float32 moments: +4 B/param
  assert bench.projection(rows[:2], "s").startswith("(needs")
