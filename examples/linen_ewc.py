"""EWC in a Flax Linen ``TrainState`` loop: learn task A, consolidate, learn task B without forgetting A.

``python examples/linen_ewc.py`` (CPU, seconds, offline: synthetic data). It
prints the accuracy on both tasks with EWC and without (``strength=0``).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

import wva_jax as wj


def make_tasks(key, n=1024, dim=16, classes=4):
  """Task A: Gaussian clusters; task B: the same examples with the features permuted."""
  k = jax.random.split(key, 3)
  y = jnp.arange(n) % classes
  xa = 1.5 * jax.random.normal(k[0], (classes, dim))[y] + jax.random.normal(k[1], (n, dim))
  xb = xa[:, jax.random.permutation(k[2], dim)]
  return (xa, y), (xb, y)


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(4)(nn.relu(nn.Dense(256)(x)))


@jax.jit
def train_step(state: train_state.TrainState, x, y):
  def loss_fn(params):
    logits = state.apply_fn({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  return state.apply_gradients(grads=grads), loss   # tx.update gets the params: EWC pulls to its anchor


def accuracy(state, x, y) -> float:
  return float((state.apply_fn({"params": state.params}, x).argmax(-1) == y).mean())


def main(strength: float = 300.0, steps: int = 300, seed: int = 0) -> dict:
  task_a, task_b = make_tasks(jax.random.key(seed))
  model = MLP()
  params = model.init(jax.random.key(seed), task_a[0][:1])["params"]
  # EWC first in the chain, so Adam sees the penalised gradient; no anchor or importance yet.
  tx = optax.chain(wj.add_ewc(strength=strength), optax.adam(1e-2))
  state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
  apply_fn = lambda p, x: model.apply({"params": p}, x)   # the estimators' (params, inputs) -> logits
  for x, y in (task_a, task_b):
    for _ in range(steps):
      state, _ = train_step(state, x, y)
    # Between tasks: add this task's Fisher to the importance and anchor at the current params.
    importance = wj.importance.normalize(wj.importance.fisher(apply_fn, state.params, x, y))
    state = state.replace(opt_state=wj.consolidate(state.opt_state, state.params, importance))
  return {"A": accuracy(state, *task_a), "B": accuracy(state, *task_b)}


if __name__ == "__main__":
  for s in (300.0, 0.0):
    acc = main(strength=s)
    print(f"strength {s:g}: accuracy on A {acc['A']:.2f}, on B {acc['B']:.2f}")
