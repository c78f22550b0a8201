"""pixelground.metrics.png against the PNG benchmark's code (BCV-Uniandes/PNG, not installable): its
AR loop ported literally here as the reference, hand cases, the 256 × 256 mask round trip against
PyTorch's bilinear resampling, and the real COCO panoptic sample with a perturbed prediction."""

import os

import numpy as np
import pytest

import coco_files
from pixelground.metrics import png
from pixelground.metrics.panoptic import read_panoptic_png


def benchmark_average_accuracy(ious):
  """The benchmark's `utils/meters.average_accuracy` (without its plotting), line for line."""
  ious = np.asarray(ious)
  accuracy, total = [], 0
  thresholds = np.arange(0, 1, 0.00001)
  for t in thresholds:
    hits = (ious >= t).astype(int)
    accuracy.append(np.sum(hits) / len(hits))
  for i, (t0, t1) in enumerate(zip(thresholds[:-1], thresholds[1:])):
    total += np.abs(t1 - t0) * accuracy[i]
  return total


def test_soft_iou_by_hand():
  p = np.array([[0.5, 1.0]])
  t = np.array([[True, False]])
  # Σ p·t = 0.5; Σ (p + t − p·t) = (0.5 + 1 − 0.5) + (1 + 0 − 0) = 2.
  assert png.soft_iou(p, t) == 0.25
  assert png.soft_iou(np.zeros((2, 2)), np.zeros((2, 2), bool)) == 1.0
  ids = np.array([[1, 2], [3, 0]])
  assert png.phrase_mask(ids, [2, 3]).tolist() == [[False, True], [True, False]]


def test_average_recall_hand_cases():
  # A phrase of IoU v adds the widths of the steps whose left end τ_i ≤ v, i ≤ N − 2: the sum
  # telescopes to τ_{k+1} for the last τ_k ≤ v (at most τ_{N−1} = 0.99999).
  assert png.average_recall([1.0]) == pytest.approx(0.99999, abs=1e-12)
  assert png.average_recall([0.0]) == pytest.approx(1e-5, abs=1e-15)
  assert png.average_recall([0.5]) == pytest.approx(0.50001, abs=1e-12)
  # τ_37000 = 37000 · 1e-5 is stored just above 0.37, so an IoU of exactly 0.37 stops at τ_36999.
  assert png.THRESHOLDS[37000] > 0.37
  assert png.average_recall([0.37]) == pytest.approx(0.37, abs=1e-12)
  # A set: the recall curve is the mean of the phrases' curves, so AR is the mean of theirs.
  assert png.average_recall([0.0, 0.5, 1.0]) == pytest.approx((1e-5 + 0.50001 + 0.99999) / 3, abs=1e-12)
  assert np.isnan(png.average_recall([]))
  # The earlier definition (101 thresholds, trapezoid): a phrase of IoU 0 scored 0.005, 0.37 → 0.375.
  assert png.average_recall_trapezoid([0.0]) == 0.005
  assert png.average_recall_trapezoid([0.37]) == pytest.approx(0.375)


def test_average_recall_equals_benchmark_loop_exactly():
  rng = np.random.default_rng(0)
  ious = np.concatenate([rng.random(40), [0.0, 1.0, 0.5], png.THRESHOLDS[[7, 33333, 99998, 99999]],
                         np.nextafter(png.THRESHOLDS[[12345, 67890]], 0)])
  assert png.average_recall(ious) == benchmark_average_accuracy(ious)
  for part in (ious[:1], ious[40:43], ious[-6:]):
    assert png.average_recall(part) == benchmark_average_accuracy(part)


def test_splits_and_strict_accuracy_by_hand():
  # Three phrases on 1 × 4 masks, binary predictions: IoU 1/4, 1/2, 1.
  target = np.array([[[1, 1, 1, 1]], [[1, 1, 0, 0]], [[0, 1, 0, 0]]], bool)
  pred = np.array([[[1, 0, 0, 0]], [[1, 0, 0, 0]], [[0, 1, 0, 0]]], np.float32)
  acc = png.PNGAccumulator()
  ious = acc.add(pred, target, is_thing=[True, False, True], is_plural=[False, True, True])
  np.testing.assert_allclose(ious, [1 / 4, 1 / 2, 1])
  ar = {0.25: 0.25001, 0.5: 0.50001, 1.0: 0.99999}
  res = acc.result()
  np.testing.assert_allclose(res["ar"], sum(ar.values()) / 3, atol=1e-12)
  np.testing.assert_allclose(res["ar_things"], (ar[0.25] + ar[1.0]) / 2, atol=1e-12)
  np.testing.assert_allclose(res["ar_stuff"], ar[0.5], atol=1e-12)
  np.testing.assert_allclose(res["ar_singular"], ar[0.25], atol=1e-12)
  np.testing.assert_allclose(res["ar_plural"], (ar[0.5] + ar[1.0]) / 2, atol=1e-12)
  # Accuracy at 0.5 is IoU > 0.5 as the benchmark's: the phrase at exactly 0.5 misses.
  assert res["acc50"] == 1 / 3 and res["acc50_stuff"] == 0.0 and res["acc50_plural"] == 0.5
  assert (res["count"], res["count_things"], res["count_stuff"]) == (3, 2, 1)
  empty = png.PNGAccumulator()
  empty.add_ious([0.9], is_thing=True, is_plural=False)
  assert np.isnan(empty.result()["ar_stuff"]) and empty.result()["count_stuff"] == 0


def test_bilinear_resize_by_hand_and_against_torch():
  # 4 → 2: source x = (i + .5)·2 − .5 = .5, 2.5: the mean of pixels (0, 1) and (2, 3).
  np.testing.assert_allclose(png.resize_bilinear([[0, 1, 2, 3]], (1, 2)), [[0.5, 2.5]])
  # 2 → 4: x = (i + .5)/2 − .5 = −.25 (clamped to 0), .25, .75, 1.25 (upper neighbour clamped).
  np.testing.assert_allclose(png.resize_bilinear([[0.0, 1.0]], (1, 4)), [[0, 0.25, 0.75, 1.0]])
  ones = np.ones((37, 53))
  pred, target = png.round_trip(ones.astype(bool), ones)
  np.testing.assert_allclose(pred, 1.0) and np.testing.assert_allclose(target, 1.0)
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(0)
  mask = (rng.random((427, 640)) < 0.3).astype(np.float32)
  for size in ((256, 256), (700, 900)):
    want = torch.nn.functional.interpolate(torch.from_numpy(mask)[None, None], size=size,
                                           mode="bilinear", align_corners=False,
                                           antialias=False)[0, 0].numpy()
    np.testing.assert_allclose(png.resize_bilinear(mask, size), want, rtol=0, atol=1e-6)


def _sample_phrases():
  """The first real image's segments as PNG phrases: every person alone (singular thing), all persons
  together (plural), each stuff segment (singular stuff) → ids map, [(segment ids, thing, plural)]."""
  data = coco_files.load_sample()
  pan = data["annotations"][0]
  ids = read_panoptic_png(os.path.join(coco_files.SAMPLE, "panoptic_examples", pan["file_name"]))
  isthing = {c["id"]: bool(c["isthing"]) for c in data["categories"]}
  segs = pan["segments_info"]
  persons = [s["id"] for s in segs if s["category_id"] == 1 and not s["iscrowd"]]
  phrases = [([s["id"]], isthing[s["category_id"]], False) for s in segs if not s["iscrowd"]]
  return ids, phrases + [(persons, True, True)]


def test_real_sample_perturbed_prediction():
  ids, phrases = _sample_phrases()
  target = np.stack([np.isin(ids, p) for p, _, _ in phrases])
  # The prediction: each phrase's mask moved 4 pixels right and 3 down.
  pred = np.zeros_like(target)
  pred[:, 3:, 4:] = target[:, :-3, :-4]
  flags = ([t for _, t, _ in phrases], [p for _, _, p in phrases])
  exact, trip = png.PNGAccumulator(), png.PNGAccumulator(round_trip_masks=True)
  iou = exact.add(pred, target, *flags)
  iou_trip = trip.add(pred, target, *flags)
  new, new_trip = exact.result(), trip.result()
  old = png.average_recall_trapezoid(iou)
  assert new["ar"] == benchmark_average_accuracy(iou)
  # The round trip blurs edges: IoUs move, small segments most, the largest barely.
  assert 0.005 < np.abs(iou_trip - iou).mean() < 0.2
  big = int(np.argmax(target.reshape(len(target), -1).sum(1)))
  assert abs(iou_trip[big] - iou[big]) < 0.02
  print(f"\nPNG AR on the real sample ({len(phrases)} phrases, prediction shifted by (3, 4) px): "
        f"old (trapezoid, 101 τ) {old:.5f} | official {new['ar']:.5f} | official + 256² round trip "
        f"{new_trip['ar']:.5f}; acc50 {new['acc50']:.4f} / {new_trip['acc50']:.4f}")
  assert abs(old - new["ar"]) < 0.01  # the definitions differ by at most half a 0.01 step per phrase
  # The round trip as the benchmark runs it, in PyTorch: integer prediction masks are rounded at
  # 256 × 256 (torchvision's integer path), the ground truth stays soft; both resized back.
  torch = pytest.importorskip("torch")

  def resize(x, size):
    return torch.nn.functional.interpolate(x[None, None].float(), size=size, mode="bilinear",
                                           align_corners=False, antialias=False)[0, 0]
  for k in range(len(phrases)):
    p = resize(torch.round(resize(torch.from_numpy(pred[k].astype(np.int64)), (256, 256))), ids.shape)
    t = resize(resize(torch.from_numpy(target[k].astype(np.float32)), (256, 256)), ids.shape)
    want = float((p * t).sum() / (p + t - p * t).sum())
    assert iou_trip[k] == pytest.approx(want, abs=1e-5)
