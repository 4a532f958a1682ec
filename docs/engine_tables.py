"""The engine's cost table in docs/engine.rst, from benchmarks/results/importance.json.

``python benchmarks/importance.py`` (or ``--only ... --merge``) writes the
measurements; ``python docs/engine_tables.py`` rewrites the block between the
comment lines ``BEGIN`` / ``END`` below from them, one row per model: the
engine's time over one batched gradient per estimator, and chunked
``vmap(grad)``'s. tests/test_readme.py checks that the committed page is what
it writes.
"""
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:   # run as `python docs/engine_tables.py`
  sys.path.insert(0, str(ROOT))
from docs.study_tables import md_to_rst  # noqa: E402

ENGINE = ROOT / "docs" / "engine.rst"
RESULTS = ROOT / "benchmarks" / "results" / "importance.json"
BEGIN = (".. engine costs: written by `python docs/engine_tables.py` from "
         "benchmarks/results/importance.json; edits here are overwritten")
END = ".. end of engine costs"
ESTIMATORS = ("fisher (empirical)", "mas", "sig")


def _x(v) -> str:
  return "-" if v is None else (f"{v:.0f}x" if v >= 10 else f"{v:.2f}x")


def table(results=RESULTS) -> list[str]:
  """A Markdown table: model (N), Fisher, MAS, SIG, vmap Fisher, each over one batched gradient."""
  rows = json.loads(pathlib.Path(results).read_text())["rows"]
  models: dict = {}
  for r in rows:
    models.setdefault(r["model"], {})[r["estimator"]] = r
  lines = ["| model | Fisher (empirical) | MAS | SIG | chunked `vmap(grad)`, Fisher | load |",
           "|---|---|---|---|---|---|"]
  for model, ests in models.items():
    first = next(iter(ests.values()))
    cells = [_x(ests[e]["engine_x"]) if e in ests else "-" for e in ESTIMATORS]
    if "fisher (exact)" in ests:
      cells[0] += f" (exact: {_x(ests['fisher (exact)']['engine_x'])})"
    fisher = ests.get("fisher (empirical)", {})
    loads = [r["load_1min"] for r in ests.values() if r.get("load_1min") is not None]
    load = f"{min(loads):.1f}-{max(loads):.1f}" if loads else "-"
    lines.append(f"| {model}, N={first['N']} | " + " | ".join(cells)
                 + f" | {_x(fisher.get('vmap_x'))} | {load} |")
  return lines


def generated(results=RESULTS) -> str:
  return "\n".join([BEGIN, "", *md_to_rst(table(results)), "", END])


def committed(text: str | None = None) -> str:
  text = ENGINE.read_text(encoding="utf-8") if text is None else text
  return text[text.index(BEGIN):text.index(END) + len(END)]


def main() -> None:
  text = ENGINE.read_text(encoding="utf-8")
  ENGINE.write_text(text.replace(committed(text), generated()), encoding="utf-8")
  print(f"wrote the engine cost table of {ENGINE}")


if __name__ == "__main__":
  main()
