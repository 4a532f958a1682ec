"""One jitted program trains many runs at once: vmap over runs, scan over steps.

Runs that share a ``Method`` (and task stream and step count) differ only in
their lambda and seed, both traced, so a lambda grid x seeds is one batch.
Per task the host calls three compiled functions (train, consolidate,
evaluate), all taking the task index as a traced scalar: the program compiles
once and never retraces between tasks. Importance lives in the optimizer
state (``wva_jax.set_importance``); the optimizer is not reset between tasks,
as in the seed's TF version.

Random streams per run: ``key = PRNGKey(seed)``; init from ``fold_in(key, 0)``,
task t's batch order from ``fold_in(key, 1 + t)``, sampled-Fisher draws from
``fold_in(key, 10_000 + t)``. A run's result does not depend on which other
runs share its batch, up to float rounding (XLA may order a batched matmul's
sums differently for another batch size).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import wva_jax as wj
from experiments import author_importance, optim
from experiments.methods import Method
from experiments.models import apply_mlp, init_mlp
from experiments.protocol import BATCH_SIZE, STEPS_PER_TASK
from experiments.tasks import TaskStream

ONLINE = wj.importance.fisher_accumulator()  # float32 running mean over a task's training batches


class DeviceData(NamedTuple):
  """Arrays the compiled program reads; images carry one extra zero pixel."""
  x_train: jax.Array
  y_train: jax.Array
  x_valid: jax.Array
  y_valid: jax.Array
  x_test: jax.Array
  y_test: jax.Array
  pixel_map: jax.Array
  class_mask: jax.Array
  train_idx: jax.Array
  valid_idx: jax.Array
  test_idx: jax.Array
  test_weight: jax.Array


class RunState(NamedTuple):
  params: object
  opt_state: object
  importance: object
  key: jax.Array
  # importance 'fisher_online': the running mean of the current task's training-batch
  # Fishers (wj.importance.fisher_accumulator state); None for every other method
  online: object = None


def to_device(split, stream: TaskStream) -> DeviceData:
  pad = lambda x: jnp.asarray(np.concatenate([x, np.zeros((len(x), 1), np.float32)], 1))
  return DeviceData(pad(split.x_train), jnp.asarray(split.y_train),
                    pad(split.x_valid), jnp.asarray(split.y_valid),
                    pad(split.x_test), jnp.asarray(split.y_test),
                    *(jnp.asarray(a) for a in stream[1:]))


def _masked_apply(data, task):
  """apply_fn of task ``task``: classes outside its mask get -inf-like logits."""
  bias = jnp.where(data.class_mask[task], 0.0, -1e9)
  return lambda p, x: apply_mlp(p, x) + bias


def _images(x_pad, rows, data, task):
  return x_pad[rows][:, data.pixel_map[task]]


def _batch_order(key, n, steps, batch_size):
  """Indices [steps, batch]: epochs of fresh permutations, cut to ``steps``."""
  per_epoch = n // batch_size
  epochs = math.ceil(steps / per_epoch)
  perms = jax.vmap(lambda k: jax.random.permutation(k, n))(jax.random.split(key, epochs))
  return perms[:, :per_epoch * batch_size].reshape(-1, batch_size)[:steps]


@functools.partial(jax.jit, static_argnames=("method",))
def init_runs(seeds, lams, *, method: Method) -> RunState:
  def one(seed, lam):
    key = jax.random.PRNGKey(seed)
    params = init_mlp(jax.random.fold_in(key, 0))
    opt_state = optim.build_optimizer(method, lam).init(params)
    online = ONLINE.init(params) if method.importance == "fisher_online" else None
    return RunState(params, opt_state, optim.zeros_like_params(params), key, online)
  return jax.vmap(one)(seeds, lams)


@functools.partial(jax.jit, static_argnames=("method", "steps", "batch_size"))
def train_task(state: RunState, lams, task, data: DeviceData, *, method: Method,
               steps: int, batch_size: int = BATCH_SIZE) -> RunState:
  apply_fn = _masked_apply(data, task)
  n = data.train_idx.shape[1]

  def one(st: RunState, lam):
    opt = optim.build_optimizer(method, lam)
    order = _batch_order(jax.random.fold_in(st.key, 1 + task), n, steps, batch_size)

    def loss_fn(params, x, y):
      return optax.softmax_cross_entropy_with_integer_labels(apply_fn(params, x), y).mean()

    online = method.importance == "fisher_online"

    def step(carry, idx):
      params, opt_state, acc = carry
      rows = data.train_idx[task, idx]
      x, y = _images(data.x_train, rows, data, task), data.y_train[rows]
      if online:  # the same gradient (mean cross-entropy), and the batch's Fisher from its backward pass
        _, grads, fisher = wj.importance.grad_and_fisher(apply_fn, params, x, y)
        acc = ONLINE.update(acc, fisher, x.shape[0])
      else:
        grads = jax.grad(loss_fn)(params, x, y)
      updates, opt_state = opt.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state, acc), None

    # At task 0 the moments are zero already, so resetting every task is exact.
    opt_state = optim.reset_moments(st.opt_state) if method.reset_moments else st.opt_state
    acc = ONLINE.init(st.params) if online else None   # this task's Fisher only
    (params, opt_state, acc), _ = jax.lax.scan(step, (st.params, opt_state, acc), order)
    return st._replace(params=params, opt_state=opt_state, online=acc)

  return jax.vmap(one)(state, lams)


@functools.partial(jax.jit, static_argnames=("method",))
def consolidate_task(state: RunState, task, data: DeviceData, *, method: Method) -> RunState:
  """Importance on the task's closing (validation) set, added and swapped in."""
  apply_fn = _masked_apply(data, task)
  rows = data.valid_idx[task]
  x, y = _images(data.x_valid, rows, data, task), data.y_valid[rows]

  def one(st: RunState):
    key = jax.random.fold_in(st.key, 10_000 + task)
    if method.importance == "fisher_online":
      new = ONLINE.result(st.online)
    elif method.importance in author_importance.AUTHOR_IMPORTANCES:
      logit_bias = jnp.where(data.class_mask[task], 0.0, -1e9)
      new = author_importance.task_importance(method.importance, st.params, x, logit_bias)
    else:
      new = optim.task_importance(method, apply_fn, st.params, st.opt_state, x, y, key)
    opt_state, total = optim.consolidate(method, st.opt_state, st.params, st.importance, new)
    return st._replace(opt_state=opt_state, importance=total)

  return jax.vmap(one)(state)


@jax.jit
def evaluate_task(params, task, data: DeviceData):
  """Test accuracy of every run on task ``task`` -> [runs]."""
  apply_fn = _masked_apply(data, task)
  rows = data.test_idx[task]
  x, y, w = _images(data.x_test, rows, data, task), data.y_test[rows], data.test_weight[task]
  correct = jax.vmap(lambda p: (jnp.argmax(apply_fn(p, x), -1) == y))(params)
  return (correct * w).sum(-1) / w.sum()


def run_batch(data: DeviceData, method: Method, lams: Sequence[float],
              seeds: Sequence[int], *, num_tasks: int, steps_per_task: int = STEPS_PER_TASK,
              batch_size: int = BATCH_SIZE, on_task: Callable[[int], None] | None = None):
  """Trains ``len(seeds)`` runs on ``num_tasks`` tasks in one vmapped program.

  Returns (R, state): ``R`` float [runs, T, T] with R[r, i, j] the test
  accuracy on task j after training task i (NaN for j > i), and the final
  ``RunState``.
  """
  if len(lams) != len(seeds):
    raise ValueError(f"need one lambda per seed, got {len(lams)} and {len(seeds)}")
  if num_tasks > data.pixel_map.shape[0]:
    raise ValueError(f"stream has {data.pixel_map.shape[0]} tasks, asked for {num_tasks}")
  lams = jnp.asarray(lams, jnp.float32)
  state = init_runs(jnp.asarray(seeds, jnp.uint32), lams, method=method)
  R = np.full((len(seeds), num_tasks, num_tasks), np.nan)
  for t in range(num_tasks):
    task = jnp.int32(t)
    state = train_task(state, lams, task, data, method=method, steps=steps_per_task,
                       batch_size=batch_size)
    if method.protected and t < num_tasks - 1:  # the last task's importance is unused
      state = consolidate_task(state, task, data, method=method)
    for j in range(t + 1):
      R[:, t, j] = np.asarray(evaluate_task(state.params, jnp.int32(j), data))
    if on_task is not None:
      on_task(t)
  return R, state
