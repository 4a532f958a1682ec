"""The experiments' optimizers, built from wva_jax: one factory for all of them.

``make_optimizer`` is the only place an experiment turns (optimizer,
consolidation, strength) into an optax chain: the study's ``Method``s
(``build_optimizer``), the elephants fine-tuning (``elephants/train.py``) and
its memory measurements (``elephants/memory.py``) all call it, so "WVA with
Adam" is the same chain everywhere. The rest of this module is the study's
per-task steps on that chain's state: importance, consolidation, moment reset.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

import wva_jax as wj
from experiments.methods import CONSOLIDATIONS, OPTIMIZERS, PLACEMENTS, Method


def make_optimizer(optimizer: str, learning_rate: float, consolidation: str = "none",
                   strength=1.0, *, placement: str = "increments",
                   viscosity: str = "hyperbolic", importance_dtype=None,
                   adam_eps: float | None = None) -> optax.GradientTransformation:
  """An optimizer with a consolidation; importance and anchor are set into its state later.

  * ``none``: the optimizer alone (``optax.sgd`` or ``optax.adam``).
  * ``wva``: ``chain(optimizer, wva_scale)``: the increments times
    ``1/(1+lambda*imp)`` (or ``exp(-lambda*imp)``); with
    ``placement='gradients'``, ``chain(wva_scale, optimizer)`` (cancelled by
    Adam's normalisation: kept for the study's AB test).
  * ``ewc``: ``chain(add_ewc, optimizer)``: the optimizer sees
    ``g + lambda*imp*(theta - anchor)``.
  * ``implicit_ewc``: ``chain(optimizer, implicit_ewc)``: the proximal EWC step.
    ``lambda`` is measured against the SGD step (``learning_rate``); with Adam
    it absorbs the step (``implicit_ewc``'s learning rate 1).

  Args:
    optimizer: ``'sgd'`` or ``'adam'``.
    learning_rate: the optimizer's learning rate.
    consolidation: ``'none'``, ``'wva'``, ``'ewc'`` or ``'implicit_ewc'``.
    strength: ``lambda``; may be a traced scalar (one program for a lambda grid).
    placement: WVA only: ``'increments'`` (after the optimizer) or ``'gradients'``.
    viscosity: WVA only: ``'hyperbolic'`` or ``'exponential'``.
    importance_dtype: storage dtype of the importance (None: float32).
    adam_eps: Adam's eps (None: optax's default).

  Returns:
    The ``optax.GradientTransformation``.
  """
  if optimizer not in OPTIMIZERS:
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
  if consolidation not in CONSOLIDATIONS:
    raise ValueError(f"consolidation must be one of {CONSOLIDATIONS}, got {consolidation!r}")
  if placement not in PLACEMENTS:
    raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
  if optimizer == "sgd":
    base = optax.sgd(learning_rate)
  elif optimizer == "mofo":
    # unprotected MoFO's strength is its update fraction (traced: one program per grid)
    base = wj.mofo(learning_rate, fraction=strength if consolidation == "none" else 0.15)
  else:
    base = optax.adam(learning_rate, **({} if adam_eps is None else {"eps": adam_eps}))
  if consolidation == "none":
    return base
  if consolidation == "wva":
    att = wj.wva_scale(None, strength, viscosity=viscosity, importance_dtype=importance_dtype)
    return optax.chain(base, att) if placement == "increments" else optax.chain(att, base)
  if consolidation == "ewc":
    return optax.chain(wj.add_ewc(None, None, strength, importance_dtype=importance_dtype), base)
  eta = learning_rate if optimizer == "sgd" else 1.0
  return optax.chain(base, wj.implicit_ewc(None, None, strength, learning_rate=eta,
                                           importance_dtype=importance_dtype))


def build_optimizer(method: Method, strength) -> optax.GradientTransformation:
  """The optax chain of ``method``; ``strength`` may be a traced scalar."""
  tx = make_optimizer(method.optimizer, method.lr, method.consolidation, strength,
                      placement=method.placement, viscosity=method.viscosity,
                      adam_eps=method.adam_eps)
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
  if method.importance == "fisher_reversed":
    return imp.fisher(apply_fn, params, inputs, targets, mode="reversed")
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
