"""tfds_builders/reasonseg.py on a small fixture in LISA's raw format: mask pixels against masks built
independently with numpy, EXIF orientation, both configs, missing manual files, and bad records skipped
and counted by kind."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from tfds_builders import common
from tfds_builders.reasonseg import ReasonSeg


def _rect(x0, y0, x1, y1, label):
  return {"label": label, "points": [[x0, y0], [x1, y0], [x1, y1], [x0, y1]], "shape_type": "polygon",
          "group_id": None, "flags": {}}


def _box_mask(h, w, *boxes):
  """Independent expectation: integer corner boxes (inclusive) as a bool mask."""
  m = np.zeros((h, w), bool)
  for x0, y0, x1, y1 in boxes:
    m[y0:y1 + 1, x0:x1 + 1] = True
  return m


# name -> (width, height, JSON, expected target mask, expected ignore mask); masks (height, width) bool
def _cases():
  w, h = 40, 30
  cases = {}
  # a target rectangle with an ignore hole (smaller, so painted last); a float-vertex rectangle
  # (truncated to integer pixels); an ignore band holding a small target (painted last); a "flag" shape.
  shapes = [_rect(5, 4, 14, 11, "target"), _rect(8, 6, 10, 8, "ignore"),
            _rect(20.7, 2.2, 30.9, 9.8, "target"), _rect(0, 20, 39, 29, "ignore"),
            _rect(2, 22, 5, 25, "target"), _rect(0, 0, 39, 29, "flag")]
  hole = _box_mask(h, w, (8, 6, 10, 8))
  target = _box_mask(h, w, (5, 4, 14, 11), (20, 2, 30, 9), (2, 22, 5, 25)) & ~hole
  ignore = (hole | _box_mask(h, w, (0, 20, 39, 29))) & ~_box_mask(h, w, (2, 22, 5, 25))
  cases["a_room"] = (w, h, {"text": ["Where would you sit?", "  the chair  "], "is_sentence": True,
                            "shapes": shapes, "imageWidth": w, "imageHeight": h}, target, ignore)
  # a rectangle shape (two corners) reaching past the image edge: clipped
  cases["b_edge"] = (24, 16, {"text": ["the corner"], "is_sentence": False, "shapes": [
      {"label": "target", "points": [[18, 10], [40, 30]], "shape_type": "rectangle"}]},
      _box_mask(16, 24, (18, 10, 23, 15)), np.zeros((16, 24), bool))
  # Equal-area polygons (LISA paints np.argsort(areas)[::-1]: equal areas in reverse file order, so
  # the first listed wins where they overlap): a 10 x 10 target listed before a 10 x 10 ignore square
  # it overlaps (the overlap stays target), and a 7 x 7 ignore listed before a 7 x 7 target (the
  # overlap stays ignore).
  w, h = 30, 12
  pair1 = (_box_mask(h, w, (0, 0, 9, 9)), _box_mask(h, w, (5, 0, 14, 9)))  # target, ignore
  pair2 = (_box_mask(h, w, (16, 0, 22, 6)), _box_mask(h, w, (19, 3, 25, 9)))  # ignore, target
  cases["c_equal_area"] = (w, h, {"text": ["q"], "is_sentence": False, "shapes": [
      _rect(0, 0, 9, 9, "target"), _rect(5, 0, 14, 9, "ignore"),
      _rect(16, 0, 22, 6, "ignore"), _rect(19, 3, 25, 9, "target")]},
      pair1[0] | (pair2[1] & ~pair2[0]), (pair1[1] & ~pair1[0]) | pair2[0])
  return cases


def _write_image(path, w, h, seed, orientation=None):
  arr = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
  kw = {}
  if orientation:
    exif = Image.Exif()
    exif[0x0112] = orientation
    kw["exif"] = exif.tobytes()
  Image.fromarray(arr).save(path, format="JPEG", quality=90, **kw)


def _fixture(root, folders, bad: bool):
  for folder in folders:
    (root / folder).mkdir(parents=True)
  train, val, test = (root / f for f in folders)
  for seed, (name, (w, h, anno, _, _)) in enumerate(_cases().items()):
    _write_image(train / f"{name}.jpg", w, h, seed)
    (train / f"{name}.json").write_text(json.dumps(anno))
  # EXIF orientation 6 (rotate 90 degrees clockwise): stored 12 wide x 20 high, upright 20 x 12.
  _write_image(val / "rotated.jpg", 12, 20, 7, orientation=6)
  (val / "rotated.json").write_text(json.dumps(
      {"text": ["left part"], "is_sentence": False, "shapes": [_rect(0, 0, 4, 11, "target")]}))
  _write_image(test / "t.jpg", 10, 10, 8)
  (test / "t.json").write_text(json.dumps(
      {"text": "a single string query", "is_sentence": 1, "shapes": [_rect(1, 1, 2, 2, "Target")]}))
  if not bad:
    return
  good = {"text": ["q"], "is_sentence": False, "shapes": [_rect(1, 1, 3, 3, "target")]}
  records = {
      "bad_missing_image": None,
      "bad_corrupt": good,
      "bad_json": "{not json",
      "bad_no_target": dict(good, shapes=[_rect(1, 1, 3, 3, "ignore")]),
      "bad_nan": dict(good, shapes=[{"label": "target", "points": [[1, 1], [float("nan"), 2], [3, 3]]}]),
      "bad_no_query": dict(good, text=["  "]),
      "bad_outside": dict(good, shapes=[_rect(50, 50, 60, 60, "target")]),
      "bad_circle": dict(good, shapes=[{"label": "target", "points": [[5, 5], [7, 7]],
                                       "shape_type": "circle"}]),
      "bad_size": dict(good, imageWidth=99, imageHeight=10),
  }
  for name, anno in records.items():
    if anno is None:
      (train / f"{name}.json").write_text(json.dumps(good))
      continue
    _write_image(train / f"{name}.jpg", 10, 10, 9)
    (train / f"{name}.json").write_text(anno if isinstance(anno, str) else json.dumps(anno))
  (train / "bad_corrupt.jpg").write_bytes(b"\xff\xd8\xff not really")
  _write_image(val / "bad_no_json.jpg", 10, 10, 10)


def _read(builder, split):
  source = builder.as_data_source(split=split)
  return {ex["name"].decode(): ex for ex in (source[i] for i in range(len(source)))}


DEFAULT = ("train", "val", "test")


def _raw_dir(builder):
  """<root>/raw for a builder built into <root>/data (data_dir = <root>/data/reasonseg/default/1.1.0)."""
  return Path(builder.data_dir).parents[3] / "raw"


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
  root = tmp_path_factory.mktemp("reasonseg")
  _fixture(root / "raw", DEFAULT, bad=False)
  return common.build(ReasonSeg, root / "data", root / "raw")


def test_masks_and_fields(clean):
  train = _read(clean, "train")
  cases = _cases()
  assert sorted(train) == sorted(cases)
  for name, (w, h, anno, target, ignore) in cases.items():
    ex = train[name]
    assert ex["image"].shape == (h, w, 3)
    assert ex["target_mask"].shape == (h, w, 1) and ex["target_mask"].dtype == np.uint8
    assert set(np.unique(ex["target_mask"])) <= {0, 1}
    np.testing.assert_array_equal(ex["target_mask"][..., 0], target.astype(np.uint8))
    np.testing.assert_array_equal(ex["ignore_mask"][..., 0], ignore.astype(np.uint8))
    assert [q.decode() for q in ex["queries"]] == [q.strip() for q in anno["text"]]
    assert bool(ex["is_sentence"]) == anno["is_sentence"]
  # pixel counts, by hand: 10x8 rectangle minus the 3x3 hole, 11x8 truncated rectangle, 4x4 square
  assert int(train["a_room"]["target_mask"].sum()) == 80 - 9 + 88 + 16
  assert int(train["a_room"]["ignore_mask"].sum()) == 9 + 40 * 10 - 16
  # equal areas: the 5 x 10 overlap of pair 1 is target, the 4 x 4 overlap of pair 2 is ignore
  assert int(train["c_equal_area"]["target_mask"].sum()) == 100 + 49 - 16
  assert int(train["c_equal_area"]["ignore_mask"].sum()) == 100 - 50 + 49

  rotated = _read(clean, "validation")["rotated"]
  with Image.open(_raw_dir(clean) / "val" / "rotated.jpg") as im:
    upright = np.asarray(ImageOps.exif_transpose(im))
  assert upright.shape == (12, 20, 3)
  np.testing.assert_array_equal(rotated["image"], upright)
  assert int(rotated["target_mask"].sum()) == 5 * 12

  t = _read(clean, "test")["t"]
  assert [q.decode() for q in t["queries"]] == ["a single string query"] and bool(t["is_sentence"])
  assert common.skipped_counts(clean) == {"train": {}, "validation": {}, "test": {}}


def test_bad_records_skipped_and_counted(tmp_path, clean):
  _fixture(tmp_path / "raw", DEFAULT, bad=True)
  built = common.build(ReasonSeg, tmp_path / "data", tmp_path / "raw")
  assert common.skipped_counts(built) == {
      "train": {"corrupt_image": 1, "empty_caption": 1, "malformed_json": 1, "missing_image": 1,
                "nan_coordinate": 1, "no_target": 2, "size_mismatch": 1, "unsupported_shape": 1},
      "validation": {"missing_json": 1},
      "test": {},
  }
  for split in ("train", "validation", "test"):
    got, want = _read(built, split), _read(clean, split)
    assert sorted(got) == sorted(want)
    for name in want:
      for feature in want[name]:
        np.testing.assert_array_equal(got[name][feature], want[name][feature], err_msg=feature)


def test_grounded_shapes_config_and_missing_folder(tmp_path):
  folders = tuple(f"reasonseg/{s}" for s in ("train", "validation", "test"))
  _fixture(tmp_path / "raw", folders, bad=False)
  built = common.build(ReasonSeg, tmp_path / "data", tmp_path / "raw", config="grounded_shapes")
  assert {s: built.info.splits[s].num_examples for s in ("train", "validation", "test")} == {
      "train": 3, "validation": 1, "test": 1}
  (tmp_path / "raw" / "reasonseg" / "test" / "t.json").unlink()
  (tmp_path / "raw" / "reasonseg" / "test" / "t.jpg").unlink()
  (tmp_path / "raw" / "reasonseg" / "test").rmdir()
  # Absent split folders are splits the user does not have: the rest builds.
  partial = common.build(ReasonSeg, tmp_path / "data2", tmp_path / "raw", config="grounded_shapes")
  assert set(partial.info.splits) == {"train", "validation"}
  for split in ("train", "validation"):
    for path in list((tmp_path / "raw" / "reasonseg" / split).iterdir()):
      path.unlink()
    (tmp_path / "raw" / "reasonseg" / split).rmdir()
  with pytest.raises(common.ManualFileError, match="reasonseg/test"):
    common.build(ReasonSeg, tmp_path / "data3", tmp_path / "raw", config="grounded_shapes")
