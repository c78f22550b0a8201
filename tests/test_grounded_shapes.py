"""Tests of the synthetic grounded-shapes generator (tfds_builders/grounded_shapes.py): determinism, and
that every file it writes is self-consistent in the real formats (SPEC.md 5.1-5.7)."""

from __future__ import annotations

import filecmp
import json
import os
import pickle
import types

import numpy as np
import pytest
from PIL import Image, ImageDraw

from tfds_builders import grounded_shapes as gs

SIZE = 128
COUNTS = {"train": 48, "validation": 10, "test": 10}  # 68 images: enough for the 2-worker pool path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The same seed generated twice: in-process and with 2 worker processes."""
  a, b = tmp_path_factory.mktemp("gs_a"), tmp_path_factory.mktemp("gs_b")
  counts = gs.generate(str(a), *COUNTS.values(), seed=3, size=SIZE, workers=1)
  gs.generate(str(b), *COUNTS.values(), seed=3, size=SIZE, workers=2)
  return str(a), str(b), counts


@pytest.fixture(scope="module")
def out(runs):
  return runs[0]


def _load(out, rel):
  with open(os.path.join(out, rel)) as f:
    return json.load(f)


def _lns(out, split):
  with open(os.path.join(out, f"grounded_shapes_{split}_localized_narratives.jsonl")) as f:
    return [json.loads(line) for line in f]


def _panoptic_ids(out, split, iid):
  """(H, W) int64 segment ids decoded from a panoptic PNG (R + 256 G + 256^2 B)."""
  a = np.asarray(Image.open(os.path.join(out, "annotations", f"panoptic_{split}", f"{iid:012d}.png")))
  a = a.astype(np.int64)
  return a[..., 0] + 256 * a[..., 1] + 65536 * a[..., 2]


def _all_files(root):
  return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def test_deterministic_and_independent_of_workers(runs):
  a, b, counts = runs
  assert {k: v["images"] for k, v in counts.items()} == COUNTS
  files = _all_files(a)
  assert files == _all_files(b)
  for rel in files:
    if rel.endswith((".json", ".jsonl", ".p")):
      assert filecmp.cmp(os.path.join(a, rel), os.path.join(b, rel), shallow=False), rel
    else:
      with Image.open(os.path.join(a, rel)) as x, Image.open(os.path.join(b, rel)) as y:
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=rel)


def test_other_seed_differs(out, tmp_path):
  gs.generate(str(tmp_path), 2, 0, 0, seed=4, size=SIZE)
  assert not filecmp.cmp(os.path.join(out, "annotations", "png_train.json"),
                         os.path.join(tmp_path, "annotations", "png_train.json"), shallow=False)


def test_easier_scenes_fewer_bigger_shapes_in_fewer_colours(tmp_path):
  """max_shapes / scale / colours (the demo's 3 shapes, radii × 2, 4 colours): every scene obeys them;
  values outside the ranges raise naming the argument."""
  gs.generate(str(tmp_path), 24, 0, 0, seed=5, size=64, max_shapes=3, scale=2.0, colours=2)
  inst = _load(tmp_path, "grounded_shapes/instances.json")
  per_image: dict[int, int] = {}
  for a in inst["annotations"]:
    per_image[a["image_id"]] = per_image.get(a["image_id"], 0) + 1
  assert len(per_image) == 24 and set(per_image.values()) <= {2, 3}
  caps = " ".join(c["caption"] for c in _load(tmp_path, "annotations/captions_train.json")["annotations"])
  named = {c for c in gs.PALETTE if f" {c} " in f" {caps} "}
  assert named == {"red", "green"}, named
  # the largest circle at scale 1.6 covers at most π (0.125 · 1.6 · 64 · 1.07)² ≈ 590 px²
  assert max(a["area"] for a in inst["annotations"]) > 1.2 * np.pi * (0.125 * 1.6 * 64 * 1.07) ** 2
  for kw, name in ((dict(scale=2.5), "scale"), (dict(colours=9), "colours"), (dict(max_shapes=6), "max_shapes")):
    with pytest.raises(ValueError, match=name):
      gs.generate(str(tmp_path / "bad"), 1, 0, 0, size=64, **kw)


def test_images_and_ids(out):
  ids = []
  for split in gs.SPLITS:
    for im in _load(out, f"annotations/panoptic_{split}.json")["images"]:
      ids.append(im["id"])
      with Image.open(os.path.join(out, "images", split, im["file_name"])) as f:
        assert f.format == "JPEG" and f.mode == "RGB" and f.size == (SIZE, SIZE)
      assert im["file_name"] == f"{im['id']:012d}.jpg"
  assert len(ids) == len(set(ids)) == sum(COUNTS.values())


def test_panoptic_png_matches_json(out):
  for split in gs.SPLITS:
    pan = _load(out, f"annotations/panoptic_{split}.json")
    cats = {c["id"]: c for c in pan["categories"]}
    assert {c["name"] for c in cats.values() if c["isthing"]} == set(gs.KINDS)
    assert {c["name"] for c in cats.values() if not c["isthing"]} == {"sky", "ground", "wall", "floor"}
    for ann in pan["annotations"]:
      ids = _panoptic_ids(out, split, ann["image_id"])
      assert ann["file_name"] == f"{ann['image_id']:012d}.png"
      info = {s["id"]: s for s in ann["segments_info"]}
      assert len(info) == len(ann["segments_info"])
      present, areas = np.unique(ids, return_counts=True)
      assert dict(zip(present.tolist(), areas.tolist())) == {k: s["area"] for k, s in info.items()}
      n_things = 0
      for sid, s in info.items():
        ys, xs = np.nonzero(ids == sid)
        assert s["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert s["iscrowd"] == 0 and s["category_id"] in cats
        n_things += cats[s["category_id"]]["isthing"]
      assert 2 <= n_things <= 5 and 1 <= len(info) - n_things <= 2


def test_localized_narratives_format_and_traces_follow_named_objects(out):
  outside = total = 0
  for split in gs.SPLITS:
    pngs = {r["image_id"]: r for r in _load(out, f"annotations/png_{split}.json")}
    for ln in _lns(out, split):
      assert list(ln) == ["dataset_id", "image_id", "annotator_id", "caption", "timed_caption", "traces",
                          "voice_recording"]
      assert ln["dataset_id"] == f"grounded_shapes_{split}" and ln["image_id"] == str(int(ln["image_id"]))
      assert isinstance(ln["annotator_id"], int) and isinstance(ln["voice_recording"], str)
      tc = ln["timed_caption"]
      assert all(u["start_time"] < u["end_time"] for u in tc)
      assert all(u["end_time"] <= v["start_time"] for u, v in zip(tc, tc[1:]))
      assert " ".join(u["utterance"] for u in tc) == ln["caption"].replace(".", "").replace(",", "").replace(":", "")
      pts = np.array([[p["x"], p["y"], p["t"]] for seg in ln["traces"] for p in seg])
      assert all(list(p) == ["x", "y", "t"] for seg in ln["traces"] for p in seg)
      assert np.all(np.diff(pts[:, 2]) > 0)  # segments in time order, ~0.05 s apart
      assert np.median(np.diff(pts[:, 2])) == pytest.approx(0.05, abs=0.006)
      assert np.all(np.abs(pts[:, :2] - 0.5) < 0.56)  # only slightly outside [0, 1]
      outside += int(np.any((pts[:, :2] < 0) | (pts[:, :2] > 1), axis=1).sum())
      total += len(pts)
      ids = _panoptic_ids(out, split, int(ln["image_id"]))
      nouns = [s for s in pngs[int(ln["image_id"])]["segments"] if s["noun"]]
      k = 0
      for u in tc:  # noun utterances appear in the LN in the PNG order, with the same words
        if k < len(nouns) and u["utterance"] == nouns[k]["utterance"]:
          sel = pts[(pts[:, 2] >= u["start_time"]) & (pts[:, 2] <= u["end_time"])]
          assert len(sel) >= 10, u
          px = np.clip((sel[:, 0] * SIZE).astype(int), 0, SIZE - 1)
          py = np.clip((sel[:, 1] * SIZE).astype(int), 0, SIZE - 1)
          assert np.isin(ids[py, px], nouns[k]["segment_ids"]).mean() >= 0.8, (ln["image_id"], u)
          k += 1
      assert k == len(nouns)
  assert 0 < outside / total < 0.06  # rare, as in the real data


def test_panoptic_narrative_grounding(out):
  n_plural = 0
  for split in gs.SPLITS:
    segs = {a["image_id"]: {s["id"] for s in a["segments_info"]}
            for a in _load(out, f"annotations/panoptic_{split}.json")["annotations"]}
    captions = {int(ln["image_id"]): ln["caption"] for ln in _lns(out, split)}
    for rec in _load(out, f"annotations/png_{split}.json"):
      assert isinstance(rec["image_id"], int) and rec["caption"] == captions[rec["image_id"]]
      assert " ".join(s["utterance"] for s in rec["segments"]) == rec["caption"]
      for s in rec["segments"]:
        assert all(isinstance(i, int) and i in segs[rec["image_id"]] for i in s["segment_ids"])
        if not s["noun"]:
          assert s["segment_ids"] == [] and not s["plural"]
        elif s["plural"]:
          n_plural += 1
          assert len(s["segment_ids"]) >= 2 and s["utterance"].split()[0].lower() in gs.NUMBERS
        else:
          assert len(s["segment_ids"]) == 1
  assert n_plural > 0


def test_captions(out):
  for split in gs.SPLITS:
    cap = _load(out, f"annotations/captions_{split}.json")
    per_image = {im["id"]: 0 for im in cap["images"]}
    for a in cap["annotations"]:
      per_image[a["image_id"]] += 1
      assert a["caption"].strip()
    assert set(per_image.values()) == {3}
    assert len({a["id"] for a in cap["annotations"]}) == len(cap["annotations"])


def test_refs_and_instances(out):
  with open(os.path.join(out, "grounded_shapes", "refs(unc).p"), "rb") as f:
    refs = pickle.load(f, encoding="latin1")
  inst = _load(out, "grounded_shapes/instances.json")
  anns = {a["id"]: a for a in inst["annotations"]}
  assert len(anns) == len(inst["annotations"])
  images = {im["id"] for im in inst["images"]}
  assert {c["name"] for c in inst["categories"]} == set(gs.KINDS)
  split_of = {}
  for split in gs.SPLITS:
    for a in _load(out, f"annotations/panoptic_{split}.json")["annotations"]:
      split_of[a["image_id"]] = (split, {(s["category_id"], tuple(s["bbox"]), s["area"]) for s in a["segments_info"]})
  for a in anns.values():  # every instance is a visible panoptic thing segment; its polygon is in the image
    assert (a["category_id"], tuple(a["bbox"]), a["area"]) in split_of[a["image_id"]][1]
    poly = np.array(a["segmentation"][0]).reshape(-1, 2)
    assert poly.min() >= 0 and poly.max() <= SIZE and a["iscrowd"] == 0
  assert {r["split"] for r in refs} == {"train", "val", "test"}
  sent_ids = [s["sent_id"] for r in refs for s in r["sentences"]]
  assert len(sent_ids) == len(set(sent_ids)) and len({r["ref_id"] for r in refs}) == len(refs)
  for r in refs:
    assert r["ann_id"] in anns and r["image_id"] in images and anns[r["ann_id"]]["image_id"] == r["image_id"]
    assert r["category_id"] == anns[r["ann_id"]]["category_id"]
    assert gs.REF_SPLIT[split_of[r["image_id"]][0]] == r["split"]
    assert r["sent_ids"] == [s["sent_id"] for s in r["sentences"]] and 1 <= len(r["sentences"]) <= 3
    for s in r["sentences"]:
      assert s["tokens"] == s["sent"].split() and s["tokens"][0] == "the"


def _shape(kind, colour, size, cx, cy):
  r = gs.SIZES[size] * 256
  return types.SimpleNamespace(kind=kind, colour=colour, size=size, cx=cx, cy=cy,
                               poly=gs.shape_polygon(kind, cx, cy, r, 0.0))


def test_expressions_pick_out_one_shape():
  rng = np.random.default_rng(0)
  shapes = [_shape("circle", "red", "small", 40, 128), _shape("circle", "red", "small", 200, 128),
            _shape("square", "blue", "large", 128, 40)]
  left = set(gs._expressions(rng, shapes, 0, 256))
  assert left and all("left" in e or "smallest" in e for e in left)
  square = gs._expressions(rng, shapes, 2, 256)
  assert square and all(("square" in e or "blue" in e or "largest" in e or "top" in e) for e in square)
  # two identical circles side by side with nothing to tell them apart: no expression
  twins = [_shape("circle", "red", "small", 120, 128), _shape("circle", "red", "small", 125, 130)]
  assert gs._expressions(rng, twins, 0, 256) == []


def test_reasonseg(out):
  for split in gs.SPLITS:
    folder = os.path.join(out, "reasonseg", split)
    names = sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".json"))
    assert names and all(os.path.exists(os.path.join(folder, n + ".jpg")) for n in names)
    for name in names:
      with open(os.path.join(folder, name + ".json")) as f:
        rec = json.load(f)
      assert rec["text"] and all(t.strip() for t in rec["text"]) and isinstance(rec["is_sentence"], bool)
      targets = [s for s in rec["shapes"] if s["label"] == "target"]
      assert len(targets) == 1
      pts = np.array(targets[0]["points"], float)
      assert pts.ndim == 2 and pts.shape[1] == 2 and len(pts) >= 3
      assert pts.min() >= 0 and pts.max() <= SIZE
      mask = Image.new("L", (SIZE, SIZE), 0)
      ImageDraw.Draw(mask).polygon([tuple(p) for p in pts.tolist()], fill=1, outline=1)
      mask = np.asarray(mask) > 0
      ids = _panoptic_ids(out, split, int(name))
      sid = np.bincount(ids[mask].astype(np.int64) % (1 << 24)).argmax()
      seg = ids == sid
      assert (mask & seg).sum() / (mask | seg).sum() >= 0.9  # the answer is one whole, unoccluded shape


def test_cli_and_preview(tmp_path):
  png = tmp_path / "preview.png"
  counts = gs.main(["--out", str(tmp_path / "gs"), "--num_train", "3", "--num_validation", "2", "--num_test", "1",
                    "--size", "96", "--preview", str(png)])
  assert counts["validation"]["images"] == 2
  with Image.open(png) as im:
    assert im.width == 3 * 2 * 96 and im.height > 2 * 2 * 96


def test_real_builders_build_grounded_shapes(tmp_path):
  """The generated raw files go through every real builder's grounded_shapes config, with no skips;
  the datasets agree with each other (same images; phrase masks equal the named segments)."""
  from tfds_builders import build_grounded_shapes, coco_panoptic
  from tfds_builders.panoptic_narrative_grounding import PanopticNarrativeGrounding, phrase_masks
  from tfds_builders import common

  report = build_grounded_shapes.build_all(str(tmp_path / "raw"), str(tmp_path / "tfds"), num_train=12,
                                           num_validation=4, num_test=4, seed=3)
  for name, per_split in report["skipped"].items():
    assert all(not kinds for kinds in per_split.values()), (name, per_split)
  for name in ("localized_narratives", "coco_captions", "coco_panoptic", "panoptic_narrative_grounding"):
    assert report["examples"][name] == {"train": 12, "validation": 4, "test": 4}, name
  assert report["examples"]["refcoco"]["train"] >= 12
  png = PanopticNarrativeGrounding(data_dir=str(tmp_path / "tfds"), config="grounded_shapes")
  ds = png.as_data_source(split="validation")
  for i in range(len(ds)):
    ex = ds[i]
    masks = phrase_masks(ex)
    ids = coco_panoptic.segment_ids(ex["panoptic"])
    for p, noun in enumerate(ex["phrases"]["noun"]):
      if noun:
        assert masks[p].any()
        segs = ex["phrase_segment_ids"][ex["phrase_offsets"][p]:ex["phrase_offsets"][p + 1]]
        assert int(masks[p].sum()) == int(np.isin(ids, segs).sum())
  assert common.skipped_counts(png) == {"train": {}, "validation": {}, "test": {}}


def test_cache_key_follows_the_builder_versions(monkeypatch):
  # A builder whose output changes bumps its VERSION; the trainer's cache must then be rebuilt, not
  # reused without that version in it.
  from pixelground.config import schema
  from pixelground.training import datasets
  from tfds_builders import reasonseg
  config = schema.parse(os.path.join(os.path.dirname(__file__), "..", "configs", "demo.py"))
  before = datasets.data_dir(config)
  monkeypatch.setattr(reasonseg.ReasonSeg, "VERSION", "9.9.9")
  after = datasets.data_dir(config)
  assert before != after and os.path.dirname(before) != os.path.dirname(after)
