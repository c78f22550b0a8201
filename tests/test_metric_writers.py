"""TensorBoard event files and JSON lines written without TensorFlow (pixelground.training.writers)."""

import io
import json
import math
import os
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from pixelground.training import writers as mw

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _only_event_file(logdir):
  (name,) = [n for n in os.listdir(logdir) if "tfevents" in n]
  return os.path.join(logdir, name)


def _image(height=5, width=7, channels=3, seed=0):
  shape = (height, width) if channels is None else (height, width, channels)
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


# --- CRC32C ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("data, expected", [
    (b"", 0x00000000),
    (b"a", 0xC1D04330),
    (b"123456789", 0xE3069283),
    # RFC 3720 (iSCSI), appendix B.4.
    (bytes(32), 0x8A9136AA),
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
])
def test_crc32c_vectors(data, expected):
  assert mw.crc32c(data) == expected


def test_crc32c_continues_and_masks():
  data = os.urandom(1000)
  assert mw.crc32c(data[400:], mw.crc32c(data[:400])) == mw.crc32c(data)
  crc = mw.crc32c(b"123456789")
  rotated = ((crc >> 15) | (crc << 17)) & 0xFFFFFFFF
  assert mw.masked_crc32c(b"123456789") == (rotated + 0xA282EAD8) % 2**32


def test_masked_crc32c_matches_tensorboard():
  pytest.importorskip("tensorboard")
  from tensorboard.compat.tensorflow_stub import pywrap_tensorflow

  for n in (0, 1, 8, 100, 1000):
    data = os.urandom(n)
    assert mw.masked_crc32c(data) == pywrap_tensorflow.masked_crc32c(data)


# --- TensorBoard writer round trip -------------------------------------------------------------------

SCALARS = {"loss": 0.1, "train/accuracy": np.float32(0.8125), "lr": np.float64(3e-4), "count": np.int32(7),
           "jax/bf16": jnp.asarray(1.3, jnp.bfloat16), "jax/f32": jnp.float32(2.7),
           "jax/1elem": jnp.ones((1, 1))}


def _write_run(logdir):
  with mw.TensorBoardWriter(logdir) as writer:
    writer.write_scalars(1, SCALARS)
    writer.write_scalars(np.int64(2), {"loss": -2.5e-8})
    writer.write_image(3, "samples/rgb", _image())
    writer.write_scalars(2**40, {"nan": float("nan"), "inf": np.inf, "neg_inf": -np.inf, "huge": 1e40})
  return writer.path


def test_round_trip_scalars_and_image(tmp_path):
  path = _write_run(tmp_path)
  name = os.path.basename(path)
  assert name.startswith("events.out.tfevents.") and name.endswith(f".{os.uname().nodename}.pixelground")
  events = mw.read_events(path)
  assert len(events) == 5
  assert events[0]["file_version"] == "brain.Event:2" and "summary" not in events[0]
  assert [e["step"] for e in events] == [0, 1, 2, 3, 2**40]
  assert all(abs(e["wall_time"] - events[0]["wall_time"]) < 60 for e in events)

  values = {v["tag"]: v["simple_value"] for v in events[1]["summary"]}
  # Exact as float32.
  assert values == {tag: float(np.asarray(v, np.float32).item()) for tag, v in SCALARS.items()}
  assert values["jax/bf16"] == 1.296875  # The bfloat16 nearest 1.3.
  assert events[2]["summary"] == [{"tag": "loss", "simple_value": float(np.float32(-2.5e-8))}]

  (image_value,) = events[3]["summary"]
  assert image_value["tag"] == "samples/rgb" and "simple_value" not in image_value
  image = image_value["image"]
  assert (image["height"], image["width"], image["colorspace"]) == (5, 7, 3)
  decoded = np.asarray(Image.open(io.BytesIO(image["encoded_image_string"])))
  np.testing.assert_array_equal(decoded, _image())

  special = {v["tag"]: v["simple_value"] for v in events[4]["summary"]}
  assert math.isnan(special["nan"])
  assert special["inf"] == special["huge"] == math.inf and special["neg_inf"] == -math.inf


@pytest.mark.parametrize("channels, colorspace, mode", [(None, 1, "L"), (1, 1, "L"), (4, 4, "RGBA")])
def test_image_channel_layouts(tmp_path, channels, colorspace, mode):
  array = _image(4, 3, channels, seed=1)
  with mw.TensorBoardWriter(tmp_path) as writer:
    writer.write_image(0, "img", array)
  image = mw.read_events(writer.path)[1]["summary"][0]["image"]
  assert (image["height"], image["width"], image["colorspace"]) == (4, 3, colorspace)
  png = Image.open(io.BytesIO(image["encoded_image_string"]))
  assert png.mode == mode
  np.testing.assert_array_equal(np.asarray(png), array[..., 0] if channels == 1 else array)


def test_bad_inputs_raise(tmp_path):
  with mw.TensorBoardWriter(tmp_path) as writer:
    with pytest.raises(TypeError, match="uint8"):
      writer.write_image(0, "img", np.zeros((2, 2, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(2, 2, 2\)"):
      writer.write_image(0, "img", np.zeros((2, 2, 2), np.uint8))
    with pytest.raises(TypeError, match="'vec' must be a scalar"):
      writer.write_scalars(0, {"vec": np.zeros(3)})
    with pytest.raises(TypeError, match="'c' must be a real number"):
      writer.write_scalars(0, {"c": 1j})
    with pytest.raises(TypeError, match="step"):
      writer.write_scalars(1.5, {"loss": 1.0})
  with pytest.raises(ValueError, match="closed"):
    writer.write_scalars(0, {"loss": 1.0})
  writer.close()  # A second close does nothing.


def test_flush_policy(tmp_path):
  writer = mw.TensorBoardWriter(tmp_path, flush_secs=3600, max_pending=3)
  assert len(mw.read_events(writer.path)) == 1  # The file_version record is on disk at once.
  writer.write_scalars(1, {"a": 1.0})
  writer.write_scalars(2, {"a": 2.0})
  assert len(mw.read_events(writer.path)) == 1  # Two records pending.
  writer.write_scalars(3, {"a": 3.0})
  assert len(mw.read_events(writer.path)) == 4  # max_pending reached.
  writer.write_scalars(4, {"a": 4.0})
  writer.flush()
  assert len(mw.read_events(writer.path)) == 5
  writer.write_scalars(5, {"a": 5.0})
  writer.close()
  assert [e["step"] for e in mw.read_events(writer.path)] == [0, 1, 2, 3, 4, 5]

  eager = mw.TensorBoardWriter(tmp_path / "eager", flush_secs=0)
  eager.write_scalars(1, {"a": 1.0})
  assert len(mw.read_events(eager.path)) == 2
  eager.close()


def test_writers_in_the_same_second_get_separate_files(tmp_path):
  first, second = mw.TensorBoardWriter(tmp_path), mw.TensorBoardWriter(tmp_path)
  assert first.path != second.path
  first.close()
  second.close()


def test_corruption_names_file_and_offset(tmp_path):
  path = _write_run(tmp_path)
  data = open(path, "rb").read()
  starts = [0]  # Byte offset of every record.
  while starts[-1] < len(data):
    starts.append(starts[-1] + 12 + int.from_bytes(data[starts[-1]:starts[-1] + 8], "little") + 4)
  assert starts.pop() == len(data) and len(starts) == 5
  cases = [  # (reason, byte to flip or None, length to cut to or None, offset of the bad record).
      ("payload CRC mismatch", starts[1] + 20, None, starts[1]),
      ("length CRC mismatch", starts[2] + 2, None, starts[2]),
      ("length CRC mismatch", starts[2] + 9, None, starts[2]),  # The length's CRC itself.
      ("truncated record", None, len(data) - 3, starts[4]),
      ("truncated header", None, starts[4] + 5, starts[4]),
  ]
  bad_path = tmp_path / "bad" / os.path.basename(path)
  bad_path.parent.mkdir()
  for reason, flip, cut, offset in cases:
    bad = bytearray(data)
    if flip is not None:
      bad[flip] ^= 0x40
    if cut is not None:
      bad = bad[:cut]
    bad_path.write_bytes(bytes(bad))
    with pytest.raises(mw.EventFileCorruptError) as info:
      mw.read_events(bad_path)
    assert str(info.value).startswith(f"{bad_path}: corrupt record at byte offset {offset}: {reason}")


def test_malformed_protobuf_in_a_valid_record(tmp_path):
  path = tmp_path / "events.out.tfevents.0.host.pixelground"
  path.write_bytes(mw._frame_record(b"\x0a\x05ab"))  # Field 1 claims 5 bytes but 2 follow.
  with pytest.raises(mw.EventFileCorruptError, match="byte offset 0: malformed Event protobuf"):
    mw.read_events(path)


def test_tensorboard_event_accumulator_reads_the_run(tmp_path):
  pytest.importorskip("tensorboard")
  from tensorboard.backend.event_processing import event_accumulator

  _write_run(tmp_path)
  accumulator = event_accumulator.EventAccumulator(
      str(tmp_path), size_guidance={event_accumulator.SCALARS: 0, event_accumulator.IMAGES: 0})
  accumulator.Reload()
  tags = accumulator.Tags()
  assert set(tags["scalars"]) == {*SCALARS, "nan", "inf", "neg_inf", "huge"}
  assert tags["images"] == ["samples/rgb"]
  for tag, value in SCALARS.items():
    first = accumulator.Scalars(tag)[0]
    assert (first.step, first.value) == (1, float(np.asarray(value, np.float32).item()))
  assert [(e.step, e.value) for e in accumulator.Scalars("loss")] == [
      (1, float(np.float32(0.1))), (2, float(np.float32(-2.5e-8)))]
  (nan,) = accumulator.Scalars("nan")
  assert nan.step == 2**40 and math.isnan(nan.value)
  assert accumulator.Scalars("huge")[0].value == math.inf
  (image,) = accumulator.Images("samples/rgb")
  assert (image.step, image.width, image.height) == (3, 7, 5)
  np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(image.encoded_image_string))), _image())


# --- JSON lines --------------------------------------------------------------------------------------

def test_jsonl_lines(tmp_path):
  path = tmp_path / "sub" / "metrics.jsonl"
  with mw.JsonlWriter(path) as writer:
    writer.write_scalars(1, {"loss": 0.1, "acc": np.float32(0.8125), "count": np.int64(2**40), "ok": True})
    writer.write_scalars(np.int32(2), {"nan": np.nan, "inf": float("inf"), "neg_inf": -np.inf, "tiny": 1e-30})
    writer.write_image(2, "ignored", _image())
    with pytest.raises(ValueError, match="'step' is reserved"):
      writer.write_scalars(3, {"step": 1.0})
  with mw.JsonlWriter(path) as writer:  # Appends.
    writer.write_scalars(3, {"loss": 1 / 3})
  lines = path.read_text().splitlines()
  assert len(lines) == 3
  first, second, third = (json.loads(line) for line in lines)
  assert isinstance(first["time"], float) and first["step"] == 1
  assert {k: first[k] for k in ("loss", "acc", "count", "ok")} == {
      "loss": 0.1, "acc": 0.8125, "count": 2**40, "ok": True}
  assert '"loss": 0.1,' in lines[0]
  assert {k: second[k] for k in ("step", "nan", "inf", "neg_inf")} == {
      "step": 2, "nan": "nan", "inf": "inf", "neg_inf": "-inf"}
  assert np.float32(second["tiny"]) == np.float32(1e-30)
  assert np.float32(third["loss"]) == np.float32(1 / 3) and third["loss"] == 0.33333334


def test_killed_run_keeps_logged_lines(tmp_path):
  """A process killed with SIGKILL (no close, no atexit) leaves its JSONL line and TB record on disk."""
  script = textwrap.dedent(f"""
      import os, signal, sys
      sys.path.insert(0, {REPO_ROOT!r})
      from pixelground.training import writers as mw
      jsonl = mw.JsonlWriter({str(tmp_path / "metrics.jsonl")!r})
      tb = mw.TensorBoardWriter({str(tmp_path / "tb")!r}, flush_secs=0)
      jsonl.write_scalars(7, {{"loss": 0.5}})
      tb.write_scalars(7, {{"loss": 0.5}})
      os.kill(os.getpid(), signal.SIGKILL)
  """)
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
  assert result.returncode == -9, result.stderr.decode()
  (line,) = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert {k: v for k, v in json.loads(line).items() if k != "time"} == {"step": 7, "loss": 0.5}
  events = mw.read_events(_only_event_file(tmp_path / "tb"))
  assert events[-1]["step"] == 7 and events[-1]["summary"] == [{"tag": "loss", "simple_value": 0.5}]


# --- MultiWriter / create_writers --------------------------------------------------------------------

def test_create_writers_enabled(tmp_path):
  with mw.create_writers(tmp_path, enabled=True) as writer:
    assert isinstance(writer, mw.MultiWriter) and len(writer.writers) == 2
    writer.write_scalars(5, {"loss": 0.25})
    writer.write_image(5, "img", _image())
    writer.flush()
  events = mw.read_events(_only_event_file(tmp_path / "tensorboard"))
  assert [e["step"] for e in events] == [0, 5, 5]
  (line,) = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert json.loads(line)["loss"] == 0.25


def test_create_writers_disabled_does_nothing(tmp_path):
  writer = mw.create_writers(tmp_path / "run", enabled=False)
  writer.write_scalars(1, {"loss": 1.0})
  writer.write_image(1, "img", _image())
  writer.flush()
  writer.close()
  assert not (tmp_path / "run").exists()


def test_multi_writer_closes_all_and_reraises(tmp_path):
  class Failing:
    def close(self):
      raise RuntimeError("boom")

  jsonl = mw.JsonlWriter(tmp_path / "m.jsonl")
  with pytest.raises(RuntimeError, match="boom"):
    mw.MultiWriter([Failing(), jsonl]).close()
  with pytest.raises(ValueError, match="closed"):
    jsonl.write_scalars(0, {"a": 1.0})
