"""A 3-task toy continual-learning run: WVA and EWC forget measurably less than SGD."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference_models as rm

import wva_jax as wj

# Three tasks trained and compiled per method: run in CI, left out of the fast subset.
pytestmark = pytest.mark.slow

D, C, N, TASKS, STEPS = 16, 4, 512, 3, 300


def make_tasks(key):
  """Gaussian class clusters; task k sees the features through a fixed permutation."""
  k_means, k_x, k_perm = jax.random.split(key, 3)
  means = 1.5 * jax.random.normal(k_means, (C, D))
  y = jnp.arange(2 * N) % C
  x = means[y] + jax.random.normal(k_x, (2 * N, D))
  perms = [jnp.arange(D)] + [jax.random.permutation(k, D) for k in jax.random.split(k_perm, TASKS - 1)]
  return [((x[:N, p], y[:N]), (x[N:, p], y[N:])) for p in perms]


def loss_fn(params, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(rm.mlp(params, x), y).mean()


def accuracy(params, x, y):
  return float((rm.mlp(params, x).argmax(-1) == y).mean())


def run(method, strength, seed=0):
  tasks = make_tasks(jax.random.key(100))
  params = rm.init_mlp(jax.random.key(seed), (D, 64, C))
  if method == "sgd":
    tx = optax.sgd(0.1)
  elif method == "wva":
    tx = wj.wva_sgd(0.1, None, strength)
  else:
    tx = optax.chain(wj.add_ewc(None, None, strength), optax.sgd(0.1))
  state = tx.init(params)

  @jax.jit
  def train(params, state, x, y, key):
    def step(carry, idx):
      p, s = carry
      g = jax.grad(loss_fn)(p, x[idx], y[idx])
      u, s = tx.update(g, s, p)
      return (optax.apply_updates(p, u), s), None
    idx = jax.random.randint(key, (STEPS, 32), 0, N)
    return jax.lax.scan(step, (params, state), idx)[0]

  R = np.zeros((TASKS, TASKS))
  importance = None
  for i, ((xtr, ytr), _) in enumerate(tasks):
    params, state = train(params, state, xtr, ytr, jax.random.key(seed * 10 + i))
    R[i] = [accuracy(params, xte, yte) for _, (xte, yte) in tasks]
    if method != "sgd":
      new = wj.importance.normalize(wj.importance.fisher(rm.mlp, params, xtr, ytr))
      importance = wj.importance.accumulate(importance, new)
      state = wj.set_importance(state, importance)
      if method == "ewc":
        state = wj.set_anchor(state, params)
  return R


@pytest.fixture(scope="module")
def results():
  # Importance is normalised to mean 1; explicit EWC diverges above lr*strength*max(imp) ~ 2.
  return {"sgd": run("sgd", 0.0), "wva": run("wva", 30.0), "ewc": run("ewc", 0.3)}


def test_plain_sgd_forgets(results):
  assert wj.metrics.forgetting(results["sgd"]) > 0.1


@pytest.mark.parametrize("method", ["wva", "ewc"])
def test_consolidation_forgets_less_and_still_learns(results, method):
  R = results[method]
  assert wj.metrics.forgetting(R) < 0.5 * wj.metrics.forgetting(results["sgd"])
  assert wj.metrics.average_accuracy(R)[-1] > wj.metrics.average_accuracy(results["sgd"])[-1] + 0.05
  assert np.diag(R).min() > 0.6  # each new task is still learned
