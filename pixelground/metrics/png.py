"""Panoptic Narrative Grounding (González et al., ICCV 2021) average recall (SPEC section 6).

Reproduces: BCV-Uniandes/PNG, baseline/utils/meters.py `average_accuracy` (AR), baseline/utils/
__init__.py `compute_mask_IoU` (soft IoU) and baseline/test_net.py `perform_test` (the splits,
accuracy at 0.5, and the optional 256 × 256 mask round trip). That code is not installable; its
definitions are ported here and tested on hand cases (tests/test_metrics_png.py).

Per groundable noun phrase, the soft IoU between the predicted mask p ∈ [0, 1] and the ground-truth
mask t ∈ [0, 1] (the union of the phrase's panoptic segments), both (H, W) on the same pixel grid:

  IoU = Σ p·t / Σ (p + t − p·t)        (= the usual IoU for binary masks)

Average recall: with thresholds τ_i = `np.arange(0, 1, 1e-5)` (0, 1e-5, ..., 1 − 1e-5; N = 100 000)
and recall(τ) = share of phrases with IoU ≥ τ,

  AR = Σ_{i=0}^{N−2} (τ_{i+1} − τ_i) · recall(τ_i)      (a left Riemann sum, added in this order)

so a phrase of IoU v contributes ≈ min(v, 1 − 2e-5) + 1e-5 (a perfect phrase 0.99999, an IoU-0 one
1e-5). Accuracy at 0.5 = share of phrases with IoU > 0.5 (strict, as the benchmark's
`accuracy_score(..., iou > 0.5)`). Reported over all phrases and the splits things / stuff and
singular / plural (the caller's flags: PNG's `isthing` of the phrase's category and its `plural`).

The benchmark's masks (`round_trip=True`): its data loader resizes every mask to 256 × 256
(torchvision `Resize`, bilinear, no antialiasing: `resize_bilinear`), the ground truth as a float
mask and the predicted instance masks as integer masks (so rounded back to 0 / 1 at 256 × 256);
`perform_test` resizes both back to the image's (H, W), bilinearly, and takes the soft IoU of these
two soft masks. With the option off (default) the IoU is taken on the masks as given, at the image's
resolution: the exact IoU of binary masks, which the round trip only approximates (it blurs every
mask edge; thin or small segments lose most). Use `round_trip=True` to reproduce the benchmark's
protocol to the pixel (up to float32 rounding of the resampling: ≈ 1e-6 on an IoU).

Deliberate deviations: an empty prediction against an empty target scores IoU 1 (the benchmark
divides 0 by 0; PNG's groundable phrases never have an empty target). `average_recall_trapezoid` is
the definition pixelground used before (101 thresholds, trapezoid rule), kept to compare old numbers.
"""

from __future__ import annotations

import numpy as np

THRESHOLDS = np.arange(0, 1, 0.00001)  # the benchmark's τ grid, N = 100 000
ROUND_TRIP_SIZE = 256


def soft_iou(pred, target) -> np.ndarray:
  """Soft IoU: pred (..., H, W) in [0, 1] (probabilities or bool), target (..., H, W) in [0, 1]
  (bool or soft) → (...) float64; 1 where both are empty."""
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


def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) weights of PyTorch's bilinear resampling along one axis (align_corners=False, no
  antialias): source x = (i + 0.5) · n_in / n_out − 0.5, clamped at 0; float32 as PyTorch on float."""
  scale = np.float32(n_in) / np.float32(n_out)
  # scale · (i + 0.5) − 0.5 rounded once to float32 (PyTorch's CPU kernel compiles it to a fused
  # multiply-add; the product of two float32 is exact in float64).
  half = np.arange(n_out, dtype=np.float32) + np.float32(0.5)
  src = np.maximum((np.float64(scale) * half - 0.5).astype(np.float32), np.float32(0))
  lo = src.astype(np.int64)  # floor (src ≥ 0)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = (src - lo.astype(np.float32)).astype(np.float64)
  w = np.zeros((n_out, n_in))
  rows = np.arange(n_out)
  np.add.at(w, (rows, lo), 1.0 - frac)
  np.add.at(w, (rows, hi), frac)
  return w


def resize_bilinear(mask, size: tuple[int, int]) -> np.ndarray:
  """(..., H, W) → (..., h, w) float64 with `size` = (h, w): torchvision `Resize` on a float tensor
  in the PNG benchmark's era (torch `interpolate(mode="bilinear", align_corners=False)`, no
  antialiasing)."""
  m = np.asarray(mask, np.float64)
  wy = _bilinear_matrix(m.shape[-2], size[0])
  wx = _bilinear_matrix(m.shape[-1], size[1])
  return np.matmul(np.matmul(wy, m), wx.T)


def round_trip(pred, target, size: int = ROUND_TRIP_SIZE) -> tuple[np.ndarray, np.ndarray]:
  """The benchmark's masks (module doc): pred (..., H, W) and target (..., H, W) → both resized to
  size × size and back to (H, W), float64. A bool / integer pred is rounded at size × size (half to
  even, as torch.round) like the benchmark's integer instance masks; a float pred stays soft."""
  pred, target = np.asarray(pred), np.asarray(target)
  hw = pred.shape[-2:]
  small = resize_bilinear(pred, (size, size))
  if not np.issubdtype(pred.dtype, np.floating):
    small = np.round(small)
  return resize_bilinear(small, hw), resize_bilinear(resize_bilinear(target, (size, size)), hw)


def png_iou(pred, target, *, round_trip_masks: bool = False) -> np.ndarray:
  """Per-phrase soft IoU of (..., H, W) masks → (...); with `round_trip_masks` after the benchmark's
  256 × 256 round trip (`round_trip`)."""
  if round_trip_masks:
    pred, target = round_trip(pred, target)
  return soft_iou(pred, target)


def recall_curve(ious) -> np.ndarray:
  """recall(τ_i) = mean(IoU ≥ τ_i) on the benchmark's grid `THRESHOLDS` → (N,) float64."""
  ious = np.sort(np.asarray(ious, np.float64).reshape(-1))
  hits = len(ious) - np.searchsorted(ious, THRESHOLDS, side="left")  # count of IoU ≥ τ, exact
  return hits / len(ious)


def average_recall(ious) -> float:
  """The benchmark's AR (module doc): left Riemann sum of recall(τ) over `THRESHOLDS`, summed in
  order as `average_accuracy` does. NaN for no phrases."""
  ious = np.asarray(ious, np.float64).reshape(-1)
  if not len(ious):
    return float("nan")
  terms = np.abs(np.diff(THRESHOLDS)) * recall_curve(ious)[:-1]
  return float(np.cumsum(terms)[-1])  # cumsum adds left to right, like the benchmark's loop


def average_recall_trapezoid(ious, num_thresholds: int = 101) -> float:
  """pixelground's earlier AR: recall(τ) on `num_thresholds` points of [0, 1], trapezoid rule. Not the
  benchmark's number (kept to compare old results). NaN for no phrases."""
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

  Args:
    round_trip_masks: score masks after the benchmark's 256 × 256 round trip (module doc) in `add`.
  """

  def __init__(self, round_trip_masks: bool = False):
    self.round_trip_masks = round_trip_masks
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
    iou = png_iou(pred, target, round_trip_masks=self.round_trip_masks)
    self.add_ious(iou, is_thing, is_plural)
    return iou

  def result(self) -> dict[str, float]:
    ious = np.asarray(self.ious)
    thing, plural = np.asarray(self.is_thing, bool), np.asarray(self.is_plural, bool)
    out: dict[str, float] = {}
    for suffix, keep in (("", np.ones(len(ious), bool)), ("_things", thing), ("_stuff", ~thing),
                         ("_singular", ~plural), ("_plural", plural)):
      sel = ious[keep]
      out["ar" + suffix] = average_recall(sel)
      out["acc50" + suffix] = float(np.mean(sel > 0.5)) if len(sel) else float("nan")
      out["count" + suffix] = int(len(sel))
    return out
