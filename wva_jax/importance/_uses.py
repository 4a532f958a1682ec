"""The plan of a traced model: where each parameter leaf is used, and the linear map that takes it there.

``_trace.trace`` builds a :class:`Plan`: per leaf, its uses (:class:`Use`,
one equation each) and the uses it cannot see through. Each use carries the
linear map from the leaf to the operand it feeds (:class:`Path`): layout ops
on the way, and for a scan either the layer slicing (a stacked leaf: a
permutation) or a broadcast over iterations (a leaf closed over by the body:
used once per layer). Its transpose (:func:`path_transpose`) maps stacked
operand cotangents back to the leaf, summing the uses.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from wva_jax.importance import _rules


@dataclasses.dataclass(frozen=True)
class Path:
  """The linear map from a parameter leaf to one alias of it, with its loop axes.

  ``steps`` are ``('bind', primitive, params)`` (a layout op, applied under
  ``vmap`` over the loop axes in place at that point), ``('xs',)`` (entering
  a scan as a scanned operand: the leading axis becomes a loop axis) and
  ``('const', length)`` (entering a scan as a closed-over operand: broadcast
  along a new loop axis) and ``('ys',)`` (leaving a scan as a stacked output:
  the loop axis becomes an array axis again).
  """
  steps: tuple = ()
  loops: tuple = ()  # lengths of the enclosing scans' loop axes, outermost first
  permutes: bool = True  # each leaf element appears exactly once in the alias

  def then(self, step, loops=None, permutes=True) -> Path:
    return Path(self.steps + (step,), self.loops if loops is None else loops,
                self.permutes and permutes)


@dataclasses.dataclass(frozen=True, eq=False)
class Use:
  """One equation that consumes (an alias of) parameter leaf ``leaf``."""
  leaf: int
  site: tuple  # equation index path: (i,) top level, (i, j) eqn j inside eqn i's jaxpr
  eqn: Any  # the JaxprEqn
  operand: int  # position of the parameter alias among eqn.invars
  path: Path
  data: bool = True  # the other operands depend on the example (not a constant like 1 + w)

  @property
  def prim(self) -> str:
    return self.eqn.primitive.name

  @property
  def entry(self) -> _rules.Entry:
    return _rules.entry(self.prim)

  @property
  def kind(self) -> str:
    """The name ``engine_report`` gives this use (``'dense'``, ``'conv'``, ``'bias'``...)."""
    return self.entry.kind or self.prim

  @property
  def factor(self) -> _rules.Factor | None:
    return self.entry.factor

  @property
  def additive(self) -> bool:
    return self.entry.treatment is _rules.ADDITIVE

  @property
  def loops(self) -> tuple:
    return self.path.loops


@dataclasses.dataclass
class Plan:
  closed: Any  # ClosedJaxpr of (param leaves..., input leaves...) -> outputs
  n_leaves: int
  uses: dict  # leaf -> [Use]
  blocked: dict  # leaf -> [reason]: uses the interpreter cannot see through
  block_sites: dict = dataclasses.field(default_factory=dict)  # leaf -> [site] of those uses
  depends: dict = dataclasses.field(default_factory=dict)  # {(prefix, var): True}: depends on the example
  aliases: frozenset = frozenset()  # top-level vars that are layout aliases of one leaf

  def sites(self, leaves) -> list:
    return [u for i in leaves for u in self.uses.get(i, [])]


def _under_loops(f, n: int):
  for _ in range(n):
    f = jax.vmap(f)
  return f


def path_fn(path: Path):
  """The path as a float32 function of the leaf: leaf -> stacked operand [*loops, ...].

  A ``('bind', primitive, params, j)`` step keeps output ``j`` of a
  multi-output op (``split``).
  """

  def f(w):
    n = 0  # loop axes in place so far
    for step in path.steps:
      if step[0] == "bind":
        _, prim, params, *out = step
        if prim.name == "convert_element_type":
          continue  # computed in float32
        bound = lambda x, prim=prim, params=params, out=out: (
            prim.bind(x, **prim.get_bind_params(params))[out[0]] if out else
            prim.bind(x, **prim.get_bind_params(params)))
        w = _under_loops(bound, n)(w)
      elif step[0] == "xs":
        n += 1
      elif step[0] == "ys":  # stacked as a scan output: the loop axis is an array axis again
        n -= 1
      else:  # ("const", length): the same value in every iteration
        w = jnp.broadcast_to(jnp.expand_dims(w, n), w.shape[:n] + (step[1],) + w.shape[n:])
        n += 1
    return w

  return f


def path_transpose(path: Path, leaf_shape):
  """Maps float32 cotangents of the stacked operand back to the leaf (summing copies)."""
  if not any(s[0] not in ("xs", "ys") and not (s[0] == "bind" and s[1].name == "convert_element_type")
             for s in path.steps):
    return lambda g: g
  t = jax.linear_transpose(path_fn(path), jax.ShapeDtypeStruct(leaf_shape, jnp.float32))
  return lambda g: t(g)[0]


def looped(use: Use, f):
  """``f`` (one iteration's arrays -> one iteration's result) mapped over the use's loop axes."""
  return _under_loops(f, len(use.loops))
