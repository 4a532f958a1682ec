"""The seed author's published result files, read safely and summarised.

    python -m experiments.author_results /path/to/wva-empirical [--out results/replicate]

The path is a checkout, or the bare git directory the project's ``fetch`` tool
makes (``/work/.mirror/aakutalev+wva-empirical/repo``), of
github.com/aakutalev/wva-empirical at commit ``AUTHOR_COMMIT``. Each ``*.dmp``
there is a pickle written by ``joblib.dump``: a ``defaultdict(list)`` from
lambda (a numpy float64) to a list of runs, each run a list of the mean test
accuracy after each of the 10 tasks (numpy float32/float64 scalars).

The files are third-party pickles, so they are never given to ``pickle.load``
or ``joblib.load``: ``RestrictedUnpickler`` admits four names and maps each to
a stand-in of ours, never to the named object:

* ``collections.defaultdict`` -> a plain ``dict`` (its default factory dropped),
* ``builtins.list`` -> ``list`` (only as that factory),
* ``numpy.dtype`` -> ``_Dtype``, which records a dtype code and byte order and
  admits only ``f4``, ``f8``, ``i4``, ``i8``,
* ``numpy.core.multiarray.scalar`` -> ``_scalar``, which turns the dtype and
  raw bytes into a Python float with ``struct.unpack`` (no numpy call).

Any other name (``os.system``, ``numpy``'s array reconstruction...) raises
``pickle.UnpicklingError``. Each file's sha256 is checked against
``AUTHOR_SHA256`` before it is read.

Which script wrote them: each file name is the ``exp_file`` of one TF script
(``model_wva*_*.py``, importance as in its name: ``wva-`` = SIG, ``wvaFIS-`` =
sampled Fisher, ``wvaMAS-`` = MAS); ``AUTHOR_SCRIPTS`` names it. The PyTorch
configs (``wva-*.yml`` for ``evaluate.py``) name the same ``wva-*`` files, but
no lambda in them holds their 2 repeats: every lambda has 10 runs (5 in the
``wvaFIS-`` files), the TF scripts' ``N``; and ``evaluate.py`` at that commit
loops over the raw config list (``for lmbda in lambdas``, whose one element is
a list), so it fails at ``experiments[lmbda]`` before running anything.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import pathlib
import pickle
import struct
import subprocess
import sys

from experiments.stats import t975

AUTHOR_REPO = "https://github.com/aakutalev/wva-empirical"
AUTHOR_COMMIT = "f8e5dae0d3266f89f7730a62681405d4a08c0609"

# sha256 of each result file at AUTHOR_COMMIT (sha256sum of `git show COMMIT:file`).
AUTHOR_SHA256 = {
    "wva-adam-1x-deltas-backup.dmp":
        "83f9ce8fd69950c70bff31f52dd1dae9f528e543ec2e69acbd5c7e4e202dab71",
    "wva-adam-1x-deltas.dmp":
        "7375b554d44756bf1ae56724eeed021f83ee02363056f0c782bbb0faeb3a71fb",
    "wva-adam-1x-grads.dmp":
        "74bfd1592ae304dde5a61c9ec1852f9794a9cfc9b34cccb764bc62711fc5e5a9",
    "wva-adam-exp-deltas.dmp":
        "af63aeb3399d1ac10b77d58a53a53a445fd6430b3a1c57e203c4ea05522d8f56",
    "wva-sgd-1x-deltas.dmp":
        "a61d1a16214b073c1f5a3e6e435ecb01f88a061f1944c241bb895b3b77fe91ec",
    "wva-sgd-1x-grads.dmp":
        "9ea8854a5e3b8ecf3682830a1a1148173d5f6f7099310792a685c5ac16362baf",
    "wva-sgd-exp-grads.dmp":
        "ee7044c1eaf6dd42f982dd2bed733d5de0e94d429b1e54c147caac74ea4ddd2b",
    "wvaFIS-adam-1x-deltas.dmp":
        "3dac9f851d053aed5d24a777b37474fa9e16c7e709628eb0f8ee1b30bcb96ead",
    "wvaFIS-sgd-1x-grads.dmp":
        "2c91ec6644f94110b37deea9e2d26c54fd4b5149c8517d0a74b5448bfaada3cb",
    "wvaMAS-adam-1x-deltas.dmp":
        "d1eaf5dd04497ee2262b0fcceca30ec2935b5fe81d8b54033fce4388846ef9f1",
    "wvaMAS-sgd-1x-grads.dmp":
        "5b7968ef4cf78072fffa2a3aac2b32419fe06fd3cd6bc6871d1b1634ee098a4f",
}

# The TF script that writes each file (its `exp_file`), and that script's setting.
AUTHOR_SCRIPTS = {
    "wva-sgd-1x-grads.dmp": ("model_wva_sgd_1x_grads.py", "SGD, SIG, hyperbolic, gradients"),
    "wva-sgd-1x-deltas.dmp": ("model_wva_sgd_1x_deltas.py", "SGD, SIG, hyperbolic, increments"),
    "wva-sgd-exp-grads.dmp": ("model_wva_sgd_exp_grads.py", "SGD, SIG, exponential, gradients"),
    "wva-adam-1x-grads.dmp": ("model_wva_adam_1x_grads.py", "Adam, SIG, hyperbolic, gradients"),
    "wva-adam-1x-deltas.dmp": ("model_wva_adam_1x_deltas.py",
                               "Adam, SIG, hyperbolic, increments"),
    "wva-adam-1x-deltas-backup.dmp": ("model_wva_adam_1x_deltas.py",
                                      "Adam, SIG, hyperbolic, increments (backup copy)"),
    "wva-adam-exp-deltas.dmp": ("model_wva_adam_exp_deltas.py",
                                "Adam, SIG, exponential, increments"),
    "wvaFIS-sgd-1x-grads.dmp": ("model_wvaFIS_sgd_1x_grads.py",
                                "SGD, sampled Fisher, hyperbolic, gradients"),
    "wvaFIS-adam-1x-deltas.dmp": ("model_wvaFIS_adam_1x_deltas.py",
                                  "Adam, sampled Fisher, hyperbolic, increments"),
    "wvaMAS-sgd-1x-grads.dmp": ("model_wvaMAS_sgd_1x_grads.py",
                                "SGD, MAS (batch-level abs), hyperbolic, gradients"),
    "wvaMAS-adam-1x-deltas.dmp": ("model_wvaMAS_adam_1x_deltas.py",
                                  "Adam, MAS (batch-level abs), hyperbolic, increments"),
}


class _Dtype:
  """Stand-in for ``numpy.dtype`` while unpickling: a code and a byte order."""
  CODES = {"f4": "f", "f8": "d", "i4": "i", "i8": "q"}

  def __init__(self, code, align=False, copy=True):
    if code not in self.CODES:
      raise pickle.UnpicklingError(f"dtype {code!r} not admitted (only {sorted(self.CODES)})")
    self.code, self.order = code, "<"

  def __setstate__(self, state):
    # numpy's dtype state: (version, byteorder, ...); '|' and '=' are native (little here).
    order = state[1] if isinstance(state, tuple) and len(state) > 1 else "<"
    if order not in ("<", ">", "|", "="):
      raise pickle.UnpicklingError(f"dtype byte order {order!r}")
    self.order = ">" if order == ">" else "<"


def _scalar(dtype, data=None):
  """Stand-in for ``numpy.core.multiarray.scalar``: raw bytes -> a Python number."""
  if not isinstance(dtype, _Dtype) or not isinstance(data, (bytes, bytearray)):
    raise pickle.UnpicklingError("scalar needs an admitted dtype and its raw bytes")
  fmt = dtype.order + _Dtype.CODES[dtype.code]
  if struct.calcsize(fmt) != len(data):
    raise pickle.UnpicklingError(f"{len(data)} bytes for dtype {dtype.code}")
  return struct.unpack(fmt, bytes(data))[0]


def _defaultdict(factory=None, *args):
  if factory is not list or args:
    raise pickle.UnpicklingError("defaultdict only with list as its factory")
  return {}


class RestrictedUnpickler(pickle.Unpickler):
  """Admits plain containers and numbers, and the four names above as stand-ins."""
  ADMITTED = {
      ("collections", "defaultdict"): _defaultdict,
      ("builtins", "list"): list,
      ("numpy", "dtype"): _Dtype,
      ("numpy.core.multiarray", "scalar"): _scalar,
      ("numpy._core.multiarray", "scalar"): _scalar,
  }

  def find_class(self, module, name):
    try:
      return self.ADMITTED[(module, name)]
    except KeyError:
      raise pickle.UnpicklingError(f"global {module}.{name} is not admitted") from None


def restricted_loads(data: bytes):
  return RestrictedUnpickler(io.BytesIO(data)).load()


def read_author_file(data: bytes, name: str) -> dict[float, list[list[float]]]:
  """Checks ``data``'s pinned sha256, unpickles it restrictedly, checks its shape."""
  digest = hashlib.sha256(data).hexdigest()
  want = AUTHOR_SHA256.get(name)
  if want is None:
    raise ValueError(f"{name}: not a pinned author file")
  if digest != want:
    raise ValueError(f"{name}: sha256 {digest}, pinned {want}")
  obj = restricted_loads(data)
  if not isinstance(obj, dict):
    raise ValueError(f"{name}: expected a dict, got {type(obj).__name__}")
  out = {}
  for lam, runs in obj.items():
    if not isinstance(lam, (int, float)) or not isinstance(runs, list):
      raise ValueError(f"{name}: bad entry {lam!r}")
    clean = []
    for run in runs:
      if not isinstance(run, list) or not all(isinstance(a, (int, float)) for a in run):
        raise ValueError(f"{name}: lambda {lam}: a run is not a list of numbers")
      clean.append([float(a) for a in run])
    out[float(lam)] = clean
  return out


def _read_bytes(repo: pathlib.Path, name: str) -> bytes:
  if (repo / name).is_file():
    return (repo / name).read_bytes()
  # A bare git directory (the fetch tool's mirror): read the blob at the pinned commit.
  return subprocess.run(["git", "--git-dir", str(repo), "show", f"{AUTHOR_COMMIT}:{name}"],
                        check=True, capture_output=True).stdout


def mean_ci(values):
  n = len(values)
  m = sum(values) / n
  if n < 2:
    return m, float("nan")
  sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
  return m, t975(n - 1) * sd / math.sqrt(n)


def summarize(files: dict[str, dict[float, list[list[float]]]]) -> dict:
  """Per file and lambda: n runs, the mean curve, the final mean ± 95% CI (in %)."""
  out = {}
  for name, table in files.items():
    rows = []
    for lam in sorted(table):
      runs = table[lam]
      if not runs:
        continue
      T = min(len(r) for r in runs)
      curve = [100 * sum(r[k] for r in runs) / len(runs) for k in range(T)]
      m, ci = mean_ci([100 * r[T - 1] for r in runs])
      rows.append({"lambda": lam, "n": len(runs), "tasks": T, "final": m, "ci": ci,
                   "curve": curve})
    best = max(rows, key=lambda r: r["final"]) if rows else None
    script, setting = AUTHOR_SCRIPTS.get(name, ("?", "?"))
    out[name] = {"sha256": AUTHOR_SHA256[name], "tf_script": script, "setting": setting,
                 "best_lambda": best and best["lambda"], "lambdas": rows}
  return out


def load_all(repo) -> dict:
  repo = pathlib.Path(repo)
  return {name: read_author_file(_read_bytes(repo, name), name) for name in AUTHOR_SHA256}


def to_markdown(summary: dict, command: str) -> str:
  lines = [f"# The seed author's published results ({AUTHOR_REPO} at {AUTHOR_COMMIT[:12]})",
           "", f"Produced by `{command}` (restricted unpickler, pinned sha256).",
           "Accuracies in %: mean accuracy over the tasks seen so far; final = after the "
           "last task, mean ± 95% Student-t CI over the author's runs at that lambda.", ""]
  for name, s in summary.items():
    lines += [f"## {name}", "", f"TF script: `{s['tf_script']}` ({s['setting']}); "
              f"sha256 `{s['sha256']}`; best lambda by final mean: {s['best_lambda']:g}", "",
              "| lambda | n | final | after each task |", "|---|---|---|---|"]
    for r in s["lambdas"]:
      lines.append(f"| {r['lambda']:g} | {r['n']} | {r['final']:.2f} ± {r['ci']:.2f} | "
                   + " ".join(f"{c:.1f}" for c in r["curve"]) + " |")
    lines.append("")
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m experiments.author_results",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("repo", help="checkout or bare git dir of the author's repository")
  p.add_argument("--out", default="results/replicate", help="where author_results.{json,md} go")
  args = p.parse_args(sys.argv[1:] if argv is None else argv)
  summary = summarize(load_all(args.repo))
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  cmd = "python -m experiments.author_results <author repo> --out " + args.out
  (out / "author_results.json").write_text(json.dumps(
      {"repo": AUTHOR_REPO, "commit": AUTHOR_COMMIT, "command": cmd, "files": summary},
      indent=1) + "\n")
  (out / "author_results.md").write_text(to_markdown(summary, cmd) + "\n")
  for name, s in summary.items():
    print(f"{name}: {len(s['lambdas'])} lambdas, best {s['best_lambda']:g}")


if __name__ == "__main__":
  main()
