"""Referring / reasoning segmentation: per-example mask IoU, cIoU and gIoU (SPEC section 6).

  cIoU  Σ intersections / Σ unions over the split (large objects weigh more)
  gIoU  mean over examples of the per-example IoU; an example whose prediction and target are both
        empty (union 0) scores 1

Inputs, shape (H, W) per example (or (..., H, W) for a batch), at the resolution the split is scored at
(LISA: the original image):
  pred    bool, or real-valued logits: a pixel is predicted where `pred > 0`. Probabilities must be
          thresholded by the caller first (p > 0.5 ⇔ logit > 0); 0/1 integers work as they are.
  target  bool or {0, 1}; a float target is binarised at > 0.5 (as `pixelground.training.losses.mask_iou`).
  ignore  optional bool, True where a pixel is not scored (ReasonSeg "ignore" polygons, padding): such
          pixels count in neither the intersection nor the union.

Reproduces: dvlab-research/LISA, train_ds.py `validate` with utils/utils.py `intersectionAndUnionGPU`
(ignore_index 255 = ReasonSeg's ignore label; the foreground class's counts): gIoU = mean of
intersection / (union + 1e-5) with 1 added where the union is 0, cIoU = Σ intersection /
(Σ union + 1e-10), over every scored mask. Deviation: float64 counts and ratios without LISA's
1e-5 / 1e-10 guards (LISA divides float32 counts: a per-example IoU differs by < 1e-6 relative).
"""

from __future__ import annotations

import numpy as np


def _binary(pred, target, ignore):
  pred, target = np.asarray(pred), np.asarray(target)
  if pred.shape != target.shape or pred.ndim < 2:
    raise ValueError(f"pred {pred.shape} and target {target.shape} must be the same (..., H, W) shape")
  p = pred if pred.dtype == np.bool_ else pred > 0
  t = target if target.dtype == np.bool_ else target > 0.5
  if ignore is not None:
    ignore = np.asarray(ignore, bool)
    if ignore.shape != pred.shape:
      raise ValueError(f"ignore {ignore.shape} must match the masks {pred.shape}")
    p, t = p & ~ignore, t & ~ignore
  return p, t


def intersection_union(pred, target, ignore=None) -> tuple[np.ndarray, np.ndarray]:
  """Pixel counts: (..., H, W) masks → (intersection (...), union (...)) int64 (see module doc)."""
  p, t = _binary(pred, target, ignore)
  return np.sum(p & t, axis=(-2, -1)), np.sum(p | t, axis=(-2, -1))


def mask_iou(pred, target, ignore=None) -> np.ndarray:
  """Per-example IoU: (..., H, W) masks → (...) float64 in [0, 1]; 1 where the union is empty."""
  inter, union = intersection_union(pred, target, ignore)
  return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


class MaskIoUAccumulator:
  """Streaming cIoU / gIoU: `add` one example (or a batch) at a time; keeps three numbers, no masks.

  `result()` → {"ciou", "giou", "count"} (cIoU is 1 when every union so far was empty; both are NaN
  before the first example).
  """

  def __init__(self):
    self.inter = 0
    self.union = 0
    self.iou_sum = 0.0
    self.count = 0

  def add(self, pred, target, ignore=None) -> np.ndarray:
    """Scores (H, W) or (B, H, W) masks (module doc for dtypes); returns the IoU, shape () or (B,)."""
    inter, union = intersection_union(pred, target, ignore)
    iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    self.inter += int(np.sum(inter))
    self.union += int(np.sum(union))
    self.iou_sum += float(np.sum(iou))
    self.count += int(np.size(iou))
    return iou

  def result(self) -> dict[str, float]:
    if not self.count:
      return {"ciou": float("nan"), "giou": float("nan"), "count": 0}
    ciou = self.inter / self.union if self.union else 1.0
    return {"ciou": ciou, "giou": self.iou_sum / self.count, "count": self.count}
