"""qwix's adapter layout (``<w>_lora_a`` / ``<w>_lora_b`` beside ``<w>``) without qwix: plain dicts, NumPy references.

Fast; ``tests/test_tunix.py`` (slow) checks the same on a real tunix model adapted by qwix.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import wva_jax as wj

RNG = np.random.default_rng(0)
S = 2.0   # qwix's alpha / rank


def r(*shape):
  return RNG.normal(size=shape).astype(np.float32)


# q: einsum 'BTD,DNH->BTNH' (A [D, r], B [r, N, H]); o: 'BTNH,NHD->BTD' (A [N, H, r], B [r, D]);
# mlp: one module with two adapted weights (dot_general, A [in, r], B [r, out]).
A = {"q": r(4, 2), "o": r(3, 5, 2), "k1": r(4, 2), "k2": r(6, 2)}
B = {"q": r(2, 3, 5), "o": r(2, 4), "k1": r(2, 6), "k2": r(2, 7)}
ADAPTERS = {"attn": {"q": {"w_lora_a": A["q"], "w_lora_b": B["q"]}, "o": {"w_lora_a": A["o"], "w_lora_b": B["o"]}},
            "mlp": {"k1_lora_a": A["k1"], "k1_lora_b": B["k1"], "k2_lora_a": A["k2"], "k2_lora_b": B["k2"]}}
F = {k: RNG.random(s).astype(np.float32) for k, s in (("q", (4, 3, 5)), ("o", (3, 5, 4)), ("k1", (4, 6)),
                                                      ("k2", (2, 3, 7)))}
# k2's kernel has two contracted axes (2, 3): qwix's dot_general flattens them into A's 6 rows
BASE = {"attn": {"q": {"w": F["q"], "bias": np.ones(5)}, "o": {"w": F["o"]}},
        "mlp": {"k1": F["k1"], "k2": F["k2"]}}
PATH = {"q": ("attn", "q", "w"), "o": ("attn", "o", "w"), "k1": ("mlp", "k1"), "k2": ("mlp", "k2")}


def dense(name):
  return S * np.tensordot(A[name].astype(np.float64), B[name].astype(np.float64), axes=1)


def get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def test_importance_sits_at_the_weights_paths_scaled():
  imp = wj.lora_importance(base_importance=BASE, adapters=ADAPTERS, scale=S)
  assert set(imp["mlp"]) == {"k1", "k2"} and set(imp["attn"]["q"]) == {"w"}
  for name, path in PATH.items():
    got = np.asarray(get(imp, path))
    assert got.shape == A[name].shape[:-1] + B[name].shape[1:]
    np.testing.assert_allclose(got.ravel(), S ** 2 * F[name].ravel(), rtol=1e-6)   # k2: reshaped, same order


def test_penalty_gradient_and_pullback_match_numpy():
  imp = wj.lora_importance(base_importance=BASE, adapters=ADAPTERS, scale=S)
  lam = 0.3
  want = sum(0.5 * lam * np.sum(F[n].reshape(dense(n).shape) * dense(n) ** 2) for n in A)
  np.testing.assert_allclose(float(wj.lora_ewc_penalty(ADAPTERS, imp, lam)), want, rtol=1e-5)
  g = wj.lora_ewc_grad(ADAPTERS, imp, lam)
  om = wj.lora_pullback(ADAPTERS, imp)
  for n in A:
    f = F[n].reshape(dense(n).shape)
    a2, b2 = A[n].reshape(-1, 2).astype(np.float64), B[n].reshape(2, -1).astype(np.float64)
    fm = S ** 2 * f.reshape(a2.shape[0], b2.shape[1])
    p = fm * (a2 @ b2)   # d/dW of 1/2 sum (s^2 F) (A B)^2 in the matrix form
    node = get(ADAPTERS, PATH[n][:-1]) if n in ("q", "o") else ADAPTERS["mlp"]
    key = (PATH[n][-1] if n in ("q", "o") else n)
    gnode = get(g, PATH[n][:-1]) if n in ("q", "o") else g["mlp"]
    onode = get(om, PATH[n][:-1]) if n in ("q", "o") else om["mlp"]
    assert set(gnode) == set(node)
    np.testing.assert_allclose(np.asarray(gnode[key + "_lora_a"]), (lam * p @ b2.T).reshape(A[n].shape), rtol=1e-4)
    np.testing.assert_allclose(np.asarray(gnode[key + "_lora_b"]), (lam * a2.T @ p).reshape(B[n].shape), rtol=1e-4)
    np.testing.assert_allclose(np.asarray(onode[key + "_lora_a"]), (fm @ (b2 ** 2).T).reshape(A[n].shape), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(onode[key + "_lora_b"]), ((a2 ** 2).T @ fm).reshape(B[n].shape), rtol=1e-5)


def test_transforms_keep_the_layout_under_jit():
  imp = wj.lora_importance(base_importance=BASE, adapters=ADAPTERS, scale=S)
  params = jax.tree_util.tree_map(jnp.asarray, ADAPTERS)
  tx = optax.chain(wj.add_lora_ewc(None, 1.0), optax.adam(1e-2), wj.lora_wva_scale(None, 1.0))
  state = wj.set_importance(tx.init(params), imp)
  u, _ = jax.jit(tx.update)(jax.tree_util.tree_map(jnp.ones_like, params), state, params)
  assert jax.tree_util.tree_structure(u) == jax.tree_util.tree_structure(params)


def test_transposed_kernel_and_errors():
  base = {"attn": {"q": {"w": np.transpose(F["q"], (1, 0, 2))}}}   # 'NDH' instead of 'DNH'
  ad = {"attn": {"q": ADAPTERS["attn"]["q"]}}
  got = wj.lora_importance(base_importance=base, adapters=ad)
  np.testing.assert_array_equal(np.asarray(got["attn"]["q"]["w"]), F["q"])
  # A [3, r], B [r, 3, 4, 3]: a kernel [3, 4, 3, 3] fits by moving its axis 2 or its axis 3 first
  ambiguous = {"m": {"w_lora_a": r(3, 2), "w_lora_b": r(2, 3, 4, 3)}}
  with pytest.raises(ValueError, match="in 2 ways"):
    wj.lora_importance(base_importance={"m": {"w": np.ones((3, 4, 3, 3))}}, adapters=ambiguous)
  with pytest.raises(ValueError, match="not part of an adapter pair"):
    wj.lora_importance(base_importance=BASE, adapters={"m": {"w_lora_a": r(3, 2)}})
  with pytest.raises(ValueError, match=r"\['attn'\]\['q'\]\['w'\].*has shape"):
    wj.lora_importance(base_importance={"attn": {"q": {"w": np.ones((4, 4, 5))}}}, adapters=ad)
