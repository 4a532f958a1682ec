"""Tree paths as names: one rule for importance files and for fitting trees to optimizer states.

A path's name is its keys joined by ``/``: dict keys and attribute names as
they are, sequence indices as decimal numbers. So ``{'layers': [{'kernel':
w}]}``, ``{'layers': {0: {'kernel': w}}}`` (an ``nnx.State``) and the flat
``{'layers/0/kernel': w}`` that ``safetensors`` returns all name ``w``
``layers/0/kernel``.
"""
from __future__ import annotations

from typing import Any

import jax


def key_name(k: Any) -> str | int:
  """One path entry's name: a ``DictKey``'s key, a ``SequenceKey``'s index, a ``GetAttrKey``'s name."""
  for attr in ("key", "idx", "name"):
    if hasattr(k, attr):
      v = getattr(k, attr)
      return v if isinstance(v, int) else str(v)
  return str(k)


def path_name(path: tuple) -> str:
  """``path``'s keys joined by ``/`` (ints as decimal numbers)."""
  return "/".join(str(key_name(k)) for k in path)


def keystr(path: tuple) -> str:
  return jax.tree_util.keystr(path) if path else "(the root)"
