"""Dispatch of per-example gradient reductions to the fastest correct path.

``gradient_sums`` has the signature of ``_per_example.per_example_sum`` plus an
``engine`` switch: ``'vmap'`` is the chunked ``vmap(vjp)`` reference path;
``'auto'`` picks the fastest available path.
"""
from __future__ import annotations

from wva_jax.importance._per_example import per_example_sum

ENGINES = ("auto", "vmap")


def gradient_sums(apply_fn, params, inputs, cot_fn, extras=None, *, reduce="square",
                  chunk_size=None, engine="auto"):
  if engine not in ENGINES:
    raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
  return per_example_sum(apply_fn, params, inputs, cot_fn, extras, reduce=reduce,
                         chunk_size=chunk_size)
