"""The README's Optax example runs and prints what the README says it prints."""
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


@pytest.mark.parametrize("strength,expected", [("1000.0", "accuracy on A 0.99, on B 1.00"),
                                               ("0.0", "accuracy on A 0.48, on B 1.00")])
def test_readme_example_prints_what_the_readme_says(strength, expected):
  code = _optax_example().replace("strength=1000.0", f"strength={strength}")
  assert f"`{expected}`" in README.read_text()
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(compile(code, str(README), "exec"), {})
  assert out.getvalue().strip() == expected


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
