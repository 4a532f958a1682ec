"""Tables and plots from ``results/scenario[-quick].jsonl``: curves over steps and Pareto fronts, over seeds.

A run's final point is ``(ppl_B, ppl_A)`` after fine-tuning: lower ``ppl_B``
is better learning of the new domain, lower ``ppl_A`` less forgetting of the
old one. A point is on its method's Pareto front when no other lambda of the
same method is at least as good on both and better on one.

Each seed is an independent replicate (its own pretrained model, importance
and fine-tuning batches). Numbers over seeds are means with a 95% Student-t
interval (``experiments.stats.mean_ci``); orderings between methods are
compared seed by seed, since every method of a seed starts from the same
pretrained model.
"""
from __future__ import annotations

import itertools
import math
import pathlib

from experiments.elephants.scenario import RESULTS
from experiments.results import ResultStore
from experiments.stats import mean_ci

MATCH = 1.1   # matched learning: ppl B = MATCH x plain fine-tuning's, per seed


def arm(r) -> str:
  if r["method"] == "plain":
    return "plain Adam"
  if r["method"] == "lora":
    return "LoRA"
  if r["method"] in ("mofo", "lora_mofo"):   # lambda is the fraction moved
    return {"mofo": "MoFO", "lora_mofo": "LoRA + MoFO"}[r["method"]]
  name = {"wva": "WVA", "ewc": "EWC", "implicit_ewc": "implicit EWC", "lora_ewc": "LoRA + EWC",
          "lora_wva": "LoRA + WVA"}[r["method"]]
  imp = {"fisher": "Fisher", "fisher_reversed": "Fisher(reversed)", "fisher_emp": "Fisher(empirical)",
         "fisher_online": "Fisher(online)"}.get(r["importance"], r["importance"].upper())
  return f"{name}-{imp}" + (" (bf16)" if r["dtype"] == "bfloat16" else "")


def seed_of(r) -> int:
  """The run's seed; records without a config (the notebook's) are one replicate, seed 0."""
  return r.get("config", {}).get("seed", 0)


def load(path: pathlib.Path) -> list[dict]:
  """The runs in ``path`` (``ResultStore``: a line torn by a crash is skipped); FileNotFoundError if none."""
  if not path.exists():
    raise FileNotFoundError(path)
  return ResultStore(path).records()


def pareto(points):
  """Indices of the non-dominated ``(x, y)`` points (both minimised)."""
  keep = []
  for i, (x, y) in enumerate(points):
    if not any((u <= x and v <= y) and (u < x or v < y) for j, (u, v) in enumerate(points) if j != i):
      keep.append(i)
  return keep


def by_arm(runs):
  """``{arm: [runs sorted by lambda]}`` in first-seen order."""
  arms = {}
  for r in runs:
    arms.setdefault(arm(r), []).append(r)
  for a in arms.values():
    a.sort(key=lambda r: (r["strength"], seed_of(r)))
  return arms


def by_seed(runs) -> dict:
  """``{seed: [runs]}``, seeds ascending."""
  out = {}
  for r in sorted(runs, key=seed_of):
    out.setdefault(seed_of(r), []).append(r)
  return out


def by_lambda(rs) -> dict:
  """``{lambda: [runs of every seed]}`` for one arm's runs."""
  out = {}
  for r in rs:
    out.setdefault(r["strength"], []).append(r)
  return out


def fmt(values, digits: int = 3) -> str:
  """``mean ± half-width`` of a 95% t interval; just the value when there is one."""
  m, hw, n = mean_ci(values)
  if n == 0:
    return "n/a"
  return f"{m:.{digits}f}" if n == 1 else f"{m:.{digits}f} ± {hw:.{digits}f}"


def final(r) -> tuple[float, float]:
  """``(ppl_B, ppl_A)`` after fine-tuning."""
  return r["ppl_b"][-1], r["ppl_a"][-1]


def mean_points(rs) -> list[tuple[float, float, float]]:
  """Per lambda of one arm: ``(lambda, mean ppl_B, mean ppl_A)`` over seeds."""
  out = []
  for lam, group in sorted(by_lambda(rs).items()):
    out.append((lam, sum(final(r)[0] for r in group) / len(group), sum(final(r)[1] for r in group) / len(group)))
  return out


def table(runs) -> str:
  """Final perplexities per (method, lambda), mean ± 95% CI over seeds; fronts from the means."""
  arms = by_arm(runs)
  seeds = sorted(by_seed(runs))
  means = {name: mean_points(rs) for name, rs in arms.items()}
  all_pts = [(b, a) for pts in means.values() for _, b, a in pts]
  global_front = {all_pts[i] for i in pareto(all_pts)}
  pre = [(by_seed(runs)[s][0]["ppl_a"][0], by_seed(runs)[s][0]["ppl_b"][0]) for s in seeds]
  over = "" if len(seeds) == 1 else f", mean ± 95% CI over {len(seeds)} seeds"
  lines = [f"Pretrained: ppl A {fmt([p[0] for p in pre])}, ppl B {fmt([p[1] for p in pre])} "
           f"(bytes; lower is better{over}). After {runs[0]['steps'][-1]} fine-tuning steps on B:", "",
           "| method | lambda | ppl A (forgetting) | ppl B (learning) | n | method's front | overall front |",
           "|---|---|---|---|---|---|---|"]
  for name, rs in arms.items():
    groups = sorted(by_lambda(rs).items())
    pts = [(b, a) for _, b, a in means[name]]
    front = set(pareto(pts))
    for i, (lam, group) in enumerate(groups):
      lines.append(f"| {name} | {lam:g} | {fmt([final(r)[1] for r in group])} | "
                   f"{fmt([final(r)[0] for r in group])} | {len(group)} | {'yes' if i in front else ''} | "
                   f"{'**yes**' if pts[i] in global_front else ''} |")
  return "\n".join(lines) + "\n"


def every_run(runs) -> str:
  """One row per run (seed, method, lambda): the numbers the means come from."""
  lines = ["| seed | method | lambda | ppl A | ppl B | seconds |", "|---|---|---|---|---|---|"]
  for s, rs in by_seed(runs).items():
    for name, group in by_arm(rs).items():
      for r in group:
        lines.append(f"| {s} | {name} | {r['strength']:g} | {r['ppl_a'][-1]:.3f} | {r['ppl_b'][-1]:.3f} | "
                     f"{r.get('seconds', math.nan):.0f} |")
  return "\n".join(lines) + "\n"


def matched(rs, target_b: float, origin=None) -> tuple:
  """``(ppl A, via_origin)`` where one arm's (one seed's) lambda curve crosses ppl B = ``target_b``.

  Linear interpolation between the grid points adjacent in ppl B; ``(None,
  False)`` when the grid does not bracket the target. ``origin``, plain
  fine-tuning's run, is every method's lambda = 0 point (the same Adam run:
  zero strength adds or attenuates nothing), so it closes the curve's
  low-lambda end; ``via_origin`` says the crossing used it.
  """
  got = crossing(rs, target_b, origin)
  return (None, False) if got is None else (got["ppl_a"], got["via_origin"])


def crossing(rs, target_b: float, origin=None) -> dict | None:
  """The segment of ``matched``: ppl A there, its two ends ``(lambda, ppl B)`` and ``via_origin``."""
  pts = sorted([(final(r), r["strength"], False) for r in rs]
               + ([(final(origin), 0.0, True)] if origin is not None else []))
  out = None
  for ((b0, a0), l0, o0), ((b1, a1), l1, o1) in zip(pts, pts[1:]):
    if b0 <= target_b <= b1 and b1 > b0:
      out = {"ppl_a": a0 + (a1 - a0) * (target_b - b0) / (b1 - b0), "via_origin": o0 or o1,
             "ends": ((l0, b0), (l1, b1))}
  return out


def targets(runs, ref: str = "plain") -> dict:
  """``{seed: ppl B target}``: MATCH x that seed's ppl B of the ``ref`` method's run
  (``plain``: plain fine-tuning; ``lora``: plain LoRA, which learns less)."""
  out = {}
  for s, rs in by_seed(runs).items():
    base = [r for r in rs if r["method"] == ref]
    out[s] = (base[0] if base else rs[0])["ppl_b"][-1] * MATCH
  return out


def origin(name: str, seed_runs) -> dict | None:
  """An arm's lambda = 0 run in one seed: plain Adam for full-weight arms, plain LoRA for LoRA + X."""
  # MoFO's grid is its fraction moved: plain Adam is its fraction 1, not a lambda-0 end
  if name in ("plain Adam", "LoRA", "MoFO", "LoRA + MoFO"):
    return None
  base = "lora" if name.startswith("LoRA") else "plain"
  return next((r for r in seed_runs if r["method"] == base), None)


def matched_by_seed(runs, with_origin: bool = False, ref: str = "plain") -> dict:
  """``{arm: {seed: ppl A at matched learning or None}}`` (``with_origin``: ``(value, via_origin)``)."""
  tgt = targets(runs, ref)
  out = {}
  for s, rs in by_seed(runs).items():
    for name, group in by_arm(rs).items():
      got = matched(group, tgt[s], origin(name, rs))
      out.setdefault(name, {})[s] = got if with_origin else got[0]
  return out


def via_origin_notes(runs, ref: str = "plain") -> list[str]:
  """For each float32 (seed, arm) whose crossing uses its lambda-0 run: where the target sits on it."""
  tgt, notes = targets(runs, ref), []
  for s, rs in by_seed(runs).items():
    for name, group in by_arm(rs).items():
      got = None if origin(name, rs) is None or "bf16" in name else crossing(group, tgt[s], origin(name, rs))
      if got and got["via_origin"]:
        (l0, b0), (l1, b1) = got["ends"]
        notes.append(f"seed {s} {name}, ppl B {b0:.3f} at lambda {l0:g} and {b1:.3f} at lambda {l1:g}, "
                     f"target {tgt[s]:.3f} ({(tgt[s] - b0) / (b1 - b0):.0%} of the way)")
  return notes


def at_matched_learning(runs, ref: str = "plain") -> str:
  """Per arm: ppl A at matched learning (target from ``ref``, see ``targets``) for each seed, and mean ± 95% CI."""
  seeds = sorted(by_seed(runs))
  tgt = targets(runs, ref)
  vals = matched_by_seed(runs, with_origin=True, ref=ref)
  head = " | ".join(f"seed {s} (B = {tgt[s]:.2f})" for s in seeds)
  out = [f"| method | {head} | mean ± 95% CI | n |", "|---|" + "---|" * (len(seeds) + 2)]
  for name, per in vals.items():
    # plain Adam / LoRA: one point each, given below; bf16: the float32 runs to ~1e-5 (bf16_gap), on a shorter grid
    if name in ("plain Adam", "LoRA") or "bf16" in name:
      continue
    cells = " | ".join("n/a" if per[s][0] is None else f"{per[s][0]:.3f}" + ("*" if per[s][1] else "")
                       for s in seeds)
    got = [per[s][0] for s in seeds]
    n = sum(v is not None for v in got)
    out.append(f"| {name} | {cells} | {fmt([v for v in got if v is not None]) if n else 'n/a (out of range)'} | {n} |")
  notes = via_origin_notes(runs, ref)
  if notes:
    out += ["", "\\* the target lies between lambda 0 (plain fine-tuning; plain LoRA for the LoRA arms) and the grid's "
            "smallest lambda: "
            + "; ".join(notes) + "."]
  for method, label in (("plain", "Plain fine-tuning (no consolidation)"),
                        ("lora", "Plain LoRA (adapters only, no consolidation)")):
    single = {s: [r for r in rs if r["method"] == method] for s, rs in by_seed(runs).items()}
    if all(single.values()):
      pa, pb = [single[s][0]["ppl_a"][-1] for s in seeds], [single[s][0]["ppl_b"][-1] for s in seeds]
      out += ["", f"{label}, per seed: ppl A {', '.join(f'{v:.3f}' for v in pa)} (mean {fmt(pa)}) at ppl B "
              f"{', '.join(f'{v:.3f}' for v in pb)} (mean {fmt(pb)})."]
  return "\n".join(out) + "\n"


def comparable_arms(vals: dict, seeds) -> list[str]:
  """Arms with a matched-learning value on every seed, bf16 copies left out (they equal float32)."""
  return [a for a, per in vals.items() if "bf16" not in a and all(per.get(s) is not None for s in seeds)]


def orderings(runs, ref: str = "plain") -> list[dict]:
  """Per pair of arms (``a`` ahead, i.e. lower mean ppl A): seeds where a < b, paired difference b - a."""
  seeds = sorted(by_seed(runs))
  vals = matched_by_seed(runs, ref=ref)
  arms = comparable_arms(vals, seeds)
  mean = {a: sum(vals[a][s] for s in seeds) / len(seeds) for a in arms}
  out = []
  for x, y in itertools.combinations(sorted(arms, key=mean.get), 2):
    diffs = [vals[y][s] - vals[x][s] for s in seeds]
    m, hw, n = mean_ci(diffs)
    out.append({"ahead": x, "behind": y, "wins": sum(d > 0 for d in diffs), "n": n, "diffs": diffs,
                "mean_diff": m, "ci": hw, "every_seed": all(d > 0 for d in diffs)})
  return out


def orderings_table(runs, ref: str = "plain") -> str:
  """Markdown: each pair, the per-seed differences and whether the ordering held on every seed."""
  lines = ["| ahead (lower ppl A) | behind | ppl A behind - ahead, per seed | mean ± 95% CI | "
           "held on every seed | interval excludes 0 |", "|---|---|---|---|---|---|"]
  for o in orderings(runs, ref):
    per = ", ".join(f"{d:+.3f}" for d in o["diffs"])
    ci = f"{o['mean_diff']:.3f}" + ("" if o["n"] < 2 else f" ± {o['ci']:.3f}")
    held = f"**yes** ({o['wins']}/{o['n']})" if o["every_seed"] else f"no ({o['wins']}/{o['n']})"
    excl = "" if o["n"] < 2 else ("yes" if o["mean_diff"] - o["ci"] > 0 else "no")
    lines.append(f"| {o['ahead']} | {o['behind']} | {per} | {ci} | {held} | {excl} |")
  if len(lines) == 2:
    return "None: fewer than two methods reach the target on every seed.\n"
  return "\n".join(lines) + "\n"


def bf16_gap(runs) -> float | None:
  """Largest |final ppl (bf16) - final ppl (float32)| over runs that exist in both storages."""
  key = lambda r: (seed_of(r), r["method"], r["importance"], r["strength"])
  f32 = {key(r): r for r in runs if r["dtype"] == "float32"}
  gaps = [abs(u - v) for r in runs if r["dtype"] == "bfloat16" and key(r) in f32
          for u, v in zip(final(r), final(f32[key(r)]))]
  return max(gaps) if gaps else None


def _colors(names):
  import matplotlib.pyplot as plt
  return dict(zip(names, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 3))


def plot_pareto(runs, path: pathlib.Path):
  """Per arm the mean over seeds of (ppl B, ppl A) per lambda; each seed's points faint."""
  import matplotlib.pyplot as plt
  arms = by_arm(runs)
  colors = _colors(arms)
  n_seeds = len(by_seed(runs))
  fig, ax = plt.subplots(figsize=(7, 5))
  for name, rs in arms.items():
    plain = name == "plain Adam"
    pts = mean_points(rs)
    ax.plot([b for _, b, _ in pts], [a for _, _, a in pts], "--" if "bf16" in name else "-",
            marker="*" if plain else "o", ms=14 if plain else 7, color=colors[name], label=name)
    if n_seeds > 1:
      ax.scatter([final(r)[0] for r in rs], [final(r)[1] for r in rs], s=60 if plain else 14,
                 marker="*" if plain else "o", color=colors[name], alpha=0.25, linewidths=0)
    for lam, b, a in pts:
      if not plain:
        ax.annotate(f"{lam:g}", (b, a), fontsize=7, xytext=(3, 3), textcoords="offset points")
  first = [rs[0] for rs in by_seed(runs).values()]
  ax.plot([sum(r["ppl_b"][0] for r in first) / len(first)], [sum(r["ppl_a"][0] for r in first) / len(first)],
          "kx", ms=10, label="pretrained (before B)")
  ax.set_xlabel("perplexity on held-out B (Python source): learning")
  ax.set_ylabel("perplexity on held-out A (English prose): forgetting")
  seeds = "" if n_seeds == 1 else f"\nlines: mean over {n_seeds} seeds; faint points: each seed"
  ax.set_title(f"Forgetting vs learning over the lambda grid (labels: lambda){seeds}", fontsize=10)
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_curves(runs, path: pathlib.Path):
  """The middle lambda of each arm's grid over fine-tuning steps: mean over seeds, each seed faint."""
  import matplotlib.pyplot as plt
  import numpy as np
  arms = by_arm(runs)
  colors = _colors(arms)
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for name, rs in arms.items():
    lams = sorted(by_lambda(rs))
    group = by_lambda(rs)[lams[len(lams) // 2]]   # the middle of each grid, and plain
    r = group[0]
    for ax, key in zip(axes, ["ppl_a", "ppl_b"]):
      curves = np.asarray([g[key] for g in group])
      if len(group) > 1:
        for c in curves:
          ax.plot(r["steps"], c, "-", color=colors[name], alpha=0.2, lw=0.8)
      ax.plot(r["steps"], curves.mean(0), "--" if "bf16" in name else "-", color=colors[name],
              label=f"{name}" + ("" if r["method"] == "plain" else f" lambda={r['strength']:g}"))
  n_seeds = len(by_seed(runs))
  extra = "" if n_seeds == 1 else f" (mean of {n_seeds} seeds; faint: each)"
  axes[0].set_title("held-out A (prose): forgetting" + extra, fontsize=10)
  axes[1].set_title("held-out B (Python): learning" + extra, fontsize=10)
  for ax in axes:
    ax.set_xlabel("fine-tuning step on B")
    ax.set_ylabel("perplexity")
    ax.grid(alpha=0.3)
  axes[1].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plots(runs, out_dir: pathlib.Path, suffix: str = ""):
  """``pareto{suffix}.png`` and ``curves{suffix}.png`` in ``out_dir``."""
  import matplotlib
  matplotlib.use("Agg")
  plot_pareto(runs, out_dir / f"pareto{suffix}.png")
  plot_curves(runs, out_dir / f"curves{suffix}.png")


def setup(runs) -> list[str]:
  """The model, schedule and data paragraph, and one line per seed (pretraining)."""
  c = runs[0]["config"]
  lines = [f"Model: byte-level decoder-only transformer (Flax NNX), {c['params']:,} parameters, "
           f"{c['model']}. Pretrained {c['pretrain_steps']} Adam steps on A, then "
           f"{c['schedule']['steps']} Adam steps (lr {c['schedule']['lr']}, batch {c['schedule']['batch']}) on B. "
           f"Importance on {c['importance_examples']} A sequences, mean-normalised. Held-out "
           f"perplexity per byte on {c['schedule']['eval_size']} sequences of each domain.", "",
           f"Data: A = {c['data']['A']['source']} (sha256 {c['data']['A']['sha256'][:16]}..., "
           f"{c['data']['A']['train']} train sequences); B = {c['data']['B']['source']} "
           f"(sha256 {c['data']['B']['sha256'][:16]}..., {c['data']['B']['train']} train sequences).", "",
           "Seeds (each an independent replicate: model init, pretraining batches, Fisher samples and "
           "fine-tuning batches):", ""]
  for s, rs in by_seed(runs).items():
    cs = rs[0]["config"]
    lines.append(f"* seed {s}: {len(rs)} runs; pretraining final train NLL {cs['pretrain_final_nll']:.3f} "
                 f"nats/byte ({cs['pretrain_seconds']:.0f} s); fine-tuning runs "
                 f"{sum(r['seconds'] for r in rs) / 60:.1f} min in all")
  return lines


def markdown(runs, quick: bool = False, suffix: str = "") -> str:
  """results/README[-quick].md from the runs."""
  seeds = sorted(by_seed(runs))
  q = " --quick" if quick else ""
  gap = bf16_gap(runs)
  md = [f"# Elephants scenario results{' (quick)' if quick else ''}", "",
        f"Command: `python -m experiments.elephants scenario{q} --seeds {' '.join(map(str, seeds))}` then "
        f"`python -m experiments.elephants report{q}`.", "", *setup(runs), "",
        f"![pareto](pareto{suffix}.png)", "", f"![curves](curves{suffix}.png)", "",
        "## Final perplexities and Pareto fronts", "", table(runs), "",
        "## Forgetting at matched learning", "",
        f"ppl A where each method's lambda curve reaches ppl B = {MATCH} x plain fine-tuning's, per seed "
        f"(linear interpolation between grid points, plain fine-tuning being every full-weight method's "
        f"lambda 0 and plain LoRA every LoRA method's; "
        f"the target is each seed's own), and the mean with a 95% Student-t interval over the n seeds:", "",
        at_matched_learning(runs), "",
        "Orderings at matched learning (float32 methods with a value on every seed; the difference is "
        "paired by seed, positive when the first method forgets less):", "", orderings_table(runs), ""]
  if any(r["method"] == "lora" for r in runs):
    md += ["## LoRA against full fine-tuning, at LoRA's learning", "",
           "LoRA trains rank-8 adapters on the blocks' kernels (`experiments/elephants/adapters.py`) and "
           "learns less of B than full fine-tuning in the same steps, so the LoRA arms rarely reach the "
           "target above. Here the target is "
           f"ppl B = {MATCH} x plain LoRA's, per seed, which every arm's lambda curve can reach: ppl A there "
           "(same interpolation; lambda 0 is plain fine-tuning for the full-weight arms and plain LoRA for "
           "the LoRA arms):", "", at_matched_learning(runs, "lora"), "",
           "Orderings at this target (paired by seed):", "", orderings_table(runs, "lora"), "",
           "Memory of each arm's training state: `results/memory.md` (`python -m experiments.elephants memory`).", ""]
  if gap is not None:
    md += [f"bfloat16 importance storage: largest |ppl(bf16) - ppl(float32)| over the runs in both "
           f"storages: {gap:.2g}.", ""]
  md += ["## Every run", "", every_run(runs)]
  return "\n".join(md)


def main(quick: bool = False):
  suffix = "-quick" if quick else ""
  runs = load(RESULTS / f"scenario{suffix}.jsonl")
  plots(runs, RESULTS, suffix)
  md = markdown(runs, quick, suffix)
  (RESULTS / f"README{suffix}.md").write_text(md)
  print(md)
