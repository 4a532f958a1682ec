"""The restricted unpickler for the seed author's result files (no network, fast)."""
from __future__ import annotations

import collections
import os
import pickle

import numpy as np
import pytest

from experiments import author_results as AR


class _Evil:
  def __reduce__(self):
    return (os.system, ("echo pwned",))


def test_rejects_a_pickle_that_calls_os_system():
  data = pickle.dumps(_Evil(), protocol=3)
  with pytest.raises(pickle.UnpicklingError, match="os|posix|system"):
    AR.restricted_loads(data)


def test_rejects_numpy_array_reconstruction():
  with pytest.raises(pickle.UnpicklingError, match="not admitted"):
    AR.restricted_loads(pickle.dumps(np.zeros(3), protocol=3))


def test_accepts_plain_containers_and_numbers():
  obj = {1.5: [[0.1, 0.2], [0.3]], "k": (1, 2), 7: None, "t": True}
  assert AR.restricted_loads(pickle.dumps(obj, protocol=3)) == obj


def test_reads_a_file_shaped_like_the_authors():
  # joblib.dump of defaultdict(list): lambda (np.float64) -> runs of np.float32/64 scalars.
  d = collections.defaultdict(list)
  d[np.float64(36050.0)].append([np.float32(0.972), np.float64(0.9695)])
  out = AR.restricted_loads(pickle.dumps(d, protocol=3))
  assert type(out) is dict
  (lam, runs), = out.items()
  assert lam == 36050.0 and isinstance(lam, float)
  assert runs == [[float(np.float32(0.972)), 0.9695]]


def test_defaultdict_only_with_list():
  d = collections.defaultdict(dict)
  with pytest.raises(pickle.UnpicklingError):
    AR.restricted_loads(pickle.dumps(d, protocol=3))


def test_pinned_sha256_is_checked():
  name = "wvaFIS-sgd-1x-grads.dmp"
  with pytest.raises(ValueError, match="sha256"):
    AR.read_author_file(pickle.dumps({}, protocol=3), name)
  with pytest.raises(ValueError, match="not a pinned"):
    AR.read_author_file(b"", "other.dmp")
  assert all(len(h) == 64 for h in AR.AUTHOR_SHA256.values())


def test_draw_offset_is_the_other_draws_mean_minus_draw_0(tmp_path):
  import json

  from experiments import side_by_side as SBS
  setting = SBS.SETTINGS[0]
  finals = {0: (0.88, 0.90), 1: (0.91, 0.91), 2: (0.90, 0.92), 3: (0.93, 0.89)}
  for d, vals in finals.items():
    path = tmp_path / ("seed_author" if d == 0 else f"seed_author_perms{d}") / "runs.jsonl"
    path.parent.mkdir(parents=True)
    rows = [{"arm": setting[4], "lambda": setting[1], "seed": s, "mean_acc": [0.97, v]}
            for s, v in zip((100, 101), vals)]
    rows.append({"arm": setting[4], "lambda": setting[1], "seed": 102, "mean_acc": [0.97, 0.5]})  # not compared
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  offset, sd, n = SBS.draw_offset(tmp_path)
  means = [89.0, 91.0, 91.0, 91.0]             # per draw, in %, seeds 100 and 101
  assert n == 4
  assert offset == pytest.approx(91.0 - 89.0)
  assert sd == pytest.approx(np.std(means, ddof=1))
  assert SBS.draw_offset(tmp_path / "empty") is None


def test_committed_docs_state_the_committed_replicate_results():
  """docs/study.rst's replicate block is what `python -m experiments.side_by_side` makes of results/."""
  import pathlib

  from docs import study_tables  # docs/ is importable from the checkout (pytest's pythonpath)
  root = pathlib.Path(__file__).resolve().parents[1]
  assert study_tables.committed_block("replicate") == study_tables.generated("replicate", root / "results"), (
      "run `python docs/study_tables.py` and commit docs/study.rst")
