"""The README's Optax example runs, and WVA keeps task A where plain Adam forgets it.

Accuracies are checked against bounds, not printed strings: the exact
digits may move with the JAX/XLA version or the machine (the CI tests the
oldest supported versions too), the claim does not.
"""
import contextlib
import io
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _optax_example():
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
  (block,) = [b for b in blocks if "wj.wva_adam" in b and "def train" in b]
  return block


PRINTED = re.compile(r"accuracy on A (\d\.\d+), on B (\d\.\d+)")
# (lower, upper) bounds on the accuracies of A and B: WVA keeps A, plain Adam forgets it.
BOUNDS = {"1000.0": {"A": (0.9, 1.0), "B": (0.95, 1.0)},
          "0.0": {"A": (0.0, 0.6), "B": (0.95, 1.0)}}


def _within(accuracies, bounds):
  return all(lo <= accuracies[k] <= hi for k, (lo, hi) in bounds.items())


@pytest.mark.slow
@pytest.mark.parametrize("strength", ["1000.0", "0.0"])
def test_readme_example_keeps_task_a_with_wva_and_forgets_it_without(strength):
  code = _optax_example().replace("strength=1000.0", f"strength={strength}")
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(compile(code, str(README), "exec"), {})
  (printed,) = PRINTED.findall(out.getvalue())
  got = {"A": float(printed[0]), "B": float(printed[1])}
  assert _within(got, BOUNDS[strength]), (strength, got)


def test_readme_states_numbers_within_the_tested_bounds():
  # "It prints `accuracy on A ..`; with `strength=0.0` ... prints `accuracy on A ..`"
  stated = PRINTED.findall(README.read_text())[-2:]
  assert len(stated) == 2
  for (a, b), strength in zip(stated, ["1000.0", "0.0"]):
    assert _within({"A": float(a), "B": float(b)}, BOUNDS[strength]), (strength, a, b)


@pytest.mark.slow
def test_readme_nnx_snippet_runs_after_the_example():
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
  (nnx_block,) = [b for b in blocks if "nnx.split" in b and "nnx.Optimizer" in b]
  namespace = {}
  with contextlib.redirect_stdout(io.StringIO()):
    exec(compile(_optax_example(), str(README), "exec"), namespace)
    exec(compile(nnx_block, str(README), "exec"), namespace)
  optimizer = namespace["optimizer"]
  import jax

  import wva_jax as wj
  is_wva = lambda s: isinstance(s, wj.WVAState)
  (wva_state,) = [s for s in jax.tree_util.tree_leaves(optimizer.opt_state, is_leaf=is_wva) if is_wva(s)]
  assert max(float(abs(v.get_value()).max()) for v in jax.tree_util.tree_leaves(
      wva_state.importance, is_leaf=lambda v: hasattr(v, "get_value"))) > 0


def _section(title: str) -> str:
  text = README.read_text()
  return text[text.index(f"## {title}"):].split("\n## ", 1)[0]


@pytest.mark.slow
def test_readme_language_model_section():
  """The LM section's block: donated WVA and LoRA-EWC steps that learn, consume their inputs, keep the base."""
  section = _section("Fine-tune a language model without forgetting")
  (block,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
  ns: dict = {}
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(compile(block, str(README), "exec"), ns)
  full, lora = map(float, re.findall(r"loss on new text: full (\d+\.\d+), LoRA (\d+\.\d+)", out.getvalue())[0])
  import math
  start = math.log(256)                       # uniform over the 256 tokens: where both start
  assert full < start - 0.5 and lora < start - 0.3, (full, lora)
  # The section states what it prints; the claim must be within the same bounds.
  stated = re.findall(r"It prints `loss on new text: full (\d+\.\d+), LoRA (\d+\.\d+)`", section)
  assert stated and float(stated[0][0]) < start - 0.5 and float(stated[0][1]) < start - 0.3
  # LoRA trained the adapters only: the frozen base is bit-for-bit the fresh model's.
  jax, nnx = ns["jax"], ns["nnx"]
  fresh_base = nnx.split(ns["LM"](lora_rank=4, rngs=nnx.Rngs(0)), nnx.LoRAParam, nnx.Param)[2]
  for a, b in zip(jax.tree_util.tree_leaves(ns["base"]), jax.tree_util.tree_leaves(fresh_base)):
    assert (a == b).all()
  # Donation: the step consumed the params it was given (one copy in memory).
  params = jax.tree_util.tree_map(lambda x: x.copy(), ns["params"])
  state = ns["tx"].init(params)
  kept = jax.tree_util.tree_leaves(params)[0]
  ns["step"](params, state, ns["new"])
  assert kept.is_deleted()
