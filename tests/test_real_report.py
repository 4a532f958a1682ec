"""The real-model scenario's report logic (experiments/elephants/real_report.py) on records written here by hand:
matched learning by linear interpolation along each run's trajectory, WiSE-FT's alpha grid as one trajectory from the
pretrained model to the plain run, and the paired differences from plain across seeds."""
import pytest

from experiments.elephants import real_report as R

PRE = {"milton": 5.0, "chat": 4.0, "prose": 3.0, "kl": 0.0, "quiz_acc": 0.8, "capital_nll": 2.5, "quiz_items": 4}


def run(seed, arm, strength, curve):
  """A record as real.run writes it; ``curve``: (Milton, chat, prose, KL) after 20 and 40 steps."""
  points = [{"step": 20 * (i + 1), "milton": m, "chat": c, "prose": p, "kl": k} for i, (m, c, p, k) in enumerate(curve)]
  return {"seed": seed, "arm": arm, "strength": strength, "pretrained": PRE, "curve": points,
          "final": {**points[-1], "quiz_acc": 0.7, "capital_nll": 3.0, "quiz_items": 4}}


def test_matched_learning_interpolates_along_each_trajectory():
  runs = [run(0, "plain", 0.0, [(4.4, 4.1, 3.2, 0.2), (4.2, 4.2, 3.4, 0.4)]),
          run(0, "wva", 10.0, [(4.6, 4.0, 3.05, 0.05), (4.3, 4.0, 3.15, 0.1)]),   # crosses 4.4 between 20 and 40
          run(0, "wva", 100.0, [(4.8, 4.0, 3.0, 0.01), (4.7, 4.0, 3.0, 0.02)])]  # never reaches it
  assert R.target(runs, 0) == 4.4
  m = R.matched(runs)
  w = (4.6 - 4.4) / (4.6 - 4.3)   # 2/3 of the way from step 20 to step 40
  assert m[(0, "wva", 10.0)]["step"] == pytest.approx(20 + 20 * w)
  assert m[(0, "wva", 10.0)]["prose"] == pytest.approx(3.05 + w * 0.10)
  assert m[(0, "wva", 10.0)]["kl"] == pytest.approx(0.05 + w * 0.05)
  assert m[(0, "plain", 0.0)]["kl"] == pytest.approx(0.2)   # plain reaches its own target at its first point
  assert m[(0, "wva", 100.0)] is None
  assert "not reached" in R.matched_table(runs)


def test_wise_ft_grid_is_one_trajectory_from_pretrained_to_plain():
  plain = run(0, "plain", 0.0, [(4.5, 4.1, 3.2, 0.2), (4.0, 4.2, 3.6, 0.6)])
  wise = [{**run(0, "wise", a, [(m, 4.0, p, k)]), "curve": [{"step": 40, "milton": m, "chat": 4.0, "prose": p,
                                                             "kl": k}]}
          for a, m, p, k in ((0.25, 4.8, 3.0, 0.05), (0.5, 4.6, 3.1, 0.1), (0.75, 4.3, 3.3, 0.3))]
  runs = [plain] + wise
  traj = R.trajectory(wise[0], runs)
  assert [t["step"] for t in traj] == [0, 0.25, 0.5, 0.75, 1.0]
  got = R.matched(runs)[(0, "wise", None)]
  w = (4.6 - 4.5) / (4.6 - 4.3)   # target 4.5: between alpha 0.5 and 0.75
  assert got["step"] == pytest.approx(0.5 + 0.25 * w)
  assert got["prose"] == pytest.approx(3.1 + w * 0.2)
  assert R.matched_table(runs).count("WiSE-FT (alpha grid)") == 1


def test_paired_differences_from_plain_over_seeds():
  runs = []
  for seed, gap in ((0, 0.1), (1, 0.2), (2, 0.3)):
    runs.append(run(seed, "plain", 0.0, [(4.4, 4.1, 3.2, 0.2 + gap), (4.2, 4.2, 3.4, 0.4)]))
    runs.append(run(seed, "wva", 1.0, [(4.4, 4.0, 3.1, 0.2), (4.3, 4.0, 3.2, 0.3)]))
  table = R.paired(runs)
  row = next(line for line in table.splitlines() if "WVA-Fisher lambda=1 | kl" in line)
  assert "-0.200 [" in row and "3 of 3" in row   # KL differences -0.1, -0.2, -0.3: mean -0.2, ahead on every seed
