"""EWC and WVA for a Keras 3 model on the JAX backend: learn task A, consolidate, learn task B.

``python examples/keras_ewc.py`` (CPU, about 20 s, offline: synthetic data).
It prints the accuracy on both tasks without consolidation, with EWC and
with WVA. Needs ``pip install keras`` (3.x); the JAX backend is selected below.

The one Keras-specific step: the estimators call ``apply_fn(params, inputs)``
and differentiate it in ``params``, so ``apply_fn`` must *use* them. A Keras
model called as ``model(x)`` reads its own variables and ignores ``params``
(every importance would be zero; wva_jax refuses it). ``stateless_call``
takes the weights as arguments::

    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    apply_fn = lambda p, x: model.stateless_call(p, non_trainable, x, training=False)[0]

``training=False``: dropout off and BatchNorm on its moving statistics, so
each example's output depends on that example only.
"""
import os

os.environ.setdefault("KERAS_BACKEND", "jax")   # before keras is imported

import jax
import jax.numpy as jnp
import keras
import optax

import wva_jax as wj


def make_tasks(key, n=1024, dim=16, classes=4):
  """Task A: Gaussian clusters; task B: the same examples with the features permuted."""
  k = jax.random.split(key, 3)
  y = jnp.arange(n) % classes
  xa = 1.5 * jax.random.normal(k[0], (classes, dim))[y] + jax.random.normal(k[1], (n, dim))
  xb = xa[:, jax.random.permutation(k[2], dim)]
  return (xa, y), (xb, y)


def build(seed: int, dim: int = 16, classes: int = 4) -> keras.Model:
  keras.utils.set_random_seed(seed)
  return keras.Sequential([keras.Input((dim,)), keras.layers.Dense(256, activation="relu"),
                           keras.layers.Dense(classes)])


def main(method: str = "ewc", strength: float | None = None, steps: int = 300, seed: int = 0) -> dict:
  task_a, task_b = make_tasks(jax.random.key(seed))
  model = build(seed)
  params = [v.value for v in model.trainable_variables]           # a list of jax arrays
  non_trainable = [v.value for v in model.non_trainable_variables]

  def apply_fn(p, x):   # the estimators' (params, inputs) -> logits
    return model.stateless_call(p, non_trainable, x, training=False)[0]

  # Strengths picked on this task pair (normalised Fisher, mean 1) so that B is learned and A kept:
  # WVA attenuates each Adam step by 1/(1 + strength * F), so it needs a larger strength than EWC
  # (A after B: 0.66 at 30, 0.82 at 1e3, 0.93 at 1e4; B 1.00 throughout).
  if method == "ewc":
    tx = optax.chain(wj.add_ewc(strength=300.0 if strength is None else strength), optax.adam(1e-2))
  elif method == "wva":
    tx = wj.wva_adam(1e-2, strength=1e4 if strength is None else strength)
  else:
    tx = optax.adam(1e-2)
  state = tx.init(params)

  @jax.jit
  def step(params, state, x, y):
    def loss_fn(p):
      return optax.softmax_cross_entropy_with_integer_labels(apply_fn(p, x), y).mean()
    grads = jax.grad(loss_fn)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for x, y in (task_a, task_b):
    for _ in range(steps):
      params, state = step(params, state, x, y)
    if method != "plain":   # between tasks: this task's Fisher into the state, anchor at the params
      importance = wj.importance.normalize(wj.importance.fisher(apply_fn, params, x, y))
      state = wj.consolidate(state, params, importance)

  # the trained weights back into the Keras model (for model.predict, model.save, ...)
  for v, p in zip(model.trainable_variables, params):
    v.assign(p)
  acc = lambda x, y: float((model(x, training=False).argmax(-1) == y).mean())
  return {"A": acc(*task_a), "B": acc(*task_b)}


if __name__ == "__main__":
  for method in ("plain", "ewc", "wva"):
    acc = main(method)
    print(f"{method:5s}: accuracy on A {acc['A']:.2f}, on B {acc['B']:.2f}")
