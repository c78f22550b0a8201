"""pixelground.training.writers: event files read back by TensorBoard's own reader; JSON lines."""

import io
import json
import math
import os
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator, event_file_loader

from pixelground.training import writers as mw

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCALARS = {"loss": 0.1, "train/accuracy": np.float32(0.8125), "lr": np.float64(3e-4),
           "count": np.int32(7), "ok": True, "jax/bf16": jnp.asarray(1.3, jnp.bfloat16),
           "jax/f32": jnp.float32(2.7), "jax/1elem": jnp.ones((1, 1))}
SPECIAL = {"nan": float("nan"), "inf": np.inf, "neg_inf": -np.inf, "huge": 1e40}


def _image(height=5, width=7, channels=3, seed=0):
  shape = (height, width) if channels is None else (height, width, channels)
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _f32(value) -> float:
  """What TensorBoard stores for `value`: its float32 rounding (beyond float32's range: +-inf)."""
  with np.errstate(over="ignore"):
    return float(np.asarray(value, np.float32).item())


def _accumulator(logdir):
  accumulator = event_accumulator.EventAccumulator(
      str(logdir), size_guidance=event_accumulator.STORE_EVERYTHING_SIZE_GUIDANCE)
  accumulator.Reload()
  return accumulator


def _event_files(logdir):
  return sorted(os.path.join(logdir, n) for n in os.listdir(logdir) if "tfevents" in n)


def _raw_events(path):
  """The Event protos as stored (EventFileLoader would turn simple_values into tensors)."""
  return list(event_file_loader.LegacyEventFileLoader(str(path)).Load())


def _png(encoded: bytes) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(encoded)))


def _write_run(logdir):
  with mw.TensorBoardWriter(logdir) as writer:
    writer.write_scalars(1, SCALARS)
    writer.write_scalars(np.int64(2), {"loss": -2.5e-8})
    writer.write_scalars(jnp.int32(3), {"loss": 1 / 3})
    writer.write_image(3, "samples/rgb", _image())
    writer.write_scalars(2**40, SPECIAL)
  return writer.path


# --- TensorBoard ---------------------------------------------------------------------------------

def test_scalars_and_image_round_trip_through_tensorboard(tmp_path):
  path = _write_run(tmp_path)
  name = os.path.basename(path)
  assert name.startswith("events.out.tfevents.") and name.endswith(".pixelground")
  assert f".{os.uname().nodename}.{os.getpid()}." in name
  assert _event_files(tmp_path) == [path]

  accumulator = _accumulator(tmp_path)
  tags = accumulator.Tags()
  assert sorted(tags["scalars"]) == sorted({*SCALARS, *SPECIAL})
  assert tags["images"] == ["samples/rgb"]
  for tag, value in SCALARS.items():
    event = accumulator.Scalars(tag)[0]
    assert (event.step, event.value) == (1, _f32(value)), tag
  assert accumulator.Scalars("jax/bf16")[0].value == 1.296875  # The bfloat16 nearest 1.3.
  assert accumulator.Scalars("ok")[0].value == 1.0
  assert [(e.step, e.value) for e in accumulator.Scalars("loss")] == [
      (1, _f32(0.1)), (2, _f32(-2.5e-8)), (3, _f32(1 / 3))]
  special = {tag: accumulator.Scalars(tag) for tag in SPECIAL}
  assert all(len(events) == 1 and events[0].step == 2**40 for events in special.values())
  assert math.isnan(special["nan"][0].value)
  assert special["inf"][0].value == special["huge"][0].value == math.inf
  assert special["neg_inf"][0].value == -math.inf

  (image,) = accumulator.Images("samples/rgb")
  assert (image.step, image.height, image.width) == (3, 5, 7)
  np.testing.assert_array_equal(_png(image.encoded_image_string), _image())


def test_event_file_records(tmp_path):
  """Raw records: a file-version header, then one simple_value per scalar, sharing a wall time."""
  events = _raw_events(_write_run(tmp_path))
  assert events[0].file_version == "brain.Event:2" and not events[0].HasField("summary")
  scalars = [e for e in events[1:] if e.summary.value[0].HasField("simple_value")]
  first_call = [e for e in scalars if e.step == 1]
  assert [e.summary.value[0].tag for e in first_call] == list(SCALARS)
  assert len({e.wall_time for e in first_call}) == 1
  assert all(abs(e.wall_time - time.time()) < 60 for e in events)
  (image,) = [e for e in events if e.summary.value and e.summary.value[0].HasField("image")]
  assert image.summary.value[0].image.colorspace == 3


@pytest.mark.parametrize("channels", [None, 1, 4])
def test_image_channel_layouts(tmp_path, channels):
  array = _image(4, 3, channels, seed=1)
  with mw.TensorBoardWriter(tmp_path) as writer:
    writer.write_image(0, "img", array)
  (image,) = _accumulator(tmp_path).Images("img")
  assert (image.height, image.width) == (4, 3)
  decoded = _png(image.encoded_image_string)
  if channels == 4:
    np.testing.assert_array_equal(decoded, array)
  else:  # Grey is stored as RGB with three equal channels.
    grey = array.reshape(4, 3)
    np.testing.assert_array_equal(decoded, np.stack([grey] * 3, axis=-1))


def test_tensorboard_cleans_tags_but_jsonl_keeps_them(tmp_path):
  with mw.create_writers(tmp_path, enabled=True) as writer:
    writer.write_scalars(1, {"eval/acc@0.5": 0.5})
  assert _accumulator(tmp_path / "tensorboard").Tags()["scalars"] == ["eval/acc_0.5"]
  (line,) = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert json.loads(line)["eval/acc@0.5"] == 0.5


def test_bad_inputs_raise(tmp_path):
  with mw.TensorBoardWriter(tmp_path) as writer:
    with pytest.raises(TypeError, match="uint8"):
      writer.write_image(0, "img", np.zeros((2, 2, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(2, 2, 2\)"):
      writer.write_image(0, "img", np.zeros((2, 2, 2), np.uint8))
    with pytest.raises(ValueError, match="empty"):
      writer.write_image(0, "img", np.zeros((0, 2, 3), np.uint8))
    with pytest.raises(TypeError, match="'vec' must be a scalar"):
      writer.write_scalars(0, {"vec": np.zeros(3)})
    with pytest.raises(TypeError, match="'c' must be a real number"):
      writer.write_scalars(0, {"c": 1j})
    with pytest.raises(TypeError, match="'s' must be a real number"):
      writer.write_scalars(0, {"s": "1.0"})
    with pytest.raises(TypeError, match="non-empty strings"):
      writer.write_scalars(0, {"": 1.0})
    with pytest.raises(TypeError, match="non-empty strings"):
      writer.write_image(0, 3, _image())
    with pytest.raises(TypeError, match="step"):
      writer.write_scalars(1.5, {"loss": 1.0})
    with pytest.raises(TypeError, match="step"):
      writer.write_scalars(np.arange(2), {"loss": 1.0})
    with pytest.raises(TypeError, match="'vec' must be a scalar"):  # Nothing of the call is logged.
      writer.write_scalars(0, {"fine": 1.0, "vec": np.zeros(3)})
  with pytest.raises(ValueError, match="closed"):
    writer.write_scalars(0, {"loss": 1.0})
  with pytest.raises(ValueError, match="closed"):
    writer.write_image(0, "img", _image())
  writer.close()  # A second close does nothing.
  assert _event_files(tmp_path) == [writer.path]  # No new file was started after close.
  assert _accumulator(tmp_path).Tags()["scalars"] == []


def test_events_reach_disk_without_close(tmp_path):
  """The file-version record is on disk at once; logged events follow within flush_secs."""
  writer = mw.TensorBoardWriter(tmp_path, flush_secs=0)
  assert len(_raw_events(writer.path)) == 1
  writer.write_scalars(7, {"loss": 0.5})
  deadline = time.monotonic() + 10
  while len(events := _raw_events(writer.path)) < 2 and time.monotonic() < deadline:
    time.sleep(0.01)
  writer.flush()
  assert [(e.step, e.summary.value[0].simple_value) for e in events[1:]] == [(7, 0.5)]
  writer.close()


def test_writers_in_the_same_second_get_separate_files(tmp_path):
  first, second = mw.TensorBoardWriter(tmp_path), mw.TensorBoardWriter(tmp_path)
  first.write_scalars(1, {"a": 1.0})
  second.write_scalars(2, {"a": 2.0})
  first.close()
  second.close()
  assert first.path != second.path and _event_files(tmp_path) == sorted([first.path, second.path])
  assert [e.step for e in _accumulator(tmp_path).Scalars("a")] == [1, 2]


# --- JSON lines ----------------------------------------------------------------------------------

def test_jsonl_lines(tmp_path):
  path = tmp_path / "sub" / "metrics.jsonl"
  with mw.JsonlWriter(path) as writer:
    writer.write_scalars(1, {"loss": 0.1, "acc": np.float32(0.8125), "count": np.int64(2**40),
                             "ok": True})
    writer.write_scalars(np.int32(2), {"nan": np.nan, "inf": float("inf"), "neg_inf": -np.inf,
                                       "tiny": 1e-30, "huge": 1e40, "bf16": jnp.bfloat16(1.3)})
    writer.write_image(2, "ignored", _image())
    with pytest.raises(ValueError, match="'step' is reserved"):
      writer.write_scalars(3, {"step": 1.0})
    with pytest.raises(TypeError, match="'vec' must be a scalar"):
      writer.write_scalars(3, {"vec": np.zeros(2)})
  with pytest.raises(ValueError, match="closed"):
    writer.write_scalars(3, {"loss": 1.0})
  with mw.JsonlWriter(path) as writer:  # Appends.
    writer.write_scalars(3, {"loss": 1 / 3})
  lines = path.read_text().splitlines()
  assert len(lines) == 3
  first, second, third = (json.loads(line) for line in lines)
  assert list(first) == ["step", "time", "loss", "acc", "count", "ok"]
  assert isinstance(first["time"], float) and abs(first["time"] - time.time()) < 60
  assert {k: first[k] for k in ("step", "loss", "acc", "count", "ok")} == {
      "step": 1, "loss": 0.1, "acc": 0.8125, "count": 2**40, "ok": True}
  assert '"loss": 0.1, "acc": 0.8125, "count": 1099511627776, "ok": true}' in lines[0]
  assert {k: second[k] for k in ("step", "nan", "inf", "neg_inf", "huge", "bf16")} == {
      "step": 2, "nan": "nan", "inf": "inf", "neg_inf": "-inf", "huge": "inf", "bf16": 1.296875}
  assert np.float32(second["tiny"]) == np.float32(1e-30)
  assert third["loss"] == 0.33333334


def test_killed_run_keeps_logged_jsonl_lines(tmp_path):
  """A process killed by SIGKILL (no close, no atexit) leaves every JSONL line it wrote on disk."""
  script = textwrap.dedent(f"""
      import os, signal, sys
      sys.path.insert(0, {REPO_ROOT!r})
      from pixelground.training import writers as mw
      jsonl = mw.JsonlWriter({str(tmp_path / "metrics.jsonl")!r})
      jsonl.write_scalars(7, {{"loss": 0.5}})
      os.kill(os.getpid(), signal.SIGKILL)
  """)
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
  assert result.returncode == -9, result.stderr.decode()
  (line,) = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert {k: v for k, v in json.loads(line).items() if k != "time"} == {"step": 7, "loss": 0.5}


# --- MultiWriter / create_writers ----------------------------------------------------------------

def test_create_writers_enabled(tmp_path):
  with mw.create_writers(tmp_path, enabled=True) as writer:
    assert isinstance(writer, mw.MultiWriter) and len(writer.writers) == 2
    writer.write_scalars(5, {"loss": 0.25})
    writer.write_image(5, "img", _image())
    writer.flush()
  accumulator = _accumulator(tmp_path / "tensorboard")
  assert [(e.step, e.value) for e in accumulator.Scalars("loss")] == [(5, 0.25)]
  assert [e.step for e in accumulator.Images("img")] == [5]
  (line,) = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert json.loads(line)["loss"] == 0.25


def _use_writers(writer):
  writer.write_scalars(1, {"loss": 1.0})
  writer.write_image(1, "img", _image())
  writer.flush()
  writer.close()
  writer.close()


def test_create_writers_disabled_does_nothing(tmp_path):
  writer = mw.create_writers(tmp_path / "run", enabled=False)
  assert writer.writers == ()
  _use_writers(writer)
  assert not (tmp_path / "run").exists()


def test_create_writers_on_other_processes_does_nothing(tmp_path, monkeypatch):
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  writer = mw.create_writers(tmp_path / "run", enabled=True)
  assert writer.writers == ()
  _use_writers(writer)
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
