"""notebooks/elephants.ipynb runs top to bottom in quick mode (WVA_JAX_NOTEBOOK_QUICK=1)."""
import math
import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = pathlib.Path(__file__).resolve().parent.parent / "notebooks" / "elephants.ipynb"
pytestmark = pytest.mark.slow  # a notebook kernel, over a minute


def test_notebook_runs_in_quick_mode(monkeypatch):
  monkeypatch.setenv("WVA_JAX_NOTEBOOK_QUICK", "1")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
  text = "\n".join(o.get("text", "") + str(o.get("data", {}).get("text/markdown", ""))
                   for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
  assert "quick" in text and "Traceback" not in text
  # every fine-tuning run printed finite perplexities, and the memory table is there
  ppl = [float(w) for line in text.splitlines() if "lambda=" in line and "ppl A" in line
         for w in line.replace("->", " ").split() if w.replace(".", "", 1).isdigit() or w == "nan"]
  assert len(ppl) >= 16 and all(math.isfinite(p) for p in ppl)
  assert "**4.00x**" in text and "sgd+ewc" in text   # adam+wva state = 4x params
  # Colab: the first cell says how to open it there, the install cell clones REPOSITORY
  # (tests/test_colab.py checks badge and install cell agree).
  assert "Colab" in nb.cells[0].source and "REPOSITORY = " in nb.cells[1].source
