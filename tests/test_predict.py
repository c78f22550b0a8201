"""`python -m pixelground.predict` and `Predictor.from_checkpoint` on a saved tiny checkpoint: real photos
(the COCO panoptic sample) and bad inputs — each gives a one-line error (exit 2) or a handled result,
never a traceback."""

import json
import os

import numpy as np
import pytest
from absl import flags
from PIL import Image

from pixelground import predict
from pixelground.training import checkpointing
from workdirs import random_workdir  # tests/workdirs.py

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHOTOS = os.path.join(ROOT, "..", "shared", "data", "coco_panoptic_sample", "input_images")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A workdir as the trainer leaves it: config.json + checkpoints/<step>/state (a fresh init: the
  tests check plumbing and input handling, not quality)."""
  return random_workdir(os.path.join(ROOT, "configs", "demo.py"), tmp_path_factory.mktemp("run"), 7)


def _predict(capsys, *args):
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["predict", *args])
  code = predict.main([])
  out = capsys.readouterr()
  return code, out.out, out.err


def _file(tmp_path, name, make):
  path = str(tmp_path / name)
  make(path)
  return path


def test_checkpoint_lookup(workdir):
  assert checkpointing.find_checkpoint(str(workdir)) == (str(workdir / "checkpoints"), 7)
  assert checkpointing.find_checkpoint(str(workdir / "checkpoints" / "7"))[1] == 7
  with pytest.raises(FileNotFoundError, match="no finished checkpoint"):
    checkpointing.find_checkpoint(str(workdir.parent))


@pytest.mark.slow  # compiles the four decoders (~2 min on 2 cores)
@pytest.mark.skipif(not os.path.isdir(PHOTOS), reason=f"{PHOTOS} not present")
def test_real_photos_every_task(workdir, tmp_path, capsys):
  photos = sorted(os.path.join(PHOTOS, p) for p in os.listdir(PHOTOS))
  assert len(photos) == 2
  for photo, task, extra in [(photos[0], "refer", ["--text=the red circle"]),
                             (photos[1], "caption", []),
                             (photos[1], "segment", ["--text=Which shape has the most corners?"]),
                             (photos[0], "densecap", ["--top_k=3"]),
                             (photos[0], "caption", ["--box=10,20,300,200"])]:
    out_png = str(tmp_path / f"{task}.png")
    code, out, err = _predict(capsys, f"--checkpoint={workdir}", f"--image={photo}", f"--task={task}",
                              f"--out={out_png}", *extra)
    assert code == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    h, w = np.asarray(Image.open(photo)).shape[:2]
    assert res["size"] == [h, w] and os.path.getsize(out_png) > 0
    if task == "refer":
      x0, y0, x1, y1 = res["box"]
      assert 0 <= x0 <= x1 <= w and 0 <= y0 <= y1 <= h
    if task == "densecap":
      assert len(res["regions"]) == 3
    pic = Image.open(out_png)
    assert max(pic.size) <= predict.DRAW_SIDE + 10


def test_bad_inputs_give_messages_not_tracebacks(workdir, tmp_path, capsys):
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
  ok = {
      "grey.png": lambda p: Image.fromarray(rgb[..., 0]).save(p),
      "rgba.png": lambda p: Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(p),
      "deep.png": lambda p: Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(p),  # 16-bit
      "huge.jpg": lambda p: Image.new("RGB", (8000, 8000), (20, 120, 200)).save(p, quality=50),
  }
  base = [f"--checkpoint={workdir}", "--task=refer"]
  for name, make in ok.items():
    path = _file(tmp_path, name, make)
    code, out, err = _predict(capsys, *base, f"--image={path}", "--text=the blue square",
                              f"--out={tmp_path / (name + '.out.png')}")
    assert code == 0, (name, err)
    assert json.loads(out.strip().splitlines()[-1])["size"] == list(np.asarray(Image.open(path)).shape[:2])
  good = _file(tmp_path, "good.png", lambda p: Image.fromarray(rgb).save(p))
  long_text = " ".join(["shape"] * 2000)
  code, out, err = _predict(capsys, *base, f"--image={good}", f"--text={long_text}")
  assert code == 0 and "truncated" in err
  bad = {
      "not an image": (_file(tmp_path, "notes.png", lambda p: open(p, "w").write("hello")), [], "not a readable image"),
      "empty file": (_file(tmp_path, "empty.jpg", lambda p: open(p, "wb").close()), [], "is empty"),
      "missing file": (str(tmp_path / "nope.jpg"), [], "does not exist"),
      "empty text": (good, ["--text=   "], "non-empty --text"),
      "box outside": (good, ["--task=caption", "--box=10,10,500,30"], "inside the"),
      "box malformed": (good, ["--task=caption", "--box=1,2,3"], "4 numbers"),
      "box on refer": (good, ["--box=1,2,3,4", "--text=a"], "only --task=caption"),
  }
  for what, (path, extra, msg) in bad.items():
    code, out, err = _predict(capsys, *base, f"--image={path}", "--text=the red one", *extra)
    assert code == 2 and msg in err and "Traceback" not in err, (what, err)
    assert len(err.strip().splitlines()) == 1, (what, err)
  code, _, err = _predict(capsys, f"--checkpoint={tmp_path / 'nowhere'}", f"--image={good}")
  assert code == 2 and "does not exist" in err
