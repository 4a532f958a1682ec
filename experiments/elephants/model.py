"""A decoder-only transformer language model in Flax NNX (pre-norm GPT blocks).

Dense layers are ``nnx.Linear`` (so the importance engine factors them: one
forward and one backward per chunk); the token and position embeddings and the
LayerNorm scales take the engine's per-example ``vmap`` path.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from experiments.elephants.data import VOCAB


@dataclasses.dataclass(frozen=True)
class Config:
  vocab: int = VOCAB
  seq_len: int = 64
  d_model: int = 128
  heads: int = 4
  layers: int = 2
  mlp_ratio: int = 4


class CausalSelfAttention(nnx.Module):
  def __init__(self, d: int, heads: int, *, rngs: nnx.Rngs):
    self.heads = heads
    self.qkv = nnx.Linear(d, 3 * d, rngs=rngs)
    self.out = nnx.Linear(d, d, rngs=rngs)

  def __call__(self, x):
    b, t, d = x.shape
    q, k, v = jnp.split(self.qkv(x), 3, axis=-1)
    split = lambda z: z.reshape(b, t, self.heads, d // self.heads)
    q, k, v = split(q), split(k), split(v)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(d // self.heads).astype(x.dtype)
    causal = jnp.tril(jnp.ones((t, t), bool))
    scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
    att = jax.nn.softmax(scores, axis=-1)
    return self.out(jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, t, d))


class Block(nnx.Module):
  def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
    d = cfg.d_model
    self.ln1 = nnx.LayerNorm(d, rngs=rngs)
    self.attn = CausalSelfAttention(d, cfg.heads, rngs=rngs)
    self.ln2 = nnx.LayerNorm(d, rngs=rngs)
    self.up = nnx.Linear(d, cfg.mlp_ratio * d, rngs=rngs)
    self.down = nnx.Linear(cfg.mlp_ratio * d, d, rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(self.ln1(x))
    return x + self.down(jax.nn.gelu(self.up(self.ln2(x))))


class TransformerLM(nnx.Module):
  """Byte-level GPT: ``tokens [B, T] -> logits [B, T, vocab]``; position t sees tokens <= t."""

  def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = nnx.Embed(cfg.vocab, cfg.d_model, rngs=rngs)
    self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (cfg.seq_len, cfg.d_model)))
    self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.layers)])
    self.ln_f = nnx.LayerNorm(cfg.d_model, rngs=rngs)
    self.head = nnx.Linear(cfg.d_model, cfg.vocab, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens.astype(jnp.int32)) + self.pos[...][: tokens.shape[-1]]
    for blk in self.blocks:
      x = blk(x)
    return self.head(self.ln_f(x))


def init(cfg: Config, seed: int = 0):
  """``(apply_fn, params)``: the functional form every wva-jax estimator takes."""
  model = TransformerLM(cfg, rngs=nnx.Rngs(seed))
  graphdef, params = nnx.split(model, nnx.Param)
  apply_fn = lambda p, tokens: nnx.merge(graphdef, p)(tokens)
  return apply_fn, params


def num_params(params) -> int:
  return sum(x.size for x in jax.tree_util.tree_leaves(params))


def split_batch(seqs, mask):
  """Inputs, next-byte targets and the target mask from ``[B, T+1]`` windows."""
  seqs = jnp.asarray(seqs)
  return seqs[:, :-1], seqs[:, 1:].astype(jnp.int32), jnp.asarray(mask)[:, 1:].astype(jnp.float32)


def token_nll(apply_fn, params, seqs, mask):
  """Summed negative log-likelihood and number of real target tokens."""
  x, y, m = split_batch(seqs, mask)
  nll = optax.softmax_cross_entropy_with_integer_labels(apply_fn(params, x).astype(jnp.float32), y)
  return jnp.sum(nll * m), jnp.sum(m)


def loss(apply_fn, params, seqs, mask):
  """Mean NLL per real token (nats); perplexity is its exp."""
  s, n = token_nll(apply_fn, params, seqs, mask)
  return s / jnp.maximum(n, 1.0)
