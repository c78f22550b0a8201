"""Panoptic Narrative Grounding (González et al., ICCV 2021) average recall (SPEC section 6).

Per groundable noun phrase, the soft IoU between the predicted mask p ∈ [0, 1] and the ground-truth
mask t ∈ {0, 1} (the union of the phrase's panoptic segments):

  IoU = Σ p·t / Σ (p + t − p·t)        (= the usual IoU for a binary p; 1 when both masks are empty)

Recall at threshold τ = share of phrases with IoU ≥ τ. Average recall (AR) = area under recall(τ) for
τ ∈ [0, 1], discretised on `NUM_THRESHOLDS` = 101 evenly spaced τ (0, 0.01, ..., 1) and integrated with
the trapezoid rule. (On an infinitely fine grid AR equals the mean IoU; on this grid each phrase with
IoU < 1 gains at most half a step, 0.005.) Accuracy at 0.5 = share of phrases with IoU ≥ 0.5.

Reported over all phrases and the splits things / stuff and singular / plural. Whether a phrase is a
"thing" is the caller's call (PNG: the category of its segments, `isthing` in the COCO panoptic
categories); singular / plural is the annotation's `plural` flag.
"""

from __future__ import annotations

import numpy as np

NUM_THRESHOLDS = 101


def soft_iou(pred, target) -> np.ndarray:
  """Soft IoU: pred (..., H, W) in [0, 1] (probabilities or bool), target (..., H, W) bool → (...)."""
  p = np.asarray(pred, np.float64)
  t = np.asarray(target).astype(np.float64)
  if p.shape != t.shape or p.ndim < 2:
    raise ValueError(f"pred {p.shape} and target {t.shape} must be the same (..., H, W) shape")
  inter = np.sum(p * t, axis=(-2, -1))
  union = np.sum(p + t - p * t, axis=(-2, -1))
  return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 1.0)


def phrase_mask(segment_ids, ids) -> np.ndarray:
  """Ground truth of one phrase: (H, W) panoptic segment-id map, the phrase's segment ids → (H, W) bool."""
  return np.isin(np.asarray(segment_ids), np.asarray(ids))


def average_recall(ious, num_thresholds: int = NUM_THRESHOLDS) -> float:
  """Area under recall(τ) = mean(IoU ≥ τ) for τ on `num_thresholds` points of [0, 1] (trapezoid rule).

  NaN for no phrases.
  """
  ious = np.asarray(ious, np.float64).reshape(-1)
  if not len(ious):
    return float("nan")
  tau = np.linspace(0.0, 1.0, num_thresholds)
  recall = np.mean(ious[None, :] >= tau[:, None], axis=1)
  return float(np.sum((recall[1:] + recall[:-1]) / 2 * np.diff(tau)))


class PNGAccumulator:
  """Streaming PNG metrics: keeps one IoU and two flags per phrase, no masks.

  `result()` → {"ar", "acc50", "count"} and the same with suffixes "_things", "_stuff", "_singular",
  "_plural" (NaN for an empty split).
  """

  def __init__(self, num_thresholds: int = NUM_THRESHOLDS):
    self.num_thresholds = num_thresholds
    self.ious: list[float] = []
    self.is_thing: list[bool] = []
    self.is_plural: list[bool] = []

  def add_ious(self, ious, is_thing, is_plural) -> None:
    """Already computed IoUs (K,) of K phrases with their (K,) bool flags."""
    ious = np.asarray(ious, np.float64).reshape(-1)
    is_thing = np.broadcast_to(np.asarray(is_thing, bool), ious.shape)
    is_plural = np.broadcast_to(np.asarray(is_plural, bool), ious.shape)
    self.ious += ious.tolist()
    self.is_thing += is_thing.tolist()
    self.is_plural += is_plural.tolist()

  def add(self, pred, target, is_thing, is_plural) -> np.ndarray:
    """K phrases of one image: pred (K, H, W) in [0, 1], target (K, H, W) bool, flags (K,) bool.

    Returns the (K,) soft IoUs.
    """
    iou = soft_iou(pred, target)
    self.add_ious(iou, is_thing, is_plural)
    return iou

  def result(self) -> dict[str, float]:
    ious = np.asarray(self.ious)
    thing, plural = np.asarray(self.is_thing, bool), np.asarray(self.is_plural, bool)
    out: dict[str, float] = {}
    for suffix, keep in (("", np.ones(len(ious), bool)), ("_things", thing), ("_stuff", ~thing),
                         ("_singular", ~plural), ("_plural", plural)):
      sel = ious[keep]
      out["ar" + suffix] = average_recall(sel, self.num_thresholds)
      out["acc50" + suffix] = float(np.mean(sel >= 0.5)) if len(sel) else float("nan")
      out["count" + suffix] = int(len(sel))
    return out
