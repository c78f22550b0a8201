"""COCO-format instance files built from the real COCO panoptic sample (../shared/data), for the
tests that compare pixelground's metrics with pycocotools.

`instances(root)` writes `instances.json` (COCO instances format: every panoptic segment becomes an
annotation with its file's `bbox` (xywh, pixels) and `area`, `iscrowd`, and its mask as RLE —
compressed string counts, or uncompressed list counts for crowd regions, as in COCO's own files) and
returns it with the decoded masks. The two real images appear as themselves and as left-right
mirrored copies under other ids (9, 10 and 900005: the first image twice), each copy with one more
person segment marked crowd, so that tied scores cross images whose ids are not in file order.

`results(gt, rng)` makes detections in both results formats with many tied scores (scores drawn from
5 values): shifted / grown / shrunk copies of the ground truth (some with a wrong class), duplicates,
random false positives, and 120 tiny detections of one class in one image (past the 100 budget).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from pixelground.metrics.panoptic import read_panoptic_png

SAMPLE = os.environ.get("PIXELGROUND_COCO_PANOPTIC_SAMPLE", os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "coco_panoptic_sample"))
SCORES = (0.2, 0.4, 0.6, 0.8, 0.9)


def load_sample() -> dict:
  path = os.path.join(SAMPLE, "panoptic_examples.json")
  if not os.path.exists(path):
    pytest.skip(f"real COCO panoptic sample not found at {os.path.abspath(SAMPLE)}")
  with open(path) as f:
    return json.load(f)


def uncompressed_rle(mask: np.ndarray) -> dict:
  """(H, W) bool → COCO's uncompressed RLE {"size": [H, W], "counts": [int, ...]} (column-major runs,
  starting with a run of zeros)."""
  flat = np.asarray(mask, np.uint8).reshape(-1, order="F")
  change = np.flatnonzero(np.diff(flat)) + 1
  bounds = np.concatenate([[0], change, [flat.size]])
  counts = np.diff(bounds).tolist()
  if flat.size and flat[0] == 1:
    counts = [0] + counts
  return {"size": list(mask.shape), "counts": counts}


def compressed_rle(mask: np.ndarray) -> dict:
  from pycocotools import mask as mask_utils
  rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
  return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _bbox(mask: np.ndarray) -> list[float]:
  ys, xs = np.nonzero(mask)
  if not len(xs):
    return [0.0, 0.0, 0.0, 0.0]
  x0, y0 = float(xs.min()), float(ys.min())
  return [x0, y0, float(xs.max()) - x0 + 1, float(ys.max()) - y0 + 1]


def instances(root) -> tuple[str, dict[int, np.ndarray]]:
  """Writes root/instances.json (module doc) → (its path, {annotation id: (H, W) bool mask})."""
  data = load_sample()
  images, anns, masks = [], [], {}
  for copy_id, flip in ((None, False), (7, True), (900001, True)):
    for img, pan in zip(data["images"], data["annotations"]):
      if copy_id == 900001 and img["id"] != data["images"][0]["id"]:
        continue
      ids = read_panoptic_png(os.path.join(SAMPLE, "panoptic_examples", pan["file_name"]))
      if flip:
        ids = ids[:, ::-1]
      image_id = img["id"] if copy_id is None else copy_id + len(images)
      images.append({"id": image_id, "width": img["width"], "height": img["height"],
                     "file_name": img["file_name"]})
      extra_crowd = flip  # one more crowd region per copy: its first person
      for seg in pan["segments_info"]:
        mask = ids == seg["id"]
        crowd = int(seg["iscrowd"])
        if extra_crowd and seg["category_id"] == 1 and not crowd:
          crowd, extra_crowd = 1, False
        ann_id = len(anns) + 1
        bbox = seg["bbox"] if not flip else _bbox(mask)
        anns.append({"id": ann_id, "image_id": image_id, "category_id": seg["category_id"],
                     "bbox": [float(v) for v in bbox], "area": float(seg["area"]), "iscrowd": crowd,
                     "segmentation": uncompressed_rle(mask) if crowd else compressed_rle(mask)})
        masks[ann_id] = mask
  used = sorted({a["category_id"] for a in anns})
  cats = [c for c in data["categories"] if c["id"] in used]
  path = os.path.join(os.fspath(root), "instances.json")
  with open(path, "w") as f:
    json.dump({"images": images, "annotations": anns, "categories": cats}, f)
  return path, masks


def _shift(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
  out = np.zeros_like(mask)
  h, w = mask.shape
  out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = mask[max(-dy, 0):h + min(-dy, 0),
                                                                    max(-dx, 0):w + min(-dx, 0)]
  return out


def _grow(mask: np.ndarray, r: int) -> np.ndarray:
  """Square dilation (r > 0) or erosion (r < 0) by |r| pixels."""
  out = mask.copy()
  for dy in range(-abs(r), abs(r) + 1):
    for dx in range(-abs(r), abs(r) + 1):
      out = (out | _shift(mask, dy, dx)) if r > 0 else (out & _shift(mask, dy, dx))
  return out


def results(gt: dict, masks: dict[int, np.ndarray], rng: np.random.Generator) -> tuple[list, list]:
  """(bbox results, segm results): COCO results-format lists (module doc), the same detections."""
  cats = [c["id"] for c in gt["categories"]]
  sizes = {im["id"]: (im["height"], im["width"]) for im in gt["images"]}
  dets = []  # (image id, category, mask)
  for ann in gt["annotations"]:
    mask = masks[ann["id"]]
    for _ in range(rng.integers(0, 3)):  # 0, 1 or 2 detections per object (a duplicate)
      m = _shift(mask, *rng.integers(-6, 7, 2).tolist())
      m = _grow(m, int(rng.integers(-2, 3)))
      cat = ann["category_id"] if rng.random() < 0.85 else int(rng.choice(cats))
      if m.any():
        dets.append((ann["image_id"], cat, m))
  for image_id, (h, w) in sizes.items():  # random boxes as false positives
    for _ in range(8):
      y, x = rng.integers(0, h - 40), rng.integers(0, w - 40)
      m = np.zeros((h, w), bool)
      m[y:y + rng.integers(4, 120), x:x + rng.integers(4, 120)] = True
      dets.append((image_id, int(rng.choice(cats)), m))
  first = gt["images"][0]
  h, w = sizes[first["id"]]
  for _ in range(120):  # more than 100 detections of one class in one image
    y, x = rng.integers(0, h - 10), rng.integers(0, w - 10)
    m = np.zeros((h, w), bool)
    m[y:y + 6, x:x + 7] = True
    dets.append((first["id"], 1, m))
  order = rng.permutation(len(dets))  # results files are in no particular order
  boxes, segms = [], []
  for i in order.tolist():
    image_id, cat, m = dets[i]
    score = float(rng.choice(SCORES))
    boxes.append({"image_id": image_id, "category_id": cat, "bbox": _bbox(m), "score": score})
    segms.append({"image_id": image_id, "category_id": cat, "segmentation": compressed_rle(m),
                  "score": score})
  return boxes, segms


def caption_eval(monkeypatch):
  """pycocoevalcap's `eval` module with SPICE stubbed out (it downloads Stanford models on first
  use; pixelground does not report it); skips the test without pycocoevalcap or Java."""
  pytest.importorskip("pycocoevalcap")
  from pixelground import metrics as M
  if not M.captions.java_available():
    pytest.skip("needs `java` on PATH (PTB tokenizer, METEOR)")
  import pycocoevalcap.eval as cap_eval

  class NoSpice:
    def method(self):
      return "SPICE"

    def compute_score(self, gts, res):
      return 0.0, [{"All": {"f": 0.0}}] * len(gts)

  monkeypatch.setattr(cap_eval, "Spice", NoSpice)
  return cap_eval
