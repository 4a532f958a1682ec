"""Every public entry point that validates an importance or anchor also works when
called inside ``jax.jit`` with that tree closed over as a concrete array.

Inside an outer trace every JAX op is staged, so a value check that reads its
result back (``int(nan_count)``) raised ``ConcretizationTypeError``; the
references here are the same calls made eagerly, outside any trace.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import wva_jax as wj

PARAMS = {"w": jnp.linspace(-1.0, 1.0, 6).reshape(3, 2), "b": jnp.array([0.5, -0.25])}
IMP = {"w": jnp.arange(6.0).reshape(3, 2) / 6, "b": jnp.array([2.0, 0.0])}
ANCHOR = {"w": jnp.zeros((3, 2)), "b": jnp.ones(2)}
GRADS = {"w": jnp.full((3, 2), 0.3), "b": jnp.array([1.0, -1.0])}
ADAPTERS = {"q": {"A": jnp.linspace(0.1, 0.6, 6).reshape(3, 2), "B": jnp.linspace(-0.4, 0.3, 8).reshape(2, 4)}}
KERNEL_IMP = {"q": jnp.linspace(0.0, 1.1, 12).reshape(3, 4)}


def _update(tx):
  state = tx.init(PARAMS)
  return tx.update(GRADS, state, PARAMS)[0]


CASES = {
    "ewc_penalty": lambda: wj.ewc_penalty(PARAMS, ANCHOR, IMP, 2.0),
    "wva_scale": lambda: _update(wj.wva_scale(IMP, 3.0)),
    "wva_scale exponential": lambda: _update(wj.wva_scale(IMP, 3.0, viscosity="exponential")),
    "wva_sgd": lambda: _update(wj.wva_sgd(0.1, IMP, 3.0)),
    "wva_adam": lambda: _update(wj.wva_adam(0.1, IMP, 3.0)),
    "add_ewc": lambda: _update(wj.add_ewc(ANCHOR, IMP, 1.0)),
    "implicit_ewc": lambda: _update(wj.implicit_ewc(ANCHOR, IMP, 1.0, learning_rate=0.1)),
    "set_importance": lambda: wj.set_importance(wj.wva_scale(None, 1.0).init(PARAMS), IMP).importance,
    "set_anchor": lambda: wj.set_anchor(wj.add_ewc(None, IMP, 1.0).init(PARAMS), ANCHOR).anchor,
    "accumulate": lambda: wj.importance.accumulate(IMP, IMP),
    "decay": lambda: wj.importance.decay(IMP, IMP, 0.5),
    "normalize": lambda: wj.importance.normalize(IMP),
    "attenuation": lambda: wj.attenuation(IMP, 3.0),
    "lora_ewc_penalty": lambda: wj.lora_ewc_penalty(ADAPTERS, KERNEL_IMP, 0.7),
    "lora_ewc_grad": lambda: wj.lora_ewc_grad(ADAPTERS, KERNEL_IMP, 0.7),
    "lora_pullback": lambda: wj.lora_pullback(ADAPTERS, KERNEL_IMP),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_entry_point_under_jit_with_closed_over_concrete_trees(name):
  want = CASES[name]()   # eager: the checks run on concrete values
  got = jax.jit(CASES[name])()
  # jit may fuse differently from eager: equal to float32 rounding
  jax.tree.map(lambda g, w: np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-7),
               got, want)


def test_ewc_penalty_in_a_jitted_loss_closes_over_importance():
  """The pattern the ewc_penalty docstring recommends."""
  loss = jax.jit(lambda p: jnp.sum(p["w"] ** 2) + wj.ewc_penalty(p, ANCHOR, IMP, 2.0))
  want = float(jnp.sum(PARAMS["w"] ** 2)) + sum(
      float(jnp.sum(IMP[k] * (PARAMS[k] - ANCHOR[k]) ** 2)) for k in PARAMS)
  np.testing.assert_allclose(float(loss(PARAMS)), want, rtol=1e-6)


def test_bad_closed_over_importance_is_still_refused_inside_jit():
  bad = {"w": -jnp.ones((3, 2)), "b": jnp.ones(2)}
  with pytest.raises(ValueError, match=r"importance\['w'\] has negative"):
    jax.jit(lambda: _update(wj.wva_scale(bad, 1.0)))()


def test_traced_importance_skips_the_value_check():
  tx = lambda imp: _update(wj.wva_scale(imp, 1.0))
  got = jax.jit(tx)(IMP)
  np.testing.assert_allclose(np.asarray(got["w"]), np.asarray(GRADS["w"] / (1 + IMP["w"])), rtol=1e-6)
