"""Metric logging for the training loop without TensorFlow: TensorBoard event files and JSON lines.

`clu.metric_writers` imports TensorFlow, so this module writes TensorBoard's on-disk format itself:

* An event file is a sequence of TFRecords. Each record is `uint64 length (little-endian)`,
  `uint32 masked CRC32C of those 8 bytes`, `payload`, `uint32 masked CRC32C of payload`, where
  `masked(crc) = ((crc >> 15) | (crc << 17)) + 0xa282ead8 (mod 2**32)`.
* Each payload is a serialized `tensorflow.Event` protobuf, encoded by hand here (only the fields below):

      Event   {double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5;}
      Summary {repeated Value value = 1;}
      Value   {string tag = 1; float simple_value = 2; Image image = 4;}
      Image   {int32 height = 1; int32 width = 2; int32 colorspace = 3; bytes encoded_image_string = 4;}

  The first record of a file carries only `file_version = "brain.Event:2"`.

Typical use (only process 0 writes; the other processes get writers that do nothing):

    writer = create_writers(workdir, enabled=config.log_metrics)
    writer.write_scalars(step, {"loss": loss, "learning_rate": lr})
    writer.write_image(step, "samples/0", image_uint8_hw3)
    writer.close()

Paths are local (or FUSE-mounted) filesystem paths; `gs://` URLs are not supported. Writers are not
thread-safe: call them from one thread.

`read_events(path)` parses an event file back (checking both CRCs of every record); tests use it.
"""

from __future__ import annotations

import io
import json
import math
import os
import socket
import struct
import time
import typing as tp

import numpy as np

__all__ = [
    "EventFileCorruptError",
    "JsonlWriter",
    "MetricWriter",
    "MultiWriter",
    "TensorBoardWriter",
    "crc32c",
    "create_writers",
    "masked_crc32c",
    "read_events",
]

FILE_VERSION = "brain.Event:2"
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_U32 = 0xFFFFFFFF
_U64 = 0xFFFFFFFFFFFFFFFF


# ----------------------------------------------------------------------------------------------------
# CRC32C (Castagnoli) and TFRecord framing.


def _make_crc32c_table() -> tuple[int, ...]:
  """The 256-entry lookup table of the reflected Castagnoli polynomial 0x82F63B78."""
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    table.append(crc)
  return tuple(table)


_CRC32C_TABLE = _make_crc32c_table()


def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
  """CRC32C of `data` as an unsigned 32-bit int; pass a previous result as `crc` to continue it.

  Pure Python (about 5 MB/s): fine for metric records and the occasional PNG image.
  """
  table = _CRC32C_TABLE
  crc ^= _U32
  for byte in bytes(data):
    crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ _U32


def masked_crc32c(data: bytes | bytearray | memoryview) -> int:
  """The CRC32C of `data`, rotated right by 15 bits plus 0xa282ead8 (mod 2**32), as TFRecord stores it."""
  crc = crc32c(data)
  return ((((crc >> 15) | (crc << 17)) & _U32) + 0xA282EAD8) & _U32


def _frame_record(payload: bytes) -> bytes:
  """One TFRecord: length, masked CRC of the length, payload, masked CRC of the payload."""
  header = struct.pack("<Q", len(payload))
  return b"".join((header, struct.pack("<I", masked_crc32c(header)), payload,
                   struct.pack("<I", masked_crc32c(payload))))


# ----------------------------------------------------------------------------------------------------
# Minimal protobuf encoding (wire types: 0 varint, 1 fixed64, 2 length-delimited, 5 fixed32).


def _varint(value: int) -> bytes:
  """Base-128 varint of a non-negative int (negative int64s are passed as their uint64 value)."""
  out = bytearray()
  while True:
    low = value & 0x7F
    value >>= 7
    if value:
      out.append(low | 0x80)
    else:
      out.append(low)
      return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
  return _varint((field << 3) | wire_type)


def _int_field(field: int, value: int) -> bytes:
  return _key(field, 0) + _varint(value & _U64)  # Two's complement for negative int32/int64 values.


def _double_field(field: int, value: float) -> bytes:
  return _key(field, 1) + struct.pack("<d", value)


def _bytes_field(field: int, value: bytes) -> bytes:
  return _key(field, 2) + _varint(len(value)) + value


def _float_field(field: int, value: float) -> bytes:
  return _key(field, 5) + struct.pack("<f", value)


def _to_float32_range(value: float) -> float:
  """`value` with finite magnitudes beyond float32's range replaced by +-inf (as a float32 cast does)."""
  if math.isfinite(value) and abs(value) > _FLOAT32_MAX:
    # Values that round to FLT_MAX are packed fine by struct; only larger ones overflow.
    try:
      struct.pack("<f", value)
    except OverflowError:
      return math.copysign(math.inf, value)
  return value


def _event(wall_time: float, step: int, *, file_version: str | None = None,
           summary_values: tp.Sequence[bytes] = ()) -> bytes:
  """A serialized Event; `summary_values` are already-serialized Summary.Value messages."""
  parts = [_double_field(1, wall_time), _int_field(2, step)]
  if file_version is not None:
    parts.append(_bytes_field(3, file_version.encode("utf-8")))
  if summary_values:
    parts.append(_bytes_field(5, b"".join(_bytes_field(1, v) for v in summary_values)))
  return b"".join(parts)


def _scalar_value(tag: str, value: float) -> bytes:
  return _bytes_field(1, tag.encode("utf-8")) + _float_field(2, _to_float32_range(value))


def _image_value(tag: str, height: int, width: int, colorspace: int, png: bytes) -> bytes:
  image = b"".join((_int_field(1, height), _int_field(2, width), _int_field(3, colorspace),
                    _bytes_field(4, png)))
  return _bytes_field(1, tag.encode("utf-8")) + _bytes_field(4, image)


# ----------------------------------------------------------------------------------------------------
# Value conversion shared by the writers.


def _check_step(step) -> int:
  """`step` (a Python int or a NumPy / JAX integer scalar) as a Python int."""
  if isinstance(step, int) and not isinstance(step, bool):
    return step
  array = np.asarray(step)
  if array.size != 1 or array.dtype.kind not in "iu":
    raise TypeError(f"step must be an integer scalar, got {step!r}")
  return int(array.reshape(()).item())


def _scalar_item(tag: str, value) -> bool | int | float:
  """`value` (Python number, NumPy or JAX scalar / 1-element array) as a Python bool, int or float."""
  if isinstance(value, (bool, int, float)):
    return value
  array = np.asarray(value)
  if array.size != 1:
    raise TypeError(f"metric {tag!r} must be a scalar, got an array of shape {array.shape}")
  array = array.reshape(())
  if array.dtype.kind in "biuf":
    return array.item()
  if array.dtype.kind == "V" and array.dtype.names is None:  # ml_dtypes (bfloat16, float8, int4, ...).
    try:
      return float(array.astype(np.float32))
    except (TypeError, ValueError):
      pass
  raise TypeError(f"metric {tag!r} must be a real number, got dtype {array.dtype}")


def _check_tag(tag) -> str:
  if not isinstance(tag, str) or not tag:
    raise TypeError(f"metric tags must be non-empty strings, got {tag!r}")
  return tag


# ----------------------------------------------------------------------------------------------------
# Writers.


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
  """Writes TensorBoard event files under `logdir` (created if missing) without TensorFlow.

  The file is `logdir/events.out.tfevents.<unix seconds>.<hostname>.pixelground` (a `.<n>` is added
  before `.pixelground` if that name exists). Records are kept in memory and written to the file when
  `max_pending` records are pending, when a write comes `flush_secs` seconds (wall clock) or more after
  the last flush, on `flush()` and on `close()`; `flush_secs=0` writes every record at once. There is
  no background thread, so pending records wait for the next write, `flush()` or `close()`.

  Scalars are stored as float32 `simple_value`s (finite values beyond float32's range become +-inf,
  like a float32 cast); all scalars of one `write_scalars` call share one Event.
  """

  def __init__(self, logdir: str | os.PathLike, *, flush_secs: float = 10.0, max_pending: int = 20):
    if flush_secs < 0 or max_pending < 1:
      raise ValueError(f"need flush_secs >= 0 and max_pending >= 1, got {flush_secs}, {max_pending}")
    self._flush_secs = float(flush_secs)
    self._max_pending = int(max_pending)
    logdir = os.fspath(logdir)
    os.makedirs(logdir, exist_ok=True)
    now = time.time()
    stem = f"events.out.tfevents.{int(now):010d}.{socket.gethostname()}"
    n = 0
    while True:
      name = f"{stem}.pixelground" if n == 0 else f"{stem}.{n}.pixelground"
      try:
        # Exclusive creation: two writers started in the same second never share a file.
        self._file = open(os.path.join(logdir, name), "xb")
        break
      except FileExistsError:
        n += 1
    self.path = os.path.join(logdir, name)
    self._pending: list[bytes] = []
    self._last_flush = time.monotonic()
    self._closed = False
    self._add(_event(now, 0, file_version=FILE_VERSION))
    self.flush()  # The file is a valid (empty) run from the start.

  def write_scalars(self, step: int, scalars: tp.Mapping[str, float]) -> None:
    """Logs `{tag: value}` at `step` (values: Python numbers or NumPy / JAX scalars)."""
    step = _check_step(step)
    values = [_scalar_value(_check_tag(tag), float(_scalar_item(tag, v))) for tag, v in scalars.items()]
    if values:
      self._add(_event(time.time(), step, summary_values=values))

  def write_image(self, step: int, tag: str, image: np.ndarray) -> None:
    """Logs a uint8 image, (H, W, 3) RGB (also (H, W) / (H, W, 1) grey and (H, W, 4) RGBA), as a PNG."""
    from PIL import Image  # Imported lazily: only image logging needs it.

    step = _check_step(step)
    tag = _check_tag(tag)
    array = np.asarray(image)
    if array.dtype != np.uint8:
      raise TypeError(f"image {tag!r} must be uint8, got {array.dtype}")
    if array.ndim == 3 and array.shape[-1] == 1:
      array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
      raise ValueError(f"image {tag!r} must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
      raise ValueError(f"image {tag!r} is empty: shape {array.shape}")
    colorspace = 1 if array.ndim == 2 else array.shape[-1]  # 1 grey, 3 RGB, 4 RGBA.
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG")
    value = _image_value(tag, array.shape[0], array.shape[1], colorspace, buffer.getvalue())
    self._add(_event(time.time(), step, summary_values=[value]))

  def flush(self) -> None:
    """Writes the pending records to the file and flushes it to the OS."""
    if self._closed:
      return
    if self._pending:
      self._file.write(b"".join(self._pending))
      self._pending.clear()
    self._file.flush()
    self._last_flush = time.monotonic()

  def close(self) -> None:
    """Flushes and closes the file; later calls do nothing, later writes raise."""
    if self._closed:
      return
    try:
      self.flush()
    finally:
      self._closed = True
      self._file.close()

  def _add(self, event: bytes) -> None:
    if self._closed:
      raise ValueError(f"TensorBoardWriter for {self.path} is closed")
    self._pending.append(_frame_record(event))
    if (len(self._pending) >= self._max_pending or
        time.monotonic() - self._last_flush >= self._flush_secs):
      self.flush()


def _json_number(value: bool | int | float) -> bool | int | float | str:
  """Ints and bools exactly; floats at float32 precision; NaN / inf as the strings "nan", "inf", "-inf"."""
  if isinstance(value, (bool, int)):
    return value
  value = float(np.float32(_to_float32_range(value)))
  if math.isnan(value):
    return "nan"
  if math.isinf(value):
    return "inf" if value > 0 else "-inf"
  # The shortest decimal that reads back as the same float32 (0.1, not 0.10000000149011612).
  return float(str(np.float32(value)))


class JsonlWriter(_WriterBase):
  """Appends one JSON object per `write_scalars` call to `path`: `{"step": int, "time": float, **scalars}`.

  * `time` is Unix wall time in seconds, rounded to milliseconds.
  * Python / NumPy ints and bools are written exactly. Floats are written at float32 precision (the
    shortest decimal that reads back as the same float32, the precision TensorBoard keeps too).
  * NaN and +-inf are written as the strings "nan", "inf" and "-inf" (not null, which would hide
    which one it was; not bare NaN / Infinity, which is not JSON): `float(v)` reads them back.

  Every line is flushed to the OS as it is written, so a killed run keeps every line it logged. The file
  is opened for appending, so a restarted run continues it. `write_image` does nothing.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    directory = os.path.dirname(self.path)
    if directory:
      os.makedirs(directory, exist_ok=True)
    self._file = open(self.path, "a", encoding="utf-8", buffering=1)  # Line-buffered.
    self._closed = False

  def write_scalars(self, step: int, scalars: tp.Mapping[str, float]) -> None:
    """Appends the line for `step` (values: Python numbers or NumPy / JAX scalars)."""
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
    """Closes every writer, even if one raises (the first error is re-raised after all are closed)."""
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

  Only JAX process 0 writes: on other processes, or when `enabled` is False, the returned MultiWriter
  has no writers and every call does nothing.
  """
  if not enabled:
    return MultiWriter([])
  import jax  # Imported lazily: the writers and read_events do not need JAX.

  if jax.process_index() != 0:
    return MultiWriter([])
  workdir = os.fspath(workdir)
  return MultiWriter([TensorBoardWriter(os.path.join(workdir, "tensorboard")),
                      JsonlWriter(os.path.join(workdir, "metrics.jsonl"))])


# ----------------------------------------------------------------------------------------------------
# Reading event files back (tests, debugging).


class EventFileCorruptError(ValueError):
  """An event file record has a bad CRC, is truncated, or does not hold a valid Event protobuf."""


class _FormatError(ValueError):
  pass


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
  result = shift = 0
  while True:
    if pos >= len(data):
      raise _FormatError("varint runs past the end of the message")
    byte = data[pos]
    pos += 1
    result |= (byte & 0x7F) << shift
    if not byte & 0x80:
      return result, pos
    shift += 7
    if shift >= 70:
      raise _FormatError("varint longer than 10 bytes")


def _parse_fields(data: bytes) -> list[tuple[int, int, int | bytes]]:
  """(field number, wire type, value) of every field of a message; values of wire types 1 and 5 are bytes."""
  fields = []
  pos = 0
  while pos < len(data):
    key, pos = _read_varint(data, pos)
    field, wire_type = key >> 3, key & 7
    if field == 0:
      raise _FormatError("field number 0")
    if wire_type == 0:
      value, pos = _read_varint(data, pos)
    elif wire_type in (1, 2, 5):
      if wire_type == 2:
        size, pos = _read_varint(data, pos)
      else:
        size = 8 if wire_type == 1 else 4
      if pos + size > len(data):
        raise _FormatError(f"field {field} runs past the end of the message")
      value, pos = data[pos:pos + size], pos + size
    else:
      raise _FormatError(f"unsupported wire type {wire_type} (field {field})")
    fields.append((field, wire_type, value))
  return fields


def _expect(field: int, wire_type: int, expected: int, value):
  if wire_type != expected:
    raise _FormatError(f"field {field} has wire type {wire_type}, expected {expected}")
  return value


def _signed(value: int, bits: int) -> int:
  value &= (1 << bits) - 1
  return value - (1 << bits) if value >> (bits - 1) else value


def _decode_image(data: bytes) -> dict[str, tp.Any]:
  image: dict[str, tp.Any] = {"height": 0, "width": 0, "colorspace": 0, "encoded_image_string": b""}
  names = {1: "height", 2: "width", 3: "colorspace"}
  for field, wire_type, value in _parse_fields(data):
    if field in names:
      image[names[field]] = _signed(_expect(field, wire_type, 0, value), 32)
    elif field == 4:
      image["encoded_image_string"] = bytes(_expect(field, wire_type, 2, value))
  return image


def _decode_value(data: bytes) -> dict[str, tp.Any]:
  decoded: dict[str, tp.Any] = {"tag": ""}
  for field, wire_type, value in _parse_fields(data):
    if field == 1:
      decoded["tag"] = _expect(field, wire_type, 2, value).decode("utf-8")
    elif field == 2:
      decoded["simple_value"] = struct.unpack("<f", _expect(field, wire_type, 5, value))[0]
    elif field == 4:
      decoded["image"] = _decode_image(_expect(field, wire_type, 2, value))
  return decoded


def _decode_event(data: bytes) -> dict[str, tp.Any]:
  event: dict[str, tp.Any] = {"wall_time": 0.0, "step": 0}
  for field, wire_type, value in _parse_fields(data):
    if field == 1:
      event["wall_time"] = struct.unpack("<d", _expect(field, wire_type, 1, value))[0]
    elif field == 2:
      event["step"] = _signed(_expect(field, wire_type, 0, value), 64)
    elif field == 3:
      event["file_version"] = _expect(field, wire_type, 2, value).decode("utf-8")
    elif field == 5:
      summary = event.setdefault("summary", [])
      for sub_field, sub_wire_type, sub_value in _parse_fields(_expect(field, wire_type, 2, value)):
        if sub_field == 1:
          summary.append(_decode_value(_expect(sub_field, sub_wire_type, 2, sub_value)))
  return event


def read_events(path: str | os.PathLike) -> list[dict[str, tp.Any]]:
  """Parses an event file, checking both CRCs of every record.

  Returns one dict per record: `wall_time` (Unix seconds) and `step` always; `file_version` and
  `summary` (a list of `{"tag", "simple_value"}` / `{"tag", "image": {"height", "width", "colorspace",
  "encoded_image_string"}}`) when present. Other Event / Value fields are skipped.

  Raises:
    EventFileCorruptError: naming the file and the byte offset of the bad record.
  """
  path = os.fspath(path)
  with open(path, "rb") as f:
    data = f.read()
  events = []
  offset = 0
  while offset < len(data):
    where = f"{path}: corrupt record at byte offset {offset}"
    try:
      payload, next_offset = _read_record(data, offset)
    except _FormatError as e:
      raise EventFileCorruptError(f"{where}: {e}") from None
    try:
      events.append(_decode_event(payload))
    except (_FormatError, UnicodeDecodeError) as e:
      raise EventFileCorruptError(f"{where}: malformed Event protobuf: {e}") from e
    offset = next_offset
  return events


def _read_record(data: bytes, offset: int) -> tuple[bytes, int]:
  """The payload of the TFRecord at `offset` and the offset after it; _FormatError if damaged."""
  if offset + 12 > len(data):
    raise _FormatError(f"truncated header ({len(data) - offset} of 12 bytes)")
  header = data[offset:offset + 8]
  if masked_crc32c(header) != struct.unpack("<I", data[offset + 8:offset + 12])[0]:
    raise _FormatError("length CRC mismatch")
  (length,) = struct.unpack("<Q", header)
  end = offset + 12 + length
  if end + 4 > len(data):
    raise _FormatError(f"truncated record (needs {length + 16} bytes, {len(data) - offset} left)")
  payload = data[offset + 12:end]
  if masked_crc32c(payload) != struct.unpack("<I", data[end:end + 4])[0]:
    raise _FormatError("payload CRC mismatch")
  return payload, end + 4
