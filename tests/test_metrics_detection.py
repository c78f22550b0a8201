"""pixelground.metrics.detection: interpolated AP by hand, and the class-aware evaluator against
pycocotools' COCOeval (bbox, all areas, 100 detections) on random boxes with crowd regions."""

import contextlib
import io

import numpy as np

from pixelground.metrics import detection
from pixelground.metrics.boxes import xyxy_to_xywh


def test_interpolated_ap_by_hand():
  # TP, FP, TP with 2 GT: precision 1, .5, 2/3 at recall .5, .5, 1 → envelope 1 up to recall .5
  # (51 levels) and 2/3 above (50 levels).
  np.testing.assert_allclose(detection.interpolated_ap([True, False, True], 2), (51 + 50 * 2 / 3) / 101)
  assert detection.interpolated_ap([], 3) == 0.0
  assert np.isnan(detection.interpolated_ap([True], 0))


def test_evaluator_by_hand():
  ev = detection.DetectionEvaluator()
  gt = [[0, 0, 10, 10], [20, 0, 30, 10]]
  # Class 1: one exact hit, a duplicate (FP at every threshold). Class 2: a box at IoU 0.6 with its GT.
  ev.add([[0, 0, 10, 10], [0, 0, 10, 10], [20, 0, 32, 10]], [0.9, 0.8, 0.7], [1, 1, 2], gt, [1, 2])
  res = ev.result()
  # Class 1: TP then FP, 1 GT → AP 1 at every threshold. Class 2: IoU 100/120 = .833: TP at .5 – .8
  # (7 thresholds), missed at .85 – .95 (3).
  assert res["per_class"] == {1: 1.0, 2: 0.7}
  assert res["AP"] == (1.0 + 0.7) / 2 and res["AP50"] == 1.0 and res["AP75"] == 1.0


def _coco_eval(images):
  from pycocotools.coco import COCO
  from pycocotools.cocoeval import COCOeval
  gt = COCO()
  anns, dets = [], []
  for img, (pb, ps, pl, gb, gl, gc) in enumerate(images, start=1):
    for b, c, crowd in zip(gb, gl, gc):
      x, y, w, h = xyxy_to_xywh(b).tolist()
      anns.append({"id": len(anns) + 1, "image_id": img, "category_id": int(c), "bbox": [x, y, w, h],
                   "area": w * h, "iscrowd": int(crowd)})
    for b, s, c in zip(pb, ps, pl):
      dets.append({"image_id": img, "category_id": int(c), "bbox": xyxy_to_xywh(b).tolist(),
                   "score": float(s)})
  gt.dataset = {"images": [{"id": i} for i in range(1, len(images) + 1)], "annotations": anns,
                "categories": [{"id": c} for c in range(1, 5)]}
  with contextlib.redirect_stdout(io.StringIO()):
    gt.createIndex()
    ev = COCOeval(gt, gt.loadRes(dets), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  return ev.stats


def test_matches_pycocotools():
  rng = np.random.default_rng(0)
  images = []
  for _ in range(6):
    ng, nd = rng.integers(1, 8), rng.integers(0, 15)
    gb = rng.uniform(0, 80, (ng, 2))
    gb = np.concatenate([gb, gb + rng.uniform(5, 40, (ng, 2))], 1)
    gl = rng.integers(1, 5, ng)
    gc = rng.random(ng) < 0.15
    # Detections: jittered copies of GT boxes (some with a wrong class) and random boxes.
    src = rng.integers(0, ng, nd)
    pb = gb[src] + rng.normal(0, 4, (nd, 4))
    pb[::3] = np.concatenate([rng.uniform(0, 80, (len(pb[::3]), 2))] * 2, 1) + [0, 0, 20, 20]
    pl = np.where(rng.random(nd) < 0.8, gl[src], rng.integers(1, 5, nd))
    images.append((pb, rng.random(nd), pl, gb, gl, gc))
  ours = detection.DetectionEvaluator()
  for im in images:
    ours.add(*im)
  res = ours.result()
  stats = _coco_eval(images)
  np.testing.assert_allclose([res["AP"], res["AP50"], res["AP75"]], stats[:3], rtol=0, atol=1e-12)
  assert 0.05 < res["AP"] < 0.95  # a non-trivial case
