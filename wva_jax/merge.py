r"""Fisher-weighted model merging (Matena & Raffel, 2022)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from wva_jax._checks import check_importance_values, check_strength, concrete_scalar

_F32 = jnp.float32


def _is_variable(x: Any) -> bool:
  try:
    from flax import nnx
  except ImportError:
    return False
  return isinstance(x, nnx.Variable)


def _leaves(tree: Any) -> tuple[list, Any]:
  with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
  return with_path, treedef


def fisher_merge(params_list: Sequence[optax.Params], importances: Sequence[optax.Params], *,
                 eps: ArrayLike = 1e-8, weights: Sequence[ArrayLike] | None = None) -> optax.Params:
  r"""Merges models parameter by parameter, each weighted by its importance.

  .. math::
     \theta_j = \frac{\sum_i w_i\,(F_{i,j} + \epsilon_\ell)\,\theta_{i,j}}
                     {\sum_i w_i\,(F_{i,j} + \epsilon_\ell)}, \qquad
     \epsilon_\ell = \texttt{eps} \cdot \overline{F}_\ell

  with :math:`F_i` model ``i``'s importance (its diagonal Fisher, or any
  :mod:`wva_jax.importance` estimate), :math:`w_i` optional model weights
  (default 1) and :math:`\overline{F}_\ell` the mean importance of the leaf
  :math:`\ell` holding :math:`j`, over its entries and the models: ``eps``
  is relative, so scaling every importance by one constant (a Fisher over
  more tokens, a sum instead of a mean) does not change the merge. Where
  every model's importance is 0 (a coordinate no model uses; with ``eps =
  0``, or a leaf that is all zeros) the result is the ``w``-weighted plain
  average, never NaN; where one model's importance dominates, its value.
  Computed in float32, returned in the dtype of ``params_list[0]``'s leaves;
  jittable (``jax.jit(fisher_merge)`` with the lists as arguments).

  Args:
    params_list: the models' parameter trees (same structure and shapes;
      ``nnx.State`` is fine).
    importances: one importance tree per model, shaped like its params, >= 0.
    eps: >= 0, relative to each leaf's mean importance (default ``1e-8``).
    weights: optional per-model weights :math:`w_i` >= 0 (Matena & Raffel's
      :math:`\lambda_i`), not all 0.

  Returns:
    The merged parameters, shaped like ``params_list[0]``.

  Example:
    >>> import jax.numpy as jnp, wva_jax as wj
    >>> a, b = {'w': jnp.array([0.0, 0.0])}, {'w': jnp.array([1.0, 1.0])}
    >>> fa, fb = {'w': jnp.array([3.0, 0.0])}, {'w': jnp.array([1.0, 0.0])}
    >>> wj.fisher_merge([a, b], [fa, fb])['w'].tolist()   # (3*0 + 1*1) / 4, then the plain average
    [0.25, 0.5]

  References:
    Matena & Raffel, "Merging Models with Fisher-Weighted Averaging",
    NeurIPS 2022 (arXiv:2111.09832).
  """
  params_list, importances = list(params_list), list(importances)
  n = len(params_list)
  if n == 0:
    raise ValueError("params_list is empty: give at least one model")
  if len(importances) != n:
    raise ValueError(f"params_list has {n} models but importances has {len(importances)}")
  check_strength(eps, "eps")
  if weights is None:
    ws: list[Any] = [1.0] * n
  else:
    ws = list(weights)
    if len(ws) != n:
      raise ValueError(f"weights has {len(ws)} entries but params_list has {n} models")
    values = [concrete_scalar(w, f"weights[{i}]") for i, w in enumerate(ws)]
    for i, v in enumerate(values):
      if v is not None and not (v >= 0 and v < float("inf")):
        raise ValueError(f"weights[{i}] must be finite and >= 0, got {v!r}")
    if all(v is not None for v in values) and sum(values) == 0:   # type: ignore[arg-type]
      raise ValueError("weights are all 0: nothing to average")
  ref_paths, ref_def = _leaves(params_list[0])
  for what, trees in (("params_list", params_list), ("importances", importances)):
    for i, tree in enumerate(trees):
      paths, tdef = _leaves(tree)
      if tdef != ref_def:
        raise ValueError(f"{what}[{i}] has tree structure {tdef}, but params_list[0] has {ref_def}")
      for (path, leaf), (_, ref) in zip(paths, ref_paths):
        if jnp.shape(leaf) != jnp.shape(ref):
          raise ValueError(f"{what}[{i}]{jax.tree_util.keystr(path)} has shape {jnp.shape(leaf)}, but "
                           f"params_list[0] has {jnp.shape(ref)} there")
  # Concrete arrays closed over by a jitted caller are checked now (compile-time eval), tracers are skipped.
  with jax.ensure_compile_time_eval():
    for i, imp in enumerate(importances):
      check_importance_values(imp, f"importances[{i}]")

  flat = [jax.tree_util.tree_leaves(p) for p in params_list]
  flat_f = [jax.tree_util.tree_leaves(f) for f in importances]
  merged = []
  for j, ref in enumerate(flat[0]):
    fs = [jnp.asarray(flat_f[i][j]).astype(_F32) for i in range(n)]
    eps_leaf = jnp.asarray(eps, _F32) * sum(jnp.mean(f) for f in fs) / n   # relative to the leaf's scale
    num = jnp.zeros(jnp.shape(ref), _F32)
    den = jnp.zeros(jnp.shape(ref), _F32)
    plain = jnp.zeros(jnp.shape(ref), _F32)
    for i in range(n):
      w = jnp.asarray(ws[i], _F32)
      c = w * (fs[i] + eps_leaf)
      theta = jnp.asarray(flat[i][j]).astype(_F32)
      num, den, plain = num + c * theta, den + c, plain + w * theta
    total_w = sum(jnp.asarray(w, _F32) for w in ws)
    # no importance anywhere at this coordinate: the w-weighted plain average, not 0/0
    safe = jnp.where(den > 0, den, 1.0)
    merged.append(jnp.where(den > 0, num / safe, plain / total_w).astype(jnp.result_type(ref)))
  return jax.tree_util.tree_unflatten(ref_def, merged)
