"""Host-side (numpy) evaluation metrics of the full evaluation suite (SPEC section 6).

  boxes       box formats (xyxy ↔ xywh), IoU, referring-localisation Acc@0.5
  masks       referring / reasoning segmentation: per-example IoU, cIoU, gIoU (ignore regions)
  trace       Localized-Narratives traces: per-token point L1, DTW / nDTW (whole trace, per word), LBM
  captions    BLEU / METEOR / ROUGE-L / CIDEr through pycocoevalcap (Java for PTB tokenizer and METEOR)
  detection   COCO AP / AR of boxes and masks (COCOeval's 12 numbers), interpolated-AP helper
  densecap    dense-captioning mAP (IoU × METEOR grid) and detection-only mAP (DenseCap protocol)
  png         Panoptic Narrative Grounding average recall (the benchmark's), things / stuff, singular /
              plural, its optional 256 × 256 mask round trip
  panoptic    panoptic quality PQ / SQ / RQ, COCO panoptic PNG id helpers

Each module's docstring names the official code it reproduces and its deliberate deviations
(docs/metrics.md collects them). The accumulators (`add` per example or image, `result()` at the
end) keep running sums, not masks. The teacher-forced metrics computed during training live in
`pixelground.training.metrics`. Importing this package needs numpy and scipy only; captions (and the
default METEOR of densecap) load pycocoevalcap on first use.
"""

from __future__ import annotations

from pixelground.metrics.boxes import (box_iou, box_iou_matrix, refer_accuracy, xywh_to_xyxy,
                                       xyxy_to_xywh)
from pixelground.metrics.captions import JavaNotFoundError, caption_metrics, meteor_pairs
from pixelground.metrics.densecap import DenseCapEvaluator, merge_gt_boxes
from pixelground.metrics.detection import DetectionEvaluator, interpolated_ap
from pixelground.metrics.masks import MaskIoUAccumulator, intersection_union, mask_iou
from pixelground.metrics.panoptic import PQAccumulator, id_to_rgb, read_panoptic_png, rgb_to_id
from pixelground.metrics.png import PNGAccumulator, average_recall, png_iou, soft_iou
from pixelground.metrics.trace import dtw, lbm_distance, ndtw, per_word_ndtw, token_point_l1

__all__ = [
    "DenseCapEvaluator", "DetectionEvaluator", "JavaNotFoundError", "MaskIoUAccumulator", "PNGAccumulator",
    "PQAccumulator", "average_recall", "box_iou", "box_iou_matrix", "caption_metrics", "dtw",
    "id_to_rgb", "intersection_union", "interpolated_ap", "lbm_distance", "mask_iou", "merge_gt_boxes",
    "meteor_pairs", "ndtw", "per_word_ndtw", "png_iou", "read_panoptic_png", "refer_accuracy",
    "rgb_to_id", "soft_iou", "token_point_l1", "xywh_to_xyxy", "xyxy_to_xywh",
]
