r"""Consolidation of low-rank adapters (LoRA) on frozen pretrained weights.

Convention (the Flax/JAX one): a dense kernel is ``W [d_in, d_out]`` used as
``x @ W``; its adapter is ``A [d_in, r]``, ``B [r, d_out]``, and the effective
weight is ``W + A @ B``. This is how ``flax.nnx.LoRA`` / ``nnx.LoRALinear``
store them (``lora_a [in, rank]``, ``lora_b [rank, out]``, output
``x @ lora_a @ lora_b``), so :math:`\Delta W = A B`. The LoRA paper writes
:math:`\Delta W = B A` for ``W [d_out, d_in]``: the same matrix transposed,
with the same penalty.

Adapters are any pytree whose adapted layers are mappings with exactly the
keys ``{"A", "B"}`` or ``{"lora_a", "lora_b"}`` (what
``nnx.split(model, nnx.LoRAParam, ...)`` gives for ``nnx.LoRA`` and
``nnx.LoRALinear``; ``nnx.Variable`` values are unwrapped). Every leaf of the
adapters tree must belong to such a pair: train other parameters with a
separate transform (``optax.partition``). A pair may be stacked over leading
axes (``A [L, d_in, r]``, ``B [L, r, d_out]``, e.g. from ``nnx.scan``); its
importance is then ``[L, d_in, d_out]``.

qwix (``qwix.apply_lora_to_model``) stores a weight ``w``'s adapter as leaves
``w_lora_a`` / ``w_lora_b`` beside ``w``: a mapping whose keys are all such
pairs is an adapter node, one adapter per weight, at the path ``module path +
('w',)`` (the weight's own path); its importance sits there too
(``{'w': F}``). On an ``einsum`` weight qwix's ``A`` is ``[contracted axes...,
r]`` and ``B`` ``[r, other axes...]`` with ``delta W = tensordot(A, B, 1)``,
handled as the matrix ``A.reshape(-1, r) @ B.reshape(r, -1)``; its importance
has the shape ``A.shape[:-1] + B.shape[1:]``. (A qwix ``dot_general`` adapter
with batch axes, ``A [batch..., d_in, r]``, ``B [batch..., r, d_out]``, is a
stack as above; the stacked reading is tried first.) qwix scales the update
by ``alpha / rank``: see :func:`lora_importance`'s ``scale``.

The importance tree has one array per adapter, shaped like the base kernel
(``A.shape[:-1] + B.shape[-1:]``), at the adapter's place in the tree: build
it from the base model's importance (any :mod:`wva_jax.importance`
estimator run on the frozen weights) with :func:`lora_importance`. Every
function here takes the adapters first and calls this tree
``kernel_importance``.

EWC on the effective update (:func:`lora_ewc_penalty`, :func:`add_lora_ewc`)
anchors at the pretrained weights (:math:`\Delta W = 0`), so the anchor costs
nothing and the state is the base kernels' importance.

WVA for adapters (:func:`lora_wva_scale`): WVA scales each parameter's
update by :math:`1/(1+\lambda\Omega)`, with :math:`\Omega` the diagonal of
the parameter's Fisher. ``A`` and ``B`` have no importance of their own, but
if the base kernel's Fisher is :math:`\mathrm{diag}(F)` (the diagonal
approximation every estimator here makes), the Fisher of the adapter is the
pull-back :math:`J^\top \mathrm{diag}(F) J` through
:math:`J = \partial\,\mathrm{vec}(AB) / \partial(A, B)`, whose diagonal is

.. math::
   \Omega^A_{ik} = \sum_j F_{ij} B_{kj}^2, \qquad
   \Omega^B_{kj} = \sum_i A_{ik}^2 F_{ij}

(:func:`lora_pullback`). It is also exactly the diagonal of the Hessian of
:math:`\frac12\sum F\odot(AB)^2` in ``A`` (resp. ``B``), the penalty being
quadratic in each factor, so WVA on the adapters is to LoRA-EWC what WVA is to
EWC. Keeping only the diagonal is the one approximation added (the same one
WVA makes on full weights); the importance changes with ``A`` and ``B`` and
is recomputed each step from the current adapters (two rank-``r`` products per
layer, no dense ``A @ B``). At ``B = 0`` (LoRA's initialisation)
:math:`\Omega^A = 0`: moving ``A`` alone does not change ``W``.

References:
  Kirkpatrick et al., "Overcoming catastrophic forgetting in neural networks",
  PNAS 2017 (EWC). Hu et al., "LoRA: Low-Rank Adaptation of Large Language
  Models", arXiv:2106.09685, 2021 (ICLR 2022).
"""
from wva_jax.lora._ewc import add_lora_ewc, lora_ewc_grad, lora_ewc_penalty
from wva_jax.lora._kernel_importance import lora_importance
from wva_jax.lora._state import LoRAState
from wva_jax.lora._wva import lora_pullback, lora_wva_scale

__all__ = ["lora_importance", "lora_ewc_penalty", "lora_ewc_grad", "add_lora_ewc", "lora_pullback",
           "lora_wva_scale", "LoRAState"]
