"""COCO detection / instance-segmentation AP and AR, and the interpolated-AP helper of dense captioning.

Reproduces: cocodataset/cocoapi, PythonAPI/pycocotools/cocoeval.py, `COCOeval.evaluateImg`,
`COCOeval.accumulate` and `COCOeval.summarize` (iouType "bbox" and "segm", default `Params`), with
the IoUs of PythonAPI/pycocotools/_mask.pyx `iou` (common/maskApi.c `bbIou`, `rleIou`). The twelve
summary numbers equal `COCOeval.stats` to floating-point rounding (tests/test_metrics_detection.py
checks 1e-12 on a real COCO-format file with crowd regions and tied scores, images added shuffled).
Deliberate deviations: none in the numbers; an undefined number is NaN in the named keys (COCOeval
prints -1; `stats` keeps -1), and an image is `add`ed with its arrays instead of read from JSON.

`DetectionEvaluator` protocol (COCOeval's, per image and class):
- detections sorted by score (stable: ties keep the order given), the first `max_dets[-1]` kept;
- ground truth is ignored when crowd, or when its area is outside the area range being evaluated;
- each detection, in that order, takes the unmatched non-ignored ground truth of highest IoU ≥ t (the
  last one on equal IoU); only when there is none, an ignored one (a crowd region can absorb any
  number of detections; IoU with a crowd region = intersection / detection area);
- a detection matched to an ignored ground truth is ignored, and so is an unmatched detection whose
  area lies outside the area range.
Then per class, area range and detection budget m: the first m detections of every image (images in
ascending id: ties across images break by image id) are ranked by score (stable), precision
tp / (tp + fp + ε) (ε = np.spacing(1), as COCOeval) is made monotone, read at the 101 recall levels
0, 0.01, ..., 1 (0 above the highest recall reached), and recall is the final tp / (non-ignored GT).
AP = mean over IoU thresholds .50:.05:.95, recall levels and the classes with ≥ 1 non-ignored ground
truth; AR = mean over IoU thresholds and those classes.

Boxes: xyxy [x0, y0, x1, y1] (default) or COCO xywh [x, y, w, h] (`box_format`), pixels (the area
ranges small < 32², medium 32²–96², large > 96² are in squared pixels). Masks: (H, W) bool per
instance at the image's resolution. Areas: the ground truth's `area` of the COCO file when given
(COCO's instance areas are mask areas even for box evaluation), else the box's w·h or the mask's
pixel count; a detection's area is its w·h ("bbox") or pixel count ("segm"), as `COCO.loadRes`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from pixelground.metrics.boxes import miss_nonfinite

RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)
COCO_IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
COCO_MAX_DETS = (1, 10, 100)
# name → (min, max) area in squared pixels, both ends inclusive (COCOeval's Params.areaRng).
COCO_AREA_RANGES = {"all": (0.0, 1e10), "small": (0.0, 32.0 ** 2), "medium": (32.0 ** 2, 96.0 ** 2),
                    "large": (96.0 ** 2, 1e10)}
# COCOeval.summarize's 12 numbers: (name, AP or AR, IoU threshold or None for all, area, max dets index)
SUMMARY = (("AP", "ap", None, "all", -1), ("AP50", "ap", 0.5, "all", -1),
           ("AP75", "ap", 0.75, "all", -1), ("APs", "ap", None, "small", -1),
           ("APm", "ap", None, "medium", -1), ("APl", "ap", None, "large", -1),
           ("AR1", "ar", None, "all", 0), ("AR10", "ar", None, "all", 1),
           ("AR100", "ar", None, "all", 2),
           ("ARs", "ar", None, "small", -1), ("ARm", "ar", None, "medium", -1),
           ("ARl", "ar", None, "large", -1))


def interpolated_ap(tp, num_gt: int, recall_thresholds=RECALL_THRESHOLDS) -> float:
  """Interpolated AP of a ranked detection list: mean over `recall_thresholds` r of the highest
  precision tp / (tp + fp) reached at any recall ≥ r (0 where r is never reached).

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


def box_iou_xywh(dt, gt, crowd) -> np.ndarray:
  """COCO's box IoU (maskApi.c `bbIou`, same float operations): dt (D, 4), gt (G, 4) xywh, crowd (G,)
  bool → (D, G); against a crowd box the IoU is intersection / detection area. NaN boxes give NaN."""
  d, g = np.asarray(dt, np.float64).reshape(-1, 4), np.asarray(gt, np.float64).reshape(-1, 4)
  da, ga = d[:, 2] * d[:, 3], g[:, 2] * g[:, 3]
  w = np.minimum((d[:, 2] + d[:, 0])[:, None], (g[:, 2] + g[:, 0])[None]) - np.maximum(
      d[:, 0][:, None], g[:, 0][None])
  h = np.minimum((d[:, 3] + d[:, 1])[:, None], (g[:, 3] + g[:, 1])[None]) - np.maximum(
      d[:, 1][:, None], g[:, 1][None])
  inter = w * h
  union = np.where(np.asarray(crowd, bool)[None], da[:, None], (da[:, None] + ga[None]) - inter)
  with np.errstate(invalid="ignore", divide="ignore"):
    iou = inter / union
  return np.where((w <= 0) | (h <= 0), 0.0, iou)


def mask_iou_matrix(dt, gt, crowd) -> np.ndarray:
  """COCO's mask IoU (maskApi.c `rleIou`): dt (D, H, W), gt (G, H, W) bool, crowd (G,) bool → (D, G)
  float64; against a crowd region intersection / detection area; 0 where the intersection is 0."""
  dt, gt = np.asarray(dt, bool), np.asarray(gt, bool)
  if dt.shape[1:] != gt.shape[1:]:
    raise ValueError(f"predicted masks {dt.shape} and ground-truth masks {gt.shape} differ in size")
  d = dt.reshape(len(dt), int(np.prod(dt.shape[1:])))
  g = gt.reshape(len(gt), int(np.prod(gt.shape[1:])))
  # Exact integer counts: float32 sums of 0/1 are exact below 2²⁴ pixels.
  if d.shape[1] >= 2 ** 24:
    raise ValueError("masks of 2**24 pixels or more are not supported")
  inter = np.rint(d.astype(np.float32) @ g.astype(np.float32).T).astype(np.int64)
  da, ga = d.sum(1), g.sum(1)
  union = np.where(np.asarray(crowd, bool)[None], da[:, None], da[:, None] + ga[None] - inter)
  return np.where(inter > 0, inter / np.maximum(union, 1), 0.0)


def _match_image(iou, gt_ignore, crowd, dt_area, area_ranges, thresholds) -> np.ndarray:
  """COCOeval.evaluateImg for one image and class, every area range at once.

  Args:
    iou: (D, G) IoU of the score-sorted detections with the ground truth (file order).
    gt_ignore: (A, G) bool, ground truth ignored per area range; crowd: (G,) bool.
    dt_area: (D,); area_ranges: (A, 2); thresholds: (T,) IoU thresholds.

  Returns:
    (A, T, D) int8: 1 true positive, 0 false positive, -1 ignored.
  """
  n_det, n_gt = iou.shape
  n_area, n_thr = len(area_ranges), len(thresholds)
  status = np.zeros((n_area, n_thr, n_det), np.int8)
  matched = np.zeros((n_area, n_thr, n_det), bool)
  taken = np.zeros((n_area, n_thr, n_gt), bool)
  floor = np.minimum(thresholds, 1 - 1e-10)[:, None]  # (T, 1)
  ignored = gt_ignore[:, None, :]  # (A, 1, G)
  for d in range(n_det if n_gt else 0):
    ok = ((~taken | crowd) & (iou[d] >= floor)[None])  # (A, T, G)
    first = ok & ~ignored
    use = np.where(first.any(-1, keepdims=True), first, ok & ignored)
    score = np.where(use, iou[d], -1.0)
    m = n_gt - 1 - np.argmax(score[..., ::-1], axis=-1)  # the last of the best
    hit = use.any(-1)
    a_idx, t_idx = np.nonzero(hit)
    taken[a_idx, t_idx, m[hit]] = True
    matched[:, :, d] = hit
    status[:, :, d] = np.where(hit, np.where(np.take_along_axis(
        np.broadcast_to(ignored, use.shape), m[..., None], -1)[..., 0], -1, 1), 0)
  lo, hi = area_ranges[:, 0], area_ranges[:, 1]
  outside = (dt_area[None] < lo[:, None]) | (dt_area[None] > hi[:, None])  # (A, D)
  status[~matched & outside[:, None, :]] = -1
  return status


class DetectionEvaluator:
  """Streaming COCO AP / AR (module doc): `add` every image once (also those without detections),
  `result()` at the end. Keeps per image and class only the scores and match outcomes, no masks.

  Args:
    iou_type: "bbox" (score boxes) or "segm" (score masks; boxes are then not needed).
    box_format: "xyxy" or "xywh" (COCO's `bbox`), in pixels.
    iou_thresholds, max_dets, area_ranges: COCOeval's Params (iouThrs, maxDets, areaRng); an int
      max_dets is one budget.
  """

  def __init__(self, iou_thresholds=COCO_IOU_THRESHOLDS, max_dets: int | Sequence[int] = COCO_MAX_DETS,
               *, iou_type: str = "bbox", box_format: str = "xyxy", area_ranges=None):
    if iou_type not in ("bbox", "segm"):
      raise ValueError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}")
    if box_format not in ("xyxy", "xywh"):
      raise ValueError(f"box_format must be 'xyxy' or 'xywh', got {box_format!r}")
    self.iou_type, self.box_format = iou_type, box_format
    self.iou_thresholds = np.asarray(iou_thresholds, np.float64)
    self.max_dets = (int(max_dets),) if np.ndim(max_dets) == 0 else tuple(int(m) for m in max_dets)
    ranges = COCO_AREA_RANGES if area_ranges is None else area_ranges
    self.area_names = list(ranges)
    self.area_ranges = np.asarray([ranges[k] for k in self.area_names], np.float64).reshape(-1, 2)
    self.nonfinite = 0  # predictions with a non-finite box or score (scored as misses)
    self._auto_id = 0
    self._images: set = set()
    # class → [(image id, (D,) sorted scores, (A, T, D) int8 status, (A,) non-ignored GT count)]
    self._per_class: dict[int, list[tuple]] = defaultdict(list)

  def _xywh(self, boxes) -> np.ndarray:
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    if self.box_format == "xywh":
      return b
    return np.concatenate([b[:, :2], b[:, 2:] - b[:, :2]], 1)

  def add(self, pred_boxes, pred_scores, pred_labels, gt_boxes, gt_labels, gt_crowd=None, *,
          image_id=None, gt_areas=None, pred_masks=None, gt_masks=None) -> None:
    """One image.

    Args:
      pred_boxes: (P, 4) in `box_format` (may be None for "segm"); pred_scores: (P,);
        pred_labels: (P,) int class ids.
      gt_boxes: (G, 4) (may be None for "segm"); gt_labels: (G,) int; gt_crowd: (G,) bool or None.
      image_id: the image's id (int); images are ranked by it on tied scores, as COCOeval does, so
        the result does not depend on the order of `add` calls. Default: a running count (the
        order of the calls).
      gt_areas: (G,) the ground truth's areas for the area ranges (COCO's `area`); default w·h
        ("bbox") or the mask's pixel count ("segm").
      pred_masks: (P, H, W) bool, gt_masks: (G, H, W) bool — required for "segm".
    """
    if image_id is None:
      image_id = self._auto_id
    self._auto_id += 1
    if image_id in self._images:
      raise ValueError(f"image {image_id} was added twice")
    self._images.add(image_id)
    ps = np.asarray(pred_scores, np.float64).reshape(-1)
    pl = np.asarray(pred_labels, np.int64).reshape(-1)
    gl = np.asarray(gt_labels, np.int64).reshape(-1)
    gc = np.zeros(len(gl), bool) if gt_crowd is None else np.asarray(gt_crowd, bool).reshape(-1)
    segm = self.iou_type == "segm"
    if segm:
      if pred_masks is None or gt_masks is None:
        raise ValueError("iou_type 'segm' needs pred_masks and gt_masks")
      pm, gm = np.asarray(pred_masks, bool), np.asarray(gt_masks, bool)
      if pm.ndim != 3 and pm.size == 0:  # no detections: (0, H, W) of the ground truth's size
        pm = np.zeros((0,) + gm.shape[1:], bool)
      if gm.ndim != 3 and gm.size == 0:
        gm = np.zeros((0,) + pm.shape[1:], bool)
      if pm.ndim != 3 or gm.ndim != 3:
        raise ValueError(f"masks must be (N, H, W), got {pm.shape} and {gm.shape}")
      pb, gb = np.zeros((len(pm), 4)), np.zeros((len(gm), 4))
      bad = ~np.isfinite(ps)
      ps = np.where(bad, -np.inf, ps)
      self.nonfinite += int(bad.sum())
      p_area, g_area = pm.reshape(len(pm), -1).sum(1).astype(np.float64), gm.reshape(
          len(gm), -1).sum(1).astype(np.float64)
    else:
      pb, gb = self._xywh(pred_boxes), self._xywh(gt_boxes)
      pb, ps, bad = miss_nonfinite(pb, ps)  # a NaN box or score is a miss, counted
      self.nonfinite += bad
      p_area, g_area = pb[:, 2] * pb[:, 3], gb[:, 2] * gb[:, 3]
    if not len(pb) == len(ps) == len(pl) or not len(gb) == len(gl) == len(gc):
      raise ValueError("per-instance arrays of one image must have the same length")
    if gt_areas is not None:
      g_area = np.asarray(gt_areas, np.float64).reshape(-1)
      if len(g_area) != len(gl):
        raise ValueError(f"{len(g_area)} gt_areas for {len(gl)} ground-truth instances")
    lo, hi = self.area_ranges[:, 0], self.area_ranges[:, 1]
    for c in np.union1d(pl, gl).tolist():
      det = np.flatnonzero(pl == c)
      det = det[np.argsort(-ps[det], kind="stable")][:max(self.max_dets)]
      gt = np.flatnonzero(gl == c)
      crowd = gc[gt]
      if segm:
        iou = mask_iou_matrix(pm[det], gm[gt], crowd)
      else:
        iou = box_iou_xywh(pb[det], gb[gt], crowd)
      ga = g_area[gt]
      gt_ignore = crowd[None] | (ga[None] < lo[:, None]) | (ga[None] > hi[:, None])  # (A, G)
      status = _match_image(iou, gt_ignore, crowd, p_area[det], self.area_ranges, self.iou_thresholds)
      self._per_class[c].append((image_id, ps[det], status, np.sum(~gt_ignore, axis=1)))

  def accumulate(self) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """COCOeval.accumulate → (precision (T, R, K, A, M), recall (T, K, A, M), the K class ids); -1
    where a class has no non-ignored ground truth in that area range."""
    classes = sorted(self._per_class)
    n_t, n_r, n_a, n_m = len(self.iou_thresholds), len(RECALL_THRESHOLDS), len(self.area_ranges), len(
        self.max_dets)
    precision = -np.ones((n_t, n_r, len(classes), n_a, n_m))
    recall = -np.ones((n_t, len(classes), n_a, n_m))
    for k, c in enumerate(classes):
      entries = sorted(self._per_class[c], key=lambda e: e[0])  # images in ascending id
      for a in range(n_a):
        npig = int(sum(e[3][a] for e in entries))
        if npig == 0:
          continue
        for m, max_det in enumerate(self.max_dets):
          scores = np.concatenate([e[1][:max_det] for e in entries])
          order = np.argsort(-scores, kind="mergesort")
          status = np.concatenate([e[2][a, :, :max_det] for e in entries], axis=1)[:, order]
          tp_sum = np.cumsum(status == 1, axis=1).astype(float)
          fp_sum = np.cumsum(status == 0, axis=1).astype(float)
          for t in range(n_t):
            tp, fp = tp_sum[t], fp_sum[t]
            rc = tp / npig
            pr = tp / (fp + tp + np.spacing(1))
            recall[t, k, a, m] = rc[-1] if len(tp) else 0
            envelope = np.maximum.accumulate(pr[::-1])[::-1]
            idx = np.searchsorted(rc, RECALL_THRESHOLDS, side="left")
            precision[t, :, k, a, m] = np.where(idx < len(pr), envelope[np.minimum(idx, len(pr) - 1)]
                                                if len(pr) else 0.0, 0.0)
    return precision, recall, classes

  def stats(self, precision=None, recall=None) -> np.ndarray:
    """COCOeval.summarize's 12 numbers (-1 where undefined), in its order: AP, AP50, AP75, APs, APm,
    APl, AR1, AR10, AR100, ARs, ARm, ARl (needs the default area ranges and max_dets (1, 10, 100))."""
    if precision is None:
      precision, recall, _ = self.accumulate()
    return np.asarray([self._summary(precision, recall, *row[1:]) for row in SUMMARY])

  def _summary(self, precision, recall, kind, iou_thr, area, det_index) -> float:
    if area not in self.area_names or not -len(self.max_dets) <= det_index < len(self.max_dets):
      return -1.0
    a, m = self.area_names.index(area), det_index % len(self.max_dets)
    if kind == "ap":
      s = precision
      if iou_thr is not None:
        s = s[np.flatnonzero(iou_thr == self.iou_thresholds)]
      s = s[:, :, :, a, m]
    else:
      s = recall
      if iou_thr is not None:
        s = s[np.flatnonzero(iou_thr == self.iou_thresholds)]
      s = s[:, :, a, m]
    return float(np.mean(s[s > -1])) if np.any(s > -1) else -1.0

  def result(self) -> dict:
    """{"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl" (NaN
    where undefined; AP50 / AP75 only when those IoU thresholds are used, AR1 / AR10 / AR100 named
    after `max_dets`), "stats" (COCOeval.stats, -1 where undefined), "per_class": {class: AP over the
    IoU thresholds, all areas, max_dets[-1]}, "num_classes"}."""
    precision, recall, classes = self.accumulate()
    all_area = self.area_names.index("all") if "all" in self.area_names else 0
    out: dict = {}
    for name, kind, iou_thr, area, det_index in SUMMARY:
      if iou_thr is not None and not np.any(iou_thr == self.iou_thresholds):
        continue
      if kind == "ar" and area == "all":  # AR at each budget (only the largest if not three)
        if len(self.max_dets) != 3:
          if det_index != 2:
            continue
          det_index = -1
        name = f"AR{self.max_dets[det_index]}"
      value = self._summary(precision, recall, kind, iou_thr, area, det_index)
      out[name] = float("nan") if value == -1 else value
    out["stats"] = self.stats(precision, recall).tolist()
    per_class = {}
    for k, c in enumerate(classes):
      s = precision[:, :, k, all_area, -1]
      if np.any(s > -1):
        per_class[c] = float(np.mean(s[s > -1]))
    out["per_class"] = per_class
    out["num_classes"] = len(per_class)
    return out
