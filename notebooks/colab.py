"""Points every notebook's Colab badge and install cell at wva-jax's repository.

    python notebooks/colab.py https://github.com/OWNER/wva-jax   # stamp all notebooks
    python notebooks/colab.py --clear                             # no repository
    python notebooks/colab.py --check                             # exit 1 if they disagree

Until a public repository is stamped, each notebook opens with how to run it on
Colab by upload, and its install cell asks for the repository in a form field
(``REPOSITORY``) instead of cloning a made-up address.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys

HERE = pathlib.Path(__file__).resolve().parent
NOTEBOOKS = ("quickstart.ipynb", "wva-plots.ipynb", "elephants.ipynb")
_REPO_LINE = re.compile(r'^REPOSITORY = "(.*)"  #@param \{type:"string"\}$', re.M)
_GITHUB = re.compile(r"^https://github\.com/([\w.-]+)/([\w.-]+?)(?:\.git)?/?$")
NO_BADGE = ("*On Colab: File → Upload notebook, then set `REPOSITORY` in the install cell to "
            "the git URL you got wva-jax from.*")


def badge(repo: str, name: str) -> str:
  m = _GITHUB.match(repo)
  if m is None:
    raise ValueError(f"Colab opens notebooks from GitHub only: expected "
                     f"https://github.com/OWNER/NAME, got {repo!r}")
  owner, project = m.groups()
  return ("[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
          f"(https://colab.research.google.com/github/{owner}/{project}/blob/main/notebooks/{name})")


def _first_line_cells(nb):
  intro = next(c for c in nb["cells"] if c["cell_type"] == "markdown")
  install = next(c for c in nb["cells"] if c["cell_type"] == "code"
                 and _REPO_LINE.search("".join(c["source"])))
  return intro, install


def _lines(text: str) -> list[str]:
  return text.splitlines(keepends=True)


def stamp(nb: dict, name: str, repo: str) -> dict:
  """``nb`` with its badge line and ``REPOSITORY`` default set to ``repo`` ('' = none)."""
  intro, install = _first_line_cells(nb)
  first, _, rest = "".join(intro["source"]).partition("\n")
  if not (first.startswith("[![Open In Colab]") or first == NO_BADGE):
    rest = first + "\n" + rest  # no badge line yet: add one
  intro["source"] = _lines((badge(repo, name) if repo else NO_BADGE) + "\n" + rest)
  src = "".join(install["source"])
  install["source"] = _lines(_REPO_LINE.sub(
      f'REPOSITORY = "{repo}"  #@param {{type:"string"}}', src))
  return nb


def repository(nb: dict, name: str) -> str:
  """The repository a notebook points at ('' = none); ValueError if badge and cell disagree."""
  intro, install = _first_line_cells(nb)
  repo = _REPO_LINE.search("".join(install["source"])).group(1)
  first = "".join(intro["source"]).partition("\n")[0]
  expected = badge(repo, name) if repo else NO_BADGE
  if first != expected:
    raise ValueError(f"{name}: the badge line {first!r} does not match REPOSITORY = {repo!r}")
  return repo


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("repository", nargs="?", help="https://github.com/OWNER/NAME")
  p.add_argument("--check", action="store_true", help="only check that the notebooks agree")
  p.add_argument("--clear", action="store_true", help="point the notebooks at no repository")
  args = p.parse_args(argv)
  if (args.repository is not None) + args.check + args.clear != 1:
    p.error("give one of: a repository URL, --clear, --check")
  if args.clear:
    args.repository = ""
  elif args.repository is not None:
    try:
      badge(args.repository, NOTEBOOKS[0])  # validate before writing anything
    except ValueError as e:
      p.error(str(e))
  repos = set()
  for name in NOTEBOOKS:
    path = HERE / name
    nb = json.loads(path.read_text(encoding="utf-8"))
    if args.check:
      try:
        repos.add(repository(nb, name))
      except ValueError as e:
        print(e, file=sys.stderr)
        return 1
      continue
    path.write_text(json.dumps(stamp(nb, name, args.repository), indent=1,
                               ensure_ascii=False) + "\n", encoding="utf-8")
  if args.check and len(repos) > 1:
    print(f"the notebooks point at different repositories: {sorted(repos)}", file=sys.stderr)
    return 1
  print(f"notebooks point at {(repos.pop() if args.check else args.repository) or 'no repository'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
