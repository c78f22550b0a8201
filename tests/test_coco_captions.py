"""CocoCaptions builder: a small fixture in the official captions_*.json layout with JPEG images, built
without TensorFlow and read back."""

import json
import os

import numpy as np
import pytest
from PIL import Image, ImageDraw

from tfds_builders import common
from tfds_builders.coco_captions import CocoCaptions

# split -> {image id: (width, height, [(caption id, caption)])}
CLEAN = {
    "train": {
        9: (64, 48, [(901, "A man riding a horse on a beach."), (902, "Someone rides a brown horse."),
                     (903, "A horse and rider near the sea."), (904, "A person on horseback."),
                     (905, "The horse walks along the shore.")]),
        25: (80, 60, [(252, "Two dogs playing in the grass."), (251, "Dogs chasing a ball in a park.")]),
        30: (56, 40, [(300, "  A red bus parked on a street. \n")]),
    },
    "val": {
        139: (72, 50, [(1390, "A living room with a couch and a tv."), (1391, "A small tidy lounge.")]),
        285: (48, 64, [(2850, "A large brown bear sitting in the grass.")]),
    },
}


def write_jpeg(path, width, height, seed=0):
  """A photo-like JPEG: a colour gradient with a filled ellipse."""
  yy, xx = np.mgrid[0:height, 0:width]
  arr = np.stack([xx * 255 // width, yy * 255 // height, np.full_like(xx, (seed * 37) % 256)], -1)
  im = Image.fromarray(arr.astype(np.uint8))
  ImageDraw.Draw(im).ellipse([width // 4, height // 4, width // 2, height // 2], fill=(200, 30, seed % 256))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  im.save(path, format="JPEG", quality=90)


def captions_json(images):
  """The captions_*.json object of {image id: (width, height, [(caption id, caption)])}."""
  return {
      "info": {"description": "fixture", "year": 2017}, "licenses": [],
      "images": [{"id": i, "file_name": f"{i:012d}.jpg", "width": w, "height": h, "license": 1}
                 for i, (w, h, _) in images.items()],
      "annotations": [{"image_id": i, "id": cid, "caption": c}
                      for i, (_, _, caps) in images.items() for cid, c in caps],
  }


def write_fixture(root, splits, ann_name="captions_{split}2017.json", image_dir="{split}2017"):
  """Writes the annotation files and the images of {split: images} under `root`; returns the data."""
  data = {}
  for split, images in splits.items():
    data[split] = captions_json(images)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    with open(os.path.join(root, "annotations", ann_name.format(split=split)), "w") as f:
      json.dump(data[split], f)
    for i, (w, h, _) in images.items():
      write_jpeg(os.path.join(root, image_dir.format(split=split), f"{i:012d}.jpg"), w, h, seed=i)
  return data


def read_split(builder, split):
  ds = builder.as_data_source(split)
  return {int(ds[i]["image/id"]): ds[i] for i in range(len(ds))}


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
  root = tmp_path_factory.mktemp("captions_clean")
  write_fixture(str(root / "manual"), CLEAN)
  return common.build(CocoCaptions, root / "data", root / "manual", config="2017")


def test_values(clean):
  assert {s: clean.info.splits[s].num_examples for s in ("train", "val")} == {"train": 3, "val": 2}
  for split, images in CLEAN.items():
    got = read_split(clean, split)
    assert sorted(got) == sorted(images)
    for image_id, (w, h, caps) in images.items():
      ex = got[image_id]
      caps = sorted(caps)
      assert ex["image"].shape == (h, w, 3) and ex["image"].dtype == np.uint8
      assert ex["image/filename"].decode() == f"{image_id:012d}.jpg"
      assert [c.decode() for c in ex["captions"]] == [c.strip() for _, c in caps]
      assert list(ex["caption_ids"]) == [cid for cid, _ in caps]
  assert common.skipped_counts(clean) == {"train": {}, "val": {}}


def test_missing_manual_files(tmp_path):
  root = tmp_path / "manual"
  write_fixture(str(root), CLEAN)
  os.remove(root / "annotations" / "captions_val2017.json")
  partial = common.build(CocoCaptions, tmp_path / "data", root, config="2017")  # train only
  assert set(partial.info.splits) == {"train"}
  os.remove(root / "annotations" / "captions_train2017.json")
  with pytest.raises(common.ManualFileError, match=r"annotations/captions_val2017\.json"):
    common.build(CocoCaptions, tmp_path / "data_none", root, config="2017")
  write_fixture(str(root), CLEAN)
  import shutil
  shutil.rmtree(root / "val2017")
  with pytest.raises(common.ManualFileError, match=r"val2017"):
    common.build(CocoCaptions, tmp_path / "data_noimg", root, config="2017")
  with pytest.raises(common.ManualFileError, match=r"nowhere does not exist"):
    common.build(CocoCaptions, tmp_path / "data_nowhere", tmp_path / "nowhere", config="2017")


def test_bad_records(clean, tmp_path):
  root = tmp_path / "manual"
  splits = {s: dict(images) for s, images in CLEAN.items()}
  splits["train"][9] = (64, 48, CLEAN["train"][9][2] + [(906, "   ")])  # dropped, the image is kept
  splits["train"][40] = (32, 32, [(400, "A cat on a mat.")])            # image file missing
  splits["train"][41] = (32, 32, [(410, "A dog on a log.")])            # image file truncated
  splits["val"][42] = (32, 32, [(420, ""), (421, " \t")])              # no caption left
  data = write_fixture(str(root), splits)
  os.remove(root / "train2017" / f"{40:012d}.jpg")
  corrupt = root / "train2017" / f"{41:012d}.jpg"
  corrupt.write_bytes(corrupt.read_bytes()[:200])
  data["train"]["annotations"] += [
      {"image_id": 25, "id": 253},                                # no caption: malformed
      {"image_id": 999, "id": 9990, "caption": "Nobody's image."},  # unknown image id
  ]
  data["train"]["images"] += [
      {"id": 43, "width": 32, "height": 32},                       # no file_name: malformed
      {"id": 25, "file_name": "again.jpg", "width": 32, "height": 32},  # repeated image id
  ]
  with open(root / "annotations" / "captions_train2017.json", "w") as f:
    json.dump(data["train"], f)

  builder = common.build(CocoCaptions, tmp_path / "data", root, config="2017")
  assert common.skipped_counts(builder) == {
      "train": {"corrupt_image": 1, "duplicate_id": 1, "empty_caption": 1, "malformed_json": 2,
                "missing_image": 1, "unknown_image": 1},
      "val": {"empty_caption": 2, "no_captions": 1},
  }
  for split in ("train", "val"):
    want, got = read_split(clean, split), read_split(builder, split)
    assert sorted(got) == sorted(want)
    for image_id, ex in want.items():
      assert sorted(got[image_id]) == sorted(ex)
      for k, v in ex.items():
        np.testing.assert_array_equal(np.asarray(got[image_id][k]), np.asarray(v), err_msg=f"{image_id} {k}")


def test_grounded_shapes_config(tmp_path):
  root = tmp_path / "manual"
  splits = {"train": CLEAN["train"], "validation": CLEAN["val"], "test": {7: (40, 30, [(70, "A square.")])}}
  write_fixture(str(root), splits, ann_name="captions_{split}.json", image_dir="images/{split}")
  builder = common.build(CocoCaptions, tmp_path / "data", root, config="grounded_shapes")
  assert {s: builder.info.splits[s].num_examples for s in ("train", "validation", "test")} == {
      "train": 3, "validation": 2, "test": 1}
  assert [c.decode() for c in read_split(builder, "test")[7]["captions"]] == ["A square."]
