r"""wva-jax inside tunix's ``PeftTrainer``: consolidation between tasks, its metrics in tunix's own logger.

``from wva_jax import tunix as wjt`` (needs the ``llm`` extra; ``import
wva_jax`` alone never imports tunix):

* :func:`consolidate` puts an importance (and, for EWC, the anchor) into
  ``trainer.optimizer`` before a new task, unless the trainer resumed from
  a checkpoint that already holds them;
* :class:`ConsolidationMetrics` is a ``tunix.sft.hooks.TrainingHooks`` that
  logs :func:`wva_jax.training_metrics` through ``trainer.metrics_logger``
  (so ``PeftTrainer(..., TrainingConfig(metrics_logging_options=
  MetricsLoggerOptions(log_dir=...)))`` writes them to TensorBoard beside
  the loss), every ``every`` steps, with importance quantiles only if asked
  (they sort every importance value).

Alignment: tunix writes step ``k``'s loss one step late, after update
``k + 1`` has run, and calls the hooks' ``on_train_step_end(trainer, k,
loss)`` then; reading the optimizer there would describe the state one
update ahead. The hook measures in ``on_train_step_start`` (before update
``k + 1``, the state update ``k`` made), keeps the values on the device and
logs them at step ``k`` with the loss of that update. The last step is
measured in ``on_train_end``; tunix logs it in ``close()``, before it closes
its logger.

Example (docs/tunix.rst has the whole run)::

    from wva_jax import tunix as wjt
    trainer = peft_trainer.PeftTrainer(model, wj.wva_adam(1e-4, None, 10.0), config)
    wjt.consolidate(trainer, importance)           # the old task's (normalised) importance
    trainer.with_training_hooks(wjt.ConsolidationMetrics(strength=10.0, every=10))
    trainer.train(new_task)
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from tunix.sft import hooks as _hooks  # type: ignore[import-untyped]

from wva_jax.lora import lora_importance
from wva_jax.monitor import training_metrics
from wva_jax.state import set_anchor, set_importance

__all__ = ["consolidate", "ConsolidationMetrics", "trained_params"]


def trained_params(model: nnx.Module) -> nnx.State:
  """What the trainer updates: the LoRA adapters if the model has any (qwix or ``nnx.LoRA``), else the params."""
  lora = nnx.state(model, nnx.LoRAParam)
  return lora if jax.tree_util.tree_leaves(lora) else nnx.state(model, nnx.Param)


def consolidate(trainer: Any, importance: Any, *, anchor: bool | Any = True, lora_scale: float = 1.0,
                force: bool = False) -> Any:
  r"""Sets ``importance`` (and the anchor) into ``trainer.optimizer`` for the next task; returns ``trainer``.

  Full fine-tuning: ``importance`` is shaped like the model's ``nnx.Param``
  state (matched by path); the anchor, for EWC's pull, is the model's
  current params (``anchor=True``), a tree of your own, or none
  (``False``). A model with LoRA adapters: ``importance`` is the frozen base
  kernels', paired with each adapter by :func:`wva_jax.lora_importance`
  (``lora_scale``: qwix's ``alpha / rank``); no anchor (LoRA's is ``A B =
  0``). A trainer that restored a checkpoint (``trainer.train_steps > 0``)
  already holds both in its optimizer state and is left as it is unless
  ``force``.

  Raises:
    ValueError: the optimizer holds no consolidation state to set (plain
      Adam: build it with ``wj.wva_adam(lr, None, strength)`` and the like).
  """
  if trainer.train_steps > 0 and not force:
    return trainer
  lora = nnx.state(trainer.model, nnx.LoRAParam)
  if jax.tree_util.tree_leaves(lora):
    trainer.optimizer = set_importance(trainer.optimizer, lora_importance(lora, importance, scale=lora_scale))
    return trainer
  trainer.optimizer = set_importance(trainer.optimizer, importance)
  if anchor is not False:
    try:
      trainer.optimizer = set_anchor(trainer.optimizer, nnx.state(trainer.model, nnx.Param) if anchor is True
                                     else anchor)
    except ValueError as e:   # no EWC state: WVA has no anchor
      if "contains no" not in str(e):
        raise
  return trainer


class ConsolidationMetrics(_hooks.TrainingHooks):
  r""":func:`wva_jax.training_metrics` every ``every`` steps, through ``trainer.metrics_logger``.

  Logged as ``<prefix>/train/<kind>/<name>`` (tunix's naming: prefix, mode,
  metric) at the step of the loss they go with (module docstring).
  ``history`` keeps ``(step, {name: value})`` for the caller.

  Args:
    strength: :math:`\lambda` of the transforms, for the attenuation and the
      penalty (``None``: the metrics that need none).
    every: log every ``every``-th step (>= 1).
    quantiles: importance quantiles (each in [0, 1]); ``()`` by default: they
      sort a float32 copy of every importance value.
    prefix: the metrics prefix in tunix's logger.
    viscosity: WVA's (``'hyperbolic'`` or ``'exponential'``).
  """

  def __init__(self, strength: Any = None, *, every: int = 10, quantiles: Sequence[float] = (),
               prefix: str = "consolidation", viscosity: str = "hyperbolic"):
    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
      raise ValueError(f"every must be an int >= 1, got {every!r}")
    bad = [q for q in quantiles if not 0.0 <= float(q) <= 1.0]
    if bad:
      raise ValueError(f"quantiles must lie in [0, 1], got {bad[0]!r}")
    self.strength, self.every, self.quantiles = strength, every, tuple(quantiles)
    self.prefix, self.viscosity = prefix, viscosity
    self.history: list[tuple[int, dict[str, float]]] = []
    self._pending: dict[int, dict[str, jax.Array]] = {}

  def _measure(self, trainer: Any) -> None:
    step = int(trainer.train_steps)
    if step > 0 and step % self.every == 0 and step not in self._pending:
      self._pending[step] = training_metrics(trainer.optimizer, trained_params(trainer.model),
                                             strength=self.strength, viscosity=self.viscosity,
                                             quantiles=self.quantiles)

  def on_train_start(self, train_ctx: Any) -> None:
    self._pending.clear()

  def on_train_step_start(self, train_ctx: Any) -> None:
    self._measure(train_ctx)

  def on_train_step_end(self, train_ctx: Any, train_step: int, train_loss: Any) -> None:
    metrics = self._pending.pop(int(train_step), None)
    if metrics is None:
      return
    values = {k: float(np.asarray(v)) for k, v in metrics.items()}
    for name, value in values.items():
      train_ctx.metrics_logger.log(self.prefix, name, value, "train", int(train_step))
    self.history.append((int(train_step), values))

  def on_train_end(self, train_ctx: Any) -> None:
    self._measure(train_ctx)   # the last step: tunix logs it from close(), which follows

  def on_eval_step_start(self, train_ctx: Any) -> None:
    pass

  def on_eval_step_end(self, train_ctx: Any, eval_loss: Any) -> None:
    pass
