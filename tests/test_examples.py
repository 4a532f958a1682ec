"""The examples in examples/ run as written, and consolidation keeps the old task where plain training forgets it.

Each example prints its claim; the tests check it against bounds, not printed
strings: the exact digits may move with the JAX/XLA version or the machine (the
CI tests the oldest supported versions too), the claim does not. The README
states what the examples print; tests/test_readme.py checks those numbers
against the same bounds.
"""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The task-A/task-B examples print "strength S: accuracy on A a, on B b", consolidated first, then
# with strength 0. (lower, upper) bounds: consolidated keeps A and learns B; strength 0 learns B, forgets A.
ACCURACY = re.compile(r"strength (\S+): accuracy on A ([\d.]+), on B ([\d.]+)")
ACCURACY_BOUNDS = {"kept": {"A": (0.85, 1.0), "B": (0.9, 1.0)},
                   "plain": {"A": (0.0, 0.6), "B": (0.9, 1.0)}}

# examples/lm_finetune.py prints "<method>: next-token accuracy on old text o, on new text n".
# Pretrained: the old text known, the new one not; plain fine-tuning learns the new text and forgets
# the old; WVA keeps the old and learns the new; plain LoRA forgets the old too, LoRA-EWC keeps most
# of it and learns most of the new.
LM_LOSS = re.compile(r"^(\w+): next-token accuracy on old text ([\d.]+), on new text ([\d.]+)$", re.M)
LM_BOUNDS = {"pretrained": {"old": (0.95, 1.0), "new": (0.0, 0.1)},
             "plain": {"old": (0.0, 0.7), "new": (0.95, 1.0)},
             "wva": {"old": (0.95, 1.0), "new": (0.95, 1.0)},
             "lora": {"old": (0.0, 0.2), "new": (0.95, 1.0)},
             "lora_ewc": {"old": (0.6, 1.0), "new": (0.7, 1.0)}}


def within(values: dict, bounds: dict) -> bool:
  return all(lo <= values[k] <= hi for k, (lo, hi) in bounds.items())


def accuracy_rows(text: str) -> list:
  """[(strength, {"A": a, "B": b}), ...] in the order printed."""
  return [(s, {"A": float(a), "B": float(b)}) for s, a, b in ACCURACY.findall(text)]


def lm_rows(text: str) -> dict:
  return {name: {"old": float(o), "new": float(n)} for name, o, n in LM_LOSS.findall(text)}


def _run(name: str) -> str:
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
  return subprocess.run([sys.executable, os.path.join("examples", f"{name}.py")], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=600, check=True).stdout


# ~25-30 s of CPU each (two runs of the script's loop, plus a fresh JAX): with the slow tests (CI).
@pytest.mark.slow
@pytest.mark.parametrize("name", ["optax_wva", "nnx_wva", "linen_ewc"])
def test_example_runs_as_a_script_and_keeps_task_a(name):
  out = _run(name)
  rows = accuracy_rows(out)
  assert [s for s, _ in rows][1:] == ["0"], out
  (_, kept), (_, plain) = rows
  assert within(kept, ACCURACY_BOUNDS["kept"]), out     # consolidated: A kept, B learnt
  assert within(plain, ACCURACY_BOUNDS["plain"]), out   # strength 0: B learnt, A forgotten


# ~40 s of CPU: pretraining, one Fisher and four fine-tuning runs, each step compiled.
@pytest.mark.slow
def test_lm_finetune_keeps_the_old_text_with_wva_and_lora_ewc():
  out = _run("lm_finetune")
  losses = lm_rows(out)
  assert list(losses) == list(LM_BOUNDS), out
  for name, bounds in LM_BOUNDS.items():
    assert within(losses[name], bounds), (name, out)
  assert losses["lora_ewc"]["old"] > losses["lora"]["old"] + 0.4, out


@pytest.mark.slow   # a fresh LM and a compiled step: seconds (tests/test_donation.py covers the library)
def test_lm_finetune_step_donates_the_trained_tree_and_keeps_the_frozen_base():
  """train() donates params and state (one copy in memory), never the frozen base passed beside them."""
  sys.path.insert(0, os.path.join(ROOT, "examples"))
  try:
    import lm_finetune as ex
  finally:
    sys.path.pop(0)
  import jax
  import optax
  from flax import nnx
  graphdef, adapters, base = nnx.split(ex.LM(lora_rank=2, rngs=nnx.Rngs(0)), nnx.LoRAParam, nnx.Param)
  lora_fn = lambda b, a, x: nnx.merge(graphdef, a, b)(x)
  _, new = ex.texts(n=4, length=5)
  kept, frozen = jax.tree_util.tree_leaves(adapters)[0], jax.tree_util.tree_leaves(base)[0]
  frozen_value = frozen.copy()
  trained = ex.train(lora_fn, optax.adam(1e-2), adapters, new, 2, base)
  assert kept.is_deleted() and not frozen.is_deleted()
  assert (jax.tree_util.tree_leaves(base)[0] == frozen_value).all()
  assert any((a != 0).any() for a in jax.tree_util.tree_leaves(trained))   # lora_b moved from zero


TUNIX_LINE = re.compile(r"^(\w+) \(lambda [\d.e+-]+\): loss on old text ([\d.]+) -> ([\d.]+), "
                        r"on new text ([\d.]+) -> ([\d.]+)$", re.M)


# ~75 s of CPU: two tiny tunix trainings (task A, then B), each step compiled. Plain fine-tuning's forgetting
# (old text 2.258 after B) is in the example's strength table; one run keeps CI's time.
@pytest.mark.slow
def test_tunix_finetune_learns_the_new_text_and_keeps_the_old(tmp_path):
  pytest.importorskip("tunix")
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
  args = [sys.executable, os.path.join("examples", "tunix_finetune.py"), "--method", "wva", "--logdir", str(tmp_path)]
  text = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=1200, check=True).stdout
  (name, old0, old1, new0, new1), = TUNIX_LINE.findall(text)
  old0, old1, new0, new1 = (float(x) for x in (old0, old1, new0, new1))
  assert name == "wva" and "step 60's metrics: wva/attenuation_mean" in text, text
  assert old0 < 0.3 and new0 > 6   # the pretrained model knows the old text, not the new
  assert old1 < 0.6 and new1 < 3.0   # WVA learns the new text (uniform over its tokens: 3.47) and keeps the old
  # the hook's metrics all went through tunix's logger into its event file, beside the loss (steps 10 to 60: the
  # last logged by tunix's close()); tunix's TensorBoard backend stays a jax.monitoring listener after close, so
  # JAX's compile times reopen a second file later: that one holds none of ours
  files = [p.read_bytes() for p in tmp_path.rglob("events.out.tfevents*")]
  ours = [f for f in files if b"consolidation/train/wva/attenuation_mean" in f]
  assert len(ours) == 1 and b"train/loss" in ours[0], len(files)
  assert ours[0].count(b"consolidation/train/wva/attenuation_mean") == 6
