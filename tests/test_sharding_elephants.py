"""FSDP-style sharding on 8 simulated CPU devices (a subprocess: XLA_FLAGS must precede jax's import).

Importance computed data-parallel and a few WVA/EWC steps with sharded
state must equal one device's within 1e-5, and every importance, anchor and
momentum leaf must carry its parameter's PartitionSpec.
"""
import pytest

from experiments.elephants.sharding import run_in_subprocess

pytestmark = pytest.mark.slow  # one subprocess with 8 CPU devices, about a minute


@pytest.fixture(scope="module")
def result():
  return run_in_subprocess(devices=8)


def test_eight_devices_and_params_sharded(result):
  assert result["devices"] == 8
  assert result["sharded_param_leaves"] == result["param_leaves"] > 10
  assert all("fsdp" in s for s in result["param_specs"])


@pytest.mark.parametrize("name", ["fisher", "sig"])
def test_data_parallel_importance_equals_single_device(result, name):
  r = result["importance"][name]
  assert r["max_rel_diff"] <= 1e-5, r
  assert r["max_value"] > 0
  assert all(r["specs_match"]) and len(r["specs_match"]) == result["param_leaves"]


@pytest.mark.parametrize("arm", ["wva-float32", "ewc-bfloat16"])
def test_sharded_steps_equal_single_device_and_state_is_sharded_like_params(result, arm):
  r = result["train"][arm]
  assert r["max_abs_param_diff"] <= 1e-5, r["max_abs_param_diff"]
  assert all(r["param_specs_kept"])
  fields = {"importance"} if arm.startswith("wva") else {"importance", "anchor"}
  for when in ("state_after_set", "state_after_steps"):
    leaves = r[when]
    assert {f for f, _, _ in leaves} == fields
    assert len(leaves) == len(fields) * result["param_leaves"]
    for field, spec, param_spec in leaves:
      assert spec == param_spec, (when, field, spec, param_spec)
  assert all(r["momentum_specs_match"]) and len(r["momentum_specs_match"]) == result["param_leaves"]
  assert r["importance_dtype"] == arm.split("-")[1]
