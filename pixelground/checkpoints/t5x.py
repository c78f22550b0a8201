"""T5X checkpoints: a `TensorSource` reader and a writer, for both layouts.

Keys are '/'-joined parameter paths under the `target` tree, e.g.
`target/encoder/layers_0/attention/query/kernel` ([d_model, heads*d_kv]),
`target/token_embedder/embedding` ([vocab, d_model]),
`target/decoder/logits_dense/kernel` ([d_model, vocab]),
`target/encoder/relpos_bias/rel_embedding` ([heads, buckets]); f32 or bf16.
Optimizer state (`state/...`) is not exposed.

Layout A, legacy T5X (`t5x.checkpoints.Checkpointer`):
  checkpoint_<step>/checkpoint   msgpack (`flax.serialization.to_bytes`) of
      {"version": 3, "optimizer": {"target": {...params...},
                                   "state": {"step": int32, "param_states": {...}}}}
  checkpoint_<step>/target.encoder.layers_0.attention.query.kernel/  zarr v2 array
  checkpoint_<step>/state.param_states.<...>/    optimizer slots, same scheme
  checkpoint_<step>/train_ds-*                   dataset iterator (ignored)
  The tree is `train_state.state_dict()`. A leaf is either an array stored
  inline (flax msgpack ndarray/scalar ext types; T5X does this for leaves with
  no partitioning axes, e.g. `step`) or the JSON (`ts.Spec.to_json()`) of the
  TensorStore it was written to:
    {"driver": "zarr", "dtype": "float32",
     "kvstore": {"driver": "file", "path": "target.encoder.layers_0.attention.query.kernel"},
     "metadata": {"shape": [...], "chunks": [...], "compressor": {"id": "gzip"}}}
  The path is the leaf's state-dict path with '/' -> '.', relative to the
  checkpoint directory and joined with it on read (checkpoints relocate).
  GCS-written specs say driver "gcs" (bucket "t5x-dummy-bucket"); like T5X we
  read them as local files. tensorstore<0.1.14 put the path at the spec's top
  level. Version 3 stores bfloat16 natively; version 0 is a plain Flax
  checkpoint with the tree at the top level instead of under "optimizer".

Layout B, Orbax (T5X `OrbaxCheckpointManagerInterface`):
  checkpoint_<step>/state/   `orbax.checkpoint.PyTreeCheckpointHandler` item of
      the same {"target", "state"} tree: `_METADATA` (JSON tree metadata) plus
      OCDBT data (`manifest.ocdbt`, `ocdbt.process_<i>/`, `d/`) or, as T5X
      saved it (use_ocdbt=False), one zarr dir per '.'-joined leaf path.
  checkpoint_<step>/_CHECKPOINT_METADATA, dataset/ (ignored)

Verified in google-research/t5x `t5x/checkpoints.py`: VERSION = 3; `_get_spec`
builds the spec above with `name.replace('/', '.')`; `save` writes
`to_bytes({'version': VERSION, 'optimizer': state})` to `<dir>/checkpoint`;
`register_ts_spec_for_serialization` stores `ts.Spec.to_json()`;
`_update_ts_path_from_relative_to_absolute` joins the checkpoint dir; `_read_ts`
drops metadata.chunks/compressor before opening; the Orbax manager uses
`_STATE_KEY = 'state'`, `step_prefix='checkpoint'`. Also `t5x/train_state.py`
(`state_dict()`), tensorstore 0.1.86 (`to_json()` adds a trailing '/' to the
kvstore path and `"level": 1` to gzip) and the installed orbax 0.12.8
(`PyTreeCheckpointer` defaults to OCDBT; `metadata(dir).item_metadata.tree`
has Array/ScalarMetadata leaves; `partial_restore=True` reads only `item`).
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Mapping
from typing import Any, Literal

import ml_dtypes
import numpy as np

from pixelground.checkpoints.sources import TensorSource, _IndexedSource

__all__ = ["LegacyT5XSource", "OrbaxT5XSource", "find_t5x_checkpoint", "open_t5x",
           "save_t5x_checkpoint"]

_VERSION = 3
_CHUNK_BYTES = 64 * 1024 * 1024  # T5X's target zarr chunk size
_ORBAX_MARKERS = ("_METADATA", "manifest.ocdbt")


def _np_dtype(name: str) -> np.dtype:
  return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def _flatten(node: Mapping, prefix: str, out: dict, is_leaf=lambda v: False) -> dict:
  """{'a': {'b': x}} -> {'<prefix>/a/b': x}; `is_leaf` stops at dict-valued leaves."""
  for k, v in node.items():
    if isinstance(v, Mapping) and not is_leaf(v):
      _flatten(v, f"{prefix}/{k}", out, is_leaf)
    elif v is not None:
      out[f"{prefix}/{k}"] = v
  return out


def find_t5x_checkpoint(path: str) -> tuple[str, str] | None:
  """Returns ("legacy", ckpt_dir) or ("orbax", item_dir) for a T5X dir, else None.

  `path` may be a step directory, an Orbax `state/` item, or a model directory
  holding `checkpoint_<step>/` subdirectories (the highest step is used).
  """
  if any(os.path.isfile(os.path.join(path, m)) for m in _ORBAX_MARKERS):
    return "orbax", path
  state = os.path.join(path, "state")
  # Early Orbax items kept the tree in an aggregate msgpack `checkpoint` file.
  if any(os.path.isfile(os.path.join(state, m)) for m in _ORBAX_MARKERS + ("checkpoint",)):
    return "orbax", state
  if os.path.isfile(os.path.join(path, "checkpoint")):
    return "legacy", path
  steps = [n for n in os.listdir(path) if re.fullmatch(r"checkpoint_\d+", n)
           and os.path.isdir(os.path.join(path, n))]
  for name in sorted(steps, key=lambda n: int(n[len("checkpoint_"):]), reverse=True):
    if (found := find_t5x_checkpoint(os.path.join(path, name))) is not None:
      return found
  return None


def open_t5x(path: str | os.PathLike) -> TensorSource:
  """Opens a T5X checkpoint directory of either layout (see module docstring)."""
  path = os.fspath(path)
  if (found := find_t5x_checkpoint(path)) is None:
    raise FileNotFoundError(
        f"no T5X checkpoint in {path}: looked for a msgpack `checkpoint` file, Orbax "
        f"{'/'.join(_ORBAX_MARKERS)} (directly or under state/), and checkpoint_<step>/ dirs")
  layout, where = found
  return LegacyT5XSource(where) if layout == "legacy" else OrbaxT5XSource(where)


class LegacyT5XSource(_IndexedSource):
  """Layout A: msgpack `checkpoint` file plus one zarr TensorStore per array."""

  def __init__(self, ckpt_dir: str):
    from flax import serialization  # pylint: disable=import-outside-toplevel
    self.path = ckpt_dir
    file = os.path.join(ckpt_dir, "checkpoint")
    with open(file, "rb") as f:
      raw = f.read()
    try:
      contents = dict(serialization.msgpack_restore(raw))
    except Exception as e:  # msgpack raises several unrelated types
      raise ValueError(f"{file}: not a valid msgpack T5X checkpoint ({e})") from None
    tree = contents.get("optimizer") if contents.get("version", 0) else contents
    target = tree.get("target") if isinstance(tree, Mapping) else None
    if not isinstance(target, Mapping):
      raise ValueError(f"{file}: no `optimizer/target` parameter tree in the msgpack map")
    leaves = _flatten(target, "target", {}, lambda v: "driver" in v and "metadata" in v)
    # key -> ts.Spec JSON, or an inline array / numpy scalar
    self._index = {k: v if isinstance(v, Mapping) else np.asarray(v) for k, v in leaves.items()}

  def shape(self, key: str) -> tuple[int, ...]:
    leaf = self._lookup(key)
    return leaf.shape if isinstance(leaf, np.ndarray) else tuple(leaf["metadata"]["shape"])

  def dtype(self, key: str) -> np.dtype:
    leaf = self._lookup(key)
    if isinstance(leaf, np.ndarray):
      return leaf.dtype
    return _np_dtype(leaf.get("dtype") or leaf["metadata"]["dtype"])

  def read(self, key: str) -> np.ndarray:
    import tensorstore as ts  # pylint: disable=import-outside-toplevel
    leaf = self._lookup(key)
    if isinstance(leaf, np.ndarray):
      return leaf.copy()
    spec = copy.deepcopy(leaf)
    # Open whatever chunking/compression is on disk, as T5X does.
    spec["metadata"].pop("chunks", None)
    spec["metadata"].pop("compressor", None)
    kv = spec.get("kvstore")
    if isinstance(kv, dict) and kv.get("driver") in ("gcs", "gfile"):
      kv = spec["kvstore"] = {"driver": "file", "path": kv.get("path", "")}
    holder = kv if isinstance(kv, dict) and "path" in kv else spec
    holder["path"] = os.path.join(os.path.abspath(self.path), holder["path"])
    try:
      return np.asarray(ts.open(spec).result().read().result(), dtype=self.dtype(key))
    except ValueError as e:  # tensorstore's errors do not say which tensor
      raise ValueError(f"{self.path}: reading {key!r} from {holder['path']}: {e}") from e


class OrbaxT5XSource(_IndexedSource):
  """Layout B: an Orbax PyTree item (OCDBT or per-leaf zarr), read leaf by leaf."""

  def __init__(self, item_dir: str):
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
    self._ocp = ocp
    self.path = os.path.abspath(item_dir)
    self._ckptr = ocp.PyTreeCheckpointer()
    meta = self._ckptr.metadata(self.path).item_metadata
    tree = getattr(meta, "tree", meta)
    if not isinstance(tree, Mapping) or not isinstance(tree.get("target"), Mapping):
      raise ValueError(f"{self.path}: no readable Orbax tree metadata with a `target` tree")
    self._index = _flatten(tree["target"], "target", {})  # key -> Array/ScalarMetadata
    for key, meta in self._index.items():
      if not (hasattr(meta, "shape") and hasattr(meta, "dtype")):
        raise ValueError(f"{self.path}: leaf {key} is not an array ({meta!r}); T5X "
                         "parameter trees are nested dicts of arrays")

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(int(d) for d in self._lookup(key).shape)

  def dtype(self, key: str) -> np.dtype:
    return np.dtype(self._lookup(key).dtype)

  def read(self, key: str) -> np.ndarray:
    ocp, dtype = self._ocp, self.dtype(key)
    # partial_restore reads only the leaves named in `item` (0 is a placeholder).
    args = ocp.args.PyTreeRestore(
        item=_nest({key: 0}), partial_restore=True,
        restore_args=_nest({key: ocp.RestoreArgs(restore_type=np.ndarray)}))
    restored = self._ckptr.restore(self.path, args=args)
    for p in key.split("/"):
      restored = restored[p]
    return np.asarray(restored, dtype=dtype)

  def close(self) -> None:
    self._ckptr.close()


def _nest(flat: Mapping[str, Any]) -> dict:
  """{'a/b': x} -> {'a': {'b': x}}, rejecting empty names and leaf/subtree clashes."""
  tree: dict = {}
  for key in sorted(flat):  # a leaf sorts before the paths it would prefix
    parts = key.split("/")
    if not all(parts):
      raise ValueError(f"bad parameter path {key!r}: empty name between '/'s")
    node = tree
    for p in parts[:-1]:
      node = node.setdefault(p, {})
      if not isinstance(node, dict):
        raise ValueError(f"parameter path {key!r} runs through leaf {p!r}")
    node[parts[-1]] = flat[key]
  return tree


def _chunk_shape(shape: tuple[int, ...], itemsize: int) -> list[int]:
  """Chunks of at most _CHUNK_BYTES that tile `shape` exactly (zarr needs >= 1)."""
  chunks = [max(int(d), 1) for d in shape]
  while np.prod(chunks, dtype=np.int64) * itemsize > _CHUNK_BYTES:
    axis = int(np.argmax(chunks))
    size = chunks[axis]
    chunks[axis] = next(size // f for f in range(2, size + 1) if size % f == 0)
  return chunks


def _write_legacy(directory: str, arrays: dict[str, np.ndarray], step: int,
                  inline_below_bytes: int) -> None:
  import tensorstore as ts  # pylint: disable=import-outside-toplevel
  from flax import serialization  # pylint: disable=import-outside-toplevel
  file = os.path.join(directory, "checkpoint")
  if os.path.exists(file):
    raise FileExistsError(f"{file} already exists; refusing to overwrite a checkpoint")
  os.makedirs(directory, exist_ok=True)
  written: dict[str, Any] = {}  # key -> inline array or ts.Spec JSON
  for key, v in arrays.items():
    if v.nbytes < inline_below_bytes:
      written[key] = v
      continue
    rel = "target." + key.replace("/", ".")
    spec = {"driver": "zarr", "dtype": v.dtype.name, "kvstore": {"driver": "file", "path": rel},
            "metadata": {"compressor": {"id": "gzip"}, "shape": list(v.shape),
                         "chunks": _chunk_shape(v.shape, v.dtype.itemsize)}}
    on_disk = copy.deepcopy(spec)
    on_disk["kvstore"]["path"] = os.path.join(os.path.abspath(directory), rel)
    ts.open(on_disk, create=True, open=True).result().write(v).result()
    written[key] = ts.Spec(spec).to_json()  # relative path, as T5X stores it
  contents = {"version": _VERSION,
              "optimizer": {"target": _nest(written),
                            "state": {"step": np.int32(step), "param_states": {}}}}
  tmp = file + ".tmp"
  with open(tmp, "wb") as f:
    f.write(serialization.msgpack_serialize(contents))
  os.replace(tmp, file)  # the msgpack file appears only once all arrays exist


def save_t5x_checkpoint(directory: str | os.PathLike, target: Mapping[str, np.ndarray], *,
                        step: int = 0, layout: Literal["legacy", "orbax"] = "legacy",
                        inline_below_bytes: int = 0) -> None:
  """Writes `target` as a T5X checkpoint in step directory `directory`.

  `target` maps '/'-joined paths WITHOUT the leading 'target/' (e.g.
  'encoder/layers_0/attention/query/kernel') to arrays of any shape/dtype
  (bf16 as ml_dtypes.bfloat16). `step` becomes the int32 `state/step` leaf;
  optimizer slots are left empty. `layout` is "legacy" (msgpack + zarr) or
  "orbax" (OCDBT item in `directory/state`). Legacy only: arrays under
  `inline_below_bytes` go inside the msgpack file. Never overwrites.
  """
  directory = os.fspath(directory)
  if layout not in ("legacy", "orbax"):
    raise ValueError(f"layout must be 'legacy' or 'orbax', got {layout!r}")
  if any(k.split("/")[0] == "target" for k in target):
    raise ValueError("parameter paths must not start with 'target/' (it is added)")
  arrays = {k: np.asarray(v) for k, v in target.items()}
  tree = _nest(arrays)  # validates every path before anything is written
  if layout == "legacy":
    return _write_legacy(directory, arrays, step, inline_below_bytes)
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  item_dir = os.path.abspath(os.path.join(directory, "state"))
  if os.path.exists(item_dir):
    raise FileExistsError(f"{item_dir} already exists; refusing to overwrite a checkpoint")
  os.makedirs(directory, exist_ok=True)
  ckptr = ocp.PyTreeCheckpointer()
  ckptr.save(item_dir, {"target": tree,
                        "state": {"step": np.asarray(step, np.int32), "param_states": {}}})
  ckptr.close()
