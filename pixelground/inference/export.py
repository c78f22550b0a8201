"""Predictions in the benchmarks' official results formats, so that users can score them with the
official tools too (`python -m pixelground.evaluate --format=coco`; docs/metrics.md).

From the per-example records of `pixelground.inference.eval_lib` (what predictions_<tag>.jsonl holds),
per task, into `out_dir`:

  dense_caption   <task>_<tag>_detections.json   COCO detection results: [{"image_id", "category_id": 1,
                                                 "bbox": [x, y, w, h], "score"}], pixels of the original
                                                 image, every predicted region (its caption stays in
                                                 predictions.jsonl: a "caption" key would make
                                                 pycocotools' loadRes read the file as captions)
                  <task>_<tag>_regions_gt.json   its ground-truth regions as a COCO instances file (one
                                                 category, 1 "region"; area = w·h; no crowd; the
                                                 region's text as "phrase") for pycocotools' COCOeval
                                                 (class-agnostic box AP)
  caption,        <task>_<tag>_captions.json     COCO caption results [{"image_id", "caption"}]
  region_caption  <task>_<tag>_captions_gt.json  the references as a COCO captions file (images +
                                                 annotations {"image_id", "id", "caption"}) for
                                                 pycocoevalcap's COCOEvalCap
  panoptic        panoptic_<task>_<tag>/         COCO panoptic results (PNG + JSON), written by
                                                 `eval_lib.Evaluator.write` in every format

Image ids: the dataset's (COCO / VG ids) when every record of the task has its own; otherwise (several
records per image, as region captions or narratives) the record's index, with the dataset id kept as
"source_image_id". Scores and boxes are as the records hold them (boxes rounded to 0.01 pixel, scores
to 1e-4); `pixelground.metrics` scores the same values, so the official tools give the same numbers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

import numpy as np

FORMATS = ("jsonl", "coco")
CAPTION_TASKS = ("caption", "region_caption")


def image_id(ex: Mapping):
  """The dataset's id of an example's image (COCO / VG int, Localized Narratives string), or None."""
  v = ex.get("image/id", ex.get("id"))
  if v is None:
    return None
  v = v if isinstance(v, (bytes, str)) else np.asarray(v).item()
  v = v.decode() if isinstance(v, bytes) else v
  return int(v) if isinstance(v, str) and v.isdigit() else v


def _ids(records: Sequence[Mapping]) -> list:
  """One id per record: its "image_id" when all are present and distinct, else its "index"."""
  ids = [r.get("image_id") for r in records]
  if all(i is not None for i in ids) and len(set(ids)) == len(ids):
    return ids
  return [r["index"] for r in records]


def detection_results(records: Sequence[Mapping]) -> list[dict]:
  """dense_caption records → COCO detection results (module doc)."""
  out = []
  for image_id, r in zip(_ids(records), records):
    for (x0, y0, x1, y1), score in zip(r["boxes"], r["scores"]):
      out.append({"image_id": image_id, "category_id": 1, "bbox": [x0, y0, x1 - x0, y1 - y0],
                  "score": score})
  return out


def region_ground_truth(records: Sequence[Mapping]) -> dict:
  """dense_caption records → their ground-truth regions as a COCO instances dataset (module doc)."""
  images, anns = [], []
  for image_id, r in zip(_ids(records), records):
    images.append({"id": image_id} | ({"source_image_id": r["image_id"]} if "image_id" in r else {}))
    for (x0, y0, x1, y1), phrase in zip(r["gt_boxes"], r["gt_phrases"]):
      w, h = x1 - x0, y1 - y0
      anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": 1, "bbox": [x0, y0, w, h],
                   "area": w * h, "iscrowd": 0, "phrase": phrase})
  return {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "region"}]}


def caption_results(records: Sequence[Mapping]) -> tuple[list[dict], dict]:
  """caption / region_caption records → (COCO caption results, the references as a COCO captions
  dataset) (module doc)."""
  results, images, anns = [], [], []
  for image_id, r in zip(_ids(records), records):
    results.append({"image_id": image_id, "caption": r["caption"]})
    images.append({"id": image_id} | ({"source_image_id": r["image_id"]} if "image_id" in r else {}))
    for ref in r["references"]:
      anns.append({"id": len(anns) + 1, "image_id": image_id, "caption": ref})
  return results, {"images": images, "annotations": anns, "type": "captions",
                   "info": {}, "licenses": []}


def _dump(path: str, obj) -> str:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f)
  return path


def write_coco(out_dir: str, tag: str, records: Mapping[str, Sequence[Mapping]],
               converters: Mapping[str, str]) -> list[str]:
  """Writes every task's results files (module doc) into `out_dir` → the paths written.

  Args:
    records: {task name: its records} (`Evaluator.records`).
    converters: {task name: converter} (`Evaluator.conv`): which format a task's records take.
  """
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for name, recs in records.items():
    conv = converters.get(name, name)
    stem = os.path.join(out_dir, f"{name}_{tag}")
    if conv == "dense_caption" and recs:
      paths.append(_dump(stem + "_detections.json", detection_results(recs)))
      paths.append(_dump(stem + "_regions_gt.json", region_ground_truth(recs)))
    elif conv in CAPTION_TASKS and recs:
      results, gt = caption_results(recs)
      paths.append(_dump(stem + "_captions.json", results))
      paths.append(_dump(stem + "_captions_gt.json", gt))
  return paths
