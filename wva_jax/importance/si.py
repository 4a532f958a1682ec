"""Synaptic intelligence (SI): the path integral of -g * delta during training."""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from wva_jax._checks import check_positive
from wva_jax._copy import fresh_tree
from wva_jax._fit import fit_like


class PathIntegralState(NamedTuple):
  """State of :func:`path_integral`.

  Attributes:
    inner_state: the wrapped optimizer's state.
    omega: float32 running sum of ``-g * delta`` since the path started.
    start: the parameters when the path started (the task's start point).
  """
  inner_state: Any
  omega: Any
  start: Any


def path_integral(inner: optax.GradientTransformation
                  ) -> optax.GradientTransformationExtraArgs:
  r"""Wraps an optimizer and accumulates SI's path integral of the task loss.

  Every step adds :math:`\omega \mathrel{+}= -g \odot \Delta\theta`, with
  ``Delta theta`` the update the wrapped optimizer returns (the increment
  ``optax.apply_updates`` adds) and ``g`` the gradient of the *task* loss.
  Pass that gradient as ``task_grads=`` when the updates fed in contain more
  than the task loss (an EWC penalty, weight decay), so the penalty does not
  leak into the integral; without it the incoming updates are used.

  Call :func:`restart_path` at the start of each task and :func:`si` at its
  end.

  Args:
    inner: any optax transformation (the whole optimizer chain, so that the
      increments are the ones actually applied).

  Returns:
    A ``GradientTransformationExtraArgs`` whose ``update`` takes ``params``
    (required) and optionally ``task_grads``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, wva_jax as wj
    >>> params = {'w': jnp.array([1.0, -2.0])}
    >>> loss = lambda p: jnp.sum(p['w'] ** 2)
    >>> opt = wj.importance.path_integral(optax.sgd(0.1))
    >>> state = opt.init(params)
    >>> for _ in range(20):
    ...   g = jax.grad(loss)(params)
    ...   u, state = opt.update(g, state, params, task_grads=g)
    ...   params = optax.apply_updates(params, u)
    >>> imp = wj.importance.si(state, params)
    >>> bool(imp['w'][1] > imp['w'][0])
    True

  References:
    Zenke, Poole, Ganguli, "Continual Learning Through Synaptic
    Intelligence", ICML 2017.
  """
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    return PathIntegralState(
        inner_state=inner.init(params),
        omega=jax.tree_util.tree_map(lambda p: jnp.zeros_like(p, dtype=jnp.float32), params),
        start=fresh_tree(params))   # a copy: the params may be donated (wva_jax/_copy.py)

  def update_fn(updates, state, params=None, *, task_grads=None, **extra_args):
    if params is None:
      raise ValueError("path_integral needs params in update(...) to track the path")
    new_updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
    g = updates if task_grads is None else task_grads
    omega = jax.tree_util.tree_map(
        lambda o, gi, d: o - gi.astype(jnp.float32) * d.astype(jnp.float32),
        state.omega, g, new_updates)
    return new_updates, PathIntegralState(inner_state, omega, state.start)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _find_path_states(opt_state):
  is_pi = lambda x: isinstance(x, PathIntegralState)
  return [s for s in jax.tree_util.tree_leaves(opt_state, is_leaf=is_pi) if is_pi(s)]


def si(opt_state: optax.OptState, params: optax.Params, *, damping: float = 0.1) -> optax.Params:
  r"""SI importance of the path since the last restart.

  .. math::
     \Omega_i = \frac{\max(\omega_i, 0)}{(\theta_i - \theta_i^{\rm start})^2 + \xi}

  Negative path integrals (the loss rose along that coordinate, through noise
  or interference) are clipped to 0 so the result is a valid importance.

  Args:
    opt_state: a state containing exactly one :class:`PathIntegralState`
      (possibly nested in ``optax.chain`` or other states).
    params: the parameters at the end of the task.
    damping: ``xi`` > 0, keeps the ratio bounded where a weight barely moved
      (0 would divide 0 by 0, NaN, for a weight that never moved, so it is
      rejected with a ``ValueError``).

  Returns:
    A float32 pytree shaped like ``params``.

  Example:
    >>> import jax.numpy as jnp, optax, wva_jax as wj
    >>> params = {'w': jnp.array([1.0, 1.0])}
    >>> opt = wj.importance.path_integral(optax.sgd(1.0))
    >>> g = {'w': jnp.array([0.5, -0.5])}   # the loss falls along both weights
    >>> u, state = opt.update(g, opt.init(params), params)
    >>> # omega = -g * delta = 0.25 and delta**2 = 0.25 for both weights
    >>> wj.importance.si(state, optax.apply_updates(params, u), damping=0.25)['w'].tolist()
    [0.5, 0.5]

  References:
    Zenke, Poole, Ganguli, "Continual Learning Through Synaptic
    Intelligence", ICML 2017 (eq. 5).
  """
  check_positive(damping, "damping")
  states = _find_path_states(opt_state)
  if len(states) != 1:
    raise ValueError(f"opt_state must contain exactly one PathIntegralState, found {len(states)}")
  (state,) = states
  params = fit_like(params, state.omega, "params")
  return jax.tree_util.tree_map(
      lambda w, p, s: jnp.maximum(w, 0.0) / (jnp.square(p.astype(jnp.float32) - s.astype(jnp.float32)) + damping),
      state.omega, params, state.start)


def restart_path(opt_state, params):
  """Zeroes the path integral and sets its start to ``params`` (call at a task's start).

  The start is a copy of ``params`` (a step that donates params and state
  must not find the same buffer in both).

  Example:
    >>> import jax.numpy as jnp, optax, wva_jax as wj
    >>> params = {'w': jnp.ones(2)}
    >>> state = wj.importance.path_integral(optax.sgd(0.1)).init(params)
    >>> state = wj.importance.restart_path(state, {'w': jnp.zeros(2)})
    >>> state.start['w'].tolist(), state.omega['w'].tolist()
    ([0.0, 0.0], [0.0, 0.0])
  """
  is_pi = lambda x: isinstance(x, PathIntegralState)
  found = []

  def restart(s):
    if not is_pi(s):
      return s
    found.append(s)
    # start: a copy of params (matched by path), never the caller's buffers (a donated state would share them).
    start = fresh_tree(fit_like(params, s.omega, "params"))
    return s._replace(omega=jax.tree_util.tree_map(jnp.zeros_like, s.omega), start=start)

  new_state = jax.tree_util.tree_map(restart, opt_state, is_leaf=is_pi)
  if not found:
    raise ValueError("opt_state contains no PathIntegralState (wrap the optimizer with path_integral)")
  return new_state
