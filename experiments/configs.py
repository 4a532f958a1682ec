"""The study's experiments (seed.md's six, plus the README's quickstart).

Every arm is a ``Method`` and a lambda grid. Lambda is selected on
``select_seeds`` (the best mean accuracy after the last task, or after each
``select_at`` task count) and the selected lambda is then run on fresh
``report_seeds``, whose mean and 95% Student-t interval are what the report
states: picking the max over a noisy grid and reporting that same max would
inflate it (protocol.md, "winner's curse").

Project choices (see protocol.md for the seed's):
* each task's importance is divided by its mean before it is added
  (``normalize='mean'``), so one lambda grid fits Fisher, MAS, SIG and SI;
* "Fisher" is the empirical Fisher (true labels, as the seed's PyTorch runs);
  the sampled (true) Fisher of the TF runs is a ``Method`` option, not a study arm;
* MAS is taken on softmax outputs (as the seed) with the absolute value per
  example (the MAS paper), not of the batch gradient.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from experiments.methods import Method
from experiments.protocol import STEPS_PER_TASK, TASKS

# Session 1's grids were 9 lambdas x 3 selection seeds per arm: 1,065 runs,
# 17-41 hours on this 2-core CPU at 50-137 s per full-protocol run. Trimmed
# (session 2) to 5 lambdas x 2 selection seeds, keeping the fresh seeds at 10.
# Checked afterwards on lambda_vs_tasks, which runs 10 fresh seeds at every
# lambda (`python -m experiments report`, results/README.md, "Seed noise against
# lambda steps"): at a fixed lambda the seeds' SD is 0.4-1.6 points, while
# neighbouring lambdas (x3 apart) differ by 3.1-6.6 points, except 10 vs 30
# (0.5): where two lambdas are that close, either is within the noise of the
# best, so two seeds suffice to pick.
# * WVA, hyperbolic: full runs peaked at 10 (SGD) and 30 (Adam) of 0.03..300.
# * WVA, exponential: exp(-lambda*imp) matches 1/(1+lambda'*imp) at
#   lambda = ln(1+lambda'*imp)/imp, about 10x below lambda' at imp ~ 5 (the
#   summed mean-normalised importance after 5 tasks), so the grid sits 10x lower.
# * explicit EWC with SGD (lr 0.2) diverges once lr*lambda*max(imp) > 2, at
#   lambda ~0.03 in quick scans, so its grid stops below that; with Adam the
#   quick scans peaked at the low end of 0.01..100, so it reaches lower.
# * implicit EWC is explicit EWC below the divergence and stable above it.
# Runs are keyed by (config, seed, lambda) and pooled across experiments
# (study.experiment_records), so an arm shared by experiments runs once.
GRID = (1.0, 3.0, 10.0, 30.0, 100.0)
EXP_GRID = (0.1, 0.3, 1.0, 3.0, 10.0)
EWC_GRID = (0.0003, 0.001, 0.003, 0.01, 0.02)
IMPLICIT_GRID = (0.003, 0.01, 0.03, 0.1, 0.3)
EWC_ADAM_GRID = (0.0003, 0.001, 0.003, 0.01, 0.03)
SELECT_SEEDS = (0, 1)
REPORT_SEEDS = tuple(range(100, 110))


@dataclasses.dataclass(frozen=True)
class Arm:
  name: str
  method: Method
  lambdas: Sequence[float] = (0.0,)


@dataclasses.dataclass(frozen=True)
class Experiment:
  name: str
  question: str
  arms: Sequence[Arm]
  stream: str = "permuted"
  tasks: int = TASKS
  steps_per_task: int = STEPS_PER_TASK
  select_seeds: Sequence[int] = SELECT_SEEDS
  report_seeds: Sequence[int] = REPORT_SEEDS
  select_at: Sequence[int] | None = None  # task counts to select lambda for; None: last
  report_grid: bool = False  # fresh seeds at every lambda (accuracy-vs-lambda curves with CIs)
  # Arm pairs (names) whose difference answers the question: the report gives
  # it paired over the fresh seeds (same init and batch order in both arms).
  compare: Sequence[tuple[str, str]] = ()
  data_seed: int = 0
  # False: reported in results/README.md, but not part of the study's plan, cost
  # and README headline (issue 13's replicate and seed_author: another protocol).
  in_study: bool = True

  def quick(self) -> Experiment:
    """A small version that runs the whole pipeline in about a minute or two."""
    arms = [dataclasses.replace(a, lambdas=_thin(a.lambdas)) for a in self.arms]
    tasks = min(self.tasks, 3)
    at = None if self.select_at is None else tuple(k for k in self.select_at if k <= tasks)
    # Three fresh seeds: the same batch size as the 3-lambda selection batch, so
    # the report phase reuses its compiled program (compiles dominate here).
    return dataclasses.replace(self, arms=tuple(arms), tasks=tasks, steps_per_task=150,
                               select_seeds=(0,), report_seeds=(100, 101, 102), select_at=at)


def _thin(grid):
  """Three lambdas spread over the grid (or the grid itself if shorter)."""
  if len(grid) <= 3:
    return tuple(grid)
  return (grid[1], grid[len(grid) // 2], grid[-2])


def wva(opt="sgd", importance="fisher_empirical", placement="increments",
        viscosity="hyperbolic") -> Method:
  return Method(optimizer=opt, consolidation="wva", importance=importance,
                placement=placement, viscosity=viscosity, normalize="mean")


def ewc(opt="sgd", importance="fisher_empirical", implicit=False) -> Method:
  return Method(optimizer=opt, consolidation="implicit_ewc" if implicit else "ewc",
                importance=importance, normalize="mean")


def _arm(method: Method, grid=None) -> Arm:
  if grid is None:
    grid = EXP_GRID if method.viscosity == "exponential" else GRID
  return Arm(method.label(), method, tuple(grid) if method.protected else (0.0,))


def _pairs(*pairs) -> tuple:
  """(method A, method B) pairs -> their arm names."""
  return tuple((a.label(), b.label()) for a, b in pairs)


SGD, ADAM = Method("sgd"), Method("adam")
ADAM_RESET = Method("adam", reset_moments=True)
ADAM_RESET_EPS = Method("adam", reset_moments=True, adam_eps=1e-20)


def _wva_grads_like(adam: Method) -> Method:
  """WVA on the gradients before ``adam`` (same moment reset and eps)."""
  return dataclasses.replace(wva("adam", placement="gradients"),
                             reset_moments=adam.reset_moments, adam_eps=adam.adam_eps)


def _arm100(method: Method) -> Arm:
  return Arm(method.label(), method, (100.0,))


# The sampled ("true") Fisher of the seed's TF runs is available as a method but
# left out of the study's grids to save 40 runs; empirical Fisher is the reference.
IMPORTANCES = ("fisher_empirical", "mas", "sig", "si")

EXPERIMENTS = {e.name: e for e in [
    Experiment(
        "methods", "Mean accuracy over 10 permuted-MNIST tasks, per method (seed exp. 1).",
        [_arm(SGD), _arm(ADAM), _arm(wva("sgd")), _arm(wva("adam")),
         _arm(ewc("sgd"), EWC_GRID), _arm(ewc("adam"), EWC_ADAM_GRID),
         _arm(ewc("sgd", implicit=True), IMPLICIT_GRID)],
        compare=_pairs((wva("sgd"), SGD), (wva("sgd"), ewc("sgd")),
                       (wva("sgd"), ewc("sgd", implicit=True)),
                       (ewc("sgd", implicit=True), ewc("sgd")), (wva("adam"), ADAM),
                       (wva("adam"), ewc("adam")))),
    Experiment(
        "aa_sgd", "WVA on gradients or on increments with SGD (no momentum): an AA test "
        "(the two are the same update; seed exp. 2).",
        [_arm(wva("sgd", placement="gradients")), _arm(wva("sgd", placement="increments"))],
        compare=_pairs((wva("sgd", placement="gradients"), wva("sgd")))),
    Experiment(
        "ab_adam", "SGD vs Adam-increments vs Adam-gradients (seed exp. 3).",
        [_arm(SGD), _arm(ADAM), _arm(wva("sgd")), _arm(wva("adam", placement="increments")),
         _arm(wva("adam", placement="gradients"))],
        compare=_pairs((wva("adam"), wva("adam", placement="gradients")),
                       (wva("adam", placement="gradients"), ADAM), (wva("adam"), wva("sgd")))),
    # The EWC arms are methods' (their runs are shared, none trains again): added
    # in session 3, after exponential WVA came out ahead of hyperbolic, to pair it
    # with EWC on the same fresh seeds.
    Experiment(
        "viscosity", "Hyperbolic 1/(1+lambda*imp) vs exponential exp(-lambda*imp) WVA, "
        "for SGD and Adam (seed exp. 4), and each against EWC.",
        [_arm(wva(o, viscosity=v)) for o in ("sgd", "adam")
         for v in ("hyperbolic", "exponential")]
        + [_arm(ewc("sgd"), EWC_GRID), _arm(ewc("adam"), EWC_ADAM_GRID)],
        compare=_pairs(*[(wva(o), wva(o, viscosity="exponential")) for o in ("sgd", "adam")],
                       *[(wva(o, viscosity="exponential"), ewc(o)) for o in ("sgd", "adam")])),
    Experiment(
        "lambda_vs_tasks", "Does the best lambda depend on the number of tasks (2..10)? "
        "WVA-Fisher with SGD (seed exp. 5).",
        [_arm(SGD), _arm(wva("sgd"))], select_at=tuple(range(2, 11)), report_grid=True,
        compare=_pairs((wva("sgd"), SGD))),
    Experiment(
        "importance", "Fisher vs MAS vs SIG vs SI importance, for WVA and for EWC (SGD; "
        "seed exp. 6).",
        [_arm(SGD)] + [_arm(wva("sgd", i)) for i in IMPORTANCES]
        + [_arm(ewc("sgd", i), EWC_GRID) for i in IMPORTANCES],
        compare=_pairs(*[(c("sgd", "fisher_empirical"), c("sgd", i))
                         for c in (wva, ewc) for i in IMPORTANCES[1:]],
                       *[(wva("sgd", i), ewc("sgd", i)) for i in IMPORTANCES])),
    # Added in session 4, after the study: exponential WVA beat hyperbolic on every
    # fresh seed (viscosity), so does the importance ranking of seed exp. 6 hold for
    # it too? Its Fisher arm is viscosity's and its EWC arms are importance's (shared).
    Experiment(
        "importance_exponential", "Fisher vs MAS vs SIG vs SI importance for exponential "
        "WVA, each against EWC with the same importance (SGD; extends seed exp. 6).",
        [_arm(wva("sgd", i, viscosity="exponential")) for i in IMPORTANCES]
        + [_arm(ewc("sgd", i), EWC_GRID) for i in IMPORTANCES],
        compare=_pairs(*[(wva("sgd", viscosity="exponential"),
                          wva("sgd", i, viscosity="exponential")) for i in IMPORTANCES[1:]],
                       *[(wva("sgd", i, viscosity="exponential"), ewc("sgd", i))
                         for i in IMPORTANCES])),
    # Added in session 4: README explained Adam-gradients' few points over plain
    # Adam (ab_adam) by Adam's moments lagging the importance, which changes only
    # between tasks. Resetting the moments at each task boundary removes the lag;
    # Adam's eps (added to sqrt(v), which WVA shrinks with the gradients) is the
    # other place the scale survives, so the last pair also makes eps negligible.
    # Under both, the two arms' updates are the same. All at the lambda ab_adam
    # selected for Adam-gradients (100), no selection: 10 fresh runs per new arm.
    Experiment(
        "adam_moments", "Where does Adam-gradients' small protection come from: Adam's "
        "moments lagging the between-task change of importance, or Adam's eps? The same "
        "arms with the moments reset at each task boundary, then also with eps 1e-20 "
        "(extends seed exp. 3).",
        [_arm(ADAM), _arm100(wva("adam", placement="gradients"))]
        + [a for m in (ADAM_RESET, ADAM_RESET_EPS)
           for a in (_arm(m), _arm100(_wva_grads_like(m)))],
        select_seeds=(),
        compare=_pairs((wva("adam", placement="gradients"), ADAM),
                       *[(_wva_grads_like(m), m) for m in (ADAM_RESET, ADAM_RESET_EPS)])),
]}

# Issue 22: what a user would pick instead (MoFO: no importance, no anchor; EWC-DR's
# reversed Fisher) and the Fisher accumulated during the previous task's training
# (no separate pass). The Fisher arms of WVA and EWC are importance's (shared runs);
# MoFO selects its update fraction on the selection seeds like a lambda.
MOFO = Method("mofo")
MOFO_FRACTIONS = (0.005, 0.01, 0.02, 0.05, 0.15, 0.5)
RIVAL_IMPORTANCES = ("fisher_empirical", "fisher_reversed", "fisher_online")
EXPERIMENTS["rivals"] = Experiment(
    "rivals", "MoFO, EWC-DR's reversed Fisher and the Fisher accumulated during training "
    "against WVA and EWC with the separate-pass empirical Fisher (SGD; issue 22).",
    [_arm(SGD), _arm(ADAM), Arm(MOFO.label(), MOFO, MOFO_FRACTIONS)]
    + [_arm(wva("sgd", i)) for i in RIVAL_IMPORTANCES]
    + [_arm(ewc("sgd", i), EWC_GRID) for i in RIVAL_IMPORTANCES],
    compare=_pairs(*[(c("sgd", "fisher_empirical"), c("sgd", i))
                     for c in (wva, ewc) for i in RIVAL_IMPORTANCES[1:]],
                   (wva("sgd"), MOFO), (ewc("sgd"), MOFO), (MOFO, ADAM)))

# The README's main job: one seed each, lambdas fixed (chosen in session 1 by
# quick scans of 5 tasks x 300 steps), fewer steps so it runs in minutes.
QUICKSTART_STEPS = 400
QUICKSTART = Experiment(
    "quickstart", "Plain SGD vs WVA vs EWC (Fisher importance) on 10 permuted-MNIST tasks.",
    [Arm("SGD", SGD), Arm("WVA-Fisher (SGD)", wva("sgd"), (3.0,)),
     Arm("EWC-Fisher (SGD)", ewc("sgd"), (0.003,))],
    steps_per_task=QUICKSTART_STEPS, select_seeds=(), report_seeds=(0,))


# ---------------------------------------------------------------- issue 13
# The seed author's configurations as he ran them (github.com/aakutalev/wva-empirical
# at f8e5dae, TF scripts model_wva*_*.py): raw importance summed over tasks (no
# normalisation), sampled ("true") Fisher, his SIG (bias signal after the
# activation) and his MAS (absolute value of the batch gradient), the placement
# and viscosity of each script. AUTHOR_BEST is the lambda with the best final mean
# accuracy in his result file (`python -m experiments.author_results`,
# results/replicate/author_results.md); each arm's grid is that lambda times
# REPLICATE_STEPS, selected on SELECT_SEEDS and reported on 10 fresh seeds
# (5 lambdas x 2 seeds = 10 runs = the fresh batch: one compiled program per arm).
def author(opt, importance, placement, viscosity="hyperbolic") -> Method:
  return Method(optimizer=opt, consolidation="wva", importance=importance,
                placement=placement, viscosity=viscosity, normalize=None)


REPLICATE_STEPS = (0.5, 0.71, 1.0, 1.41, 2.0)
# (method, the author's result file, his best lambda in it)
AUTHOR_ARMS = (
    (author("sgd", "fisher_sampled", "gradients"), "wvaFIS-sgd-1x-grads.dmp", 36050.0),
    (author("sgd", "sig_seed", "gradients"), "wva-sgd-1x-grads.dmp", 1475.0),
    (author("sgd", "sig_seed", "increments"), "wva-sgd-1x-deltas.dmp", 1650.0),
    (author("sgd", "sig_seed", "gradients", "exponential"), "wva-sgd-exp-grads.dmp", 143.0),
    (author("sgd", "mas_batch", "gradients"), "wvaMAS-sgd-1x-grads.dmp", 101550.0),
    (author("adam", "sig_seed", "increments"), "wva-adam-1x-deltas.dmp", 1285.0),
    (author("adam", "sig_seed", "gradients"), "wva-adam-1x-grads.dmp", 3450.0),
    (author("adam", "fisher_sampled", "increments"), "wvaFIS-adam-1x-deltas.dmp", 90050.0),
    (author("adam", "mas_batch", "increments"), "wvaMAS-adam-1x-deltas.dmp", 170050.0),
)
AUTHOR_FILE = {m.label(): f for m, f, _ in AUTHOR_ARMS}

EXPERIMENTS["replicate"] = Experiment(
    "replicate", "The seed author's configurations as he ran them (raw sampled Fisher, "
    "his SIG and batch-level MAS, no normalisation), each on a grid around his best "
    "lambda, against his published result files (issue 13).",
    [Arm(m.label(), m, tuple(float(round(best * k)) for k in REPLICATE_STEPS))
     for m, _, best in AUTHOR_ARMS], in_study=False)

# Side by side with the author's code run here (benchmarks/seed_author/): our
# runner at his two headline settings and lambdas, no selection, plus our own
# SIG (bias signal before the activation) at his SIG lambda: the swap that
# separates the two SIGs.
EXPERIMENTS["seed_author"] = Experiment(
    "seed_author", "Our runner at the author's settings and lambdas (SGD, WVA on "
    "gradients, hyperbolic): sampled Fisher at 36050, his SIG and ours at 1650 (issue 13).",
    [Arm(author("sgd", "fisher_sampled", "gradients").label(),
         author("sgd", "fisher_sampled", "gradients"), (36050.0,)),
     Arm(author("sgd", "sig_seed", "gradients").label(),
         author("sgd", "sig_seed", "gradients"), (1650.0,)),
     Arm(author("sgd", "sig", "gradients").label(), author("sgd", "sig", "gradients"),
         (1650.0,))],
    select_seeds=(), in_study=False,
    compare=((author("sgd", "sig_seed", "gradients").label(),
              author("sgd", "sig", "gradients").label()),))

# Every run of the study (and of the author) uses ONE draw of the 9 permutations,
# so the draw is a fixed effect no number of seeds averages out. Our runner at the
# author's Fisher setting on other draws (data_seed 1..5; tasks.permutation):
# how far does the level move with the draw alone? (2 seeds per draw, on this CPU)
PERM_DRAWS = (1, 2, 3)
for _d in PERM_DRAWS:
  EXPERIMENTS[f"seed_author_perms{_d}"] = dataclasses.replace(
      EXPERIMENTS["seed_author"], name=f"seed_author_perms{_d}", data_seed=_d,
      arms=EXPERIMENTS["seed_author"].arms[:1], compare=(),
      question=f"Our runner at the author's Fisher setting (lambda 36050) on permutation "
               f"draw {_d} (data_seed {_d}) instead of the study's draw 0 (issue 13).")
