"""coco_panoptic and panoptic_narrative_grounding builders: the real COCO sample in ../shared/data and
small fixtures in the real formats (panoptic JSON + RGB-encoded id PNGs, PNG narrative JSON)."""

import copy
import json
import os

import numpy as np
import pytest
from PIL import Image

from tfds_builders import coco_panoptic, common
from tfds_builders.panoptic_narrative_grounding import PanopticNarrativeGrounding, phrase_masks

SAMPLE = os.environ.get("PIXELGROUND_COCO_PANOPTIC_SAMPLE", os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "coco_panoptic_sample"))


def _link_sample(root):
  """The real sample arranged in the official layout (symlinks, nothing copied)."""
  if not os.path.isdir(SAMPLE):
    pytest.skip(f"real COCO panoptic sample not found at {os.path.abspath(SAMPLE)} (set "
                "PIXELGROUND_COCO_PANOPTIC_SAMPLE to its directory)")
  (root / "annotations").mkdir(parents=True)
  os.symlink(os.path.abspath(os.path.join(SAMPLE, "panoptic_examples.json")),
             root / "annotations" / "panoptic_val2017.json")
  os.symlink(os.path.abspath(os.path.join(SAMPLE, "panoptic_examples")),
             root / "annotations" / "panoptic_val2017")
  os.symlink(os.path.abspath(os.path.join(SAMPLE, "input_images")), root / "val2017")
  with open(os.path.join(SAMPLE, "panoptic_examples.json")) as f:
    return json.load(f)


def _all(builder, split):
  ds = builder.as_data_source(split=split)
  return [ds[i] for i in range(len(ds))]


def test_real_sample_ids_and_areas(tmp_path):
  data = _link_sample(tmp_path / "manual")
  builder = common.build(coco_panoptic.CocoPanoptic, tmp_path / "data", tmp_path / "manual", config="2017")
  examples = _all(builder, "validation")
  assert len(examples) == len(data["annotations"]) == 2
  by_id = {a["image_id"]: a for a in data["annotations"]}
  for ex in examples:
    ann = by_id[int(ex["image/id"])]
    ids, counts = np.unique(coco_panoptic.segment_ids(ex["panoptic"]), return_counts=True)
    decoded = {int(i): int(c) for i, c in zip(ids, counts) if i != 0}
    assert decoded == {s["id"]: s["area"] for s in ann["segments_info"]}
    assert list(ex["segments"]["id"]) == [s["id"] for s in ann["segments_info"]]
    assert list(ex["segments"]["area"]) == [s["area"] for s in ann["segments_info"]]
    assert ex["image"].shape[:2] == ex["panoptic"].shape[:2]
  cats = builder.info.metadata["categories"]
  assert len(cats) == 133 and sum(c["isthing"] for c in cats) == 80
  assert common.skipped_counts(builder) == {"validation": {}}


def test_real_sample_narrative_grounding(tmp_path):
  data = _link_sample(tmp_path / "manual")
  ann = data["annotations"][0]
  cats = {c["id"]: c for c in data["categories"]}
  people = [s["id"] for s in ann["segments_info"] if s["category_id"] == 1][:2]
  stuff = next(s for s in ann["segments_info"] if not cats[s["category_id"]]["isthing"])
  narratives = [{"image_id": ann["image_id"], "caption": "In this picture two people stand near it.",
                 "segments": [
                     {"utterance": "In this picture", "noun": False, "plural": False, "segment_ids": []},
                     {"utterance": "two people", "noun": True, "plural": True,
                      "segment_ids": [str(i) for i in people]},
                     {"utterance": "stand near", "noun": False, "plural": False, "segment_ids": []},
                     {"utterance": "it", "noun": True, "plural": False, "segment_ids": [stuff["id"]]}]}]
  with open(tmp_path / "manual" / "annotations" / "png_coco_val2017.json", "w") as f:
    json.dump(narratives, f)
  builder = common.build(PanopticNarrativeGrounding, tmp_path / "data", tmp_path / "manual",
                         config="2017")
  (ex,) = _all(builder, "validation")
  assert list(ex["phrases"]["plural"]) == [False, True, False, False]
  assert list(ex["phrases"]["isthing"]) == [False, True, False, False]
  assert list(ex["phrase_offsets"]) == [0, 0, 2, 2, 3]
  masks = phrase_masks(ex)
  areas = {s["id"]: s["area"] for s in ann["segments_info"]}
  assert masks.shape[0] == 4 and not masks[0].any()
  assert int(masks[1].sum()) == sum(areas[i] for i in people)
  assert int(masks[3].sum()) == stuff["area"]
  segs = ex["segments"]["id"]
  assert [int(segs[i]) for i in ex["phrase_segment_index"]] == people + [stuff["id"]]


# ---- a synthetic fixture with bad records -----------------------------------------------------------

CATEGORIES = [{"id": 1, "name": "circle", "supercategory": "shape", "isthing": 1},
              {"id": 7, "name": "sky", "supercategory": "stuff", "isthing": 0}]


def _write_panoptic(root, images):
  """images: {image_id: (H, W, [(segment id, category, (y0, y1, x0, x1)), ...])}; later rectangles
  overwrite earlier ones; JSON areas/boxes are computed from the written map."""
  (root / "annotations" / "panoptic_val2017").mkdir(parents=True)
  (root / "val2017").mkdir()
  js = {"images": [], "annotations": [], "categories": CATEGORIES}
  for image_id, (h, w, rects) in images.items():
    ids = np.zeros((h, w), np.int64)
    for sid, _, (y0, y1, x0, x1) in rects:
      ids[y0:y1, x0:x1] = sid
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)
    Image.fromarray(rgb).save(root / "annotations" / "panoptic_val2017" / f"{image_id:012d}.png")
    pix = np.random.default_rng(image_id).integers(0, 255, (h, w, 3), dtype=np.uint8)
    Image.fromarray(pix).save(root / "val2017" / f"{image_id:012d}.jpg")
    segs = []
    for sid, cat, _ in rects:
      ys, xs = np.nonzero(ids == sid)
      segs.append({"id": sid, "category_id": cat, "area": int(len(ys)), "iscrowd": 0,
                   "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1),
                            int(ys.max() - ys.min() + 1)]})
    js["images"].append({"id": image_id, "file_name": f"{image_id:012d}.jpg", "height": h, "width": w})
    js["annotations"].append({"image_id": image_id, "file_name": f"{image_id:012d}.png",
                              "segments_info": segs})
  return js


def _save(root, js, narratives=None):
  with open(root / "annotations" / "panoptic_val2017.json", "w") as f:
    json.dump(js, f)
  if narratives is not None:
    with open(root / "annotations" / "png_coco_val2017.json", "w") as f:
      json.dump(narratives, f)


IMAGES = {i: (24, 32, [(1000 + i, 7, (0, 12, 0, 32)), (2000 + i, 1, (4, 20, 3, 15)),
                       (3000 + i, 1, (10, 22, 16, 30))]) for i in range(1, 8)}


def _narr(i):
  return {"image_id": i, "caption": "two circles under the sky", "segments": [
      {"utterance": "two circles", "noun": True, "plural": True, "segment_ids": [2000 + i, 3000 + i]},
      {"utterance": "under", "noun": False, "plural": False, "segment_ids": []},
      {"utterance": "the sky", "noun": True, "plural": False, "segment_ids": [1000 + i]}]}


def _clean(root):
  js = _write_panoptic(root, {i: IMAGES[i] for i in (1, 2)})
  _save(root, js, [_narr(1), _narr(2)])


def _bad(root):
  js = _write_panoptic(root, IMAGES)
  anns = {a["image_id"]: a for a in js["annotations"]}
  os.remove(root / "val2017" / f"{3:012d}.jpg")                                   # missing image
  (root / "val2017" / f"{4:012d}.jpg").write_bytes(b"\xff\xd8 not a jpeg")          # corrupt image
  anns[5]["segments_info"].append({"id": 99, "category_id": 1, "area": 5, "iscrowd": 0,
                                   "bbox": [0, 0, 2, 2]})                           # id not in PNG
  anns[6]["segments_info"][1]["bbox"] = [3, 4, 0, 16]                               # zero-area box
  anns[7]["segments_info"][1]["bbox"] = [3, float("nan"), 12, 16]                   # NaN
  narratives = [_narr(i) for i in range(1, 8)]
  bad_phrase = copy.deepcopy(_narr(1))
  bad_phrase["segments"][0]["segment_ids"] = [2001, 4242]                           # id not in image
  narratives += [bad_phrase, {"image_id": 2, "segments": []},                       # no caption field
                 _narr(1) | {"image_id": 12345}]                                    # no panoptic ann
  _save(root, js, narratives)


def _same(a_list, b_list, key):
  a_list, b_list = sorted(a_list, key=key), sorted(b_list, key=key)
  assert len(a_list) == len(b_list)
  for a, b in zip(a_list, b_list):
    for k in a:
      va, vb = a[k], b[k]
      if isinstance(va, dict):
        for kk in va:
          np.testing.assert_array_equal(np.asarray(va[kk]), np.asarray(vb[kk]))
      else:
        np.testing.assert_array_equal(np.asarray(va), np.asarray(vb))


def test_bad_records_counted_and_rest_identical(tmp_path):
  _clean(tmp_path / "clean")
  _bad(tmp_path / "bad")
  clean = common.build(coco_panoptic.CocoPanoptic, tmp_path / "d_clean", tmp_path / "clean", config="2017")
  bad = common.build(coco_panoptic.CocoPanoptic, tmp_path / "d_bad", tmp_path / "bad", config="2017")
  assert common.skipped_counts(bad) == {"validation": {
      "corrupt_image": 1, "missing_image": 1, "missing_segment": 1, "nan_coordinate": 1,
      "zero_area_box": 1}}
  _same(_all(bad, "validation"), _all(clean, "validation"), key=lambda e: int(e["image/id"]))

  clean_g = common.build(PanopticNarrativeGrounding, tmp_path / "g_clean", tmp_path / "clean",
                         config="2017")
  bad_g = common.build(PanopticNarrativeGrounding, tmp_path / "g_bad", tmp_path / "bad", config="2017")
  assert common.skipped_counts(bad_g) == {"validation": {
      "corrupt_image": 1, "malformed_json": 1, "missing_annotation": 1, "missing_image": 1,
      "missing_segment": 2, "nan_coordinate": 1, "zero_area_box": 1}}
  _same(_all(bad_g, "validation"), _all(clean_g, "validation"), key=lambda e: int(e["image/id"]))
  ex = _all(clean_g, "validation")[0]
  masks = phrase_masks(ex)
  ids = coco_panoptic.segment_ids(ex["panoptic"])
  i = int(ex["image/id"])
  np.testing.assert_array_equal(masks[0], (ids == 2000 + i) | (ids == 3000 + i))
  np.testing.assert_array_equal(masks[2], ids == 1000 + i)


def test_missing_manual_files(tmp_path):
  (tmp_path / "m").mkdir()
  (tmp_path / "m" / "x").write_text("not empty")
  with pytest.raises(common.ManualFileError, match="panoptic_val2017.json"):
    common.build(coco_panoptic.CocoPanoptic, tmp_path / "d", tmp_path / "m", config="2017")
  _clean(tmp_path / "m2")
  os.rename(tmp_path / "m2" / "val2017", tmp_path / "m2" / "elsewhere")
  with pytest.raises(common.ManualFileError, match="val2017"):
    common.build(coco_panoptic.CocoPanoptic, tmp_path / "d2", tmp_path / "m2", config="2017")
