"""Panoptic quality PQ = SQ × RQ (Kirillov et al., "Panoptic Segmentation", CVPR 2019) and COCO panoptic
PNG helpers (SPEC sections 5.3 and 6).

An image is a segment-id map (H, W) int — 0 = void (unlabelled) — plus its `segments_info`: dicts with
"id", "category_id" and, for the ground truth, "iscrowd" (COCO panoptic JSON; extra keys ignored).

Per image, for every ground-truth segment g and predicted segment p of the same category
(crowd ground truth excluded):
  IoU(g, p) = |g ∩ p| / (|g| + |p| − |g ∩ p| − |p ∩ void|)      (pixels the GT leaves void don't count)
  IoU > 0.5 ⇒ (g, p) is a true positive (such a match is unique).
Unmatched non-crowd ground-truth segments are false negatives. An unmatched prediction is a false
positive unless more than half of its pixels are ground-truth void or a crowd region of its own category.

Statistics add up over images per category; then, per category with TP + FP + FN > 0:
  PQ = Σ_TP IoU / (TP + ½FP + ½FN),  SQ = Σ_TP IoU / TP (0 when TP = 0),  RQ = TP / (TP + ½FP + ½FN)
and PQ / SQ / RQ are the plain means over those categories: all, things (isthing = 1), stuff.

Reproduces: cocodataset/panopticapi, panopticapi/evaluation.py `pq_compute_single_core` and
`PQStat.pq_average` (not installable from PyPI; its definitions are ported and tested on hand cases
and the real COCO panoptic sample). Deviation: images come as arrays (`add`), not as PNG files, and
an unknown category or a segment id missing from the map raises here as panopticapi's checks do.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping

import numpy as np

# Pairs (gt id, pred id) are packed as gt · OFFSET + pred; ids from RGB PNGs are < 256³.
OFFSET = 256 ** 3


def rgb_to_id(rgb) -> np.ndarray:
  """COCO panoptic PNG pixels (H, W, 3) uint8 → (H, W) int64 segment ids: R + 256·G + 256²·B."""
  rgb = np.asarray(rgb)
  if rgb.ndim != 3 or rgb.shape[-1] < 3:
    raise ValueError(f"expected an (H, W, 3) RGB array, got shape {rgb.shape}")
  rgb = rgb[..., :3].astype(np.int64)
  return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def id_to_rgb(ids) -> np.ndarray:
  """(H, W) segment ids (0 ≤ id < 256³) → (H, W, 3) uint8, the inverse of `rgb_to_id`."""
  ids = np.asarray(ids, np.int64)
  if ids.size and (ids.min() < 0 or ids.max() >= OFFSET):
    raise ValueError("segment ids must lie in [0, 256³)")
  return np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)


def read_panoptic_png(path) -> np.ndarray:
  """Reads a COCO panoptic PNG → (H, W) int64 segment ids (0 = void)."""
  from PIL import Image
  with Image.open(path) as im:
    return rgb_to_id(np.asarray(im.convert("RGB")))


def _counts(x: np.ndarray) -> dict[int, int]:
  values, counts = np.unique(x, return_counts=True)
  return dict(zip(values.tolist(), counts.tolist()))


class PQAccumulator:
  """Streaming panoptic quality: `add` one image at a time (keeps per-category sums only); `result()`.

  Args:
    categories: the COCO panoptic `categories` list (dicts with "id" and "isthing"), or {id: isthing}.
  """

  def __init__(self, categories: Iterable[Mapping] | Mapping[int, bool]):
    if isinstance(categories, Mapping):
      self.isthing = {int(k): bool(v) for k, v in categories.items()}
    else:
      self.isthing = {int(c["id"]): bool(c["isthing"]) for c in categories}
    self.iou = defaultdict(float)
    self.tp = defaultdict(int)
    self.fp = defaultdict(int)
    self.fn = defaultdict(int)

  def _segments(self, segments, ids: dict[int, int], who: str) -> dict[int, Mapping]:
    segs = {int(s["id"]): s for s in segments}
    if 0 in segs:
      raise ValueError(f"{who} segments_info uses id 0, which is reserved for void")
    for s in segs.values():
      if int(s["category_id"]) not in self.isthing:
        raise ValueError(f"{who} segment {s['id']} has unknown category {s['category_id']}")
    unlisted = set(ids) - set(segs) - {0}
    if unlisted:
      raise ValueError(f"{who} map has segment ids not in its segments_info: {sorted(unlisted)[:5]}")
    return segs

  def add(self, gt_ids, gt_segments, pred_ids, pred_segments) -> None:
    """One image: gt_ids / pred_ids (H, W) int segment-id maps, their segments_info lists."""
    gt, pred = np.asarray(gt_ids, np.int64), np.asarray(pred_ids, np.int64)
    if gt.shape != pred.shape or gt.ndim != 2:
      raise ValueError(f"gt {gt.shape} and pred {pred.shape} must be the same (H, W) shape")
    gt_area, pred_area = _counts(gt), _counts(pred)
    gts = self._segments(gt_segments, gt_area, "ground-truth")
    preds = self._segments(pred_segments, pred_area, "predicted")
    empty = [p for p in preds if p not in pred_area]
    if empty:
      raise ValueError(f"predicted segments listed but absent from the map: {empty[:5]}")
    inter = {(k // OFFSET, k % OFFSET): n for k, n in _counts(gt * OFFSET + pred).items()}
    crowd = defaultdict(list)  # category → its crowd ids in this image
    for g, s in gts.items():
      if s.get("iscrowd", 0):
        crowd[int(s["category_id"])].append(g)

    matched_gt, matched_pred = set(), set()
    for (g, p), n in inter.items():
      if g not in gts or p not in preds or gts[g].get("iscrowd", 0):
        continue
      cat = int(gts[g]["category_id"])
      if cat != int(preds[p]["category_id"]):
        continue
      union = pred_area[p] + gt_area[g] - n - inter.get((0, p), 0)
      iou = n / union
      if iou > 0.5:
        self.tp[cat] += 1
        self.iou[cat] += iou
        matched_gt.add(g)
        matched_pred.add(p)
    for g, s in gts.items():
      if g not in matched_gt and not s.get("iscrowd", 0):
        self.fn[int(s["category_id"])] += 1
    for p, s in preds.items():
      if p in matched_pred:
        continue
      cat = int(s["category_id"])
      ignored = inter.get((0, p), 0) + sum(inter.get((c, p), 0) for c in crowd[cat])
      if ignored / pred_area[p] > 0.5:
        continue
      self.fp[cat] += 1

  def per_class(self) -> dict[int, dict[str, float]]:
    """{category: {"pq", "sq", "rq", "tp", "fp", "fn"}} for the categories with TP + FP + FN > 0."""
    out = {}
    for cat in sorted(self.isthing):
      tp, fp, fn = self.tp[cat], self.fp[cat], self.fn[cat]
      if tp + fp + fn == 0:
        continue
      denom = tp + 0.5 * fp + 0.5 * fn
      out[cat] = {"pq": self.iou[cat] / denom, "sq": self.iou[cat] / tp if tp else 0.0, "rq": tp / denom,
                  "tp": tp, "fp": fp, "fn": fn}
    return out

  def result(self) -> dict:
    """{"all" | "things" | "stuff": {"pq", "sq", "rq", "n"}, "per_class": per_class()}; NaN when n = 0."""
    per_class = self.per_class()
    out: dict = {}
    for name, want in (("all", None), ("things", True), ("stuff", False)):
      rows = [v for c, v in per_class.items() if want is None or self.isthing[c] == want]
      out[name] = {k: float(np.mean([r[k] for r in rows])) if rows else float("nan")
                   for k in ("pq", "sq", "rq")}
      out[name]["n"] = len(rows)
    out["per_class"] = per_class
    return out
