"""The real-model scenario (issue 26): SmolLM2-135M-Instruct learns Milton and should keep its skills.

``python -m experiments.elephants real [--seeds 0] [--quick]`` fine-tunes
SmolLM2-135M-Instruct (its 4-bit GGUF weights, dequantised to float32:
``smollm2.py``) on Milton's *Paradise Lost* with every arm of
:data:`GRID`, and measures after every ``eval_every`` steps:

* learning: held-out Milton NLL (nats/token);
* old skills: the NLL of the model's chat answers (chatterbot pairs in its
  chat template, answer tokens only), the NLL of the Python reference's prose,
  and the KL from the original model's next-token distribution on the chat
  answers' positions, ``KL(p_0 || p)``; at the end also a 4-way capital quiz
  (``countryinfo``: "The capital of X is" completed by the right capital or
  one of three others, scored by log likelihood) and the NLL of the right
  capitals.

Every finished run is one line of ``results/real[-quick].jsonl`` (resumable:
runs already there are skipped); importances and the plain run's weights
(for WiSE-FT) are cached in ``$WVA_JAX_DATA`` or ``~/.cache/wva-jax``.

Arms (``strength`` means: ``lambda`` for WVA/EWC/L2, the fraction moved for
MoFO, replayed sequences per step for replay, the weight of the fine-tuned
model for WiSE-FT, the learning rate for plain LoRA):

* ``plain``: Adam on all weights.
* ``wva``: ``wj.wva_adam``-style chain, Adam's increments times
  ``1/(1 + lambda F)``, ``F`` the empirical Fisher of the old chat answers
  (128 pairs, answer tokens, normalised to mean 1); ``wva_sampled``: the same
  with the Fisher of labels sampled from the model.
* ``ewc``: Adam on ``g + lambda F (theta - theta_0)``; ``l2``: the same with
  ``F = 1`` everywhere (a plain pull to the pretrained weights: does the
  importance matter on a real model?).
* ``mofo``: MoFO, Adam moving each matrix's top-``fraction`` coordinates.
* ``replay``: ``k`` of the same 128 old chat pairs the Fisher sees added to
  each batch of 4 Milton windows (loss: the mean NLL over the batch's
  trained tokens, Milton's and the answers'); ``replay_wva``: replay ``k = 1`` with WVA.
* ``wise``: WiSE-FT, ``theta_0 + alpha (theta_plain - theta_0)``, no training.
* ``lora``: rank-8 adapters on every block matrix (``adapters.py``), Adam at
  the learning rate given as strength; ``lora_wva`` / ``lora_ewc``: with the
  base kernels' Fisher pulled back to the adapters, at :data:`LORA_LR`.

A seed fixes the Milton batch order, the replayed pairs' order, the LoRA init
and the sampled Fisher's labels; the held-out sets and the quiz are fixed.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import time
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import optax

import wva_jax as wj
from experiments.data import cache_dir
from experiments.elephants import adapters, real_data, smollm2
from experiments.optim import make_optimizer
from experiments.results import ResultStore, provenance, with_provenance

RESULTS = pathlib.Path(__file__).parent / "results"
COUNTRYINFO = ("countryinfo==1.0.1", "b02f6f534f0a3b9cdc73fba7e08f247e39826acfa54bf080f8e4eba812066350")
FULL = ("plain", "wva", "wva_sampled", "ewc", "l2", "mofo", "replay", "replay_wva")
LORA = ("lora", "lora_wva", "lora_ewc")
ARMS = FULL + LORA + ("wise",)
REPLAY_WITH_WVA = 1     # replayed pairs per step in replay_wva
LORA_LR = 1e-3          # the LoRA arms' learning rate with WVA / EWC: see GRID's plain-LoRA points


@dataclasses.dataclass(frozen=True)
class Config:
  steps: int = 40
  eval_every: int = 20
  batch: int = 4            # Milton windows of 128 tokens per step
  lr: float = 1e-4          # Adam, full fine-tuning (the example's and the pilot's)
  fisher_pairs: int = 128   # old chat pairs for the Fisher, and the replay pool
  eval_milton: int = 16     # held-out windows of 128 tokens
  eval_prose: int = 16
  eval_chat: int = 48       # held-out chat pairs whose answer ends within 64 tokens
  chat_len: int = 64
  quiz: int = 200           # capital quiz items (4 choices each)
  name: str = "real"


# The same scenario at full length for an accelerator (`--preset gpu`): 10x the steps, 4x the batch, larger
# held-out sets. It needs the cache ($WVA_JAX_DATA: the GGUF and the three package archives) on the device.
GPU = Config(steps=400, eval_every=50, batch=16, eval_milton=64, eval_prose=64, eval_chat=256, quiz=240,
             fisher_pairs=512, name="real-gpu")
QUICK = Config(steps=2, eval_every=1, eval_milton=4, eval_prose=4, eval_chat=4, quiz=8, fisher_pairs=4,
               name="real-quick")

# Seed 0's grid, in the order it runs (the most informative first, so that a stopped run is useful).
GRID: tuple[tuple[str, float], ...] = (
    ("plain", 0.0),
    ("wise", 0.25), ("wise", 0.5), ("wise", 0.75),
    ("wva", 10.0), ("wva", 100.0), ("wva", 1.0),
    ("ewc", 1.0), ("ewc", 10.0), ("ewc", 0.1),
    ("l2", 1.0), ("l2", 10.0), ("l2", 0.1),
    ("replay", 1.0), ("replay", 4.0),
    ("lora", 1e-3), ("lora", 3e-3),
    ("lora_wva", 10.0),
    ("mofo", 0.15), ("mofo", 0.05),
    ("replay_wva", 10.0),
    ("wva_sampled", 10.0),
    ("lora_ewc", 1.0),
)
# The points the other seeds repeat (paired): chosen from seed 0's results (see real_report).
SELECTED: tuple[tuple[str, float], ...] = GRID


# ------------------------------------------------------------------ data

def quiz_items(n: int, seed: int = 0) -> list[tuple[str, list[str]]]:
  """``n`` items ``(country, [right capital, three others])`` from ``countryinfo``'s country files.

  Countries whose capital is missing or shared are left out; the three others
  are drawn from the remaining capitals with a fixed generator.
  """
  from experiments.data import cached_package

  caps = {}
  with zipfile.ZipFile(cached_package(*COUNTRYINFO)) as z:
    for name in sorted(z.namelist()):
      if name.startswith("countryinfo/data/") and name.endswith(".json"):
        d = json.loads(z.read(name))
        if isinstance(d, dict) and isinstance(d.get("capital"), str) and d["capital"].strip() and d.get("name"):
          caps[d["name"].strip()] = d["capital"].strip()
  counts: dict = {}
  for c in caps.values():
    counts[c] = counts.get(c, 0) + 1
  caps = {k: v for k, v in caps.items() if counts[v] == 1 and v != k}
  rng = np.random.default_rng(seed)
  names = sorted(caps)
  rng.shuffle(names)
  pool = sorted(caps.values())
  items = []
  for country in names[:n]:
    others = [c for c in pool if c != caps[country]]
    items.append((country, [caps[country]] + [others[i] for i in rng.choice(len(others), 3, replace=False)]))
  return items


def quiz_arrays(items, encode) -> tuple[np.ndarray, np.ndarray]:
  """Tokens ``[4n, L + 1]`` of "The capital of X is C." and the mask ``[4n, L]`` of C's tokens."""
  toks, masks = [], []
  for country, choices in items:
    prompt = encode(f"The capital of {country} is")
    for c in choices:
      ans = encode(f" {c}")
      toks.append(prompt + ans)
      masks.append([0] * (len(prompt) - 1) + [1] * len(ans))
  width = max(len(t) for t in toks)
  return (np.asarray([t + [2] * (width - len(t)) for t in toks], np.int32),
          np.asarray([m + [0] * (width - 1 - len(m)) for m in masks], np.float32))


def prepare_data(cfg: Config) -> dict:
  d = real_data.scenario_data(smollm2.encode, smollm2.chat_prompt)
  ones = lambda t: np.ones((len(t), t.shape[1] - 1), np.float32)
  short = [i for i, m in enumerate(d["chat_test_mask"]) if m[cfg.chat_len:].sum() == 0][:cfg.eval_chat]
  n = cfg.fisher_pairs
  qt, qm = quiz_arrays(quiz_items(cfg.quiz), smollm2.encode)
  return {"train": d["new_train"],
          "milton": (d["new_test"][:cfg.eval_milton], ones(d["new_test"][:cfg.eval_milton])),
          "prose": (d["prose_test"][:cfg.eval_prose], ones(d["prose_test"][:cfg.eval_prose])),
          "chat": (d["chat_test"][short, :cfg.chat_len + 1], d["chat_test_mask"][short, :cfg.chat_len]),
          "old": (d["chat_fisher"][:n], d["chat_fisher_mask"][:n]),
          "quiz": (qt, qm)}


# ------------------------------------------------------------------ measures

def _logp(fn, params, toks):
  return jax.nn.log_softmax(fn(params, toks[:, :-1]).astype(jnp.float32), -1)


def make_measures(fn):
  """Jitted ``nll(p, toks, mask) -> (sum, count)``, ``chat(p, p0, toks, mask) -> (nll sum, count, KL sum)``,
  ``seq(p, toks, mask) -> per-sequence summed NLL``."""
  def nll(p, toks, mask):
    lp = jnp.take_along_axis(_logp(fn, p, toks), toks[:, 1:, None], -1)[..., 0]
    return -(lp * mask).sum(), mask.sum()

  def chat(p, p0, toks, mask):
    lp, lp0 = _logp(fn, p, toks), _logp(fn, p0, toks)
    tok = jnp.take_along_axis(lp, toks[:, 1:, None], -1)[..., 0]
    kl = (jnp.exp(lp0) * (lp0 - lp)).sum(-1)
    return -(tok * mask).sum(), mask.sum(), (kl * mask).sum()

  def seq(p, toks, mask):
    lp = jnp.take_along_axis(_logp(fn, p, toks), toks[:, 1:, None], -1)[..., 0]
    return -(lp * mask).sum(-1)

  return jax.jit(nll), jax.jit(chat), jax.jit(seq)


def evaluate(measures, params, params0, data, batch: int = 4) -> dict:
  """Held-out Milton / prose NLL, chat-answer NLL and KL from the original model (per answer token)."""
  nll, chat, _ = measures
  out = {}
  for name in ("milton", "prose"):
    toks, mask = data[name]
    s = c = 0.0
    for i in range(0, len(toks), batch):
      a, b = nll(params, toks[i:i + batch], mask[i:i + batch])
      s, c = s + float(a), c + float(b)
    out[name] = s / c
  toks, mask = data["chat"]
  s = c = k = 0.0
  for i in range(0, len(toks), 4 * batch):
    a, b, d = chat(params, params0, toks[i:i + 4 * batch], mask[i:i + 4 * batch])
    s, c, k = s + float(a), c + float(b), k + float(d)
  out["chat"], out["kl"] = s / c, k / c
  return out


def quiz(measures, params, data, batch: int = 32) -> dict:
  """Accuracy of the 4-way capital quiz and the mean NLL per token of the right capitals."""
  toks, mask = data["quiz"]
  per = np.concatenate([np.asarray(measures[2](params, toks[i:i + batch], mask[i:i + batch]))
                        for i in range(0, len(toks), batch)]).reshape(-1, 4)
  counts = mask.sum(-1).reshape(-1, 4)
  return {"quiz_acc": float((per.argmin(1) == 0).mean()), "capital_nll": float(per[:, 0].sum() / counts[:, 0].sum()),
          "quiz_items": int(per.shape[0])}


# ------------------------------------------------------------------ training

def _token_mean_loss(fn, params, toks, mask):
  """Mean NLL over the batch's masked tokens (the usual causal-LM fine-tuning loss, replayed answers included)."""
  lp = jnp.take_along_axis(_logp(fn, params, toks), toks[:, 1:, None], -1)[..., 0]
  return -(lp * mask).sum() / mask.sum()


def make_tx(arm: str, strength, lr: float, lora_importance=None) -> optax.GradientTransformation:
  """Each arm's optimizer (importance and anchor are set into the state afterwards)."""
  if arm in ("plain", "replay"):
    return optax.adam(lr)
  if arm in ("wva", "wva_sampled", "replay_wva"):
    return make_optimizer("adam", lr, "wva", strength)
  if arm in ("ewc", "l2"):
    return make_optimizer("adam", lr, "ewc", strength)
  if arm == "mofo":
    return make_optimizer("mofo", lr, "none", strength)
  if arm == "lora":
    return optax.adam(strength)
  return adapters.make_tx(arm, strength, LORA_LR, lora_importance)


def make_step(fn, arm: str, cfg: Config):
  """Jitted ``step(trained, state, base, toks, mask, strength, imp) -> (trained, state, loss)``.

  ``trained`` is the model's params, or the adapters for the LoRA arms (then
  ``base`` is the frozen model); ``strength`` is traced, so one program serves
  an arm's whole grid.
  """
  lora = arm in LORA

  def step(trained, state, base, toks, mask, strength, imp):
    tx = make_tx(arm, strength, cfg.lr, imp)
    apply = (lambda a, t: fn(adapters.merge(base, a), t)) if lora else fn
    loss, grads = jax.value_and_grad(lambda p: _token_mean_loss(apply, p, toks, mask))(trained)
    updates, state = tx.update(grads, state, trained)
    return optax.apply_updates(trained, updates), state, loss

  return jax.jit(step, donate_argnums=(0, 1))


def importance(fn, params, data, kind: str, seed: int, cfg: Config, log=print):
  """The old chat answers' Fisher (``empirical`` or ``sampled``), normalised to mean 1; cached on disk."""
  tag = f"-s{seed}" if kind == "sampled" else ""   # the empirical Fisher does not depend on the seed
  path = cache_dir() / f"smollm2-fisher-{kind}-{cfg.fisher_pairs}{tag}.npz"
  leaves, treedef = jax.tree_util.tree_flatten(params)
  if path.exists():
    with np.load(path) as z:
      return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(z[f"a{i}"]) for i in range(len(leaves))]), 0.0
  toks, mask = data["old"]
  t = time.time()
  x, y = jnp.asarray(toks[:, :-1]), jnp.asarray(toks[:, 1:])
  if kind == "empirical":
    f = wj.importance.fisher(fn, params, x, y, mask=jnp.asarray(mask), chunk_size=4)
  else:
    f = wj.importance.fisher(fn, params, x, mask=jnp.asarray(mask), mode="sampled",
                             key=jax.random.key(1000 + seed), chunk_size=4)
  f = wj.importance.normalize(f)
  seconds = time.time() - t
  log(f"Fisher ({kind}) of {len(toks)} chat pairs: {seconds:.0f} s")
  tmp = path.with_name(path.stem + ".part.npz")
  np.savez(tmp, **{f"a{i}": np.asarray(x) for i, x in enumerate(jax.tree_util.tree_leaves(f))})
  tmp.replace(path)
  return f, seconds


def _plain_path(seed: int, cfg: Config) -> pathlib.Path:
  return cache_dir() / f"smollm2-{cfg.name}-plain-s{seed}.npz"


def train(fn, measures, arm: str, strength: float, params0, data, seed: int, cfg: Config, imp=None, log=print):
  """One run: ``(final params, curve, cost)``; ``curve``: the measures after every ``eval_every`` steps;
  ``cost``: bytes trained and of the optimizer state, the median step time (the first, compiling, apart)."""
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(data["train"]))
  replay = int(strength) if arm == "replay" else REPLAY_WITH_WVA if arm == "replay_wva" else 0
  old_toks, old_mask = data["old"]
  old_order = rng.permutation(len(old_toks))
  lora = arm in LORA
  if lora:
    trained = adapters.init_adapters(params0, jax.random.key(seed))
    lora_imp = None if imp is None else wj.lora_importance(trained, imp)
  else:
    trained, lora_imp = jax.tree_util.tree_map(jnp.copy, params0), None
  tx = make_tx(arm, strength, cfg.lr, lora_imp)
  state = tx.init(trained)
  if not lora and arm not in ("plain", "replay", "mofo"):
    state = wj.set_importance(state, imp)
    if arm in ("ewc", "l2"):
      state = wj.set_anchor(state, params0)
  if (id(fn), arm, cfg) not in _STEPS:   # one compiled step per arm in a process (strength is traced)
    _STEPS[(id(fn), arm, cfg)] = make_step(fn, arm, cfg)
  step = _STEPS[(id(fn), arm, cfg)]
  merged = (lambda a: adapters.merge(params0, a)) if lora else (lambda p: p)
  curve, t0, step_times = [], time.time(), []
  nbytes = lambda tree: int(sum(x.nbytes for x in jax.tree_util.tree_leaves(tree) if hasattr(x, "nbytes")))
  # what training holds beside the frozen model: trained weights (or adapters) and the optimizer state
  memory = {"trained_bytes": nbytes(trained), "state_bytes": nbytes(state)}
  for i in range(cfg.steps):
    idx = order[(i * cfg.batch) % len(order):][:cfg.batch]
    toks = data["train"][idx]
    mask = np.ones((len(idx), toks.shape[1] - 1), np.float32)
    if replay:
      j = old_order[(np.arange(replay) + i * replay) % len(old_order)]
      toks, mask = np.concatenate([toks, old_toks[j]]), np.concatenate([mask, old_mask[j]])
    ts = time.time()
    trained, state, loss = step(trained, state, params0 if lora else None, toks, mask, jnp.float32(strength),
                                lora_imp)
    jax.block_until_ready(loss)
    step_times.append(time.time() - ts)
    if (i + 1) % cfg.eval_every == 0:
      m = evaluate(measures, merged(trained), params0, data)
      curve.append({"step": i + 1, **m})
      log(f"  {arm} {strength:g} step {i + 1}: loss {float(loss):.3f}, Milton {m['milton']:.3f}, chat {m['chat']:.3f}, "
          f"prose {m['prose']:.3f}, KL {m['kl']:.4f} ({(time.time() - t0) / (i + 1):.1f} s/step incl. evals)")
  timing = {"step_seconds": float(np.median(step_times[1:])) if len(step_times) > 1 else None,
            "first_step_seconds": step_times[0]}
  return merged(trained), curve, {**memory, **timing}


def _rss_gib() -> float:
  """This process's resident memory (Linux; NaN elsewhere): logged after each run to catch growth."""
  try:
    with open("/proc/self/status") as f:
      return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 2**20
  except (OSError, StopIteration):
    return float("nan")


_STEPS: dict = {}


# ------------------------------------------------------------------ the runs

def run_key(r: dict) -> tuple:
  return (r["seed"], r["arm"], float(r["strength"]))


def todo(cfg: Config, seeds, grid, out: pathlib.Path) -> list[tuple[int, str, float]]:
  done = {run_key(r) for r in ResultStore(out).records()} if out.exists() else set()
  return [(s, a, float(v)) for s in seeds for a, v in grid if (s, a, float(v)) not in done]


def _pretrained(measures, params0, data, cfg: Config, log=print) -> dict:
  """The original model's measures (the same for every run), cached on disk by configuration."""
  path = cache_dir() / f"smollm2-{cfg.name}-pretrained-{_digest(cfg)}.json"
  if path.exists():
    return json.loads(path.read_text())
  got = {**evaluate(measures, params0, params0, data), **quiz(measures, params0, data)}
  path.write_text(json.dumps(got))
  log(f"pretrained: {got}")
  return got


def _digest(cfg: Config) -> str:
  import hashlib
  return hashlib.sha256(repr(cfg).encode()).hexdigest()[:12]


def run(seeds=(0,), cfg: Config = Config(), grid=GRID, log=print, out: pathlib.Path | None = None,
        max_runs: int | None = None) -> pathlib.Path:
  """Every ``(seed, arm, strength)`` of ``grid`` not yet in ``out``; each appended as it finishes.

  ``max_runs``: stop after that many (a fresh process then goes on: XLA's compilations for each arm's
  program keep host memory that a long process would accumulate).
  """
  for arm, _ in grid:
    if arm not in ARMS:
      raise ValueError(f"unknown arm {arm!r}: expected one of {ARMS}")
  out = out or RESULTS / f"{cfg.name}.jsonl"
  left = todo(cfg, seeds, grid, out)
  if not left:
    log(f"all {len(grid) * len(seeds)} runs already in {out}")
    return out
  log(f"{len(left)} runs to do -> {out}")
  left = left[:max_runs] if max_runs else left
  t = time.time()
  graphdef, params0 = smollm2.load()
  fn = smollm2.apply_fn(graphdef)
  data = prepare_data(cfg)
  measures = make_measures(fn)
  log(f"model and data: {time.time() - t:.0f} s")
  store, prov = ResultStore(out), provenance()
  pretrained = _pretrained(measures, params0, data, cfg, log)
  for seed, arm, strength in left:
    t = time.time()
    imp, imp_seconds = None, 0.0
    if arm in ("wva", "ewc", "replay_wva", "lora_wva", "lora_ewc"):
      imp, imp_seconds = importance(fn, params0, data, "empirical", seed, cfg, log)
    elif arm == "wva_sampled":
      imp, imp_seconds = importance(fn, params0, data, "sampled", seed, cfg, log)
    elif arm == "l2":
      imp = jax.tree_util.tree_map(jnp.ones_like, params0)
    t = time.time()
    if arm == "wise":
      path = _plain_path(seed, cfg)
      if not path.exists():
        log(f"seed {seed} wise {strength:g}: skipped, the plain run's weights ({path}) are not there yet")
        continue
      leaves, treedef = jax.tree_util.tree_flatten(params0)
      with np.load(path) as z:
        ft = [jnp.asarray(z[f"a{i}"]) for i in range(len(leaves))]
      params = jax.tree_util.tree_unflatten(treedef, [p + strength * (f - p) for p, f in zip(leaves, ft)])
      curve, cost = [{"step": cfg.steps, **evaluate(measures, params, params0, data)}], {}
    else:
      params, curve, cost = train(fn, measures, arm, strength, params0, data, seed, cfg, imp, log)
      if arm == "plain":
        tmp = _plain_path(seed, cfg).with_suffix(".part.npz")
        np.savez(tmp, **{f"a{i}": np.asarray(x) for i, x in enumerate(jax.tree_util.tree_leaves(params))})
        tmp.replace(_plain_path(seed, cfg))
    final = {**curve[-1], **quiz(measures, params, data)}
    seconds = time.time() - t
    rec = {"seed": seed, "arm": arm, "strength": strength, "pretrained": pretrained, "curve": curve,
           "final": final, "seconds": seconds, "cost": cost, "importance_seconds": imp_seconds,
           "config": {**dataclasses.asdict(cfg), "lora_lr": LORA_LR, "lora_rank": adapters.RANK,
                      "replay_with_wva": REPLAY_WITH_WVA,
                      "model": "SmolLM2-135M-Instruct, 4-bit GGUF weights dequantised to float32",
                      "params": int(sum(x.size for x in jax.tree_util.tree_leaves(params0)))}}
    store.append(with_provenance(rec, prov))
    log(f"seed {seed} {arm} {strength:g}: Milton {final['milton']:.3f}, chat {final['chat']:.3f}, "
        f"prose {final['prose']:.3f}, KL {final['kl']:.4f}, quiz {final['quiz_acc']:.3f} ({seconds:.0f} s, "
        f"resident {_rss_gib():.1f} GiB)")
  return out


# --quick: one point per arm (a pipeline check, minutes)
QUICK_GRID = (("plain", 0.0), ("wise", 0.5), ("wva", 10.0), ("wva_sampled", 10.0), ("ewc", 1.0), ("l2", 1.0),
              ("replay", 1.0), ("replay_wva", 10.0), ("mofo", 0.15), ("lora", 1e-3), ("lora_wva", 10.0),
              ("lora_ewc", 1.0))


def grid_for(seed: int, quick: bool = False) -> tuple[tuple[str, float], ...]:
  """Seed 0 runs the whole :data:`GRID`; the other seeds its selected points (:data:`SELECTED`)."""
  if quick:
    return QUICK_GRID
  return GRID if seed == 0 else SELECTED
