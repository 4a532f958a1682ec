"""The seed's network as plain pytree functions (cheap to vmap over runs).

MLP 784-300-150-10 with leaky ReLU (slope 0.2, TensorFlow's default in the
seed's TF version) on the hidden layers, both from ``experiments.protocol``;
weights from a normal truncated at two standard deviations with stddev
2/sqrt(fan_in) (TF's ``truncated_normal``), zero biases. Params are a list
of ``{'w': [fan_in, fan_out], 'b': [fan_out]}``.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from experiments.protocol import LAYERS, LEAKY_SLOPE


def init_mlp(key, layers: Sequence[int] = LAYERS):
  """Returns the params of an MLP with the given layer widths."""
  keys = jax.random.split(key, len(layers) - 1)
  params = []
  for k, fan_in, fan_out in zip(keys, layers[:-1], layers[1:]):
    std = 2.0 / jnp.sqrt(float(fan_in))
    w = std * jax.random.truncated_normal(k, -2.0, 2.0, (fan_in, fan_out), jnp.float32)
    params.append({"w": w, "b": jnp.zeros((fan_out,), jnp.float32)})
  return params


def apply_mlp(params, x):
  """Logits ``[B, 10]`` for images ``x`` ``[B, 784]``; each row independent."""
  h = x
  for layer in params[:-1]:
    h = jax.nn.leaky_relu(h @ layer["w"] + layer["b"], LEAKY_SLOPE)
  return h @ params[-1]["w"] + params[-1]["b"]


def num_params(params) -> int:
  return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))
