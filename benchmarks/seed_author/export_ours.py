"""Our runner's initial weights and batch order per seed, for tf_wva.py's swaps.

    .venv/bin/python benchmarks/seed_author/export_ours.py --seeds 0 1 2 3 4

Writes ``data_cache/ours_seed{seed}.npz``: ``p0..p5`` (w, b of the three layers,
as ``experiments.runner.init_runs`` makes them for the seed) and ``orders``
[10, 2200, 100] (the training-example indices of every step of every task, as
``experiments.runner.train_task`` draws them). Checked against the runner's own
``init_runs`` before writing.
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from experiments import runner  # noqa: E402
from experiments.methods import Method  # noqa: E402
from experiments.models import init_mlp  # noqa: E402
from experiments.protocol import BATCH_SIZE, N_TRAIN, STEPS_PER_TASK, TASKS  # noqa: E402


def export(seed: int, out: pathlib.Path) -> None:
  key = jax.random.PRNGKey(seed)
  params = init_mlp(jax.random.fold_in(key, 0))
  ref = runner.init_runs(np.asarray([seed], np.uint32), np.asarray([0.0], np.float32),
                         method=Method("sgd")).params
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(ref)):
    assert np.array_equal(np.asarray(a), np.asarray(b)[0]), "init differs from the runner's"
  orders = np.stack([np.asarray(runner._batch_order(jax.random.fold_in(key, 1 + t), N_TRAIN,
                                                    STEPS_PER_TASK, BATCH_SIZE))
                     for t in range(TASKS)])
  flat = [a for layer in params for a in (layer["w"], layer["b"])]
  np.savez(out, orders=orders.astype(np.int32), **{f"p{i}": np.asarray(a) for i, a in enumerate(flat)})


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
  p.add_argument("--dir", default="data_cache")
  args = p.parse_args()
  pathlib.Path(args.dir).mkdir(exist_ok=True)
  for s in args.seeds:
    out = pathlib.Path(args.dir) / f"ours_seed{s}.npz"
    export(s, out)
    print(out)


if __name__ == "__main__":
  main()
