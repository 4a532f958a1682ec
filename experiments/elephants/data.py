"""Two real text domains that are on every machine with Python: no download.

* Domain A, English prose: the Python Language Reference's prose as shipped in
  the standard library (``pydoc_data/topics.py``, the text ``help('if')``
  prints): ~465k characters of technical English (it quotes some grammar and
  short code).
* Domain B, Python source: a fixed list of pure-Python standard-library
  modules (their own source files).

Text is encoded as UTF-8 bytes (vocabulary 256, no tokenizer to ship) and
cut into documents (a reference topic's paragraphs; a module's top-level
blocks), and each document into sequences of at most ``seq_len + 1`` bytes,
right-padded with 0 and a 0/1 mask: per-sequence log-likelihoods sum over
the real tokens only. The encoded arrays are cached as ``.npz`` under
``$WVA_JAX_CACHE`` (default ``~/.cache/wva_jax/elephants``) with the
sha256 of the source text, which the scenario's results record.
"""
from __future__ import annotations

import hashlib
import os
import pathlib
import re
import sysconfig
from typing import NamedTuple

import numpy as np

VOCAB = 256
PAD = 0

# Pure-Python stdlib modules, chosen for size and plain style (no generated code).
CODE_MODULES = (
    "argparse.py", "ast.py", "bisect.py", "calendar.py", "configparser.py", "copy.py",
    "csv.py", "dataclasses.py", "datetime.py", "difflib.py", "enum.py", "fractions.py",
    "ftplib.py", "functools.py", "heapq.py", "inspect.py", "ipaddress.py", "logging/__init__.py",
    "mailbox.py", "numbers.py", "optparse.py", "os.py", "pathlib.py", "pickle.py",
    "pprint.py", "queue.py", "random.py", "shutil.py", "smtplib.py", "statistics.py",
    "string.py", "subprocess.py", "tarfile.py", "tempfile.py", "textwrap.py", "threading.py",
    "tokenize.py", "traceback.py", "typing.py", "zipfile.py",
)


class Domain(NamedTuple):
  """Encoded sequences of one domain, split into train and held-out by document."""
  name: str
  train: np.ndarray        # [N, seq_len + 1] uint8 bytes, 0-padded
  train_mask: np.ndarray   # [N, seq_len + 1] 0/1
  test: np.ndarray
  test_mask: np.ndarray
  sha256: str              # of the UTF-8 source text
  source: str


def prose_documents() -> tuple[list[str], str]:
  """The Language Reference topics, each split into paragraphs."""
  from pydoc_data import topics
  docs = []
  for name in sorted(topics.topics):
    docs += [p.strip("\n") for p in re.split(r"\n\s*\n", topics.topics[name]) if p.strip()]
  return docs, f"python{_version()} pydoc_data/topics.py"


def code_documents() -> tuple[list[str], str]:
  """The modules' source, split before each top-level ``def``/``class``/decorator."""
  stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
  docs = []
  for rel in CODE_MODULES:
    src = (stdlib / rel).read_text(encoding="utf-8")
    docs += [b.strip("\n") for b in re.split(r"\n(?=(?:def |class |@))", src) if b.strip()]
  return docs, f"python{_version()} stdlib: {len(CODE_MODULES)} modules"


def _version():
  import sys
  return f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"


def to_sequences(docs: list[str], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Cuts each document's bytes into windows of ``seq_len + 1`` (the last one padded)."""
  rows, masks = [], []
  for d in docs:
    b = np.frombuffer(d.encode("utf-8") + b"\n", np.uint8)
    for s in range(0, len(b) - 1, seq_len):   # windows overlap by one: targets are inputs shifted
      w = b[s:s + seq_len + 1]
      if len(w) < 8:  # a few-byte tail says little about the domain
        continue
      row = np.full(seq_len + 1, PAD, np.uint8)
      row[:len(w)] = w
      m = np.zeros(seq_len + 1, np.uint8)
      m[:len(w)] = 1
      rows.append(row)
      masks.append(m)
  return np.stack(rows), np.stack(masks)


def cache_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get("WVA_JAX_CACHE", pathlib.Path.home() / ".cache" / "wva_jax")) / "elephants"


def load_domain(name: str, seq_len: int = 64, test_fraction: float = 0.1, seed: int = 0) -> Domain:
  """Domain ``'prose'`` (A) or ``'code'`` (B), documents split into train/test at random."""
  docs, source = {"prose": prose_documents, "code": code_documents}[name]()
  sha = hashlib.sha256("\x00".join(docs).encode("utf-8")).hexdigest()
  path = cache_dir() / f"{name}-L{seq_len}-t{test_fraction}-s{seed}-{sha[:16]}.npz"
  if path.exists():
    z = np.load(path)
    return Domain(name, z["train"], z["train_mask"], z["test"], z["test_mask"], sha, source)
  order = np.random.default_rng(seed).permutation(len(docs))
  n_test = max(1, int(round(test_fraction * len(docs))))
  test_docs = [docs[i] for i in sorted(order[:n_test])]
  train_docs = [docs[i] for i in sorted(order[n_test:])]
  train, train_mask = to_sequences(train_docs, seq_len)
  test, test_mask = to_sequences(test_docs, seq_len)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".tmp.npz")
  np.savez_compressed(tmp, train=train, train_mask=train_mask, test=test, test_mask=test_mask)
  os.replace(tmp, path)
  return Domain(name, train, train_mask, test, test_mask, sha, source)


def decode(row: np.ndarray) -> str:
  return bytes(int(b) for b in row if b != PAD).decode("utf-8", errors="replace")
