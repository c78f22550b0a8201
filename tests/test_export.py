"""pixelground.inference.export: records written in the official results formats load in the official
tools (pycocotools' COCO / COCOeval, pycocoevalcap's COCOEvalCap) and give the numbers of
pixelground's own evaluators. Records are built here (no model): dense-caption records from the real
COCO panoptic sample's COCO-format file (tests/coco_files.py), caption records by hand."""

import contextlib
import io
import json
import os

import numpy as np
import pytest

import coco_files
from pixelground import metrics as M
from pixelground.inference import export


def _dense_records(tmp_path):
  """dense_caption records (eval_lib's fields): predictions and ground truth per image, xyxy pixels,
  rounded as eval_lib rounds them; many tied scores."""
  gt_path, masks = coco_files.instances(tmp_path)
  with open(gt_path) as f:
    gt = json.load(f)
  boxes, _ = coco_files.results(gt, masks, np.random.default_rng(3))
  xyxy = lambda b: [round(b[0], 2), round(b[1], 2), round(b[0] + b[2], 2), round(b[1] + b[3], 2)]  # noqa: E731
  records = []
  for index, image in enumerate(gt["images"]):
    dets = [d for d in boxes if d["image_id"] == image["id"]]
    anns = [a for a in gt["annotations"] if a["image_id"] == image["id"] and not a["iscrowd"]]
    records.append({"index": index, "image_id": image["id"], "boxes": [xyxy(d["bbox"]) for d in dets],
                    "scores": [round(d["score"], 4) for d in dets],
                    "captions": [f"thing {d['category_id']}" for d in dets],
                    "gt_boxes": [xyxy(a["bbox"]) for a in anns],
                    "gt_phrases": [f"thing {a['category_id']}" for a in anns]})
  return records


def test_detection_results_load_in_pycocotools_and_match(tmp_path):
  from pycocotools.coco import COCO
  from pycocotools.cocoeval import COCOeval

  records = _dense_records(tmp_path)
  paths = export.write_coco(str(tmp_path / "out"), "7", {"dense": records}, {"dense": "dense_caption"})
  assert [os.path.basename(p) for p in paths] == ["dense_7_detections.json", "dense_7_regions_gt.json"]
  with contextlib.redirect_stdout(io.StringIO()):
    coco = COCO(paths[1])
    res = coco.loadRes(paths[0])
    ev = COCOeval(coco, res, "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  assert len(res.getAnnIds()) == sum(len(r["boxes"]) for r in records) > 250
  ours = M.DetectionEvaluator()
  for r in reversed(records):  # any order: ties across images break by image id
    n, g = len(r["boxes"]), len(r["gt_boxes"])
    ours.add(np.reshape(r["boxes"], (n, 4)), r["scores"], np.ones(n), np.reshape(r["gt_boxes"], (g, 4)),
             np.ones(g), image_id=r["image_id"])
  np.testing.assert_allclose(ours.result()["stats"], ev.stats, rtol=0, atol=1e-12)
  assert 0.05 < ev.stats[0] < 0.95
  print("\nexported detections, COCOeval:", np.round(ev.stats, 5).tolist())


def test_ids_fall_back_to_record_index():
  recs = [{"index": 0, "image_id": 5, "caption": "a", "references": ["a b"]},
          {"index": 1, "image_id": 5, "caption": "b", "references": ["b c", "c"]}]
  results, gt = export.caption_results(recs)
  assert [r["image_id"] for r in results] == [0, 1]  # two records of image 5: indices
  assert [im["source_image_id"] for im in gt["images"]] == [5, 5]
  assert [(a["image_id"], a["caption"]) for a in gt["annotations"]] == [(0, "a b"), (1, "b c"), (1, "c")]
  recs[1]["image_id"] = 6
  assert [r["image_id"] for r in export.caption_results(recs)[0]] == [5, 6]


def test_caption_results_load_in_pycocoevalcap_and_match(tmp_path, monkeypatch):
  cap_eval = coco_files.caption_eval(monkeypatch)
  from pycocotools.coco import COCO
  records = [
      {"index": 0, "image_id": 139, "caption": "a woman cutting a cake with a knife",
       "references": ["A woman wearing a net on her head cutting a cake.",
                      "A woman cutting a large white sheet cake."]},
      {"index": 1, "image_id": 285, "caption": "a brown bear sitting in the grass",
       "references": ["The large brown bear has a black nose.",
                      "Closeup of a brown bear sitting in a grassy area."]},
      {"index": 2, "image_id": 632, "caption": "a bedroom with a bed and a book shelf",
       "references": ["A bedroom with a bookshelf full of books.",
                      "This room has a bed with blue sheets and a large bookcase"]},
  ]
  paths = export.write_coco(str(tmp_path), "3", {"cap": records}, {"cap": "caption"})
  with contextlib.redirect_stdout(io.StringIO()):
    coco = COCO(paths[1])
    res = coco.loadRes(paths[0])
    official = cap_eval.COCOEvalCap(coco, res)
    official.evaluate()
  ours = M.caption_metrics({r["image_id"]: r["references"] for r in records},
                           {r["image_id"]: r["caption"] for r in records})
  for k, v in ours.items():
    assert v == pytest.approx(official.eval[k], abs=1e-12), k
  print("\nexported captions, COCOEvalCap:", {k: round(official.eval[k], 5) for k in ours})


def test_image_id_of_examples():
  assert export.image_id({"image/id": np.int64(139)}) == 139  # COCO (TFDS int64 scalar)
  assert export.image_id({"id": np.asarray(7)}) == 7  # Visual Genome
  assert export.image_id({"image/id": b"000123"}) == 123  # a numeric string
  assert export.image_id({"image/id": b"0a1b2c3d4e5f6a7b"}) == "0a1b2c3d4e5f6a7b"  # Open Images
  assert export.image_id({}) is None
