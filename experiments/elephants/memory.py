"""What each method's train step holds, measured from the compiled program and the live arrays.

For a train step ``(params, opt_state, batch) -> (params, opt_state, loss)``
compiled with ``jax.jit(...).lower(...).compile()``, XLA's
``memory_analysis()`` reports the bytes of its arguments, outputs and
temporaries. Params and optimizer state are donated
(``donate_argnums=(0, 1)``), so the outputs alias them and the step's peak
is ``arguments + temporaries + unaliased outputs`` (the loss); without
donation the outputs come on top (``arguments + temporaries + outputs``: a
second params + state, less what XLA then saves on temporaries). The arguments minus the batch are the persistent
training state; as a multiple of the parameter bytes that is the seed's "EWC
costs 3x the model, WVA 2x". The leaf count (``nbytes`` of every leaf, split
into params, optimizer moments, and WVA/EWC state) must agree with the
compiled argument bytes.

What a user really pays is measured too: the state is set up as a user does
(``init``, ``set_importance``, ``set_anchor``), two donated steps run, and
the bytes of every live array (``jax.live_arrays()``, each buffer counted
once) above what was live before are the training state actually held. A
state leaf sharing a buffer with the params would make this smaller than
the leaf count (and the donated step fail); a copy left behind would make
it larger.
"""
from __future__ import annotations

import gc
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

import wva_jax as wj
from experiments.elephants import adapters, train
from experiments.elephants import model as lm
from experiments.optim import make_optimizer

RESULTS = pathlib.Path(__file__).parent / "results"

# (optimizer, consolidation, importance storage dtype)
CONFIGS = (
    ("sgd", "none", None), ("sgd", "wva", None), ("sgd", "wva", "bfloat16"),
    ("sgd", "ewc", None), ("sgd", "ewc", "bfloat16"),
    ("adam", "none", None), ("adam", "wva", None), ("adam", "wva", "bfloat16"),
    ("adam", "ewc", None), ("adam", "ewc", "bfloat16"),
    ("adam", "implicit_ewc", None),
    ("mofo", "none", None),   # issue 22's optimizer-only rival: Adam's state, no importance or anchor
)


def build_tx(optimizer: str, consolidation: str, dtype, lr: float = 1e-3, strength: float = 1.0):
  """The experiments' optimizer (``experiments.optim.make_optimizer``) with ``dtype`` importance."""
  dt = None if dtype is None else jnp.dtype(dtype)
  return make_optimizer(optimizer, lr, consolidation, strength, importance_dtype=dt)


def nbytes(tree) -> int:
  return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree)))


def split_state(opt_state):
  """``(optimizer part, consolidation part)`` of an optax state: WVA/EWC states vs the rest."""
  is_cons = lambda s: isinstance(s, (wj.WVAState, wj.EWCState))
  cons = [s for s in jax.tree_util.tree_leaves(opt_state, is_leaf=is_cons) if is_cons(s)]
  rest = jax.tree_util.tree_map(lambda s: None if is_cons(s) else s, opt_state, is_leaf=is_cons)
  return rest, cons


def live_bytes() -> int:
  """Bytes of every live, undeleted array, each device buffer counted once."""
  gc.collect()
  seen, total = set(), 0
  for a in jax.live_arrays():
    if a.is_deleted():
      continue
    if len(a.devices()) == 1:
      ptr = a.unsafe_buffer_pointer()
      if ptr in seen:
        continue
      seen.add(ptr)
    total += a.nbytes
  return total


def live_after_donated_steps(compiled, tx, params, batch, consolidation: str, steps: int = 2) -> int:
  """Live bytes held after ``steps`` donated steps, set up as a user does, above what was live before."""
  base = live_bytes()
  p = fresh(params)
  state = tx.init(p)
  if consolidation != "none":
    imp = jax.tree_util.tree_map(lambda x: jnp.ones(x.shape, jnp.float32), p)
    state = wj.set_importance(state, imp)
    del imp                                 # the caller drops its importance
    if consolidation in ("ewc", "implicit_ewc"):
      state = wj.set_anchor(state, p)
  for _ in range(steps):
    p, state, loss = compiled(p, state, *batch)
  jax.block_until_ready((p, state))
  del loss
  held = live_bytes() - base
  del p, state
  return held


def measure(apply_fn, params, batch, optimizer: str, consolidation: str, dtype,
            compile: bool = True) -> dict:
  """Live and (if ``compile``) compiled bytes of one configuration's train step."""
  tx = build_tx(optimizer, consolidation, dtype)
  state = tx.init(params)
  p = nbytes(params)
  opt, cons = split_state(state)
  live = {"params": p, "optimizer": nbytes(opt), "consolidation": nbytes(cons)}
  name = optimizer + ("" if consolidation == "none" else f"+{consolidation}") + (
      f" (importance {dtype})" if dtype else "")
  row = {"name": name, "optimizer": optimizer, "consolidation": consolidation,
         "importance_dtype": dtype or "float32", **{f"{k}_bytes": v for k, v in live.items()},
         "state_multiple": (live["params"] + live["optimizer"] + live["consolidation"]) / p,
         "consolidation_multiple": live["consolidation"] / p}
  if not compile:
    return row
  step = train.make_train_step(apply_fn, tx)
  compiled, fields = compiled_fields(step, (params, state, *batch), nbytes(batch), p)
  held = live_after_donated_steps(compiled, tx, params, batch, consolidation)
  return {**row, **fields, "live_after_donated_steps_bytes": held, "live_after_donated_steps_multiple": held / p}


def compiled_fields(step, args, batch_bytes: int, p: int):
  """``(compiled step, its memory fields)``: ``step(*args)`` compiled with its first two arguments
  donated (and once without, for the undonated peak), multiples of ``p`` bytes."""
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(*args).compile()
  ma = compiled.memory_analysis()
  size, out, alias, temp = (int(ma.argument_size_in_bytes), int(ma.output_size_in_bytes),
                            int(ma.alias_size_in_bytes), int(ma.temp_size_in_bytes))
  undonated = jax.jit(step).lower(*args).compile().memory_analysis()
  return compiled, {
      "compiled_argument_bytes": size, "compiled_output_bytes": out, "compiled_alias_bytes": alias,
      "compiled_temp_bytes": temp, "batch_bytes": batch_bytes,
      "compiled_state_multiple": (size - batch_bytes) / p,
      "compiled_peak_multiple": (size + temp + out - alias) / p,
      "compiled_peak_undonated_multiple": (int(undonated.argument_size_in_bytes) + int(undonated.temp_size_in_bytes)
                                           + int(undonated.output_size_in_bytes)) / p}


def measure_lora(apply_fn, params, batch, method: str) -> dict:
  """``measure`` for a LoRA arm (``adapters.LORA_METHODS``): adapters and their state trained, base frozen.

  The step is ``(adapters, opt_state, base, seqs, mask)``, adapters and state
  donated; the frozen base is an argument like the batch (held, never
  copied), so "params" below is base + adapters.
  """
  ad = adapters.init_adapters(params, jax.random.key(0))
  imp = wj.lora_importance(ad, jax.tree_util.tree_map(lambda x: jnp.ones(x.shape, jnp.float32), params))
  tx = adapters.make_tx(method, 1.0, adapters.LR, imp)
  state = tx.init(ad)
  is_cons = lambda x: isinstance(x, wj.LoRAState)
  cons = [x for x in jax.tree_util.tree_leaves(state, is_leaf=is_cons) if is_cons(x)]
  opt = jax.tree_util.tree_map(lambda x: None if is_cons(x) else x, state, is_leaf=is_cons)
  p = nbytes(params)
  live = {"params": p + nbytes(ad), "optimizer": nbytes(opt), "consolidation": nbytes(cons)}

  def step(ad, state, base, seqs, mask):
    loss, grads = jax.value_and_grad(lambda a: lm.loss(apply_fn, adapters.merge(base, a), seqs, mask))(ad)
    updates, state = tx.update(grads, state, ad)
    return optax.apply_updates(ad, updates), state, loss

  compiled, fields = compiled_fields(step, (ad, state, params, *batch), nbytes(batch), p)
  base_live = live_bytes()
  a2, s2 = fresh(ad), tx.init(ad)
  for _ in range(2):
    a2, s2, loss = compiled(a2, s2, params, *batch)
  jax.block_until_ready((a2, s2))
  held = live_bytes() - base_live + p   # the base was live before: count it, as in the full-weight rows
  del a2, s2, loss
  return {"name": {"lora": f"adam, LoRA rank {adapters.RANK}", "lora_ewc": "adam, LoRA + lora_ewc",
                   "lora_wva": "adam, LoRA + lora_wva", "lora_mofo": "mofo, LoRA"}[method],
          "optimizer": "mofo" if method == "lora_mofo" else "adam", "consolidation": method,
          "importance_dtype": "float32",
          **{f"{k}_bytes": v for k, v in live.items()},
          "adapter_bytes": nbytes(ad),
          "state_multiple": sum(live.values()) / p, "consolidation_multiple": live["consolidation"] / p,
          **fields, "live_after_donated_steps_bytes": held, "live_after_donated_steps_multiple": held / p}


def fresh(tree):
  return jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), tree)


def measure_all(cfg: lm.Config, batch_size: int = 16, configs=CONFIGS, compile_configs=None,
                lora=adapters.LORA_METHODS):
  """Rows for ``configs`` and the LoRA methods ``lora``; only ``compile_configs`` (default: all) are compiled."""
  apply_fn, params = lm.init(cfg)
  seqs = jnp.zeros((batch_size, cfg.seq_len + 1), jnp.uint8)
  batch = (seqs, jnp.ones_like(seqs))
  rows = [measure(apply_fn, params, batch, *c, compile=compile_configs is None or c in compile_configs)
          for c in configs]
  rows += [measure_lora(apply_fn, params, batch, m) for m in lora]
  return {"model": {"config": cfg.__dict__, "params": lm.num_params(params),
                    "param_bytes": nbytes(params)}, "batch": batch_size, "rows": rows}


def markdown(res) -> str:
  m = res["model"]
  lines = [f"Model: {m['params']:,} float32 parameters ({m['param_bytes'] / 2**20:.2f} MiB), "
           f"config {m['config']}, batch {res['batch']}.", "",
           "| train step | params | optimizer | WVA/EWC state | state / params (leaves) "
           "| held after donated steps (live arrays) | compiled args | peak, donated | peak, not donated |",
           "|---|---|---|---|---|---|---|---|---|"]
  p = m["param_bytes"]
  for r in res["rows"]:
    comp = (f"{r['live_after_donated_steps_multiple']:.2f}x | {r['compiled_state_multiple']:.2f}x | "
            f"{r['compiled_peak_multiple']:.2f}x | {r['compiled_peak_undonated_multiple']:.2f}x"
            if "compiled_state_multiple" in r else "(not compiled) | | |")
    lines.append(f"| {r['name']} | {r['params_bytes'] / p:.2f} | {r['optimizer_bytes'] / p:.2f} | "
                 f"{r['consolidation_bytes'] / p:.2f} | **{r['state_multiple']:.2f}x** | {comp} |")
  return "\n".join(lines) + "\n"


def main(quick: bool = False):
  cfg = lm.Config(d_model=64, heads=2, layers=2, seq_len=32) if quick else lm.Config()
  res = measure_all(cfg)
  suffix = "-quick" if quick else ""
  RESULTS.mkdir(parents=True, exist_ok=True)
  (RESULTS / f"memory{suffix}.json").write_text(json.dumps(res, indent=1))
  md = markdown(res)
  (RESULTS / f"memory{suffix}.md").write_text(
      "# Memory of a train step, as multiples of the parameter bytes\n\n"
      "Command: `python -m experiments.elephants memory`. Columns, as multiples of the "
      "parameter bytes: each part of the persistent training state (`nbytes` of the state's "
      "leaves); the bytes really held after two steps of `jax.jit(step, donate_argnums=(0, 1))` "
      "with the state set up as a user does (`init`, `set_importance`, `set_anchor`), from "
      "`jax.live_arrays()` with each buffer counted once; the compiled donated step's argument "
      "bytes (params + optimizer state, batch excluded) from "
      "`jax.jit(step).lower(...).compile().memory_analysis()`; its peak, arguments + XLA "
      "temporaries (activations, gradients; the same for every method) + outputs not aliased "
      "to a donated argument; and the same step compiled without donation, whose outputs "
      "(a second copy of params and state) all come on top.\n\n"
      "LoRA rows: the frozen base is held as it is (an argument, not donated, never copied); "
      "\"params\" counts base + adapters, \"optimizer\" Adam's moments of the adapters, and the "
      "LoRA-EWC/WVA state is the base kernels' importance (the anchor is `delta W = 0`: nothing).\n\n" + md)
  print(md)
  return res
