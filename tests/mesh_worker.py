"""Estimators on a 4-device mesh, in its own process (tests/test_meshes.py runs it).

Run as ``XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/mesh_worker.py``:
for an Explicit mesh (``jax.make_mesh``'s default) and an Auto one, with
data-sharded batches and replicated or FSDP-sharded params, called eagerly
inside ``jax.set_mesh`` and under ``jit`` outside it, every estimator
must give the unsharded per-example loop's numbers (Fisher) or the unsharded
call's (MAS, SIG), and the importance must come back sharded like its
parameter. Prints one ``ok <case>`` line per case; any mismatch raises.
"""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import wva_jax as wj

rng = np.random.default_rng(0)
PARAMS = {"w": jnp.asarray(rng.normal(size=(8, 16)), jnp.float32), "b": jnp.zeros(16),
          "w2": jnp.asarray(rng.normal(size=(16, 5)), jnp.float32)}
X = jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)
Y = jnp.asarray(rng.integers(0, 5, 16))


def model(p, x):
  return jnp.tanh(x @ p["w"] + p["b"]) @ p["w2"]


def loop_fisher(p, x, y):
  """Unsharded per-example loop: (d log p(y_b | x_b) / d theta)^2, mean over examples."""
  out = jax.tree_util.tree_map(lambda a: np.zeros(a.shape), p)
  for b in range(x.shape[0]):
    g = jax.grad(lambda q: jax.nn.log_softmax(model(q, x[b:b + 1])[0])[int(y[b])])(p)
    out = jax.tree_util.tree_map(lambda s, gg: s + np.asarray(gg, np.float64) ** 2, out, g)
  return jax.tree_util.tree_map(lambda s: s / x.shape[0], out)


REF: dict = {}   # filled by main(): the unsharded references
CALLS = {
    "fisher": lambda p, x, y: wj.importance.fisher(model, p, x, y),
    "fisher_vmap": lambda p, x, y: wj.importance.fisher(model, p, x, y, engine="vmap"),
    "mas": lambda p, x, y: wj.importance.mas(model, p, x),
    "sig": lambda p, x, y: wj.importance.sig(model, p, x),
    "grad_and_fisher": lambda p, x, y: wj.importance.grad_and_fisher(model, p, x, y)[2],
}


def check(name, got, params):
  want = REF["fisher" if name.startswith(("fisher", "grad")) else name]
  for k in PARAMS:
    np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=2e-5, atol=1e-7, err_msg=f"{name} {k}")
    have, like = jax.typeof(got[k]).sharding.spec, jax.typeof(params[k]).sharding.spec
    if any(s is not None for s in like):   # an FSDP-sharded kernel's importance is sharded like it
      assert tuple(have) == tuple(like), (name, k, have, like)


def main():
  assert jax.device_count() == 4, jax.devices()   # here, not at import: pytest's doctest collection imports it
  REF.update(fisher=loop_fisher(PARAMS, X, Y), mas=wj.importance.mas(model, PARAMS, X),
             sig=wj.importance.sig(model, PARAMS, X))
  # inside set_mesh eagerly, and outside it under jit (the arrays' own mesh): the two ways in
  for axis_type, fsdp, (in_context, jit) in itertools.product((AxisType.Explicit, AxisType.Auto), (False, True),
                                                             ((True, False), (False, True))):
    mesh = jax.make_mesh((2, 2), ("data", "fsdp"), axis_types=(axis_type,) * 2)
    put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
    params = {"w": put(PARAMS["w"], P(None, "fsdp") if fsdp else P()), "b": put(PARAMS["b"], P()),
              "w2": put(PARAMS["w2"], P("fsdp", None) if fsdp else P())}
    x, y = put(X, P("data")), put(Y, P("data"))
    for name, call in CALLS.items():
      f = jax.jit(call) if jit else call
      if in_context:
        with jax.set_mesh(mesh):
          got = f(params, x, y)
      else:
        got = f(params, x, y)
      check(name, got, params)
      print(f"ok {axis_type.name} fsdp={fsdp} set_mesh={in_context} jit={jit} {name}", flush=True)
  with jax.set_mesh(jax.make_mesh((4,), ("data",))):
    report = wj.importance.engine_report(model, PARAMS, jax.device_put(X, P("data")))
    assert report == {"b": "bias", "w": "dense", "w2": "dense"}, report
    print("ok Explicit engine_report", flush=True)


if __name__ == "__main__":
  main()
