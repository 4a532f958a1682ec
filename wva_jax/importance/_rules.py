"""How the importance engine and SIG treat each primitive a parameter meets.

One table, read by ``_trace.trace``. A parameter leaf is followed from the
model's inputs through its jaxpr; at each equation that consumes it (or an
alias of it) the rule of that equation's primitive decides:

``LAYOUT``
  A linear, element-moving op of the one parameter operand (reshape,
  transpose, broadcast, slice, float-to-float cast...). Followed: the alias
  carries the op, so cotangents can be mapped back to the leaf's layout.
``CALL``
  A call whose body is evaluated inline without changing any derivative
  (``jit``, ``closed_call``, ``remat``/``checkpoint``). Entered. A
  ``custom_jvp_call`` / ``custom_vjp_call`` is NOT a call here: its rule may
  differ from its body's derivative (a straight-through fake-quant, gradient
  scaling), so a parameter reaching one is opaque and differentiated by JAX
  through the rule.
``LOOP``
  ``scan``: entered. A parameter scanned over (a ``[L, ...]`` stack of layer
  weights) gets one use per layer slice, evaluated inside the same scan; a
  parameter closed over by the body is used once per iteration.
``LINEAR`` / ``ADDITIVE``
  A use: the op is linear in the parameter operand given the others (Dense,
  Conv, scale, embedding lookup), or adds it (a bias). Its per-example
  gradient is formed from the op's other operands and the cotangent at its
  output.
``ZERO``
  The derivative through this op is zero almost everywhere (integer casts,
  rounding, comparisons, ``stop_gradient``): the alias is dropped, exactly as
  autodiff drops it.
anything else
  Opaque. Where the op depends on parameters only (``tanh(w)``, a weight
  norm, a custom rule on a weight), the leaf is a parameter transform
  (``_transforms``): per-example gradients are taken at the transform's
  output on the fast path and pulled back through its own VJP. Where it also
  reads the example, the leaf leaves the fast path and is differentiated the
  general way (per-example ``vjp`` restricted to that leaf); SIG refuses it
  by name.
"""
from __future__ import annotations

import jax.numpy as jnp

LAYOUT = "layout"
CALL = "call"
LOOP = "loop"
LINEAR = "linear"
ADDITIVE = "additive"
ZERO = "zero"
OPAQUE = "opaque"

# Single-operand ops that only move, copy, broadcast or select elements: linear.
# neg: -w, with |.| and (.)^2 unchanged; sharding_constraint: sharded LLM code puts one on every weight.
_LAYOUT = frozenset({"reshape", "transpose", "squeeze", "expand_dims", "broadcast_in_dim",
                     "copy", "copy_p", "rev", "slice", "reduce_precision", "neg", "sharding_constraint"})
_CALL = frozenset({"jit", "pjit", "closed_call", "core_call", "remat2", "checkpoint"})
_LOOP = frozenset({"scan"})
# op -> the kind engine_report names it by
_LINEAR = {"dot_general": "dense", "conv_general_dilated": "conv", "mul": "scale",
           "gather": "embedding"}
# Linear in the parameter operand with a derivative that reads no other operand: the
# per-example gradient is the output cotangent's slice (a bias; a parameter
# concatenated to the activations: a ViT's cls or register tokens, prefix tuning).
_ADDITIVE = {"add": "bias", "sub": "bias", "add_any": "bias", "concatenate": "concatenated"}
# Derivative zero (almost everywhere) w.r.t. every operand.
_ZERO = frozenset({"stop_gradient", "sign", "floor", "ceil", "round", "is_finite",
                   "eq", "ne", "lt", "le", "gt", "ge", "and", "or", "not", "xor",
                   "argmax", "argmin", "population_count", "clz", "shift_left",
                   "shift_right_logical", "shift_right_arithmetic", "random_bits",
                   "iota", "nextafter"})


def _is_float(dtype) -> bool:
  return jnp.issubdtype(dtype, jnp.inexact)


def rule(eqn, operand: int) -> str:
  """The treatment of ``eqn`` when a parameter alias is its operand ``operand``."""
  name = eqn.primitive.name
  if name == "convert_element_type":
    # Only a float-to-float cast carries a derivative; a cast to an integer or
    # bool type (quantisation, masks) has a zero derivative.
    return LAYOUT if _is_float(eqn.outvars[0].aval.dtype) else ZERO
  if name in _ZERO:
    return ZERO
  if not _is_float(eqn.invars[operand].aval.dtype):
    return ZERO  # an integer parameter carries no gradient
  if name in _LAYOUT:
    return LAYOUT if len(eqn.invars) == 1 and len(eqn.outvars) == 1 else OPAQUE
  if name == "split":  # jnp.split of a fused kernel: each piece is a layout alias
    return LAYOUT if len(eqn.invars) == 1 else OPAQUE
  if name in _CALL:
    return CALL
  if name in _LOOP:
    return LOOP
  if name in _LINEAR:
    # a gather is linear in the table it reads, not in its indices
    return LINEAR if (name != "gather" or operand == 0) else OPAQUE
  if name in _ADDITIVE:
    return ADDITIVE
  if name == "select_n":
    # select_n(pred, *cases): zero through the predicate; linear in a case
    # only through a mask, which the engine does not factor
    return ZERO if operand == 0 else OPAQUE
  return OPAQUE


def rule_is_call(name: str) -> bool:
  return name in _CALL


def kind(name: str) -> str:
  """The name ``engine_report`` gives a use by primitive ``name``."""
  return _LINEAR.get(name) or _ADDITIVE[name]


def is_additive(name: str) -> bool:
  return name in _ADDITIVE


# Layout ops whose output holds each input element exactly once (no copies,
# no dropped elements): |.| and (.)^2 commute with them.
# Layout ops that change values (R(X)^T R(D) mapped back through neg would come out
# negated): never a permutation, whatever their sizes.
NOT_PERMUTING = frozenset({"neg"})
PERMUTING = frozenset({"reshape", "transpose", "squeeze", "expand_dims", "copy", "copy_p",
                       "rev", "convert_element_type", "reduce_precision", "sharding_constraint"})
