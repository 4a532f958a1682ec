r"""Continual-learning metrics from an accuracy matrix.

``R[i, j]`` is the accuracy on task ``j`` after training on tasks ``0..i``
(shape ``[..., T, T]``; leading axes, e.g. runs, are kept). Only the lower
triangle (``j <= i``, tasks already seen) is read: entries above it may be
anything, NaN included (tasks not evaluated yet).
"""
from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray


def _matrix(R: ArrayLike, min_tasks: int = 1) -> NDArray[np.float64]:
  R = np.asarray(R, dtype=np.float64)
  if R.ndim < 2 or R.shape[-1] != R.shape[-2]:
    raise ValueError(f"R must be a square [..., T, T] accuracy matrix, got shape {R.shape}")
  if R.shape[-1] < min_tasks:
    raise ValueError(f"this metric needs at least {min_tasks} tasks, R has shape {R.shape}")
  return R


def average_accuracy(R: ArrayLike) -> NDArray[np.float64]:
  r"""Mean accuracy over the tasks seen so far, after each task: the seed's curve.

  .. math:: A_i = \frac{1}{i+1} \sum_{j \le i} R_{ij}

  Returns an array ``[..., T]``; ``A[..., -1]`` is the final average accuracy
  (ACC of Lopez-Paz & Ranzato 2017).

  Example:
    >>> import wva_jax as wj
    >>> wj.metrics.average_accuracy([[0.9, 0.1], [0.7, 0.8]]).tolist()
    [0.9, 0.75]
  """
  R = _matrix(R)
  T = R.shape[-1]
  seen = np.tril(np.ones((T, T), bool))
  return np.where(seen, R, 0.0).sum(-1) / seen.sum(-1)


def forgetting(R: ArrayLike) -> np.float64 | NDArray[np.float64]:
  r"""Average forgetting at the end (Chaudhry et al. 2018).

  .. math:: F = \frac{1}{T-1} \sum_{j < T-1} \big(\max_{j \le i < T-1} R_{ij} - R_{T-1,j}\big)

  Example:
    >>> import wva_jax as wj
    >>> round(float(wj.metrics.forgetting([[0.9, 0.1], [0.7, 0.8]])), 6)
    0.2
  """
  R = _matrix(R, 2)
  T = R.shape[-1]
  seen = np.tril(np.ones((T - 1, T - 1), bool))  # i >= j: after task j was learned
  best = np.max(np.where(seen, R[..., :-1, :-1], -np.inf), axis=-2)
  return np.mean(best - R[..., -1, :-1], axis=-1)


def backward_transfer(R: ArrayLike) -> np.float64 | NDArray[np.float64]:
  r"""Backward transfer (Lopez-Paz & Ranzato 2017); negative means forgetting.

  .. math:: BWT = \frac{1}{T-1} \sum_{j < T-1} \big(R_{T-1,j} - R_{jj}\big)

  Example:
    >>> import wva_jax as wj
    >>> round(float(wj.metrics.backward_transfer([[0.9, 0.1], [0.7, 0.8]])), 6)
    -0.2
  """
  R = _matrix(R, 2)
  T = R.shape[-1]
  diag = np.diagonal(R, axis1=-2, axis2=-1)[..., :-1]
  return np.mean(R[..., T - 1, :-1] - diag, axis=-1)
