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
  (nnx_block,) = [b for b in blocks if "nnx.split" in b]
  namespace = {}
  with contextlib.redirect_stdout(io.StringIO()):
    exec(compile(_optax_example(), str(README), "exec"), namespace)
    exec(compile(nnx_block, str(README), "exec"), namespace)
  optimizer = namespace["optimizer"]
  import jax
  import wva_jax as wj
  (wva_state,) = [s for s in jax.tree_util.tree_leaves(optimizer.opt_state, is_leaf=lambda s: isinstance(s, wj.WVAState))
                  if isinstance(s, wj.WVAState)]
  assert max(float(abs(v.get_value()).max()) for v in jax.tree_util.tree_leaves(
      wva_state.importance, is_leaf=lambda v: hasattr(v, "get_value"))) > 0
