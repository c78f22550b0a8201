"""pixelground.inference.grounding: association logits → phrase masks and → COCO panoptic predictions.

Hand cases on tiny grids, then the real COCO panoptic sample (../shared/data/coco_panoptic_sample):
ground-truth associations over the ground-truth segments must score PNG AR = 1 and PQ = 1 (also after
a round trip through the COCO panoptic results files), and a permuted association must not."""

import json
import os

import numpy as np
import pytest

from pixelground.inference import grounding
from pixelground.metrics import panoptic, png

SAMPLE = os.environ.get("PIXELGROUND_COCO_PANOPTIC_SAMPLE", os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "coco_panoptic_sample"))


def _sig(x):
  return 1 / (1 + np.exp(-x))


# -- phrase grounding by hand --------------------------------------------------------------------------

def _columns(e=4, h=2):
  """E masks on an h × E grid: entity i is column i."""
  masks = np.zeros((e, h, e), bool)
  for i in range(e):
    masks[i, :, i] = True
  return masks


def test_phrase_entities_and_masks_by_hand():
  masks = _columns()
  entity_valid = np.array([True, True, True, False])
  noun_valid = np.array([True, True, False, True])
  logits = np.array([[2.0, 0.5, -1.0, 5.0],     # owns e0 and e1 (e3 is invalid despite its logit)
                     [-3.0, -1.0, -2.0, 9.0],   # none > 0 → argmax valid entity e1 (not e3)
                     [5.0, 5.0, 5.0, 5.0],      # invalid noun → nothing
                     [-1.0, -1.0, -1.0, -1.0]])  # none > 0, a tie → the first valid entity e0
  own = grounding.phrase_entities(logits, noun_valid, entity_valid)
  assert own.tolist() == [[True, True, False, False], [False, True, False, False],
                          [False, False, False, False], [True, False, False, False]]
  out = grounding.phrase_masks(logits, masks, noun_valid, entity_valid)
  assert out.shape == (4, 2, 4) and out.dtype == bool
  assert out[:, 0].tolist() == [[True, True, False, False], [False, True, False, False],
                                [False, False, False, False], [True, False, False, False]]
  assert np.array_equal(out[:, 0], out[:, 1])
  # A logit of exactly 0 is sigmoid 0.5: not owned (> 0.5 is), so the fallback picks the argmax.
  assert grounding.phrase_entities(np.array([[0.0, -0.1, 0.0]])).tolist() == [[True, False, False]]
  # No valid entity: nothing, not even the fallback; None = all valid.
  assert not grounding.phrase_masks(logits, masks, None, np.zeros(4, bool)).any()
  assert grounding.phrase_entities(logits).tolist() == [
      [True, True, False, True], [False, False, False, True], [True, True, True, True],
      [True, False, False, False]]
  # Overlapping entities: the union, not a count of owners.
  overlap = np.array([[[1, 1, 0]], [[0, 1, 1]]], bool)
  assert grounding.phrase_masks(np.array([[1.0, 1.0]]), overlap)[0].tolist() == [[True, True, True]]
  with pytest.raises(ValueError):
    grounding.phrase_masks(logits[:, :3], masks)
  with pytest.raises(ValueError):
    grounding.phrase_entities(logits, noun_valid[:3])


# -- category names ------------------------------------------------------------------------------------

CATS = [{"id": 1, "name": "person", "isthing": 1}, {"id": 2, "name": "dog", "isthing": 1},
        {"id": 10, "name": "sky-other-merged", "isthing": 0},
        {"id": 11, "name": "grass-merged", "isthing": 0},
        {"id": 12, "name": "wall-brick", "isthing": 0}, {"id": 13, "name": "window-other", "isthing": 0}]


def test_category_names():
  assert [grounding.category_display_name(c["name"]) for c in CATS] == [
      "person", "dog", "sky", "grass", "wall brick", "window"]
  lookup = grounding.category_lookup(CATS)
  assert lookup == {"person": 1, "dog": 2, "sky": 10, "grass": 11, "wall brick": 12, "window": 13}
  for text, want in [("sky", 10), ("  Sky. ", 10), ("WALL   brick!", 12), ("wall brick,", 12),
                     ("'dog'", 2), ("sky-other-merged", 10), ("Person\n", 1), ("unicorn", None),
                     ("", None), ("wall", None), ("persons", None)]:
    assert grounding.parse_category(text, lookup) == want, text
  with pytest.raises(ValueError, match="share the display name"):
    grounding.category_lookup(CATS + [{"id": 99, "name": "sky-merged", "isthing": 0}])


# -- panoptic prediction by hand -----------------------------------------------------------------------

def _hand_case():
  """6 × 8 grid, 7 entities. Index order deliberately differs from area order."""
  masks = np.zeros((7, 6, 8), bool)
  masks[0, 1:3, 1:3] = True   # dog (4 px) on top of ...
  masks[1, 0:4, 0:4] = True   # ... a person (16 px)
  masks[2, 0:2, 5:8] = True   # sky, part A (6 px)
  masks[3, 5, 5:8] = True     # sky, part B (3 px)
  masks[4, 4:6, 0:2] = True   # best noun has an unknown category; weak known nouns only
  masks[5, 4, 2:4] = True     # invalid entity
  masks[6, 5, 4] = True       # grass, 1 px
  entity_valid = np.array([1, 1, 1, 1, 1, 0, 1], bool)
  noun_categories = np.array([2, 1, 10, -1, 11, 999])  # 999: not a category → unknown too
  logits = np.full((6, 7), -5.0)
  logits[0, 0], logits[1, 1], logits[2, 2], logits[2, 3], logits[4, 6] = 2.0, 3.0, 1.0, 4.0, 2.0
  logits[3, 4], logits[5, 4], logits[1, 4] = 8.0, 9.0, -1.0
  logits[:, 5] = 10.0  # the invalid entity would win everything
  return logits, masks, entity_valid, noun_categories


def test_panoptic_prediction_by_hand():
  logits, masks, entity_valid, noun_categories = _hand_case()
  id_map, segs = grounding.panoptic_prediction(logits, masks, entity_valid, noun_categories, CATS,
                                               min_area=2)
  # Segments in order of first entity: dog 1, person 2, sky (e2 ∪ e3) 3, e4 → person 4 (its unknown
  # nouns are skipped; the best known noun is the person noun at −1); grass (1 px < min_area) → void.
  want = np.array([[2, 2, 2, 2, 0, 3, 3, 3],
                   [2, 1, 1, 2, 0, 3, 3, 3],
                   [2, 1, 1, 2, 0, 0, 0, 0],
                   [2, 2, 2, 2, 0, 0, 0, 0],
                   [4, 4, 0, 0, 0, 0, 0, 0],
                   [4, 4, 0, 0, 0, 3, 3, 3]])
  assert id_map.dtype == np.int32 and np.array_equal(id_map, want)
  assert [s["id"] for s in segs] == [1, 2, 3, 4]
  for s, (cat, isthing, area, bbox, logit) in zip(segs, [
      (2, 1, 4, [1, 1, 2, 2], 2.0), (1, 1, 12, [0, 0, 4, 4], 3.0), (10, 0, 9, [5, 0, 3, 6], 4.0),
      (1, 1, 4, [0, 4, 2, 2], -1.0)]):
    assert (s["category_id"], s["isthing"], s["area"], s["bbox"]) == (cat, isthing, area, bbox), s
    assert s["score"] == pytest.approx(_sig(logit), abs=1e-12)
  # The whole result is valid for PQAccumulator and the areas match the map.
  assert {s["id"]: s["area"] for s in segs} == {i: int((id_map == i).sum()) for i in range(1, 5)}

  # min_area 0 keeps the 1-px grass; min_score 0.5 voids e4 (sigmoid(−1) < 0.5).
  id_map, segs = grounding.panoptic_prediction(logits, masks, entity_valid, noun_categories, CATS,
                                               min_score=0.5)
  tail = [(s["id"], s["category_id"], s["area"], s["bbox"]) for s in segs][3:]
  assert tail == [(4, 11, 1, [4, 5, 1, 1])]
  assert id_map[5, 4] == 4 and not id_map[4:, :2].any()

  # No noun has a known category → everything void.
  id_map, segs = grounding.panoptic_prediction(logits, masks, entity_valid, np.array([-1] * 5 + [999]),
                                               CATS)
  assert segs == [] and not id_map.any()


def test_panoptic_prediction_overlap_and_containment():
  # Three nested things: each smaller one stays visible; a fully covered entity disappears.
  masks = np.zeros((4, 5, 5), bool)
  masks[0, :, :] = True
  masks[1, 1:4, 1:4] = True
  masks[2, 2, 2] = True
  masks[3, 2, 2] = True   # same pixel as e2, same area: index order breaks the tie, e3 is painted last
  logits = np.where(np.eye(4, dtype=bool), 5.0, -5.0)
  id_map, segs = grounding.panoptic_prediction(logits, masks, None, [1, 1, 2, 2], CATS)
  assert [(s["id"], s["area"]) for s in segs] == [(1, 16), (2, 8), (3, 1)]
  assert id_map[2, 2] == 3 and id_map[1, 1] == 2 and id_map[0, 0] == 1
  assert [s["category_id"] for s in segs] == [1, 1, 2]  # the covered e2 was dropped, e3 kept


# -- COCO panoptic results files -----------------------------------------------------------------------

def test_write_coco_panoptic_round_trip(tmp_path):
  rng = np.random.default_rng(0)
  id_map = rng.choice([0, 7, 300, 70000, 256 ** 3 - 1], size=(5, 6))
  segs = [{"id": np.int64(i), "category_id": 1, "isthing": 1, "area": int((id_map == i).sum()),
           "bbox": [0, 0, 1, 1], "score": np.float32(0.5)} for i in (7, 300, 70000, 256 ** 3 - 1)]
  path = grounding.write_coco_panoptic(tmp_path / "out", [(42, "images/000000000042.jpg", id_map, segs)],
                                       CATS)
  assert path == os.path.join(tmp_path / "out", "panoptic_pred.json")
  with open(path) as f:
    data = json.load(f)
  assert data["categories"] == CATS
  assert data["annotations"][0]["image_id"] == 42
  assert data["annotations"][0]["file_name"] == "000000000042.png"
  assert [s["id"] for s in data["annotations"][0]["segments_info"]] == [7, 300, 70000, 256 ** 3 - 1]
  back = panoptic.read_panoptic_png(tmp_path / "out" / "panoptic_pred" / "000000000042.png")
  assert np.array_equal(back, id_map)
  assert np.array_equal(grounding.read_coco_panoptic(path)[42][0], id_map)
  with pytest.raises(ValueError, match="same PNG"):
    grounding.write_coco_panoptic(
        tmp_path / "x", [(1, "a.jpg", id_map, segs), (2, "a.png", id_map, segs)], CATS)


# -- the real COCO panoptic sample ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def sample():
  """[(image file name, ids (H, W), segments_info)] of the real images, and the 133 categories."""
  path = os.path.join(SAMPLE, "panoptic_examples.json")
  if not os.path.exists(path):
    pytest.skip(f"real COCO panoptic sample not found at {os.path.abspath(SAMPLE)} (set "
                "PIXELGROUND_COCO_PANOPTIC_SAMPLE to its directory)")
  with open(path) as f:
    data = json.load(f)
  names = {im["id"]: im["file_name"] for im in data["images"]}
  images = [(names[a["image_id"]],
             panoptic.read_panoptic_png(os.path.join(SAMPLE, "panoptic_examples", a["file_name"])),
             a["segments_info"]) for a in data["annotations"]]
  return images, data["categories"]


PAD_ENTITIES, PAD_NOUNS = 3, 2


def _entities(ids, segs):
  """GT segments as entities, then PAD_ENTITIES invalid full-image masks: (E, H, W), (E,) valid."""
  masks = np.concatenate([ids[None] == np.array([s["id"] for s in segs])[:, None, None],
                          np.ones((PAD_ENTITIES,) + ids.shape, bool)])
  return masks, np.arange(len(masks)) < len(segs)


def _png_phrases(segs, isthing):
  """PNG-style phrases over the segments: one per category present owning all its segments (plural
  when > 1), and one singular phrase per non-crowd thing segment → [(entity indices, thing, plural)]."""
  by_cat = {}
  for i, s in enumerate(segs):
    by_cat.setdefault(s["category_id"], []).append(i)
  phrases = [(owned, isthing[c], len(owned) > 1) for c, owned in by_cat.items()]
  phrases += [([i], True, False) for i, s in enumerate(segs)
              if isthing[s["category_id"]] and not s["iscrowd"]]
  return phrases


def _png_result(images, cats, entity_perm=None):
  isthing = {c["id"]: bool(c["isthing"]) for c in cats}
  acc = png.PNGAccumulator()
  for _, ids, segs in images:
    masks, entity_valid = _entities(ids, segs)
    phrases = _png_phrases(segs, isthing)
    k, e = len(phrases) + PAD_NOUNS, len(masks)
    gt = np.zeros((k, e), bool)
    for j, (owned, _, _) in enumerate(phrases):
      gt[j, owned] = True
    logits = np.where(gt, 10.0, -10.0)
    logits[:, len(segs):] = 10.0   # invalid entities would join every phrase
    logits[len(phrases):] = 10.0   # invalid nouns would own everything
    if entity_perm is not None:
      logits[:, :len(segs)] = logits[:, entity_perm(len(segs))]
    noun_valid = np.arange(k) < len(phrases)
    pred = grounding.phrase_masks(logits, masks, noun_valid, entity_valid)
    assert not pred[~noun_valid].any()
    target = np.stack([png.phrase_mask(ids, [segs[i]["id"] for i in owned]) for owned, _, _ in phrases])
    acc.add(pred[noun_valid], target, [t for _, t, _ in phrases], [p for _, _, p in phrases])
  return acc.result()


def test_real_sample_png_ground_truth_association_is_perfect(sample):
  images, cats = sample
  res = _png_result(images, cats)
  # 142238: 5 categories (person ×14 incl. crowd, ball, 3 stuff) + 14 singular things (13 person, ball);
  # 439180: 7 categories + 26 singular things (13 person, 2 truck, 11 horse).
  assert res["count"] == 5 + 14 + 7 + 26
  for suffix in ("", "_things", "_stuff", "_singular", "_plural"):
    assert res["count" + suffix] > 0, suffix
    # 0.99999: the benchmark's AR of perfect masks (its left Riemann sum stops at τ = 1 − 1e-5).
    assert res["ar" + suffix] == pytest.approx(0.99999, abs=1e-12), suffix
    assert res["acc50" + suffix] == 1.0, suffix
  assert res["count_plural"] == 4 and res["count_stuff"] == 7


def test_real_sample_png_permuted_association_drops(sample):
  images, cats = sample
  res = _png_result(images, cats, entity_perm=lambda n: np.roll(np.arange(n), 1))
  assert res["ar"] < 0.9 and res["acc50"] < 1.0


def _split_stuff(ids, segs, isthing):
  """Splits each stuff segment into its top and bottom halves (by row of its pixels) → entity masks
  (E, H, W) and each entity's category, so stuff merging has work to do."""
  masks, cats = [], []
  for s in segs:
    m = ids == s["id"]
    if isthing[s["category_id"]]:
      masks.append(m)
      cats.append(s["category_id"])
      continue
    rows = np.flatnonzero(m.any(axis=1))
    top = np.zeros_like(m)
    top[: rows[len(rows) // 2]] = True
    masks += [m & top, m & ~top]
    cats += [s["category_id"]] * 2
  return np.stack(masks), np.array(cats)


def _panoptic_preds(images, cats, split_stuff, roll=0):
  isthing = {c["id"]: bool(c["isthing"]) for c in cats}
  preds = []
  for _, ids, segs in images:
    if split_stuff:
      masks, ent_cats = _split_stuff(ids, segs, isthing)
    else:
      masks, ent_cats = ids[None] == np.array([s["id"] for s in segs])[:, None, None], \
          np.array([s["category_id"] for s in segs])
    n = len(masks)
    assert all(m.any() for m in masks)
    # One noun per entity carrying its category (the noun of entity i sits at row i), then PAD_NOUNS
    # unknown nouns that love everything; PAD_ENTITIES invalid full-image entities.
    noun_categories = np.concatenate([np.roll(ent_cats, -roll), np.full(PAD_NOUNS, -1)])
    logits = np.full((n + PAD_NOUNS, n + PAD_ENTITIES), -10.0)
    logits[np.arange(n), np.arange(n)] = 10.0
    logits[n:], logits[:, n:] = 10.0, 10.0
    masks = np.concatenate([masks, np.ones((PAD_ENTITIES,) + ids.shape, bool)])
    preds.append(grounding.panoptic_prediction(logits, masks, np.arange(n + PAD_ENTITIES) < n,
                                               noun_categories, cats))
  return preds


def _pq(images, preds, cats):
  acc = panoptic.PQAccumulator(cats)
  for (_, gt_ids, gt_segs), (pred_ids, pred_segs) in zip(images, preds):
    acc.add(gt_ids, gt_segs, pred_ids, pred_segs)
  return acc.result()


def _assert_perfect(res):
  for group, n in (("all", 8), ("things", 4), ("stuff", 4)):
    assert res[group] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": n}, group
  assert res["per_class"][1]["tp"] == 26 and res["per_class"][19]["tp"] == 11


@pytest.mark.parametrize("split_stuff", [False, True])
def test_real_sample_panoptic_identity_association_is_perfect(sample, tmp_path, split_stuff):
  images, cats = sample
  preds = _panoptic_preds(images, cats, split_stuff)
  for (_, ids, segs), (id_map, pred_segs) in zip(images, preds):
    # The prediction is the ground truth relabelled 1..N: same void, same partition, same areas and
    # boxes, stuff merged back into one segment per category.
    assert [s["id"] for s in pred_segs] == list(range(1, len(segs) + 1))
    assert np.array_equal(id_map == 0, ids == 0)
    pairs = np.unique(np.stack([ids.ravel(), id_map.ravel()]), axis=1)
    assert pairs.shape[1] == len(segs) + 1  # a bijection (plus void ↔ void)
    gt = {s["id"]: s for s in segs}
    for g, p in pairs.T[1:]:
      want, got = gt[int(g)], pred_segs[int(p) - 1]
      assert (got["category_id"], got["area"], got["bbox"]) == (want["category_id"], want["area"],
                                                                 want["bbox"])
      assert got["score"] == pytest.approx(_sig(10.0))
  _assert_perfect(_pq(images, preds, cats))

  path = grounding.write_coco_panoptic(
      tmp_path, [(i, name, m, s) for i, ((name, _, _), (m, s)) in enumerate(zip(images, preds))], cats)
  with open(path) as f:
    data = json.load(f)
  assert data["categories"] == cats
  assert [a["file_name"] for a in data["annotations"]] == ["000000142238.png", "000000439180.png"]
  from_files = [(panoptic.read_panoptic_png(os.path.join(tmp_path, "panoptic_pred", a["file_name"])),
                 a["segments_info"]) for a in data["annotations"]]
  for (m, s), (m2, s2) in zip(preds, from_files):
    assert np.array_equal(m, m2) and s == s2
  _assert_perfect(_pq(images, from_files, cats))


def test_real_sample_panoptic_permuted_association_drops(sample):
  images, cats = sample
  res = _pq(images, _panoptic_preds(images, cats, split_stuff=False, roll=1), cats)
  assert res["all"]["pq"] < 0.9 and res["things"]["pq"] < 1.0 and res["stuff"]["pq"] < 1.0
  assert res["all"]["rq"] < 1.0
