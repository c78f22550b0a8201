"""pixelground.metrics.detection against pycocotools' COCOeval: hand cases, random boxes, and a real
COCO-format file (the COCO panoptic sample as instances: crowd regions, RLE masks, many tied scores),
all 12 summary numbers for boxes and masks with the images added in shuffled order."""

import contextlib
import io
import json

import numpy as np
import pytest

import coco_files
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
  # Class 1: TP then FP, 1 GT → AP 1 at every threshold (COCO's precision tp / (tp + fp + ε)).
  # Class 2: IoU 100/120 = .833: TP at .5 – .8 (7 thresholds), missed at .85 – .95 (3).
  assert res["per_class"] == pytest.approx({1: 1.0, 2: 0.7}, abs=1e-15)
  assert res["AP"] == pytest.approx(0.85, abs=1e-15)
  assert res["AP50"] == pytest.approx(1.0) and res["AP75"] == pytest.approx(1.0)
  # Both boxes are small (area < 32²): APs = AP; no medium / large ground truth → undefined.
  assert res["APs"] == pytest.approx(0.85) and np.isnan(res["APm"]) and res["stats"][4] == -1
  # One detection per image and class is enough for both objects: AR1 = AR100 = (1 + 0.7) / 2.
  assert res["AR1"] == pytest.approx(0.85) and res["AR100"] == pytest.approx(0.85)


def test_ties_across_images_follow_image_ids():
  # Two images, one object each, two tied detections: a miss (image 1) and a hit (image 2). COCOeval
  # ranks image 1 first on the tie: precision 0 then 1/2 at recall 0 then 1/2 → envelope 1/2 on the
  # 51 recall levels up to 1/2, AP = 51 · 0.5 / 101 (hit first would give 51 / 101). Adding image 2
  # first must not change that.
  def run(order):
    ev = detection.DetectionEvaluator(iou_thresholds=[0.5])
    imgs = {1: ([[50, 50, 60, 60]], [0, 0, 10, 10]), 2: ([[0, 0, 10, 10]], [0, 0, 10, 10])}
    for i in order:
      ev.add(imgs[i][0], [0.5], [1], [imgs[i][1]], [1], image_id=i)
    return ev.result()["AP"]
  assert run([1, 2]) == run([2, 1]) == pytest.approx(51 * 0.5 / 101, abs=1e-15)
  with pytest.raises(ValueError, match="added twice"):
    ev = detection.DetectionEvaluator()
    ev.add([], [], [], [], [], image_id=3)
    ev.add([], [], [], [], [], image_id=3)


def _summarize(coco_eval) -> np.ndarray:
  with contextlib.redirect_stdout(io.StringIO()):
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
  return np.asarray(coco_eval.stats)


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
    res = gt.loadRes(dets)
  return _summarize(COCOeval(gt, res, "bbox"))


def test_matches_pycocotools_random_boxes():
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
  for i, im in enumerate(images, start=1):
    ours.add(*im, image_id=i)
  res = ours.result()
  stats = _coco_eval(images)
  np.testing.assert_allclose(res["stats"], stats, rtol=0, atol=1e-12)
  assert 0.05 < res["AP"] < 0.95  # a non-trivial case


@pytest.fixture(scope="module")
def real_files(tmp_path_factory):
  """The COCO-format instances file of the real sample and its results (tests/coco_files.py)."""
  root = tmp_path_factory.mktemp("coco")
  gt_path, masks = coco_files.instances(root)
  with open(gt_path) as f:
    gt = json.load(f)
  boxes, segms = coco_files.results(gt, masks, np.random.default_rng(1))
  return gt_path, gt, boxes, segms


def _official(gt_path, results, iou_type):
  from pycocotools.coco import COCO
  from pycocotools.cocoeval import COCOeval
  with contextlib.redirect_stdout(io.StringIO()):
    coco = COCO(gt_path)
    res = coco.loadRes(results)
  return _summarize(COCOeval(coco, res, iou_type))


def evaluate_files(gt_path, results, iou_type, image_order=None, use_ids=True) -> dict:
  """Our evaluator on a COCO instances file + a results list, images added in `image_order` (with
  their ids unless `use_ids` is False: then ties across images break in the order of addition)."""
  from pycocotools import mask as mask_utils
  from pycocotools.coco import COCO
  with contextlib.redirect_stdout(io.StringIO()):
    coco = COCO(gt_path)
  ev = detection.DetectionEvaluator(iou_type=iou_type, box_format="xywh")
  by_image = {}
  for r in results:
    by_image.setdefault(r["image_id"], []).append(r)
  for image_id in image_order or sorted(coco.getImgIds()):
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
    dets = by_image.get(image_id, [])
    kw = {}
    if iou_type == "segm":
      img = coco.imgs[image_id]
      hw = (img["height"], img["width"])
      kw = {"gt_masks": np.asarray([coco.annToMask(a) for a in anns], bool).reshape(-1, *hw),
            "pred_masks": np.asarray([mask_utils.decode(d["segmentation"]) for d in dets],
                                     bool).reshape(-1, *hw)}
    ev.add([d.get("bbox", [0, 0, 0, 0]) for d in dets], [d["score"] for d in dets],
           [d["category_id"] for d in dets], [a["bbox"] for a in anns],
           [a["category_id"] for a in anns], [a["iscrowd"] for a in anns],
           image_id=image_id if use_ids else None, gt_areas=[a["area"] for a in anns], **kw)
  return ev.result()


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_matches_cocoeval_on_real_files(real_files, iou_type):
  gt_path, gt, boxes, segms = real_files
  results = boxes if iou_type == "bbox" else segms
  # The fixture is what the check needs: crowd regions, ties across images, > 100 detections.
  assert sum(a["iscrowd"] for a in gt["annotations"]) >= 6
  scores = [r["score"] for r in results]
  assert len(results) > 250 and len(set(scores)) == len(coco_files.SCORES)
  official = _official(gt_path, results, iou_type)
  ids = [im["id"] for im in gt["images"]]
  rng = np.random.default_rng(2)
  for _ in range(2):
    ours = evaluate_files(gt_path, results, iou_type, image_order=rng.permutation(ids).tolist())
    np.testing.assert_allclose(ours["stats"], official, rtol=0, atol=1e-12)
  # Ties decide here: breaking them in the order of addition instead of by image id moves the numbers.
  moved = evaluate_files(gt_path, results, iou_type, image_order=ids[::-1], use_ids=False)
  assert np.abs(np.asarray(moved["stats"]) - official).max() > 1e-3
  names = [row[0] for row in detection.SUMMARY]
  assert [ours[n] for n in names] == pytest.approx(official.tolist(), abs=1e-12)
  assert 0.05 < official[0] < 0.9 and np.all(official > 0)  # non-trivial, every number defined
  print(iou_type, " ".join(f"{n}={v:.5f}" for n, v in zip(names, official)))
