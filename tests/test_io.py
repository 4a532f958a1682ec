"""wj.save_importance / wj.load_importance (safetensors) and wj.fisher_merge (against NumPy by hand)."""
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

import wva_jax as wj

RNG = np.random.default_rng(0)   # drawn in test order: tolerances hold for any draw


def _tree():
  return {"layers": [{"kernel": jnp.asarray(RNG.random((3, 4)), jnp.float32),
                      "bias": jnp.asarray(RNG.random(4), jnp.bfloat16)},
                     {"kernel": jnp.asarray(RNG.random((4, 2)), jnp.bfloat16)}],
          "scale": jnp.asarray(RNG.random(()), jnp.float32),
          "pair": (jnp.asarray(RNG.random(5), jnp.float16), jnp.asarray(RNG.random((2, 2)), jnp.float32))}


def _bits(x):
  x = np.asarray(x)
  return x.dtype, x.shape, x.tobytes()


def _assert_identical(a, b):
  la, da = jax.tree_util.tree_flatten(a)
  lb, db = jax.tree_util.tree_flatten(b)
  assert da == db
  for x, y in zip(la, lb):
    assert _bits(x) == _bits(y)


def test_round_trip_bit_identical_without_like(tmp_path):
  tree = _tree()
  path = tmp_path / "imp.safetensors"
  assert wj.save_importance(path, tree) == [str(path)]
  back = wj.load_importance(path)
  _assert_identical(back, tree)   # dicts, the list, the tuple and every dtype (bf16, f16) come back
  assert back["layers"][1]["kernel"].dtype == jnp.bfloat16


def test_other_tools_read_it_with_safetensors_alone(tmp_path):
  tree = _tree()
  path = tmp_path / "imp.safetensors"
  wj.save_importance(path, tree, metadata={"estimator": "fisher", "num_examples": 4096})
  raw = safetensors.numpy.load_file(str(path))
  assert sorted(raw) == ["layers/0/bias", "layers/0/kernel", "layers/1/kernel", "pair/0", "pair/1", "scale"]
  assert raw["layers/1/kernel"].dtype == ml_dtypes.bfloat16
  assert raw["layers/0/kernel"].tobytes() == np.asarray(tree["layers"][0]["kernel"]).tobytes()
  meta = wj.importance_metadata(path)
  assert meta["estimator"] == "fisher" and meta["num_examples"] == "4096"
  assert meta["format"] == "wva_jax.importance" and meta["wva_jax_version"] == wj.__version__
  # The header is plain safetensors: 8-byte little-endian length, then JSON with __metadata__.
  with open(path, "rb") as f:
    n = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(n))
  assert header["__metadata__"]["estimator"] == "fisher"
  assert header["layers/1/kernel"]["dtype"] == "BF16" and header["layers/1/kernel"]["shape"] == [4, 2]


def test_nnx_state_round_trip_with_and_without_like(tmp_path):
  model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.Linear(4, 2, rngs=nnx.Rngs(1)))
  _, params = nnx.split(model, nnx.Param)
  imp = jax.tree_util.tree_map(lambda p: jnp.abs(p).astype(jnp.bfloat16), params)
  path = tmp_path / "nnx.safetensors"
  wj.save_importance(path, imp)
  names = sorted(safetensors.numpy.load_file(str(path)))
  assert names == ["layers/0/bias", "layers/0/kernel", "layers/1/bias", "layers/1/kernel"]
  back = wj.load_importance(path, like=params)
  assert type(back) is type(params)
  _assert_identical(back, imp)
  assert isinstance(back["layers"][0]["kernel"], nnx.Param)
  plain = wj.load_importance(path)   # no like: the same arrays in dicts
  assert _bits(plain["layers"][1]["kernel"]) == _bits(imp["layers"][1]["kernel"][...])


def test_sharded_layout_several_files_and_index(tmp_path):
  tree = {f"w{i}": jnp.asarray(RNG.random((10, 10)), jnp.float32) for i in range(5)}   # 400 bytes each
  path = tmp_path / "big.safetensors"
  written = wj.save_importance(path, tree, max_shard_bytes=900, metadata={"estimator": "mas"})
  assert [os.path.basename(w) for w in written] == [
      "big-00001-of-00003.safetensors", "big-00002-of-00003.safetensors", "big-00003-of-00003.safetensors",
      "big.safetensors.index.json"]
  assert not path.exists()
  index = json.loads((tmp_path / "big.safetensors.index.json").read_text())
  assert index["metadata"]["total_size"] == 5 * 400
  assert index["weight_map"] == {"w0": written[0].split("/")[-1], "w1": written[0].split("/")[-1],
                                 "w2": written[1].split("/")[-1], "w3": written[1].split("/")[-1],
                                 "w4": written[2].split("/")[-1]}
  # every shard is a plain safetensors file
  raw = {}
  for w in written[:-1]:
    raw.update(safetensors.numpy.load_file(w))
  assert all(raw[k].tobytes() == np.asarray(v).tobytes() for k, v in tree.items())
  _assert_identical(wj.load_importance(path), tree)
  _assert_identical(wj.load_importance(str(path) + ".index.json", like=tree), tree)
  assert wj.importance_metadata(path)["estimator"] == "mas"
  # saving one file at the same path removes the stale index
  wj.save_importance(path, {"w0": tree["w0"]})
  assert path.exists() and not (tmp_path / "big.safetensors.index.json").exists()
  assert list(wj.load_importance(path)) == ["w0"]


def test_errors_name_the_bad_value(tmp_path):
  path = tmp_path / "imp.safetensors"
  wj.save_importance(path, {"a": jnp.ones((2, 3)), "b": jnp.ones(4)})
  with pytest.raises(ValueError, match=r"'a'.*shape \(2, 3\).*shape \(3, 2\)"):
    wj.load_importance(path, like={"a": jnp.ones((3, 2)), "b": jnp.ones(4)})
  with pytest.raises(ValueError, match="no tensor 'c'"):
    wj.load_importance(path, like={"a": jnp.ones((2, 3)), "b": jnp.ones(4), "c": jnp.ones(1)})
  with pytest.raises(ValueError, match="tensor 'b' that like has no leaf"):
    wj.load_importance(path, like={"a": jnp.ones((2, 3))})
  with pytest.raises(ValueError, match="'x/y'"):
    wj.save_importance(path, {"x/y": jnp.ones(1)})
  with pytest.raises(ValueError, match="reserved"):
    wj.save_importance(path, {"a": jnp.ones(1)}, metadata={"format": "x"})
  with pytest.raises(ValueError, match="max_shard_bytes"):
    wj.save_importance(path, {"a": jnp.ones(1)}, max_shard_bytes=0)
  with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
    wj.load_importance(tmp_path / "nothing.safetensors")


SHARDED_SCRIPT = textwrap.dedent("""
  import json, sys
  import jax, jax.numpy as jnp, numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  import wva_jax as wj
  path = sys.argv[1]
  reads = []
  orig = jax.make_array_from_callback
  def spy(shape, sharding, cb, *a, **k):
    def wrapped(index):
      out = cb(index)
      reads.append((len(shape), out.shape))
      return out
    return orig(shape, sharding, wrapped, *a, **k)
  jax.make_array_from_callback = spy
  mesh = Mesh(np.array(jax.devices()), ("fsdp",))
  imp = {"k": jnp.arange(8 * 6, dtype=jnp.float32).reshape(8, 6).astype(jnp.bfloat16),
         "v": jnp.arange(12, dtype=jnp.float32)}
  wj.save_importance(path, imp, max_shard_bytes=64)
  sh = {"k": NamedSharding(mesh, P("fsdp", None)), "v": NamedSharding(mesh, P("fsdp"))}
  like = {"k": jax.ShapeDtypeStruct((8, 6), jnp.bfloat16, sharding=sh["k"]),
          "v": jax.device_put(jnp.zeros(12), sh["v"])}
  back = wj.load_importance(path, like=like)
  out = {"devices": len(jax.devices()),
         "specs": [str(back["k"].sharding.spec), str(back["v"].sharding.spec)],
         "shard_rows": sorted(int(s.data.shape[0]) for s in back["k"].addressable_shards),
         "dtype": str(back["k"].dtype),
         "read_rows": sorted(int(s[0]) for nd, s in reads if nd == 2),
         "equal": [bool(np.asarray(back[n]).tobytes() == np.asarray(imp[n]).tobytes()) for n in ("k", "v")]}
  print("RESULT " + json.dumps(out))
""")


@pytest.mark.slow   # a subprocess with 4 CPU devices (XLA_FLAGS must precede jax's import)
def test_loads_straight_into_sharded_like(tmp_path):
  script = tmp_path / "load_sharded.py"
  script.write_text(SHARDED_SCRIPT)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # this checkout's wva_jax
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
  proc = subprocess.run([sys.executable, str(script), str(tmp_path / "s.safetensors")], env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
  out = json.loads(line[len("RESULT "):])
  assert out["devices"] == 4
  assert out["specs"] == ["P('fsdp', None)", "P('fsdp',)"]
  assert out["read_rows"] == [2, 2, 2, 2]   # each callback read 2 rows from the file, never all 8
  assert out["shard_rows"] == [2, 2, 2, 2]   # each device holds its 2 of the 8 rows
  assert out["dtype"] == "bfloat16" and out["equal"] == [True, True]


# ----------------------------------------------------------------- fisher_merge

def _np_merge(params, fishers, eps, weights):
  num = sum(w * (f + eps) * p for p, f, w in zip(params, fishers, weights))
  den = sum(w * (f + eps) for f, w in zip(fishers, weights))
  return num / den


@pytest.mark.parametrize("weights", [None, [0.5, 2.0, 1.0]])
def test_fisher_merge_matches_numpy(weights):
  shapes = {"a": (3, 4), "b": (5,)}
  params = [{k: RNG.normal(size=s).astype(np.float32) for k, s in shapes.items()} for _ in range(3)]
  fishers = [{k: RNG.random(s).astype(np.float32) * (RNG.random(s) > 0.3) for k, s in shapes.items()}
             for _ in range(3)]
  fishers[0]["b"][:] = fishers[1]["b"][:] = fishers[2]["b"][:] = 0.0   # all zero: the (weighted) plain average
  got = wj.fisher_merge([jax.tree_util.tree_map(jnp.asarray, p) for p in params],
                        [jax.tree_util.tree_map(jnp.asarray, f) for f in fishers], eps=1e-8, weights=weights)
  w = weights or [1.0, 1.0, 1.0]
  for k in shapes:
    want = _np_merge([p[k].astype(np.float64) for p in params], [f[k].astype(np.float64) for f in fishers],
                     1e-8, w)
    np.testing.assert_allclose(np.asarray(got[k]), want, rtol=2e-6, atol=1e-7)
  np.testing.assert_allclose(np.asarray(got["b"]), sum(wi * p["b"] for wi, p in zip(w, params)) / sum(w),
                             rtol=1e-6, atol=1e-7)
  jitted = jax.jit(lambda ps, fs: wj.fisher_merge(ps, fs, weights=weights))(params, fishers)
  np.testing.assert_allclose(np.asarray(jitted["a"]), np.asarray(got["a"]), rtol=1e-6, atol=1e-7)
  # importances closed over (concrete) inside a jitted function: checked at trace time, no error
  closed = jax.jit(lambda eps: wj.fisher_merge(params, fishers, eps=eps, weights=weights))(1e-8)
  np.testing.assert_allclose(np.asarray(closed["a"]), np.asarray(got["a"]), rtol=1e-6, atol=1e-7)


def test_fisher_merge_dtype_and_nnx_state():
  model = nnx.Linear(3, 2, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  _, p0 = nnx.split(model, nnx.Param)
  p1 = jax.tree_util.tree_map(lambda x: x + 1, p0)
  f = jax.tree_util.tree_map(lambda x: jnp.ones(x.shape, jnp.float32), p0)
  merged = wj.fisher_merge([p0, p1], [f, f])
  assert type(merged) is type(p0) and merged["kernel"].dtype == jnp.bfloat16
  want = (np.asarray(p0["kernel"][...], np.float32) + np.asarray(p1["kernel"][...], np.float32)) / 2
  np.testing.assert_allclose(np.asarray(merged["kernel"][...], np.float32), want, rtol=1e-2)


def test_fisher_merge_errors():
  p = {"a": jnp.ones(2)}
  with pytest.raises(ValueError, match="2 models but importances has 1"):
    wj.fisher_merge([p, p], [p])
  with pytest.raises(ValueError, match=r"params_list\[1\] has tree structure"):
    wj.fisher_merge([p, {"b": jnp.ones(2)}], [p, p])
  with pytest.raises(ValueError, match=r"importances\[1\]\['a'\] has shape \(3,\)"):
    wj.fisher_merge([p, p], [p, {"a": jnp.ones(3)}])
  with pytest.raises(ValueError, match=r"importances\[0\]\['a'\] has negative"):
    wj.fisher_merge([p, p], [{"a": -jnp.ones(2)}, p])
  with pytest.raises(ValueError, match="eps"):
    wj.fisher_merge([p], [p], eps=-1.0)
  with pytest.raises(ValueError, match="all 0"):
    wj.fisher_merge([p, p], [p, p], weights=[0.0, 0.0])
  with pytest.raises(ValueError, match="empty"):
    wj.fisher_merge([], [])


# ----------------------------------------------------------------- other tools' names (names=, hf_names)

def _flax_llama():
  """transformers' FlaxLlamaForCausalLM (a tiny random config): a Flax tree with Hugging Face module names."""
  transformers = pytest.importorskip("transformers")
  cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
  return cfg, transformers.FlaxLlamaForCausalLM(cfg, seed=0).params


@pytest.mark.slow   # transformers' Flax Llama: ~13 s of import and init
def test_hf_names_give_llama_names_other_tools_know(tmp_path):
  """Every name hf_names gives a transformers Flax Llama is a Llama tensor that gguf's name table (llama.cpp's
  converter, not this project) knows, each linear weight [out, in] as PyTorch holds it, and the file loads back
  as the tree it came from, with and without like."""
  gguf = pytest.importorskip("gguf")
  cfg, params = _flax_llama()
  imp = jax.tree_util.tree_map(lambda p: jnp.asarray(RNG.random(p.shape), jnp.bfloat16), params)
  path = tmp_path / "imp.safetensors"
  wj.save_importance(path, imp, names=wj.hf_names())
  raw = safetensors.numpy.load_file(str(path))
  table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
  unknown = [n for n in raw if table.get_name(n, try_suffixes=(".weight", ".bias")) is None]
  assert not unknown, unknown
  assert len(raw) == len(jax.tree_util.tree_leaves(params)) == 3 + 9 * cfg.num_hidden_layers
  hd = cfg.hidden_size // cfg.num_attention_heads
  assert raw["model.layers.1.self_attn.q_proj.weight"].shape == (cfg.num_attention_heads * hd, cfg.hidden_size)
  assert raw["model.layers.1.self_attn.k_proj.weight"].shape == (cfg.num_key_value_heads * hd, cfg.hidden_size)
  assert raw["model.layers.0.mlp.down_proj.weight"].shape == (cfg.hidden_size, cfg.intermediate_size)
  assert raw["lm_head.weight"].shape == (cfg.vocab_size, cfg.hidden_size)
  k = np.asarray(imp["model"]["layers"]["0"]["mlp"]["up_proj"]["kernel"])
  assert raw["model.layers.0.mlp.up_proj.weight"].tobytes() == np.ascontiguousarray(k.T).tobytes()
  _assert_identical(wj.load_importance(path), imp)
  _assert_identical(wj.load_importance(path, like=params), imp)


READER_SCRIPT = textwrap.dedent("""
    import json, sys
    import ml_dtypes  # registers numpy's bfloat16: safetensors.numpy cannot read a BF16 file without it
    from safetensors.numpy import load_file
    imp, par = load_file(sys.argv[1]), load_file(sys.argv[2])
    # a merging tool's view: the importance beside each weight under the same name
    assert sorted(imp) == sorted(par)
    out = {n: [list(imp[n].shape), str(imp[n].dtype), list(par[n].shape),
               float((imp[n].astype("float32") * par[n].astype("float32")).sum())] for n in imp}
    print("RESULT " + json.dumps({"tensors": out, "wva_jax": "wva_jax" in sys.modules, "jax": "jax" in sys.modules}))
""")


def _llama_like_tree(d=8, ffn=12, vocab=20):
  """A Flax tree with Hugging Face Llama module names (as transformers' FlaxLlamaForCausalLM lays it out)."""
  layer = {"self_attn": {p: {"kernel": RNG.normal(size=(d, d)).astype(np.float32)} for p in ("q_proj", "o_proj")},
           "mlp": {"up_proj": {"kernel": RNG.normal(size=(d, ffn)).astype(np.float32)}},
           "input_layernorm": {"weight": np.ones(d, np.float32)}}
  return {"model": {"embed_tokens": {"embedding": RNG.normal(size=(vocab, d)).astype(np.float32)},
                    "layers": {"0": layer}},
          "lm_head": {"kernel": RNG.normal(size=(d, vocab)).astype(np.float32)}}


def test_renamed_importance_and_params_read_by_name_without_wva_jax(tmp_path):
  """The Llama names, importance in bf16 and the parameters saved beside it: a process that never imports wva_jax
  (nor jax) reads both by name with safetensors.numpy (and ml_dtypes for bf16) and pairs them."""
  params = jax.tree_util.tree_map(jnp.asarray, _llama_like_tree())
  imp = jax.tree_util.tree_map(lambda p: jnp.asarray(RNG.random(p.shape), jnp.bfloat16), params)
  wj.save_importance(tmp_path / "imp.safetensors", imp, names=wj.hf_names(), metadata={"estimator": "fisher"})
  wj.save_importance(tmp_path / "params.safetensors", params, names=wj.hf_names())
  script = tmp_path / "read.py"
  script.write_text(READER_SCRIPT)
  proc = subprocess.run([sys.executable, str(script), str(tmp_path / "imp.safetensors"),
                         str(tmp_path / "params.safetensors")], capture_output=True, text=True, timeout=300,
                        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))[len("RESULT "):])
  assert not out["wva_jax"] and not out["jax"]
  assert sorted(out["tensors"]) == ["lm_head.weight", "model.embed_tokens.weight",
                                    "model.layers.0.input_layernorm.weight", "model.layers.0.mlp.up_proj.weight",
                                    "model.layers.0.self_attn.o_proj.weight", "model.layers.0.self_attn.q_proj.weight"]
  shape, dtype, pshape, dot = out["tensors"]["model.layers.0.mlp.up_proj.weight"]
  assert shape == pshape == [12, 8] and dtype == "bfloat16"   # [out, in], as PyTorch holds it
  kernel = params["model"]["layers"]["0"]["mlp"]["up_proj"]["kernel"]
  f = np.asarray(imp["model"]["layers"]["0"]["mlp"]["up_proj"]["kernel"], np.float32)
  assert dot == pytest.approx(float((f * np.asarray(kernel, np.float32)).sum()), rel=1e-5)


def test_names_dict_and_errors(tmp_path):
  tree = {"a": {"kernel": jnp.ones((2, 3))}, "b": jnp.arange(3.0)}
  path = tmp_path / "imp.safetensors"
  wj.save_importance(path, tree, names={"a/kernel": "x.weight", "b": "y"})
  assert sorted(safetensors.numpy.load_file(str(path))) == ["x.weight", "y"]
  _assert_identical(wj.load_importance(path, like=tree), tree)
  with pytest.raises(ValueError, match="no entry for the tensor 'b'"):
    wj.save_importance(path, tree, names={"a/kernel": "x"})
  with pytest.raises(ValueError, match="maps both 'a/kernel' and 'b' to 'x'"):
    wj.save_importance(path, tree, names={"a/kernel": "x", "b": "x"})
  with pytest.raises(ValueError, match=r"axes \(0, 0\) for 'a/kernel'"):
    wj.save_importance(path, tree, names=lambda n, s: (n, (0, 0)) if len(s) == 2 else n)


TRANSPOSED_SHARDED = textwrap.dedent("""
    import sys, jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import wva_jax as wj
    mesh = Mesh(np.array(jax.devices()), ("fsdp",))
    k = jnp.arange(8 * 6, dtype=jnp.float32).reshape(8, 6)
    wj.save_importance(sys.argv[1], {"l": {"kernel": k}}, names=wj.hf_names())
    like = {"l": {"kernel": jax.ShapeDtypeStruct((8, 6), jnp.float32, sharding=NamedSharding(mesh, P("fsdp", None)))}}
    got = wj.load_importance(sys.argv[1], like=like)["l"]["kernel"]
    assert got.sharding.spec == P("fsdp", None), got.sharding
    assert np.array_equal(np.asarray(got), np.asarray(k))
    print("RESULT ok")
""")


@pytest.mark.slow   # a subprocess with 4 simulated devices
def test_renamed_transposed_file_loads_into_a_sharded_like(tmp_path):
  """Each device reads its rows of the tree's [in, out] kernel from the file's transposed [out, in] weight."""
  script = tmp_path / "t.py"
  script.write_text(TRANSPOSED_SHARDED)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
  proc = subprocess.run([sys.executable, str(script), str(tmp_path / "s.safetensors")], env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "RESULT ok" in proc.stdout
