"""Streams checkpoint tensors into an NNX model's parameters, one tensor at a time, straight into each
parameter's target sharding.

A model-specific *mapping* says, for every parameter path, which source tensors make it and how
(transpose / reshape / stack layers). The loader:
  1. builds the model abstractly (`nnx.eval_shape`: nothing allocated) and computes each parameter's
     sharding from its logical axes and the rules table;
  2. for each mapped parameter, reads its source tensor(s) on the host, converts them to the parameter's
     layout and dtype, and places them with `jax.make_array_from_callback` (each device gets only its
     shard; only one parameter's host copy is alive at a time);
  3. initialises unmapped parameters (e.g. LoRA factors) with the model's own initialisers under `jax.jit`
     (XLA drops the unused base-weight initialisers);
  4. fails with the offending key named on a missing source key, a shape mismatch, or (strict) a source
     key that nothing consumed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import logging
import time
import typing as tp

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from pixelground.parallel import sharding as sharding_lib
from pixelground.checkpoints.sources import TensorSource

Path = tuple[str | int, ...]


class CheckpointError(ValueError):
  """A checkpoint does not fit the model: missing/unexpected key or shape mismatch (named)."""


@dataclasses.dataclass(frozen=True)
class FromSource:
  """How to build one parameter: read `keys` and combine them with `convert` (list of arrays → array)."""
  keys: tuple[str, ...]
  convert: tp.Callable[[list[np.ndarray]], np.ndarray]


Mapping = tp.Callable[[Path, nnx.Variable], FromSource | None]  # None: keep the model's initialiser.


def path_str(path: Path) -> str:
  return ".".join(str(p) for p in path)


def _key_entry(k) -> str | int:
  for attr in ("key", "idx", "name"):
    if hasattr(k, attr):
      return getattr(k, attr)
  return str(k)


def flatten_state(state) -> tuple[list[tuple[Path, nnx.Variable]], tp.Any]:
  """(path, Variable) pairs of an NNX state in tree order, and the treedef to rebuild it."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(
      state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return [(tuple(_key_entry(k) for k in path), v) for path, v in leaves], treedef


def load_model(make_model: tp.Callable[[], nnx.Module], source: TensorSource, mapping: Mapping, *,
               mesh: Mesh | None = None, rules: sharding_lib.Rules = sharding_lib.DEFAULT_RULES,
               ignore_unused: tp.Callable[[str], bool] = lambda key: False,
               strict: bool = True, report: dict | None = None) -> nnx.Module:
  """Builds `make_model()` with parameters read from `source` through `mapping`.

  Args:
    make_model: creates the model (with its own Rngs); traced abstractly, never run in full.
    source: an open checkpoint (see `pixelground.checkpoints.sources.open_source`).
    mapping: parameter path → `FromSource` (or None to use the model's initialiser, e.g. LoRA).
    mesh/rules: target placement; without a mesh everything goes to the first device.
    ignore_unused: source keys that may legitimately stay unused (e.g. aliases of tied embeddings).
    strict: raise on source keys nothing consumed.
    report: if given, filled with what happened: "file" (the source path), "keys" (every source key),
      "loaded" {parameter path: its source keys}, "initialised" [parameter paths the model's initialisers
      made], "unused" [source keys nothing consumed, ignored ones included].
  """
  abstract = nnx.eval_shape(make_model)
  graphdef, abs_state = nnx.split(abstract)
  if mesh is not None:
    shardings = sharding_lib.state_shardings(abs_state, mesh, rules)
  else:
    device = SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda v: v.replace(device), abs_state,
                             is_leaf=lambda x: isinstance(x, nnx.Variable))
  flat, treedef = flatten_state(abs_state)
  flat_shardings = [s for _, s in flatten_state(shardings)[0]]
  plans = [mapping(path, var) for path, var in flat]

  # Fail fast on key and shape problems before reading any data.
  available = set(source.keys())
  for (path, var), plan in zip(flat, plans):
    if plan is None:
      continue
    for key in plan.keys:
      if key not in available:
        raise CheckpointError(f"{source.path}: missing key '{key}' (needed for parameter "
                              f"'{path_str(path)}' of shape {tuple(var.shape)}).")
  used = {k for plan in plans if plan is not None for k in plan.keys}
  if report is not None:
    report.update(file=str(source.path), keys=sorted(available), unused=sorted(available - used),
                  loaded={path_str(p): plan.keys for (p, _), plan in zip(flat, plans) if plan is not None},
                  initialised=[path_str(p) for (p, _), plan in zip(flat, plans) if plan is None])
  unused = sorted(k for k in available - used if not ignore_unused(k))
  if unused and strict:
    raise CheckpointError(f"{source.path}: unexpected key '{unused[0]}' "
                          f"({len(unused)} unused in total: {unused[:8]}).")

  # Parameters the checkpoint does not hold: the model's own initialisers, already sharded.
  init_paths = {path for (path, _), plan in zip(flat, plans) if plan is None}
  init_values = {}
  if init_paths:
    init_shardings = [s.get_value() if isinstance(s, nnx.Variable) else s
                      for (path, _), s in zip(flat, flat_shardings) if path in init_paths]

    def init_fn():
      leaves, _ = flatten_state(nnx.state(make_model()))
      return [v.get_value() for p, v in leaves if p in init_paths]

    ctx = jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()
    with ctx:
      values = jax.jit(init_fn, out_shardings=init_shardings)()
    init_values = dict(zip([p for p, _ in flat if p in init_paths], values))

  start, leaves = time.time(), []
  n_loaded = 0
  for i, ((path, var), plan, shard) in enumerate(zip(flat, plans, flat_shardings)):
    shard = shard.get_value() if isinstance(shard, nnx.Variable) else shard
    if plan is None:
      leaves.append(var.replace(init_values[path]))
      continue
    keys = f"'{plan.keys[0]}'" + (f" (+{len(plan.keys) - 1} more)" if len(plan.keys) > 1 else "")
    try:
      host = np.asarray(plan.convert([source.read(k) for k in plan.keys]))
    except ValueError as e:  # e.g. a reshape that the checkpoint's tensor cannot fit
      raise CheckpointError(
          f"{source.path}: shape mismatch for {keys}: checkpoint shape {source.shape(plan.keys[0])} "
          f"cannot become parameter '{path_str(path)}' of shape {tuple(var.shape)} ({e}).") from e
    if tuple(host.shape) != tuple(var.shape):
      raise CheckpointError(
          f"{source.path}: shape mismatch for {keys} → parameter '{path_str(path)}': checkpoint gives "
          f"{tuple(host.shape)} after conversion, model expects {tuple(var.shape)}.")
    host = host.astype(var.dtype)
    array = jax.make_array_from_callback(host.shape, shard, lambda idx, h=host: h[idx])
    leaves.append(var.replace(array))
    del host
    n_loaded += 1
    if n_loaded % 50 == 0:
      logging.info("loaded %d/%d tensors (%.1fs)", n_loaded, len(flat), time.time() - start)
  logging.info("loaded %d tensors from %s in %.1fs (%d initialised by the model)", n_loaded,
               source.path, time.time() - start, len(init_paths))
  state = jax.tree_util.tree_unflatten(treedef, leaves)
  return nnx.merge(graphdef, state)


def read_hf_config(path: str | os.PathLike, model: str) -> dict[str, tp.Any]:
  """The `config.json` beside a Hugging Face checkpoint file or in its directory."""
  path = os.fspath(path)
  cfg_path = os.path.join(path if os.path.isdir(path) else os.path.dirname(path), "config.json")
  if not os.path.exists(cfg_path):
    raise FileNotFoundError(f"{cfg_path} not found: pass a {model} config or a Hugging Face directory "
                            "with config.json.")
  with open(cfg_path) as f:
    return json.load(f)


# ----------------------------------------------------------------------------------------------------
# Small converters shared by model mappings
# ----------------------------------------------------------------------------------------------------

def single(fn: tp.Callable[[np.ndarray], np.ndarray] = lambda a: a):
  """Converter for one source tensor."""
  return lambda arrays: fn(arrays[0])


def stacked(fn: tp.Callable[[np.ndarray], np.ndarray] = lambda a: a):
  """Converter for per-layer tensors stacked on a new leading `layers` axis (scanned models)."""
  return lambda arrays: np.stack([fn(a) for a in arrays])
