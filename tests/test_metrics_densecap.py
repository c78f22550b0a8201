"""pixelground.metrics.densecap: ground-truth merge and the 30-AP mAP on a hand-computed case, with an
injected deterministic METEOR stand-in (the real METEOR path is in test_metrics_captions.py)."""

import numpy as np

from pixelground.metrics import densecap

# Fake METEOR per candidate; it also checks that each candidate is scored against the right references.
_FAKE = {"red car": (0.3, ["a red car", "red car"]), "a cat": (0.1, ["a dog"]), "tree": (0.2, ["a tree"])}


def _fake_meteor(pairs):
  out = []
  for cand, refs in pairs:
    score, want = _FAKE[cand]
    assert list(refs) == want, (cand, refs)
    out.append(score)
  return out


def test_merge_gt_boxes():
  boxes = [[0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 10, 11], [0, 0, 0, 0]]
  merged, refs = densecap.merge_gt_boxes(boxes, ["a red car", "a dog", "red car", "dot"])
  # Boxes 0 and 2 overlap at 100/110 ≥ 0.7 → one box with mean coordinates and both captions; the
  # degenerate box stays on its own.
  np.testing.assert_allclose(merged, [[0, 0, 10, 10.5], [20, 20, 30, 30], [0, 0, 0, 0]])
  assert refs == [["a red car", "red car"], ["a dog"], ["dot"]]


def test_map_by_hand():
  ev = densecap.DenseCapEvaluator(meteor_fn=_fake_meteor)
  # Image 1: merged GT G1 = [0, 0, 10, 10.5] (2 captions), G2 = [20, 20, 30, 30].
  ev.add(pred_boxes=[[0, 0, 10, 10], [0, 0, 10, 10.5], [20, 20, 30, 35]], pred_scores=[0.8, 0.9, 0.7],
         pred_captions=["red car again", "red car", "a cat"],
         gt_boxes=[[0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 10, 11]],
         gt_captions=["a red car", "a dog", "red car"])
  # Image 2: one GT; one prediction at IoU 200/400 = 0.5, one top-scored prediction overlapping nothing.
  ev.add([[0, 0, 20, 10], [50, 50, 60, 60]], [0.6, 0.95], ["tree", "sky"], [[0, 0, 20, 20]], ["a tree"])
  res = ev.result()
  assert res["num_gt"] == 3 and res["num_preds"] == 5
  # Ranking by score: p5 .95 (no overlap: FP) | p1 .9 (G1, IoU 1, METEOR .3) | p2 .8 (G1 taken: FP)
  #   | p3 .7 (G2, IoU 100/150 = .667, METEOR .1) | p4 .6 (IoU .5, METEOR .2). p1 is a TP at every
  # threshold; p3 at IoU ≤ .6 and METEOR ≤ .1; p4 at IoU ≤ .5 and METEOR ≤ .2. With npos = 3:
  #   A: p3, p4 TP — precision at recall 1 is 3/5 and nothing beats it at lower recall → AP = 0.6
  #   B: p3 only — precision .5 (p1) and .5 (p3) up to recall 2/3: 67 of 101 levels → 0.5 · 67 / 101
  #   C: p4 only — .5 up to recall 1/3 (34 levels), then 2/5 up to 2/3 (33 levels) → (17 + 13.2) / 101
  #   D: p1 only — .5 up to recall 1/3 → 0.5 · 34 / 101
  a, b, c, d = 0.6, 33.5 / 101, 30.2 / 101, 17 / 101
  expected = {}
  for ti in (0.3, 0.4, 0.5):
    expected.update({(ti, 0.0): a, (ti, 0.05): a, (ti, 0.1): a, (ti, 0.15): c, (ti, 0.2): c, (ti, 0.25): d})
  expected.update({(0.6, 0.0): b, (0.6, 0.05): b, (0.6, 0.1): b, (0.6, 0.15): d, (0.6, 0.2): d,
                   (0.6, 0.25): d})
  expected.update({(0.7, tm): d for tm in (0.0, 0.05, 0.1, 0.15, 0.2, 0.25)})
  assert res["ap"].keys() == expected.keys()
  for k, v in expected.items():
    np.testing.assert_allclose(res["ap"][k], v, atol=1e-12, err_msg=str(k))
  np.testing.assert_allclose(res["map"], (3 * (3 * a + 2 * c + d) + (3 * b + 3 * d) + 6 * d) / 30)
  # Detection only (METEOR dropped): A at IoU .3 – .5, B at .6, D at .7.
  np.testing.assert_allclose(res["det_map"], (3 * a + b + d) / 5)


def test_images_without_ground_truth_or_predictions():
  ev = densecap.DenseCapEvaluator(meteor_fn=_fake_meteor)
  ev.add([[0, 0, 1, 1]], [0.5], ["anything"], np.zeros((0, 4)), [])
  ev.add(np.zeros((0, 4)), [], [], [[0, 0, 20, 20]], ["a tree"])
  res = ev.result()
  assert res["map"] == 0.0 and res["num_gt"] == 1 and res["num_preds"] == 1
