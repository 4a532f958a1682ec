"""WVA in a Flax NNX training loop: learn task A, consolidate, learn task B without forgetting A.

``python examples/nnx_wva.py`` (CPU, seconds, offline: synthetic data). It prints
the accuracy on both tasks with WVA and with plain Adam (``strength=0``).
"""
import jax
import jax.numpy as jnp
import optax
from flax import nnx

import wva_jax as wj


def make_tasks(key, n=1024, dim=16, classes=4):
  """Task A: Gaussian clusters; task B: the same examples with the features permuted."""
  k = jax.random.split(key, 3)
  y = jnp.arange(n) % classes
  xa = 1.5 * jax.random.normal(k[0], (classes, dim))[y] + jax.random.normal(k[1], (n, dim))
  xb = xa[:, jax.random.permutation(k[2], dim)]
  return (xa, y), (xb, y)


class MLP(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(16, 64, rngs=rngs)
    self.out = nnx.Linear(64, 4, rngs=rngs)

  def __call__(self, x):
    return self.out(jax.nn.relu(self.hidden(x)))


@nnx.jit
def train_step(model, optimizer, x, y):
  loss_fn = lambda model: optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()
  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)   # Adam, then WVA on its increments
  return loss


def accuracy(model, x, y) -> float:
  return float((model(x).argmax(-1) == y).mean())


def main(strength: float = 1000.0, steps: int = 300, seed: int = 0) -> dict:
  task_a, task_b = make_tasks(jax.random.key(seed))
  model = MLP(nnx.Rngs(seed))
  # No importance yet: zeros, i.e. plain Adam on task A.
  optimizer = nnx.Optimizer(model, wj.wva_adam(1e-2, strength=strength), wrt=nnx.Param)
  for x, y in (task_a, task_b):
    for _ in range(steps):
      train_step(model, optimizer, x, y)
    # Between tasks: what this task needs (Fisher, normalised to mean 1) goes into the state.
    graphdef, params = nnx.split(model, nnx.Param)
    apply_fn = lambda p, x: nnx.merge(graphdef, p)(x)
    importance = wj.importance.normalize(wj.importance.fisher(apply_fn, params, x, y))
    wj.consolidate(optimizer, params, importance)   # nnx.Optimizer: updated in place, no retrace
  return {"A": accuracy(model, *task_a), "B": accuracy(model, *task_b)}


if __name__ == "__main__":
  for s in (1000.0, 0.0):
    acc = main(strength=s)
    print(f"strength {s:g}: accuracy on A {acc['A']:.2f}, on B {acc['B']:.2f}")
