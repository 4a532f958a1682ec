"""Flax NNX ``Variable`` leaves, recognised without importing flax unless it is installed."""
from __future__ import annotations

from typing import Any


def is_variable(x: Any) -> bool:
  try:
    from flax import nnx
  except ImportError:
    return False
  return isinstance(x, nnx.Variable)


def unwrap(x: Any) -> Any:
  """The array inside an ``nnx.Variable``; anything else as it is."""
  return x.get_value() if is_variable(x) else x
