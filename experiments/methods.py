"""A method = optimizer + consolidation + importance estimator, built from wva_jax.

``Method`` is a frozen (hashable) description, so it can be a static argument
of the jitted runner; ``build_optimizer(method, strength)`` is called inside
the vmapped program with ``strength`` a traced per-run scalar, so one compiled
program trains a whole lambda grid.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

import wva_jax as wj

OPTIMIZERS = ("sgd", "adam")
CONSOLIDATIONS = ("none", "wva", "ewc", "implicit_ewc")
PLACEMENTS = ("increments", "gradients")
IMPORTANCES = ("fisher_empirical", "fisher_sampled", "mas", "sig", "si")
DEFAULT_LR = {"sgd": 0.2, "adam": 1e-3}  # the seed's TF runs


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
                           ("viscosity", ("hyperbolic", "exponential")),
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

  def label(self) -> str:
    opt = self.optimizer.upper() if self.optimizer == "sgd" else "Adam"
    # Adam's variants, as ", moments reset, eps 1e-20" (empty for the study's Adam).
    variant = (", moments reset" if self.reset_moments else "") + (
        f", eps {self.adam_eps:g}" if self.adam_eps is not None else "")
    if not self.protected:
      return opt + (f" ({variant[2:]})" if variant else "")
    imp = {"fisher_empirical": "Fisher", "fisher_sampled": "Fisher(sampled)",
           "mas": "MAS", "sig": "SIG", "si": "SI"}[self.importance]
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


def build_optimizer(method: Method, strength) -> optax.GradientTransformation:
  """The optax chain of ``method``; ``strength`` may be a traced scalar."""
  if method.optimizer == "sgd":
    base = optax.sgd(method.lr)
  else:
    base = optax.adam(method.lr, **({} if method.adam_eps is None else {"eps": method.adam_eps}))
  if method.consolidation == "none":
    tx = base
  elif method.consolidation == "wva":
    att = wj.wva_scale(None, strength, viscosity=method.viscosity)
    tx = optax.chain(base, att) if method.placement == "increments" else optax.chain(att, base)
  elif method.consolidation == "ewc":
    tx = optax.chain(wj.add_ewc(None, None, strength), base)
  else:
    # lambda is measured against the SGD step; with Adam it absorbs the step.
    eta = method.lr if method.optimizer == "sgd" else 1.0
    tx = optax.chain(base, wj.implicit_ewc(None, None, strength, learning_rate=eta))
  if method.importance == "si":
    # Outermost, so SI sees the raw task-loss gradient and the applied increment.
    tx = wj.importance.path_integral(tx)
  return tx


def reset_moments(opt_state):
  """Every Adam count and moment in ``opt_state`` back to its initial zeros."""
  is_adam = lambda s: isinstance(s, optax.ScaleByAdamState)
  return jax.tree_util.tree_map(
      lambda s: jax.tree_util.tree_map(jnp.zeros_like, s) if is_adam(s) else s,
      opt_state, is_leaf=is_adam)


def task_importance(method: Method, apply_fn, params, opt_state, inputs, targets, key):
  """One task's importance on its closing set (SI: from the optimizer state)."""
  imp = wj.importance
  if method.importance == "fisher_empirical":
    return imp.fisher(apply_fn, params, inputs, targets, mode="empirical")
  if method.importance == "fisher_sampled":
    return imp.fisher(apply_fn, params, inputs, mode="sampled", key=key)
  if method.importance == "mas":
    # On probabilities, as the seed's MAS (softmax outputs).
    return imp.mas(lambda p, x: jax.nn.softmax(apply_fn(p, x)), params, inputs)
  if method.importance == "sig":
    return imp.sig(apply_fn, params, inputs)
  return imp.si(opt_state, params)


def consolidate(method: Method, opt_state, params, total, new):
  """Adds a task's importance to the running total and swaps it into the state."""
  if method.normalize is not None:
    new = wj.importance.normalize(new, by=method.normalize)
  total = wj.importance.accumulate(total, new)
  opt_state = wj.set_importance(opt_state, total)
  if method.consolidation in ("ewc", "implicit_ewc"):
    opt_state = wj.set_anchor(opt_state, params)
  if method.importance == "si":
    opt_state = wj.importance.restart_path(opt_state, params)
  return opt_state, total


def zeros_like_params(params):
  return jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
