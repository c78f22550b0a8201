"""RefCoco builder: a small refer-format fixture (Python 2 style pickle, COCO instances with polygon,
compressed-RLE and uncompressed-RLE segmentations, JPEG images) built without TensorFlow and read back."""

import json
import math
import os
import pickle

import numpy as np
import pytest
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from tfds_builders import common
from tfds_builders.refcoco import RefCoco, fix_text, load_refs

# image id -> (width, height, PIL mode)
IMAGES = {1: (64, 48, "RGB"), 2: (80, 60, "RGB"), 3: (56, 40, "L"), 4: (72, 50, "CMYK")}


def write_jpeg(path, width, height, mode="RGB", seed=0):
  """A photo-like JPEG: a colour gradient with a few filled shapes."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:height, 0:width]
  arr = np.stack([xx * 255 // width, yy * 255 // height, (xx + yy) * 127 // (width + height)], -1)
  im = Image.fromarray(arr.astype(np.uint8))
  draw = ImageDraw.Draw(im)
  for _ in range(3):
    x0, y0 = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
    colour = tuple(int(v) for v in rng.integers(0, 255, 3))
    draw.ellipse([x0, y0, x0 + width // 3, y0 + height // 3], fill=colour)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  im.convert(mode).save(path, format="JPEG", quality=90)


def uncompressed_rle(mask):
  """COCO uncompressed RLE of a 0/1 (height, width) mask: run lengths in column-major order, starting
  with a run of zeros."""
  flat = mask.T.reshape(-1)
  counts, value, run = [], 0, 0
  for v in flat:
    if v == value:
      run += 1
    else:
      counts.append(run)
      value, run = v, 1
  counts.append(run)
  return {"size": list(mask.shape), "counts": counts}


def ellipse_mask(width, height, box):
  im = Image.new("L", (width, height), 0)
  ImageDraw.Draw(im).ellipse(box, fill=1)
  return np.array(im, dtype=np.uint8)


def rle_bbox(mask):
  return [float(v) for v in mask_utils.toBbox(mask_utils.encode(np.asfortranarray(mask)))]


def sentence(sent_id, text):
  return {"tokens": text.split(), "raw": text.capitalize() + ".", "sent": text, "sent_id": sent_id}


def make_ref(ref_id, ann_id, image_id, split, sentences, category_id=1):
  return {"ref_id": ref_id, "ann_id": ann_id, "image_id": image_id, "split": split,
          "sentences": sentences, "sent_ids": [s["sent_id"] for s in sentences],
          "category_id": category_id, "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg"}


def clean_fixture():
  """(refs, instances) of a clean dataset: 6 refs over 4 images, splits train 3 / val 1 / testA 1 /
  testB 1."""
  w1, h1, _ = IMAGES[1]
  rle_mask = ellipse_mask(w1, h1, [30, 10, 55, 40])
  rle_counts = mask_utils.encode(np.asfortranarray(rle_mask))["counts"].decode("ascii")
  w2, h2, _ = IMAGES[2]
  crowd_mask = ellipse_mask(w2, h2, [5, 20, 45, 58])
  anns = [
      # two polygons (a square and a triangle)
      {"id": 101, "image_id": 1, "category_id": 1, "iscrowd": 0,
       "segmentation": [[4.0, 4.0, 20.0, 4.0, 20.0, 20.0, 4.0, 20.0], [22.0, 30.0, 28.0, 44.0, 16.0, 44.0]],
       "bbox": [4.0, 4.0, 24.0, 40.0], "area": 0.0},
      # compressed RLE (counts string, as in instances.json)
      {"id": 102, "image_id": 1, "category_id": 18, "iscrowd": 0,
       "segmentation": {"size": [h1, w1], "counts": rle_counts}, "bbox": rle_bbox(rle_mask), "area": 0.0},
      # uncompressed RLE (counts list, as COCO stores crowd regions)
      {"id": 103, "image_id": 2, "category_id": 1, "iscrowd": 1,
       "segmentation": uncompressed_rle(crowd_mask), "bbox": rle_bbox(crowd_mask), "area": 0.0},
      {"id": 104, "image_id": 3, "category_id": 3, "iscrowd": 0,
       "segmentation": [[10.5, 5.5, 40.0, 8.0, 30.0, 35.0]], "bbox": [10.5, 5.5, 29.5, 29.5], "area": 0.0},
      # the box pokes out of the image on the right: it is clipped to the image width (72)
      {"id": 105, "image_id": 4, "category_id": 1, "iscrowd": 0,
       "segmentation": [[50.0, 10.0, 71.5, 10.0, 71.5, 30.0, 50.0, 30.0]], "bbox": [50.0, 10.0, 23.0, 20.0],
       "area": 0.0},
      {"id": 106, "image_id": 2, "category_id": 62, "iscrowd": 0,
       "segmentation": [[50.0, 5.0, 75.0, 5.0, 75.0, 25.0, 50.0, 25.0]], "bbox": [50.0, 5.0, 25.0, 20.0],
       "area": 0.0},
  ]
  refs = [
      make_ref(1, 101, 1, "train", [sentence(11, "left square thing"), sentence(12, "the blue one")]),
      make_ref(2, 102, 1, "train", [sentence(21, "round thing on the right")], category_id=18),
      make_ref(3, 103, 2, "train", [sentence(31, "crowd of people"), sentence(32, "people at left"),
                                    sentence(33, "the man in the café")]),
      make_ref(4, 104, 3, "val", [sentence(41, "triangle")], category_id=3),
      make_ref(5, 105, 4, "testA", [sentence(51, "person at the right edge")]),
      make_ref(6, 106, 2, "testB", [sentence(61, "top right box")], category_id=62),
  ]
  return refs, anns


def write_fixture(root, refs, anns, images=IMAGES, dataset="refcoco", split_by="unc", coco=True,
                  image_split=None):
  """Writes `{dataset}/refs({split_by}).p`, `{dataset}/instances.json` and the images under `root`."""
  os.makedirs(os.path.join(root, dataset), exist_ok=True)
  with open(os.path.join(root, dataset, f"refs({split_by}).p"), "wb") as f:
    pickle.dump(refs, f, protocol=2)
  instances = {
      "info": {"description": "fixture"}, "licenses": [],
      "images": [{"id": i, "file_name": f"COCO_train2014_{i:012d}.jpg", "width": w, "height": h}
                 for i, (w, h, _) in images.items()],
      "annotations": anns,
      "categories": [{"id": c, "name": f"c{c}", "supercategory": "x"} for c in (1, 3, 18, 62)],
  }
  with open(os.path.join(root, dataset, "instances.json"), "w") as f:
    json.dump(instances, f)
  for i, (w, h, mode) in images.items():
    if coco:
      path = os.path.join(root, "images", "train2014", f"COCO_train2014_{i:012d}.jpg")
    else:
      path = os.path.join(root, "images", image_split[i], f"{i:012d}.jpg")
    write_jpeg(path, w, h, mode, seed=i)


def read_split(builder, split):
  return {int(e["ref_id"]): e for e in (builder.as_data_source(split)[i]
                                        for i in range(len(builder.as_data_source(split))))}


def ann_area(ann, height, width):
  segm = ann["segmentation"]
  if isinstance(segm, list):
    rle = mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
  elif isinstance(segm["counts"], list):
    rle = mask_utils.frPyObjects(segm, height, width)
  else:
    rle = segm
  return int(mask_utils.area(mask_utils.encode(np.asfortranarray(mask_utils.decode(rle)))))


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
  root = tmp_path_factory.mktemp("refcoco_clean")
  refs, anns = clean_fixture()
  write_fixture(str(root / "manual"), refs, anns)
  builder = common.build(RefCoco, root / "data", root / "manual", config="refcoco_unc")
  return builder, refs, anns


def test_values(clean):
  builder, refs, anns = clean
  assert {s: builder.info.splits[s].num_examples for s in ("train", "val", "testA", "testB")} == {
      "train": 3, "val": 1, "testA": 1, "testB": 1}
  anns_by_id = {a["id"]: a for a in anns}
  got = {}
  for split in ("train", "val", "testA", "testB"):
    got.update(read_split(builder, split))
  assert sorted(got) == [1, 2, 3, 4, 5, 6]
  for ref in refs:
    ex, ann = got[ref["ref_id"]], anns_by_id[ref["ann_id"]]
    width, height, _ = IMAGES[ref["image_id"]]
    assert (int(ex["image/id"]), int(ex["ann_id"]), int(ex["category_id"])) == (
        ref["image_id"], ref["ann_id"], ann["category_id"])
    assert (int(ex["image/width"]), int(ex["image/height"])) == (width, height)
    assert ex["image"].shape == (height, width, 3) and ex["image"].dtype == np.uint8
    assert [s.decode() for s in ex["sentences"]] == [s["sent"] for s in ref["sentences"]]
    assert [s.decode() for s in ex["raw_sentences"]] == [s["raw"] for s in ref["sentences"]]
    assert list(ex["sent_ids"]) == ref["sent_ids"]
    # boxes: pixels xyxy (clipped to the image) and normalised yxyx
    x, y, w, h = ann["bbox"]
    xyxy = np.array([x, y, min(x + w, width), min(y + h, height)], np.float32)
    np.testing.assert_allclose(ex["box_xyxy"], xyxy, rtol=0, atol=1e-4)
    np.testing.assert_allclose(ex["box"], [xyxy[1] / height, xyxy[0] / width, xyxy[3] / height,
                                           xyxy[2] / width], rtol=0, atol=1e-6)
    # mask: image-sized, 0/1, as many pixels as pycocotools' area of the decoded segmentation
    mask = ex["mask"]
    assert mask.shape == (height, width, 1) and mask.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 1}
    assert int(mask.sum()) == ann_area(ann, height, width) > 0
  # the box of ref 5 pokes out of the image; its clipped pixel box is exact
  np.testing.assert_array_equal(got[5]["box_xyxy"], [50.0, 10.0, 72.0, 30.0])
  # RLE masks are exactly the masks they encode
  w1, h1, _ = IMAGES[1]
  np.testing.assert_array_equal(got[2]["mask"][..., 0], ellipse_mask(w1, h1, [30, 10, 55, 40]))
  w2, h2, _ = IMAGES[2]
  np.testing.assert_array_equal(got[3]["mask"][..., 0], ellipse_mask(w2, h2, [5, 20, 45, 58]))
  # the first polygon of ref 1 is the square [4, 20) x [4, 20)
  assert got[1]["mask"][4:20, 4:20].all() and not got[1]["mask"][:3].any()
  # greyscale and CMYK JPEGs come back as 3-channel images
  assert np.array_equal(got[4]["image"][..., 0], got[4]["image"][..., 1])
  assert got[5]["image"].shape == (50, 72, 3)
  assert common.skipped_counts(builder) == {s: {} for s in ("train", "val", "testA", "testB")}


def test_missing_manual_files(tmp_path):
  refs, anns = clean_fixture()
  write_fixture(str(tmp_path / "manual"), refs, anns)
  os.remove(tmp_path / "manual" / "refcoco" / "instances.json")
  with pytest.raises(common.ManualFileError, match=r"instances\.json"):
    common.build(RefCoco, tmp_path / "data", tmp_path / "manual", config="refcoco_unc")
  with pytest.raises(common.ManualFileError, match=r"refcocog/refs\(umd\)\.p"):
    common.build(RefCoco, tmp_path / "data", tmp_path / "manual", config="refcocog_umd")


def test_unsafe_pickle_refused(tmp_path):
  refs, anns = clean_fixture()
  write_fixture(str(tmp_path / "manual"), refs, anns)
  with open(tmp_path / "manual" / "refcoco" / "refs(unc).p", "wb") as f:
    pickle.dump([{"ref_id": 1, "payload": os.getcwd}], f, protocol=2)  # a pickled function
  with pytest.raises(ValueError, match="refusing to load"):
    common.build(RefCoco, tmp_path / "data", tmp_path / "manual", config="refcoco_unc")


def test_bad_records(clean, tmp_path):
  clean_builder, _, _ = clean
  refs, anns = clean_fixture()
  refs[1]["sentences"].append(sentence(22, "   "))  # an empty sentence: dropped, the ref is kept
  refs[1]["sent_ids"].append(22)
  images = {**IMAGES, 5: (40, 30, "RGB"), 6: (40, 30, "RGB")}
  anns += [
      {"id": 107, "image_id": 5, "category_id": 1, "segmentation": [[1.0, 1.0, 9.0, 1.0, 9.0, 9.0]],
       "bbox": [1.0, 1.0, 8.0, 8.0]},
      {"id": 108, "image_id": 6, "category_id": 1, "segmentation": [[1.0, 1.0, 9.0, 1.0, 9.0, 9.0]],
       "bbox": [1.0, 1.0, 8.0, 8.0]},
      {"id": 109, "image_id": 1, "category_id": 1, "segmentation": [[1.0, 1.0, 9.0, 1.0, 9.0, 9.0]],
       "bbox": [1.0, math.nan, 8.0, 8.0]},
      {"id": 110, "image_id": 2, "category_id": 1, "segmentation": [[1.0, 1.0, 9.0, 1.0, 9.0, 9.0]],
       "bbox": [1.0, 1.0, 0.0, 8.0]},
  ]
  s = [sentence(99, "some object")]
  malformed = make_ref(27, 101, 1, "train", s)
  del malformed["ann_id"]
  refs += [
      make_ref(20, 999, 1, "train", s),                            # missing_annotation
      make_ref(21, 107, 5, "train", s),                            # missing_image
      make_ref(22, 108, 6, "val", s),                              # corrupt_image
      make_ref(23, 109, 1, "train", s),                            # nan_coordinate
      make_ref(24, 110, 2, "val", s),                              # zero_area_box
      make_ref(25, 101, 1, "train", [sentence(98, " "), sentence(97, "")]),  # empty_caption
      make_ref(26, 101, 1, "testA", []),                           # empty_caption
      malformed,                                                   # malformed_json
      make_ref(1, 102, 1, "train", [sentence(96, "a repeated ref id")]),  # duplicate_id
  ]
  root = str(tmp_path / "manual")
  write_fixture(root, refs, anns, images=images)
  os.remove(os.path.join(root, "images", "train2014", f"COCO_train2014_{5:012d}.jpg"))
  corrupt = os.path.join(root, "images", "train2014", f"COCO_train2014_{6:012d}.jpg")
  with open(corrupt, "rb") as f:
    head = f.read(300)
  with open(corrupt, "wb") as f:  # a truncated JPEG
    f.write(head)

  builder = common.build(RefCoco, tmp_path / "data", root, config="refcoco_unc")
  assert common.skipped_counts(builder) == {
      "train": {"duplicate_id": 1, "empty_caption": 1, "empty_sentence": 1, "malformed_json": 1,
                "missing_annotation": 1, "missing_image": 1, "nan_coordinate": 1},
      "val": {"corrupt_image": 1, "zero_area_box": 1},
      "testA": {"empty_caption": 1},
      "testB": {},
  }
  for split in ("train", "val", "testA", "testB"):
    want, got = read_split(clean_builder, split), read_split(builder, split)
    assert sorted(got) == sorted(want)
    for ref_id, ex in want.items():
      assert sorted(got[ref_id]) == sorted(ex)
      for k, v in ex.items():
        np.testing.assert_array_equal(np.asarray(got[ref_id][k]), np.asarray(v), err_msg=f"{ref_id} {k}")


def test_grounded_shapes_config(tmp_path):
  refs, anns = clean_fixture()
  for r in refs:
    r["split"] = {"train": "train", "val": "val", "testA": "test", "testB": "test"}[r["split"]]
  image_split = {1: "train", 2: "train", 3: "validation", 4: "test"}
  refs[5]["image_id"], anns[5]["image_id"] = 4, 4  # the test split's refs are all of image 4
  anns[5]["segmentation"] = [[10.0, 5.0, 30.0, 5.0, 30.0, 25.0, 10.0, 25.0]]
  anns[5]["bbox"] = [10.0, 5.0, 20.0, 20.0]
  root = str(tmp_path / "manual")
  write_fixture(root, refs, anns, dataset="grounded_shapes", coco=False, image_split=image_split)
  builder = common.build(RefCoco, tmp_path / "data", root, config="grounded_shapes")
  assert {s: builder.info.splits[s].num_examples for s in ("train", "validation", "test")} == {
      "train": 3, "validation": 1, "test": 2}
  ex = read_split(builder, "validation")[4]
  assert ex["image"].shape == (40, 56, 3) and [s.decode() for s in ex["sentences"]] == ["triangle"]


def test_python2_byte_strings(tmp_path):
  # Python 2 pickles its `str` (bytes, here UTF-8) as SHORT_BINSTRING: [{"raw": "café"}] by hand.
  raw = "café".encode("utf-8")
  data = (b"\x80\x02]}U\x03raw" + b"U" + bytes([len(raw)]) + raw + b"sa.")
  path = tmp_path / "refs(unc).p"
  path.write_bytes(data)
  refs = load_refs(path)
  assert refs == [{"raw": "cafÃ©"}]  # latin-1, as pickle reads Python 2 strings
  assert fix_text(refs[0]["raw"]) == "café" and fix_text("the café ") == "the café"
