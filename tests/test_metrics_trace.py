"""pixelground.metrics.trace: per-token point L1, DTW / nDTW and LBM on hand-computed cases."""

import itertools

import numpy as np
import pytest

from pixelground.metrics import trace


def test_token_point_l1_ordered_and_nearest():
  target = np.array([[0.1, 0.2, 0.5, 0.6],
                     [0.0, 0.0, 0.0, 0.0],   # no trace for this word: never scored
                     [0.2, 0.2, 0.4, 0.4]])
  pred = np.array([[0.1, 0.3, 0.5, 0.4],     # errors 0, .1, 0, .2 → mean .075
                   [0.3, 0.3, 0.3, 0.3],
                   [0.4, 0.4, 0.2, 0.2]])    # the two points swapped
  err = trace.token_point_l1(pred, target)
  np.testing.assert_allclose(err[[0, 2]], [0.075, 0.2])  # ordered: swapped points cost |Δ| = .2 each
  assert np.isnan(err[1])
  near = trace.token_point_l1(pred.reshape(3, 2, 2), target, match="nearest")
  # token 0: (0.1, 0.3) is nearest (0.1, 0.2) (L1 .1), (0.5, 0.4) nearest (0.5, 0.6) (L1 .2) → .3 / 4.
  np.testing.assert_allclose(near[[0, 2]], [0.075, 0.0])
  valid = np.array([True, True, False])
  assert np.isnan(trace.token_point_l1(pred, target, valid)[2])


def test_dtw_and_ndtw_by_hand():
  ref = np.array([[0.0, 0.0], [0.1, 0.0], [0.2, 0.0]])
  assert trace.dtw(ref, ref) == 0.0 and trace.ndtw(ref, ref) == 1.0
  # Shifted by 0.05: every path visits ≥ 3 cells each costing ≥ 0.05; the diagonal costs exactly 0.15.
  shifted = ref + [0.0, 0.05]
  np.testing.assert_allclose(trace.dtw(shifted, ref), 0.15)
  np.testing.assert_allclose(trace.ndtw(shifted, ref), np.exp(-0.15 / (3 * 0.1)))
  np.testing.assert_allclose(trace.ndtw(shifted, ref, d_th=0.5), np.exp(-0.15 / (3 * 0.5)))
  # Different lengths: (0,0)↔(0,0) 0, (0,0)|(0.2,0)↔(0.1,0) 0.1, (0.2,0)↔(0.2,0) 0 → DTW 0.1.
  short = np.array([[0.0, 0.0], [0.2, 0.0]])
  np.testing.assert_allclose(trace.dtw(short, ref), 0.1)
  np.testing.assert_allclose(trace.ndtw(short, ref), np.exp(-0.1 / (3 * 0.1)))


def test_dtw_matches_the_textbook_recursion():
  rng = np.random.default_rng(0)
  p, r = rng.random((7, 2)), rng.random((11, 2))
  acc = np.full((8, 12), np.inf)
  acc[0, 0] = 0.0
  for i in range(1, 8):
    for j in range(1, 12):
      acc[i, j] = np.linalg.norm(p[i - 1] - r[j - 1]) + min(acc[i - 1, j], acc[i, j - 1], acc[i - 1, j - 1])
  np.testing.assert_allclose(trace.dtw(p, r), acc[7, 11])
  np.testing.assert_allclose(trace.dtw(r, p), acc[7, 11])  # DTW is symmetric


def test_per_word_ndtw():
  ref = [np.array([[0.0, 0.0], [0.1, 0.0]]), np.zeros((0, 2)), np.array([[0.5, 0.5]])]
  pred = [np.array([[0.0, 0.0], [0.1, 0.0]]), np.array([[0.3, 0.3]]), np.zeros((0, 2))]
  out = trace.per_word_ndtw(pred, ref)
  assert out[0] == 1.0 and np.isnan(out[1]) and out[2] == 0.0
  with pytest.raises(ValueError):
    trace.per_word_ndtw(pred[:2], ref)


def test_lbm_by_hand():
  ref = np.array([[0.0, 0.0], [0.5, 0.0], [1.0, 0.0], [1.5, 0.0]])
  # p = 2, m = 4, window 0: element 0 may take ref 0 or 1, element 1 ref 2 or 3.
  pred = np.array([[0.5, 0.0], [0.0, 0.0]])
  # element 0 → ref 1 (0); element 1 → ref 2 (distance 1) rather than ref 3 (1.5) → (0 + 1) / 2.
  assert trace.lbm_distance(pred, ref) == 0.5
  assert trace.lbm_distance(ref, pred) == 0.5  # roles swap: symmetric
  # window 1 widens both windows to all of ref: element 1 may take ref 0 → 0.
  assert trace.lbm_distance(pred, ref, window=1) == 0.0
  assert trace.lbm_distance(ref, ref) == 0.0
  # The release's cost for trace boxes: mean |Δ| over the 4 coordinates.
  boxes_pred = np.array([[0.0, 0.0, 0.2, 0.2]])
  boxes_ref = np.array([[0.1, 0.0, 0.2, 0.4], [0.0, 0.0, 0.2, 0.2]])
  assert trace.lbm_distance(boxes_pred, boxes_ref, metric="l1") == 0.0  # window 0 covers both refs
  np.testing.assert_allclose(trace.lbm_distance(boxes_pred, boxes_ref[:1], metric="l1"), 0.3 / 4)


def test_lbm_equals_brute_force():
  rng = np.random.default_rng(1)
  a, b = rng.random((3, 2)), rng.random((5, 2))
  best = np.inf
  for cols in itertools.permutations(range(5), 3):
    if all(i * 5 <= j * 3 < (i + 1) * 5 for i, j in enumerate(cols)):
      best = min(best, np.mean([np.linalg.norm(a[i] - b[j]) for i, j in enumerate(cols)]))
  np.testing.assert_allclose(trace.lbm_distance(a, b), best)
