"""Orbax checkpoints of a training run: the sharded train state with each input shard's pipeline state,
and finding / restoring a run's checkpoint for evaluation and export."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import sys
import time
import typing as tp
import zlib

import jax
from absl import logging

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


SEAL = "pixelground_files.json"
_CRC_LIMIT = 1 << 20  # files up to 1 MiB (metadata, manifests, input-pipeline states) get a CRC32 too


class CheckpointSaveError(RuntimeError):
  """A checkpoint could not be written; the earlier checkpoints are untouched."""


class CheckpointRestoreError(RuntimeError):
  """No checkpoint of a run could be restored."""


def _files(step_dir: str) -> dict[str, int]:
  out = {}
  for d, _, names in os.walk(step_dir):
    for n in names:
      f = os.path.join(d, n)
      rel = os.path.relpath(f, step_dir)
      if rel != SEAL:
        out[rel] = os.path.getsize(f)
  return out


def _crc(path: str) -> int:
  with open(path, "rb") as f:
    return zlib.crc32(f.read())


def seal(step_dir: str) -> None:
  """Writes `step_dir`/SEAL: every file of a finished checkpoint with its size (and the CRC32 of the
  small ones), so a later restore can tell a truncated, missing or altered file before reading it.
  Written by the primary process right after the save finished (atomically: a temp file renamed)."""
  files = {rel: [n, _crc(os.path.join(step_dir, rel)) if n <= _CRC_LIMIT else None]
           for rel, n in sorted(_files(step_dir).items())}
  tmp = os.path.join(step_dir, SEAL + ".tmp")
  with open(tmp, "w") as f:
    json.dump({"files": files}, f)
  os.replace(tmp, os.path.join(step_dir, SEAL))


def damage(step_dir: str) -> str | None:
  """What is wrong with a checkpoint directory against its seal (None: nothing found; an unsealed
  checkpoint — its run was killed right after saving it — is checked by restoring it)."""
  path = os.path.join(step_dir, SEAL)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      files = json.load(f)["files"]
  except (OSError, ValueError, KeyError) as e:
    return f"its {SEAL} is unreadable ({e})"
  found = _files(step_dir)
  for rel, (size, crc) in files.items():
    if rel not in found:
      return f"file {rel} is missing"
    if found[rel] != size:
      return f"file {rel} has {found[rel]} bytes, {size} when saved (truncated or overwritten)"
    if crc is not None and _crc(os.path.join(step_dir, rel)) != crc:
      return f"file {rel} changed since it was saved (checksum differs)"
  return None


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0][:300] if text else ''}"


class Checkpointer:
  """Orbax CheckpointManager over {state (sharded arrays), data (each input shard's pipeline state)}.

  Saves are asynchronous (the loop decides when); restoring places every array by the *current*
  setup's shardings, so a run may resume on another mesh shape. Faults (docs/faults.md):
  - each finished checkpoint is sealed (`seal`); `restore_latest` skips a newest checkpoint that is
    damaged (seal mismatch, or its restore fails), warning with its path and what is wrong, falls back
    to the previous one and moves the damaged ones to `<directory>.damaged/`;
  - a failed save raises `CheckpointSaveError` (at the next save or `wait`) and leaves the earlier
    checkpoints as they were;
  - retention keeps the newest `keep` *sealed* checkpoints and never deletes a checkpoint newer than
    the oldest of them, so the last good one survives any number of failed or unfinished saves.
  """

  def __init__(self, directory: str, *, keep: int, async_save: bool = True, read_only: bool = False):
    import orbax.checkpoint as ocp

    if keep < 1:
      raise ValueError(f"config.checkpoint_keep={keep}: must be ≥ 1.")
    self.ocp, self.keep, self.directory = ocp, keep, os.path.abspath(directory)
    self.primary = jax.process_index() == 0
    # Read-only (evaluation beside a running job): no directory creation, no cleanup of the trainer's
    # save in progress. (Not Orbax's own read_only option: it prints warnings on every open.)
    opts = ocp.CheckpointManagerOptions(max_to_keep=None, enable_async_checkpointing=async_save,
                                        create=not read_only, cleanup_tmp_directories=not read_only)
    self.read_only = read_only
    handlers = {"state": ocp.StandardCheckpointHandler(), "data": ShardStateHandler()}
    self.save_args, self.restore_args = _shard_state_args()
    self.manager = ocp.CheckpointManager(self.directory, options=opts, item_handlers=handlers)
    self.pending: int | None = None
    self.last_sealed: int | None = None  # the newest checkpoint this process saw finished and sealed

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def good_step(self) -> int | None:
    """The newest sealed checkpoint (the one a failed save leaves behind)."""
    sealed = [s for s in self.manager.all_steps() if os.path.exists(os.path.join(self.step_dir(s), SEAL))]
    return max(sealed, default=None)

  def save(self, step: int, state, data_iter, *, force: bool = False) -> bool:
    """Starts saving `step` (after finishing the previous save: `CheckpointSaveError` if it failed)."""
    if self.read_only:
      raise ValueError(f"{self.directory}: this Checkpointer was opened read-only.")
    self.finish()
    # Orbax's async save waits forever when it cannot create its directory: try a write first.
    probe = os.path.join(self.directory, f".write_probe.{jax.process_index()}")
    try:
      with open(probe, "w") as f:
        f.write(str(step))
      os.remove(probe)
    except OSError as e:
      raise self._save_error(step, e) from e
    args = self.ocp.args.Composite(state=self.ocp.args.StandardSave(state), data=self.save_args(data_iter))
    try:
      with jax.transfer_guard("allow"):
        saved = self.manager.save(step, args=args, force=force)
    except Exception as e:  # noqa: BLE001 — re-raised with the step and what is intact
      raise self._save_error(step, e) from e
    self.pending = step if saved else None
    return saved

  def _save_error(self, step: int, e: BaseException) -> CheckpointSaveError:
    good = self.last_sealed if self.last_sealed is not None else self.good_step()
    kept = f"the checkpoint of step {good} is intact" if good is not None else "no earlier checkpoint"
    return CheckpointSaveError(f"saving the checkpoint of step {step} to {self.step_dir(step)} failed "
                               f"({_first_line(e)}); {kept}. Free space or fix the directory's "
                               f"permissions, then run the same command again to resume.")

  def finish(self) -> None:
    """Waits for the save in flight, raises `CheckpointSaveError` if it failed, seals it and applies
    the retention policy."""
    if self.pending is None:
      return
    step, self.pending = self.pending, None
    try:
      self.manager.wait_until_finished()
      self.manager.check_for_errors()
    except Exception as e:  # noqa: BLE001
      raise self._save_error(step, e) from e
    self.manager.reload()
    if step not in self.manager.all_steps():
      raise self._save_error(step, RuntimeError("the step directory was not finalised"))
    if self.primary:
      seal(self.step_dir(step))
      self._retain()
    self.last_sealed = step
    self._sync("retain")
    self.manager.reload()

  def _retain(self) -> None:
    steps = sorted(self.manager.all_steps())
    sealed = [s for s in steps if os.path.exists(os.path.join(self.step_dir(s), SEAL))]
    if len(sealed) <= self.keep:
      return
    oldest_kept = sealed[-self.keep]
    for s in steps:
      if s < oldest_kept:
        shutil.rmtree(self.step_dir(s), ignore_errors=True)
        logging.info("checkpoint retention: deleted %s", self.step_dir(s))

  def _sync(self, name: str) -> None:
    from pixelground.parallel import runtime
    runtime.barrier(f"pixelground_checkpoint_{name}")

  def _target(self, setup: Setup):
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        setup.abstract_state, setup.state_shardings)

  def restore(self, step: int, setup: Setup, data_iter):
    args = self.ocp.args.Composite(state=self.ocp.args.StandardRestore(self._target(setup)),
                                   data=self.restore_args(data_iter))
    with jax.transfer_guard("allow"):
      out = self.manager.restore(step, args=args)
    return out["state"], out["data"]

  def restore_state(self, step: int, setup: Setup):
    """The train state alone (evaluation, export): no input-pipeline state needed."""
    args = self.ocp.args.Composite(state=self.ocp.args.StandardRestore(self._target(setup)))
    with jax.transfer_guard("allow"):
      return self.manager.restore(step, args=args)["state"]

  def restore_latest(self, restore: tp.Callable[[int], tp.Any], *, set_aside: bool = True
                     ) -> tuple[tp.Any, int] | None:
    """(restore(step), step) for the newest checkpoint that restores (None: there is none). Damaged
    newer ones are named in a warning (stderr and the log) and (`set_aside`) moved to
    `<directory>.damaged/`; if none restores, `CheckpointRestoreError` lists each with what is wrong."""
    failures = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      why = damage(self.step_dir(step))
      if why is None:
        try:
          out = restore(step)
        except Exception as e:  # noqa: BLE001 — any read error means this checkpoint is unusable
          why = f"restoring it failed: {_first_line(e)}"
      if why is None:
        if set_aside:
          self._set_aside([s for s, _ in failures])
        return out, step
      failures.append((step, why))
      msg = (f"WARNING: checkpoint {self.step_dir(step)} is damaged — {why}; falling back to the "
             f"previous checkpoint.")
      logging.info(msg)
      if self.primary:
        print(msg, file=sys.stderr, flush=True)
    if failures:
      raise CheckpointRestoreError(f"no checkpoint under {self.directory} could be restored: " + "; ".join(
          f"step {s}: {w}" for s, w in failures))
    return None

  def _set_aside(self, steps: tp.Sequence[int]) -> None:
    """Moves damaged checkpoints out of the way (kept for inspection; a resumed run saves those steps
    again)."""
    if not steps:
      return
    if self.primary:
      aside = self.directory.rstrip("/") + ".damaged"
      os.makedirs(aside, exist_ok=True)
      for s in steps:
        dest = os.path.join(aside, f"{s}-{int(time.time())}")
        shutil.move(self.step_dir(s), dest)
        logging.info("moved damaged checkpoint %s to %s", self.step_dir(s), dest)
    self._sync("set_aside")
    self.manager.reload()

  def wait(self):
    self.finish()

  def close(self):
    try:
      self.finish()
    finally:
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


def load_state(setup: Setup, path: str, *, where: str = "--checkpoint"):
  """(state, step) restored from `path` (see `find_checkpoint`) onto `setup`'s mesh. A run directory
  gives its newest checkpoint that restores (a damaged newer one is named in a warning); a step
  directory gives that step or an error naming what is wrong with it."""
  root, step = find_checkpoint(path, where=where)
  explicit = os.path.basename(os.path.abspath(path.rstrip("/"))).isdigit()
  ckpt = Checkpointer(root, keep=1, async_save=False, read_only=True)
  try:
    if explicit:
      why = damage(ckpt.step_dir(step))
      if why:
        raise CheckpointRestoreError(f"{where}: checkpoint {ckpt.step_dir(step)} is damaged — {why}.")
      return ckpt.restore_state(step, setup), step
    state, step = ckpt.restore_latest(lambda s: ckpt.restore_state(s, setup), set_aside=False)
    return state, step
  finally:
    ckpt.close()
