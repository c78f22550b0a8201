"""pixelground.metrics.boxes: conversions, IoU, and the Acc@0.5 boundary (IoU exactly 0.5 is a hit)."""

import numpy as np
import pytest

from pixelground.metrics import boxes


def test_conversions_round_trip():
  xywh = np.array([[10.0, 20.0, 30.0, 5.0], [0.1, 0.2, 0.3, 0.4]])
  xyxy = boxes.xywh_to_xyxy(xywh)
  np.testing.assert_allclose(xyxy, [[10, 20, 40, 25], [0.1, 0.2, 0.4, 0.6]])
  np.testing.assert_allclose(boxes.xyxy_to_xywh(xyxy), xywh)
  # Swapped corners are sorted first.
  np.testing.assert_allclose(boxes.xyxy_to_xywh([40, 25, 10, 20]), [10, 20, 30, 5])


def test_iou_matrix_values():
  a = np.array([[0, 0, 2, 2], [0, 0, 1, 1]])
  b = np.array([[1, 1, 3, 3], [0, 0, 2, 2], [5, 5, 5, 5]])
  np.testing.assert_allclose(boxes.box_iou_matrix(a, b), [[1 / 7, 1, 0], [0, 1 / 4, 0]])
  assert boxes.box_iou([0, 0, 0, 0], [0, 0, 0, 0]) == 0.0  # empty union
  np.testing.assert_allclose(boxes.box_ioa_matrix([[0, 0, 2, 2]], [[1, 0, 5, 5]]), [[0.5]])


def test_refer_accuracy_boundary_is_inclusive():
  gt = np.array([[0.0, 0.0, 2.0, 1.0]] * 4)
  pred = np.array([[0.0, 0.0, 1.0, 1.0],     # IoU exactly 1/2 → hit (≥, as train_metrics)
                   [0.0, 0.0, 0.99, 1.0],    # IoU 0.495 → miss
                   [2.0, 1.0, 0.0, 0.0],     # corners swapped, IoU 1 → hit
                   [5.0, 5.0, 6.0, 6.0]])    # disjoint → miss
  assert boxes.box_iou(pred[0], gt[0]) == 0.5
  assert boxes.refer_accuracy(pred, gt) == 0.5
  assert boxes.refer_accuracy(pred[:1], gt[:1]) == 1.0
  assert boxes.refer_accuracy(pred[:1], gt[:1], thresh=0.51) == 0.0
  assert np.isnan(boxes.refer_accuracy(np.zeros((0, 4)), np.zeros((0, 4))))
  with pytest.raises(ValueError):
    boxes.refer_accuracy(pred, gt[:2])
