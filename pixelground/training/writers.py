"""Metric logging for the training loop: TensorBoard event files and JSON lines, without TensorFlow.

* `TensorBoardWriter` writes event files with tensorboardX's `SummaryWriter` (`clu.metric_writers`
  would import TensorFlow), one file per writer:
  `logdir/events.out.tfevents.<unix seconds>.<hostname>.<pid>.<n>.pixelground`. The pid and a
  per-process counter keep writers started in the same second from truncating each other's file
  (tensorboardX alone would).
* `JsonlWriter` appends one JSON object per `write_scalars` call to a file (`metrics.jsonl`).
* `MultiWriter` forwards to several writers; `create_writers` builds the pair the trainer uses. Only
  JAX process 0 writes: the other processes get a `MultiWriter([])`, whose calls do nothing.

What the writers accept:

* `step`: a Python int or a NumPy / JAX integer scalar (a 1-element array too).
* `write_scalars(step, {tag: value})`: tags are non-empty strings; values are Python bool / int /
  float, or NumPy / JAX scalars or 1-element arrays of any real dtype (bfloat16 and other ml_dtypes
  included). NaN and +-inf are logged as such. TensorBoard stores each value as a float32
  `simple_value` (finite values beyond float32's range become +-inf), and tensorboardX replaces
  characters other than letters, digits and `_ - . /` in a tag by `_` (and drops a leading `/`); the
  JSON lines keep tags as given.
* `write_image(step, tag, image)`: uint8 (H, W, 3) RGB or (H, W, 4) RGBA, or grey (H, W) / (H, W, 1)
  (stored as RGB), logged as a PNG. `JsonlWriter` ignores images.

Typical use:

    writer = create_writers(workdir, enabled=config.log_metrics)
    writer.write_scalars(step, {"loss": loss, "learning_rate": lr})
    writer.write_image(step, "samples/0", image_uint8_hw3)
    writer.close()

Paths are local (or FUSE-mounted) filesystem paths. Writers are not thread-safe: call them from one
thread. Writing after `close()` raises ValueError; a second `close()` does nothing.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
import typing as tp

import numpy as np

__all__ = ["JsonlWriter", "MetricWriter", "MultiWriter", "TensorBoardWriter", "create_writers"]

_writer_ids = itertools.count()  # Numbers the event files of this process.


def _check_step(step) -> int:
  """`step` (a Python int or a NumPy / JAX integer scalar) as a Python int."""
  if isinstance(step, int) and not isinstance(step, bool):
    return step
  array = np.asarray(step)
  if array.size != 1 or array.dtype.kind not in "iu":
    raise TypeError(f"step must be an integer scalar, got {step!r}")
  return int(array.reshape(()).item())


def _check_tag(tag) -> str:
  if not isinstance(tag, str) or not tag:
    raise TypeError(f"metric tags must be non-empty strings, got {tag!r}")
  return tag


def _scalar_item(tag: str, value) -> bool | int | float:
  """`value` (a Python number, NumPy / JAX scalar or 1-element array) as a Python number."""
  if isinstance(value, (bool, int, float)):
    return value
  array = np.asarray(value)
  if array.size != 1:
    raise TypeError(f"metric {tag!r} must be a scalar, got an array of shape {array.shape}")
  array = array.reshape(())
  if array.dtype.kind in "biuf":
    return array.item()
  if array.dtype.kind == "V" and array.dtype.names is None:  # ml_dtypes: bfloat16, float8, int4...
    try:
      return float(array.astype(np.float32))
    except (TypeError, ValueError):
      pass
  raise TypeError(f"metric {tag!r} must be a real number, got dtype {array.dtype}")


def _check_image(tag: str, image) -> np.ndarray:
  """`image` as a uint8 (H, W) or (H, W, 3|4) array; a (H, W, 1) image loses its last axis."""
  array = np.asarray(image)
  if array.dtype != np.uint8:
    raise TypeError(f"image {tag!r} must be uint8, got {array.dtype}")
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
    raise ValueError(
        f"image {tag!r} must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {array.shape}")
  if array.shape[0] == 0 or array.shape[1] == 0:
    raise ValueError(f"image {tag!r} is empty: shape {array.shape}")
  return array


class MetricWriter(tp.Protocol):
  """What the training loop calls; every writer below implements it."""

  def write_scalars(self, step: int, scalars: tp.Mapping[str, float]) -> None: ...

  def write_image(self, step: int, tag: str, image: np.ndarray) -> None: ...

  def flush(self) -> None: ...

  def close(self) -> None: ...


class _WriterBase:
  """Context-manager support: `with TensorBoardWriter(d) as w: ...` closes on exit."""

  def __enter__(self):
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


class TensorBoardWriter(_WriterBase):
  """Writes a TensorBoard event file under `logdir` (created if missing) with tensorboardX.

  tensorboardX hands events to a background thread, which writes them to the file and flushes it
  at most `flush_secs` seconds after they were logged. `flush()` flushes what that thread has
  written so far (an event logged just before may still be queued); `close()`, and interpreter exit,
  write every logged event. The file's first record (the file version) is on disk at once.
  """

  def __init__(self, logdir: str | os.PathLike, *, flush_secs: float = 10.0):
    if flush_secs < 0:
      raise ValueError(f"need flush_secs >= 0, got {flush_secs}")
    # Imported here: tensorboardX imports torch whenever it is installed (about a second), which
    # only the writing process should pay.
    from tensorboardX import SummaryWriter

    logdir = os.fspath(logdir)
    suffix = f".{os.getpid()}.{next(_writer_ids)}.pixelground"
    self._writer = SummaryWriter(logdir, flush_secs=flush_secs, filename_suffix=suffix)
    (name,) = [n for n in os.listdir(logdir)
               if n.startswith("events.out.tfevents.") and n.endswith(suffix)]
    self.path = os.path.join(logdir, name)
    self._closed = False
    self._writer.flush()  # The file is a valid (empty) run from the start.

  def write_scalars(self, step: int, scalars: tp.Mapping[str, float]) -> None:
    """Logs `{tag: value}` at `step`, one event per tag."""
    step = self._check_open(step)
    values = {_check_tag(tag): float(_scalar_item(tag, v)) for tag, v in scalars.items()}
    wall_time = time.time()
    for tag, value in values.items():  # All validated first: a bad value logs none of them.
      self._writer.add_scalar(tag, value, step, walltime=wall_time)

  def write_image(self, step: int, tag: str, image: np.ndarray) -> None:
    """Logs a uint8 image (H, W, 3) / (H, W, 4) / (H, W) / (H, W, 1) as a PNG."""
    step = self._check_open(step)
    array = _check_image(_check_tag(tag), image)
    self._writer.add_image(tag, array, step, dataformats="HW" if array.ndim == 2 else "HWC")

  def flush(self) -> None:
    if not self._closed:
      self._writer.flush()

  def close(self) -> None:
    """Writes every logged event and closes the file."""
    if not self._closed:
      self._closed = True
      self._writer.close()

  def _check_open(self, step) -> int:
    # A closed SummaryWriter would silently start a new event file.
    if self._closed:
      raise ValueError(f"TensorBoardWriter for {self.path} is closed")
    return _check_step(step)


def _json_number(value: bool | int | float) -> bool | int | float | str:
  """Ints and bools exactly; floats at float32 precision; NaN / inf as "nan", "inf" and "-inf"."""
  if isinstance(value, (bool, int)):
    return value
  with np.errstate(over="ignore"):  # Beyond float32's range: +-inf, as TensorBoard stores it.
    value32 = np.float32(value)
  if math.isnan(value32):
    return "nan"
  if math.isinf(value32):
    return "inf" if value32 > 0 else "-inf"
  # The shortest decimal that reads back as the same float32 (0.1, not 0.10000000149011612).
  return float(str(value32))


class JsonlWriter(_WriterBase):
  """Appends one line per `write_scalars` call to `path`: `{"step": int, "time": float, **scalars}`.

  * `time` is Unix wall time in seconds, rounded to milliseconds.
  * Python / NumPy ints and bools are written exactly. Floats are written at float32 precision (the
    shortest decimal that reads back as the same float32, the precision TensorBoard keeps too).
  * NaN and +-inf are written as the strings "nan", "inf" and "-inf" (not null, which would hide
    which one it was; not bare NaN / Infinity, which is not JSON): `float(v)` reads them back.

  Every line is flushed to the OS as it is written, so a killed run keeps every line it logged. The
  file is opened for appending, so a restarted run continues it. `write_image` does nothing.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    directory = os.path.dirname(self.path)
    if directory:
      os.makedirs(directory, exist_ok=True)
    self._file = open(self.path, "a", encoding="utf-8", buffering=1)  # Line-buffered.
    self._closed = False

  def write_scalars(self, step: int, scalars: tp.Mapping[str, float]) -> None:
    """Appends the line for `step`."""
    if self._closed:
      raise ValueError(f"JsonlWriter for {self.path} is closed")
    record: dict[str, tp.Any] = {"step": _check_step(step), "time": round(time.time(), 3)}
    for tag, value in scalars.items():
      if _check_tag(tag) in ("step", "time"):
        raise ValueError(f"metric name {tag!r} is reserved in {self.path}")
      record[tag] = _json_number(_scalar_item(tag, value))
    self._file.write(json.dumps(record, allow_nan=False) + "\n")
    self._file.flush()

  def write_image(self, step: int, tag: str, image: np.ndarray) -> None:
    """Images are not logged to JSON lines."""
    del step, tag, image

  def flush(self) -> None:
    if not self._closed:
      self._file.flush()

  def close(self) -> None:
    if not self._closed:
      self._closed = True
      self._file.close()


class MultiWriter(_WriterBase):
  """Forwards every call to each of `writers`, in order. `MultiWriter([])` does nothing."""

  def __init__(self, writers: tp.Iterable[MetricWriter]):
    self.writers: tuple[MetricWriter, ...] = tuple(writers)

  def write_scalars(self, step: int, scalars: tp.Mapping[str, float]) -> None:
    for writer in self.writers:
      writer.write_scalars(step, scalars)

  def write_image(self, step: int, tag: str, image: np.ndarray) -> None:
    for writer in self.writers:
      writer.write_image(step, tag, image)

  def flush(self) -> None:
    for writer in self.writers:
      writer.flush()

  def close(self) -> None:
    """Closes every writer, even if one raises (the first error is raised once all are closed)."""
    error = None
    for writer in self.writers:
      try:
        writer.close()
      except Exception as e:
        error = error or e
    if error is not None:
      raise error


def create_writers(workdir: str | os.PathLike, *, enabled: bool) -> MultiWriter:
  """TensorBoard under `workdir/tensorboard` plus JSON lines at `workdir/metrics.jsonl`.

  Only JAX process 0 writes: on other processes, or when `enabled` is False, the returned
  MultiWriter has no writers and every call does nothing.
  """
  if not enabled:
    return MultiWriter([])
  import jax  # Imported lazily: the writers themselves do not need JAX.

  if jax.process_index() != 0:
    return MultiWriter([])
  workdir = os.fspath(workdir)
  return MultiWriter([TensorBoardWriter(os.path.join(workdir, "tensorboard")),
                      JsonlWriter(os.path.join(workdir, "metrics.jsonl"))])
