r"""Training metrics: what the consolidation is doing, as a flat dict of scalars for any logger."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from wva_jax._checks import check_choice
from wva_jax._fit import fit_like
from wva_jax.ewc import EWCState
from wva_jax.importance.si import PathIntegralState
from wva_jax.lora import LoRAState, lora_ewc_penalty, lora_pullback
from wva_jax.state import find_states
from wva_jax.wva import VISCOSITIES, WVAState, attenuation

_F32 = jnp.float32
_KINDS = ((WVAState, "wva"), (EWCState, "ewc"), (LoRAState, "lora"), (PathIntegralState, "si"))


def _flat(tree: Any) -> jax.Array:
  leaves = [jnp.ravel(jnp.asarray(x)).astype(_F32) for x in jax.tree_util.tree_leaves(tree)]
  return jnp.concatenate(leaves) if leaves else jnp.zeros((0,), _F32)


def _norm(tree: Any) -> jax.Array:
  return jnp.sqrt(sum((jnp.sum(jnp.square(jnp.asarray(x).astype(_F32))) for x in jax.tree_util.tree_leaves(tree)),
                      jnp.zeros([], _F32)))


def _sub(a: Any, b: Any) -> Any:
  return jax.tree_util.tree_map(lambda x, y: jnp.asarray(x).astype(_F32) - jnp.asarray(y).astype(_F32), a, b)


def _arrays(tree: Any) -> Any:
  """``tree`` with ``nnx.Variable`` leaves replaced by their values."""
  try:
    from flax import nnx
  except ImportError:
    return tree
  return jax.tree_util.tree_map(lambda x: x.get_value() if isinstance(x, nnx.Variable) else x, tree,
                                is_leaf=lambda x: isinstance(x, nnx.Variable))


def _fit(tree: Any, like: Any, name: str, kind: str) -> Any:
  """``tree`` (shaped like the params) fitted by path to the {kind} state's tree (masked states hold part of it)."""
  return fit_like(tree, like, name, what=f"the {kind} state")


def _strength_at(st: Any, s: Any, kind: str) -> Any:
  """A schedule is read at the state's step count, as the transform reads it."""
  if not callable(st):
    return st
  count = getattr(s, "count", None)
  if count is None:
    raise ValueError(f"strength for {kind!r} is a schedule, but the {kind} state was built with a constant "
                     "strength and keeps no step count: pass the number the transform uses")
  return st(count)


def training_metrics(opt_state: Any, params: optax.Params | None = None, grads: optax.Updates | None = None, *,
                     strength: ArrayLike | Mapping[str, ArrayLike] | None = None, viscosity: str = "hyperbolic",
                     quantiles: Sequence[float] = (0.5, 0.9, 0.99)) -> dict[str, jax.Array]:
  r"""Scalars that show the consolidation at work, found in any optimizer state.

  Walks ``opt_state`` (an optax state: chains, ``inject_hyperparams``,
  ``optax.partition``; or an ``nnx.Optimizer``, e.g. tunix's
  ``trainer.optimizer``) for :class:`~wva_jax.WVAState`,
  :class:`~wva_jax.EWCState`, :class:`~wva_jax.LoRAState` and SI's
  :class:`~wva_jax.importance.PathIntegralState`, and returns, under
  ``'<kind>/<name>'`` (kind ``wva``, ``ewc``, ``lora``, ``si``; a second
  state of a kind is ``'<kind>_1/...'``):

  * every state with an importance: ``importance_mean``, ``importance_max``
    and ``importance_p50`` / ``p90`` / ``p99`` (``quantiles``; over all
    entries of all leaves, so it sorts a float32 copy: pass ``quantiles=()``
    on a large model);
  * ``wva``, with ``strength``: ``attenuation_mean`` and ``attenuation_min``
    of :math:`a = 1/(1+\lambda\Omega)` (or :math:`e^{-\lambda\Omega}`), and
    with ``grads`` ``attenuated_grad_ratio`` :math:`\|a\odot g\| / \|g\|`;
  * ``ewc``, with ``params``: ``drift`` :math:`\|\theta-\theta^*\|_2`,
    ``fisher_drift`` :math:`\frac12\sum\Omega(\theta-\theta^*)^2` (the penalty
    per unit strength), with ``strength`` ``penalty`` (:func:`wva_jax.ewc_penalty`),
    and with both ``strength`` and ``grads`` ``pull_to_grad_ratio``
    :math:`\|\lambda\Omega\odot(\theta-\theta^*)\| / \|g\|`;
  * ``lora``, with ``params`` (the adapters): ``fisher_drift``
    (:func:`wva_jax.lora_ewc_penalty` at strength 1), with ``strength``
    ``penalty`` and the pulled-back ``attenuation_mean`` / ``attenuation_min``
    (what :func:`wva_jax.lora_wva_scale` applies);
  * ``si``: ``omega_mean``, ``omega_max`` (the path integral), and with
    ``params`` ``drift`` from the path's start.

  Everything is a float32 scalar and the function is jittable (the walk is
  over the state's static structure).

  Args:
    opt_state: an optax state or an ``nnx.Optimizer``.
    params: the parameters the optimizer updates (the adapters for LoRA).
    grads: this step's gradients, shaped like ``params``.
    strength: :math:`\lambda` of the transforms (it is not in their state): one
      scalar or ``optax`` schedule for all, or ``{'wva': .., 'ewc': .., 'lora': ..}``;
      a schedule is read at the state's step count, as the transform reads it.
    viscosity: ``'hyperbolic'`` or ``'exponential'`` (WVA's and LoRA-WVA's).
    quantiles: importance quantiles to report, each in [0, 1].

  Returns:
    ``dict[str, jax.Array]`` of scalars.

  Example:
    >>> import jax.numpy as jnp, optax, wva_jax as wj
    >>> params = {'w': jnp.array([1.0, 2.0])}
    >>> tx = optax.chain(wj.add_ewc({'w': jnp.zeros(2)}, {'w': jnp.array([1.0, 3.0])}, 2.0), optax.sgd(0.1))
    >>> m = wj.training_metrics(tx.init(params), params, strength=2.0)
    >>> float(m['ewc/penalty']), float(m['ewc/importance_max'])   # 2/2 * (1*1 + 3*4)
    (13.0, 3.0)
  """
  check_choice(viscosity, VISCOSITIES, "viscosity")
  for q in quantiles:
    if not 0.0 <= float(q) <= 1.0:
      raise ValueError(f"quantiles must lie in [0, 1], got {q!r}")
  if isinstance(strength, Mapping):
    unknown = set(strength) - {k for _, k in _KINDS}
    if unknown:
      raise ValueError(f"strength has keys {sorted(unknown)}; use 'wva', 'ewc', 'lora'")
  params = None if params is None else _arrays(params)
  grads = None if grads is None else _arrays(grads)

  def lam(kind: str) -> Any:
    if isinstance(strength, Mapping):
      return strength.get(kind)
    return strength

  out: dict[str, jax.Array] = {}
  for state_type, kind in _KINDS:
    for n, s in enumerate(find_states(opt_state, (state_type,))):
      p = kind if n == 0 else f"{kind}_{n}"
      imp = s.omega if kind == "si" else s.importance
      flat = _flat(imp)
      name = "omega" if kind == "si" else "importance"
      out[f"{p}/{name}_mean"] = jnp.mean(flat)
      out[f"{p}/{name}_max"] = jnp.max(flat)
      if kind != "si" and quantiles:
        qs = jnp.quantile(flat, jnp.asarray([float(q) for q in quantiles], _F32))
        for q, v in zip(quantiles, qs):
          out[f"{p}/importance_p{_pct(q)}"] = v
      st = _strength_at(lam(kind), s, kind)
      if kind == "wva" and st is not None:
        a = attenuation(imp, st, viscosity)
        af = _flat(a)
        out[f"{p}/attenuation_mean"] = jnp.mean(af)
        out[f"{p}/attenuation_min"] = jnp.min(af)
        if grads is not None:
          g = _fit(grads, imp, "grads", kind)
          out[f"{p}/attenuated_grad_ratio"] = _norm(jax.tree_util.tree_map(
              lambda g, f: jnp.asarray(g).astype(_F32) * f, g, a)) / _norm(g)
      if kind == "ewc" and params is not None:
        d = _sub(_fit(params, s.anchor, "params", kind), s.anchor)
        out[f"{p}/drift"] = _norm(d)
        fd = 0.5 * sum((jnp.sum(jnp.asarray(f).astype(_F32) * jnp.square(x))
                        for f, x in zip(jax.tree_util.tree_leaves(imp), jax.tree_util.tree_leaves(d))),
                       jnp.zeros([], _F32))
        out[f"{p}/fisher_drift"] = fd
        if st is not None:
          out[f"{p}/penalty"] = jnp.asarray(st, _F32) * fd
          if grads is not None:
            pull = jax.tree_util.tree_map(lambda f, x: jnp.asarray(st, _F32) * jnp.asarray(f).astype(_F32) * x,
                                          imp, d)
            out[f"{p}/pull_to_grad_ratio"] = _norm(pull) / _norm(_fit(grads, imp, "grads", kind))
      if kind == "lora" and params is not None:
        out[f"{p}/fisher_drift"] = lora_ewc_penalty(params, imp, 1.0)
        if st is not None:
          out[f"{p}/penalty"] = jnp.asarray(st, _F32) * out[f"{p}/fisher_drift"]
          af = _flat(attenuation(lora_pullback(params, imp), st, viscosity))
          out[f"{p}/attenuation_mean"] = jnp.mean(af)
          out[f"{p}/attenuation_min"] = jnp.min(af)
      if kind == "si" and params is not None:
        out[f"{p}/drift"] = _norm(_sub(_fit(params, s.start, "params", kind), s.start))
  if not out:
    raise ValueError("opt_state contains no WVAState, EWCState, LoRAState or PathIntegralState")
  return out


def _pct(q: float) -> str:
  text = f"{100 * float(q):g}"
  return text.replace(".", "_")
