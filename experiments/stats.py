"""Means with 95% Student-t confidence intervals, and lambda selection."""
from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

# Two-sided 95% quantiles t_{0.975, df} for df = 1..30 (standard tables).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
         2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
         2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
  """The 97.5% quantile of Student's t (no scipy: a table, then Cornish-Fisher)."""
  if df < 1:
    return math.nan
  if df <= len(_T975):
    return _T975[df - 1]
  z = 1.959964
  # Cornish-Fisher expansion in 1/df; error < 1e-4 for df > 30.
  return (z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
          + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3))


def mean_ci(values):
  """(mean, half-width of the 95% CI, n): t_{n-1} * std(ddof=1) / sqrt(n)."""
  v = np.asarray([x for x in values if x is not None and not math.isnan(x)], float)
  n = len(v)
  if n == 0:
    return math.nan, math.nan, 0
  if n == 1:
    return float(v[0]), math.nan, 1
  return float(v.mean()), float(t975(n - 1) * v.std(ddof=1) / math.sqrt(n)), n


def select_lambda(records, at_task: int | None = None):
  """The lambda with the best mean accuracy after ``at_task`` tasks (default: last).

  Returns (lambda, {lambda: mean accuracy}); ties go to the smaller lambda.
  """
  by_lam = defaultdict(list)
  for r in records:
    curve = r["mean_acc"]
    k = len(curve) if at_task is None else at_task
    by_lam[r["lambda"]].append(curve[k - 1])
  if not by_lam:
    raise ValueError("no records to select lambda from")
  means = {lam: float(np.mean(v)) for lam, v in sorted(by_lam.items())}
  best = max(means, key=lambda lam: (means[lam], -lam))
  return best, means
