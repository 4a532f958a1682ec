"""Two JAX processes on this machine (jax.distributed, CPU collectives) give one process's numbers.

``tests/multihost_worker.py`` runs as two processes joined by
``jax.distributed.initialize`` (coordinator on localhost, gloo collectives)
and, at the same time, as one process alone: the reference. The batch is
split between the two processes (``jax.make_array_from_process_local_data``),
the parameters and every params-shaped state tree FSDP-sharded over them.
Data-parallel Fisher and MAS, and three donated WVA / EWC + Adam steps per
arm, must equal the single process within 1e-5, and every state leaf must be
sharded like its parameter. Each process has a deadline: the test cannot hang.
"""
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
WORKER = pathlib.Path(__file__).resolve().parent / "multihost_worker.py"
TIMEOUT_S = 240   # a run takes well under a minute on 2 idle cores; a lost peer must not hang CI
TOL = 1e-5


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(args, out):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}   # one CPU device per process
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
  log = open(str(out) + ".log", "w")
  proc = subprocess.Popen([sys.executable, str(WORKER), *args, "--out", str(out)], cwd=ROOT, env=env,
                          stdout=log, stderr=subprocess.STDOUT)
  return proc, log


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("multihost")
  port = _free_port()
  t0 = time.perf_counter()
  procs = [_launch(["--num-processes", "1"], tmp / "single.json")]
  procs += [_launch(["--num-processes", "2", "--process-id", str(i), "--port", str(port),
                     "--init-timeout", "60"], tmp / f"multi{i}.json") for i in range(2)]
  deadline = t0 + TIMEOUT_S
  try:
    for proc, _ in procs:
      proc.wait(timeout=max(1.0, deadline - time.perf_counter()))
  except subprocess.TimeoutExpired:
    pass
  finally:
    for proc, log in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
      log.close()
  wall = time.perf_counter() - t0
  logs = {p.name: p.read_text()[-3000:] for p in sorted(tmp.glob("*.log"))}
  codes = [proc.returncode for proc, _ in procs]
  assert codes == [0, 0, 0], f"return codes {codes} after {wall:.0f} s:\n" + "\n".join(
      f"--- {k}\n{v}" for k, v in logs.items())
  single = json.loads((tmp / "single.json").read_text())
  multi = json.loads((tmp / "multi0.json").read_text())
  print(f"\n2-process test: wall {wall:.1f} s; worker seconds single {single['seconds']}, "
        f"process 0 {multi['seconds']}")
  return single, multi, wall


def _max_abs(a, b):
  return max(float(np.max(np.abs(np.asarray(a[k]) - np.asarray(b[k])))) for k in a)


pytestmark = pytest.mark.slow


def test_two_processes_one_device_each_and_params_split(runs):
  single, multi, _ = runs
  assert (single["processes"], single["devices"]) == (1, 1)
  assert (multi["processes"], multi["devices"], multi["local_devices"]) == (2, 2, 1)
  # every parameter is split over the processes: each holds half of it
  for k, shape in multi["local_param_shapes"].items():
    full = single["local_param_shapes"][k]
    assert np.prod(shape) * 2 == np.prod(full), (k, shape, full)


@pytest.mark.parametrize("name", ["fisher", "mas"])
def test_data_parallel_importance_equals_single_process(runs, name):
  single, multi, _ = runs
  a, b = single["importance"][name], multi["importance"][name]
  scale = max(float(np.max(np.abs(v))) for v in a.values())
  assert scale > 0
  diff = _max_abs(a, b)
  print(f"{name}: max abs diff {diff:.3g}, relative to the largest value {diff / scale:.3g}")
  assert diff / scale <= TOL
  for which in (name, "normalized"):
    assert multi["importance_specs"][which] == multi["param_specs"]


@pytest.mark.parametrize("arm", ["wva_adam", "ewc_adam", "ewc_adam_wva"])
def test_sharded_donated_steps_equal_single_process(runs, arm):
  single, multi, _ = runs
  a, b = single["train"][arm], multi["train"][arm]
  diff = _max_abs(a["params"], b["params"])
  print(f"{arm}: max abs param diff {diff:.3g}; losses {b['losses']}")
  assert diff <= TOL
  np.testing.assert_allclose(b["losses"], a["losses"], rtol=TOL)
  # the steps did something the comparison can see
  assert a["losses"][0] != a["losses"][-1]
  # every params-shaped tree in the state (Adam's mu and nu, importance, anchor) is sharded
  # exactly like the params, and together they hold every non-scalar state leaf
  want_trees = {"wva_adam": 3, "ewc_adam": 4, "ewc_adam_wva": 5}[arm]
  assert len(b["state_trees"]) == want_trees
  assert all(t == multi["param_specs"] for t in b["state_trees"])
  assert b["leaves_in_params_shaped_trees"] == b["nonscalar_state_leaves"]
  assert all(t == multi["local_param_shapes"] for t in b["state_local_shapes"])
  assert b["param_specs_after"] == multi["param_specs"]
