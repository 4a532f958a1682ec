"""One JAX process of a data-parallel + FSDP run: importance and WVA/EWC steps on a global mesh.

``python tests/multihost_worker.py --num-processes 2 --process-id I --port P --out F``
joins a 2-process JAX runtime (coordinator on 127.0.0.1:P, CPU collectives
over gloo) whose global mesh has one device per process. With
``--num-processes 1`` it runs the same code alone, without
``jax.distributed``: the single-process reference. Nothing but the launch
differs (the same holds on a GPU cluster or a TPU pod slice, where
``jax.distributed.initialize()`` finds the coordinator itself).

Every process builds the same parameters and data (NumPy, seeded), keeps
only its slice of each batch and makes global arrays with
``jax.make_array_from_process_local_data``; parameters are FSDP-sharded
(``wj.sharding.fsdp_shardings``). It computes Fisher and MAS importance
data-parallel, then trains three arms (WVA + Adam, EWC + Adam, EWC + Adam +
WVA) for a few steps jitted with explicit shardings and donated params and
state. Process 0 writes one JSON to ``--out``: the results gathered to the
host, each params-shaped state tree's ``PartitionSpec``s next to the
params', the local shard shapes, and timings. ``tests/test_multihost.py``
starts the processes and compares.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

SIZES = {"w1": (8, 32), "b1": (32,), "w2": (32, 32), "b2": (32,), "w3": (32, 4), "b3": (4,)}
BATCH, STEPS = 64, 3


def host_data():
  """Parameters, an importance batch and STEPS training batches (NumPy, the same in every process)."""
  rng = np.random.default_rng(0)
  params = {k: (rng.normal(size=s) * (0.5 if k[0] == "w" else 0.1)).astype(np.float32)
            for k, s in SIZES.items()}
  w_true = rng.normal(size=(8, 4))
  def batch():
    x = rng.normal(size=(BATCH, 8)).astype(np.float32)
    return x, np.argmax(x @ w_true + 0.5 * rng.normal(size=(BATCH, 4)), -1).astype(np.int32)
  return params, batch(), [batch() for _ in range(STEPS)]


def apply_fn(p, x):
  import jax.numpy as jnp
  h = jnp.tanh(x @ p["w1"] + p["b1"])
  h = jnp.tanh(h @ p["w2"] + p["b2"])
  return h @ p["w3"] + p["b3"]


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--num-processes", type=int, default=1)
  ap.add_argument("--process-id", type=int, default=0)
  ap.add_argument("--port", type=int, default=0)
  ap.add_argument("--out", required=True)
  ap.add_argument("--init-timeout", type=int, default=60)
  args = ap.parse_args(argv)
  t0 = time.perf_counter()

  import jax
  if args.num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{args.port}",
                               num_processes=args.num_processes, process_id=args.process_id,
                               initialization_timeout=args.init_timeout,
                               heartbeat_timeout_seconds=30, shutdown_timeout_seconds=30)
  import optax
  from jax.experimental import multihost_utils
  from jax.sharding import Mesh, NamedSharding
  from jax.sharding import PartitionSpec as P

  import wva_jax as wj

  n, pid = jax.process_count(), jax.process_index()
  assert n == args.num_processes and pid == args.process_id, (n, pid)
  mesh = Mesh(np.array(jax.devices()), ("fsdp",))          # every process's devices
  host_params, (x_imp, y_imp), batches = host_data()
  psh = wj.sharding.fsdp_shardings(host_params, mesh)      # params split over the processes
  data = NamedSharding(mesh, P("fsdp"))                     # batch split over the processes
  replicated = NamedSharding(mesh, P())
  local = lambda a: a[pid * len(a) // n:(pid + 1) * len(a) // n]   # this process's slice of a batch

  def global_params():
    return {k: jax.make_array_from_callback(v.shape, psh[k], lambda idx, v=v: v[idx])
            for k, v in host_params.items()}

  def global_batch(x, y):
    return (jax.make_array_from_process_local_data(data, local(x)),
            jax.make_array_from_process_local_data(data, local(y)))

  to_host = lambda tree: jax.tree_util.tree_map(
      lambda a: np.asarray(a, np.float32).tolist(), multihost_utils.process_allgather(tree, tiled=True))
  spec = lambda a: str(a.sharding.spec)
  param_specs = {k: str(s.spec) for k, s in psh.items()}
  out = {"processes": n, "devices": len(jax.devices()), "local_devices": len(jax.local_devices()),
         "param_specs": param_specs,
         "local_param_shapes": {k: list(s.shard_shape(SIZES[k])) for k, s in psh.items()}}
  t_setup = time.perf_counter()

  # 1. importance, data-parallel: each process reduces its half, XLA adds the halves
  params = global_params()
  gx, gy = global_batch(x_imp, y_imp)
  assert gx.shape == (BATCH, 8) and not (n > 1 and gx.is_fully_addressable)
  fisher = jax.jit(lambda p, x, y: wj.importance.fisher(apply_fn, p, x, y, chunk_size=8),
                   out_shardings=psh)(params, gx, gy)
  mas = jax.jit(lambda p, x: wj.importance.mas(apply_fn, p, x, chunk_size=8),
                out_shardings=psh)(params, gx)
  imp = jax.jit(wj.importance.normalize, out_shardings=psh)(fisher)
  out["importance"] = {"fisher": to_host(fisher), "mas": to_host(mas)}
  out["importance_specs"] = {name: {k: spec(v) for k, v in t.items()}
                             for name, t in (("fisher", fisher), ("mas", mas), ("normalized", imp))}
  t_imp = time.perf_counter()

  # 2. a few training steps per arm: params and state sharded alike, both donated
  def loss_fn(p, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(apply_fn(p, x), y).mean()

  arms = {
      "wva_adam": (lambda: wj.wva_adam(1e-2, None, 10.0), False),
      "ewc_adam": (lambda: optax.chain(wj.add_ewc(None, None, 10.0), optax.adam(1e-2)), True),
      "ewc_adam_wva": (lambda: optax.chain(wj.add_ewc(None, None, 10.0), optax.adam(1e-2),
                                           wj.wva_scale(None, 10.0)), True),
  }
  out["train"] = {}
  for arm, (make, anchored) in arms.items():
    tx = make()
    params = global_params()
    ssh = wj.sharding.state_shardings(jax.eval_shape(tx.init, params), psh, mesh)
    state = jax.jit(tx.init, out_shardings=ssh)(params)
    state = wj.set_importance(state, imp)
    if anchored:
      state = wj.set_anchor(state, params)

    def step(p, s, x, y):
      loss, g = jax.value_and_grad(loss_fn)(p, x, y)
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s, loss

    jstep = jax.jit(step, in_shardings=(psh, ssh, data, data), out_shardings=(psh, ssh, replicated),
                    donate_argnums=(0, 1))
    losses = []
    for x, y in batches:
      params, state, loss = jstep(params, state, *global_batch(x, y))
      losses.append(float(loss))
    # every params-shaped tree in the state (Adam's moments, importance, anchor), leaf by leaf
    pdef = jax.tree_util.tree_structure(params)
    is_params = lambda t: jax.tree_util.tree_structure(t) == pdef and all(
        getattr(a, "shape", None) == SIZES[k] for k, a in t.items())
    trees = [t for t in jax.tree_util.tree_leaves(state, is_leaf=is_params) if is_params(t)]
    in_trees = sum(len(t) for t in trees)
    out["train"][arm] = {
        "params": to_host(params), "losses": losses,
        "state_trees": [{k: spec(v) for k, v in t.items()} for t in trees],
        "state_local_shapes": [{k: list(v.addressable_shards[0].data.shape) for k, v in t.items()}
                               for t in trees],
        "nonscalar_state_leaves": sum(np.ndim(a) > 0 for a in jax.tree_util.tree_leaves(state)),
        "leaves_in_params_shaped_trees": in_trees,
        "param_specs_after": {k: spec(v) for k, v in params.items()},
    }
  t_train = time.perf_counter()
  out["seconds"] = {"setup": t_setup - t0, "importance": t_imp - t_setup, "train": t_train - t_imp,
                    "total": t_train - t0}
  if pid == 0:
    with open(args.out, "w") as f:
      json.dump(out, f)
  multihost_utils.sync_global_devices("done")   # nobody leaves while another still needs it


if __name__ == "__main__":
  main()
