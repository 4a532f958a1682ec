"""A 1B-parameter run on this CPU: Fisher importance, then donated Adam / WVA / EWC steps, in bf16.

    flock /tmp/wva-heavy.lock python benchmarks/elephants_1b.py  # -> benchmarks/results/elephants_1b.{jsonl,md}
    python benchmarks/elephants_1b.py --quick         # tiny model, pipeline check; nothing written to results
    python benchmarks/elephants_1b.py --sizes 0.25b   # only the 0.25B model (the memory estimate)

The model is the byte-level GPT of ``experiments/elephants/model.py`` (pre-norm
blocks, d_model 2048, 16 heads, sequence 128, vocabulary 256), random init,
every parameter in bfloat16: 5 blocks (0.25B, run first to extrapolate memory)
and 20 blocks (1.0B). Each row (one arm of one size) runs in a fresh
subprocess, so its peak resident memory (``ru_maxrss``) is its own:

* ``fisher``: ``wj.importance.fisher(apply_fn, params, x, mode='sampled',
  key=..., mask=m, chunk_size=1)`` over 4 random-byte sequences (two of them
  half padded), mean-normalised and cast to bfloat16 inside the jitted
  program; saved to ``$TMPDIR`` for the next two arms.
* ``adam`` (baseline), ``wva`` (``wj.wva_adam(..., importance_dtype=bf16)``)
  and ``ewc`` (``optax.chain(wj.add_ewc(None, None, ..., importance_dtype=bf16),
  optax.adam(...))``): the state set up as a user does (``tx.init``,
  ``wj.set_importance`` with the saved Fisher, ``wj.set_anchor``), a train
  step (``experiments.elephants.train.make_train_step``, 2 sequences of 128
  bytes) jitted with ``donate_argnums=(0, 1)`` and compiled with
  ``lower().compile()`` (timed apart), one warm-up step, then timed steps.

Compute is float32: the GPT's ``nnx.Embed`` computes in the dtype it was
built with (float32), so activations are float32 and each bf16 weight is
upcast inside its matmul; on this CPU (no native bf16 matmul) casting the
activations to bf16 as well made a step slower and its temporaries larger
(checked by hand on one block), so what is bf16 here is every stored tree.

Adam's moments are in bfloat16, the params' dtype: that is what ``optax.adam``
gives a bf16 model (its second moment takes the params' dtype;
``mu_dtype`` covers only the first; ``wj.wva_adam``'s ``nu_dtype`` sets the
second), and it keeps EWC's state at 10 bytes per
parameter (float32 moments would add 4 more, on a 24 GB machine shared with
other jobs). The price is precision: bfloat16 cannot represent Adam's 0.1% decay of
``nu`` per step (b2 = 0.999), fine for measuring memory and time over a few
steps, not for a long run; the 7B section gives the float32-moment variant.

Per row: compile and step seconds, XLA's ``memory_analysis()`` of the compiled
program (arguments, outputs, temporaries, aliased), peak RSS, the bytes of each
state component from the state pytrees' leaves (params, Adam moments,
importance, anchor), the bytes of every live array after the steps (that sum
plus the last batch) and the load average. Rows append to the jsonl as they
finish; a rerun skips finished rows. Before a row of the larger size starts,
its peak RSS is extrapolated from the same arm at the smaller size, and the run
stops if that would not fit in ``MemAvailable`` less a 1.5 GB margin. The markdown (table, 7B projection) is generated
from the jsonl, every number computed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OUT = os.path.join(HERE, "results", "elephants_1b")
COMMAND = "python benchmarks/elephants_1b.py"

# size name -> model and run settings
SIZES = {
    "0.25b": dict(d_model=2048, heads=16, layers=5, seq_len=128, fisher_examples=4, chunk_size=1,
                  batch=2, steps=3),
    "1b": dict(d_model=2048, heads=16, layers=20, seq_len=128, fisher_examples=4, chunk_size=1,
               batch=2, steps=3),
}
QUICK = {"tiny": dict(d_model=64, heads=2, layers=2, seq_len=32, fisher_examples=4, chunk_size=2,
                      batch=2, steps=2)}
ARMS = ("fisher", "adam", "wva", "ewc")
LR, WVA_STRENGTH, EWC_STRENGTH = 1e-4, 10.0, 1.0
TARGET_PARAMS = 7e9          # the "what a 7B model needs" projection


def rss_bytes() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def importance_path(size: str, quick: bool) -> str:
  return os.path.join(tempfile.gettempdir(), f"elephants_1b-{size}{'-quick' if quick else ''}-importance.npz")


def build(s: dict):
  """``(apply_fn, params)``: the GPT of experiments/elephants/model.py, every parameter bfloat16.

  Initialised one block at a time, each inside ``jit`` so its float32 draw is
  cast as it is made: the process never holds more than one block in float32
  (a whole-model jitted init held ~5x the bf16 params in XLA temporaries at
  1B, which would have set the arms' peak RSS). Block ``i`` draws from seed
  ``i + 1``, the embeddings, final norm and head from seed 0.
  """
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from experiments.elephants import model as lm

  cfg = lm.Config(seq_len=s["seq_len"], d_model=s["d_model"], heads=s["heads"], layers=s["layers"])
  model = nnx.eval_shape(lambda: lm.TransformerLM(cfg, rngs=nnx.Rngs(0)))   # shapes only
  bf16 = lambda tree: jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), tree)
  top = jax.jit(lambda: bf16(nnx.state(lm.TransformerLM(
      lm.Config(**{**cfg.__dict__, "layers": 0}), rngs=nnx.Rngs(0)), nnx.Param)))()
  nnx.update(model, top)
  block = jax.jit(lambda key: bf16(nnx.state(lm.Block(cfg, rngs=nnx.Rngs(key)), nnx.Param)))
  for i, blk in enumerate(model.blocks):
    nnx.update(blk, block(jax.random.key(i + 1)))
  graphdef, params = nnx.split(model, nnx.Param)
  apply_fn = lambda p, tokens: nnx.merge(graphdef, p)(tokens)
  return apply_fn, params


def data(s: dict, n: int, seed: int):
  """``n`` random-byte windows of ``seq_len + 1`` and their mask (every other one half padded)."""
  import jax.numpy as jnp
  import numpy as np
  rng = np.random.default_rng(seed)
  seqs = jnp.asarray(rng.integers(1, 256, (n, s["seq_len"] + 1)), jnp.uint8)
  mask = jnp.ones((n, s["seq_len"] + 1), jnp.float32).at[::2, s["seq_len"] // 2:].set(0.0)
  return seqs, mask


def xla_memory(compiled) -> dict:
  ma = compiled.memory_analysis()
  return {"xla_argument_bytes": int(ma.argument_size_in_bytes), "xla_output_bytes": int(ma.output_size_in_bytes),
          "xla_temp_bytes": int(ma.temp_size_in_bytes), "xla_alias_bytes": int(ma.alias_size_in_bytes),
          # what the program holds at once: arguments + temporaries + outputs not written over a donated argument
          "xla_peak_bytes": int(ma.argument_size_in_bytes + ma.temp_size_in_bytes + ma.output_size_in_bytes
                                - ma.alias_size_in_bytes)}


def save_tree(path: str, tree) -> None:
  import jax
  import numpy as np
  leaves = jax.tree_util.tree_leaves(tree)
  # bfloat16 as its bits (np.save has no bfloat16 type); the tmp file is replaced atomically
  np.savez(path + ".tmp.npz", **{f"a{i}": np.asarray(x).view(np.uint16) for i, x in enumerate(leaves)})
  os.replace(path + ".tmp.npz", path)


def load_tree(path: str, like):
  import jax
  import jax.numpy as jnp
  import ml_dtypes
  import numpy as np
  leaves, treedef = jax.tree_util.tree_flatten(like)
  with np.load(path) as z:
    new = [jnp.asarray(z[f"a{i}"].view(ml_dtypes.bfloat16)) for i in range(len(leaves))]
  for a, b in zip(new, leaves):
    assert a.shape == b.shape, (a.shape, b.shape)
  return jax.tree_util.tree_unflatten(treedef, new)


def run_fisher(s: dict, apply_fn, params, imp_path: str) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np

  import wva_jax as wj
  from experiments.elephants import model as lm

  seqs, mask = data(s, s["fisher_examples"], seed=1)
  x, _, m = lm.split_batch(seqs, mask)

  def f(p, x, m):
    imp = wj.importance.fisher(apply_fn, p, x, mode="sampled", key=jax.random.key(0), mask=m,
                               chunk_size=s["chunk_size"])
    return jax.tree_util.tree_map(lambda i: i.astype(jnp.bfloat16), wj.importance.normalize(imp))

  t = time.time()
  compiled = jax.jit(f).lower(params, x, m).compile()
  compile_s = time.time() - t
  mem = xla_memory(compiled)
  t = time.time()
  imp = jax.block_until_ready(compiled(params, x, m))
  run_s = time.time() - t
  leaves = [np.asarray(a, np.float32) for a in jax.tree_util.tree_leaves(imp)]
  finite = bool(all(np.isfinite(a).all() for a in leaves))
  mean = float(sum(a.sum(dtype=np.float64) for a in leaves) / sum(a.size for a in leaves))
  del leaves
  save_tree(imp_path, imp)
  return {"compile_s": compile_s, "run_s": run_s, "s_per_example": run_s / s["fisher_examples"],
          "importance_finite": finite, "importance_mean": mean, **mem,
          "engine": sorted(set(wj.importance.engine_report(apply_fn, params, x[:1]).values()))}


def make_tx(arm: str):
  import jax.numpy as jnp
  import optax

  import wva_jax as wj
  if arm == "adam":
    return optax.adam(LR)
  if arm == "wva":
    return wj.wva_adam(LR, None, WVA_STRENGTH, importance_dtype=jnp.bfloat16)
  if arm == "ewc":
    return optax.chain(wj.add_ewc(None, None, EWC_STRENGTH, importance_dtype=jnp.bfloat16), optax.adam(LR))
  raise ValueError(arm)


def component_bytes(params, state) -> dict:
  """Bytes of params, Adam moments, importance and anchor, from the pytrees' leaves."""
  import jax
  import optax

  import wva_jax as wj
  from experiments.elephants.memory import nbytes

  def find(types):
    is_t = lambda x: isinstance(x, types)
    return [x for x in jax.tree_util.tree_leaves(state, is_leaf=is_t) if is_t(x)]
  adam = find(optax.ScaleByAdamState)
  cons = find((wj.WVAState, wj.EWCState))
  out = {"params": nbytes(params), "adam_moments": nbytes([(a.mu, a.nu) for a in adam]),
         "importance": nbytes([c.importance for c in cons]),
         "anchor": nbytes([c.anchor for c in cons if isinstance(c, wj.EWCState)])}
  out["other_state"] = nbytes(state) - out["adam_moments"] - out["importance"] - out["anchor"]
  return out


def run_step_arm(s: dict, arm: str, apply_fn, params, imp_path: str) -> dict:
  import jax
  import numpy as np

  import wva_jax as wj
  from experiments.elephants import train
  from experiments.elephants.memory import live_bytes, nbytes

  tx = make_tx(arm)
  base_live = live_bytes() - nbytes(params)       # what is live besides the params (nothing much)
  state = tx.init(params)
  if arm != "adam":
    imp = load_tree(imp_path, params)
    state = wj.set_importance(state, imp)         # the state's own bf16 copy
    del imp                                       # the caller drops its importance
    if arm == "ewc":
      state = wj.set_anchor(state, params)        # a copy: params and state can both be donated
  comp = component_bytes(params, state)
  rss_state = rss_bytes()
  seqs, mask = data(s, s["batch"] * (s["steps"] + 1), seed=2)
  batches = [(seqs[i * s["batch"]:(i + 1) * s["batch"]], mask[i * s["batch"]:(i + 1) * s["batch"]])
             for i in range(s["steps"] + 1)]
  t = time.time()
  compiled = jax.jit(train.make_train_step(apply_fn, tx), donate_argnums=(0, 1)).lower(
      params, state, *batches[0]).compile()
  compile_s = time.time() - t
  mem = xla_memory(compiled)
  t = time.time()
  params, state, loss = compiled(params, state, *batches[0])   # warm-up
  jax.block_until_ready((params, state, loss))
  warmup_s = time.time() - t
  losses, times = [float(loss)], []
  for b in batches[1:]:
    t = time.time()
    params, state, loss = compiled(params, state, *b)
    jax.block_until_ready((params, state, loss))
    times.append(time.time() - t)
    losses.append(float(loss))
  batch_bytes = nbytes(batches[0])
  del loss, batches, seqs, mask
  held = live_bytes() - base_live
  return {"compile_s": compile_s, "warmup_s": warmup_s, "step_s": times,
          "s_per_step": float(np.median(times)), "losses": losses,
          "finite": bool(np.isfinite(losses).all()),
          **{f"{k}_bytes": v for k, v in comp.items()},
          "state_bytes": sum(comp.values()), "live_after_steps_bytes": held,
          "batch_bytes": batch_bytes, "rss_state_bytes": rss_state, **mem}


def child(size: str, arm: str, quick: bool) -> dict:
  import jax

  from experiments.elephants import model as lm

  s = (QUICK if quick else SIZES)[size]
  rss_start = rss_bytes()                 # Python + JAX, before anything is built
  load0 = os.getloadavg()[0]
  t = time.time()
  apply_fn, params = build(s)
  jax.block_until_ready(params)
  init_s = time.time() - t
  row = {"size": size, "arm": arm, **s, "params": lm.num_params(params), "param_dtype": "bfloat16",
         "init_s": init_s, "rss_start_bytes": rss_start, "rss_params_bytes": rss_bytes()}
  imp_path = importance_path(size, quick)
  row.update(run_fisher(s, apply_fn, params, imp_path) if arm == "fisher"
             else run_step_arm(s, arm, apply_fn, params, imp_path))
  row["peak_rss_bytes"] = peak_rss_bytes()
  row["load_avg_1m"] = [load0, os.getloadavg()[0]]     # at the start and at the end of the row
  row["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "jax": jax.__version__, "device": str(jax.devices()[0].platform)}
  return row


def mem_available_bytes() -> int:
  with open("/proc/meminfo") as f:
    return next(int(l.split()[1]) * 1024 for l in f if l.startswith("MemAvailable:"))


def estimated_peak(rows, size: str, arm: str, sizes: dict):
  """Peak RSS of ``(size, arm)`` extrapolated from the same arm at the largest smaller size run, or None.

  What grows is the peak less the process's fixed part (Python and JAX: its
  RSS before building anything), scaled by the parameter ratio; rows without
  that reading scale the whole peak (an overestimate).
  """
  layers = sizes[size]["layers"]
  smaller = [r for r in rows if r["arm"] == arm and r["size"] in sizes and r["size"] != size
             and sizes[r["size"]]["d_model"] == sizes[size]["d_model"] and sizes[r["size"]]["layers"] < layers]
  if not smaller:
    return None
  r = max(smaller, key=lambda r: r["params"])
  fixed = r.get("rss_start_bytes", 0)
  ratio = (12 * layers + 1) / (12 * sizes[r["size"]]["layers"] + 1)   # ~ parameter ratio at equal width
  return fixed + (r["peak_rss_bytes"] - fixed) * ratio


def run_child(size: str, arm: str, quick: bool) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps([size, arm, quick])]
  out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": ROOT})
  if out.returncode != 0:
    raise RuntimeError(f"{size} {arm} failed:\n{out.stderr[-4000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- report

GB, MIB = 1e9, 2**20
MARGIN = 1.5e9     # kept free for the rest of the machine when a run's estimated peak is checked


def _rows(rows, size):
  return {r["arm"]: r for r in rows if r["size"] == size}


def _g(r, k) -> str:
  return f"{r[k] / GB:.2f}" if r.get(k) is not None else "-"


def table(rows) -> str:
  """Time and the state's components, per row."""
  lines = ["| size | arm | params | params GB | Adam moments GB | importance GB | anchor GB | state GB (leaves) "
           "| live after steps GB | compile s | s/step | load 1m (start/end) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    load = "/".join(f"{v:.1f}" for v in r["load_avg_1m"])
    per = (f"{r['run_s']:.1f} run ({r['s_per_example']:.1f}/seq)" if r["arm"] == "fisher"
           else f"{r['s_per_step']:.1f}")
    cells = [_g(r, f"{k}_bytes") for k in ("params", "adam_moments", "importance", "anchor", "state",
                                            "live_after_steps")]
    lines.append(f"| {r['size']} | {r['arm']} | {r['params'] / 1e9:.3f}B | " + " | ".join(cells)
                 + f" | {r['compile_s']:.1f} | {per} | {load} |")
  return "\n".join(lines) + "\n"


def memory_table(rows) -> str:
  """XLA's view of the compiled program and the process's resident memory, per row."""
  lines = ["| size | arm | XLA args GB | XLA out GB | XLA temp GB | XLA aliased GB | XLA peak GB | RSS at start GB "
           "| RSS after build GB | RSS after state setup GB | peak RSS GB | peak RSS - XLA peak GB |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    cells = [_g(r, k) for k in ("xla_argument_bytes", "xla_output_bytes", "xla_temp_bytes", "xla_alias_bytes",
                                "xla_peak_bytes", "rss_start_bytes", "rss_params_bytes", "rss_state_bytes",
                                "peak_rss_bytes")]
    lines.append(f"| {r['size']} | {r['arm']} | " + " | ".join(cells)
                 + f" | {(r['peak_rss_bytes'] - r['xla_peak_bytes']) / GB:.2f} |")
  return "\n".join(lines) + "\n"


def projection(rows, size: str, target: float = TARGET_PARAMS) -> str:
  """What a ``target``-parameter model needs, from the measured bytes per parameter of ``size``."""
  by = _rows(rows, size)
  if not all(a in by for a in ("adam", "wva", "ewc")):
    return "(needs the adam, wva and ewc rows of one size)\n"
  n = by["adam"]["params"]
  comps = ("params", "adam_moments", "importance", "anchor", "other_state")
  lines = [f"From the {size} rows ({n:,} parameters), bytes per parameter of each state component "
           f"(the pytrees' leaves) times {target:.1e} parameters; multiples are of the params' bytes.", "",
           "| arm | " + " | ".join(f"{c} B/param" for c in comps) + " | state B/param | state x params "
           f"| state GB at {target / 1e9:.0f}B | over plain Adam GB | over plain Adam |",
           "|---|" + "---|" * (len(comps) + 5)]
  state = {a: by[a]["state_bytes"] / n for a in ("adam", "wva", "ewc")}
  pb = by["adam"]["params_bytes"] / n
  for a in ("adam", "wva", "ewc"):
    r = by[a]
    per = [r[f"{c}_bytes"] / n for c in comps]
    over = state[a] - state["adam"]
    lines.append(f"| {a} | " + " | ".join(f"{v:.3f}" for v in per) + f" | {state[a]:.3f} | {state[a] / pb:.2f}x | "
                 f"{state[a] * target / GB:.1f} | {over * target / GB:.1f} | {100 * over / state['adam']:.0f}% |")
  # the step's peak: state + XLA's temporaries (gradients, activations) at this batch and length
  lines += ["", f"The compiled step at {by['adam']['batch']} x {by['adam']['seq_len']} tokens, as multiples of "
            "the params' bytes (XLA peak = arguments + temporaries + outputs not aliased; temporaries hold the "
            "gradients, Adam's update and the activations, and grow with batch x length and with the width):", ""]
  lines += [f"| arm | XLA temp x params | XLA peak x params | XLA peak GB at {target / 1e9:.0f}B if the multiples "
            "held | peak RSS x params |", "|---|---|---|---|---|"]
  for a in ("adam", "wva", "ewc"):
    r = by[a]
    p = r["params_bytes"]
    lines.append(f"| {a} | {r['xla_temp_bytes'] / p:.2f}x | {r['xla_peak_bytes'] / p:.2f}x | "
                 f"{r['xla_peak_bytes'] / p * pb * target / GB:.1f} | {r['peak_rss_bytes'] / p:.2f}x |")
  if "fisher" in by:
    f = by["fisher"]
    fp = f["xla_argument_bytes"]          # its one large argument: the params
    lines += ["", f"Sampled Fisher (chunk_size {f['chunk_size']}, {f['fisher_examples']} x {f['seq_len']} tokens): "
              f"XLA temporaries {f['xla_temp_bytes'] / fp:.2f}x and peak {f['xla_peak_bytes'] / fp:.2f}x the params' "
              f"bytes (float32 sums per parameter, bf16 output), {f['xla_peak_bytes'] / fp * pb * target / GB:.1f} GB "
              f"at {target / 1e9:.0f}B if the multiple held; peak RSS {f['peak_rss_bytes'] / fp:.2f}x. It runs "
              "before fine-tuning, so the larger of it and the step's peak is what the machine needs."]
  mom = by["adam"]["adam_moments_bytes"] / n
  lines += ["", f"With float32 Adam moments (twice the measured {mom:.0f} B/param; `optax.adam`'s `mu_dtype` "
            f"sets only the first moment's dtype, the second takes the params'), every state above grows by "
            f"{mom * target / GB:.1f} GB at "
            f"{target / 1e9:.0f}B: plain Adam {(state['adam'] + mom) * target / GB:.1f} GB, WVA "
            f"{(state['wva'] + mom) * target / GB:.1f} GB, EWC {(state['ewc'] + mom) * target / GB:.1f} GB; "
            f"the consolidation overhead in GB is unchanged."]
  return "\n".join(lines) + "\n"


def summary(rows, size: str) -> str:
  by = _rows(rows, size)
  if not all(a in by for a in ARMS):
    return ""
  a = by["adam"]
  out = [f"At {size} ({a['params']:,} bf16 parameters, {a['params_bytes'] / GB:.2f} GB): sampled Fisher over "
         f"{by['fisher']['fisher_examples']} sequences of {a['seq_len']} bytes (chunk_size "
         f"{by['fisher']['chunk_size']}) ran in {by['fisher']['run_s']:.0f} s ({by['fisher']['compile_s']:.0f} s "
         f"compile), peak RSS {by['fisher']['peak_rss_bytes'] / GB:.1f} GB."]
  for arm in ("adam", "wva", "ewc"):
    r = by[arm]
    rel = "" if arm == "adam" else (f" ({r['s_per_step'] / a['s_per_step']:.2f}x plain Adam's time, "
                                    f"+{(r['peak_rss_bytes'] - a['peak_rss_bytes']) / GB:.1f} GB peak RSS)")
    out.append(f"{arm}: {r['s_per_step']:.1f} s/step, state {r['state_bytes'] / GB:.1f} GB "
               f"({r['state_bytes'] / r['params_bytes']:.1f}x params; live arrays after the steps "
               f"{r['live_after_steps_bytes'] / GB:.1f} GB), XLA peak {r['xla_peak_bytes'] / GB:.1f} GB, "
               f"peak RSS {r['peak_rss_bytes'] / GB:.1f} GB{rel}.")
  return "\n".join(f"* {line}" for line in out) + "\n"


def markdown(rows) -> str:
  sizes = [z for z in SIZES if any(r["size"] == z for r in rows)] or sorted({r["size"] for r in rows})
  biggest = sizes[-1]
  return ("# A 1B-parameter model on a 2-core CPU: Fisher, then donated Adam / WVA / EWC steps (bf16)\n\n"
          f"Command: `{COMMAND}` (run here as `flock /tmp/wva-heavy.lock {COMMAND}`, serialised with "
          "other heavy jobs; each row a fresh subprocess; rows append to `elephants_1b.jsonl`, a "
          "rerun skips finished ones; this file is generated from the jsonl). Model: the byte-level GPT of "
          "`experiments/elephants/model.py`, d_model 2048, 16 heads, sequence 128, vocabulary 256, random "
          "init, every parameter bfloat16; 5 blocks (0.25b) and 20 blocks (1b). `fisher`: sampled Fisher "
          "(`mode='sampled'`, masked, `chunk_size` 1) over 4 random-byte sequences, normalised, stored "
          "bfloat16. `adam`: `optax.adam` (moments in the params' dtype, bfloat16); `wva`: "
          "`wj.wva_adam(..., importance_dtype=bf16)`; `ewc`: `optax.chain(wj.add_ewc(None, None, ..., "
          "importance_dtype=bf16), optax.adam(...))`, anchor in the params' dtype; importance set from the "
          "fisher row's output with `wj.set_importance`, anchor with `wj.set_anchor`. Each step jitted with "
          "`donate_argnums=(0, 1)` on 2 sequences of 128 bytes; compile timed apart "
          "(`lower().compile()`), one warm-up step, s/step = median of the timed steps.\n\n"
          "Compute is float32 (each bf16 weight upcast in its matmul; see the script's docstring).\n\n"
          "## Time and state\n\n"
          "Component GB = `nbytes` of the state pytrees' leaves (state = their sum, with Adam's step "
          "count); live after steps = bytes of every live array after the donated steps (params, state "
          "and the last batch, each buffer once: the leaves' bytes plus the batch's, `live_after_steps_bytes` = "
          "`state_bytes` + `batch_bytes` in every jsonl row, so nothing is copied or shared); "
          "fisher: its run time, and per sequence; load = the machine's 1-minute load average at the "
          "start and end of the row (2 cores shared with other jobs: times are inflated by their "
          "load).\n\n" + table(rows)
          + "\n## Memory\n\n"
          "XLA = the compiled program's `memory_analysis()`; its peak = arguments + temporaries + "
          "outputs - aliased (with donation the new params and state are written over the old, so the "
          "outputs cost nothing more). RSS = the subprocess's resident memory: at start (Python and "
          "JAX imported), after building the bf16 params (one block at a time), after setting up the "
          "state (`tx.init`, the importance loaded from disk and `set_importance`, `set_anchor`), and "
          "its peak (`ru_maxrss`). Peak RSS - XLA peak is the process's own part (Python, JAX and its "
          "compiler, allocator slack, for WVA/EWC the eager state setup).\n\n" + memory_table(rows)
          + "\n## Summary\n\n"
          + "".join(summary(rows, z) for z in sizes)
          + "\n## What a 7B model needs\n\n" + projection(rows, biggest))


def main(quick: bool = False, sizes=None, path: str | None = None):
  table_sizes = QUICK if quick else SIZES
  sizes = list(sizes or table_sizes)
  # quick runs check the pipeline: their rows go to a temp file, not the committed results
  path = path or (os.path.join(tempfile.gettempdir(), "elephants_1b-quick.jsonl") if quick else OUT + ".jsonl")
  from experiments.results import ResultStore, light_provenance, with_provenance

  store = ResultStore(path)
  rows = store.records()
  prov = light_provenance("jax", "jaxlib", "optax", "numpy", "flax", "wva-jax")   # the children record the device
  done = {(r["size"], r["arm"]) for r in rows}
  for size in sizes:
    for arm in ARMS:
      if (size, arm) in done:
        continue
      if arm != "fisher" and not os.path.exists(importance_path(size, quick)):
        print(f"{size}: recomputing the Fisher importance for the remaining arms (row kept)", flush=True)
        run_child(size, "fisher", quick)
      est = estimated_peak(rows, size, arm, table_sizes)
      if est is not None:
        avail = mem_available_bytes()
        print(f"{size} {arm}: estimated peak RSS {est / GB:.1f} GB (from the smaller size), "
              f"available now {avail / GB:.1f} GB", flush=True)
        if est > avail - MARGIN:
          raise SystemExit(f"{size} {arm}: would not fit (estimate {est / GB:.1f} GB, available "
                           f"{avail / GB:.1f} GB less a {MARGIN / GB:.0f} GB margin); stopped before it")
      r = run_child(size, arm, quick)
      r = with_provenance(r, prov)
      rows.append(r)
      store.append(r)
      t = (f"run {r['run_s']:.1f} s" if arm == "fisher" else f"{r['s_per_step']:.1f} s/step")
      print(f"{size} {arm:6s}: compile {r['compile_s']:.1f} s, {t}, XLA temp {r['xla_temp_bytes'] / GB:.2f} GB, "
            f"peak RSS {r['peak_rss_bytes'] / GB:.2f} GB, load {r['load_avg_1m']}", flush=True)
  md = markdown(rows)
  if not quick and path == OUT + ".jsonl":
    with open(OUT + ".md", "w") as f:
      f.write(md)
  print(md)
  return rows


if __name__ == "__main__":
  sys.path.insert(0, ROOT)   # experiments/ is run from the checkout (the wheel installs wva_jax only)
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true", help="tiny model, rows in $TMPDIR, nothing written to results")
  p.add_argument("--sizes", nargs="+", choices=list(SIZES), help="sizes to run (default: all)")
  p.add_argument("--child", help=argparse.SUPPRESS)
  a = p.parse_args()
  if a.child:
    print(json.dumps(child(*json.loads(a.child))))
  else:
    main(quick=a.quick, sizes=a.sizes)
