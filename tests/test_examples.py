"""The examples in examples/ run, and consolidation keeps task A while plain training forgets it."""
import os
import runpy
import subprocess
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


@pytest.mark.parametrize("name", ["nnx_wva", "linen_ewc"])
def test_example_keeps_task_a(name):
  main = runpy.run_path(os.path.join(EXAMPLES, f"{name}.py"))["main"]
  acc = main(steps=150)   # half the script's steps: the same outcome, in half the time
  assert acc["A"] >= 0.85 and acc["B"] >= 0.9, acc


@pytest.mark.slow
@pytest.mark.parametrize("name", ["nnx_wva", "linen_ewc"])
def test_example_runs_as_a_script_and_plain_training_forgets(name):
  root = os.path.dirname(EXAMPLES)
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
  out = subprocess.run([sys.executable, os.path.join(EXAMPLES, f"{name}.py")], env=env, cwd=root,
                       capture_output=True, text=True, timeout=600, check=True).stdout
  lines = [l for l in out.splitlines() if l.startswith("strength")]
  assert len(lines) == 2, out
  acc_a = [float(l.split("accuracy on A ")[1].split(",")[0]) for l in lines]
  assert acc_a[0] >= 0.85 and acc_a[1] <= 0.6, out   # consolidated vs strength 0
