"""Orbax round trip of every wva-jax state: train N steps, save, restore into fresh objects, train N more.

The result must be bit-identical (params and every state leaf, dtypes and tree
structure included) to 2N steps without stopping. Run in-process by
``tests/test_checkpoint.py`` (one device) and as a script with several CPU
devices (``XLA_FLAGS=--xla_force_host_platform_device_count=4 python
tests/checkpoint_worker.py DIR``), where params and state are sharded FSDP-style
(``wj.sharding``) and restored with the same shardings.
"""
from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

import wva_jax as wj

N = 3
BF16 = jnp.bfloat16


def _data(step):
  k = jax.random.key(step)
  return jax.random.normal(k, (16, 8)), jax.random.normal(jax.random.fold_in(k, 1), (16, 4))


def _loss(params, x, y):
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  out = h @ params["w2"].astype(jnp.float32)
  return jnp.mean((out - y) ** 2)


def _lora_loss(adapters, base, x, y):
  w1 = base["w1"] + adapters["w1"]["lora_a"] @ adapters["w1"]["lora_b"]
  return _loss({"w1": w1, "b1": base["b1"], "w2": base["w2"]}, x, y)


def _params():
  k1, k2 = jax.random.split(jax.random.key(0))
  return {"w1": jax.random.normal(k1, (8, 12)) * 0.3, "b1": jnp.zeros(12),
          "w2": (jax.random.normal(k2, (12, 4)) * 0.3).astype(BF16)}   # a bfloat16 parameter too


def _importance(params, value=2.0, dtype=None):
  return jax.tree_util.tree_map(lambda p: jnp.full(p.shape, value, dtype or jnp.float32), params)


def optax_cases():
  """name -> (tx factory, params, loss(params, x, y)): every state in an optax chain."""
  params = _params()
  imp = _importance(params)
  adapters = {"w1": {"lora_a": jax.random.normal(jax.random.key(3), (8, 4)) * 0.1, "lora_b": jnp.zeros((4, 12))}}
  lora_imp = {"w1": jnp.full((8, 12), 2.0)}
  base = _params()
  return {
      "wva_bf16": (lambda: wj.wva_adam(1e-2, imp, 5.0, importance_dtype=BF16, mu_dtype=jnp.float32,
                                       nu_dtype=jnp.float32), params, _loss),
      "ewc_bf16": (lambda: optax.chain(wj.add_ewc(params, imp, 5.0, importance_dtype=BF16), optax.adam(1e-2)),
                   params, _loss),
      "si_wva_ewc": (lambda: wj.importance.path_integral(optax.chain(
          wj.add_ewc(None, imp, 5.0), optax.adam(1e-2), wj.wva_scale(imp, 5.0))), params, _loss),
      # the factory runs inside update's trace: importance None, then set_importance
      "inject_hyperparams": (lambda: optax.inject_hyperparams(
          lambda learning_rate: wj.wva_adam(learning_rate, None, 5.0))(learning_rate=1e-2), params, _loss),
      "lora": (lambda: optax.chain(wj.add_lora_ewc(lora_imp, 5.0), optax.adam(1e-2),
                                   wj.lora_wva_scale(lora_imp, 5.0, importance_dtype=BF16)),
               adapters, lambda a, x, y: _lora_loss(a, base, x, y)),
  }


def _bits(tree):
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  return str(treedef), [(str(x.dtype), tuple(x.shape), np.asarray(x).tobytes()) for x in leaves]


def _save_restore(directory, tree):
  ckpt = ocp.StandardCheckpointer()
  path = os.path.abspath(directory)
  ckpt.save(path, tree)
  ckpt.wait_until_finished()
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)
  return ckpt.restore(path, abstract)


def run_optax(directory, shard=None):
  """For each case: bits of (params, state) after 2N straight steps == after N, save, restore, N more."""
  out = {}
  for name, (make, params, loss) in optax_cases().items():
    tx = make()
    if shard is not None:
      params = shard(params)

    @jax.jit
    def step(params, state, i, tx=tx, loss=loss):
      x, y = _data(i)
      g = jax.grad(loss)(params, x, y)
      u, state = tx.update(g, state, params)
      return optax.apply_updates(params, u), state

    def steps(params, state, start, n, step=step):
      for i in range(start, start + n):
        params, state = step(params, state, i)
      return params, state

    state0 = tx.init(params)
    if name == "inject_hyperparams":
      state0 = wj.set_importance(state0, _importance(params))
    if shard is not None:
      state0 = jax.device_put(state0, wj.sharding.state_shardings(state0, shard.shardings(params), shard.mesh,
                                                                  params=params))
    straight = steps(params, state0, 0, 2 * N)
    half = steps(params, state0, 0, N)
    restored = _save_restore(os.path.join(directory, name), {"params": half[0], "opt_state": half[1]})
    resumed = steps(restored["params"], restored["opt_state"], N, N)
    moved = float(max(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32)))
                      for a, b in zip(jax.tree_util.tree_leaves(straight[0]), jax.tree_util.tree_leaves(params))))
    specs_kept = [str(getattr(a.sharding, "spec", None)) == str(getattr(b.sharding, "spec", None))
                  for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(
                      {"params": half[0], "opt_state": half[1]}))]
    out[name] = {"identical": _bits(resumed) == _bits(straight),
                 "restored_identical": _bits(restored) == _bits({"params": half[0], "opt_state": half[1]}),
                 "dtypes": sorted({str(x.dtype) for x in jax.tree_util.tree_leaves(restored)}),
                 "specs_kept": all(specs_kept), "moved": moved}
  return out


class _Model(nnx.Module):
  def __init__(self, lora: bool, rngs: nnx.Rngs):
    if lora:
      self.l1 = nnx.LoRALinear(8, 12, lora_rank=4, rngs=rngs)
    else:
      self.l1 = nnx.Linear(8, 12, rngs=rngs)
    self.l2 = nnx.Linear(12, 4, param_dtype=BF16, dtype=jnp.float32, rngs=rngs)

  def __call__(self, x):
    return self.l2(jnp.tanh(self.l1(x)))


def run_nnx(directory):
  """The same with ``nnx.Optimizer`` (how tunix holds the state): WVA + EWC + SI in one chain, and LoRA."""
  out = {}
  for name, lora in (("nnx_si_wva_ewc", False), ("nnx_lora", True)):
    def make(lora=lora):
      model = _Model(lora, nnx.Rngs(0))
      wrt = nnx.LoRAParam if lora else nnx.Param
      if lora:
        tx = optax.chain(wj.add_lora_ewc(None, 5.0), optax.adam(1e-2),
                         wj.lora_wva_scale(None, 5.0, importance_dtype=BF16))
      else:
        tx = wj.importance.path_integral(optax.chain(wj.add_ewc(None, None, 5.0), optax.adam(1e-2),
                                                     wj.wva_scale(None, 5.0, importance_dtype=BF16)))
      opt = nnx.Optimizer(model, tx, wrt=wrt)
      if lora:
        _, adapters, base, _ = nnx.split(model, nnx.LoRAParam, nnx.Param, ...)
        wj.set_importance(opt, wj.lora_importance(base_importance=_importance(base), adapters=adapters))
      else:
        params = nnx.state(model, nnx.Param)
        wj.set_importance(opt, _importance(params))
        wj.set_anchor(opt, params)
      return model, opt, wrt

    @nnx.jit
    def step(model, opt, i, lora=lora):
      x, y = _data(i)
      wrt = nnx.LoRAParam if lora else nnx.Param
      grads = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2), argnums=nnx.DiffState(0, wrt))(model)
      opt.update(model, grads)

    def state_of(model, opt):
      return {"model": nnx.state(model), "opt": nnx.state(opt, nnx.optimizer.OptState)}

    m1, o1, _ = make()
    for i in range(2 * N):
      step(m1, o1, i)
    m2, o2, _ = make()
    for i in range(N):
      step(m2, o2, i)
    saved = state_of(m2, o2)
    restored = _save_restore(os.path.join(directory, name), saved)
    m3, o3, _ = make()   # fresh objects (a new process would build these), then the checkpoint goes in
    nnx.update(m3, restored["model"])
    nnx.update(o3, restored["opt"])
    same_after_restore = _bits(state_of(m3, o3)) == _bits(saved)
    for i in range(N, 2 * N):
      step(m3, o3, i)
    out[name] = {"identical": _bits(state_of(m3, o3)) == _bits(state_of(m1, o1)),
                 "restored_identical": same_after_restore,
                 "dtypes": sorted({str(x.dtype) for x in jax.tree_util.tree_leaves(restored)})}
  return out


class _Shard:
  """FSDP shardings over every device (wj.sharding.fsdp_shardings)."""

  def __init__(self):
    self.mesh = jax.sharding.Mesh(np.array(jax.devices()), ("fsdp",))

  def shardings(self, params):
    return wj.sharding.fsdp_shardings(params, self.mesh)

  def __call__(self, params):
    return jax.device_put(params, self.shardings(params))


def main():
  directory = sys.argv[1]
  out = run_optax(directory, shard=_Shard())
  leaves = jax.tree_util.tree_leaves(_Shard()(_params()))
  out["_devices"] = len(jax.devices())
  out["_sharded_param_leaves"] = sum(len(x.sharding.device_set) > 1 and not x.sharding.is_fully_replicated
                                     for x in leaves)
  print("RESULT " + json.dumps(out))


if __name__ == "__main__":
  main()
