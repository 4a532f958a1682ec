"""Task streams over one base dataset, as index maps instead of copies.

A stream of T tasks is a few small integer arrays; the images are transformed
on the fly inside the jitted program:

* ``pixel_map`` ``[T, 784]``: task ``t`` sees ``x_pad[:, pixel_map[t]]``, where
  ``x_pad`` is the image with one zero pixel appended (index 784), so both
  permutations and rotations (whose corners fall outside the image) are a
  single gather.
* ``class_mask`` ``[T, 10]``: classes that task ``t`` may predict (all for
  permuted and rotated MNIST; the task's pair for split MNIST, i.e. the
  task-incremental setting with a masked shared head).
* ``train_idx`` ``[T, N]``, ``valid_idx`` ``[T, V]``, ``test_idx`` ``[T, M]`` with
  ``test_weight``: the examples of each task. Split tasks differ in size:
  train lists are padded by wrapping around (a few examples appear twice per
  epoch), validation lists are cut to the smallest task (so importance is an
  exact mean over distinct examples), test lists are padded with weight 0.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

PIXELS, SIDE, BLANK = 784, 28, 784


class TaskStream(NamedTuple):
  name: str
  pixel_map: np.ndarray
  class_mask: np.ndarray
  train_idx: np.ndarray
  valid_idx: np.ndarray
  test_idx: np.ndarray
  test_weight: np.ndarray

  @property
  def num_tasks(self) -> int:
    return int(self.pixel_map.shape[0])


def permutation(task: int, seed: int = 0) -> np.ndarray:
  """Pixel permutation of a task: identity for task 0, else fixed by (seed, task).

  Each task's permutation depends only on its own (seed, task), so a 2-task
  and a 10-task stream share their first tasks.
  """
  if task == 0:
    return np.arange(PIXELS, dtype=np.int32)
  return np.random.default_rng([seed, task]).permutation(PIXELS).astype(np.int32)


def rotation_map(degrees: float) -> np.ndarray:
  """Nearest-neighbour source pixel of each output pixel for a rotation."""
  c = (SIDE - 1) / 2.0
  r, col = np.mgrid[0:SIDE, 0:SIDE].astype(np.float64)
  # Counter-clockwise for positive degrees, as np.rot90. Output pixel (r, col)
  # comes from the input pixel rotated back by -degrees.
  t = -np.deg2rad(degrees)
  sr = np.rint(c + (r - c) * np.cos(t) - (col - c) * np.sin(t)).astype(int)
  sc = np.rint(c + (r - c) * np.sin(t) + (col - c) * np.cos(t)).astype(int)
  inside = (sr >= 0) & (sr < SIDE) & (sc >= 0) & (sc < SIDE)
  return np.where(inside, sr * SIDE + sc, BLANK).reshape(-1).astype(np.int32)


def _same_examples(num_tasks, n_train, n_valid, n_test):
  tile = lambda n: np.tile(np.arange(n, dtype=np.int32), (num_tasks, 1))
  return tile(n_train), tile(n_valid), tile(n_test), np.ones((num_tasks, n_test), np.float32)


def permuted(split, num_tasks: int = 10, seed: int = 0) -> TaskStream:
  """Permuted MNIST: task 0 as is, tasks 1.. with a fixed pixel permutation each."""
  maps = np.stack([permutation(t, seed) for t in range(num_tasks)])
  return TaskStream(f"permuted(seed={seed})", maps,
                    np.ones((num_tasks, 10), bool),
                    *_same_examples(num_tasks, len(split.y_train), len(split.y_valid),
                                    len(split.y_test)))


def rotated(split, num_tasks: int = 10, step_degrees: float | None = None) -> TaskStream:
  """Rotated MNIST: task t rotated by t * step degrees (default 180/T)."""
  step = 180.0 / num_tasks if step_degrees is None else step_degrees
  maps = np.stack([rotation_map(t * step) for t in range(num_tasks)])
  return TaskStream(f"rotated(step={step:g})", maps, np.ones((num_tasks, 10), bool),
                    *_same_examples(num_tasks, len(split.y_train), len(split.y_valid),
                                    len(split.y_test)))


def split_classes(split, num_tasks: int = 5) -> TaskStream:
  """Split MNIST: task t holds digits {2t, 2t+1}; predictions masked to them."""
  if not 1 <= num_tasks <= 5:
    raise ValueError(f"split MNIST has 1..5 tasks, got {num_tasks}")
  pairs = [(2 * t, 2 * t + 1) for t in range(num_tasks)]
  pick = lambda y: [np.flatnonzero(np.isin(y, p)).astype(np.int32) for p in pairs]
  tr, va, te = pick(split.y_train), pick(split.y_valid), pick(split.y_test)
  n_tr, n_va, n_te = max(map(len, tr)), min(map(len, va)), max(map(len, te))
  train_idx = np.stack([np.resize(i, n_tr) for i in tr])  # wrap-around padding
  valid_idx = np.stack([i[:n_va] for i in va])
  test_idx = np.stack([np.pad(i, (0, n_te - len(i))) for i in te])
  test_weight = np.stack([np.arange(n_te) < len(i) for i in te]).astype(np.float32)
  mask = np.zeros((num_tasks, 10), bool)
  for t, p in enumerate(pairs):
    mask[t, list(p)] = True
  maps = np.tile(np.arange(PIXELS, dtype=np.int32), (num_tasks, 1))
  return TaskStream("split", maps, mask, train_idx, valid_idx, test_idx, test_weight)


STREAMS = {"permuted": permuted, "rotated": rotated, "split": split_classes}


def make_stream(name: str, split, num_tasks: int, seed: int = 0) -> TaskStream:
  if name not in STREAMS:
    raise ValueError(f"stream must be one of {tuple(STREAMS)}, got {name!r}")
  if name == "permuted":
    return permuted(split, num_tasks, seed)
  return STREAMS[name](split, num_tasks)
