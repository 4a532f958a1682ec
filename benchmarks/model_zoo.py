"""Real model code from the packages users install, built small with random weights.

Each builder returns a ``Case``: ``apply_fn(params, inputs) -> outputs``
(logits ``[B, ..., C]``), the parameter pytree, a batch of inputs, integer
targets and, for sequence models, a padding mask ``[B, T]``. Nothing here
re-implements a model: the layers come from flax (NNX and Linen),
transformers' Flax classes (transformers 4.57.6, the last release that ships
them; tiny configs, no hub access), equinox and haiku. ``size`` scales the
models up for ``benchmarks/importance.py``; tests/zoo tests the engine on them.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass
class Case:
  name: str
  apply_fn: Callable
  params: Any
  inputs: Any
  targets: Any
  mask: Any = None
  scanned: bool = False
  # sig weights each parameter's input signal by the mask position by position:
  # a convolution over an explicitly padded sequence has no such positions
  sig_mask: bool = True


@dataclasses.dataclass(frozen=True)
class Size:
  batch: int = 6
  seq: int = 8
  vocab: int = 37
  d: int = 16
  heads: int = 2
  layers: int = 2
  image: int = 8
  channels: int = 4
  patch: int = 0  # a ViT's patch size; 0: image // 2 (4 patches)


TINY = Size()
BENCH = Size(batch=64, seq=128, vocab=512, d=256, heads=4, layers=4, image=32, channels=32)


def _tokens(s: Size, seed=0):
  rng = np.random.default_rng(seed)
  tok = jnp.asarray(rng.integers(0, s.vocab, size=(s.batch, s.seq)), jnp.int32)
  y = jnp.asarray(rng.integers(0, s.vocab, size=(s.batch, s.seq)), jnp.int32)
  lengths = rng.integers(s.seq // 2, s.seq + 1, size=s.batch)
  mask = jnp.asarray(np.arange(s.seq)[None] < lengths[:, None], jnp.float32)
  return tok, y, mask


def _images(s: Size, classes=5, seed=0, channels=3):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(s.batch, s.image, s.image, channels)), jnp.float32)
  y = jnp.asarray(rng.integers(0, classes, size=s.batch), jnp.int32)
  return x, y


def _nnx_case(name, model, inputs, targets, mask=None, scanned=False, call=None):
  from flax import nnx
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  call = call or (lambda m, x: m(x))

  def apply_fn(p, x):
    return call(nnx.merge(graphdef, p, rest), x)

  return Case(name, apply_fn, params, inputs, targets, mask, scanned)


# --- Flax NNX ---------------------------------------------------------------------

def nnx_mlp(s: Size = TINY):
  from flax import nnx

  class MLP(nnx.Module):
    def __init__(self, rngs):
      self.l1 = nnx.Linear(12, s.d, rngs=rngs)
      self.l2 = nnx.Linear(s.d, 5, rngs=rngs)

    def __call__(self, x):
      return self.l2(nnx.relu(self.l1(x)))

  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(s.batch, 12)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 5, size=s.batch), jnp.int32)
  return _nnx_case("nnx MLP", MLP(nnx.Rngs(0)), x, y)


def nnx_cnn_batchnorm(s: Size = TINY):
  """nnx.Conv + nnx.BatchNorm in evaluation mode + nnx.Linear."""
  from flax import nnx
  c = s.channels

  class CNN(nnx.Module):
    def __init__(self, rngs):
      self.conv1 = nnx.Conv(3, c, (3, 3), rngs=rngs)
      self.bn1 = nnx.BatchNorm(c, use_running_average=True, rngs=rngs)
      self.conv2 = nnx.Conv(c, 2 * c, (3, 3), strides=(2, 2), rngs=rngs)
      self.bn2 = nnx.BatchNorm(2 * c, use_running_average=True, rngs=rngs)
      self.head = nnx.Linear(2 * c, 5, rngs=rngs)

    def __call__(self, x):
      x = nnx.relu(self.bn1(self.conv1(x)))
      x = nnx.relu(self.bn2(self.conv2(x)))
      return self.head(x.mean((1, 2)))

  x, y = _images(s)
  return _nnx_case("nnx Conv+BatchNorm(eval)", CNN(nnx.Rngs(0)), x, y)


def nnx_conv_variants(s: Size = TINY):
  """Depthwise (feature_group_count), dilated and transposed convolutions."""
  from flax import nnx
  c = s.channels

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.stem = nnx.Conv(3, c, (3, 3), rngs=rngs)
      self.depthwise = nnx.Conv(c, 2 * c, (3, 3), feature_group_count=c, rngs=rngs)
      self.grouped = nnx.Conv(2 * c, 2 * c, (3, 3), feature_group_count=2, rngs=rngs)
      self.dilated = nnx.Conv(2 * c, c, (3, 3), kernel_dilation=(2, 2), rngs=rngs)
      self.up = nnx.ConvTranspose(c, c, (3, 3), strides=(2, 2), rngs=rngs)
      self.head = nnx.Linear(c, 5, rngs=rngs)

    def __call__(self, x):
      x = nnx.relu(self.stem(x))
      x = nnx.relu(self.depthwise(x))
      x = nnx.relu(self.grouped(x))
      x = nnx.relu(self.dilated(x))
      x = nnx.relu(self.up(x))
      return self.head(x.mean((1, 2)))

  x, y = _images(s)
  return _nnx_case("nnx depthwise/grouped/dilated/transposed Conv", Net(nnx.Rngs(0)), x, y)


def nnx_causal_conv_lm(s: Size = TINY):
  """A causal Conv1D language model: nnx.Embed, nnx.Conv(padding='CAUSAL'), nnx.LayerNorm."""
  from flax import nnx

  class LM(nnx.Module):
    def __init__(self, rngs):
      self.embed = nnx.Embed(s.vocab, s.d, rngs=rngs)
      self.convs = nnx.List([nnx.Conv(s.d, s.d, (3,), padding="CAUSAL", rngs=rngs)
                             for _ in range(s.layers)])
      self.norm = nnx.LayerNorm(s.d, rngs=rngs)
      self.head = nnx.Linear(s.d, s.vocab, rngs=rngs)

    def __call__(self, tok):
      h = self.embed(tok)
      for conv in self.convs:
        h = h + nnx.gelu(conv(h))
      return self.head(self.norm(h))

  tok, y, mask = _tokens(s)
  case = _nnx_case("nnx causal Conv1D LM", LM(nnx.Rngs(0)), tok, y, mask)
  case.sig_mask = False
  return case


def _nnx_block_cls():
  from flax import nnx

  class Block(nnx.Module):
    """Pre-norm transformer block from NNX layers (nnx.MultiHeadAttention, causal)."""

    def __init__(self, d, heads, rngs):
      self.norm1 = nnx.LayerNorm(d, rngs=rngs)
      self.attn = nnx.MultiHeadAttention(heads, d, decode=False, rngs=rngs)
      self.norm2 = nnx.RMSNorm(d, rngs=rngs)
      self.up = nnx.Linear(d, 4 * d, rngs=rngs)
      self.down = nnx.Linear(4 * d, d, rngs=rngs)

    def __call__(self, h):
      causal = nnx.make_causal_mask(jnp.ones(h.shape[:2]))
      h = h + self.attn(self.norm1(h), mask=causal)
      return h + self.down(nnx.gelu(self.up(self.norm2(h))))

  return Block


def nnx_transformer(s: Size = TINY):
  """nnx.Embed (tied: Embed.attend as the head) + nnx.MultiHeadAttention blocks."""
  from flax import nnx
  Block = _nnx_block_cls()

  class LM(nnx.Module):
    def __init__(self, rngs):
      self.embed = nnx.Embed(s.vocab, s.d, rngs=rngs)
      self.blocks = nnx.List([Block(s.d, s.heads, rngs) for _ in range(s.layers)])
      self.norm = nnx.LayerNorm(s.d, rngs=rngs)

    def __call__(self, tok):
      h = self.embed(tok)
      for b in self.blocks:
        h = b(h)
      return self.embed.attend(self.norm(h))

  tok, y, mask = _tokens(s)
  return _nnx_case("nnx transformer (tied Embed.attend)", LM(nnx.Rngs(0)), tok, y, mask)


def nnx_scan_transformer(s: Size = TINY):
  """``nnx_transformer``'s scanned twin: the same blocks stacked with nnx.vmap, run with
  nnx.scan over nnx.remat (the NNX docs' pattern), tied head."""
  from flax import nnx
  Block = _nnx_block_cls()

  class LM(nnx.Module):
    def __init__(self, rngs):
      self.embed = nnx.Embed(s.vocab, s.d, rngs=rngs)

      @nnx.split_rngs(splits=s.layers)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def make(rngs):
        return Block(s.d, s.heads, rngs)

      self.blocks = make(rngs)
      self.norm = nnx.LayerNorm(s.d, rngs=rngs)

    def __call__(self, tok):
      @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
      @nnx.remat
      def run(h, block):
        return block(h)

      return self.embed.attend(self.norm(run(self.embed(tok), self.blocks)))

  tok, y, mask = _tokens(s)
  return _nnx_case("nnx.scan(nnx.remat) transformer (tied)", LM(nnx.Rngs(0)), tok, y, mask, scanned=True)


# --- Flax Linen -------------------------------------------------------------------

def linen_scan_lm(s: Size = TINY):
  """nn.scan(nn.remat(Block)) over layers; nn.Embed shared with the head via Embed.attend."""
  import flax.linen as nn

  class Block(nn.Module):
    d: int
    heads: int

    @nn.compact
    def __call__(self, h, _):
      causal = nn.make_causal_mask(jnp.ones(h.shape[:2]))
      a = nn.SelfAttention(num_heads=self.heads, qkv_features=self.d)(nn.LayerNorm()(h), mask=causal)
      h = h + a
      m = nn.Dense(self.d)(nn.gelu(nn.Dense(4 * self.d)(nn.LayerNorm()(h))))
      return h + m, None

  class LM(nn.Module):
    @nn.compact
    def __call__(self, tok):
      embed = nn.Embed(s.vocab, s.d)
      h = embed(tok)
      stack = nn.scan(nn.remat(Block), variable_axes={"params": 0}, split_rngs={"params": True},
                      length=s.layers)
      h, _ = stack(s.d, s.heads)(h, None)
      return embed.attend(nn.LayerNorm()(h))

  tok, y, mask = _tokens(s)
  model = LM()
  params = model.init(jax.random.key(0), tok[:1])["params"]
  apply_fn = lambda p, x: model.apply({"params": p}, x)
  return Case("linen nn.scan(nn.remat) LM (tied)", apply_fn, params, tok, y, mask, scanned=True)


# --- transformers (Flax classes) ----------------------------------------------------

def _hf_lm(name, model_cls, config, s, with_mask=True):
  tok, y, mask = _tokens(s)
  model = model_cls(config, input_shape=(1, s.seq), seed=0, _do_init=True)
  params = model.params
  if with_mask:
    apply_fn = lambda p, x: model(x["input_ids"], attention_mask=x["attention_mask"], params=p).logits
    inputs = {"input_ids": tok, "attention_mask": mask.astype(jnp.int32)}
  else:
    apply_fn = lambda p, x: model(x, params=p).logits
    inputs = tok
  return Case(name, apply_fn, params, inputs, y, mask)


def hf_gpt2(s: Size = TINY):
  from transformers import FlaxGPT2LMHeadModel, GPT2Config
  cfg = GPT2Config(vocab_size=s.vocab, n_positions=s.seq, n_embd=s.d, n_layer=s.layers,
                   n_head=s.heads)
  return _hf_lm("transformers FlaxGPT2LMHeadModel (tied)", FlaxGPT2LMHeadModel, cfg, s)


def _rope_positions(s: Size) -> int:
  # transformers' Flax rotary table keeps only max_position_embeddings entries
  # of its last axis ([sin | cos], 2 * head_dim): it must be >= 2 * head_dim
  return max(s.seq, 2 * s.d // s.heads)


def hf_llama(s: Size = TINY):
  from transformers import FlaxLlamaForCausalLM, LlamaConfig
  cfg = LlamaConfig(vocab_size=s.vocab, hidden_size=s.d, intermediate_size=2 * s.d,
                    num_hidden_layers=s.layers, num_attention_heads=s.heads,
                    num_key_value_heads=s.heads, max_position_embeddings=_rope_positions(s))
  return _hf_lm("transformers FlaxLlamaForCausalLM", FlaxLlamaForCausalLM, cfg, s)


def hf_gemma(s: Size = TINY):
  from transformers import FlaxGemmaForCausalLM, GemmaConfig
  cfg = GemmaConfig(vocab_size=s.vocab, hidden_size=s.d, intermediate_size=2 * s.d,
                    num_hidden_layers=s.layers, num_attention_heads=s.heads,
                    num_key_value_heads=1, head_dim=s.d // s.heads,
                    max_position_embeddings=_rope_positions(s))
  return _hf_lm("transformers FlaxGemmaForCausalLM (tied, GQA)", FlaxGemmaForCausalLM, cfg, s)


def hf_bert_mlm(s: Size = TINY):
  from transformers import BertConfig, FlaxBertForMaskedLM
  cfg = BertConfig(vocab_size=s.vocab, hidden_size=s.d, num_hidden_layers=s.layers,
                   num_attention_heads=s.heads, intermediate_size=2 * s.d,
                   max_position_embeddings=s.seq)
  return _hf_lm("transformers FlaxBertForMaskedLM (tied)", FlaxBertForMaskedLM, cfg, s)


def hf_resnet(s: Size = TINY):
  """transformers' FlaxResNetForImageClassification, BatchNorm in evaluation mode."""
  from transformers import FlaxResNetForImageClassification, ResNetConfig
  c = s.channels
  cfg = ResNetConfig(num_channels=3, embedding_size=c, hidden_sizes=[c, 2 * c],
                     depths=[1, 1], layer_type="bottleneck", num_labels=5)
  model = FlaxResNetForImageClassification(cfg, input_shape=(1, s.image, s.image, 3), seed=0)
  variables = model.params
  stats = variables["batch_stats"]
  x, y = _images(s)
  x = jnp.transpose(x, (0, 3, 1, 2))  # pixel_values are NCHW
  apply_fn = lambda p, px: model(px, params={"params": p, "batch_stats": stats}, train=False).logits
  return Case("transformers FlaxResNetForImageClassification (eval)", apply_fn,
              variables["params"], x, y)


def hf_vit(s: Size = TINY):
  """transformers' FlaxViTForImageClassification: a cls token concatenated to the patches."""
  from transformers import FlaxViTForImageClassification, ViTConfig
  cfg = ViTConfig(image_size=s.image, patch_size=s.patch or s.image // 2, num_channels=3, hidden_size=s.d,
                  num_hidden_layers=s.layers, num_attention_heads=s.heads, intermediate_size=2 * s.d,
                  num_labels=5)
  model = FlaxViTForImageClassification(cfg, input_shape=(1, s.image, s.image, 3), seed=0)
  x, y = _images(s)
  x = jnp.transpose(x, (0, 3, 1, 2))  # pixel_values are NCHW
  apply_fn = lambda p, px: model(px, params=p).logits
  return Case("transformers FlaxViTForImageClassification (cls token)", apply_fn, model.params, x, y)


def linen_weightnorm_cnn(s: Size = TINY):
  """flax.linen.WeightNorm around Conv and Dense: kernels computed as g * v / ||v||."""
  import flax.linen as nn

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = jax.nn.relu(nn.WeightNorm(nn.Conv(s.channels, (3, 3)))(x))
      h = jax.nn.relu(nn.WeightNorm(nn.Conv(s.channels, (3, 3), strides=(2, 2)))(h))
      return nn.WeightNorm(nn.Dense(5))(h.reshape(h.shape[0], -1))

  x, y = _images(s)
  net = Net()
  params = net.init(jax.random.key(0), x[:1])
  return Case("flax.linen WeightNorm(Conv) CNN", net.apply, params, x, y)


def linen_lstm(s: Size = TINY):
  """flax.linen.RNN(LSTMCell) over time (a scan whose body closes over the cell's weights)."""
  import flax.linen as nn

  class Net(nn.Module):
    @nn.compact
    def __call__(self, tok):
      h = nn.Embed(s.vocab, s.d)(tok)
      h = nn.RNN(nn.LSTMCell(s.d))(h)
      return nn.Dense(s.vocab)(h)

  tok, y, mask = _tokens(s)
  net = Net()
  params = net.init(jax.random.key(0), tok[:1])
  # sig's mask weights signals by position; here time is the scan's loop axis
  return Case("flax.linen RNN(LSTMCell) LM", net.apply, params, tok, y, mask, scanned=True, sig_mask=False)


def linen_gru(s: Size = TINY):
  """flax.linen.RNN(GRUCell) over time, two layers."""
  import flax.linen as nn

  class Net(nn.Module):
    @nn.compact
    def __call__(self, tok):
      h = nn.Embed(s.vocab, s.d)(tok)
      for _ in range(s.layers):
        h = nn.RNN(nn.GRUCell(s.d))(h)
      return nn.Dense(s.vocab)(h)

  tok, y, mask = _tokens(s)
  net = Net()
  params = net.init(jax.random.key(0), tok[:1])
  # sig's mask weights signals by position; here time is the scan's loop axis
  return Case("flax.linen RNN(GRUCell) LM", net.apply, params, tok, y, mask, scanned=True, sig_mask=False)


# --- equinox and haiku ----------------------------------------------------------------

def eqx_mlp(s: Size = TINY):
  import equinox as eqx
  model = eqx.nn.MLP(12, 5, s.d, depth=2, key=jax.random.key(0))
  params, static = eqx.partition(model, eqx.is_inexact_array)
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(s.batch, 12)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 5, size=s.batch), jnp.int32)
  apply_fn = lambda p, xb: jax.vmap(eqx.combine(p, static))(xb)
  return Case("equinox eqx.nn.MLP", apply_fn, params, x, y)


def eqx_attention_lm(s: Size = TINY):
  """eqx.nn.Embedding + eqx.nn.MultiheadAttention (causal) + eqx.nn.LayerNorm + eqx.nn.Linear."""
  import equinox as eqx
  keys = jax.random.split(jax.random.key(0), 4 + 2 * s.layers)

  class LM(eqx.Module):
    embed: eqx.nn.Embedding
    attn: list
    mlp: list
    norm: eqx.nn.LayerNorm
    head: eqx.nn.Linear

    def __call__(self, tok):
      h = jax.vmap(self.embed)(tok)
      causal = jnp.tril(jnp.ones((tok.shape[0], tok.shape[0]), bool))
      for attn, mlp in zip(self.attn, self.mlp):
        h = h + attn(h, h, h, mask=causal)
        h = h + jax.vmap(mlp)(h)
      return jax.vmap(lambda t: self.head(self.norm(t)))(h)

  model = LM(eqx.nn.Embedding(s.vocab, s.d, key=keys[0]),
             [eqx.nn.MultiheadAttention(s.heads, s.d, key=keys[4 + i]) for i in range(s.layers)],
             [eqx.nn.MLP(s.d, s.d, 2 * s.d, depth=1, key=keys[4 + s.layers + i])
              for i in range(s.layers)],
             eqx.nn.LayerNorm(s.d), eqx.nn.Linear(s.d, s.vocab, key=keys[1]))
  params, static = eqx.partition(model, eqx.is_inexact_array)
  tok, y, mask = _tokens(s)
  apply_fn = lambda p, tb: jax.vmap(eqx.combine(p, static))(tb)
  return Case("equinox MultiheadAttention LM", apply_fn, params, tok, y, mask)


def haiku_layer_stack(s: Size = TINY):
  """hk.layer_stack over an MLP-mixer-style token block (a scan over stacked params)."""
  import haiku as hk

  def forward(tok):
    h = hk.Embed(s.vocab, s.d)(tok)

    @hk.layer_stack(s.layers)
    def layer(h):
      n = hk.LayerNorm(-1, create_scale=True, create_offset=True)(h)
      return h + hk.Linear(s.d)(jax.nn.gelu(hk.Linear(2 * s.d)(n)))

    h = layer(h)
    return hk.Linear(s.vocab)(h)

  f = hk.without_apply_rng(hk.transform(forward))
  tok, y, mask = _tokens(s)
  params = f.init(jax.random.key(0), tok[:1])
  return Case("haiku hk.layer_stack LM", f.apply, params, tok, y, mask, scanned=True)


ALL = [nnx_mlp, nnx_cnn_batchnorm, nnx_conv_variants, nnx_causal_conv_lm, nnx_transformer,
       nnx_scan_transformer, linen_scan_lm, hf_gpt2, hf_llama, hf_gemma, hf_bert_mlm, hf_resnet,
       eqx_mlp, eqx_attention_lm, haiku_layer_stack, hf_vit, linen_weightnorm_cnn, linen_lstm, linen_gru]
