"""pixelground.metrics.masks: per-example IoU, cIoU / gIoU by hand, empty/empty = 1, ignore regions."""

import numpy as np

from pixelground.metrics import masks


def test_ciou_giou_by_hand():
  acc = masks.MaskIoUAccumulator()
  # 1) logits: predicted pixels (0,0), (1,0); target (0,0), (0,1) → I = 1, U = 3.
  iou = acc.add(np.array([[2.0, -1.0], [0.5, -3.0]]), np.array([[1, 1], [0, 0]]))
  np.testing.assert_allclose(iou, 1 / 3)
  # 2) empty prediction (a logit of exactly 0 is not predicted) and empty target → IoU 1, I = U = 0.
  assert acc.add(np.array([[0.0, -1.0], [-1.0, -1.0]]), np.zeros((2, 2), bool)) == 1.0
  # 3) bool prediction, bottom row ignored: I = 2, U = 2 (the 2 ignored predicted pixels vanish).
  iou = acc.add(np.ones((2, 2), bool), np.array([[True, True], [False, False]]),
                ignore=np.array([[False, False], [True, True]]))
  assert iou == 1.0
  res = acc.result()
  assert res["count"] == 3
  np.testing.assert_allclose(res["ciou"], (1 + 0 + 2) / (3 + 0 + 2))
  np.testing.assert_allclose(res["giou"], (1 / 3 + 1 + 1) / 3)


def test_batch_and_float_target():
  pred = np.stack([np.eye(3) * 5 - 1, -np.ones((3, 3))])  # logits: diagonal predicted / nothing
  target = np.stack([np.full((3, 3), 0.7), np.full((3, 3), 0.2)])  # binarised at 0.5: all / nothing
  inter, union = masks.intersection_union(pred, target)
  assert inter.tolist() == [3, 0] and union.tolist() == [9, 0]
  np.testing.assert_allclose(masks.mask_iou(pred, target), [1 / 3, 1.0])
  acc = masks.MaskIoUAccumulator()
  acc.add(pred, target)
  assert acc.result() == {"ciou": 3 / 9, "giou": (1 / 3 + 1) / 2, "count": 2}


def test_empty_accumulator_and_all_empty_split():
  acc = masks.MaskIoUAccumulator()
  assert acc.result()["count"] == 0 and np.isnan(acc.result()["ciou"])
  acc.add(np.zeros((4, 4), bool), np.zeros((4, 4), bool))
  assert acc.result() == {"ciou": 1.0, "giou": 1.0, "count": 1}
