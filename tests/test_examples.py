"""The examples in examples/ run as written, and consolidation keeps task A where plain training forgets it."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ~25-30 s of CPU each (two runs of the script's loop, plus a fresh JAX): with the slow tests (CI).
@pytest.mark.slow
@pytest.mark.parametrize("name", ["nnx_wva", "linen_ewc"])
def test_example_runs_as_a_script_and_keeps_task_a(name):
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
  out = subprocess.run([sys.executable, os.path.join("examples", f"{name}.py")], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=600, check=True).stdout
  rows = re.findall(r"^strength (\S+): accuracy on A ([\d.]+), on B ([\d.]+)$", out, re.M)
  assert [r[0] for r in rows][1:] == ["0"], out
  (_, a_kept, b_kept), (_, a_plain, b_plain) = [(s, float(a), float(b)) for s, a, b in rows]
  assert a_kept >= 0.85 and b_kept >= 0.9, out   # consolidated: A kept, B learnt
  assert a_plain <= 0.6 and b_plain >= 0.9, out  # strength 0: B learnt, A forgotten
