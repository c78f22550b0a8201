"""Orbax checkpoints of a training run: the sharded train state with each input shard's pipeline state,
and finding / restoring a run's checkpoint for evaluation and export."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import typing as tp

import jax

from pixelground.training.train_state import Setup

class ShardStateHandler:
  """Orbax handler for the input-pipeline state, stored per *input shard* (`pipeline.ShardGroup`), not
  per process: each process writes its own shards' files, and a restore on another process count reads
  the shards it now owns. (Grain's handler keys files by process.)"""

  def save(self, directory, item=None, args=None):
    item = item or args.item
    for s, st in item.shard_states().items():
      (directory / f"shard_{s}-of-{item.num_shards}.json").write_text(json.dumps(st))

  def restore(self, directory, item=None, args=None):
    item = item or args.item
    states = {}
    for s in item.shards:
      f = directory / f"shard_{s}-of-{item.num_shards}.json"
      if not f.exists():
        raise FileNotFoundError(f"{f}: no input-pipeline state for shard {s} of {item.num_shards} "
                                f"(was config.data.num_shards changed?)")
      states[s] = json.loads(f.read_text())
    item.load_shard_states(states)
    item.start_prefetch()
    return item

  def structure(self, directory):
    return None

  def metadata(self, directory):
    return None

  def finalize(self, directory):
    pass

  def close(self):
    pass

  @classmethod
  def typestr(cls):
    return f"{cls.__module__}.{cls.__qualname__}"


@functools.lru_cache(maxsize=None)
def _shard_state_args():
  """The save/restore args classes of ShardStateHandler, registered once per process: Orbax resolves a
  handler's args class from a global registry that keeps the FIRST registration, so classes made anew
  for every Checkpointer would not match in a process that opens a second one."""
  import orbax.checkpoint as ocp

  @ocp.args.register_with_handler(ShardStateHandler, for_save=True)
  @dataclasses.dataclass
  class ShardStateSave(ocp.args.CheckpointArgs):
    item: tp.Any

  @ocp.args.register_with_handler(ShardStateHandler, for_restore=True)
  @dataclasses.dataclass
  class ShardStateRestore(ocp.args.CheckpointArgs):
    item: tp.Any

  return ShardStateSave, ShardStateRestore


class Checkpointer:
  """Orbax CheckpointManager over {state (sharded arrays), data (each process's Grain iterator state)}.

  Async saves (the loop decides when), keeps the newest `keep`. Restoring
  places every array by the *current* setup's shardings, so a run may resume on another mesh shape."""

  def __init__(self, directory: str, *, keep: int, async_save: bool = True):
    import orbax.checkpoint as ocp

    self.ocp = ocp
    opts = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                        create=True)
    handlers = {"state": ocp.StandardCheckpointHandler(),
                "data": ShardStateHandler()}
    self.save_args, self.restore_args = _shard_state_args()
    self.manager = ocp.CheckpointManager(os.path.abspath(directory), options=opts,
                                         item_handlers=handlers)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iter, *, force: bool = False) -> bool:
    args = self.ocp.args.Composite(state=self.ocp.args.StandardSave(state), data=self.save_args(data_iter))
    return self.manager.save(step, args=args, force=force)

  def restore(self, step: int, setup: Setup, data_iter):
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          setup.abstract_state, setup.state_shardings)
    args = self.ocp.args.Composite(state=self.ocp.args.StandardRestore(target),
                                   data=self.restore_args(data_iter))
    out = self.manager.restore(step, args=args)
    return out["state"], out["data"]

  def restore_state(self, step: int, setup: Setup):
    """The train state alone (evaluation, export): no input-pipeline state needed."""
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          setup.abstract_state, setup.state_shardings)
    out = self.manager.restore(step, args=self.ocp.args.Composite(state=self.ocp.args.StandardRestore(target)))
    return out["state"]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


def find_checkpoint(path: str, *, where: str = "--checkpoint") -> tuple[str, int]:
  """A training workdir, its checkpoints/ directory, or one step directory (checkpoints/1200) →
  (checkpoints directory, step) — the newest step unless a step directory was given. `where` names
  the flag or config key in errors."""
  path = os.path.abspath(os.path.expanduser(path.rstrip("/")))
  if not os.path.exists(path):
    raise FileNotFoundError(f"{where}: {path} does not exist.")
  if os.path.basename(path).isdigit() and os.path.isdir(os.path.join(path, "state")):
    return os.path.dirname(path), int(os.path.basename(path))
  root = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
  steps = [int(d) for d in os.listdir(root) if d.isdigit() and os.path.isdir(os.path.join(root, d, "state"))]
  if not steps:
    raise FileNotFoundError(f"{where}: no finished checkpoint under {root} (expected step "
                            "directories such as checkpoints/1200/state).")
  return root, max(steps)


def load_state(setup: Setup, path: str):
  """(state, step) restored from `path` (see `find_checkpoint`) onto `setup`'s mesh."""
  root, step = find_checkpoint(path)
  ckpt = Checkpointer(root, keep=1 << 30, async_save=False)
  try:
    return ckpt.restore_state(step, setup), step
  finally:
    ckpt.close()
