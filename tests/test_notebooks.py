"""notebooks/quickstart.ipynb and wva-plots.ipynb run top to bottom in quick mode."""
import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
pytestmark = pytest.mark.slow  # a kernel per notebook, tens of seconds each


def _run(name, monkeypatch):
  monkeypatch.setenv("WVA_JAX_NOTEBOOK_QUICK", "1")
  nb = nbformat.read(NOTEBOOKS / name, as_version=4)
  nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                          resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
  return nb, "\n".join(o.get("text", "") + str(o.get("data", {}).get("text/markdown", ""))
                       for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


def test_quickstart_notebook_trains_and_protection_helps(monkeypatch):
  nb, text = _run("quickstart.ipynb", monkeypatch)
  final = {line.split()[0]: float(line.split("final mean accuracy ")[1].split("%")[0])
           for line in text.splitlines() if "final mean accuracy" in line}
  assert set(final) == {"SGD", "WVA-Fisher"}, text
  assert final["WVA-Fisher"] > final["SGD"], final
  assert sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
             for o in c.get("outputs", [])) == 2


def test_wva_plots_notebook_reads_committed_results(monkeypatch):
  _, text = _run("wva-plots.ipynb", monkeypatch)
  assert "WVA-Fisher (SGD)" in text          # the committed quickstart results were read
  for name in ("methods", "aa_sgd", "ab_adam", "viscosity", "lambda_vs_tasks", "importance",
               "importance_exponential"):
    assert f"### {name}" in text
