"""Carry the verified MNIST split to a machine with no network, exactly.

    python -m experiments.device_data pack data_cache/mnist-u8.npz     # here
    WVA_JAX_DATA=/tmp/wvadata python -m experiments.device_data unpack data_cache/mnist-u8.npz

The protocol cache (``experiments.data``, 220 MB of float32) is too big to
carry; its pixels are exactly k/255 (k = 0..255), so ``pack`` stores k as
uint8 (about 15 MB compressed) after checking that k/255 gives back every
float32 bit for bit, and ``unpack`` rebuilds the same cache (``save_cache``,
with its sha256 sidecar) where ``load_mnist`` looks for it. ``unpack``
checks the rebuilt arrays' sha256 against the one ``pack`` recorded.
"""
from __future__ import annotations

import hashlib
import sys

import numpy as np

from experiments import data as D

IMAGES = ("x_train", "x_valid", "x_test")


def _digest(split) -> str:
  h = hashlib.sha256()
  for k in D.Split._fields:
    if k != "source":
      h.update(np.ascontiguousarray(getattr(split, k)).tobytes())
  return h.hexdigest()


def _to_float(k):
  return (k.astype(np.float32) / np.float32(255)).astype(np.float32)


def pack(path) -> str:
  split = D.load_mnist(verbose=False)
  arrays = {}
  for name in D.Split._fields:
    if name == "source":
      continue
    a = getattr(split, name)
    if name in IMAGES:
      k = np.rint(a * 255).astype(np.uint8)
      if not np.array_equal(_to_float(k), a):
        raise ValueError(f"{name}: pixels are not exactly k/255")
      a = k
    arrays[name] = a
  digest = _digest(split)
  np.savez_compressed(path, source=np.array(split.source), sha256=np.array(digest), **arrays)
  return digest


def unpack(path) -> str:
  with np.load(path, allow_pickle=False) as z:
    fields = {k: (_to_float(z[k]) if k in IMAGES else z[k])
              for k in D.Split._fields if k != "source"}
    split = D.Split(source=str(z["source"]), **fields)
    want = str(z["sha256"])
  got = _digest(split)
  if got != want:
    raise D.ChecksumError(f"{path}: arrays sha256 {got}, packed {want}")
  D.save_cache(split, D.cache_dir() / D.CACHE_NAME)
  return got


if __name__ == "__main__":
  cmd, where = sys.argv[1], sys.argv[2]
  print({"pack": pack, "unpack": unpack}[cmd](where))
