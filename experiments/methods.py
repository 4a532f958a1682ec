"""A method = optimizer + consolidation + importance estimator: its description.

``Method`` is a frozen (hashable) description, so it can be a static argument
of the jitted runner; ``experiments.optim.build_optimizer(method, strength)``
turns it into an optax chain inside the vmapped program, with ``strength`` a
traced per-run scalar, so one compiled program trains a whole lambda grid.
This module loads no JAX: the configs and the report import it.
"""
from __future__ import annotations

import dataclasses

OPTIMIZERS = ("sgd", "adam", "mofo")  # mofo: wj.mofo, Adam moving only the top-momentum coordinates
CONSOLIDATIONS = ("none", "wva", "ewc", "implicit_ewc")
PLACEMENTS = ("increments", "gradients")
VISCOSITIES = ("hyperbolic", "exponential")
# sig_seed, mas_batch: the seed author's SIG (bias signal after the activation) and
# MAS (absolute value of the batch gradient), experiments/author_importance.py.
# fisher_reversed: EWC-DR's logits reversal (fisher(mode='reversed')); fisher_online: the
# empirical Fisher of the training batches, accumulated during the task's training
# (grad_and_fisher + fisher_accumulator) instead of a separate pass over the closing set.
IMPORTANCES = ("fisher_empirical", "fisher_sampled", "mas", "sig", "si", "sig_seed", "mas_batch",
               "fisher_reversed", "fisher_online")
DEFAULT_LR = {"sgd": 0.2, "adam": 1e-3, "mofo": 1e-3}  # the seed's TF runs (MoFO: Adam's)


@dataclasses.dataclass(frozen=True)
class Method:
  """How one arm trains; every field is a plain value (JSON-able, hashable)."""
  optimizer: str = "sgd"
  learning_rate: float | None = None  # None: the seed's value for the optimizer
  consolidation: str = "none"
  placement: str = "increments"       # WVA only: after or before the optimizer
  viscosity: str = "hyperbolic"
  importance: str = "fisher_empirical"
  normalize: str | None = None        # None (the seed: raw sums) or 'mean'/'max'
  # Adam only: its count and moments back to zero at the start of every task, so
  # nothing of the previous task's gradient scale carries over (importance and
  # anchor are kept).
  reset_moments: bool = False
  adam_eps: float | None = None  # None: optax's 1e-8, added to sqrt(v) in Adam's denominator

  def __post_init__(self):
    for field, choices in (("optimizer", OPTIMIZERS), ("consolidation", CONSOLIDATIONS),
                           ("placement", PLACEMENTS), ("importance", IMPORTANCES),
                           ("viscosity", VISCOSITIES),
                           ("normalize", (None, "mean", "max"))):
      if getattr(self, field) not in choices:
        raise ValueError(f"{field} must be one of {choices}, got {getattr(self, field)!r}")
    if self.reset_moments and self.optimizer != "adam":
      raise ValueError(f"reset_moments needs optimizer='adam' (the moments it resets), "
                       f"got optimizer={self.optimizer!r}")
    if self.adam_eps is not None and (self.optimizer != "adam" or not self.adam_eps > 0):
      raise ValueError(f"adam_eps needs optimizer='adam' and a value > 0, got "
                       f"adam_eps={self.adam_eps!r} with optimizer={self.optimizer!r}")

  @property
  def lr(self) -> float:
    return DEFAULT_LR[self.optimizer] if self.learning_rate is None else self.learning_rate

  @property
  def protected(self) -> bool:
    return self.consolidation != "none"

  @property
  def tuned(self) -> bool:
    """Has a grid to select on: a consolidation's lambda, or MoFO's update fraction."""
    return self.protected or self.optimizer == "mofo"

  def label(self) -> str:
    opt = {"sgd": "SGD", "adam": "Adam", "mofo": "MoFO"}[self.optimizer]
    # Adam's variants, as ", moments reset, eps 1e-20" (empty for the study's Adam).
    variant = (", moments reset" if self.reset_moments else "") + (
        f", eps {self.adam_eps:g}" if self.adam_eps is not None else "")
    if not self.protected:
      return opt + (f" ({variant[2:]})" if variant else "")
    imp = {"fisher_empirical": "Fisher", "fisher_sampled": "Fisher(sampled)",
           "mas": "MAS", "sig": "SIG", "si": "SI", "sig_seed": "SIG(author)",
           "mas_batch": "MAS(batch)", "fisher_reversed": "Fisher(reversed)",
           "fisher_online": "Fisher(online)"}[self.importance]
    if self.consolidation == "wva":
      where = "grads" if self.placement == "gradients" else "incr"
      visc = "" if self.viscosity == "hyperbolic" else ", exp"
      return f"WVA-{imp} ({opt}-{where}{visc}{variant})"
    return f"{'EWC' if self.consolidation == 'ewc' else 'implicit EWC'}-{imp} ({opt}{variant})"

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    # Runs are keyed by this dict: a field added later is left out at its
    # default, so the runs made before it existed keep their keys.
    for field, default in (("reset_moments", False), ("adam_eps", None)):
      if d[field] == default:
        del d[field]
    return d
