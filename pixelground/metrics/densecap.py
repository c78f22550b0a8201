"""Dense-captioning mAP (Johnson et al., "DenseCap", CVPR 2016) and its detection-only variant.

Protocol (the DenseCap evaluator's, which GRiT and PixelLLM report):

1. Ground truth of an image: boxes overlapping at IoU ≥ 0.7 are merged (`merge_gt_boxes`); a merged box
   averages the coordinates of its group and keeps all their captions as references.
2. Predictions of the image, in descending score, are each assigned to the merged box they overlap most
   (first on ties). If that box is already taken by a higher-scored prediction, the prediction is a
   false positive at every threshold; a prediction overlapping no box (IoU 0) takes nothing. This
   assignment does not depend on the thresholds.
3. All predictions of the split are ranked by score. For each IoU threshold in {0.3, 0.4, 0.5, 0.6, 0.7}
   and METEOR threshold in {0, 0.05, 0.1, 0.15, 0.2, 0.25}, a prediction is a true positive when it took
   a box, its IoU with it is ≥ the IoU threshold, and the METEOR of its caption against that box's
   references is ≥ the METEOR threshold. AP is the 101-point interpolated AP
   (`pixelground.metrics.detection.interpolated_ap`) with recall over all merged boxes of the split.
4. mAP = mean of the 30 APs. Detection-only mAP ("det_map") ignores the text: the mean over the 5 IoU
   thresholds of the AP with the METEOR condition dropped.

All values are fractions (papers print ×100). Boxes are xyxy, any consistent unit.

Official code: jcjohnson/densecap, eval/eval_utils.lua `DenseCaptioningEvaluator` (Lua/Torch, not
installable; GRiT reports this protocol). KNOWN DEVIATIONS, not yet fixed (docs/metrics.md):
- its mAP averages 25 APs, IoU {.3, ..., .7} × METEOR {.05, ..., .25} with METEOR > t (strict), and
  its detection AP is the METEOR-free one; here mAP averages 30 APs with METEOR ≥ t including t = 0
  (rows equal to the detection AP), which raises mAP towards det_map;
- its AP averages the interpolated precision over the 100 recall levels of Lua's `for t=0,1,0.01`
  (0, 0.01, ..., 0.99 accumulated in floating point: 1 is never reached), here 101 levels 0 ... 1;
- its IoU adds 1 pixel to widths and heights, assigns a prediction to the first box of highest
  IoU > 0, and a prediction overlapping nothing marks the last box as taken (Torch's index -1);
  here continuous IoU and no such side effect; its box merge (box_utils.merge_boxes) was not
  compared with `merge_gt_boxes`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from pixelground.metrics.boxes import box_iou_matrix, miss_nonfinite
from pixelground.metrics.detection import interpolated_ap

IOU_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
METEOR_THRESHOLDS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25)

# (candidate caption, [reference captions]) pairs → METEOR per pair, in [0, 1].
MeteorFn = Callable[[Sequence[tuple[str, Sequence[str]]]], Sequence[float]]


def merge_gt_boxes(boxes, captions: Sequence[str], thresh: float = 0.7) -> tuple[np.ndarray, list[list[str]]]:
  """Merges ground-truth boxes that overlap at IoU ≥ thresh (DenseCap).

  Repeatedly: among the boxes not merged yet, take the one with the most such neighbours (itself
  included; the first on ties), merge it with those neighbours and remove them.

  Args:
    boxes: (N, 4) xyxy; captions: N strings.

  Returns:
    (K, 4) merged boxes (mean coordinates of each group) and K lists of the group's captions.
  """
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  if len(boxes) != len(captions):
    raise ValueError(f"{len(boxes)} boxes but {len(captions)} captions")
  near = box_iou_matrix(boxes, boxes) >= thresh
  np.fill_diagonal(near, True)  # a degenerate box still forms its own group
  left = np.ones(len(boxes), bool)
  merged, refs = [], []
  while left.any():
    counts = np.sum(near & left[None, :], axis=1) * left
    group = near[int(np.argmax(counts))] & left
    merged.append(boxes[group].mean(axis=0))
    refs.append([captions[i] for i in np.flatnonzero(group)])
    left &= ~group
  return np.asarray(merged).reshape(-1, 4), refs


def _default_meteor(pairs):
  from pixelground.metrics.captions import meteor_pairs
  return meteor_pairs(pairs)


class DenseCapEvaluator:
  """Streaming dense-captioning mAP (module doc): `add` one image at a time, `result()` at the end.

  Only what the final ranking needs is kept per prediction (score, IoU with its box, and for the ones
  that can be true positives, caption and references); METEOR runs once, in `result()`.

  Args:
    meteor_fn: scores (candidate, references) pairs; default METEOR 1.5 through pycocoevalcap (Java).
      Tests inject a deterministic stand-in.
    iou_thresholds, meteor_thresholds: the AP grid. merge_iou: the ground-truth merge IoU.
  """

  def __init__(self, meteor_fn: MeteorFn | None = None, *, iou_thresholds=IOU_THRESHOLDS,
               meteor_thresholds=METEOR_THRESHOLDS, merge_iou: float = 0.7):
    self.meteor_fn = meteor_fn or _default_meteor
    self.iou_thresholds = tuple(iou_thresholds)
    self.meteor_thresholds = tuple(meteor_thresholds)
    self.merge_iou = merge_iou
    self.num_gt = 0
    self.nonfinite = 0  # predictions with a non-finite box or score (scored as misses)
    self._scores: list[float] = []
    self._ious: list[float] = []  # IoU with the box taken; -1 (below any threshold) when none
    self._text: dict[int, tuple[str, list[str]]] = {}  # record index → (caption, references)

  def add(self, pred_boxes, pred_scores, pred_captions: Sequence[str], gt_boxes, gt_captions: Sequence[str]):
    """One image: predictions (P, 4) xyxy, (P,) scores, P captions; ground truth (G, 4) xyxy, G captions."""
    pb = np.asarray(pred_boxes, np.float64).reshape(-1, 4)
    ps = np.asarray(pred_scores, np.float64).reshape(-1)
    if not len(pb) == len(ps) == len(pred_captions):
      raise ValueError("pred_boxes, pred_scores and pred_captions must have the same length")
    pb, ps, bad = miss_nonfinite(pb, ps)  # a NaN box or score is a miss, counted
    self.nonfinite += bad
    gt, refs = merge_gt_boxes(gt_boxes, gt_captions, self.merge_iou)
    self.num_gt += len(gt)
    order = np.argsort(-ps, kind="stable")
    iou = box_iou_matrix(pb[order], gt)
    taken = np.zeros(len(gt), bool)
    for d, p in enumerate(order.tolist()):
      j = int(np.argmax(iou[d])) if len(gt) else -1
      ok = j >= 0 and iou[d, j] > 0 and not taken[j]
      if ok:
        taken[j] = True
      ov = float(iou[d, j]) if ok else -1.0
      if ok and ov >= min(self.iou_thresholds):
        self._text[len(self._scores)] = (pred_captions[p], refs[j])
      self._scores.append(float(ps[p]))
      self._ious.append(ov)

  def result(self) -> dict:
    """{"map", "det_map", "ap": {(iou_t, meteor_t): AP}, "det_ap": {iou_t: AP}, "num_gt", "num_preds"}."""
    n = len(self._scores)
    meteor = np.zeros(n)
    idx = sorted(self._text)
    if idx:
      meteor[idx] = np.asarray(self.meteor_fn([self._text[i] for i in idx]), np.float64)
    order = np.argsort(-np.asarray(self._scores), kind="stable")
    ious, meteor = np.asarray(self._ious)[order], meteor[order]
    ap = {(ti, tm): interpolated_ap((ious >= ti) & (meteor >= tm), self.num_gt)
          for ti in self.iou_thresholds for tm in self.meteor_thresholds}
    det_ap = {ti: interpolated_ap(ious >= ti, self.num_gt) for ti in self.iou_thresholds}
    return {"map": float(np.mean(list(ap.values()))), "det_map": float(np.mean(list(det_ap.values()))),
            "ap": ap, "det_ap": det_ap, "num_gt": self.num_gt, "num_preds": n}
