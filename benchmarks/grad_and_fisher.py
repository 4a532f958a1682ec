"""Cost of the Fisher inside a training step: grad_and_fisher vs jax.value_and_grad alone.

    python benchmarks/grad_and_fisher.py            # writes benchmarks/results/grad_and_fisher.{json,md}
    python benchmarks/grad_and_fisher.py --quick    # small batches, 2 repetitions, prints only
    python benchmarks/grad_and_fisher.py --only mlp # rerun matching rows, replace them in the results

For each model, on one batch (one chunk: ``chunk_size`` = the batch, as in a
training step), four jitted programs are timed interleaved in one process
(median of ``--reps`` runs after a warm-up run each):
  * ``grad``:   ``jax.value_and_grad`` of the mean negative log likelihood;
  * ``g&f``:    ``wj.importance.grad_and_fisher`` (loss, the same gradient and the
    empirical Fisher);
  * ``fisher``: ``wj.importance.fisher`` alone (the engine's pass: forward,
    backward to the layer outputs, squared contractions);
  * ``fwd``:    the forward pass and the loss, no gradient.
The ratio ``g&f / grad`` is the headline. ``g&f - fisher`` is what the plain
gradient adds to the engine's pass (``X^T D`` per dense layer, the sum of the
per-example gradients elsewhere); ``fisher / grad`` shows how much of the
ratio the engine's own pass already costs. Models and timing helpers come
from ``benchmarks/importance.py``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys

import importance as bench  # benchmarks/importance.py (the script's folder is on sys.path): models, compile_fn, timed
import jax
import jax.numpy as jnp
import numpy as np

import wva_jax as wj

HERE = os.path.dirname(os.path.abspath(__file__))
zoo = bench.zoo
# The zoo's transformers at the importance benchmark's width and depth, with a
# training-sized batch of 16 (BENCH has 64: four times the time, same ratios).
LM_SIZE = dataclasses.replace(zoo.BENCH, batch=16)
LM = f"{LM_SIZE.layers}x{LM_SIZE.d} seq{LM_SIZE.seq} vocab{LM_SIZE.vocab}"

# name: (builder, N); the small models get 3x the repetitions (they are cheap and noisier)
SMALL = ("mlp", "cnn")
MODELS = {
    "mlp 784-300-150-10": (bench.mlp_model, 1024),
    "cnn conv32-conv64-dense": (bench.cnn_model, 256),
    f"nnx transformer, tied ({LM})": (bench.zoo_model(zoo.nnx_transformer, LM_SIZE), 16),
    f"nnx.scan(nnx.remat) twin, tied ({LM})": (bench.zoo_model(zoo.nnx_scan_transformer, LM_SIZE), 16),
    f"linen nn.scan(nn.remat) LM, tied ({LM})": (bench.zoo_model(zoo.linen_scan_lm, LM_SIZE), 16),
    f"HF FlaxGPT2LMHeadModel ({LM})": (bench.zoo_model(zoo.hf_gpt2, LM_SIZE), 16),
    f"HF FlaxLlamaForCausalLM ({LM})": (bench.zoo_model(zoo.hf_llama, LM_SIZE), 16),
    f"HF FlaxGemmaForCausalLM ({LM})": (bench.zoo_model(zoo.hf_gemma, LM_SIZE), 16),
    f"HF FlaxBertForMaskedLM ({LM})": (bench.zoo_model(zoo.hf_bert_mlm, LM_SIZE), 16),
    f"equinox MultiheadAttention LM ({LM})": (bench.zoo_model(zoo.eqx_attention_lm, LM_SIZE), 16),
    f"haiku layer_stack LM ({LM})": (bench.zoo_model(zoo.haiku_layer_stack, LM_SIZE), 16),
}


def nll(apply_fn):
  def loss(p, x, y):
    logp = jax.nn.log_softmax(apply_fn(p, x).astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, y[..., None], -1).reshape(y.shape[0], -1).sum(-1).mean()
  return loss


def programs(apply_fn, n):
  loss = nll(apply_fn)
  return {
      "grad": jax.value_and_grad(loss),
      "g&f": lambda p, x, y: wj.importance.grad_and_fisher(apply_fn, p, x, y, chunk_size=n),
      "fisher": lambda p, x, y: wj.importance.fisher(apply_fn, p, x, y, chunk_size=n),
      "fwd": loss,
  }


def check(out, ref):
  """g&f's loss and gradient against value_and_grad's (largest relative error over leaves)."""
  (loss, grads, _), (ref_loss, ref_grads) = out, ref
  scale = max(float(np.abs(np.asarray(g)).max()) for g in jax.tree_util.tree_leaves(ref_grads))
  err = max(float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())
            for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref_grads))) / scale
  return abs(float(loss) - float(ref_loss)) / abs(float(ref_loss)), err


def run(quick, reps, only=()):
  rows = []
  rng = np.random.default_rng(0)
  for name, (build, n) in MODELS.items():
    if only and not any(o in name for o in only):
      continue
    if quick:
      n = max(n // 4, 4)
    apply_fn, params, x, y = build(n, rng)
    print(f"\n{name}: N={n}", flush=True)
    compiled = {k: bench.compile_fn(f, params, x, y)[0] for k, f in programs(apply_fn, n).items()}
    loss_err, grad_err = check(compiled["g&f"](params, x, y), compiled["grad"](params, x, y))
    times = {k: [] for k in compiled}
    for c in compiled.values():
      bench.timed(c, params, x, y)
    model_reps = 3 * reps if name.split()[0] in SMALL else reps
    for _ in range(model_reps):
      for k, c in compiled.items():
        times[k].append(bench.timed(c, params, x, y))
    med = {k: statistics.median(v) for k, v in times.items()}
    row = {"model": name, "N": n, "reps": model_reps, "load_1min": os.getloadavg()[0],
           **{f"{k}_s": v for k, v in med.items()},
           "ratio": med["g&f"] / med["grad"], "fisher_x": med["fisher"] / med["grad"],
           "extra_s": med["g&f"] - med["fisher"], "loss_rel_err": loss_err, "grad_rel_err": grad_err}
    rows.append(row)
    print(fmt_row(row), flush=True)
  return rows


HEADER = ("| model | N | grad (s) | g&f (s) | **g&f / grad** | fisher alone (s) | fisher / grad "
          "| (g&f - fisher) / grad | fwd (s) | grad err | reps | load |")


def fmt_row(r):
  return (f"| {r['model']} | {r['N']} | {r['grad_s']:.3f} | {r['g&f_s']:.3f} | **{r['ratio']:.2f}x** "
          f"| {r['fisher_s']:.3f} | {r['fisher_x']:.2f}x | {r['extra_s'] / r['grad_s']:+.2f}x | {r['fwd_s']:.3f} "
          f"| {r['grad_rel_err']:.0e} | {r['reps']} | {bench.fmt(r.get('load_1min'), '.1f')} |")


NOTES = """
Notes
- `grad`: `jax.jit(jax.value_and_grad(loss))`, loss = mean over examples of the
  summed negative log likelihood; `g&f`: `grad_and_fisher` with `chunk_size`
  = N (the whole batch in one chunk, as in a training step); `fisher`: the
  empirical `fisher()` alone, same chunk; `fwd`: the loss alone. `grad err`:
  largest |g&f gradient - value_and_grad gradient| over all entries, relative
  to the largest gradient entry.
- The ratio splits as `g&f / grad = fisher / grad + (g&f - fisher) / grad`:
  the engine's own pass (forward, backward to the layers' outputs, the
  squared contractions) and what the plain gradient adds to it.
- MLP (above 1.2x): bound by the plain gradient's contractions, `(g&f -
  fisher) / grad` +0.65x. Its step is almost all weight-sized GEMMs (the
  first layer, 784x300, needs no input gradient), and `g&f` runs one more
  set of them: the compiled `g&f` has exactly three more `dot`s than
  `value_and_grad` (784x300, 300x150, 150x10, each contracting over the
  1024 examples: `X^T D` beside `(X^2)^T (D^2)`; the engine's pass itself
  computes no `X^T D`). A GEMM cannot give both sums, so on this model the
  floor is about one weight gradient more than a plain step.
- CNN, the scanned transformers, equinox and haiku (1.2-1.3x): bound by the
  engine's own pass (`fisher / grad` 1.19-1.32x, `(g&f - fisher) / grad`
  -0.04x to +0.05x): their leaves' per-example gradients (conv kernels from
  input patches; every weight used at every position) are formed one
  example at a time on CPU, and the plain gradient is their running sum,
  nearly free. See `importance.md` for that pass.
- The CPU was shared with other jobs (`load` column, 1-minute load average
  on 2 cores): the runs are interleaved, but ratios move by 0.1-0.3x between
  runs of the same row at this load.
"""


def write_md(path, env, rows):
  # the full run first, then reruns of some rows (--only)
  commands = sorted(dict.fromkeys(r.get("command", env["command"]) for r in rows), key=lambda c: "--only" in c)
  loads = {r.get("command", env["command"]): r["run_load"] for r in rows if "run_load" in r}
  lines = [fmt_row(r) + f" {commands.index(r.get('command', env['command'])) + 1} |" for r in rows]
  table = "\n".join([HEADER + " run |", "|" + "---|" * 13] + lines)
  runs = "; ".join(f"run {i + 1}: `{c}`" + (f" ({loads[c]})" if c in loads else "") for i, c in enumerate(commands))
  with open(path, "w") as f:
    f.write("# Fisher inside the training step: grad_and_fisher vs jax.value_and_grad\n\n")
    f.write(f"{runs}. On {env['cpu_count']} CPU cores ({env['backend']}, jax {env['jax']}); "
            "median of `reps` interleaved runs after warm-up, jitted, same batch. "
            "`load`: the 1-minute load average after each row, where recorded (other jobs shared the CPU). "
            f"Load average (1/5/15 min) of the last run: before {bench.fmt_load(env['loadavg_1_5_15_before'])}, "
            f"after {bench.fmt_load(env['loadavg_1_5_15_after'])}. Target: g&f / grad <= 1.2x.\n\n")
    f.write(table + "\n")
    f.write(NOTES)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--only", nargs="*", default=(), help="substrings of model names")
  ap.add_argument("--md-only", action="store_true", help="rewrite the .md from the committed .json")
  args = ap.parse_args()
  if args.md_only:
    with open(os.path.join(HERE, "results", "grad_and_fisher.json")) as f:
      saved = json.load(f)
    write_md(os.path.join(HERE, "results", "grad_and_fisher.md"), saved["env"], saved["rows"])
    return
  reps = 2 if args.quick else args.reps
  load_before = os.getloadavg()
  rows = run(args.quick, reps, args.only)
  load_after = os.getloadavg()
  print("\n" + "\n".join([HEADER, "|" + "---|" * 12] + [fmt_row(r) for r in rows]))
  if args.quick:
    return
  out = os.path.join(HERE, "results")
  path = os.path.join(out, "grad_and_fisher.json")
  command = " ".join(["python benchmarks/grad_and_fisher.py"] + sys.argv[1:])
  for r in rows:
    r["command"] = command
  if args.only:  # replace those rows in the committed results, keep the others
    with open(path) as f:
      saved = json.load(f)
    for r in saved["rows"]:
      r.setdefault("command", saved["env"]["command"])
    fresh = {r["model"]: r for r in rows}
    rows = [fresh.pop(r["model"], r) for r in saved["rows"]] + list(fresh.values())
  env = {"jax": jax.__version__, "backend": jax.default_backend(), "cpu_count": os.cpu_count(),
         "platform": platform.platform(),
         "command": command,
         "loadavg_1_5_15_before": load_before, "loadavg_1_5_15_after": load_after}
  with open(path, "w") as f:
    json.dump({"env": env, "rows": rows}, f, indent=1)
  write_md(os.path.join(out, "grad_and_fisher.md"), env, rows)


if __name__ == "__main__":
  main()
