"""pixelground.metrics.densecap against DenseCap's Lua evaluator (jcjohnson/densecap eval/eval_utils.lua,
densecap/box_utils.lua): hand-computed cases for each rule and quirk, and random cases against a
loop-by-loop transcription of the Lua written here. METEOR is an injected deterministic stand-in (the
real METEOR path is in test_metrics_captions.py)."""

import numpy as np
import pytest

from pixelground.metrics import captions, densecap

# Fake METEOR per candidate; it also checks that each candidate is scored against the right references.
_FAKE = {"red car": (0.3, ["a red car", "red car"]), "a cat": (0.1, ["a dog"]), "tree": (0.2, ["a tree"]),
         "b": (0.5, ["b"]), "a": (0.5, ["a", "a2"]), "exactly": (0.1, ["x"]), "zero": (0.0, ["x"])}


def _fake_meteor(pairs):
  out = []
  for cand, refs in pairs:
    score, want = _FAKE[cand]
    assert list(refs) == want, (cand, refs)
    out.append(score)
  return out


def test_recall_levels_are_luas_accumulated_loop():
  levels = densecap.RECALL_LEVELS
  # `for t=0,1,0.01` adds 0.01 a hundred times: the 101st value 1.0000000000000007 > 1 ends the loop.
  assert len(levels) == 100 and levels[0] == 0.0
  assert levels[30] == 0.30000000000000010 and levels[30] > 0.3
  assert levels[-1] == 0.9900000000000007


def test_ap_levels_by_hand():
  # 11 ranked predictions, TP TP TP then 7 FP then TP; 10 ground-truth boxes. Recall 0.1, 0.2, 0.3
  # (precision 1) up to rank 10, then 0.4 at rank 11 (precision 4/11).
  tp = [1, 1, 1] + [0] * 7 + [1]
  # Official: levels 0 ... 0.29 (30 levels) reach precision 1; level 30 is 0.30000000000000010, above
  # the recall 0.3, so levels 30 ... 39 (all ≤ 0.4; level 40 is 0.4000000000000002) get 4/11.
  np.testing.assert_allclose(densecap.densecap_ap(tp, 10), (30 + 10 * 4 / 11) / 100, rtol=1e-15)
  # official=False: 101 levels, 0 ... 0.3 (31 levels) at 1, 0.31 ... 0.4 (10) at 4/11.
  np.testing.assert_allclose(densecap.densecap_ap(tp, 10, official=False), (31 + 10 * 4 / 11) / 101,
                             rtol=1e-15)
  assert densecap.densecap_ap([], 3) == 0.0 and densecap.densecap_ap([False], 0) == 0.0
  assert np.isnan(densecap.densecap_ap([False], 0, official=False))


def test_official_iou_of_small_boxes():
  iou = lambda a, b: densecap.official_iou_matrix(densecap.official_corners([a]),
                                                  densecap.official_corners([b]))[0, 0]
  # A 1 x 1 box against a 2 x 1 box: the Lua's corners are x ∈ [0.5, 0.5] and [0.5, 1.5]; with +1
  # the widths are 1 and 2, intersection 1: IoU 1 / (1 + 2 - 1) = 0.5, the continuous IoU. Adding 1
  # pixel to the xyxy corners instead would give widths 2 and 3 (heights 2): 4 / (4 + 6 - 4) = 2/3.
  assert iou([0, 0, 1, 1], [0, 0, 2, 1]) == 0.5
  # Boxes that touch along x = 1: the Lua's corners [0.5, 0.5] and [1.5, 1.5], iw = 0.5 - 1.5 + 1 = 0:
  # no overlap (adding 1 pixel to xyxy corners would give 2 / (4 + 4 - 2) = 1/3).
  assert iou([0, 0, 1, 1], [1, 0, 2, 1]) == 0.0
  # Float32: width 0.99999999 rounds to 1 (and its centre to 0.5), so the Lua's IoU is exactly 0.5
  # where the float64 continuous IoU is 0.499999995 (below an IoU threshold of 0.5).
  assert iou([0, 0, 0.99999999, 1], [0, 0, 2, 1]) == 0.5
  ev = densecap.DenseCapEvaluator(meteor_fn=lambda p: [0.5] * len(p), iou_thresholds=(0.5,),
                                  meteor_thresholds=(0.0,))
  ev64 = densecap.DenseCapEvaluator(meteor_fn=lambda p: [0.5] * len(p), iou_thresholds=(0.5,),
                                    meteor_thresholds=(0.0,), official=False)
  for e in (ev, ev64):
    e.add([[0, 0, 0.99999999, 1]], [1.0], ["x"], [[0, 0, 2, 1]], ["y"])
  assert ev.result()["map"] == 1.0 and ev64.result()["map"] == 0.0


def test_merge_gt_boxes():
  boxes = [[0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 10, 11], [0, 0, 0, 0]]
  merged, refs = densecap.merge_gt_boxes(boxes, ["a red car", "a dog", "red car", "dot"])
  # Boxes 0 and 2 overlap at 100/110 ≥ 0.7 → one box with mean coordinates and both captions; the
  # degenerate box stays on its own.
  np.testing.assert_allclose(merged, [[0, 0, 10, 10.5], [20, 20, 30, 30], [0, 0, 0, 0]])
  assert refs == [["a red car", "red car"], ["a dog"], ["dot"]]


def test_merge_takes_the_box_with_most_neighbours_first():
  # D far away; A-B IoU 100/120 = .833, B-C 120/150 = .8, A-C 100/150 = .667 (< .7). Neighbour counts
  # (itself included): D 1, A 2, B 3, C 2 → B's group {A, B, C} first, then {D}. (Taking boxes in
  # input order would give {A, B}, {C}, {D}.)
  boxes = [[50, 50, 60, 60], [0, 0, 10, 10], [0, 0, 10, 12], [0, 0, 10, 15]]
  for official in (True, False):
    merged, refs = densecap.merge_gt_boxes(boxes, ["d", "a", "b", "c"], official=official)
    np.testing.assert_allclose(merged, [[0, 0, 10, 37 / 3], [50, 50, 60, 60]])
    assert refs == [["a", "b", "c"], ["d"]]


def test_meteor_threshold_is_strict():
  ev = densecap.DenseCapEvaluator(meteor_fn=_fake_meteor)
  ev.add([[0, 0, 10, 10]], [0.9], ["exactly"], [[0, 0, 10, 10]], ["x"])
  res = ev.result()
  # METEOR exactly 0.1: a TP (AP 1) for t_m = 0 and 0.05 only, at all 5 IoU thresholds: 10 of 30.
  assert res["ap"][(0.5, 0.05)] == 1.0 and res["ap"][(0.5, 0.1)] == 0.0
  np.testing.assert_allclose(res["map"], 10 / 30, rtol=1e-15)
  assert res["det_map"] == 1.0
  ev = densecap.DenseCapEvaluator(meteor_fn=_fake_meteor)
  ev.add([[0, 0, 10, 10]], [0.9], ["zero"], [[0, 0, 10, 10]], ["x"])
  # METEOR 0 is not > 0: no TP anywhere (the previous ≥ rule made the t_m = 0 row 1: map 5/30).
  assert ev.result()["map"] == 0.0 and ev.result()["det_map"] == 1.0


def test_unmatched_prediction_takes_the_last_merged_box():
  # Ground truth A, B, A': A and A' merge (IoU 100/110), so the merged boxes are [A+A', B]: B, input
  # box 1, is the LAST merged box. Predictions: .9 far from everything, .8 exactly on B, .7 on A+A'.
  gt, gt_caps = [[0, 0, 10, 10], [20, 0, 30, 10], [0, 0, 10, 11]], ["a", "b", "a2"]
  preds = ([[50, 50, 60, 60], [20, 0, 30, 10], [0, 0, 10, 10.5]], [0.9, 0.8, 0.7], ["sky", "b", "a"])
  ev, ev_fixed = (densecap.DenseCapEvaluator(meteor_fn=_fake_meteor, official=o) for o in (True, False))
  for e in (ev, ev_fixed):
    e.add(*preds, gt, gt_caps)
  # Official: the far prediction has box index -1 → used[-1] marks B taken; the prediction on B is then
  # a FP. Ranked TP flags 0, 0, 1 with 2 boxes: recall 0.5 at rank 3 (precision 1/3), reached by the
  # 50 levels 0 ... 0.49 (level 50 is 0.5000000000000002) → AP = (50 / 3) / 100 = 1/6 everywhere.
  res = ev.result()
  for v in list(res["ap"].values()) + list(res["det_ap"].values()):
    np.testing.assert_allclose(v, 1 / 6, rtol=1e-15)
  # Without the quirk: 0, 1, 1 → precision 2/3 at recall 1, the best at every level → AP 2/3.
  res = ev_fixed.result()
  np.testing.assert_allclose([res["map"], res["det_map"]], [2 / 3, 2 / 3], rtol=1e-15)


def test_map_by_hand():
  ev = densecap.DenseCapEvaluator(meteor_fn=_fake_meteor)
  ev_fixed = densecap.DenseCapEvaluator(meteor_fn=_fake_meteor, official=False)
  for e in (ev, ev_fixed):
    # Image 1: merged GT G1 = [0, 0, 10, 10.5] (2 captions), G2 = [20, 20, 30, 30].
    e.add(pred_boxes=[[0, 0, 10, 10], [0, 0, 10, 10.5], [20, 20, 30, 35]], pred_scores=[0.8, 0.9, 0.7],
          pred_captions=["red car again", "red car", "a cat"],
          gt_boxes=[[0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 10, 11]],
          gt_captions=["a red car", "a dog", "red car"])
    # Image 2: one GT G3; a prediction at IoU 200/400 = 0.5, a top-scored one overlapping nothing.
    e.add([[0, 0, 20, 10], [50, 50, 60, 60]], [0.6, 0.95], ["tree", "sky"], [[0, 0, 20, 20]],
          ["a tree"])
  # Ranking: p5 .95 (no overlap: FP) | p1 .9 (G1, IoU 1, METEOR .3) | p2 .8 (G1 taken: FP)
  #   | p3 .7 (G2, IoU 100/150 = .667, METEOR .1) | p4 .6 (G3, IoU .5, METEOR .2). npos = 3.
  # Official: p5 marks G3 (its image's last box) taken, so p4 is a FP. p1 is a TP everywhere (.3 > .25);
  # p3 at IoU ≤ .6 and METEOR thresholds 0, .05 (.1 is not > .1).
  #   X (8 APs: IoU .3 – .6 × t_m 0, .05): TP flags 0 1 0 1 0: precision .5 up to recall 2/3, which
  #     levels 0 ... 0.66 reach (67 levels) → .335
  #   D (the other 22): 0 1 0 0 0: .5 up to recall 1/3, levels 0 ... 0.33 (34) → .17
  res = ev.result()
  assert res["num_gt"] == 3 and res["num_preds"] == 5
  x, d = 0.335, 0.17
  expected = {(ti, tm): (x if ti <= 0.6 and tm <= 0.05 else d)
              for ti in densecap.IOU_THRESHOLDS for tm in densecap.METEOR_THRESHOLDS}
  assert res["ap"].keys() == expected.keys()
  for k, v in expected.items():
    np.testing.assert_allclose(res["ap"][k], v, rtol=1e-14, err_msg=str(k))
  np.testing.assert_allclose(res["map"], (8 * x + 22 * d) / 30, rtol=1e-14)  # 0.214
  np.testing.assert_allclose(res["det_map"], (4 * x + d) / 5, rtol=1e-14)  # 0.302
  # official=False: p4 is a TP at IoU ≤ .5 and t_m ≤ .15; 101 levels.
  #   A (IoU ≤ .5, t_m 0, .05; 6 APs): 0 1 0 1 1 → precision 3/5 at recall 1, the best → .6
  #   C (IoU ≤ .5, t_m .1, .15; 6): 0 1 0 0 1 → .5 to recall 1/3 (34 levels), .4 to 2/3 (33) → 30.2/101
  #   B (IoU .6, t_m 0, .05; 2): 0 1 0 1 0 → .5 to recall 2/3 (67 levels) → 33.5/101
  #   D' (the other 16): 0 1 0 0 0 → .5 to recall 1/3 (34 levels) → 17/101
  res = ev_fixed.result()
  a, c, b, d2 = 0.6, 30.2 / 101, 33.5 / 101, 17 / 101
  np.testing.assert_allclose(res["map"], (6 * a + 6 * c + 2 * b + 16 * d2) / 30, rtol=1e-14)
  np.testing.assert_allclose(res["det_map"], (3 * a + b + d2) / 5, rtol=1e-14)


def test_images_without_ground_truth_or_predictions():
  ev = densecap.DenseCapEvaluator(meteor_fn=_fake_meteor)
  ev.add([[0, 0, 1, 1]], [0.5], ["anything"], np.zeros((0, 4)), [])
  ev.add(np.zeros((0, 4)), [], [], [[0, 0, 20, 20]], ["a tree"])
  res = ev.result()
  assert res["map"] == 0.0 and res["num_gt"] == 1 and res["num_preds"] == 1


# --- A loop-by-loop transcription of the Lua evaluator (scalars, 0-based lists), for random cases. ---

def _lua_corners(b):
  # Our xyxy → (xc, yc, w, h) float32 → box_utils.xcycwh_to_x1y1x2y2 in float32.
  f = np.float32
  xc, yc, w, h = f((b[0] + b[2]) / 2), f((b[1] + b[3]) / 2), f(b[2] - b[0]), f(b[3] - b[1])
  hw, hh = (w - f(1)) / f(2), (h - f(1)) / f(2)
  return [float(-hw + xc), float(-hh + yc), float(hw + xc), float(hh + yc)]


def _lua_overlap(bb, gt):
  iw = min(bb[2], gt[2]) - max(bb[0], gt[0]) + 1
  ih = min(bb[3], gt[3]) - max(bb[1], gt[1]) + 1
  if iw > 0 and ih > 0:
    ua = (bb[2] - bb[0] + 1) * (bb[3] - bb[1] + 1) + (gt[2] - gt[0] + 1) * (gt[3] - gt[1] + 1) - iw * ih
    return iw * ih / ua
  return 0.0


def _lua_evaluate(images, meteor):
  records, logprobs, npos = [], [], 0
  for pred_boxes, scores, texts, gt_boxes, gt_texts in images:
    boxes, targets = [_lua_corners(b) for b in pred_boxes], [_lua_corners(b) for b in gt_boxes]
    n = len(targets)  # merge_boxes: D with 1 on the diagonal, absorbed rows / columns zeroed
    D = [[1.0 if i == j else _lua_overlap(targets[i], targets[j]) for j in range(n)] for i in range(n)]
    groups = []
    while True:
      sums = [sum(1 for i in range(n) if D[i][j] >= 0.7) for j in range(n)]
      if max(sums) == 0:
        break
      top = sums.index(max(sums))
      group = [j for j in range(n) if D[top][j] >= 0.7]
      groups.append(group)
      for k in group:
        for m in range(n):
          D[k][m] = D[m][k] = 0.0
    merged = [[float(np.float32(np.float32(sum(targets[k][c] for k in g)) / np.float32(len(g))))
               for c in range(4)] for g in groups]
    merged_text = [[gt_texts[k] for k in g] for g in groups]
    used = [0] * len(merged)
    for ii in sorted(range(len(scores)), key=lambda i: -scores[i]):
      ovmax, jmax = 0.0, -1
      for j, gt in enumerate(merged):
        ov = _lua_overlap(boxes[ii], gt)
        if ov > ovmax:
          ovmax, jmax = ov, j
      ok = 1 if used[jmax] == 0 else 0  # Python's [-1] is Torch's used[-1]: the last box
      used[jmax] = 1
      records.append((ok, ovmax, texts[ii], merged_text[jmax] if jmax >= 0 else []))
      logprobs.append(scores[ii])
    npos += len(merged)
  meteors = [meteor([(r[2], r[3])])[0] for r in records]
  ranked = sorted(range(len(records)), key=lambda i: -logprobs[i])
  ap_results, det_results = {}, {}
  for min_overlap in (0.3, 0.4, 0.5, 0.6, 0.7):
    for min_score in (-1, 0, 0.05, 0.1, 0.15, 0.2, 0.25):
      tp = fp = 0
      rec, prec = [], []
      for i in ranked:
        ok, ov = records[i][0], records[i][1]
        if ov >= min_overlap and ok == 1 and meteors[i] > min_score:
          tp += 1
        else:
          fp += 1
        rec.append(tp / npos)
        prec.append(tp / (fp + tp))
      ap, apn, t = 0.0, 0, 0.0
      while t <= 1:
        ap += max(p * (1.0 if r >= t else 0.0) for p, r in zip(prec, rec))
        apn += 1
        t += 0.01
      if min_score == -1:
        det_results[min_overlap] = ap / apn
      else:
        ap_results[(min_overlap, float(min_score))] = ap / apn
  return ap_results, det_results


def test_matches_lua_transcription_on_random_cases():
  words = ["a", "b", "c", "d"]
  meteor = lambda pairs: [(len(c) + 3 * len(r) + sum(map(len, r))) % 7 * 0.05 for c, r in pairs]
  for seed in range(40):
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(int(rng.integers(1, 5))):
      g = rng.integers(0, 12, (int(rng.integers(1, 6)), 2)) * 2.0
      gt = np.concatenate([g, g + rng.integers(1, 8, g.shape) * 2.0], axis=1)
      gt = np.concatenate([gt, gt[:2] + rng.integers(0, 2, (min(2, len(gt)), 4))])  # near-duplicates
      pick = gt[rng.integers(0, len(gt), int(rng.integers(1, 7)))]
      far = np.full((int(rng.integers(0, 2)), 4), 40.0) + [0, 0, 5, 5]  # overlaps nothing
      pred = np.concatenate([pick + rng.choice([0, 0.5, 1, 3], pick.shape), far])
      images.append((pred, rng.permutation(len(pred)) / 10 + rng.random(),
                     [str(rng.choice(words)) * int(rng.integers(1, 4)) for _ in pred],
                     gt, [str(rng.choice(words)) for _ in gt]))
    ev = densecap.DenseCapEvaluator(meteor_fn=meteor)
    for im in images:
      ev.add(*im)
    res = ev.result()
    ap, det = _lua_evaluate(images, meteor)
    assert res["ap"] == ap and res["det_ap"] == det, seed
    np.testing.assert_allclose(res["map"], np.mean(list(ap.values())), rtol=1e-14, atol=0)


def test_batched_meteor_equals_one_eval_per_pair():
  # DenseCap's bridge sends each record as its own SCORE + EVAL (one segment); meteor_pairs batches
  # them in one EVAL and takes the segment scores. Same METEOR 1.5 jar and options (pycocoevalcap's).
  pytest.importorskip("pycocoevalcap")
  if not captions.java_available():
    pytest.skip("needs `java` on PATH (METEOR)")
  pairs = [("a red car on the road", ["red car", "a car parked"]), ("a dog", ["a white dog running"]),
           ("tree", ["a tree", "green leaves"]), ("man wearing a hat", ["a man with a black hat"])]
  batch = captions.meteor_pairs(pairs)
  proc = captions._meteor().meteor_p
  single = []
  with captions._meteor_lock:
    for cand, refs in pairs:
      proc.stdin.write((" ||| ".join(["SCORE", *refs, cand]) + "\n").encode())
      proc.stdin.flush()
      stats = proc.stdout.readline().decode().strip()
      proc.stdin.write(f"EVAL ||| {stats}\n".encode())
      proc.stdin.flush()
      seg, total = (float(proc.stdout.readline()) for _ in range(2))  # one segment: two equal lines
      assert seg == total
      single.append(seg)
  assert batch.tolist() == single and 0 < min(single)
