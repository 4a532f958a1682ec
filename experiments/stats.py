"""Means with 95% Student-t confidence intervals, and lambda selection."""
from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
from scipy import stats as _scipy_stats


def t975(df: int) -> float:
  """The 97.5% quantile of Student's t with ``df`` degrees of freedom (two-sided 95%); nan below 1.

  Rounded to 3 decimals, the precision of the standard tables every committed
  confidence interval was computed with (the exact quantile moves a few printed
  CIs by one in their last digit, e.g. 4.303 vs 4.30265 at df 2).
  """
  return math.nan if df < 1 else round(float(_scipy_stats.t.ppf(0.975, df)), 3)


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
