"""WVA in a plain Optax loop: learn task A, estimate which parameters A needs, protect them, learn task B.

``python examples/optax_wva.py`` (CPU, seconds, offline: synthetic data). Any
JAX model works: ``apply_fn(params pytree, batch) -> logits``. It prints the
accuracy on both tasks with WVA and with plain Adam (``strength=0``).

EWC instead of WVA: ``tx = optax.chain(wj.add_ewc(strength=strength), optax.adam(1e-2))``,
then after task A ``state = wj.consolidate(state, params, imp)`` (the
between-tasks step: adds ``imp`` to the importance in the state, anchors at
``params``, restarts SI's path; ``combine="replace"`` or ``decay=`` for other rules).
"""
import jax
import jax.numpy as jnp
import optax

import wva_jax as wj


def apply_fn(params, x):                        # any JAX model: (params pytree, batch) -> logits
  return jax.nn.relu(x @ params["w1"]) @ params["w2"]


def train(params, tx, state, x, y, steps=300):
  loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(apply_fn(p, x), y).mean()

  @jax.jit
  def step(params, state):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state
  for _ in range(steps):
    params, state = step(params, state)
  return params, state


def main(strength: float = 1000.0) -> dict:
  k = jax.random.split(jax.random.key(0), 5)
  y = jnp.arange(1024) % 4                                    # 4 classes, Gaussian clusters in 16-d
  xa = 1.5 * jax.random.normal(k[0], (4, 16))[y] + jax.random.normal(k[1], (1024, 16))
  xb = xa[:, jax.random.permutation(k[2], 16)]                # task B: the same data, features permuted
  params = {"w1": jax.random.normal(k[3], (16, 64)) / 4, "w2": jax.random.normal(k[4], (64, 4)) / 8}
  tx = wj.wva_adam(1e-2, importance=None, strength=strength)  # no importance yet: plain Adam
  params, state = train(params, tx, tx.init(params), xa, y)           # learn A
  imp = wj.importance.normalize(wj.importance.fisher(apply_fn, params, xa, y))
  state = wj.set_importance(state, imp)                               # protect what A needs
  params, state = train(params, tx, state, xb, y)                     # learn B
  acc = lambda x: float((apply_fn(params, x).argmax(-1) == y).mean())
  return {"A": acc(xa), "B": acc(xb)}


if __name__ == "__main__":
  for s in (1000.0, 0.0):
    acc = main(strength=s)
    print(f"strength {s:g}: accuracy on A {acc['A']:.2f}, on B {acc['B']:.2f}")
