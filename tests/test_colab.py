"""The notebooks' Colab badge and install cell: consistent, stampable, and working."""
import importlib.util
import json
import pathlib
import shutil
import subprocess
import sys
import types

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("colab", ROOT / "notebooks" / "colab.py")
colab = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(colab)


def _load(name):
  return json.loads((ROOT / "notebooks" / name).read_text(encoding="utf-8"))


def _install_source(nb):
  return next("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"
              and "REPOSITORY = " in "".join(c["source"]))


def test_committed_notebooks_agree():
  assert colab.main(["--check"]) == 0
  for name in colab.NOTEBOOKS:
    assert "<org>" not in json.dumps(_load(name))


@pytest.mark.parametrize("name", colab.NOTEBOOKS)
def test_stamp_sets_badge_and_install_source_then_clears(name):
  nb = colab.stamp(_load(name), name, "https://github.com/someone/wva-jax")
  assert colab.repository(nb, name) == "https://github.com/someone/wva-jax"
  first = "".join(nb["cells"][0]["source"]).partition("\n")[0]
  assert first.endswith(f"(https://colab.research.google.com/github/someone/wva-jax/blob/main/"
                        f"notebooks/{name})")
  assert 'REPOSITORY = "https://github.com/someone/wva-jax"' in _install_source(nb)
  nb = colab.stamp(nb, name, "")
  assert colab.repository(nb, name) == ""
  assert nb == _load(name)  # stamping is reversible


def test_mismatched_badge_is_reported():
  nb = colab.stamp(_load("quickstart.ipynb"), "quickstart.ipynb", "https://github.com/a/wva-jax")
  for cell in nb["cells"]:
    cell["source"] = [s.replace('"https://github.com/a/wva-jax"', '"https://github.com/b/x"')
                      for s in cell["source"]]
  with pytest.raises(ValueError, match="does not match REPOSITORY"):
    colab.repository(nb, "quickstart.ipynb")


def test_non_github_repository_is_refused():
  with pytest.raises(ValueError, match="gitlab.com/x/y"):
    colab.badge("https://gitlab.com/x/y", "quickstart.ipynb")


def _run_install_cell(source, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
  monkeypatch.setattr(sys, "path", list(sys.path))
  ns = {}
  exec(compile(source, "install-cell", "exec"), ns)  # pylint: disable=exec-used
  return ns


def test_install_cell_on_colab_asks_for_the_repository(tmp_path, monkeypatch):
  source = _install_source(_load("quickstart.ipynb"))
  with pytest.raises(SystemExit, match="Set REPOSITORY"):
    _run_install_cell(source, tmp_path, monkeypatch)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(),
                    reason="needs git and a git checkout")
def test_install_cell_on_colab_clones_the_repository(tmp_path, monkeypatch):
  # A local clone stands in for GitHub (offline); wva_jax is installed here, so
  # the cell skips pip and puts the clone on sys.path.
  source = _install_source(_load("quickstart.ipynb")).replace(
      'REPOSITORY = ""', f'REPOSITORY = "{ROOT.as_posix()}"')
  ns = _run_install_cell(source, tmp_path, monkeypatch)
  clone = tmp_path / "wva-jax"
  assert (clone / "experiments").is_dir() and ns["ROOT"] == str(clone)
  assert sys.path[0] == str(clone)
  head = subprocess.run(["git", "-C", str(clone), "rev-parse", "HEAD"], capture_output=True,
                        text=True, check=True).stdout
  assert len(head.strip()) == 40
