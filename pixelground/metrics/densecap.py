"""Dense-captioning mAP (Johnson et al., "DenseCap", CVPR 2016) and its detection-only variant.

Reproduces: jcjohnson/densecap (HEAD 7c32170), eval/eval_utils.lua `DenseCaptioningEvaluator`
(`addResult`, `evaluate`, `pluck_boxes`), densecap/box_utils.lua `merge_boxes`, `iou_matrix`,
`xcycwh_to_x1y1x2y2`, and eval/meteor_bridge.py (METEOR 1.5 of each prediction against its box's
references, `-l en -norm`). That code is Lua/Torch and not installable, so this is a port, checked
against hand-computed cases and a loop-by-loop transcription (tests/test_metrics_densecap.py). GRiT
and PixelLLM report this protocol.

Protocol (`official=True`, the default):

1. Ground truth of an image: boxes overlapping at IoU ≥ 0.7 are merged (`merge_gt_boxes`): repeatedly
   the remaining box with the most such neighbours (itself included, the first on ties) takes them; a
   merged box averages its group's coordinates and keeps all their captions as references, in input
   order. Groups are numbered in the order they are formed.
2. Predictions of the image, in descending score, are each assigned to the merged box of highest IoU
   (the first on ties), if that IoU is > 0. A box goes to the first prediction assigned to it; later
   ones are false positives at every threshold. This does not depend on the thresholds.
3. All predictions of the split are ranked by score. For IoU threshold t_iou in {.3, .4, .5, .6, .7}
   and METEOR threshold t_m in {0, .05, .1, .15, .2, .25}, a prediction is a true positive when it got
   its box, IoU ≥ t_iou and METEOR > t_m (strict: t_m = 0 asks for a METEOR above 0). AP is the
   interpolated precision (the best precision at any recall ≥ r, 0 where r is not reached) averaged
   over the recall levels r of Lua's `for t=0,1,0.01` (`RECALL_LEVELS`).
4. mAP = mean of the 30 APs. det_map = mean over the 5 IoU thresholds of the AP without the METEOR
   condition (the Lua's `min_score = -1` row).

Boxes are xyxy in pixels (continuous corners: a box of width w spans [x1, x1 + w]). DenseCap's
evaluator takes (xc, yc, w, h) float32 boxes, turns them into inclusive pixel corners
x1 = xc - (w - 1) / 2, x2 = xc + (w - 1) / 2 and computes IoU with widths x2 - x1 + 1. The -1 and
the +1 cancel: its IoU of our boxes is the continuous IoU, up to float32 rounding (a box [0, 0, 1, 1]
against [0, 0, 2, 1] scores 1/2, not the 4/6 of adding 1 pixel to xyxy corners; boxes that only
touch do not overlap). `official_corners` and `official_iou_matrix` reproduce that arithmetic.

Quirks of the official code that change numbers, reproduced when `official=True`:
- (bug) a prediction overlapping no merged box is recorded with box index -1, and Torch's `used[-1]`
  is the LAST merged box of its image: that box is marked as taken (if free), so a lower-scored
  prediction on it becomes a false positive;
- (bug) `for t=0,1,0.01` adds 0.01 in double precision: 0, 0.01, ..., 0.30000000000000010, ...,
  0.9900000000000007; 1 is never reached, so AP averages 100 levels, and a recall of exactly 0.3
  (or .4, .5, ...) misses the level meant to be 0.3;
- box coordinates are float32 (the Torch tensors) and merged boxes float32 means.
`official=False` drops these three (no side effect of a prediction without overlap, the 101 levels
0, 0.01, ..., 1 of `detection.RECALL_THRESHOLDS`, float64 continuous IoU); thresholds stay strict.

Remaining differences: ties in score are kept in the order of `add` calls and, within an image, of
the predictions (Torch's sort leaves their order unspecified); an image without ground truth makes
every prediction a false positive (the Lua errors on it); with no prediction at all AP is 0 (the Lua
errors), with no ground truth 0 (official) or NaN. METEOR is pycocoevalcap's METEOR 1.5 jar with the
same options, batched (`captions.meteor_pairs`: each pair's score is its own segment score, as one
EVAL per pair in the bridge); text is only whitespace-normalised before it. DenseCap's own ground
truth is VG regions rounded to integer pixels at 720 px longest side (preprocess.py); that belongs
to the data, not to this evaluator.

All values are fractions (papers print ×100).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from pixelground.metrics.boxes import box_iou_matrix, miss_nonfinite
from pixelground.metrics.detection import interpolated_ap

IOU_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
METEOR_THRESHOLDS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25)  # true positive when METEOR > t (strict)


def _lua_levels() -> np.ndarray:
  levels, t = [], 0.0
  while t <= 1.0:  # Lua's numeric for with a float step: t = t + 0.01 in double, while t <= 1
    levels.append(t)
    t += 0.01
  return np.asarray(levels)


RECALL_LEVELS = _lua_levels()  # (100,) float64: the official AP's recall levels, 0 ... 0.99000...07

# (candidate caption, [reference captions]) pairs → METEOR per pair, in [0, 1].
MeteorFn = Callable[[Sequence[tuple[str, Sequence[str]]]], Sequence[float]]


def densecap_ap(tp, num_gt: int, *, official: bool = True) -> float:
  """AP of a ranked prediction list, as DenseCap's `evaluate`.

  Args:
    tp: (N,) bool, true positives of the predictions in descending score order (others are FP).
    num_gt: the recall denominator (merged ground-truth boxes of the split).
    official: average over `RECALL_LEVELS` (100 levels) summed in order, as the Lua; else the 101
      levels of `detection.interpolated_ap`.

  Returns:
    AP in [0, 1]; 0 without predictions; without ground truth 0 (official) or NaN.
  """
  tp = np.asarray(tp, bool)
  if not official:
    return interpolated_ap(tp, num_gt)
  if not len(tp) or num_gt <= 0:
    return 0.0
  ctp = np.cumsum(tp).astype(np.float64)
  recall = ctp / num_gt
  precision = ctp / (np.cumsum(~tp) + ctp)
  best = np.maximum.accumulate(precision[::-1])[::-1]  # best precision at this rank or a later one
  first = np.searchsorted(recall, RECALL_LEVELS, side="left")  # first rank with recall ≥ t
  ap = 0.0
  for f in first.tolist():  # summed in loop order, as the Lua's `ap = ap + p`
    ap += float(best[f]) if f < len(tp) else 0.0
  return ap / len(RECALL_LEVELS)


def official_corners(boxes) -> np.ndarray:
  """(N, 4) xyxy pixels → (N, 4) DenseCap's inclusive corners, float32 values held in float64.

  The box goes to (xc, yc, w, h), is rounded to float32 (as the Torch tensors), and converted as
  box_utils.xcycwh_to_x1y1x2y2 does, in float32: x1 = -((w - 1) / 2) + xc, x2 = (w - 1) / 2 + xc.
  """
  b = np.asarray(boxes, np.float64).reshape(-1, 4)
  center = ((b[:, :2] + b[:, 2:]) / 2).astype(np.float32)
  size = (b[:, 2:] - b[:, :2]).astype(np.float32)
  half = (size - np.float32(1)) / np.float32(2)
  return np.concatenate([-half + center, half + center], axis=1).astype(np.float64)


def official_iou_matrix(a, b) -> np.ndarray:
  """DenseCap's IoU of inclusive corners (`official_corners`): (N, 4), (M, 4) → (N, M) float64.

  Widths are x2 - x1 + 1; a pair is 0 unless both intersection sides are > 0; evaluated in double in
  the Lua's order: inter / ((area_a + area_b) - inter).
  """
  a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
  lo = np.maximum(a[:, None, :2], b[None, :, :2])
  hi = np.minimum(a[:, None, 2:], b[None, :, 2:])
  iw, ih = hi[..., 0] - lo[..., 0] + 1, hi[..., 1] - lo[..., 1] + 1
  area_a = (a[:, 2] - a[:, 0] + 1) * (a[:, 3] - a[:, 1] + 1)
  area_b = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)
  inter = iw * ih
  hit = (iw > 0) & (ih > 0)
  union = area_a[:, None] + area_b[None, :] - inter
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.where(hit, inter / np.where(hit, union, 1.0), 0.0)


def _merge_groups(iou: np.ndarray, thresh: float) -> list[np.ndarray]:
  """box_utils.merge_boxes on a (N, N) IoU matrix → index groups, in the order they are formed."""
  near = iou >= thresh
  np.fill_diagonal(near, True)  # the Lua sets D[i, i] = 1: a degenerate box still forms its group
  left = np.ones(len(iou), bool)
  groups = []
  while left.any():
    counts = np.sum(near & left[None, :], axis=1) * left
    group = np.flatnonzero(near[int(np.argmax(counts))] & left)  # argmax: the first on ties
    groups.append(group)
    left[group] = False
  return groups


def _float32_mean(x: np.ndarray) -> np.ndarray:
  # torch.mean of a float tensor (TH: sum in a double accumulator, stored as float32, divided in
  # float32). Exact for the few integer-pixel boxes of a group; other TH versions differ by 1 ulp.
  return (x.sum(axis=0).astype(np.float32) / np.float32(len(x))).astype(np.float64)


def merge_gt_boxes(boxes, captions: Sequence[str], thresh: float = 0.7, *,
                   official: bool = True) -> tuple[np.ndarray, list[list[str]]]:
  """Merges ground-truth boxes that overlap at IoU ≥ thresh (DenseCap's merge_boxes + pluck_boxes).

  Args:
    boxes: (N, 4) xyxy pixels; captions: N strings.
    official: group by `official_iou_matrix` (float32 corners) instead of float64 IoU.

  Returns:
    (K, 4) merged boxes, xyxy pixels (mean coordinates of each group, float64), and K lists of the
    group's captions in input order; groups in the order they are formed.
  """
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  if len(boxes) != len(captions):
    raise ValueError(f"{len(boxes)} boxes but {len(captions)} captions")
  if official:
    corners = official_corners(boxes)
    groups = _merge_groups(official_iou_matrix(corners, corners), thresh)
  else:
    groups = _merge_groups(box_iou_matrix(boxes, boxes), thresh)
  merged = [boxes[g].mean(axis=0) for g in groups]
  return np.asarray(merged).reshape(-1, 4), [[captions[i] for i in g] for g in groups]


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
    iou_thresholds, meteor_thresholds: the AP grid (IoU ≥ t, METEOR > t). merge_iou: the merge IoU.
    official: reproduce the official code's quirks (module doc); False drops them.
  """

  def __init__(self, meteor_fn: MeteorFn | None = None, *, iou_thresholds=IOU_THRESHOLDS,
               meteor_thresholds=METEOR_THRESHOLDS, merge_iou: float = 0.7, official: bool = True):
    self.meteor_fn = meteor_fn or _default_meteor
    self.iou_thresholds = tuple(iou_thresholds)
    self.meteor_thresholds = tuple(meteor_thresholds)
    self.merge_iou = merge_iou
    self.official = official
    self.num_gt = 0
    self.nonfinite = 0  # predictions with a non-finite box or score (scored as misses)
    self._scores: list[float] = []
    self._ious: list[float] = []  # IoU with the box it got; -1 (below any threshold) when none
    self._text: dict[int, tuple[str, list[str]]] = {}  # record index → (caption, references)

  def _merged(self, gt_boxes, gt_captions):
    """Merged ground truth → (K, 4) boxes in the IoU's frame (official corners or xyxy), references."""
    gt = np.asarray(gt_boxes, np.float64).reshape(-1, 4)
    if len(gt) != len(gt_captions):
      raise ValueError(f"{len(gt)} gt_boxes but {len(gt_captions)} gt_captions")
    if not self.official:
      return merge_gt_boxes(gt, gt_captions, self.merge_iou, official=False)
    corners = official_corners(gt)
    groups = _merge_groups(official_iou_matrix(corners, corners), self.merge_iou)
    merged = np.asarray([_float32_mean(corners[g]) for g in groups]).reshape(-1, 4)
    return merged, [[gt_captions[i] for i in g] for g in groups]

  def add(self, pred_boxes, pred_scores, pred_captions: Sequence[str], gt_boxes,
          gt_captions: Sequence[str]):
    """One image: predictions (P, 4) xyxy pixels, (P,) scores, P captions; ground truth (G, 4) xyxy
    pixels, G captions."""
    pb = np.asarray(pred_boxes, np.float64).reshape(-1, 4)
    ps = np.asarray(pred_scores, np.float64).reshape(-1)
    if not len(pb) == len(ps) == len(pred_captions):
      raise ValueError("pred_boxes, pred_scores and pred_captions must have the same length")
    pb, ps, bad = miss_nonfinite(pb, ps)  # a NaN box or score is a miss, counted
    self.nonfinite += bad
    gt, refs = self._merged(gt_boxes, gt_captions)
    self.num_gt += len(gt)
    order = np.argsort(-ps, kind="stable")
    if self.official:
      iou = official_iou_matrix(official_corners(pb[order]), gt)
    else:
      iou = box_iou_matrix(pb[order], gt)
    taken = np.zeros(len(gt), bool)
    for d, p in enumerate(order.tolist()):
      j = int(np.argmax(iou[d])) if len(gt) else -1  # the first box of highest IoU
      if j >= 0 and not iou[d, j] > 0:
        j = -1
      ok = False
      if j >= 0:
        ok, taken[j] = not taken[j], True
      elif self.official and len(gt):
        taken[-1] = True  # the Lua's used[-1]: the image's last merged box (its record stays a FP)
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
    ap = {(ti, tm): densecap_ap((ious >= ti) & (meteor > tm), self.num_gt, official=self.official)
          for ti in self.iou_thresholds for tm in self.meteor_thresholds}
    det_ap = {ti: densecap_ap(ious >= ti, self.num_gt, official=self.official)
              for ti in self.iou_thresholds}
    return {"map": _mean(ap.values()), "det_map": _mean(det_ap.values()), "ap": ap,
            "det_ap": det_ap, "num_gt": self.num_gt, "num_preds": n}


def _mean(values) -> float:
  total, n = 0.0, 0
  for v in values:  # summed in order (the Lua's utils.average_values sums a hash table's values)
    total, n = total + v, n + 1
  return total / n
