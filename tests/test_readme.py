"""README.md is a landing page: its code is the examples' code, and the numbers it states are the tested claims.

Every ```python block of the README is lines of a file in examples/ (dedented),
and tests/test_examples.py runs each of those files and checks what it prints
against bounds; here, the numbers the README says they print must lie within
the same bounds. The first code block is the two set-up commands (.ci/run runs
the second).
"""
import pathlib
import re
import textwrap

from test_examples import ACCURACY_BOUNDS, LM_BOUNDS, accuracy_rows, lm_rows, within

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# The examples tests/test_examples.py runs and checks.
EXAMPLES = ["optax_wva", "nnx_wva", "linen_ewc", "lm_finetune"]


def _blocks(lang: str) -> list[str]:
  return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def _is_excerpt(block: str, source: str) -> bool:
  """``block`` is a run of consecutive lines of ``source``, dedented."""
  want, lines = block.rstrip("\n").split("\n"), source.split("\n")
  return any(textwrap.dedent("\n".join(lines[i:i + len(want)])).split("\n") == want
             for i in range(len(lines) - len(want) + 1))


def test_readme_opens_with_the_two_set_up_commands():
  first = re.search(r"```(\w*)\n(.*?)```", README.read_text(), flags=re.S)
  assert first.group(1) == "bash"
  assert first.group(2) == ("pip install -e '.[experiments]' && python -m experiments quickstart\n"
                            "pip install -e '.[test]' && python -m pytest\n")


def test_every_readme_python_block_is_code_of_a_tested_example():
  sources = {name: (ROOT / "examples" / f"{name}.py").read_text() for name in EXAMPLES}
  blocks = _blocks("python")
  assert blocks
  for block in blocks:
    assert any(_is_excerpt(block, src) for src in sources.values()), block
  for name in EXAMPLES:   # and each example is linked
    assert f"(examples/{name}.py)" in README.read_text(), name


def test_readme_states_numbers_within_the_tested_bounds():
  # "`python examples/nnx_wva.py` prints `strength 1000: accuracy on A ..` and `strength 0: ..`", per example.
  text = README.read_text()
  stated = accuracy_rows(text)
  assert len(stated) == 6, stated   # nnx_wva, linen_ewc, optax_wva: consolidated, then strength 0
  for strength, accuracy in stated:
    assert within(accuracy, ACCURACY_BOUNDS["plain" if strength == "0" else "kept"]), (strength, accuracy)
  # examples/lm_finetune.py's output, as the README quotes it.
  (output,) = _blocks("text")
  losses = lm_rows(output)
  assert list(losses) == list(LM_BOUNDS), output
  for name, bounds in LM_BOUNDS.items():
    assert within(losses[name], bounds), (name, losses[name])
  assert losses["lora_ewc"]["old"] > losses["lora"]["old"] + 0.4, output


def test_engine_page_cost_table_is_the_committed_benchmark():
  from docs import engine_tables  # docs/ is importable from the checkout (pytest's pythonpath)
  assert engine_tables.committed() == engine_tables.generated(), (
      "run `python docs/engine_tables.py` and commit docs/engine.rst")
