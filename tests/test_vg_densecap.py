"""tfds_builders/vg_densecap.py on a small Visual Genome fixture in the raw format: box values (pixels and
normalised), splits, missing manual files, and bad records skipped and counted by kind."""

import json
import math

import numpy as np
import pytest
from PIL import Image

from tfds_builders import common
from tfds_builders.vg_densecap import VgDensecap

# image id -> (width, height, PIL mode, split)
IMAGES = {1: (40, 30, "RGB", "train"), 2: (50, 40, "RGB", "train"), 3: (64, 48, "L", "train"),
          4: (32, 32, "RGB", "val"), 5: (20, 24, "RGB", "test")}
# image id -> [(region_id, x, y, w, h, phrase, expected pixel xyxy)]
REGIONS = {
    1: [(11, 5, 6, 10, 8, "a red square ", (5, 6, 15, 14)),
        (12, 30, 20, 20, 20, "partly outside", (30, 20, 40, 30))],  # clipped to the 40x30 image
    2: [(21, 0, 0, 50, 40, "everything", (0, 0, 50, 40))],
    3: [(31, 1.5, 2.25, 10.5, 20, "fractional", (1.5, 2.25, 12, 22.25)),
        (32, 60, 40, 4, 8, "corner", (60, 40, 64, 48))],
    # image_data.json says 64x64 while the file is 32x32: coordinates are halved
    4: [(41, 16, 8, 32, 16, "scaled", (8, 4, 24, 12))],
    5: [(51, 2, 3, 4, 5, "test region", (2, 3, 6, 8))],
}
DECLARED = {4: (64, 64)}


def _write_image(path, w, h, mode, seed):
  rng = np.random.default_rng(seed)
  arr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
  Image.fromarray(arr).convert(mode).save(path, format="JPEG", quality=90)


def _region(rid, x, y, w, h, phrase, image_id):
  return {"region_id": rid, "x": x, "y": y, "width": w, "height": h, "phrase": phrase,
          "image_id": image_id}


def _fixture(root, bad: bool):
  (root / "images").mkdir(parents=True)
  for image_id, (w, h, mode, _) in IMAGES.items():
    _write_image(root / "images" / f"{image_id}.jpg", w, h, mode, image_id)
  regions = {i: [_region(r[0], *r[1:6], i) for r in rs] for i, rs in REGIONS.items()}
  splits = {"train": [1, 2, 3], "val": [4], "test": [5]}
  sizes = {i: DECLARED.get(i, (w, h)) for i, (w, h, _, _) in IMAGES.items()}
  if bad:
    regions[1][1:1] = [
        _region(13, math.nan, 1, 2, 3, "nan x", 1),
        _region(14, 1, 1, 0, 3, "zero width", 1),
        _region(15, 1, 1, 2, 3, "   ", 1),
        {"region_id": 16, "x": 1, "y": 1, "width": 2, "phrase": "no height"},
        _region(17, 100, 1, 5, 5, "right of the image", 1),
    ]
    _write_image(root / "images" / "7.jpg", 10, 10, "RGB", 7)
    (root / "images" / "7.jpg").write_bytes((root / "images" / "7.jpg").read_bytes()[:100])  # truncated
    _write_image(root / "images" / "8.jpg", 10, 10, "RGB", 8)
    _write_image(root / "images" / "9.jpg", 10, 10, "RGB", 9)
    regions[6] = [_region(61, 1, 1, 2, 2, "image file missing", 6)]
    regions[7] = [_region(71, 1, 1, 2, 2, "image file corrupt", 7)]
    regions[8] = [_region(81, 1, 1, 2, -2, "negative height", 8)]
    sizes.update({i: (10, 10) for i in (6, 7, 8, 9)})
    splits["train"] += [6, 7, 8]
    splits["val"].append(9)  # an image with no region_descriptions entry
  (root / "region_descriptions.json").write_text(json.dumps(
      [{"regions": rs, "id": i} for i, rs in regions.items()]))
  (root / "image_data.json").write_text(json.dumps(
      [{"image_id": i, "width": w, "height": h, "url": f"https://example.invalid/{i}.jpg"}
       for i, (w, h) in sizes.items()]))
  (root / "densecap_splits.json").write_text(json.dumps(splits))


def _read(builder, split):
  source = builder.as_data_source(split=split)
  return {int(ex["id"]): ex for ex in (source[i] for i in range(len(source)))}


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
  root = tmp_path_factory.mktemp("vg")
  _fixture(root / "raw", bad=False)
  return common.build(VgDensecap, root / "data", root / "raw")


def test_values(clean):
  split_of = {"train": "train", "val": "validation", "test": "test"}
  for split in ("train", "validation", "test"):
    examples = _read(clean, split)
    assert sorted(examples) == sorted(i for i, v in IMAGES.items() if split_of[v[3]] == split)
    for image_id, ex in examples.items():
      w, h = IMAGES[image_id][:2]
      assert ex["image"].shape == (h, w, 3) and ex["image"].dtype == np.uint8
      want = REGIONS[image_id]
      assert list(ex["region_ids"]) == [r[0] for r in want]
      assert [p.decode() for p in ex["phrases"]] == [r[5].strip() for r in want]
      pixel = np.array([r[6] for r in want], np.float32)
      assert ex["boxes"].dtype == np.float32
      np.testing.assert_allclose(ex["boxes"], pixel, rtol=0, atol=1e-5)
      normalised = np.stack([pixel[:, 1] / h, pixel[:, 0] / w, pixel[:, 3] / h, pixel[:, 2] / w], -1)
      np.testing.assert_allclose(ex["bboxes"], normalised, rtol=0, atol=1e-6)
  assert common.skipped_counts(clean) == {"train": {}, "validation": {}, "test": {}}


def test_bad_records_skipped_and_counted(tmp_path, clean):
  _fixture(tmp_path / "raw", bad=True)
  built = common.build(VgDensecap, tmp_path / "data", tmp_path / "raw")
  assert common.skipped_counts(built) == {
      "train": {"corrupt_image": 1, "empty_caption": 1, "malformed_json": 1, "missing_image": 1,
                "nan_coordinate": 1, "no_regions": 1, "zero_area_box": 3},
      "validation": {"no_regions": 1},
      "test": {},
  }
  for split in ("train", "validation", "test"):
    got, want = _read(built, split), _read(clean, split)
    assert sorted(got) == sorted(want)
    for image_id in want:
      for name in want[image_id]:
        np.testing.assert_array_equal(got[image_id][name], want[image_id][name], err_msg=name)


def test_missing_manual_file(tmp_path):
  _fixture(tmp_path / "raw", bad=False)
  (tmp_path / "raw" / "densecap_splits.json").unlink()
  with pytest.raises(common.ManualFileError, match="densecap_splits.json"):
    common.build(VgDensecap, tmp_path / "data", tmp_path / "raw")
