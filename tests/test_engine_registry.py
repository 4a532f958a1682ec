"""The primitive registry (``wva_jax.importance._rules.REGISTRY``) holds no entry nobody tests.

Each name must be a primitive of the installed JAX (a renamed primitive
would otherwise silently fall to the opaque path), and each entry with a
walk treatment must be met, with that treatment, by one of the differential
test's layer kinds, each of which is checked element-wise against the
per-example ``vmap`` reference here.
"""
import gc

import jax
import pytest
from test_engine_differential import _CONV, LAYERS, check_engine_equals_reference

from wva_jax.importance import _rules


def _primitive_names() -> set:
  import jax.experimental.shard_map  # noqa: F401 - registers its primitives
  from jax._src import core
  return {o.name for o in gc.get_objects() if isinstance(o, core.Primitive)}


def test_every_registered_name_is_a_primitive_of_this_jax():
  missing = sorted(set(_rules.REGISTRY) - _primitive_names())
  assert not missing, f"not primitives in jax {jax.__version__}: {missing}"


@pytest.mark.slow
def test_every_walk_entry_has_a_differential_case(monkeypatch):
  met: dict = {}   # primitive name -> treatments the walk gave it, over all kinds
  rule = _rules.rule

  def recorded(eqn, operand):
    t = rule(eqn, operand)
    met.setdefault(eqn.primitive.name, set()).add(t)
    return t

  monkeypatch.setattr(_rules, "rule", recorded)
  for kind in LAYERS:
    for tokens in (False, True):   # a dense input layer, then an embedding lookup and a tied head
      spec = dict(tokens=tokens, layers=[kind], convs=[_CONV], tied=tokens, seq=6, seed=LAYERS.index(kind))
      try:
        check_engine_equals_reference(spec)
      except AssertionError as e:
        raise AssertionError(f"layer kind {kind!r}, tokens={tokens}: {e}") from e
  untested = sorted(n for n, e in _rules.REGISTRY.items()
                    if e.treatment is not None and e.treatment not in met.get(n, ()))
  assert not untested, f"registry entries no differential case meets with their treatment: {untested}"
