"""Tables and plots from ``results/scenario[-quick].jsonl``: curves over steps and Pareto fronts.

A run's final point is ``(ppl_B, ppl_A)`` after fine-tuning: lower ``ppl_B``
is better learning of the new domain, lower ``ppl_A`` less forgetting of the
old one. A point is on its method's Pareto front when no other lambda of the
same method is at least as good on both and better on one.
"""
from __future__ import annotations

import json
import pathlib

from experiments.elephants.scenario import RESULTS


def arm(r) -> str:
  if r["method"] == "plain":
    return "plain Adam"
  name = {"wva": "WVA", "ewc": "EWC", "implicit_ewc": "implicit EWC"}[r["method"]]
  return f"{name}-{r['importance'].upper() if r['importance'] != 'fisher' else 'Fisher'}" + (
      " (bf16)" if r["dtype"] == "bfloat16" else "")


def load(path: pathlib.Path) -> list[dict]:
  return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def pareto(points):
  """Indices of the non-dominated ``(x, y)`` points (both minimised)."""
  keep = []
  for i, (x, y) in enumerate(points):
    if not any((u <= x and v <= y) and (u < x or v < y) for j, (u, v) in enumerate(points) if j != i):
      keep.append(i)
  return keep


def by_arm(runs):
  arms = {}
  for r in runs:
    arms.setdefault(arm(r), []).append(r)
  for a in arms.values():
    a.sort(key=lambda r: r["strength"])
  return arms


def table(runs) -> str:
  arms = by_arm(runs)
  all_pts = [(r["ppl_b"][-1], r["ppl_a"][-1]) for r in runs]
  global_front = {all_pts[i] for i in pareto(all_pts)}
  r0 = runs[0]
  lines = [f"Pretrained: ppl A {r0['ppl_a'][0]:.3f}, ppl B {r0['ppl_b'][0]:.3f} "
           f"(bytes; lower is better). After {r0['steps'][-1]} fine-tuning steps on B:", "",
           "| method | lambda | ppl A (forgetting) | ppl B (learning) | method's front | overall front |",
           "|---|---|---|---|---|---|"]
  for name, rs in arms.items():
    pts = [(r["ppl_b"][-1], r["ppl_a"][-1]) for r in rs]
    front = set(pareto(pts))
    for i, r in enumerate(rs):
      lines.append(f"| {name} | {r['strength']:g} | {r['ppl_a'][-1]:.3f} | {r['ppl_b'][-1]:.3f} | "
                   f"{'yes' if i in front else ''} | {'**yes**' if pts[i] in global_front else ''} |")
  return "\n".join(lines) + "\n"


def at_matched_learning(runs, target_b: float) -> str:
  """Per arm, ppl A interpolated (in log lambda order) where ppl B crosses ``target_b``."""
  out = ["| method | ppl A at ppl B = %.2f |" % target_b, "|---|---|"]
  for name, rs in by_arm(runs).items():
    pts = sorted((r["ppl_b"][-1], r["ppl_a"][-1]) for r in rs)
    val = None
    for (b0, a0), (b1, a1) in zip(pts, pts[1:]):
      if b0 <= target_b <= b1 and b1 > b0:
        val = a0 + (a1 - a0) * (target_b - b0) / (b1 - b0)
    out.append(f"| {name} | {'%.3f' % val if val is not None else 'n/a (out of range)'} |")
  return "\n".join(out) + "\n"


def plots(runs, out_dir: pathlib.Path, suffix: str = ""):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  arms = by_arm(runs)
  colors = dict(zip(arms, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 3))
  fig, ax = plt.subplots(figsize=(7, 5))
  for name, rs in arms.items():
    pts = [(r["ppl_b"][-1], r["ppl_a"][-1]) for r in rs]
    style = "--" if "bf16" in name else "-"
    ax.plot(*zip(*pts), style, marker="o" if name != "plain Adam" else "*", ms=7 if name != "plain Adam" else 14,
            color=colors[name], label=name)
    for (x, y), r in zip(pts, rs):
      if r["method"] != "plain":
        ax.annotate(f"{r['strength']:g}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
  r0 = runs[0]
  ax.plot([r0["ppl_b"][0]], [r0["ppl_a"][0]], "kx", ms=10, label="pretrained (before B)")
  ax.set_xlabel("perplexity on held-out B (Python source): learning")
  ax.set_ylabel("perplexity on held-out A (English prose): forgetting")
  ax.set_title("Forgetting vs learning over the lambda grid (labels: lambda)")
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(out_dir / f"pareto{suffix}.png", dpi=110)
  plt.close(fig)

  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for name, rs in arms.items():
    # the middle of each grid, and plain
    r = rs[len(rs) // 2]
    for ax, key in zip(axes, ["ppl_a", "ppl_b"]):
      ax.plot(r["steps"], r[key], "--" if "bf16" in name else "-", color=colors[name],
              label=f"{name}" + ("" if r["method"] == "plain" else f" lambda={r['strength']:g}"))
  axes[0].set_title("held-out A (prose): forgetting")
  axes[1].set_title("held-out B (Python): learning")
  for ax in axes:
    ax.set_xlabel("fine-tuning step on B")
    ax.set_ylabel("perplexity")
    ax.grid(alpha=0.3)
  axes[1].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out_dir / f"curves{suffix}.png", dpi=110)
  plt.close(fig)


def main(quick: bool = False):
  suffix = "-quick" if quick else ""
  runs = load(RESULTS / f"scenario{suffix}.jsonl")
  plots(runs, RESULTS, suffix)
  plain = [r for r in runs if r["method"] == "plain"]
  target = plain[0]["ppl_b"][-1] * 1.1 if plain else runs[0]["ppl_b"][-1]
  c = runs[0]["config"]
  md = [f"# Elephants scenario results{' (quick)' if quick else ''}", "",
        f"Command: `python -m experiments.elephants scenario{' --quick' if quick else ''}` then "
        f"`python -m experiments.elephants report{' --quick' if quick else ''}`.", "",
        f"Model: byte-level decoder-only transformer (Flax NNX), {c['params']:,} parameters, "
        f"{c['model']}. Pretrained {c['pretrain_steps']} Adam steps on A (final train NLL "
        f"{c['pretrain_final_nll']:.3f} nats/byte, {c['pretrain_seconds']:.0f} s), then "
        f"{c['schedule']['steps']} Adam steps (lr {c['schedule']['lr']}, batch {c['schedule']['batch']}) on B. "
        f"Importance on {c['importance_examples']} A sequences, mean-normalised. Held-out "
        f"perplexity per byte on {c['schedule']['eval_size']} sequences of each domain.", "",
        f"Data: A = {c['data']['A']['source']} (sha256 {c['data']['A']['sha256'][:16]}..., "
        f"{c['data']['A']['train']} train sequences); B = {c['data']['B']['source']} "
        f"(sha256 {c['data']['B']['sha256'][:16]}..., {c['data']['B']['train']} train sequences).", "",
        f"![pareto](pareto{suffix}.png)", "", f"![curves](curves{suffix}.png)", "",
        "## Final perplexities and Pareto fronts", "", table(runs), "",
        "## Forgetting at matched learning", "",
        "ppl A where each method's lambda curve reaches ppl B = 1.1 x plain fine-tuning's "
        "(linear interpolation between grid points):", "", at_matched_learning(runs, target)]
  (RESULTS / f"README{suffix}.md").write_text("\n".join(md))
  print("\n".join(md))
