"""Grain input pipelines: per-process shards, seeded shuffling, task mixtures, batches, saveable state.

    tasks = [pipeline.Task("ln", ln_source, convert_ln, weight=2.0),
             pipeline.Task("coco", coco_source, convert_coco, weight=1.0)]
    loader = pipeline.Loader(tasks, schema, batch_size=16, seed=0, mixing="example")
    it = iter(loader)                       # a grain DatasetIterator
    batch = next(it)                        # {field: (16, ...) numpy}, incl. "task_id" (16,) int32
    state = it.get_state()                  # JSON-able; goes into the Orbax checkpoint
    it.set_state(state)                     # resumes exactly where it was

Per task: `source` is any random-access sequence (a TFDS `as_data_source()` split, a list), sharded by
process first — process p of n reads records p, p + n, p + 2n, ... (disjoint, together the whole split)
— then shuffled with the loader seed, reshuffled every epoch, repeated forever (or `num_epochs`), and
converted by `convert(example, rng) -> {field: array}` with a numpy Generator that is a pure function of
(seed, position), so augmentation is reproducible and resumable.

Mixtures (`weights` per task): Grain's deterministic weighted interleave, either per example
(`mixing="example"`: a batch mixes tasks; each row carries its `task_id`) or per batch
(`mixing="batch"`: every batch holds one task). Either way rows are padded to one `schema` (field →
(shape, dtype)); fields a task does not produce are zeros, so one compiled train step serves all tasks,
and the loss masks by `task_id`.

Workers: `num_workers > 0` runs the conversion in Grain worker processes (`mp_prefetch`); 0 keeps it in
the main process (threads only). The iterator state is the same either way.

Dropped records: a converter may return {DROPPED: reason index} instead of a row (a record its task's
filters reject, e.g. `Converters.web_caption`). A loader built with `drop_reasons` assembles batches
from the rows that remain (`_DropBatch`: no slot is wasted, the order stays deterministic and
resumable) and adds `batch[DROPPED]`, (num tasks, num reasons) int32 counts of the records dropped while
that batch was assembled, so counts made in worker processes reach the trainer with the batch.

Global batches: `pixelground.parallel.sharding.global_batch(batch, mesh, rules)` assembles the per-process
batches into sharded `jax.Array`s (each process passes its own `batch_size` rows).
"""

from __future__ import annotations

import dataclasses
import typing as tp

import grain
import numpy as np

Converter = tp.Callable[[tp.Any, np.random.Generator], dict[str, np.ndarray]]
Schema = dict[str, tuple[tuple[int, ...], tp.Any]]
DROPPED = "dropped"


@dataclasses.dataclass(frozen=True)
class Task:
  """One task of a mixture: a random-access `source`, its converter, its sampling weight, and optionally
  its own batch `schema` (per-batch mixing only: the task's batches then carry just its fields, so a
  per-task compiled step computes only what the task needs)."""
  name: str
  source: tp.Any
  convert: Converter
  weight: float = 1.0
  schema: Schema | None = None
  file_lengths: tuple[int, ...] = ()  # records per file of `source`, in order (for shard_by="file")


UNREADABLE = "__unreadable__"  # CheckedSource's marker for a record it skipped
UNREADABLE_REASON = "unreadable"  # its drop reason (in the loader's `drop_reasons`)


class DataReadError(RuntimeError):
  """A prepared-data record could not be read (the message names the file)."""


class CheckedSource:
  """A random-access source whose read errors name their file: record i lives in file
  `files[f]`, f from the records per file `lengths`. A record that cannot be read raises
  `DataReadError` naming the task, the file and the record, or with `skip` returns an UNREADABLE
  marker (the loader drops and counts it; the first per file is logged as a warning)."""

  def __init__(self, source, task: str, files: tp.Sequence[str], lengths: tp.Sequence[int], *,
               skip: bool = False):
    if len(files) != len(lengths) or sum(lengths) != len(source):
      raise ValueError(f"task '{task}': {len(files)} files / {sum(lengths)} records per file do not "
                       f"describe the source's {len(source)} records")
    self.source, self.task, self.files, self.skip = source, task, [str(f) for f in files], skip
    self.ends = np.cumsum(np.asarray(lengths, np.int64))
    self.warned: set[int] = set()

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, i):
    try:
      record = self.source[i]
      # array_record can hand back empty records from a truncated file instead of failing.
      if record is None or (isinstance(record, (bytes, dict)) and not record):
        raise ValueError("an empty record: the file is truncated or damaged")
      return record
    except Exception as e:  # noqa: BLE001 — any read failure is reported with its file
      f = int(np.searchsorted(self.ends, int(i), side="right"))
      local = int(i) - (int(self.ends[f - 1]) if f else 0)
      what = (f"task '{self.task}': record {local} of {self.files[f]} cannot be read "
              f"({type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''})")
      if not self.skip:
        raise DataReadError(f"{what}. The prepared data is damaged or missing: rebuild it, or set "
                            f"--config.data.bad_records=skip to skip unreadable records (counted in "
                            f"the log).") from e
      if f not in self.warned:
        self.warned.add(f)
        from absl import logging
        logging.warning("%s; skipping this file's unreadable records (config.data.bad_records=skip)",
                        what)
      return {UNREADABLE: self.files[f]}


class _Subset:
  """Records `indices` of a random-access source (picklable, for Grain workers)."""

  def __init__(self, source, indices: np.ndarray):
    self.source, self.indices = source, np.asarray(indices, np.int64)

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i):
    return self.source[int(self.indices[i])]


def file_shard(file_lengths: tp.Sequence[int], shard_index: int, shard_count: int) -> np.ndarray:
  """Record indices of files shard_index, shard_index + shard_count, ... (whole files, in order)."""
  starts = np.concatenate([[0], np.cumsum(file_lengths)[:-1]]).astype(np.int64)
  return np.concatenate([np.arange(starts[f], starts[f] + file_lengths[f], dtype=np.int64)
                         for f in range(shard_index, len(file_lengths), shard_count)] or
                        [np.zeros(0, np.int64)])


def _pad_to_schema(row: dict[str, np.ndarray], schema: Schema, task_id: int, task: str
                   ) -> dict[str, np.ndarray]:
  """Row with exactly the schema's fields, shapes and dtypes; absent fields are zeros."""
  out = {}
  for field, (shape, dtype) in schema.items():
    if field in row:
      value = np.asarray(row[field])
      if value.shape != tuple(shape):
        raise ValueError(f"task '{task}': field '{field}' has shape {value.shape}, the batch schema "
                         f"says {tuple(shape)}")
      out[field] = value.astype(dtype, copy=False)
    else:
      out[field] = np.zeros(shape, dtype)
  extra = set(row) - set(schema) - {"task_id"}
  if extra:
    raise ValueError(f"task '{task}': fields {sorted(extra)} are not in the batch schema")
  out["task_id"] = np.int32(task_id)
  return out


class Loader:
  """A Grain pipeline over several tasks (see the module docstring); iterate to get batches."""

  def __init__(self, tasks: tp.Sequence[Task], schema: Schema, *, batch_size: int, seed: int,
               mixing: str = "example", shard_index: int = 0, shard_count: int = 1,
               num_epochs: int | None = None, shuffle: bool = True, num_workers: int = 0,
               worker_buffer_size: int = 2, read_threads: int = 1, drop_remainder: bool = True,
               drop_reasons: tp.Sequence[str] = (), shard_by: str = "record"):
    if not tasks:
      raise ValueError("Loader needs at least one task")
    if mixing not in ("example", "batch"):
      raise ValueError(f"mixing={mixing!r}: expected 'example' or 'batch'")
    if not 0 <= shard_index < shard_count:
      raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
    if any(t.weight <= 0 for t in tasks):
      raise ValueError(f"task weights must be positive: {[(t.name, t.weight) for t in tasks]}")
    self.tasks, self.schema = list(tasks), dict(schema)
    self.batch_size, self.seed, self.mixing = batch_size, seed, mixing
    self.shard_index, self.shard_count = shard_index, shard_count
    self.num_epochs, self.shuffle = num_epochs, shuffle
    self.num_workers, self.worker_buffer_size = num_workers, worker_buffer_size
    self.read_threads, self.drop_remainder = read_threads, drop_remainder
    self.drop_reasons = tuple(drop_reasons)
    if shard_by not in ("record", "file"):
      raise ValueError(f"shard_by={shard_by!r}: expected 'record' or 'file'")
    self.shard_by = shard_by
    self.dataset = self._build()

  @property
  def task_names(self) -> list[str]:
    return [t.name for t in self.tasks]

  def _task_dataset(self, task_id: int, task: Task) -> grain.MapDataset:
    if self.shard_by == "file":
      files = task.file_lengths
      if not files or sum(files) != len(task.source):
        raise ValueError(f"task '{task.name}': shard_by='file' needs the source's records per file "
                         f"(got {len(files)} files for {len(task.source)} records)")
      if len(files) < self.shard_count:
        raise ValueError(f"task '{task.name}': {len(files)} files cannot feed {self.shard_count} input "
                         f"shards with shard_by='file' (prepare the data in more files)")
      ds = grain.MapDataset.source(_Subset(task.source, file_shard(files, self.shard_index,
                                                                  self.shard_count)))
    else:
      ds = grain.MapDataset.source(task.source)
      if len(ds) < self.shard_count:
        raise ValueError(f"task '{task.name}': {len(ds)} records cannot feed {self.shard_count} processes")
      ds = ds[self.shard_index::self.shard_count]
    if self.shuffle:
      ds = ds.shuffle(seed=self.seed + 7919 * task_id)  # reshuffled every epoch once repeated
    ds = ds.repeat(self.num_epochs)
    if task.schema is not None and self.mixing != "batch":
      raise ValueError(f"task '{task.name}': a per-task schema needs mixing='batch' (a mixed batch has "
                       f"one schema)")
    schema, name = (task.schema or self.schema), task.name
    convert = task.convert

    dropping = bool(self.drop_reasons)

    unreadable = (self.drop_reasons.index(UNREADABLE_REASON) if UNREADABLE_REASON in self.drop_reasons
                  else None)

    def convert_row(example, rng):
      if isinstance(example, dict) and UNREADABLE in example:
        if unreadable is None:
          raise ValueError(f"task '{name}': an unreadable record was skipped but the loader does not "
                           f"count '{UNREADABLE_REASON}' drops")
        return {DROPPED: np.int32(unreadable), "task_id": np.int32(task_id)}
      row = convert(example, rng)
      if DROPPED in row:
        if not dropping:
          raise ValueError(f"task '{name}' dropped a record but the loader has no drop_reasons")
        return {DROPPED: np.int32(row[DROPPED]), "task_id": np.int32(task_id)}
      return _pad_to_schema(row, schema, task_id, name)

    return ds.random_map(convert_row, seed=self.seed + 104729 * (task_id + 1))

  def _build(self) -> grain.IterDataset:
    per_task = [self._task_dataset(i, t) for i, t in enumerate(self.tasks)]
    weights = [t.weight for t in self.tasks]
    read = grain.ReadOptions(num_threads=self.read_threads, prefetch_buffer_size=max(1, 2 * self.read_threads))
    if self.drop_reasons:
      batch = lambda d: _DropBatch(d, self.batch_size, len(self.tasks), len(self.drop_reasons),  # noqa: E731
                                   self.drop_remainder)
      if self.mixing == "example":
        mixed = per_task[0] if len(per_task) == 1 else grain.MapDataset.mix(per_task, weights)
        it_ds = batch(mixed.to_iter_dataset(read))
      else:
        batched = [batch(d.to_iter_dataset(read)) for d in per_task]
        it_ds = batched[0] if len(batched) == 1 else grain.IterDataset.mix(batched, weights)
      return self._workers(it_ds)
    if self.mixing == "example":
      ds = per_task[0] if len(per_task) == 1 else grain.MapDataset.mix(per_task, weights)
      ds = ds.batch(self.batch_size, drop_remainder=self.drop_remainder)
    else:
      batched = [d.batch(self.batch_size, drop_remainder=self.drop_remainder) for d in per_task]
      ds = batched[0] if len(batched) == 1 else grain.MapDataset.mix(batched, weights)
    return self._workers(ds.to_iter_dataset(read))

  def _workers(self, it_ds: grain.IterDataset) -> grain.IterDataset:
    if self.num_workers > 0:
      from absl import flags
      if not flags.FLAGS.is_parsed():  # Grain's workers read absl flags; outside absl.app use defaults
        flags.FLAGS.mark_as_parsed()
      it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=self.num_workers, per_worker_buffer_size=self.worker_buffer_size))
    return it_ds

  def __iter__(self) -> grain.DatasetIterator:
    return iter(self.dataset)


class _DropBatch(grain.IterDataset):
  """Batches of `batch_size` rows, skipping dropped-record markers ({DROPPED, task_id}) and counting
  them per (task, reason) into `batch[DROPPED]`. Its state is the parent's at a batch boundary."""

  def __init__(self, parent: grain.IterDataset, batch_size: int, num_tasks: int, num_reasons: int,
               drop_remainder: bool):
    super().__init__(parent)
    self.batch_size, self.shape, self.drop_remainder = batch_size, (num_tasks, num_reasons), drop_remainder

  def __iter__(self) -> grain.DatasetIterator:
    return _DropBatchIterator(self._parent.__iter__(), self)


class _DropBatchIterator(grain.DatasetIterator):
  def __init__(self, parent: grain.DatasetIterator, spec: _DropBatch):
    super().__init__(parent)
    self.spec = spec

  def __next__(self) -> dict[str, np.ndarray]:
    rows, counts = [], np.zeros(self.spec.shape, np.int32)
    while len(rows) < self.spec.batch_size:
      try:
        row = next(self._parent)
      except StopIteration:
        if rows and not self.spec.drop_remainder:
          break
        raise
      if DROPPED in row:
        counts[int(row["task_id"]), int(row[DROPPED])] += 1
      else:
        rows.append(row)
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    batch[DROPPED] = counts
    return batch

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)


def process_shard() -> tuple[int, int]:
  """(this process's index, number of processes) from JAX — the shard a multi-host loader reads."""
  import jax
  return jax.process_index(), jax.process_count()


class ShardGroup:
  """This process's part of a global batch, read as `num_shards` fixed *input shards* (not processes).

  The global batch of step t is always input shards 0..n-1's batches t, concatenated in shard order,
  whatever the number of processes: process p of P reads shards [p·n/P, (p+1)·n/P). So 1 process × 8
  devices and 2 processes × 4 devices see exactly the same global batches, and a run may resume on
  another process count (n must stay divisible by it). The iterator state (bytes of JSON: one Grain state
  per shard) is what `grain.checkpoint.CheckpointHandler` saves per process.
  """

  def __init__(self, make_loader: tp.Callable[[int, int], Loader], *, num_shards: int,
               process_index: int, process_count: int):
    if num_shards % process_count:
      raise ValueError(f"config.data.num_shards={num_shards} must be a multiple of the number of "
                       f"processes ({process_count}).")
    per = num_shards // process_count
    self.num_shards = num_shards
    self.shards = list(range(process_index * per, (process_index + 1) * per))
    self.iters = [iter(make_loader(s, num_shards)) for s in self.shards]

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    parts = [next(it) for it in self.iters]
    if len(parts) == 1:
      return parts[0]
    return {k: (np.sum([p[k] for p in parts], axis=0) if k == DROPPED else
                np.concatenate([p[k] for p in parts], axis=0)) for k in parts[0]}

  def get_state(self) -> bytes:
    import json
    return json.dumps({"shards": self.shards, "states": [it.get_state() for it in self.iters]}).encode()

  def set_state(self, state: bytes) -> None:
    import json
    d = json.loads(state.decode() if isinstance(state, bytes) else state)
    if d["shards"] != self.shards:
      raise ValueError(f"input-pipeline state holds shards {d['shards']}, this process reads "
                       f"{self.shards} (restore with the same config.data.num_shards and process count)")
    for it, s in zip(self.iters, d["states"]):
      it.set_state(s)

  def shard_states(self) -> dict[int, tp.Any]:
    """{input shard: its Grain iterator state} — saved one file per shard, so a checkpoint can be
    restored by any number of processes."""
    return {s: it.get_state() for s, it in zip(self.shards, self.iters)}

  def load_shard_states(self, states: tp.Mapping[int, tp.Any]) -> None:
    for s, it in zip(self.shards, self.iters):
      it.set_state(states[s])

  def close(self) -> None:
    """Stops the shards' iterators (and their worker processes); no batches after this."""
    for it in self.iters:
      if hasattr(it, "close"):
        it.close()

  def start_prefetch(self) -> None:
    for it in self.iters:
      if hasattr(it, "start_prefetch"):
        it.start_prefetch()
