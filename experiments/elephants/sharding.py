"""FSDP-style sharding check on simulated devices: same numbers, state laid out like the params.

Run as ``XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m
experiments.elephants.sharding`` (the flag must be set before jax is
imported; :func:`run_in_subprocess` does that). It prints one JSON object:

* importance (Fisher sampled with a padding mask, SIG) computed
  data-parallel (batch split over the mesh, params FSDP-sharded,
  ``out_shardings`` like the params) vs on one device: max abs difference
  of the mean-normalised importance;
* two SGD-momentum steps with WVA and with EWC (bfloat16 importance), params, momentum, importance and anchor sharded
  vs the same steps on one device: max abs difference of the params;
* each state leaf's ``PartitionSpec`` next to its parameter's, after
  ``init``, ``set_importance``/``set_anchor`` and the steps; and what a naive
  ``jax.jit(tx.init)`` does to the importance (leaves it unsharded).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

FLAG = "--xla_force_host_platform_device_count"


def run_in_subprocess(devices: int = 8, timeout: float = 600) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" {FLAG}={devices}").strip()
  env["JAX_PLATFORMS"] = "cpu"
  out = subprocess.run([sys.executable, "-m", "experiments.elephants.sharding"], env=env,
                       capture_output=True, text=True, timeout=timeout,
                       cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
  if out.returncode != 0:
    raise RuntimeError(f"sharding check failed:\n{out.stderr[-4000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def check() -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, NamedSharding
  from jax.sharding import PartitionSpec as P

  import wva_jax as wj
  from experiments.elephants import model as lm
  from experiments.elephants import train
  from experiments.elephants.memory import split_state

  n_dev = len(jax.devices())
  mesh = Mesh(np.array(jax.devices()), ("fsdp",))
  cfg = lm.Config(d_model=32, heads=2, layers=1, seq_len=16)
  apply_fn, params = lm.init(cfg)
  rng = np.random.default_rng(0)
  seqs = rng.integers(1, 256, (16, cfg.seq_len + 1)).astype(np.uint8)
  mask = np.ones_like(seqs)
  mask[::3, 10:] = 0        # padded sequences: masked positions must drop out
  seqs = seqs * mask
  x, y, m = lm.split_batch(seqs, mask)

  psh = wj.sharding.fsdp_shardings(params, mesh)
  batch_sh = NamedSharding(mesh, P("fsdp"))
  one = jax.devices()[0]
  sharded_params = jax.device_put(params, psh)
  param_specs = jax.tree_util.tree_leaves(wj.sharding.specs(sharded_params))
  leaf = lambda t: [np.asarray(a, np.float32) for a in jax.tree_util.tree_leaves(t)]
  maxdiff = lambda a, b: float(max(np.max(np.abs(u - v)) for u, v in zip(leaf(a), leaf(b))))
  res = {"devices": n_dev, "params": lm.num_params(params),
         "param_specs": [str(s) for s in param_specs],
         "sharded_param_leaves": sum(any(d is not None for d in s) for s in param_specs),
         "param_leaves": len(param_specs)}

  # MAS takes the same engine path as Fisher (factored dense layers, vmap for the rest).
  estimators = {
      "fisher": lambda p, x, m: wj.importance.fisher(apply_fn, p, x, mode="sampled",
                                                     key=jax.random.key(1), mask=m, chunk_size=4),
      "sig": lambda p, x, m: wj.importance.sig(apply_fn, p, x, chunk_size=4),
  }
  res["importance"] = {}
  imps = {}
  for name, est in estimators.items():
    f = lambda p, x, m, est=est: wj.importance.normalize(est(p, x, m))
    single = jax.jit(f)(jax.device_put(params, one), jax.device_put(x, one), jax.device_put(m, one))
    sharded = jax.jit(f, in_shardings=(psh, batch_sh, batch_sh), out_shardings=psh)(
        sharded_params, jax.device_put(x, batch_sh), jax.device_put(m, batch_sh))
    imps[name] = (single, sharded)
    res["importance"][name] = {
        "max_abs_diff": maxdiff(single, sharded), "max_value": float(max(np.max(a) for a in leaf(single))),
        "max_rel_diff": maxdiff(single, sharded) / float(max(np.max(a) for a in leaf(single))),
        "specs_match": [str(a) == str(b) for a, b in
                        zip(jax.tree_util.tree_leaves(wj.sharding.specs(sharded)), param_specs)]}

  # Training steps: every params-shaped state leaf must keep its parameter's sharding.
  res["train"] = {}
  imp_single, imp_sharded = imps["fisher"]
  # SGD with momentum, not Adam: Adam's m/sqrt(v) turns 1e-9 gradient noise on
  # near-zero coordinates into lr-sized steps, which would hide a real mismatch.
  import optax
  # implicit EWC keeps the same EWCState as EWC: two arms cover both state types and dtypes.
  for method, dtype in [("wva", None), ("ewc", "bfloat16")]:
    dt = None if dtype is None else jnp.dtype(dtype)
    sgd = optax.sgd(0.1, momentum=0.9)
    tx = {"wva": lambda: optax.chain(sgd, wj.wva_scale(None, 10.0, importance_dtype=dt)),
          "ewc": lambda: optax.chain(wj.add_ewc(None, None, 10.0, importance_dtype=dt), sgd),
          "implicit_ewc": lambda: optax.chain(sgd, wj.implicit_ewc(None, None, 1.0, learning_rate=0.1,
                                                                     importance_dtype=dt)),
          }[method]()
    step = train.make_train_step(apply_fn, tx)
    batches = [(seqs, mask), (seqs[::-1], mask[::-1])]

    def steps(p, s, jstep):
      for b in batches:
        p, s, _ = jstep(p, s, *b)
      return p, s

    # one device
    p1 = jax.device_put(params, one)
    s1 = train.consolidated_state(tx, p1, jax.device_put(imp_single, one))
    p1, _ = steps(p1, s1, jax.jit(step))
    # sharded: init pinned to the params' layout, values swapped in, steps with explicit shardings
    ssh = wj.sharding.state_shardings(jax.eval_shape(tx.init, params), psh, mesh)
    s2 = jax.jit(tx.init, out_shardings=ssh)(sharded_params)
    naive = jax.jit(tx.init)(sharded_params)
    s2 = wj.set_importance(s2, imp_sharded)
    if method != "wva":
      s2 = wj.set_anchor(s2, sharded_params)
    after_set = s2
    jstep = jax.jit(step, in_shardings=(psh, ssh, batch_sh, batch_sh),
                    out_shardings=(psh, ssh, NamedSharding(mesh, P())))
    p2, s2 = steps(sharded_params, s2, jstep)

    def cons_specs(state):
      _, cons = split_state(state)
      out = []
      for c in cons:
        for field in c._fields:
          for lf, ps in zip(jax.tree_util.tree_leaves(getattr(c, field)), param_specs):
            out.append((field, str(lf.sharding.spec) if hasattr(lf.sharding, "spec") else "single",
                        str(ps)))
      return out

    opt, _ = split_state(s2)
    moment_leaves = [lf for lf in jax.tree_util.tree_leaves(opt) if lf.ndim > 0]
    moment_specs = [str(lf.sharding.spec) for lf in moment_leaves]
    res["train"][f"{method}-{dtype or 'float32'}"] = {
        "max_abs_param_diff": maxdiff(p1, p2),
        "param_specs_kept": [str(a) == str(b) for a, b in
                             zip(jax.tree_util.tree_leaves(wj.sharding.specs(p2)), param_specs)],
        "state_after_set": cons_specs(after_set),
        "state_after_steps": cons_specs(s2),
        "momentum_specs_match": [a == str(b) for a, b in zip(moment_specs, param_specs)],
        "naive_init_importance_unsharded": sum(
            1 for f_, s, ps in cons_specs(naive) if f_ == "importance" and "fsdp" in ps and "fsdp" not in s),
        "importance_dtype": str(jax.tree_util.tree_leaves(split_state(s2)[1][0].importance)[0].dtype),
    }
  return res


if __name__ == "__main__":
  print(json.dumps(check()))
