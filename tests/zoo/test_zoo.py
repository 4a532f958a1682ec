"""Importance on model code users have: the factored engine against the vmap reference.

Every model comes from an installed package (``benchmarks/model_zoo.py``). For
each: no parameter leaf leaves the fast path; empirical and sampled Fisher
(same per-example keys) and MAS equal the ``engine='vmap'`` reference
(per-example ``vjp``, the model differentiated by JAX itself) element-wise
(rtol 1e-4) and within 1e-5 of each leaf's largest entry; SIG runs and is
finite, non-negative and non-zero. Sequence models carry a padding mask.
"""
import warnings

import jax
import numpy as np
import pytest
from compare import assert_tree_close
from compare import leaf_rel_err as rel_err

import wva_jax as wj
from benchmarks import model_zoo as zm

pytestmark = pytest.mark.slow


def _estimators(case, engine):
  imp = wj.importance
  key = jax.random.key(7)

  def run(p, x, y, m):
    out = {
        "fisher": imp.fisher(case.apply_fn, p, x, y, mask=m, engine=engine, chunk_size=4),
        "mas": imp.mas(case.apply_fn, p, x, mask=m, engine=engine, chunk_size=4),
    }
    # same per-example keys on both engines: the same draws, so the same numbers
    out["sampled"] = imp.fisher(case.apply_fn, p, x, mode="sampled", key=key, mask=m,
                                engine=engine, chunk_size=4)
    return out

  return jax.jit(run)(case.params, case.inputs, case.targets, case.mask)


@pytest.mark.parametrize("build", zm.ALL, ids=[b.__name__ for b in zm.ALL])
def test_zoo_model_fast_path_matches_reference(build):
  case = build()
  report = wj.importance.engine_report(case.apply_fn, case.params, case.inputs)
  assert not [k for k, v in report.items() if v.startswith("fallback")], report
  if case.scanned:
    assert any(v.endswith("(scan)") for v in report.values()), report
  with warnings.catch_warnings():
    warnings.simplefilter("error", wj.importance.FallbackWarning)
    fast = _estimators(case, "factored")
  ref = _estimators(case, "vmap")
  for name in ref:
    assert_tree_close(fast[name], ref[name], rtol=1e-4)   # element-wise, every entry
    assert rel_err(fast[name], ref[name]) <= 1e-5, name
  sig_mask = case.mask if case.sig_mask else None
  s = jax.jit(lambda p, x, m: wj.importance.sig(case.apply_fn, p, x, mask=m, chunk_size=4))(
      case.params, case.inputs, sig_mask)
  leaves = jax.tree_util.tree_leaves(s)
  assert all(np.all(np.isfinite(l)) and np.all(np.asarray(l) >= 0) for l in leaves)
  assert sum(float(np.asarray(l).sum()) for l in leaves) > 0
