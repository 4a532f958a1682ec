"""Importance estimators: how much each parameter matters for what the model knows.

Each returns a float32 pytree shaped like ``params``.
"""
from wva_jax.importance._engine import FallbackWarning, engine_report
from wva_jax.importance._independence import PROBE_EVERY
from wva_jax.importance.combine import accumulate, decay, normalize
from wva_jax.importance.fisher import IGNORE_INDEX, fisher
from wva_jax.importance.grad_fisher import (
  FisherAccumulator,
  FisherAccumulatorState,
  fisher_accumulator,
  grad_and_fisher,
  loss_and_fisher,
)
from wva_jax.importance.mas import mas
from wva_jax.importance.si import PathIntegralState, path_integral, restart_path, si
from wva_jax.importance.sig import sig

__all__ = ["fisher", "grad_and_fisher", "loss_and_fisher", "fisher_accumulator", "FisherAccumulator",
           "FisherAccumulatorState", "mas", "sig", "path_integral", "si", "restart_path", "PathIntegralState",
           "accumulate", "decay", "normalize", "engine_report", "FallbackWarning", "PROBE_EVERY",
           "IGNORE_INDEX"]
