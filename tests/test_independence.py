"""Batch independence is decided by what the model computes, not by primitive names.

Models that move or combine values across examples (roll, reverse, a gather
along the batch axis, BatchNorm's batch statistics, capacity-limited routing
where tokens compete) are refused with a message that says so, eagerly and
under ``jax.jit``; a mixture of experts that sorts the whole batch's tokens
by expert, runs ``jax.lax.ragged_dot`` and restores their order (outputs[b]
from inputs[b] only) is accepted, and its Fisher equals a per-example
``jax.grad`` loop.
"""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import wva_jax as wj

B, T, D, E, H, C = 6, 4, 5, 3, 7, 4
rng = np.random.default_rng(0)
X = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
Y = jnp.asarray(rng.integers(0, C, (B, T)))
TOKENS = jnp.asarray(rng.integers(0, 11, (B, T)))
P = {"router": jnp.asarray(rng.normal(size=(D, E)), jnp.float32),
     "experts": jnp.asarray(rng.normal(size=(E, D, H)) / 3, jnp.float32),
     "head": jnp.asarray(rng.normal(size=(H, C)), jnp.float32),
     "embed": jnp.asarray(rng.normal(size=(11, D)), jnp.float32)}


def moe_sorted(p, x):
  """MaxText-style dropless MoE: sort the batch's tokens by expert, ragged_dot, unsort."""
  b, t, d = x.shape
  tokens = x.reshape(b * t, d)
  logits = tokens @ p["router"]
  expert = jnp.argmax(logits, -1)
  gate = jnp.take_along_axis(jax.nn.softmax(logits), expert[:, None], -1)
  order = jnp.argsort(expert)
  sizes = jnp.bincount(expert, length=E).astype(jnp.int32)
  h = jax.lax.ragged_dot(tokens[order], p["experts"], sizes)
  h = jnp.tanh(h)[jnp.argsort(order)] * gate
  return (h @ p["head"]).reshape(b, t, C)


def moe_capacity(p, x, capacity=2):
  """Capacity-limited one-hot dispatch: a token past its expert's capacity is dropped,
  so which tokens survive depends on the other examples' tokens."""
  b, t, d = x.shape
  tokens = x.reshape(b * t, d)
  expert = jnp.argmax(tokens @ p["router"], -1)
  onehot = jax.nn.one_hot(expert, E)
  slot = (jnp.cumsum(onehot, 0) - 1) * onehot   # position in the expert's queue, batch-wide
  keep = (slot < capacity) * onehot
  h = jnp.einsum("ne,edh,nd->nh", keep, p["experts"], tokens)
  return (jnp.tanh(h) @ p["head"]).reshape(b, t, C)


def dense(p, x):
  return jnp.tanh(jnp.einsum("btd,dh->bth", x, p["experts"][0])) @ p["head"]


MIXING = {
    "roll": lambda p, x: jnp.roll(dense(p, x), 1, 0),
    "reverse": lambda p, x: dense(p, x)[::-1],
    "gather along the batch": lambda p, x: dense(p, x)[jnp.clip(jnp.arange(x.shape[0]) + 1, 0, x.shape[0] - 1)],
    "batch statistics": lambda p, x: (lambda h: (h - h.mean(0)) / (h.std(0) + 1e-3))(dense(p, x)),
    "capacity-limited routing": moe_capacity,
}


def fisher(model, x=X, jit=False):
  f = lambda p: wj.importance.fisher(model, p, x, Y)
  return jax.block_until_ready((jax.jit(f) if jit else f)(P))


FAST = ("roll",)


@pytest.mark.parametrize("name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in sorted(MIXING)])
def test_mixing_models_are_refused_eagerly_naming_it(name):
  with pytest.raises(ValueError, match="apply_fn mixes examples: the outputs of other examples changed"):
    fisher(MIXING[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["roll", "batch statistics"])
def test_mixing_models_are_refused_under_jit(name):
  # under jit the probe runs with the computation; the refusal surfaces from the run
  with pytest.raises(Exception, match="apply_fn mixes examples"):
    fisher(MIXING[name], jit=True)


@pytest.mark.slow  # two refusals with a symbolic trace each
def test_the_message_names_the_operation():
  with pytest.raises(ValueError, match="primitive 'rev'"):
    fisher(MIXING["reverse"])
  with pytest.raises(ValueError, match="primitive 'reduce_sum'"):
    fisher(MIXING["batch statistics"])


@pytest.mark.slow
def test_integer_inputs_are_probed_too():
  embed = lambda p, t: dense(p, p["embed"][t])
  fisher(embed, TOKENS)
  with pytest.raises(ValueError, match="mixes examples"):
    fisher(lambda p, t: jnp.roll(embed(p, t), 1, 0), TOKENS)


def per_example_loop(model, p, x, y):
  g = jax.jit(jax.grad(lambda p, xb, yb: jnp.sum(
      jnp.take_along_axis(jax.nn.log_softmax(model(p, xb)), yb[..., None], -1))))
  acc = jax.tree.map(lambda a: np.zeros(a.shape), p)
  for b in range(x.shape[0]):
    acc = jax.tree.map(lambda a, v: a + np.asarray(v, np.float64) ** 2, acc, g(p, x[b:b + 1], y[b:b + 1]))
  return jax.tree.map(lambda a: a / x.shape[0], acc)


@pytest.mark.slow  # a per-example jax.grad loop reference
@pytest.mark.parametrize("jit", [False, True])
def test_sorted_ragged_dot_moe_is_accepted_and_right(jit):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", wj.importance.FallbackWarning)   # ragged_dot: per-leaf vjp
    got = fisher(moe_sorted, jit=jit)
  want = per_example_loop(moe_sorted, P, X, Y)
  for k in ("router", "experts", "head"):
    np.testing.assert_allclose(np.asarray(got[k], np.float64), want[k], rtol=1e-4,
                               atol=1e-6 * np.abs(want[k]).max(), err_msg=k)


@pytest.mark.slow
def test_mas_and_sig_probe_too():
  with pytest.raises(ValueError, match="mixes examples"):
    wj.importance.mas(MIXING["roll"], P, X)
  with pytest.raises(ValueError, match="mixes examples"):
    wj.importance.sig(MIXING["roll"], P, X)


def test_a_jitted_step_runs_the_probe_on_its_first_call_only(monkeypatch):
  # A training step jitted before any call has the probe compiled in: it must not run on
  # every step (it cost more than the step itself), only until it has passed once.
  from wva_jax.importance import _independence
  runs = []
  probe = _independence._moved

  def counted(apply_fn, params, x):
    moved = probe(apply_fn, params, x)
    jax.debug.callback(lambda m: runs.append(1), moved)
    return moved

  monkeypatch.setattr(_independence, "_moved", counted)
  model = lambda p, x: dense(p, x) * 1.0   # a fresh function: nothing cached for it
  step = jax.jit(lambda p, x, y: wj.importance.grad_and_fisher(model, p, x, y))
  first = jax.block_until_ready(step(P, X, Y))
  for _ in range(3):
    again = jax.block_until_ready(step(P, X, Y))
  assert len(runs) == 1
  np.testing.assert_array_equal(np.asarray(first[0]), np.asarray(again[0]))


def test_with_several_processes_a_traced_probe_leaves_the_cache_alone(monkeypatch):
  # Its callback runs in only some processes: a cache filled there makes the next trace
  # differ between processes, and their collectives hang (CI's two-process test did).
  from wva_jax.importance import _independence
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  model = lambda p, x: dense(p, x) * 1.0   # a fresh function: nothing cached for it
  jax.block_until_ready(jax.jit(lambda p: wj.importance.fisher(model, p, X, Y))(P))
  assert not _independence._PASSED.get(model)


@pytest.mark.slow
def test_a_jitted_mixing_model_is_refused_on_every_call():
  f = jax.jit(lambda p: wj.importance.fisher(MIXING["roll"], p, X, Y))
  for _ in range(2):   # a refusal never marks the model as passed
    with pytest.raises(Exception, match="apply_fn mixes examples"):
      jax.block_until_ready(f(P))


def _gated(p, x):
  """Batch-independent while the gate ``g`` is 0; mixes examples (a batch mean) once it moves."""
  h = x @ p["w"]
  return h + p["g"] * jnp.mean(h, axis=0, keepdims=True)


def _gate(value):
  return {"w": jnp.ones((3, 4)) * 0.1, "g": jnp.asarray(value, jnp.float32)}


@pytest.mark.slow   # ~9 s; the fast suite keeps test_a_training_step_probes_every_nth_call
def test_a_pass_holds_for_the_values_it_was_probed_on():
  # issue 27 item 2: the model passes at g=0; after "training" (g=1) it mixes and must be refused,
  # eagerly and in a jitted estimator, not served from the cache of the first pass.
  x, y = jnp.arange(24.0).reshape(8, 3) / 10, jnp.arange(8) % 4
  model = lambda p, x: _gated(p, x)   # a fresh function: nothing cached for it
  wj.importance.fisher(model, _gate(0.0), x, y)
  wj.importance.fisher(model, _gate(0.0), x, y)   # same values: cached
  with pytest.raises(ValueError, match="mixes examples"):
    wj.importance.fisher(model, _gate(1.0), x, y)
  jitted = jax.jit(lambda p: wj.importance.mas(model, p, x))
  jax.block_until_ready(jitted(_gate(0.0)))
  with pytest.raises(Exception, match="mixes examples"):
    jax.block_until_ready(jitted(_gate(1.0)))


def test_a_training_step_probes_every_nth_call():
  x, y = jnp.arange(24.0).reshape(8, 3) / 10, jnp.arange(8) % 4
  model = lambda p, x: _gated(p, x)
  step = jax.jit(lambda p: wj.importance.grad_and_fisher(model, p, x, y, probe=3))
  jax.block_until_ready(step(_gate(0.0)))   # call 1: probed, passes
  for _ in range(2):                        # calls 2, 3: between probes
    jax.block_until_ready(step(_gate(1.0)))
  with pytest.raises(Exception, match="mixes examples"):   # call 4: probed again
    jax.block_until_ready(step(_gate(1.0)))
  every = jax.jit(lambda p: wj.importance.grad_and_fisher(model, p, x, y, probe=True))
  with pytest.raises(Exception, match="mixes examples"):
    jax.block_until_ready(every(_gate(2.0)))
  never = jax.jit(lambda p: wj.importance.grad_and_fisher(model, p, x, y, probe=False))
  jax.block_until_ready(never(_gate(2.0)))   # the caller vouches
  with pytest.raises(ValueError, match="probe must be"):
    wj.importance.fisher(model, _gate(0.0), x, y, probe=0)
