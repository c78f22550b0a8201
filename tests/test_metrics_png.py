"""pixelground.metrics.png: soft IoU, and AR / Acc@0.5 with their splits on 3 phrases by hand."""

import numpy as np

from pixelground.metrics import png


def test_soft_iou_by_hand():
  p = np.array([[0.5, 1.0]])
  t = np.array([[True, False]])
  # Σ p·t = 0.5; Σ (p + t − p·t) = (0.5 + 1 − 0.5) + (1 + 0 − 0) = 2.
  assert png.soft_iou(p, t) == 0.25
  assert png.soft_iou(np.zeros((2, 2)), np.zeros((2, 2), bool)) == 1.0
  ids = np.array([[1, 2], [3, 0]])
  assert png.phrase_mask(ids, [2, 3]).tolist() == [[False, True], [True, False]]


def test_average_recall_and_splits_by_hand():
  # Three phrases on 1 × 3 masks, binary predictions: IoU 1/3, 2/3, 1.
  target = np.array([[[1, 1, 1]], [[1, 1, 1]], [[0, 1, 0]]], bool)
  pred = np.array([[[1, 0, 0]], [[1, 1, 0]], [[0, 1, 0]]], np.float32)
  acc = png.PNGAccumulator()
  ious = acc.add(pred, target, is_thing=[True, False, True], is_plural=[False, True, True])
  np.testing.assert_allclose(ious, [1 / 3, 2 / 3, 1])
  # recall(τ) on τ = 0, .01, ..., 1 for one phrase of IoU v < 1: 1 up to the last τ ≤ v, then 0. The
  # trapezoid gives the full steps below v plus half of the step that crosses it:
  #   v = 1/3: τ = 0 .. 0.33 → 0.33 + 0.005 = 0.335;  v = 2/3: 0.66 + 0.005 = 0.665;  v = 1: 1.
  # AR of a set is the mean of these (the recall curve is the mean of the per-phrase curves).
  ar = {1 / 3: 0.335, 2 / 3: 0.665, 1.0: 1.0}
  res = acc.result()
  np.testing.assert_allclose(res["ar"], (0.335 + 0.665 + 1.0) / 3)
  np.testing.assert_allclose(res["ar_things"], (ar[1 / 3] + ar[1.0]) / 2)
  np.testing.assert_allclose(res["ar_stuff"], ar[2 / 3])
  np.testing.assert_allclose(res["ar_singular"], ar[1 / 3])
  np.testing.assert_allclose(res["ar_plural"], (ar[2 / 3] + ar[1.0]) / 2)
  assert res["acc50"] == 2 / 3 and res["acc50_singular"] == 0.0 and res["acc50_plural"] == 1.0
  assert (res["count"], res["count_things"], res["count_stuff"]) == (3, 2, 1)


def test_average_recall_limits():
  assert png.average_recall([0.0]) == 0.005  # recall(0) = 1 for any IoU
  np.testing.assert_allclose(png.average_recall([0.37], num_thresholds=100001), 0.37, atol=1e-5)
  assert np.isnan(png.average_recall([]))
  acc = png.PNGAccumulator()
  acc.add_ious([0.9], is_thing=True, is_plural=False)
  res = acc.result()
  assert np.isnan(res["ar_stuff"]) and res["count_stuff"] == 0
