"""Pretraining, importance on domain A, and fine-tuning on domain B with each method.

One fine-tuning run is a single jitted program: ``lax.scan`` over evaluation
intervals, each a scan over Adam steps on random domain-B batches. The
strength ``lambda`` is a traced argument and importance/anchor are state
values, so a whole lambda grid of one method compiles once.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import wva_jax as wj
from experiments.elephants import adapters
from experiments.elephants import model as lm
from experiments.optim import make_optimizer

METHODS = ("plain", "ewc", "wva", "implicit_ewc", "mofo")


@dataclasses.dataclass(frozen=True)
class Schedule:
  batch: int = 16
  steps: int = 120          # fine-tuning steps on B
  eval_every: int = 30
  lr: float = 1e-3
  eval_size: int = 192      # held-out sequences per domain per evaluation


def make_tx(method: str, strength, lr: float, importance_dtype=None) -> optax.GradientTransformation:
  """The optimizer of each method (``experiments.optim.make_optimizer`` with Adam);
  importance (and anchor) are set into its state afterwards.

  * ``plain``: Adam.
  * ``ewc``: ``chain(add_ewc, adam)``: Adam sees ``g + lambda*imp*(theta - theta_A)``.
  * ``wva``: ``chain(adam, wva_scale)``: Adam's increments times ``1/(1+lambda*imp)``.
  * ``implicit_ewc``: ``chain(adam, implicit_ewc)``: the proximal EWC step on Adam's
    increments, ``eta`` absorbed into ``lambda``.
  * ``mofo``: MoFO (``wj.mofo``), Adam moving only each leaf's top-momentum
    coordinates; ``strength`` is the fraction moved (no importance, no anchor).
  """
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  if method == "mofo":
    return make_optimizer("mofo", lr, "none", strength)
  return make_optimizer("adam", lr, "none" if method == "plain" else method, strength,
                        importance_dtype=importance_dtype)


def consolidated_state(tx, params, importance):
  """``tx.init(params)`` with the importance swapped in and, where the method has
  one (EWC), the anchor at ``params``."""
  state = tx.init(params)
  if importance is None:
    return state
  state = wj.set_importance(state, importance)
  is_ewc = lambda s: isinstance(s, wj.EWCState)
  if any(is_ewc(s) for s in jax.tree_util.tree_leaves(state, is_leaf=is_ewc)):
    state = wj.set_anchor(state, params)
  return state


def make_train_step(apply_fn: Callable, tx):
  def step(params, state, seqs, mask):
    loss, grads = jax.value_and_grad(lambda p: lm.loss(apply_fn, p, seqs, mask))(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss
  return step


def eval_loss(apply_fn, params, seqs, mask, batch: int = 64):
  """Mean NLL per token over a held-out set, in batches (scan keeps one batch live).

  The set is cut to a whole number of batches (at least one, of the whole set if smaller).
  """
  batch = min(batch, seqs.shape[0])
  n = (seqs.shape[0] // batch) * batch
  xs = seqs[:n].reshape(-1, batch, seqs.shape[1])
  ms = mask[:n].reshape(-1, batch, mask.shape[1])
  def body(acc, xm):
    s, c = lm.token_nll(apply_fn, params, *xm)
    return (acc[0] + s, acc[1] + c), None
  (s, c), _ = jax.lax.scan(body, (0.0, 0.0), (xs, ms))
  return s / c


def make_run(apply_fn, method: str, sched: Schedule, importance_dtype=None):
  """A jitted ``run(params, importance, strength, key, train_b, eval_a, eval_b)``.

  Returns ``(params, losses)``, ``losses[k] = (nll_A, nll_B)`` after
  ``k * eval_every`` steps (``k = 0..steps/eval_every``). ``method`` may be
  one of ``adapters.LORA_METHODS``: then only low-rank adapters train
  (:func:`make_lora_run`).
  """
  if method in adapters.LORA_METHODS:
    return make_lora_run(apply_fn, method, sched)

  def run(params, importance, strength, key, train_b, eval_a, eval_b):
    tx = make_tx(method, strength, sched.lr, importance_dtype)
    state = consolidated_state(tx, params, importance)
    step = make_train_step(apply_fn, tx)
    (params, _), curve = _fine_tune(apply_fn, step, (params, state), lambda c: c[0], sched, key,
                                    train_b, eval_a, eval_b)
    return params, curve

  return jax.jit(run)


def make_lora_run(apply_fn, method: str, sched: Schedule, lr: float = adapters.LR, rank: int = adapters.RANK):
  """``make_run`` for the LoRA arms: ``params`` frozen, adapters (drawn from ``key``) trained with Adam at ``lr``.

  ``importance`` is the base model's (the full-weight arms' tree); each
  adapter gets its kernel's (``wj.lora_importance``). Returns the merged
  params ``W + A @ B`` and the losses.
  """
  def run(params, importance, strength, key, train_b, eval_a, eval_b):
    ad = adapters.init_adapters(params, jax.random.fold_in(key, 1), rank)
    imp = None if importance is None else wj.lora_importance(ad, importance)
    tx = adapters.make_tx(method, strength, lr, imp)
    lora_apply = lambda a, tokens: apply_fn(adapters.merge(params, a), tokens)
    step = make_train_step(lora_apply, tx)
    merged = lambda c: adapters.merge(params, c[0])
    (ad, _), curve = _fine_tune(apply_fn, step, (ad, tx.init(ad)), merged, sched, key, train_b, eval_a, eval_b)
    return adapters.merge(params, ad), curve

  return jax.jit(run)


def _fine_tune(apply_fn, step, carry, to_params, sched: Schedule, key, train_b, eval_a, eval_b):
  """``sched.steps`` of ``step`` on random B batches from ``carry``; ``(carry, losses)``.

  ``to_params(carry)`` is the model's params (the trained ones, or base + adapters).
  """
  n_evals = sched.steps // sched.eval_every
  seqs, mask = train_b

  def losses(p):
    return jnp.stack([eval_loss(apply_fn, p, *eval_a), eval_loss(apply_fn, p, *eval_b)])

  def one_step(carry, k):
    idx = jax.random.randint(k, (sched.batch,), 0, seqs.shape[0])
    *carry, _ = step(*carry, seqs[idx], mask[idx])
    return tuple(carry), None

  def interval(carry, k):
    carry, _ = jax.lax.scan(one_step, carry, jax.random.split(k, sched.eval_every))
    return carry, losses(to_params(carry))

  first = losses(to_params(carry))
  carry, curve = jax.lax.scan(interval, carry, jax.random.split(key, n_evals))
  return carry, jnp.concatenate([first[None], curve])


def pretrain(apply_fn, params, domain, *, steps: int, batch: int = 16, lr: float = 2e-3,
             seed: int = 0, chunk: int = 100, log=print, accumulate_fisher: bool = False):
  """Adam with linear warm-up and cosine decay on domain A; returns params and a loss log.

  With ``accumulate_fisher`` it returns ``(params, history, fisher)``: also the
  running mean over every step of the empirical Fisher of that step's batch
  at that step's parameters (``grad_and_fisher`` + ``fisher_accumulator``),
  what a training step that collects importance would hold at the end of A.
  The update still uses ``value_and_grad``'s gradient, so the parameters are
  the plain run's (the scenario checks they are bitwise the same).
  """
  sched = optax.warmup_cosine_decay_schedule(0.0, lr, min(100, steps // 10), steps, lr / 10)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(sched))
  step = make_train_step(apply_fn, tx)
  seqs, mask = jnp.asarray(domain.train), jnp.asarray(domain.train_mask)
  acc_fn = wj.importance.fisher_accumulator()

  @jax.jit
  def chunk_fn(params, state, acc, key):
    def body(c, k):
      params, state, acc = c
      idx = jax.random.randint(k, (batch,), 0, seqs.shape[0])
      if accumulate_fisher:
        x, y, m = lm.split_batch(seqs[idx], mask[idx])
        _, _, f = wj.importance.grad_and_fisher(apply_fn, params, x, y, mask=m)
        acc = acc_fn.update(acc, f, batch)
      p, s, l = step(params, state, seqs[idx], mask[idx])
      return (p, s, acc), l
    (params, state, acc), losses = jax.lax.scan(body, (params, state, acc), jax.random.split(key, chunk))
    return params, state, acc, losses.mean()

  state = tx.init(params)
  acc = acc_fn.init(params) if accumulate_fisher else None
  key = jax.random.key(seed)
  history = []
  for i in range(max(1, steps // chunk)):
    key, k = jax.random.split(key)
    params, state, acc, l = chunk_fn(params, state, acc, k)
    history.append(float(l))
    log(f"pretrain step {(i + 1) * chunk}: train nll {float(l):.3f}")
  if accumulate_fisher:
    return params, history, acc_fn.result(acc)
  return params, history


def importance_on_a(apply_fn, params, domain, kind: str, *, n: int = 256, chunk_size: int = 32,
                    seed: int = 0):
  """Importance of ``params`` for domain A, mean-normalised (one lambda grid fits all kinds).

  ``fisher``: true Fisher, one sampled continuation per position, per
  sequence ``(d/dtheta sum_t m_t log p(y_t | x_<t))^2`` with padding masked;
  ``fisher_emp``: the same with the real next bytes; ``fisher_reversed``: EWC-DR's
  logits reversal on the real next bytes (``fisher(mode='reversed')``); ``fisher_online`` is
  not computed here (``scenario.importance``: it is accumulated while pretraining); ``mas``: gradient of
  the squared norm of the logits; ``sig``: forward signal; padding masked in all.
  """
  x, y, m = lm.split_batch(domain.train[:n], domain.train_mask[:n])
  if kind == "fisher":
    imp = wj.importance.fisher(apply_fn, params, x, mode="sampled", key=jax.random.key(seed),
                               mask=m, chunk_size=chunk_size)
  elif kind == "fisher_emp":
    imp = wj.importance.fisher(apply_fn, params, x, y, mask=m, chunk_size=chunk_size)
  elif kind == "fisher_reversed":
    imp = wj.importance.fisher(apply_fn, params, x, y, mask=m, mode="reversed", chunk_size=chunk_size)
  elif kind == "mas":
    imp = wj.importance.mas(apply_fn, params, x, mask=m, chunk_size=chunk_size)
  elif kind == "sig":
    imp = wj.importance.sig(apply_fn, params, x, mask=m, chunk_size=chunk_size)
  else:
    raise ValueError(f"unknown importance kind {kind!r}")
  return wj.importance.normalize(imp)


def to_numpy(tree):
  return jax.tree_util.tree_map(np.asarray, tree)
