"""The LoRA transforms' state (:class:`LoRAState`), its ``init`` and the factories' argument checks."""
from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp

from wva_jax._checks import check_importance_values, check_scalar_or_schedule, check_tree_arg
from wva_jax._copy import fresh_tree
from wva_jax.lora._adapters import _flatten, _importance_leaves, _importance_tree
from wva_jax.wva import check_storage_dtype, init_count


class LoRAState(NamedTuple):
  """State of :func:`add_lora_ewc` and :func:`lora_wva_scale`: the base kernels' importance and the step count.

  ``importance``: one array per adapter, shaped like its base kernel. It
  lives in the state so :func:`wva_jax.set_importance` (or
  :func:`wva_jax.consolidate`) swaps in a new task's importance without
  recompiling. ``count`` counts the updates (int32) when ``strength`` is a
  schedule, which is evaluated at it; ``None`` otherwise.
  """
  importance: Any
  count: Any = None


def _lora_init(importance, importance_dtype, strength):
  def init_fn(params):
    ad = _flatten(params, "params")
    if importance is None:
      imp = _importance_tree(ad, [jnp.zeros(k, importance_dtype) for k in ad.kshape])
    else:
      _importance_leaves(importance, ad, "kernel_importance")
      # A copy, never the caller's array: a donated state would delete it (wva_jax/_copy.py).
      imp = fresh_tree(importance, importance_dtype)
    return LoRAState(importance=imp, count=init_count(strength))
  return init_fn


def _check_lora_factory(kernel_importance, strength, importance_dtype, factory):
  check_tree_arg(kernel_importance, "kernel_importance", factory)
  check_scalar_or_schedule(strength, "strength")
  importance_dtype = check_storage_dtype(importance_dtype)
  if kernel_importance is not None:
    check_importance_values(kernel_importance, "kernel_importance")
  return importance_dtype
