"""The scenario's LoRA arms: rank-``r`` adapters on the blocks' dense kernels, the rest frozen.

Every ``nnx.Linear`` kernel ``W [d_in, d_out]`` inside the transformer blocks
(``qkv``, ``out``, ``up``, ``down``) gets ``A [d_in, r]``, ``B [r, d_out]``;
the model runs with ``W + A @ B`` (``wva_jax.lora``'s convention). ``A`` is
drawn from ``N(0, 1/d_in)`` and ``B`` starts at zero, so fine-tuning starts
at the pretrained model (Hu et al. 2021, with LoRA's ``alpha / r`` folded
into the learning rate). Embeddings, LayerNorms, biases and the head stay
frozen: only the adapters train.

Methods (``LORA_METHODS``):

* ``lora``: Adam on the adapters.
* ``lora_ewc``: ``chain(wj.add_lora_ewc(F), adam)``: EWC on the effective
  update, ``lambda/2 * sum F * (A B)^2``, ``F`` the frozen base kernels'
  importance (the same mean-normalised importance the full-weight arms use).
* ``lora_wva``: ``chain(adam, wj.lora_wva_scale(F))``: Adam's adapter
  increments times ``1/(1 + lambda * Omega)``, ``Omega`` the importance
  pulled back to ``A`` and ``B``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

import wva_jax as wj

LORA_METHODS = ("lora", "lora_ewc", "lora_wva", "lora_mofo")
RANK = 8
# Adam's learning rate for the adapters: the one of 1e-3, 3e-3, 1e-2, 3e-2 that gives plain
# LoRA the lowest ppl B on seed 0 (`python -m experiments.elephants lora_lr`, results/lora_lr.md).
LR = 1e-2


def _plain(path) -> tuple:
  """A key path as plain keys, without nnx's trailing ``'value'``."""
  keys = tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)
  return keys[:-1] if keys and keys[-1] == "value" else keys


def adapted_kernels(params) -> list[tuple]:
  """Key paths (plain keys) of the kernels that get adapters: 2-D ``kernel`` leaves under ``blocks``."""
  return [_plain(p) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
          if _plain(p)[0] == "blocks" and _plain(p)[-1] == "kernel" and x.ndim == 2]


def init_adapters(params, key: jax.Array, rank: int = RANK) -> dict:
  """``{'blocks': {i: {'attn': {'qkv': {'A', 'B'}, ...}, ...}}}``: one pair per adapted kernel."""
  if rank < 1:
    raise ValueError(f"rank must be >= 1, got {rank}")
  kernels = {_plain(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  paths = adapted_kernels(params)
  out: dict = {}
  for k, path in zip(jax.random.split(key, len(paths)), paths):
    d_in, d_out = kernels[path].shape
    node = out
    for name in path[:-2]:
      node = node.setdefault(name, {})
    node[path[-2]] = {"A": jax.random.normal(k, (d_in, rank), jnp.float32) / jnp.sqrt(d_in),
                      "B": jnp.zeros((rank, d_out), jnp.float32)}
  return out


def merge(params, adapters: dict):
  """``params`` with ``W + A @ B`` at every adapted kernel (a new tree; ``params`` untouched)."""
  def add(path, w):
    p = _plain(path)
    if p[-1] != "kernel":
      return w
    node = adapters
    for name in p[:-1]:
      if not isinstance(node, dict) or name not in node:
        return w
      node = node[name]
    return w + (node["A"] @ node["B"]).astype(w.dtype)
  return jax.tree_util.tree_map_with_path(add, params)


def make_tx(method: str, strength, lr: float, importance) -> optax.GradientTransformation:
  """The adapters' optimizer; ``importance`` is :func:`wva_jax.lora_importance`'s tree (unused by ``lora``)."""
  if method == "lora":
    return optax.adam(lr)
  if method == "lora_ewc":
    return optax.chain(wj.add_lora_ewc(importance, strength), optax.adam(lr))
  if method == "lora_mofo":  # MoFO on the adapters: strength is the fraction each leaf moves
    return wj.mofo(lr, fraction=strength)
  if method == "lora_wva":
    return optax.chain(optax.adam(lr), wj.lora_wva_scale(importance, strength))
  raise ValueError(f"method must be one of {LORA_METHODS}, got {method!r}")
