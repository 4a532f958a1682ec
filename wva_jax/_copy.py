"""Fresh buffers for optimizer state, so a donated state never shares one with the caller.

``jax.jit(step, donate_argnums=(0, 1))`` (params and optimizer state donated)
is how large models keep one copy of their training state. It fails with
"Attempt to donate the same buffer twice" if a state leaf *is* a params leaf
(an EWC anchor or SI path start taken from the params), and it silently
deletes a caller's array (the importance passed to ``set_importance``, or to
``wva_scale`` at construction) if a state leaf is that array. ``jnp.asarray``
and ``astype`` to the same dtype return the very same buffer, so every state
leaf built from a caller's array goes through :func:`fresh`.

Memory: under ``jit`` the copy is free (XLA gives every output its own
buffer anyway); eagerly it allocates one copy of the tree, which is exactly
the bytes the state leaf costs once the caller drops its own reference.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def fresh(x, dtype=None):
  """``x`` (as ``dtype`` if given) in a new buffer, with ``x``'s sharding."""
  return jnp.array(x, dtype=dtype, copy=True)


def fresh_tree(tree, dtype=None):
  """:func:`fresh` of every leaf."""
  return jax.tree_util.tree_map(lambda x: fresh(x, dtype), tree)
