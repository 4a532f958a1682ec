import numpy as np
import pytest

import wva_jax as wj

R = np.array([[0.95, 0.10, 0.12],
              [0.80, 0.93, 0.11],
              [0.70, 0.85, 0.94]])


def test_average_accuracy_is_mean_over_seen_tasks():
  expected = [0.95, (0.80 + 0.93) / 2, (0.70 + 0.85 + 0.94) / 3]
  np.testing.assert_allclose(wj.metrics.average_accuracy(R), expected)


def test_forgetting_and_backward_transfer_by_hand():
  # task 0: best before the end 0.95, final 0.70; task 1: best 0.93, final 0.85
  assert float(wj.metrics.forgetting(R)) == pytest.approx(((0.95 - 0.70) + (0.93 - 0.85)) / 2)
  assert float(wj.metrics.backward_transfer(R)) == pytest.approx(((0.70 - 0.95) + (0.85 - 0.93)) / 2)


def test_metrics_keep_leading_run_axes():
  runs = np.stack([R, np.eye(3)])
  assert wj.metrics.average_accuracy(runs).shape == (2, 3)
  # eye: each task is learned perfectly, then forgotten completely.
  np.testing.assert_allclose(wj.metrics.forgetting(runs), [wj.metrics.forgetting(R), 1.0])
  np.testing.assert_allclose(wj.metrics.backward_transfer(runs)[1], -1.0)


def test_unseen_entries_are_ignored_even_if_nan():
  unseen_nan = np.where(np.tril(np.ones((3, 3))) == 1, R, np.nan)
  np.testing.assert_allclose(wj.metrics.average_accuracy(unseen_nan), wj.metrics.average_accuracy(R))
  assert float(wj.metrics.forgetting(unseen_nan)) == pytest.approx(float(wj.metrics.forgetting(R)))
  assert float(wj.metrics.backward_transfer(unseen_nan)) == pytest.approx(float(wj.metrics.backward_transfer(R)))


def test_forgetting_takes_the_best_after_the_task_was_learned():
  # Before task 1 is trained its accuracy (0.99, by luck) must not count as its best.
  lucky = np.array([[0.9, 0.99, 0.1], [0.8, 0.7, 0.1], [0.8, 0.6, 0.9]])
  assert float(wj.metrics.forgetting(lucky)) == pytest.approx(((0.9 - 0.8) + (0.7 - 0.6)) / 2)
