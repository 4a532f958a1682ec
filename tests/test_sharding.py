"""wj.sharding.state_shardings: params-shaped state subtrees, and nothing else, get the params' shardings."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import wva_jax as wj

MESH = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("fsdp",))


@pytest.mark.parametrize("with_params", [False, True])
def test_bare_array_params_do_not_shard_adams_count(with_params):
  # A bare array has the tree structure of every leaf: structure alone would
  # give Adam's scalar count the (4, 6) matrix's sharding, and jit would fail.
  params = jnp.zeros((4, 6))
  tx = wj.wva_adam(1e-3, None, 1.0)
  ps = wj.sharding.fsdp_shardings(params, MESH)
  assert ps.spec == jax.sharding.PartitionSpec(None, "fsdp")
  shapes = jax.eval_shape(tx.init, params)
  ss = wj.sharding.state_shardings(shapes, ps, MESH, **({"params": params} if with_params else {}))
  state = jax.jit(tx.init, out_shardings=ss)(jax.device_put(params, ps))
  assert state[0][0].count.sharding.spec == jax.sharding.PartitionSpec()
  for tree in (state[0][0].mu, state[0][0].nu, state[1].importance):
    assert tree.sharding.spec == ps.spec
  # and a jitted step keeps the layout
  step = jax.jit(tx.update, out_shardings=(ps, ss))
  _, new_state = step(jnp.ones((4, 6)), state, params)
  assert new_state[1].importance.sharding.spec == ps.spec


def test_a_subtree_with_the_params_structure_but_other_shapes_is_replicated():
  params = {"w": jnp.zeros((4, 6))}
  ps = wj.sharding.fsdp_shardings(params, MESH)
  state = ({"w": jnp.zeros((4, 6))}, {"w": jnp.zeros(())}, {"w": jnp.zeros((4, 5))})
  got = wj.sharding.state_shardings(state, ps, MESH)
  assert got[0]["w"].spec == ps["w"].spec
  assert got[1]["w"].spec == jax.sharding.PartitionSpec()  # a scalar cannot take a matrix's sharding
  # (4, 5) could take P(None, 'fsdp') on a 1-device mesh; given the params, only their shape matches
  exact = wj.sharding.state_shardings(state, ps, MESH, params=jax.eval_shape(lambda: params))
  assert exact[0]["w"].spec == ps["w"].spec
  assert exact[2]["w"].spec == jax.sharding.PartitionSpec()


def test_ewc_state_with_a_schedule_count_is_replicated():
  params = {"w": jnp.zeros((4, 6)), "b": jnp.zeros(6)}
  sched = optax.linear_schedule(0.1, 0.0, 10)
  tx = optax.chain(optax.sgd(sched), wj.implicit_ewc(None, None, 1.0, learning_rate=sched))
  ps = wj.sharding.fsdp_shardings(params, MESH)
  ss = wj.sharding.state_shardings(jax.eval_shape(tx.init, params), ps, MESH)
  state = jax.jit(tx.init, out_shardings=ss)(jax.device_put(params, ps))
  assert state[1].count.sharding.spec == jax.sharding.PartitionSpec()
  assert state[1].anchor["w"].sharding.spec == ps["w"].spec
