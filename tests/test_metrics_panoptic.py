"""pixelground.metrics.panoptic: PQ / SQ / RQ on the real COCO panoptic sample (ground truth against
itself and three perturbations, expected values derived by hand from the JSON's segment counts and
areas) and on a tiny synthetic image with void and crowd pixels."""

import collections
import json
import os

import numpy as np
import pytest

from pixelground.metrics import panoptic

SAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data",
                      "coco_panoptic_sample")


@pytest.fixture(scope="module")
def sample():
  """[(ids (H, W), segments_info)] of the two real images, and the 133 categories."""
  path = os.path.join(SAMPLE, "panoptic_examples.json")
  if not os.path.exists(path):
    pytest.skip(f"real COCO panoptic sample not found at {os.path.abspath(SAMPLE)}")
  with open(path) as f:
    data = json.load(f)
  images = [(panoptic.read_panoptic_png(os.path.join(SAMPLE, "panoptic_examples", a["file_name"])),
             a["segments_info"]) for a in data["annotations"]]
  return images, data["categories"]


def _pq(images, preds, categories):
  acc = panoptic.PQAccumulator(categories)
  for (gt_ids, gt_segs), (pred_ids, pred_segs) in zip(images, preds):
    acc.add(gt_ids, gt_segs, pred_ids, pred_segs)
  return acc.result()


def _check(res, expected):
  """expected: {group: (pq, sq, rq, n)}."""
  for group, (pq, sq, rq, n) in expected.items():
    got = res[group]
    assert got["n"] == n, group
    np.testing.assert_allclose([got["pq"], got["sq"], got["rq"]], [pq, sq, rq], rtol=0, atol=1e-12,
                               err_msg=group)


def test_rgb_id_round_trip_and_real_areas(sample):
  images, _ = sample
  for ids, segs in images:
    assert np.array_equal(panoptic.rgb_to_id(panoptic.id_to_rgb(ids)), ids)
    counts = collections.Counter(ids.ravel().tolist())
    assert {s["id"]: s["area"] for s in segs} == {s["id"]: counts[s["id"]] for s in segs}
  rgb = np.array([[[1, 2, 3]]], np.uint8)
  assert panoptic.rgb_to_id(rgb)[0, 0] == 1 + 256 * 2 + 65536 * 3


# What the sample holds (panoptic_examples.json), used for the hand derivations below:
#   142238: 13 person + 1 person crowd, 1 sports ball, stuff tree / sky / grass
#   439180: 13 person + 1 person crowd, 2 truck (areas 1680, 5791), 11 horse + 1 horse crowd,
#           stuff gravel / tree / sky / grass
# Categories present: things person, sports ball, truck, horse (4); stuff tree, sky, grass, gravel (4).
# A crowd segment predicted as its own segment matches nothing but lies entirely on its crowd region,
# so it is no false positive: every category then has FP = FN = 0 and every IoU = 1.


def test_ground_truth_against_itself_is_perfect(sample):
  images, cats = sample
  res = _pq(images, images, cats)
  _check(res, {"all": (1, 1, 1, 8), "things": (1, 1, 1, 4), "stuff": (1, 1, 1, 4)})
  assert sorted(res["per_class"]) == [1, 8, 19, 37, 125, 184, 187, 193]
  assert res["per_class"][1]["tp"] == 26 and res["per_class"][19]["tp"] == 11


def _segment(images, image_id_index, seg_id):
  ids, segs = images[image_id_index]
  return ids, segs, next(s for s in segs if s["id"] == seg_id)


def test_removed_segment_becomes_void(sample):
  images, cats = sample
  ids, segs, horse = _segment(images, 1, 16758454)  # a horse of 439180 (area 4363)
  assert horse["category_id"] == 19
  pred_ids = np.where(ids == horse["id"], 0, ids)
  preds = [images[0], (pred_ids, [s for s in segs if s is not horse])]
  res = _pq(images, preds, cats)
  # horse: 11 non-crowd GT; 10 matched at IoU 1, the removed one is a FN. The void pixels belong to no
  # prediction, so no other IoU changes.
  pq_horse, sq_horse, rq_horse = 10 / (10 + 0.5 * 1), 10 / 10, 10 / (10 + 0.5 * 1)
  assert res["per_class"][19] == {"pq": pq_horse, "sq": 1.0, "rq": rq_horse, "tp": 10, "fp": 0, "fn": 1}
  _check(res, {"all": ((7 + pq_horse) / 8, (7 + sq_horse) / 8, (7 + rq_horse) / 8, 8),
               "things": ((3 + pq_horse) / 4, 1.0, (3 + rq_horse) / 4, 4),
               "stuff": (1, 1, 1, 4)})


def test_two_segments_of_one_category_merged(sample):
  images, cats = sample
  ids, segs, small = _segment(images, 1, 4587520)  # truck, area 1680
  _, _, big = _segment(images, 1, 6094848)  # truck, area 5791
  pred_ids = np.where(ids == small["id"], big["id"], ids)
  preds = [images[0], (pred_ids, [s for s in segs if s is not small])]
  res = _pq(images, preds, cats)
  # The merged prediction (area 5791 + 1680) contains the big truck: IoU = 5791 / 7471 > 0.5, a TP.
  # The small truck overlaps it by 1680 / 7471 < 0.5: a FN. No FP. Truck has only these 2 segments.
  iou = 5791 / (5791 + 1680)
  pq_truck, sq_truck, rq_truck = iou / (1 + 0.5 * 1), iou / 1, 1 / (1 + 0.5 * 1)
  got = res["per_class"][8]
  assert (got["tp"], got["fp"], got["fn"]) == (1, 0, 1)
  np.testing.assert_allclose([got["pq"], got["sq"], got["rq"]], [pq_truck, sq_truck, rq_truck], atol=1e-15)
  _check(res, {"all": ((7 + pq_truck) / 8, (7 + sq_truck) / 8, (7 + rq_truck) / 8, 8),
               "things": ((3 + pq_truck) / 4, (3 + sq_truck) / 4, (3 + rq_truck) / 4, 4),
               "stuff": (1, 1, 1, 4)})


def test_segment_relabelled_to_another_category(sample):
  images, cats = sample
  ids, segs, person = _segment(images, 0, 4917453)  # a person of 142238 (area 477)
  assert person["category_id"] == 1
  dog = next(c["id"] for c in cats if c["name"] == "dog")  # absent from the ground truth
  pred_segs = [dict(s, category_id=dog) if s is person else s for s in segs]
  res = _pq(images, [(ids, pred_segs), images[1]], cats)
  # person: 26 non-crowd GT, 25 matched, the relabelled one a FN. dog: the relabelled segment matches
  # no dog GT, lies on a person (not void, not a dog crowd) → one FP; dog now counts as a category.
  # The other 7 categories (ball, truck, horse, 4 stuff) stay at 1; SQ of dog is 0 (no TP).
  pq_person = 25 / (25 + 0.5 * 1)
  assert res["per_class"][1]["fn"] == 1 and res["per_class"][1]["tp"] == 25
  assert res["per_class"][dog] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "tp": 0, "fp": 1, "fn": 0}
  _check(res, {"all": ((7 + pq_person) / 9, 8 / 9, (7 + pq_person) / 9, 9),
               "things": ((3 + pq_person) / 5, 4 / 5, (3 + pq_person) / 5, 5),
               "stuff": (1, 1, 1, 4)})


def test_synthetic_void_and_crowd():
  # Ground truth 4 × 8: 1 = category 1 (thing), 2 = category 1 crowd, 3 = category 2 (stuff), 0 = void.
  gt = np.array([[1, 1, 1, 1, 0, 0, 2, 2],
                 [1, 1, 1, 1, 0, 0, 2, 2],
                 [3, 3, 3, 3, 3, 3, 2, 2],
                 [3, 3, 3, 3, 3, 3, 0, 0]])
  pred = np.array([[5, 5, 5, 5, 5, 0, 6, 6],
                   [5, 5, 5, 0, 5, 0, 6, 6],
                   [7, 7, 7, 7, 7, 7, 6, 6],
                   [7, 7, 7, 8, 8, 8, 9, 9]])
  gt_segs = [{"id": 1, "category_id": 1, "iscrowd": 0}, {"id": 2, "category_id": 1, "iscrowd": 1},
             {"id": 3, "category_id": 2, "iscrowd": 0}]
  pred_segs = [{"id": 5, "category_id": 1}, {"id": 6, "category_id": 1}, {"id": 7, "category_id": 2},
               {"id": 8, "category_id": 2}, {"id": 9, "category_id": 2}]
  acc = panoptic.PQAccumulator({1: True, 2: False, 3: True})
  acc.add(gt, gt_segs, pred, pred_segs)
  res = acc.result()
  # pred 5 (area 9): ∩ gt 1 = 7, ∩ void = 2 → union 9 + 8 − 7 − 2 = 8, IoU 7/8: TP of category 1.
  # pred 6: exactly the category-1 crowd region → unmatched but 6/6 crowd: not a FP.
  # pred 7 (area 9) ⊂ gt 3 (area 12): IoU 9/12: TP of category 2.
  # pred 8 (3 pixels of gt 3): unmatched, no void / crowd → FP of category 2.
  # pred 9 (2 pixels, all void) → not a FP. Category 3 never appears → skipped.
  assert res["per_class"][1] == {"pq": 7 / 8, "sq": 7 / 8, "rq": 1.0, "tp": 1, "fp": 0, "fn": 0}
  assert res["per_class"][2] == {"pq": 0.75 / 1.5, "sq": 0.75, "rq": 1 / 1.5, "tp": 1, "fp": 1, "fn": 0}
  _check(res, {"all": ((7 / 8 + 0.5) / 2, (7 / 8 + 0.75) / 2, (1 + 2 / 3) / 2, 2),
               "things": (7 / 8, 7 / 8, 1, 1), "stuff": (0.5, 0.75, 2 / 3, 1)})


def test_crowd_of_another_category_does_not_excuse_a_prediction():
  gt = np.array([[1, 1], [2, 2]])
  pred = np.array([[1, 1], [4, 4]])
  acc = panoptic.PQAccumulator({1: True, 2: True})
  acc.add(gt, [{"id": 1, "category_id": 1, "iscrowd": 0}, {"id": 2, "category_id": 1, "iscrowd": 1}],
          pred, [{"id": 1, "category_id": 1}, {"id": 4, "category_id": 2}])
  # pred 4 (category 2) lies on a category-1 crowd: still a FP of category 2.
  assert acc.per_class()[2]["fp"] == 1 and acc.per_class()[1]["tp"] == 1


def test_bad_inputs_raise():
  acc = panoptic.PQAccumulator({1: True})
  gt = np.array([[1, 0]])
  with pytest.raises(ValueError, match="not in its segments_info"):
    acc.add(gt, [{"id": 1, "category_id": 1}], np.array([[7, 0]]), [])
  with pytest.raises(ValueError, match="unknown category"):
    acc.add(gt, [{"id": 1, "category_id": 1}], gt, [{"id": 1, "category_id": 5}])
  with pytest.raises(ValueError, match="reserved for void"):
    acc.add(gt, [{"id": 1, "category_id": 1}], gt, [{"id": 1, "category_id": 1}, {"id": 0, "category_id": 1}])
