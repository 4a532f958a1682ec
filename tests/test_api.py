"""API 0.2: defaults, strength schedules and wj.consolidate, against hand-written updates and sequences."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import wva_jax as wj

IMP = {"a": jnp.array([0.0, 0.5, 2.0, 10.0]), "b": jnp.array([[1.0, 3.0]])}
IMP2 = {"a": jnp.array([1.0, 0.25, 0.0, 4.0]), "b": jnp.array([[0.5, 2.0]])}
PARAMS = {"a": jnp.array([0.3, -0.2, 0.1, 0.7]), "b": jnp.array([[0.5, -1.0]])}
GRADS = {"a": jnp.array([1.0, -2.0, 0.5, 3.0]), "b": jnp.array([[-1.0, 0.25]])}
ANCHOR = {"a": jnp.array([0.2, 0.2, 0.2, 0.2]), "b": jnp.array([[0.0, 0.0]])}
STATES = (wj.WVAState, wj.EWCState, wj.LoRAState)
np64 = lambda t: {k: np.asarray(v, np.float64) for k, v in t.items()}


def test_the_calls_of_issue_20_work_as_written():
  g, p, i = np64(GRADS), np64(PARAMS), np64(IMP)
  tx = optax.chain(wj.add_ewc(strength=1.0), optax.sgd(1.0))
  u, _ = tx.update(GRADS, tx.init(PARAMS), PARAMS)   # anchored at the initial params, zero importance
  for k in g:
    np.testing.assert_allclose(u[k], -g[k], rtol=1e-6)
  tx = optax.chain(optax.sgd(0.1), wj.implicit_ewc(strength=1.0, learning_rate=0.1))
  u, _ = tx.update(GRADS, tx.init(PARAMS), PARAMS)
  for k in g:
    np.testing.assert_allclose(u[k], -0.1 * g[k], rtol=1e-6)
  tx = wj.wva_scale(strength=3.0)
  state = wj.set_importance(tx.init(PARAMS), IMP)
  u, _ = tx.update(GRADS, state)
  for k in g:
    np.testing.assert_allclose(u[k], g[k] / (1 + 3.0 * i[k]), rtol=1e-6)
  tx = wj.wva_scale(IMP, 3.0)
  u, _ = tx.update(GRADS, tx.init(PARAMS))
  for k in g:
    np.testing.assert_allclose(u[k], g[k] / (1 + 3.0 * i[k]), rtol=1e-6)
  # the positional form the study uses, and strength's default 1.0
  tx = optax.chain(wj.wva_scale(IMP), optax.sgd(1.0))
  u, _ = tx.update(GRADS, tx.init(PARAMS))
  for k in g:
    np.testing.assert_allclose(u[k], -g[k] / (1 + i[k]), rtol=1e-6)
  assert float(wj.ewc_penalty(PARAMS, ANCHOR, IMP)) == pytest.approx(
      0.5 * sum(float(np.sum(i[k] * (p[k] - np64(ANCHOR)[k]) ** 2)) for k in i), rel=1e-6)
  assert wj.__version__ == "0.2.0"


# A schedule and its values written out by hand: strength 0, 1, 2, 3, 4, 4, ...
SCHED = optax.linear_schedule(0.0, 4.0, transition_steps=4)
LAMS = [0.0, 1.0, 2.0, 3.0, 4.0, 4.0]
LR = 0.1

ADAPTERS = {"q": {"A": jnp.array([[0.5], [-1.0]]), "B": jnp.array([[0.2, -0.4, 1.0]])}}
KERNEL_IMP = {"q": jnp.array([[1.0, 0.0, 2.0], [0.5, 3.0, 0.25]])}
AD_GRADS = {"q": {"A": jnp.array([[0.3], [-0.6]]), "B": jnp.array([[1.0, 0.5, -0.2]])}}


def _expected(kind, lam, p, g):
  """The update at strength ``lam`` by hand (float64)."""
  i, a = np64(IMP), np64(ANCHOR)
  if kind == "wva_scale":
    return {k: -LR * g[k] / (1 + lam * i[k]) for k in g}
  if kind == "add_ewc":
    return {k: -LR * (g[k] + lam * i[k] * (p[k] - a[k])) for k in g}
  if kind == "implicit_ewc":
    att = {k: 1 / (1 + LR * lam * i[k]) for k in g}
    return {k: att[k] * (-LR * g[k]) - (1 - att[k]) * (p[k] - a[k]) for k in g}
  A, B = p["A"], p["B"]
  F = np.asarray(KERNEL_IMP["q"], np.float64)
  if kind == "add_lora_ewc":
    P = F * (A @ B)
    return {"A": -LR * (g["A"] + lam * P @ B.T), "B": -LR * (g["B"] + lam * A.T @ P)}
  om_a, om_b = F @ (B * B).T, (A * A).T @ F   # lora_wva_scale: the pulled-back importance
  return {"A": -LR * g["A"] / (1 + lam * om_a), "B": -LR * g["B"] / (1 + lam * om_b)}


MAKERS = {
    "wva_scale": lambda s: optax.chain(optax.sgd(LR), wj.wva_scale(IMP, s)),
    "add_ewc": lambda s: optax.chain(wj.add_ewc(ANCHOR, IMP, s), optax.sgd(LR)),
    "implicit_ewc": lambda s: optax.chain(optax.sgd(LR), wj.implicit_ewc(ANCHOR, IMP, s, learning_rate=LR)),
    "add_lora_ewc": lambda s: optax.chain(wj.add_lora_ewc(KERNEL_IMP, s), optax.sgd(LR)),
    "lora_wva_scale": lambda s: optax.chain(optax.sgd(LR), wj.lora_wva_scale(KERNEL_IMP, s)),
}


@pytest.mark.parametrize("kind", list(MAKERS))
def test_strength_schedule_is_followed_jitted_without_retrace(kind):
  lora = kind.startswith(("add_lora", "lora"))
  params, grads = (ADAPTERS, AD_GRADS) if lora else (PARAMS, GRADS)
  tx = MAKERS[kind](SCHED)
  traces = []

  @jax.jit
  def step(params, state):
    traces.append(1)
    u, state = tx.update(grads, state, params)
    return optax.apply_updates(params, u), state

  state = tx.init(params)
  leaves = lambda t: [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(t)]   # keys sorted: a, b / A, B
  by_name = lambda t: dict(zip(("A", "B") if lora else ("a", "b"), leaves(t)))
  for k, lam in enumerate(LAMS):
    want = _expected(kind, lam, by_name(params), by_name(grads))
    new_params, state = step(params, state)
    got = leaves(jax.tree_util.tree_map(lambda n, o: n - o, new_params, params))
    for name, g in zip(sorted(want), got):
      np.testing.assert_allclose(g, want[name], rtol=2e-5, atol=1e-7, err_msg=f"{kind} step {k} ({name})")
    params = new_params
    if k == 2:   # a new task's importance keeps the count and the compiled step
      state = wj.set_importance(state, KERNEL_IMP if lora else IMP)
  assert len(traces) == 1
  counts = [s.count for s in jax.tree_util.tree_leaves(state, is_leaf=lambda s: isinstance(s, STATES))
            if isinstance(s, STATES)]
  assert [int(c) for c in counts] == [len(LAMS)]
  # a constant strength keeps no count (the state's structure as in 0.1, as optax keeps none for a constant
  # learning rate); implicit_ewc counts for its learning-rate schedule alone too
  const = MAKERS[kind](1.0).init(params)
  assert [s.count for s in jax.tree_util.tree_leaves(const, is_leaf=lambda s: isinstance(s, STATES))
          if isinstance(s, STATES)] == [None]


def test_a_constant_strength_gives_the_same_updates_as_before():
  """A float strength is the schedule-free path: updates bit-identical to a constant schedule's."""
  for kind, make in MAKERS.items():
    params, grads = (ADAPTERS, AD_GRADS) if kind.startswith(("add_lora", "lora")) else (PARAMS, GRADS)
    a, b = make(2.5), make(optax.constant_schedule(2.5))
    ua, _ = a.update(grads, a.init(params), params)
    ub, _ = b.update(grads, b.init(params), params)
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_array_equal(x, y), ua, ub)


def test_a_schedule_is_validated_as_a_callable_and_a_scalar_still_by_value():
  for make in (lambda s: wj.wva_scale(None, s), lambda s: wj.add_ewc(None, None, s),
               lambda s: wj.implicit_ewc(None, None, s, learning_rate=0.1),
               lambda s: wj.add_lora_ewc(None, s), lambda s: wj.lora_wva_scale(None, s)):
    make(SCHED)
    with pytest.raises(ValueError, match="strength must be finite and >= 0, got -1.0"):
      make(-1.0)


# ----------------------------------------------------------------- consolidate

def _train(tx, state, params, steps=3, scale=1.0):
  """A few jitted steps on a fixed gradient field (so Adam's moments, SI's path are non-trivial)."""
  @jax.jit
  def step(params, state):
    g = jax.tree_util.tree_map(lambda p, g: scale * g + 0.5 * p, params, GRADS)
    if isinstance(state, wj.importance.PathIntegralState):
      u, state = tx.update(g, state, params, task_grads=g)
    else:
      u, state = tx.update(g, state, params)
    return optax.apply_updates(params, u), state

  for _ in range(steps):
    params, state = step(params, state)
  return params, state, step


def _assert_same_state(a, b):
  la, ta = jax.tree_util.tree_flatten(a)
  lb, tb = jax.tree_util.tree_flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    assert jnp.result_type(x) == jnp.result_type(y)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


SETUPS = {
    "sgd_wva": (lambda: wj.wva_sgd(0.1, None, 2.0), False, False),
    "adam_ewc": (lambda: optax.chain(wj.add_ewc(strength=2.0), optax.adam(0.05)), True, False),
    "implicit_ewc": (lambda: optax.chain(optax.sgd(0.1), wj.implicit_ewc(strength=2.0, learning_rate=0.1)),
                     True, False),
    "si_wva": (lambda: wj.importance.path_integral(wj.wva_sgd(0.1, None, 2.0)), False, True),
    "si_ewc_adam_wva": (lambda: wj.importance.path_integral(optax.chain(
        wj.add_ewc(strength=1.0), optax.adam(0.05), wj.wva_scale(strength=SCHED))), True, True),
}


@pytest.mark.parametrize("combine,decay", [("sum", None), ("sum", 0.5), ("replace", None)])
@pytest.mark.parametrize("name", list(SETUPS))
def test_consolidate_equals_the_handwritten_sequence(name, combine, decay):
  make, has_anchor, has_path = SETUPS[name]
  tx = make()
  params, state, step = _train(tx, tx.init(PARAMS), PARAMS)
  ours, theirs, total = state, state, None
  for new in (IMP, IMP2):
    if has_path:
      new = wj.importance.si(ours, params)
    # the sequence consolidate replaces
    if combine == "replace":
      total = new
    elif decay is None:
      total = wj.importance.accumulate(total, new)
    else:
      total = wj.importance.decay(total, new, decay)
    theirs = wj.set_importance(theirs, total)
    if has_anchor:
      theirs = wj.set_anchor(theirs, params)
    if has_path:
      theirs = wj.importance.restart_path(theirs, params)
    ours = wj.consolidate(ours, params, new, combine=combine, decay=decay)
    _assert_same_state(ours, theirs)
    params_o, ours = step(params, ours)
    params_t, theirs = step(params, theirs)
    _assert_same_state(params_o, params_t)
    params = params_o
  assert step._cache_size() == 1   # consolidate kept the state's structure and dtypes
  # independent of the library: the importance in the state, by hand
  (wva_or_ewc,) = [s for s in jax.tree_util.tree_leaves(ours, is_leaf=lambda s: isinstance(s, wj.EWCState))
                   if isinstance(s, wj.EWCState)] or [_find(ours, wj.WVAState)]
  if not has_path:
    want = {"replace": np64(IMP2), "sum": {k: (1.0 if decay is None else decay) * np64(IMP)[k] + np64(IMP2)[k]
                                           for k in IMP}}[combine]
    for k in IMP:
      np.testing.assert_allclose(np.asarray(wva_or_ewc.importance[k]), want[k], rtol=1e-6)


def _find(state, t):
  return next(s for s in jax.tree_util.tree_leaves(state, is_leaf=lambda s: isinstance(s, t)) if isinstance(s, t))


def test_consolidate_sets_the_anchor_restarts_the_path_and_keeps_the_count():
  tx = wj.importance.path_integral(optax.chain(wj.add_ewc(strength=SCHED), optax.sgd(0.1)))
  params, state, _ = _train(tx, tx.init(PARAMS), PARAMS)
  state = wj.consolidate(state, params, IMP)
  ewc, path = _find(state, wj.EWCState), _find(state, wj.importance.PathIntegralState)
  for k in IMP:
    np.testing.assert_array_equal(ewc.anchor[k], params[k])
    np.testing.assert_array_equal(path.start[k], params[k])
    np.testing.assert_array_equal(path.omega[k], np.zeros(np.shape(IMP[k])))
    assert ewc.anchor[k] is not params[k] and path.start[k] is not params[k]   # copies (donation)
  assert int(ewc.count) == 3   # the schedule's count is not reset


def test_consolidate_bfloat16_state_sums_in_float32_and_keeps_the_dtype():
  tx = wj.wva_sgd(0.1, None, 1.0, importance_dtype=jnp.bfloat16)
  state = wj.consolidate(wj.consolidate(tx.init(PARAMS), PARAMS, IMP), PARAMS, IMP2)
  imp = _find(state, wj.WVAState).importance
  for k in IMP:
    assert imp[k].dtype == jnp.bfloat16
    want = (np.asarray(IMP[k], np.float32).astype(jnp.bfloat16).astype(np.float32) + np.asarray(IMP2[k]))
    np.testing.assert_array_equal(np.asarray(imp[k], np.float32), want.astype(jnp.bfloat16).astype(np.float32))


def test_consolidate_lora_state():
  tx = optax.chain(wj.add_lora_ewc(strength=1.0), optax.adam(0.01), wj.lora_wva_scale(strength=1.0))
  state = wj.consolidate(wj.consolidate(tx.init(ADAPTERS), ADAPTERS, KERNEL_IMP), ADAPTERS, KERNEL_IMP, decay=0.5)
  lora = [s for s in jax.tree_util.tree_leaves(state, is_leaf=lambda s: isinstance(s, wj.LoRAState))
          if isinstance(s, wj.LoRAState)]
  assert len(lora) == 2
  for s in lora:
    np.testing.assert_allclose(s.importance["q"], 1.5 * np.asarray(KERNEL_IMP["q"]), rtol=1e-6)


def test_consolidate_errors_name_the_bad_value():
  state = wj.wva_sgd(0.1).init(PARAMS)
  with pytest.raises(ValueError, match="combine must be one of .*got 'mean'"):
    wj.consolidate(state, PARAMS, IMP, combine="mean")
  with pytest.raises(ValueError, match="decay applies to combine='sum' only"):
    wj.consolidate(state, PARAMS, IMP, combine="replace", decay=0.5)
  with pytest.raises(ValueError, match="decay must be in \\[0, 1\\], got 1.5"):
    wj.consolidate(state, PARAMS, IMP, decay=1.5)
  with pytest.raises(ValueError, match="decay must be finite and >= 0, got -0.5"):
    wj.consolidate(state, PARAMS, IMP, decay=-0.5)
  with pytest.raises(ValueError, match="nothing to consolidate"):
    wj.consolidate(optax.adam(0.1).init(PARAMS), PARAMS, IMP)
  with pytest.raises(ValueError, match="nothing to consolidate"):
    wj.consolidate(wj.importance.path_integral(optax.sgd(0.1)).init(PARAMS), PARAMS, IMP)
  with pytest.raises(ValueError, match=r"importance\['a'\] has negative entries"):
    wj.consolidate(state, PARAMS, {**IMP, "a": -IMP["a"]})
  with pytest.raises(ValueError, match=r"importance\['b'\] has shape \(2,\)"):
    wj.consolidate(state, PARAMS, {**IMP, "b": jnp.ones(2)})
  ewc = optax.chain(wj.add_ewc(), optax.sgd(0.1)).init(PARAMS)
  with pytest.raises(ValueError, match=r"params\['a'\] contains NaN"):
    wj.consolidate(ewc, {**PARAMS, "a": PARAMS["a"] * jnp.nan}, IMP)


@pytest.mark.slow   # nnx.Optimizer eagerly: ~6 s
def test_consolidate_nnx_optimizer_in_place_equals_the_handwritten_sequence():
  from flax import nnx

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.l1, self.l2 = nnx.Linear(3, 4, rngs=rngs), nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
      return self.l2(jax.nn.relu(self.l1(x)))

  x, y = jax.random.normal(jax.random.key(0), (8, 3)), jnp.arange(8) % 2
  loss = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
  make_tx = lambda: optax.chain(wj.add_ewc(strength=1.0), optax.adam(0.05), wj.wva_scale(strength=SCHED))
  opts = []
  for _ in range(2):
    model = Net(nnx.Rngs(0))
    opt = nnx.Optimizer(model, make_tx(), wrt=nnx.Param)
    opt.update(model, nnx.grad(loss)(model))
    opts.append((model, opt))
  (m_ours, ours), (m_theirs, theirs) = opts
  params = nnx.state(m_ours, nnx.Param)
  imp = jax.tree_util.tree_map(lambda p: jnp.abs(p) + 0.5, params)
  total = None
  for _ in range(2):
    assert wj.consolidate(ours, params, imp) is ours
    total = wj.importance.accumulate(total, imp)
    wj.set_anchor(wj.set_importance(theirs, total), nnx.state(m_theirs, nnx.Param))
    _assert_same_state(nnx.as_pure(ours.opt_state), nnx.as_pure(theirs.opt_state))
  ewc = _find(nnx.as_pure(ours.opt_state), wj.EWCState)
  for got, i in zip(jax.tree_util.tree_leaves(ewc.importance), jax.tree_util.tree_leaves(nnx.as_pure(imp))):
    np.testing.assert_allclose(got, 2 * np.asarray(i), rtol=1e-6)   # summed twice, by hand
  for got, p in zip(jax.tree_util.tree_leaves(ewc.anchor), jax.tree_util.tree_leaves(nnx.as_pure(params))):
    np.testing.assert_array_equal(got, p)
  ours.update(m_ours, nnx.grad(loss)(m_ours))   # still steps
  assert int(_find(nnx.as_pure(ours.opt_state), wj.WVAState).count) == 2   # a schedule's count, kept


def test_fisher_merge_eps_is_relative_and_zero_coordinates_average():
  """issue 27 item 12: an absolute eps=1e-8 merged two Fishers of scale 1e-9 to [0.367, 0.633]."""
  a, b = {"w": jnp.array([0.0, 0.0, 0.0])}, {"w": jnp.array([1.0, 1.0, 1.0])}
  for scale in (1.0, 1e-9, 1e9):
    fa, fb = {"w": scale * jnp.array([9.0, 1.0, 0.0])}, {"w": scale * jnp.array([1.0, 9.0, 0.0])}
    got = wj.fisher_merge([a, b], [fa, fb])["w"]
    np.testing.assert_allclose(np.asarray(got[:2]), [0.1, 0.9], rtol=1e-6)   # (9*0 + 1*1) / 10, ...
    np.testing.assert_allclose(float(got[2]), 0.5, rtol=1e-6)                # no importance: the average
    got0 = wj.fisher_merge([a, b], [fa, fb], eps=0.0)["w"]
    assert not bool(jnp.isnan(got0).any())
    np.testing.assert_allclose(np.asarray(got0), [0.1, 0.9, 0.5], rtol=1e-6)
