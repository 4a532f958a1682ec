"""The seed author's SIG and MAS exactly as his TF scripts computed them (issue 13).

The study's own estimators (``wva_jax.importance``) depart from the author's on
purpose; the ``replicate`` experiment needs his:

* ``sig_seed`` (``model_wva_*.py``): a weight ``w_ij`` gets
  ``|w_ij| * mean_b |a_bi|`` (``a`` the layer's input), as ``wva_jax``'s
  ``sig``; a bias ``b_j`` gets ``mean_b |y_bj|`` with ``y`` the layer's output
  *after* its activation (leaky ReLU; softmax on the last layer), where
  ``wva_jax``'s model-agnostic ``sig`` takes the pre-activation ``z`` (its
  docstring says so). On the last layer this is the difference between mean
  softmax probabilities (<= 1) and mean absolute logits (about 10 after a
  task), so ``sig`` gives the output biases far more importance.
* ``mas_batch`` (``model_wvaMAS_*.py``): ``|d/dtheta mean_b sum_k p_bk^2|``, the
  absolute value of the gradient of the batch mean (one batch: the whole
  closing set), where ``wva_jax``'s ``mas`` averages per-example absolute
  gradients (the MAS paper).

Both are written for the study's MLP (``experiments.models``): a list of
``{'w', 'b'}`` layers with leaky ReLU between them. ``logit_bias`` is the
runner's class mask (0 for allowed classes), added to the last layer's ``z``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from experiments.protocol import LEAKY_SLOPE

AUTHOR_IMPORTANCES = ("sig_seed", "mas_batch")


def _layers(params, x, logit_bias=0.0):
  """[(input a, output y after the activation)] per layer; softmax on the last."""
  out, a = [], x
  for i, layer in enumerate(params):
    z = a @ layer["w"] + layer["b"]
    if i == len(params) - 1:
      y = jax.nn.softmax(z + logit_bias, axis=-1)
    else:
      y = jax.nn.leaky_relu(z, LEAKY_SLOPE)
    out.append((a, y))
    a = y
  return out


def sig_seed(params, x, logit_bias=0.0):
  """The author's SIG on the closing set ``x`` [N, 784]."""
  imp = []
  for layer, (a, y) in zip(params, _layers(params, x, logit_bias)):
    imp.append({"w": jnp.abs(layer["w"]) * jnp.mean(jnp.abs(a), axis=0)[:, None],
                "b": jnp.mean(jnp.abs(y), axis=0)})
  return imp


def mas_batch(params, x, logit_bias=0.0):
  """The author's MAS: |grad of mean_b sum_k softmax_k^2| over the whole closing set."""
  def f(p):
    probs = _layers(p, x, logit_bias)[-1][1]
    return jnp.mean(jnp.sum(jnp.square(probs), axis=1))
  return jax.tree_util.tree_map(jnp.abs, jax.grad(f)(params))


def task_importance(name: str, params, x, logit_bias=0.0):
  if name == "sig_seed":
    return sig_seed(params, x, logit_bias)
  if name == "mas_batch":
    return mas_batch(params, x, logit_bias)
  raise ValueError(f"not an author importance: {name!r} (one of {AUTHOR_IMPORTANCES})")
