"""Axis-aligned boxes: format conversions, IoU, and referring-localisation accuracy (SPEC section 6).

Boxes are float arrays with the coordinates on the last axis. `xyxy` = [x0, y0, x1, y1] (corners),
`xywh` = [x, y, width, height] (COCO's `bbox`). Any consistent unit works (pixels or normalised); the
IoU is unit-free. Corners may come in either order (x1 < x0 is allowed and sorted first), matching
`pixelground.training.metrics.box_iou`: PixelLLM's two predicted points are unordered.

Reproduces (`refer_accuracy`): the RefCOCO box accuracy of the refer / MAttNet evaluation scripts
(lichengunc/MAttNet, tools/eval_*.py: a hit when IoU(pred, gt) ≥ 0.5), which PixelLLM reports as
P@0.5. Deviations: IoU of continuous boxes (the refer toolkit's `computeIoU` adds 1 pixel to widths
and heights of its integer boxes; on pixel boxes of COCO size this moves an IoU by < 1 %); PixelLLM's
own evaluator (google-research/scenic, projects/pixel_llm) was not compared line by line.
"""

from __future__ import annotations

import numpy as np


def xywh_to_xyxy(boxes) -> np.ndarray:
  """(..., 4) [x, y, w, h] → (..., 4) [x0, y0, x1, y1] float64, same units."""
  b = np.asarray(boxes, np.float64)
  return np.concatenate([b[..., :2], b[..., :2] + b[..., 2:]], -1)


def xyxy_to_xywh(boxes) -> np.ndarray:
  """(..., 4) [x0, y0, x1, y1] → (..., 4) [x, y, w, h] float64, same units (corners sorted first)."""
  b = sort_corners(boxes)
  return np.concatenate([b[..., :2], b[..., 2:] - b[..., :2]], -1)


def sort_corners(boxes) -> np.ndarray:
  """(..., 4) xyxy with corners in any order → (..., 4) float64 with x0 ≤ x1 and y0 ≤ y1."""
  b = np.asarray(boxes, np.float64)
  if b.shape[-1] != 4:
    raise ValueError(f"boxes need a last axis of 4, got shape {b.shape}")
  return np.concatenate([np.minimum(b[..., :2], b[..., 2:]), np.maximum(b[..., :2], b[..., 2:])], -1)


def box_area(boxes) -> np.ndarray:
  """(..., 4) xyxy → (...) area in squared box units."""
  b = sort_corners(boxes)
  return np.prod(b[..., 2:] - b[..., :2], axis=-1)


def box_iou(a, b) -> np.ndarray:
  """Element-wise IoU of xyxy boxes a, b (..., 4) (broadcastable) → (...) float64 in [0, 1].

  A pair whose union has zero area (two degenerate boxes) scores 0.
  """
  a, b = sort_corners(a), sort_corners(b)
  lo = np.maximum(a[..., :2], b[..., :2])
  hi = np.minimum(a[..., 2:], b[..., 2:])
  inter = np.prod(np.maximum(hi - lo, 0.0), axis=-1)
  union = box_area(a) + box_area(b) - inter
  return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def box_iou_matrix(a, b) -> np.ndarray:
  """IoU of every pair: a (N, 4), b (M, 4) xyxy → (N, M) float64."""
  a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
  return box_iou(a[:, None, :], b[None, :, :])


def box_ioa_matrix(a, b) -> np.ndarray:
  """Intersection over the area of `a` (COCO's IoU against crowd boxes): (N, 4), (M, 4) → (N, M).

  A zero-area box in `a` scores 0.
  """
  a, b = sort_corners(np.reshape(a, (-1, 4))), sort_corners(np.reshape(b, (-1, 4)))
  lo = np.maximum(a[:, None, :2], b[None, :, :2])
  hi = np.minimum(a[:, None, 2:], b[None, :, 2:])
  inter = np.prod(np.maximum(hi - lo, 0.0), axis=-1)
  area = box_area(a)[:, None]
  return np.where(area > 0, inter / np.where(area > 0, area, 1.0), 0.0)


def refer_accuracy(pred, gt, thresh: float = 0.5) -> float:
  """Referring-localisation Acc@thresh: share of expressions whose predicted box has IoU ≥ thresh.

  The comparison is ≥ (IoU exactly 0.5 counts as a hit), the same convention as the in-training
  `referring_acc50` in `pixelground.training.metrics`; keep it fixed when comparing runs.

  Args:
    pred, gt: (N, 4) xyxy boxes in the same units (pixels or normalised), one row per expression.
    thresh: IoU threshold.

  Returns:
    The fraction in [0, 1]; NaN when N = 0.
  """
  pred, gt = np.asarray(pred, np.float64), np.asarray(gt, np.float64)
  if pred.shape != gt.shape or pred.ndim != 2 or pred.shape[-1] != 4:
    raise ValueError(f"pred {pred.shape} and gt {gt.shape} must both be (N, 4)")
  if not len(pred):
    return float("nan")
  return float(np.mean(box_iou(pred, gt) >= thresh))


def miss_nonfinite(boxes: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
  """Scored predictions (P, 4), (P,) → the same with every prediction whose box or score is not finite
  turned into a miss (score −inf: ranked last; box NaN: IoU 0 with everything), and their count."""
  boxes, scores = np.array(boxes, np.float64), np.array(scores, np.float64)
  bad = ~np.isfinite(boxes).all(axis=1) | ~np.isfinite(scores)
  boxes[bad], scores[bad] = np.nan, -np.inf
  return boxes, scores, int(bad.sum())

