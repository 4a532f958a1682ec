"""Fisher-weighted merging (``wj.fisher_merge``) on the language-model scenario, beside plain averaging.

Merge the pretrained model (prose, A) with the model plainly fine-tuned on
Python (B, the scenario's ``plain`` arm, same key), each weighted by its own
diagonal Fisher on its own domain (true Fisher, one sampled continuation per
position, ``importance_examples`` sequences; raw, not normalised: the two
Fishers' relative scale is what merging weighs), and compare held-out
perplexity on A and B with plain weight averaging. ``alpha`` is B's model
weight: ``theta = sum_i w_i (F_i + eps) theta_i / sum_i w_i (F_i + eps)``
with ``w = (1 - alpha, alpha)`` (Matena & Raffel's lambda), and the plain
average ``(1 - alpha) theta_A + alpha theta_B``.

``python -m experiments.elephants merge [--seeds 0 1 2]`` appends to
``results/merge.jsonl`` (``experiments.results.ResultStore``; finished seeds
are skipped) and writes ``results/merge.md`` with the scenario's
consolidation arms of the same seeds beside it.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

import wva_jax as wj
from experiments.elephants import model as lm
from experiments.elephants import scenario, train
from experiments.results import ResultStore, provenance, with_provenance

ALPHAS = (0.25, 0.5, 0.75)
EPS = 1e-8
OUT = scenario.RESULTS / "merge.jsonl"


def raw_fisher(apply_fn, params, domain, n: int, seed: int):
  """The scenario's Fisher (``train.importance_on_a``'s ``fisher``) without the mean normalisation."""
  x, _, m = lm.split_batch(domain.train[:n], domain.train_mask[:n])
  return wj.importance.fisher(apply_fn, params, x, mode="sampled", key=jax.random.key(seed), mask=m, chunk_size=32)


def run_seed(sc: scenario.Scenario, store: ResultStore, log=print) -> None:
  a, b, apply_fn, params_a, _, _ = scenario.prepare(sc, log)
  train_b, eval_a, eval_b = scenario._arrays(sc, a, b)
  t0 = time.time()
  # The scenario's plain arm: the same run function and key, so the same fine-tuned model.
  params_b, curve = train.make_run(apply_fn, "plain", sc.sched)(params_a, None, jnp.float32(0.0),
                                                                 jax.random.key(sc.seed + 1), train_b, eval_a, eval_b)
  t_ft = time.time() - t0
  t0 = time.time()
  f_a = raw_fisher(apply_fn, params_a, a, sc.importance_examples, sc.seed)
  f_b = raw_fisher(apply_fn, params_b, b, sc.importance_examples, sc.seed)
  t_fisher = time.time() - t0
  evaluate = jax.jit(lambda p: jnp.stack([train.eval_loss(apply_fn, p, *eval_a),
                                          train.eval_loss(apply_fn, p, *eval_b)]))
  merge = jax.jit(lambda w: wj.fisher_merge([params_a, params_b], [f_a, f_b], eps=EPS, weights=[1.0 - w, w]))
  average = jax.jit(lambda w: jax.tree_util.tree_map(lambda x, y: (1.0 - w) * x + w * y, params_a, params_b))
  rows = [("pretrained", None, params_a), ("fine-tuned (plain)", None, params_b)]
  prov = provenance()
  for alpha in ALPHAS:
    rows.append(("average", alpha, average(jnp.float32(alpha))))
    rows.append(("fisher_merge", alpha, merge(jnp.float32(alpha))))
  ratio = float(sum(jnp.sum(x) for x in jax.tree_util.tree_leaves(f_b))
                / sum(jnp.sum(x) for x in jax.tree_util.tree_leaves(f_a)))
  for method, alpha, p in rows:
    nll = np.asarray(evaluate(p))
    rec = {"run_id": f"merge-s{sc.seed}-{method}-{alpha}", "experiment": "elephants_merge", "method": method,
           "alpha": alpha, "seed": sc.seed, "nll_a": float(nll[0]), "nll_b": float(nll[1]),
           "ppl_a": float(np.exp(nll[0])), "ppl_b": float(np.exp(nll[1])), "eps": EPS,
           "fine_tune_seconds": round(t_ft, 1), "fisher_seconds": round(t_fisher, 1),
           "fisher_b_over_a": ratio, "fine_tuned_curve_ppl": np.exp(np.asarray(curve)).tolist(),
           "config": {"model": scenario.dataclasses.asdict(sc.cfg), "schedule": scenario.dataclasses.asdict(sc.sched),
                      "pretrain_steps": sc.pretrain_steps, "importance_examples": sc.importance_examples}}
    store.append(with_provenance(rec, prov))
    log(f"seed {sc.seed} {method:18s} alpha={alpha!s:5s} ppl A {rec['ppl_a']:.3f}, ppl B {rec['ppl_b']:.3f}")


def report(store: ResultStore, scenario_jsonl=scenario.RESULTS / "scenario.jsonl") -> str:
  recs = store.records()
  seeds = sorted({r["seed"] for r in recs})
  lines = ["# Fisher merging on the language-model scenario", "",
           "Command: `python -m experiments.elephants merge --seeds " + " ".join(map(str, seeds)) + "` "
           "(`experiments/elephants/merge.py`). The pretrained model (A: prose) merged with the model plainly "
           "fine-tuned on B (Python source; the scenario's `plain` arm, same key): `wj.fisher_merge` with each "
           "model's raw diagonal Fisher on its own domain and model weights `(1 - alpha, alpha)`, beside the "
           "plain average `(1 - alpha) theta_A + alpha theta_B`. Held-out perplexity after the scenario's "
           f"{recs[0]['config']['schedule']['steps'] if recs else '?'} fine-tuning steps; "
           "lower is better on both.", ""]
  if len(seeds) > 1:
    lines += [f"## Mean over seeds {', '.join(map(str, seeds))} (min - max)", "",
              "| model | alpha | ppl A (old) | ppl B (new) |", "|---|---|---|---|"]
    keys = list(dict.fromkeys((r["method"], r["alpha"]) for r in recs))
    for method, alpha in keys:
      rs = [r for r in recs if (r["method"], r["alpha"]) == (method, alpha)]
      pa, pb = np.array([r["ppl_a"] for r in rs]), np.array([r["ppl_b"] for r in rs])
      lines.append(f"| {method} | {'' if alpha is None else alpha} | {pa.mean():.3f} ({pa.min():.3f} - {pa.max():.3f}) "
                   f"| {pb.mean():.3f} ({pb.min():.3f} - {pb.max():.3f}) |")
    lines.append("")
  for seed in seeds:
    rs = [r for r in recs if r["seed"] == seed]
    lines += [f"## Seed {seed}", "", "| model | alpha | ppl A (old) | ppl B (new) |", "|---|---|---|---|"]
    lines += [f"| {r['method']} | {'' if r['alpha'] is None else r['alpha']} | {r['ppl_a']:.3f} | {r['ppl_b']:.3f} |"
              for r in rs]
    lines += ["", f"Fisher mass B / A: {rs[0]['fisher_b_over_a']:.3g}; fine-tuning {rs[0]['fine_tune_seconds']} s, "
              f"both Fishers {rs[0]['fisher_seconds']} s.", ""]
    if scenario_jsonl.exists():
      arms = ResultStore(scenario_jsonl).records()
      arms = [r for r in arms if r["config"]["seed"] == seed and r["dtype"] == "float32"
              and r["method"] in ("plain", "wva", "ewc", "implicit_ewc") and r["importance"] in (None, "fisher")]
      if arms:
        lines += ["The consolidation arms of the same seed (`results/scenario.jsonl`, final step):", "",
                  "| arm | lambda | ppl A (old) | ppl B (new) |", "|---|---|---|---|"]
        lines += [f"| {r['method']} | {r['strength']:g} | {r['ppl_a'][-1]:.3f} | {r['ppl_b'][-1]:.3f} |" for r in arms]
        lines.append("")
  text = "\n".join(lines)
  (scenario.RESULTS / "merge.md").write_text(text)
  return text


def main(seeds=(0,), log=print) -> str:
  store = ResultStore(OUT)
  done = {r["seed"] for r in store.records()}
  for seed in seeds:
    if seed in done:
      log(f"seed {seed}: already in {OUT.name}")
      continue
    run_seed(scenario.dataclasses.replace(scenario.Scenario(), seed=int(seed)), store, log)
  return report(store)
