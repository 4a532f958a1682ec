"""The study's generated tables in docs/study.rst, as reStructuredText.

``python -m experiments report`` and ``python -m experiments.side_by_side``
write their summaries as Markdown (``report.headline``,
``side_by_side.readme_block``); docs/study.rst holds the same lines converted
by :func:`md_to_rst` between the comment lines ``BEGIN`` / ``END`` below. After
either command, ``python docs/study_tables.py`` rewrites both blocks from
results/; tests/test_experiments.py and tests/test_author_results.py check that
the committed page is what it writes.
"""
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
STUDY = ROOT / "docs" / "study.rst"
BLOCKS = {
    "study": (".. study results: written by `python docs/study_tables.py` from `python -m experiments "
              "report`'s summary of results/*/runs.jsonl; edits here are overwritten",
              ".. end of study results"),
    "replicate": (".. replicate: written by `python docs/study_tables.py` from `python -m "
                  "experiments.side_by_side`'s table of results/replicate/; edits here are overwritten",
                  ".. end of replicate"),
}


def inline(text: str) -> str:
  """Markdown inline code and links as reStructuredText."""
  def code(m):
    before = "\\ " if m.start() > 0 and text[m.start() - 1].isalnum() else ""
    after = "\\ " if m.end() < len(text) and text[m.end()].isalnum() else ""
    return f"{before}``{m.group(1)}``{after}"
  out = re.sub(r"`([^`]+)`", code, text)
  return re.sub(r"\[([^\]]+)\]\(([^)]+)\)", lambda m: f"`{m.group(1)} <../{m.group(2)}>`__", out)


def _cell(text: str) -> str:
  text = inline(text.strip())
  return "\\" + text if text == "-" or text[:2] in ("- ", "* ", "+ ") else text


def md_to_rst(lines: list[str]) -> list[str]:
  """Paragraph lines and pipe tables (header, separator, rows) to reStructuredText lines."""
  out, i = [], 0
  while i < len(lines):
    line = lines[i]
    if line.startswith("|"):
      rows = []
      while i < len(lines) and lines[i].startswith("|"):
        if not re.fullmatch(r"\|(\s*-+\s*\|)+", lines[i]):
          rows.append([_cell(c) for c in lines[i].strip().strip("|").split("|")])
        i += 1
      out += [".. list-table::", "   :header-rows: 1", ""]
      for row in rows:
        out += [("   * - " if k == 0 else "     - ") + c for k, c in enumerate(row)]
      continue
    out.append(inline(line))
    i += 1
  return out


def block(name: str, lines: list[str]) -> str:
  begin, end = BLOCKS[name]
  return "\n".join([begin, "", *md_to_rst(lines), "", end])


def committed_block(name: str, text: str | None = None) -> str:
  text = STUDY.read_text(encoding="utf-8") if text is None else text
  begin, end = BLOCKS[name]
  return text[text.index(begin):text.index(end) + len(end)]


def generated(name: str, results=ROOT / "results") -> str:
  sys.path.insert(0, str(ROOT))
  if name == "study":
    from experiments import report  # pylint: disable=import-outside-toplevel
    return block(name, report.headline(results))
  from experiments import side_by_side  # pylint: disable=import-outside-toplevel
  return block(name, side_by_side.readme_block(results))


def main() -> None:
  text = STUDY.read_text(encoding="utf-8")
  for name in BLOCKS:
    text = text.replace(committed_block(name, text), generated(name))
  STUDY.write_text(text, encoding="utf-8")
  print(f"wrote the study and replicate blocks of {STUDY}")


if __name__ == "__main__":
  main()
