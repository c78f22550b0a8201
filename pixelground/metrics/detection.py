"""Box detection average precision: the interpolated-AP helper and a class-aware COCO-style evaluator.

`interpolated_ap` is shared with the dense-captioning mAP (`pixelground.metrics.densecap`): both use the
101-point interpolation, AP = mean over recall levels r ∈ {0, 0.01, ..., 1} of the highest precision
reached at any recall ≥ r (0 where r is never reached).

`DetectionEvaluator` follows COCO's bbox protocol for the "all areas, 100 detections" setting: per
image and class, detections (top `max_dets` by score) are matched greedily in descending score to the
unmatched non-crowd ground truth of highest IoU ≥ t; a detection that matches nothing but overlaps a
crowd box by intersection / detection-area ≥ t is ignored (neither TP nor FP; a crowd box absorbs any
number). AP is computed per class over the whole set and averaged over the classes with at least one
non-crowd ground truth. Reported: AP (mean over IoU .50:.05:.95), AP50, AP75. No small / medium / large
breakdown. Boxes are xyxy in any consistent unit.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from pixelground.metrics.boxes import box_ioa_matrix, box_iou_matrix, miss_nonfinite

RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)
COCO_IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)


def interpolated_ap(tp, num_gt: int, recall_thresholds=RECALL_THRESHOLDS) -> float:
  """Interpolated AP of a ranked detection list.

  Args:
    tp: (N,) bool, True = true positive, for the detections in descending score order (ignored
      detections already removed); everything else is a false positive.
    num_gt: number of ground-truth objects (the recall denominator).
    recall_thresholds: recall levels to average the interpolated precision over.

  Returns:
    AP in [0, 1]; NaN when num_gt is 0.
  """
  tp = np.asarray(tp, bool)
  if num_gt <= 0:
    return float("nan")
  if not len(tp):
    return 0.0
  ctp = np.cumsum(tp)
  recall = ctp / num_gt
  precision = ctp / np.arange(1, len(tp) + 1)
  # Precision envelope: the best precision at this rank or any later (higher-recall) one.
  envelope = np.maximum.accumulate(precision[::-1])[::-1]
  first = np.searchsorted(recall, recall_thresholds, side="left")  # first rank with recall ≥ r
  reached = first < len(tp)
  return float(np.mean(np.where(reached, envelope[np.minimum(first, len(tp) - 1)], 0.0)))


def _match(iou: np.ndarray, ioa_crowd: np.ndarray, t: float) -> np.ndarray:
  """Greedy matching at IoU t of score-sorted detections → (D,) int8: 1 TP, 0 FP, -1 ignored."""
  n_det, n_gt = iou.shape
  taken = np.zeros(n_gt, bool)
  status = np.zeros(n_det, np.int8)
  for d in range(n_det):
    if n_gt:
      cand = np.where(~taken & (iou[d] >= t), iou[d], -1.0)
      g = int(np.argmax(cand))
      if cand[g] >= 0:
        taken[g] = True
        status[d] = 1
        continue
    if ioa_crowd.shape[1] and np.any(ioa_crowd[d] >= t):
      status[d] = -1
  return status


class DetectionEvaluator:
  """Streaming class-aware box AP (module doc). `add` one image at a time; `result()` at the end."""

  def __init__(self, iou_thresholds=COCO_IOU_THRESHOLDS, max_dets: int = 100):
    self.iou_thresholds = np.asarray(iou_thresholds, np.float64)
    self.max_dets = max_dets
    self._scores: dict[int, list[np.ndarray]] = defaultdict(list)
    self.nonfinite = 0  # predictions with a non-finite box or score (scored as misses)
    self._status: dict[int, list[np.ndarray]] = defaultdict(list)  # (T, D) per image
    self._num_gt: dict[int, int] = defaultdict(int)

  def add(self, pred_boxes, pred_scores, pred_labels, gt_boxes, gt_labels, gt_crowd=None) -> None:
    """One image.

    Args:
      pred_boxes: (P, 4) xyxy; pred_scores: (P,); pred_labels: (P,) int class ids.
      gt_boxes: (G, 4) xyxy, same units; gt_labels: (G,) int; gt_crowd: (G,) bool, or None for no crowd.
    """
    pb = np.asarray(pred_boxes, np.float64).reshape(-1, 4)
    ps = np.asarray(pred_scores, np.float64).reshape(-1)
    pl = np.asarray(pred_labels, np.int64).reshape(-1)
    gb = np.asarray(gt_boxes, np.float64).reshape(-1, 4)
    gl = np.asarray(gt_labels, np.int64).reshape(-1)
    gc = np.zeros(len(gb), bool) if gt_crowd is None else np.asarray(gt_crowd, bool).reshape(-1)
    if not len(pb) == len(ps) == len(pl) or not len(gb) == len(gl) == len(gc):
      raise ValueError("per-box arrays of one image must have the same length")
    pb, ps, bad = miss_nonfinite(pb, ps)  # a NaN box or score is a miss, counted
    self.nonfinite += bad
    for c in np.union1d(pl, gl).tolist():
      det = np.flatnonzero(pl == c)
      det = det[np.argsort(-ps[det], kind="stable")][:self.max_dets]
      gt, crowd = gb[(gl == c) & ~gc], gb[(gl == c) & gc]
      self._num_gt[c] += len(gt)
      if not len(det):
        continue
      iou, ioa = box_iou_matrix(pb[det], gt), box_ioa_matrix(pb[det], crowd)
      self._scores[c].append(ps[det])
      self._status[c].append(np.stack([_match(iou, ioa, t) for t in self.iou_thresholds]))

  def per_class_ap(self) -> dict[int, np.ndarray]:
    """{class: (T,) AP per IoU threshold} for the classes with ≥ 1 non-crowd ground truth."""
    out = {}
    for c, n in sorted(self._num_gt.items()):
      if n == 0:
        continue
      if not self._scores[c]:
        out[c] = np.zeros(len(self.iou_thresholds))
        continue
      order = np.argsort(-np.concatenate(self._scores[c]), kind="stable")
      status = np.concatenate(self._status[c], axis=1)[:, order]
      out[c] = np.array([interpolated_ap(s[s >= 0] == 1, n) for s in status])
    return out

  def result(self) -> dict:
    """{"AP", "AP50", "AP75" (when those thresholds are used), "per_class": {class: AP}, "num_classes"}."""
    per_class = self.per_class_ap()
    if not per_class:
      return {"AP": float("nan"), "per_class": {}, "num_classes": 0}
    table = np.stack(list(per_class.values()))  # (K, T)
    out = {"AP": float(np.mean(table))}
    for name, t in (("AP50", 0.5), ("AP75", 0.75)):
      hit = np.flatnonzero(np.isclose(self.iou_thresholds, t))
      if len(hit):
        out[name] = float(np.mean(table[:, hit[0]]))
    out["per_class"] = {c: float(np.mean(ap)) for c, ap in per_class.items()}
    out["num_classes"] = len(per_class)
    return out
