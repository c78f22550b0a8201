"""Lazy, one-tensor-at-a-time readers for checkpoints on disk.

`open_source(path)` detects the checkpoint format and returns a `TensorSource`:
a read-only mapping from tensor name to array that parses only metadata up
front and loads a tensor's bytes when `read(key)` asks for it.

Supported layouts (checked in this order for a directory):

* Hugging Face safetensors, sharded: `model.safetensors.index.json`
  (`{"metadata": {...}, "weight_map": {tensor_name: shard_file_name}}`) next
  to its shards (`model-00001-of-00002.safetensors`, ...).
* safetensors, single file: `model.safetensors` (or any `*.safetensors` path).
  The header is parsed here (u64 little-endian header length N, N bytes of
  JSON `{name: {"dtype", "shape", "data_offsets": [begin, end]},
  "__metadata__": {...}}`, then the data section; offsets are relative to the
  data section) and a read seeks to one tensor's bytes.
* PyTorch pickles: `pytorch_model.bin.index.json` (same index schema) or
  `pytorch_model.bin`, loaded with `torch.load(weights_only=True, mmap=True)`
  (no pickled code runs; torch is imported only when needed).
* T5X checkpoints (legacy msgpack + TensorStore, or Orbax); see `t5x.py`.

Keys are the names stored in the checkpoint, unchanged; arrays come back in
the checkpoint's own layout and dtype (bfloat16 as `ml_dtypes.bfloat16`).
"""

from __future__ import annotations

import abc
import glob
import json
import math
import os
import struct
import sys
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np

__all__ = ["TensorSource", "SafetensorsSource", "TorchBinSource", "open_source"]


class TensorSource(abc.ABC):
  """A read-only, lazily loaded view of the tensors in one checkpoint."""

  path: str  # what was opened; used in error messages

  @abc.abstractmethod
  def keys(self) -> list[str]:
    """Sorted tensor names."""

  @abc.abstractmethod
  def shape(self, key: str) -> tuple[int, ...]:
    """Shape of tensor `key`, from metadata only (no tensor data is read)."""

  @abc.abstractmethod
  def dtype(self, key: str) -> np.dtype:
    """numpy dtype of tensor `key` (bfloat16 is `ml_dtypes.bfloat16`)."""

  @abc.abstractmethod
  def read(self, key: str) -> np.ndarray:
    """The whole tensor `key` as a fresh numpy array of `shape(key)`/`dtype(key)`."""

  def close(self) -> None:
    """Releases open files and cached shards; the source is unusable afterwards."""

  def __contains__(self, key: object) -> bool:
    return isinstance(key, str) and key in set(self.keys())

  def __iter__(self) -> Iterator[str]:
    return iter(self.keys())

  def __len__(self) -> int:
    return len(self.keys())

  def __enter__(self) -> TensorSource:
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.close()

  def __repr__(self) -> str:
    return f"{type(self).__name__}({self.path!r})"

  def _missing(self, key: str) -> KeyError:
    return KeyError(f"tensor {key!r} is not in checkpoint {self.path}")


class _IndexedSource(TensorSource):
  """A source whose `self._index` maps every tensor name to a per-tensor record."""

  _index: Mapping[str, Any]

  def keys(self) -> list[str]:
    return sorted(self._index)

  def __contains__(self, key: object) -> bool:
    return key in self._index

  def _lookup(self, key: str) -> Any:
    try:
      return self._index[key]
    except KeyError:
      raise self._missing(key) from None


# ----------------------------------------------------------------------------
# safetensors

# Data is little-endian per the safetensors spec.
_ST_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"), "U64": np.dtype("<u8"), "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"), "U8": np.dtype("u1"), "BOOL": np.dtype(np.bool_),
}


class _StEntry(NamedTuple):
  dtype: np.dtype
  shape: tuple[int, ...]
  offset: int  # absolute byte offset of the tensor data in the file
  nbytes: int


def _parse_safetensors_header(path: str) -> dict[str, _StEntry]:
  """Parses and validates a safetensors header without touching tensor data."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    prefix = f.read(8)
    if len(prefix) < 8:
      raise ValueError(f"{path}: not a safetensors file: only {size} bytes, "
                       "shorter than the 8-byte header-length prefix")
    (header_len,) = struct.unpack("<Q", prefix)
    if header_len > size - 8:
      raise ValueError(f"{path}: corrupt or truncated safetensors file: header "
                       f"length {header_len} exceeds the {size - 8} bytes after the prefix")
    raw = f.read(header_len)
  try:
    header = json.loads(raw)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: corrupt safetensors header (invalid JSON: {e})") from None
  if not isinstance(header, dict):
    raise ValueError(f"{path}: corrupt safetensors header: expected a JSON object")
  data_start = 8 + header_len
  data_len = size - data_start
  entries = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    try:
      code = info["dtype"]
      shape = tuple(int(d) for d in info["shape"])
      begin, end = (int(o) for o in info["data_offsets"])
    except (KeyError, TypeError, ValueError):
      raise ValueError(f"{path}: malformed header entry for tensor {name!r}: {info!r}") from None
    if code not in _ST_DTYPES:
      raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {code!r}; "
                       f"supported: {', '.join(_ST_DTYPES)}")
    dtype = _ST_DTYPES[code]
    expected = math.prod(shape) * dtype.itemsize
    if end - begin != expected:
      raise ValueError(f"{path}: tensor {name!r}: data_offsets [{begin}, {end}] cover "
                       f"{end - begin} bytes but shape {list(shape)} x {code} needs {expected}")
    if begin < 0 or end > data_len:
      raise ValueError(f"{path}: tensor {name!r}: data_offsets [{begin}, {end}] lie outside "
                       f"the {data_len}-byte data section (truncated file?)")
    entries[name] = _StEntry(dtype, shape, data_start + begin, expected)
  return entries


def _read_weight_map(index_path: str) -> dict[str, str]:
  """Reads a Hugging Face `*.index.json`; returns {tensor name: shard path}."""
  try:
    with open(index_path, encoding="utf-8") as f:
      index = json.load(f)
    weight_map = index["weight_map"]
    if not isinstance(weight_map, dict):
      raise TypeError("weight_map is not an object")
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ValueError(f"{index_path}: not a valid sharded-checkpoint index "
                     f"({type(e).__name__}: {e})") from None
  base = os.path.dirname(index_path)
  where = {str(k): os.path.join(base, str(v)) for k, v in weight_map.items()}
  first_key: dict[str, str] = {}  # shard -> one tensor it should hold
  for key, shard in sorted(where.items()):
    first_key.setdefault(shard, key)
  missing = {s: k for s, k in first_key.items() if not os.path.isfile(s)}
  if missing:
    listing = "; ".join(f"{s} (holds e.g. {k!r})" for s, k in missing.items())
    raise FileNotFoundError(f"{index_path}: shard file(s) listed in the index are "
                            f"missing: {listing}")
  return where


class SafetensorsSource(_IndexedSource):
  """One `.safetensors` file, or the shards named by a `*.safetensors.index.json`.

  Headers are parsed on first use of a shard; one file handle is kept open.
  """

  def __init__(self, path: str | os.PathLike, *, index: bool = False):
    self.path = os.fspath(path)
    self._headers: dict[str, dict[str, _StEntry]] = {}
    self._fh = None
    self._fh_path: str | None = None
    if index:
      self._index = _read_weight_map(self.path)  # name -> shard file
    else:
      self._headers[self.path] = _parse_safetensors_header(self.path)
      self._index = dict.fromkeys(self._headers[self.path], self.path)

  def _entry(self, key: str) -> tuple[str, _StEntry]:
    file = self._lookup(key)
    if file not in self._headers:
      self._headers[file] = _parse_safetensors_header(file)
    entry = self._headers[file].get(key)
    if entry is None:
      raise ValueError(f"{self.path}: index maps tensor {key!r} to shard {file}, "
                       "which does not contain it")
    return file, entry

  def shape(self, key: str) -> tuple[int, ...]:
    return self._entry(key)[1].shape

  def dtype(self, key: str) -> np.dtype:
    return self._entry(key)[1].dtype

  def read(self, key: str) -> np.ndarray:
    file, entry = self._entry(key)
    if self._fh_path != file:
      self._close_handle()
      self._fh, self._fh_path = open(file, "rb"), file
    out = np.empty(entry.shape, entry.dtype)
    self._fh.seek(entry.offset)
    got = self._fh.readinto(out.reshape(-1).view(np.uint8))
    if got != entry.nbytes:
      raise ValueError(f"{file}: tensor {key!r}: read {got} of {entry.nbytes} bytes "
                       "(file truncated?)")
    if sys.byteorder == "big" and entry.dtype.itemsize > 1:
      # The bytes are little-endian: swap ml_dtypes (always native-typed)
      # arrays, convert '<'-typed ones to native order.
      native = entry.dtype.isnative
      out = out.byteswap() if native else out.astype(entry.dtype.newbyteorder("="))
    return out

  def _close_handle(self) -> None:
    if self._fh is not None:
      self._fh.close()
    self._fh, self._fh_path = None, None

  def close(self) -> None:
    self._close_handle()


# ----------------------------------------------------------------------------
# PyTorch pickles


def _import_torch():
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("reading pytorch_model.bin checkpoints needs PyTorch; "
                      "install torch (e.g. `pip install torch`)") from e
  return torch


def _torch_to_numpy_dtype(torch, dtype) -> np.dtype | None:
  table = {
      torch.float64: np.float64, torch.float32: np.float32,
      torch.float16: np.float16, torch.bfloat16: ml_dtypes.bfloat16,
      torch.int64: np.int64, torch.int32: np.int32, torch.int16: np.int16,
      torch.int8: np.int8, torch.uint8: np.uint8, torch.bool: np.bool_,
  }
  found = table.get(dtype)
  return None if found is None else np.dtype(found)


class TorchBinSource(_IndexedSource):
  """A `pytorch_model.bin` state dict, or the shards of a `*.bin.index.json`.

  Files are memory-mapped by `torch.load(..., mmap=True)`; in the sharded case
  at most one shard is loaded at a time (shapes/dtypes of every shard seen so
  far are remembered, so metadata queries rarely reload).
  """

  def __init__(self, path: str | os.PathLike, *, index: bool = False):
    self._torch = _import_torch()
    self.path = os.fspath(path)
    self._meta: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    self._loaded_path: str | None = None
    self._loaded: dict[str, Any] = {}
    if index:
      self._index = _read_weight_map(self.path)  # name -> shard file
    else:
      self._load(self.path)
      self._index = dict.fromkeys(self._loaded, self.path)

  def _load(self, file: str) -> None:
    torch = self._torch
    self._loaded, self._loaded_path = {}, None  # drop the previous shard first
    try:
      state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
      if "mmap" not in str(e):
        raise
      # Pre-1.6 (non-zip) pickles cannot be memory-mapped.
      state = torch.load(file, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
      raise ValueError(f"{file}: expected a state dict (name -> tensor), got {type(state).__name__}")
    tensors = {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    for k, t in tensors.items():
      self._meta[k] = (tuple(t.shape), _torch_to_numpy_dtype(torch, t.dtype))
    self._loaded, self._loaded_path = tensors, file

  def _tensor_meta(self, key: str):
    file = self._lookup(key)
    if key not in self._meta:
      self._load(file)
      if key not in self._meta:
        raise ValueError(f"{self.path}: index maps tensor {key!r} to shard {file}, "
                         "which does not contain it")
    return file, self._meta[key]

  def shape(self, key: str) -> tuple[int, ...]:
    return self._tensor_meta(key)[1][0]

  def dtype(self, key: str) -> np.dtype:
    _, (_, dtype) = self._tensor_meta(key)
    if dtype is None:
      raise ValueError(f"{self.path}: tensor {key!r} has dtype "
                       f"{self._loaded_or_load(key).dtype}, which has no numpy equivalent here")
    return dtype

  def _loaded_or_load(self, key: str):
    file, _ = self._tensor_meta(key)
    if self._loaded_path != file:
      self._load(file)
    return self._loaded[key]

  def read(self, key: str) -> np.ndarray:
    torch = self._torch
    dtype = self.dtype(key)
    t = self._loaded_or_load(key).detach()
    if t.dtype == torch.bfloat16:
      # numpy has no native bfloat16: reinterpret the 16-bit patterns.
      arr = t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    else:
      arr = t.numpy()
    # Copy so the result does not alias the memory-mapped file.
    return np.array(arr, dtype=dtype, order="C", copy=True)

  def close(self) -> None:
    self._loaded, self._loaded_path = {}, None


# ----------------------------------------------------------------------------
# detection

_DIR_LAYOUTS = (
    ("model.safetensors.index.json", SafetensorsSource, True),
    ("model.safetensors", SafetensorsSource, False),
    ("pytorch_model.bin.index.json", TorchBinSource, True),
    ("pytorch_model.bin", TorchBinSource, False),
)

_LOOKED_FOR = (
    "model.safetensors.index.json, model.safetensors, pytorch_model.bin.index.json, "
    "pytorch_model.bin, a single *.safetensors(.index.json) file, a T5X checkpoint "
    "(msgpack `checkpoint` file, or an Orbax item with _METADATA / manifest.ocdbt, "
    "directly or under state/), or checkpoint_<step>/ subdirectories holding one"
)


def _open_file(path: str) -> TensorSource:
  name = os.path.basename(path)
  if name.endswith(".safetensors.index.json"):
    return SafetensorsSource(path, index=True)
  if name.endswith(".safetensors"):
    return SafetensorsSource(path)
  if name.endswith(".bin.index.json"):
    return TorchBinSource(path, index=True)
  if name.endswith((".bin", ".pt", ".pth")):
    return TorchBinSource(path)
  if name == "checkpoint":
    from pixelground.checkpoints import t5x  # pylint: disable=import-outside-toplevel
    return t5x.open_t5x(os.path.dirname(path) or ".")
  raise ValueError(f"cannot tell the checkpoint format of file {path}: expected "
                   "*.safetensors, *.safetensors.index.json, *.bin / *.pt / *.pth, "
                   "*.bin.index.json, or a T5X `checkpoint` msgpack file")


def open_source(path: str | os.PathLike) -> TensorSource:
  """Opens the checkpoint at `path` (file or directory), detecting its format.

  Raises:
    FileNotFoundError: `path` does not exist, a directory holds no known
      checkpoint layout, or an index names a shard file that is missing.
    ValueError: the file's format is unknown or its contents are corrupt.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint path {path} does not exist")
  if os.path.isfile(path):
    return _open_file(path)
  for name, cls, index in _DIR_LAYOUTS:
    candidate = os.path.join(path, name)
    if os.path.isfile(candidate):
      return cls(candidate, index=index)
  from pixelground.checkpoints import t5x  # pylint: disable=import-outside-toplevel
  if t5x.find_t5x_checkpoint(path) is not None:
    return t5x.open_t5x(path)
  for pattern, index in (("*.safetensors.index.json", True), ("*.safetensors", False)):
    found = glob.glob(os.path.join(glob.escape(path), pattern))
    if len(found) == 1:
      return SafetensorsSource(found[0], index=index)
  raise FileNotFoundError(f"no checkpoint found in directory {path}; looked for: {_LOOKED_FOR}")
