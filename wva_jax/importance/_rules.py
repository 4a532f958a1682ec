"""What the importance engine, SIG and the independence check know about each primitive: one registry.

``REGISTRY`` maps a primitive's name to an :class:`Entry`; everything that
treats a primitive by name reads it here (``_trace`` when it follows a
parameter, ``_interpret`` when it re-runs the model, ``_engine`` and ``sig``
when they form a use's per-example gradient or signal, ``_independence`` when
it names the op that mixes examples). A primitive absent from the registry
is opaque. Names are the installed JAX's (``tests/test_engine_registry.py``
checks each is a primitive there), and every entry with a walk treatment is
met, with that treatment, by a model that the same test checks element-wise
against the per-example reference: no entry goes untested.

Walk treatments (:class:`Treatment`), when an alias of a parameter leaf is an
operand of an equation:

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
  output, the way its :class:`Factor` says.
``ZERO``
  The derivative through this op is zero almost everywhere (integer casts,
  rounding, comparisons, ``stop_gradient``): the alias is dropped, exactly as
  autodiff drops it.
``OPAQUE`` (and any primitive not registered)
  Where the op depends on parameters only (``tanh(w)``, a weight norm, a
  custom rule on a weight), the leaf is a parameter transform
  (``_transforms``): per-example gradients are taken at the transform's
  output on the fast path and pulled back through its own VJP. Where it also
  reads the example, the leaf leaves the fast path and is differentiated the
  general way (per-example ``vjp`` restricted to that leaf); SIG gives it the
  magnitude rule with a warning.
"""
from __future__ import annotations

import dataclasses
import enum

import jax.numpy as jnp


class Treatment(enum.Enum):
  """What following a parameter alias does at an equation (module docstring)."""
  LAYOUT = "layout"
  CALL = "call"
  LOOP = "loop"
  LINEAR = "linear"
  ADDITIVE = "additive"
  ZERO = "zero"
  OPAQUE = "opaque"


class Factor(enum.Enum):
  """How a use's per-example gradient (and SIG's signal) is formed from its operands."""
  MATMUL = "matmul"  # dot_general: x d^T, one matmul R(X)^T R(D) for one position per example
  PATCHES = "patches"  # a conv kernel: input patches (strided slices) times the cotangent
  ROWS = "rows"  # gather from a table: the cotangent scattered to the rows the indices pick
  VJP = "vjp"  # the op's VJP in the parameter operand, under vmap over the example's positions
  COTANGENT = "cotangent"  # additive: the output cotangent itself, summed to the operand's shape


@dataclasses.dataclass(frozen=True)
class Entry:
  """One primitive's treatment.

  Attributes:
    treatment: what following a parameter alias does here (``None``: nothing
      to follow; the entry only tells the independence check about the op).
    kind: the name ``engine_report`` gives a use (``LINEAR`` / ``ADDITIVE``).
    factor: how a use's per-example gradient is formed (``LINEAR`` / ``ADDITIVE``).
    permutes: ``LAYOUT`` only: each input element appears exactly once in the
      output (``|.|`` and ``(.)^2`` commute with it); ``None``: when the
      sizes match; ``False``: never (``neg`` changes values).
    remat: ``CALL`` only: the body is rematerialised; kept when re-run.
    along: the ``params`` key naming the axes the op combines or moves values
      along (independence check: acting along the batch axis mixes examples).
    indexed: reads operand elements at computed positions, any axis.
  """
  treatment: Treatment | None
  kind: str | None = None
  factor: Factor | None = None
  permutes: bool | None = None
  remat: bool = False
  along: str | None = None
  indexed: bool = False


_ = Entry
LAYOUT, CALL, LOOP, LINEAR, ADDITIVE, ZERO, OPAQUE = Treatment

REGISTRY: dict[str, Entry] = {
    # layout: single-operand ops that move, copy, broadcast or select elements
    **{n: _(LAYOUT, permutes=True) for n in ("reshape", "transpose", "squeeze", "copy",
                                              "convert_element_type", "reduce_precision")},
    # sharded LLM code puts one on every weight
    "sharding_constraint": _(LAYOUT, permutes=True),
    "rev": _(LAYOUT, permutes=True, along="dimensions"),
    "broadcast_in_dim": _(LAYOUT),
    "slice": _(LAYOUT),
    "split": _(LAYOUT),  # jnp.split of a fused kernel: each piece is a layout alias
    "neg": _(LAYOUT, permutes=False),  # -w: |.| and (.)^2 unchanged, R(X)^T R(D) would come out negated
    # calls whose body is evaluated inline
    "jit": _(CALL),
    "remat2": _(CALL, remat=True),  # jax.checkpoint
    "scan": _(LOOP),
    # linear in the parameter operand
    "dot_general": _(LINEAR, "dense", Factor.MATMUL),
    "conv_general_dilated": _(LINEAR, "conv", Factor.PATCHES),
    "mul": _(LINEAR, "scale", Factor.VJP),
    "gather": _(LINEAR, "embedding", Factor.ROWS, indexed=True),  # linear in the table, not the indices
    # linear with a derivative that reads no other operand: the per-example gradient is the
    # output cotangent's slice (a bias; a parameter concatenated to the activations: a ViT's
    # cls or register tokens, prefix tuning)
    **{n: _(ADDITIVE, "bias", Factor.COTANGENT) for n in ("add", "sub", "add_any")},
    "concatenate": _(ADDITIVE, "concatenated", Factor.COTANGENT, along="dimension"),
    # derivative zero (almost everywhere) with respect to a float operand
    **{n: _(ZERO) for n in ("stop_gradient", "sign", "floor", "ceil", "round", "is_finite",
                            "eq", "ne", "lt", "le", "gt", "ge")},
    **{n: _(ZERO, along="axes") for n in ("argmax", "argmin")},
    # select_n(pred, *cases): opaque in a case (a mask the engine does not factor); the
    # predicate is boolean, so rule() gives it ZERO like any non-float operand
    "select_n": _(OPAQUE),
    # what the independence check names when a model mixes examples (opaque to a parameter)
    **{n: _(None, along="axes") for n in ("reduce_sum", "reduce_max", "reduce_min", "reduce_prod",
                                          "reduce_and", "reduce_or")},
    **{n: _(None, along="axis") for n in ("cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp")},
    "sort": _(None, along="dimension"),
    **{n: _(None, indexed=True) for n in ("dynamic_slice", "scatter", "scatter-add", "dynamic_update_slice")},
}
_OPAQUE_ENTRY = Entry(OPAQUE)


def entry(name: str) -> Entry:
  """The registry's entry for primitive ``name`` (opaque if unregistered)."""
  return REGISTRY.get(name, _OPAQUE_ENTRY)


def _is_float(dtype) -> bool:
  return jnp.issubdtype(dtype, jnp.inexact)


def rule(eqn, operand: int) -> Treatment:
  """The treatment of ``eqn`` when a parameter alias is its operand ``operand``."""
  name = eqn.primitive.name
  t = entry(name).treatment or OPAQUE
  if name == "convert_element_type" and not _is_float(eqn.outvars[0].aval.dtype):
    # Only a float-to-float cast carries a derivative; a cast to an integer or
    # bool type (quantisation, masks) has a zero derivative.
    return ZERO
  if t is ZERO or not _is_float(eqn.invars[operand].aval.dtype):
    return ZERO  # an integer parameter carries no gradient
  if t is LAYOUT:
    single = len(eqn.invars) == 1 and (len(eqn.outvars) == 1 or name == "split")
    return LAYOUT if single else OPAQUE
  if t is LINEAR and entry(name).factor is Factor.ROWS and operand != 0:
    return OPAQUE  # a gather is linear in the table it reads, not in its indices
  return t


def permutes(name: str, in_size: int, out_size: int) -> bool:
  """Whether a layout op's output holds each input element exactly once."""
  p = entry(name).permutes
  return in_size == out_size if p is None else p


def uses() -> list[str]:
  """The primitives a parameter leaf is used by on the fast path (linear or additive in it)."""
  return [n for n, e in REGISTRY.items() if e.treatment in (LINEAR, ADDITIVE)]
