"""The seed author's SIG and batch-level MAS (experiments/author_importance.py)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import wva_jax as wj
from experiments import author_importance as A
from experiments.models import apply_mlp, init_mlp


def _setup():
  params = init_mlp(jax.random.PRNGKey(0), (6, 5, 4, 3))
  x = jax.random.uniform(jax.random.PRNGKey(1), (7, 6))
  return params, x


@pytest.mark.slow  # ~15 s on the 2-core CPU: wva_jax's sig traces the model
def test_sig_seed_weights_match_wva_jax_and_biases_are_post_activation():
  params, x = _setup()
  ours, pre = A.sig_seed(params, x), wj.importance.sig(apply_mlp, params, x)
  for a, b in zip(ours, pre):
    np.testing.assert_allclose(a["w"], b["w"], rtol=1e-5)
  h1 = jax.nn.leaky_relu(x @ params[0]["w"] + params[0]["b"], 0.2)
  np.testing.assert_allclose(ours[0]["b"], jnp.abs(h1).mean(0), rtol=1e-5)
  # the last layer's bias: mean softmax probability (the author's), not mean |logit|
  probs = jax.nn.softmax(apply_mlp(params, x))
  np.testing.assert_allclose(ours[-1]["b"], probs.mean(0), rtol=1e-5)
  np.testing.assert_allclose(pre[-1]["b"], jnp.abs(apply_mlp(params, x)).mean(0), rtol=1e-5)


@pytest.mark.slow   # issue 20: the default run (the fast subset) stays within 3 minutes on 2 cores
def test_mas_batch_is_the_abs_of_the_batch_gradient():
  params, x = _setup()
  f = lambda p: jnp.mean(jnp.sum(jax.nn.softmax(apply_mlp(p, x)) ** 2, axis=1))
  want = jax.tree_util.tree_map(jnp.abs, jax.grad(f)(params))
  for a, b in zip(jax.tree_util.tree_leaves(A.mas_batch(params, x)),
                  jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)
