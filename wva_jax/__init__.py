"""wva-jax: keep old skills while learning new ones, in JAX/Optax.

Importance estimators (``wva_jax.importance``: Fisher, MAS, SIG, SI) say how
much each parameter matters; consolidation transforms (EWC and weight
velocity attenuation, WVA) restrain changes to important parameters.
"""
from wva_jax import importance, metrics, sharding
from wva_jax.ewc import EWCState, add_ewc, ewc_penalty, implicit_ewc
from wva_jax.io import hf_names, importance_metadata, load_importance, save_importance
from wva_jax.lora import (
  LoRAState,
  add_lora_ewc,
  lora_ewc_grad,
  lora_ewc_penalty,
  lora_importance,
  lora_pullback,
  lora_wva_scale,
)
from wva_jax.merge import fisher_merge
from wva_jax.mofo import mofo, scale_by_mofo
from wva_jax.monitor import training_metrics
from wva_jax.state import consolidate, set_anchor, set_importance
from wva_jax.wva import WVAState, attenuation, wva_adam, wva_scale, wva_sgd

__version__ = "0.2.0"

__all__ = ["importance", "metrics", "sharding", "wva_scale", "wva_sgd", "wva_adam", "attenuation", "WVAState",
           "ewc_penalty", "add_ewc", "implicit_ewc", "EWCState", "set_importance", "set_anchor", "consolidate",
           "lora_importance", "lora_ewc_penalty", "lora_ewc_grad", "add_lora_ewc", "lora_pullback",
           "lora_wva_scale", "LoRAState", "save_importance", "load_importance", "importance_metadata",
           "hf_names",
           "fisher_merge", "training_metrics", "mofo", "scale_by_mofo"]
