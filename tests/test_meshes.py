"""Estimators on Explicit and Auto meshes of 4 simulated devices (issue 27 item 3).

JAX 0.10's ``jax.make_mesh`` gives Explicit axes, on which every estimator
crashed with a ``ShardingTypeError`` (slicing an example out of a sharded
batch) while ``jax.grad`` worked. The worker (``tests/mesh_worker.py``) runs
in its own process because the device count is fixed at JAX's start.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_estimators_on_explicit_and_auto_meshes():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  proc = subprocess.run([sys.executable, str(ROOT / "tests" / "mesh_worker.py")], env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  ok = [l for l in proc.stdout.splitlines() if l.startswith("ok ")]
  assert len(ok) == 2 * 2 * 2 * 5 + 1, proc.stdout
  assert any(l.startswith("ok Explicit fsdp=True") for l in ok)
