"""Tables and the figure of the real-model scenario (``real.py``): ``python -m experiments.elephants real_report``.

Reads ``results/real[-quick].jsonl``, writes ``results/real[-quick].md`` and
``real[-quick].png`` and returns the markdown.

* **Every run**: the final measures, their change from the pretrained model,
  time per step and the bytes training holds.
* **At matched learning**: for each seed the target is plain fine-tuning's
  held-out Milton NLL after its first evaluation interval (half its run);
  along each run's trajectory (pretrained, then every evaluation) the first
  point where Milton reaches the target is found by linear interpolation and
  the old-skill measures are read there: what the model lost to learn that
  much. WiSE-FT's trajectory is its ``alpha`` grid from the pretrained model
  (``alpha = 0``) to the plain run (``alpha = 1``). A run that never reaches
  the target has no value (it learned less).
* **Paired seeds**: where several seeds ran the same (arm, strength), each
  arm's matched-learning difference from plain fine-tuning, mean and 95%
  interval over seeds, and on how many seeds it is ahead.
"""
from __future__ import annotations

import math
import pathlib

import numpy as np

from experiments.elephants.real import RESULTS
from experiments.results import ResultStore
from experiments.stats import mean_ci

OLD = ("chat", "prose", "kl")
NAMES = {"plain": "plain Adam", "wva": "WVA-Fisher", "wva_sampled": "WVA-Fisher(sampled)", "ewc": "EWC-Fisher",
         "l2": "L2 (EWC, uniform)", "mofo": "MoFO", "replay": "replay", "replay_wva": "replay + WVA",
         "wise": "WiSE-FT", "lora": "LoRA", "lora_wva": "LoRA + WVA", "lora_ewc": "LoRA + EWC"}
STRENGTH = {"mofo": "fraction", "replay": "pairs/step", "wise": "alpha", "lora": "lr"}


def label(r) -> str:
  if r["arm"] == "plain":
    return NAMES["plain"]
  return f"{NAMES[r['arm']]} {STRENGTH.get(r['arm'], 'lambda')}={r['strength']:g}"


def trajectory(r, runs) -> list[dict]:
  """The run's measures from the pretrained model on, ``step`` the training step; WiSE-FT: its whole alpha grid
  from the pretrained model (alpha 0) to the plain run (alpha 1), ``step`` the alpha."""
  pre = {"step": 0, **r["pretrained"]}
  if r["arm"] != "wise":
    return [pre] + r["curve"]
  same = [x for x in runs if x["seed"] == r["seed"]]
  wise = sorted((x for x in same if x["arm"] == "wise"), key=lambda x: x["strength"])
  plain = [x for x in same if x["arm"] == "plain"]
  return [pre] + [{**x["curve"][-1], "step": x["strength"]} for x in wise] + \
      [{**plain[0]["curve"][-1], "step": 1.0}] if plain else []


def target(runs, seed) -> float | None:
  """Plain fine-tuning's Milton NLL after its first evaluation interval, on ``seed``."""
  plain = [r for r in runs if r["seed"] == seed and r["arm"] == "plain"]
  return plain[0]["curve"][0]["milton"] if plain else None


def at_target(traj, tgt: float) -> dict | None:
  """The old-skill measures where Milton first reaches ``tgt`` along ``traj`` (linear interpolation)."""
  for a, b in zip(traj, traj[1:]):
    if a["milton"] > tgt >= b["milton"]:
      w = (a["milton"] - tgt) / (a["milton"] - b["milton"])
      return {k: a[k] + w * (b[k] - a[k]) for k in OLD} | {"step": a["step"] + w * (b["step"] - a["step"])}
  return None


def matched(runs) -> dict:
  """``{(seed, arm, strength): measures at matched learning or None}``; WiSE-FT's whole grid is one entry,
  strength ``None`` (its alpha grid is the trajectory)."""
  out = {}
  for r in runs:
    tgt = target(runs, r["seed"])
    if tgt is None:
      continue
    out[(r["seed"], r["arm"], None if r["arm"] == "wise" else r["strength"])] = at_target(trajectory(r, runs), tgt)
  return out


def matched_rows(runs) -> list[tuple]:
  """``(seed, label, run)`` of each matched-learning row: every run, WiSE-FT once per seed."""
  rows, seen = [], set()
  for r in sorted(runs, key=lambda r: (r["seed"], list(NAMES).index(r["arm"]), r["strength"])):
    if r["arm"] == "wise":
      if (r["seed"], "wise") in seen:
        continue
      seen.add((r["seed"], "wise"))
      rows.append((r["seed"], "WiSE-FT (alpha grid)", r, None))
    else:
      rows.append((r["seed"], label(r), r, r["strength"]))
  return rows


def fmt(x, d=3) -> str:
  return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{d}f}"


def every_run(runs) -> str:
  lines = ["| seed | arm | Milton | chat Δ | prose Δ | KL | quiz | capital NLL | s/step | trained + state MB |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in sorted(runs, key=lambda r: (r["seed"], list(NAMES).index(r["arm"]), r["strength"])):
    f, p, c = r["final"], r["pretrained"], r.get("cost", {})
    mb = (c["trained_bytes"] + c["state_bytes"]) / 2**20 if c.get("state_bytes") is not None else None
    lines.append(f"| {r['seed']} | {label(r)} | {fmt(f['milton'])} | {f['chat'] - p['chat']:+.3f} | "
                 f"{f['prose'] - p['prose']:+.3f} | {fmt(f['kl'], 4)} | {f['quiz_acc']:.3f} | "
                 f"{fmt(f['capital_nll'])} | "
                 f"{fmt(c.get('step_seconds'), 1)} | {fmt(mb, 0)} |")
  return "\n".join(lines)


def matched_table(runs) -> str:
  m = matched(runs)
  lines = ["| seed | arm | target Milton | at step | chat Δ | prose Δ | KL |", "|---|---|---|---|---|---|---|"]
  for seed, name, r, strength in matched_rows(runs):
    got, p = m.get((seed, r["arm"], strength)), r["pretrained"]
    tgt = target(runs, seed)
    if got is None:
      lines.append(f"| {seed} | {name} | {fmt(tgt)} | not reached | | | |")
    else:
      step = f"alpha {got['step']:.2f}" if r["arm"] == "wise" else f"{got['step']:.0f}"
      lines.append(f"| {seed} | {name} | {fmt(tgt)} | {step} | {got['chat'] - p['chat']:+.3f} | "
                   f"{got['prose'] - p['prose']:+.3f} | {fmt(got['kl'], 4)} |")
  return "\n".join(lines)


def paired(runs) -> str:
  """Matched-learning difference from plain per (arm, strength) run on several seeds."""
  m = matched(runs)
  seeds = sorted({r["seed"] for r in runs})
  if len(seeds) < 2:
    return "(one seed so far: the paired comparison needs the other seeds' runs)"
  lines = ["| arm | measure | minus plain: mean [95% CI] | ahead on |", "|---|---|---|---|"]
  points = sorted({(r["arm"], None if r["arm"] == "wise" else r["strength"]) for r in runs if r["arm"] != "plain"},
                  key=lambda x: (list(NAMES).index(x[0]), x[1] or 0.0))
  for arm, s in points:
    for k in OLD:
      d = [m[(sd, arm, s)][k] - m[(sd, "plain", 0.0)][k] for sd in seeds
           if m.get((sd, arm, s)) and m.get((sd, "plain", 0.0))]
      if len(d) < 2:
        continue
      mean, half, _ = mean_ci(d)
      name = "WiSE-FT (alpha grid)" if s is None else f"{NAMES[arm]} {STRENGTH.get(arm, 'lambda')}={s:g}"
      lines.append(f"| {name} | {k} | {mean:+.3f} [{mean - half:+.3f}, "
                   f"{mean + half:+.3f}] | "
                   f"{sum(x < 0 for x in d)} of {len(d)} |")
  return "\n".join(lines)


def plot(runs, path: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  panels = (("chat", "chat-answer NLL (nats/token), lower is better"), ("prose", "prose NLL, lower is better"),
            ("kl", "KL(original || tuned) on chat answers, lower"),
            ("quiz_acc", "capital quiz accuracy, higher is better"))
  fig, axes = plt.subplots(1, 4, figsize=(20, 4.6))
  arms = [a for a in NAMES if any(r["arm"] == a for r in runs)]
  colors = dict(zip(arms, plt.cm.tab20(np.linspace(0, 1, max(len(arms), 2)))))
  pre = runs[0]["pretrained"]
  for ax, (key, title) in zip(axes, panels):
    ax.scatter([pre["milton"]], [pre[key]], marker="*", s=200, color="k", label="pretrained", zorder=3)
    for a in arms:
      rs = sorted((r for r in runs if r["arm"] == a and r["seed"] == 0), key=lambda r: r["final"]["milton"])
      if rs:
        ax.plot([r["final"]["milton"] for r in rs], [r["final"][key] for r in rs], "o-", color=colors[a],
                label=NAMES[a], alpha=0.85)
    ax.set_xlabel("held-out Milton NLL (nats/token): learning ->, lower is better")
    ax.set_title(title)
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7, ncol=2)
  fig.suptitle("SmolLM2-135M-Instruct (4-bit weights) fine-tuned on Milton: each arm's grid, seed 0, final points")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(name: str = "real") -> str:
  quick = name.endswith("quick")
  runs = ResultStore(RESULTS / f"{name}.jsonl").records()
  if not runs:
    raise FileNotFoundError(RESULTS / f"{name}.jsonl")
  r0, cfg = runs[0], runs[0]["config"]
  pre = r0["pretrained"]
  q = " --quick" if quick else " --preset gpu" if name.endswith("gpu") else ""
  md = [f"# Real-model scenario: {cfg['model']}", "",
        f"Command: `python -m experiments.elephants real{q} --seeds 0` (then the other seeds), report "
        f"`python -m experiments.elephants real_report{q}`. {cfg['params']:,} parameters; {cfg['steps']} steps of "
        f"{cfg['batch']}x128 Milton tokens (Adam lr {cfg['lr']:g}; LoRA arms rank {cfg['lora_rank']}); old skills "
        f"measured on {cfg['eval_chat']} held-out chat pairs, {cfg['eval_prose']}x128 prose tokens, "
        f"{pre['quiz_items']} capital quiz items; Fisher and replay from the same {cfg['fisher_pairs']} old chat "
        "pairs.",
        "", f"Pretrained: Milton {pre['milton']:.3f}, chat answers {pre['chat']:.3f}, prose {pre['prose']:.3f}, "
        f"quiz {pre['quiz_acc']:.3f}, capital NLL {pre['capital_nll']:.3f}.", "",
        f"![Pareto fronts]({name}.png)", "", "## Every run", "", every_run(runs), "",
        "## At matched learning", "",
        "Target: plain fine-tuning's Milton NLL after its first evaluation; the old skills where each run "
        "first reaches it (change from pretrained; KL absolute).", "", matched_table(runs), "",
        "## Paired seeds (difference from plain at matched learning; negative = kept more)", "", paired(runs), ""]
  text = "\n".join(md)
  (RESULTS / f"{name}.md").write_text(text)
  plot(runs, RESULTS / f"{name}.png")
  return text
