"""Orbax checkpoints of every wva-jax state (WVAState, EWCState, LoRAState, SI's PathIntegralState).

In an optax chain and in ``nnx.Optimizer``, with bfloat16 leaves, and sharded
over 4 CPU devices (a subprocess: XLA_FLAGS must precede jax's import): save,
restore into fresh objects, continue; bit-identical to never stopping.
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("orbax.checkpoint")

import checkpoint_worker as worker  # noqa: E402  (tests/ is on sys.path under pytest)

pytestmark = pytest.mark.slow   # a dozen jitted steps to compile per case: about a minute each on 2 cores

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _check(results, bf16_cases):
  for name, r in results.items():
    if name.startswith("_"):
      continue
    assert r["restored_identical"], name
    assert r["identical"], name
    if name in bf16_cases:
      assert "bfloat16" in r["dtypes"], (name, r["dtypes"])


def test_optax_chain_states_resume_bit_identically(tmp_path):
  results = worker.run_optax(str(tmp_path))
  assert set(results) == {"wva_bf16", "ewc_bf16", "si_wva_ewc", "inject_hyperparams", "lora"}
  _check(results, {"wva_bf16", "ewc_bf16", "lora"})
  assert all(r["moved"] > 1e-3 for r in results.values())   # the steps did something


def test_nnx_optimizer_states_resume_bit_identically(tmp_path):
  results = worker.run_nnx(str(tmp_path))
  _check(results, set(results))


@pytest.mark.slow
def test_sharded_states_resume_bit_identically(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  proc = subprocess.run([sys.executable, str(ROOT / "tests" / "checkpoint_worker.py"), str(tmp_path)], env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))[len("RESULT "):])
  assert out["_devices"] == 4 and out["_sharded_param_leaves"] >= 2
  _check(out, {"wva_bf16", "ewc_bf16", "lora"})
  assert all(r["specs_kept"] for k, r in out.items() if not k.startswith("_"))
