"""Localized Narratives builder on fixtures in the official JSONL format (SPEC 5.1), built TF-free."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from tfds_builders import common
from tfds_builders.localized_narratives import LocalizedNarratives, utterance_targets, sorted_trace


def _pt(x, y, t):
  return {"x": x, "y": y, "t": t}


# Mouse path: x = 0.1 + 0.2·t; y = t until t = 0.5, then 0.5; the first point (t=0) is at y=-0.05
# (outside the image: clipped to 0, which is also the line's value). Segments are out of time order.
TRACES = [[_pt(0.3, 0.5, 1.0), _pt(0.4, 0.5, 1.5), _pt(0.5, 0.5, 2.0)],
          [_pt(0.1, -0.05, 0.0), _pt(0.2, 0.5, 0.5)]]
TIMED = [{"utterance": "In this", "start_time": 0.0, "end_time": 0.4},
         {"utterance": "image", "start_time": 0.4, "end_time": 1.0},
         {"utterance": "a dog", "start_time": 1.0, "end_time": 2.0},
         {"utterance": "here", "start_time": 2.5, "end_time": 3.0}]
# Hand-computed targets: 16 samples at t_i = start + i·(end-start)/15 on the piecewise-linear path.
EXPECTED = [
    # [0, 0.4]: x 0.1→0.18, y 0→0.4 (t ≤ 0.5: y = t); point at t=0 clipped.
    dict(box=[0.1, 0.0, 0.18, 0.4], center=[0.14, 0.2], supervised=True, clipped=True),
    # [0.4, 1.0]: x 0.18→0.3; y = 0.4, 0.44, 0.48, then 0.5 ×13 → mean 7.82/16.
    dict(box=[0.18, 0.4, 0.3, 0.5], center=[0.24, 7.82 / 16], supervised=True, clipped=False),
    # [1, 2]: x 0.3→0.5, y 0.5.
    dict(box=[0.3, 0.5, 0.5, 0.5], center=[0.4, 0.5], supervised=True, clipped=False),
    # [2.5, 3]: no trace point → unsupervised, zeros.
    dict(box=[0, 0, 0, 0], center=[0, 0], supervised=False, clipped=False),
]


def _narrative(image_id="137576", annotator=93, caption="In this image a dog here", traces=None,
               timed=None):
  return {"dataset_id": "mscoco_val2017", "image_id": image_id, "annotator_id": annotator,
          "caption": caption, "timed_caption": TIMED if timed is None else timed,
          "traces": TRACES if traces is None else traces, "voice_recording": "coco_val/x.ogg"}


def _write_image(path, seed, size=(40, 30)):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  arr = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
  Image.fromarray(arr).save(path, "JPEG")


def _manual(tmp_path, lines, name="manual"):
  root = tmp_path / name
  img = root / "images" / "val2017"
  _write_image(str(img / "000000137576.jpg"), 0)
  _write_image(str(img / "000000000042.jpg"), 1, size=(20, 20))
  with open(root / "coco_val_localized_narratives.jsonl", "w") as f:
    for line in lines:
      f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
  return root


GOOD = [_narrative(), _narrative(annotator=7, caption="A dog."),
        _narrative(image_id="42", annotator=3, caption="Nothing traced.", traces=[],
                   timed=[{"utterance": "Nothing", "start_time": 0.0, "end_time": 1.0}])]


def _examples(builder, split="validation"):
  ds = builder.as_data_source(split=split)
  out = [ds[i] for i in range(len(ds))]
  return sorted(out, key=lambda e: (e["image/id"], int(e["annotator_id"])))


def test_first_utterance_clipping_flag():
  """The first window contains the clipped point (y=-0.05 at t=0)."""
  trace = sorted_trace(TRACES)
  assert list(trace[:, 2]) == [0.0, 0.5, 1.0, 1.5, 2.0]
  assert utterance_targets(trace, 0.0, 0.4)["clipped"] is True
  assert utterance_targets(trace, 0.4, 1.0)["clipped"] is False


def test_hand_computed_targets(tmp_path):
  builder = common.build(LocalizedNarratives, tmp_path / "data", _manual(tmp_path, GOOD), config="coco")
  examples = _examples(builder)
  assert len(examples) == 3
  first, second, no_trace = examples  # sorted by (image id bytes, annotator)
  assert first["image/id"] == b"137576" and int(first["annotator_id"]) == 7
  assert second["caption"] == b"In this image a dog here"
  assert first["image"].shape == (30, 40, 3) and first["image/filename"] == b"000000137576.jpg"
  utt = second["utterances"]
  assert [t.decode() for t in utt["text"]] == ["In this", "image", "a dog", "here"]
  for i, want in enumerate(EXPECTED):
    np.testing.assert_allclose(utt["box"][i], want["box"], atol=1e-6)
    np.testing.assert_allclose(utt["center"][i], want["center"], atol=1e-6)
    assert bool(utt["supervised"][i]) == want["supervised"], i
  assert bool(utt["clipped"][0]) and not any(bool(c) for c in utt["clipped"][1:])
  np.testing.assert_allclose(utt["samples"][2][:, 0], np.linspace(0.3, 0.5, 16), atol=1e-6)
  assert np.all(utt["samples"][3] == 0)
  assert int(second["num_clipped_points"]) == 1
  # The raw trace is kept unclipped and time-sorted.
  np.testing.assert_allclose(second["trace"][0], [0.1, -0.05, 0.0], atol=1e-7)
  # A narrative without any trace: every utterance unsupervised.
  assert no_trace["image/id"] == b"42" and not any(no_trace["utterances"]["supervised"])
  assert common.skipped_counts(builder) == {"validation": {}}


def test_bad_records_skipped_and_counted(tmp_path):
  clean = common.build(LocalizedNarratives, tmp_path / "clean", _manual(tmp_path, GOOD, "m_clean"),
                       config="coco")
  bad_lines = [
      GOOD[0],
      "{this is not json",
      {k: v for k, v in _narrative().items() if k != "caption"},               # missing field
      _narrative(caption="   "),                                               # empty caption
      _narrative(traces=[[_pt(0.1, float("nan"), 0.1)]]),                      # NaN coordinate
      GOOD[1],
      _narrative(image_id="555", annotator=1),                                 # image file absent
      _narrative(image_id="777", annotator=1),                                 # corrupt image
      GOOD[2],
  ]
  root = _manual(tmp_path, bad_lines, "m_bad")
  with open(root / "images" / "val2017" / "000000000777.jpg", "wb") as f:
    f.write(b"\xff\xd8\xff\xe0 definitely not a jpeg")
  bad = common.build(LocalizedNarratives, tmp_path / "bad", root, config="coco")
  assert common.skipped_counts(bad) == {"validation": {
      "corrupt_image": 1, "empty_caption": 1, "malformed_json": 2, "missing_image": 1,
      "nan_coordinate": 1}}
  got, want = _examples(bad), _examples(clean)
  assert len(got) == len(want) == 3
  for a, b in zip(got, want):
    assert a.keys() == b.keys()
    for k in a:
      if isinstance(a[k], dict):
        for kk in a[k]:
          np.testing.assert_array_equal(np.asarray(a[k][kk]), np.asarray(b[k][kk]))
      else:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))


def test_missing_manual_files_are_named(tmp_path):
  empty = tmp_path / "empty"
  (empty / "images").mkdir(parents=True)
  with pytest.raises(common.ManualFileError, match="coco_val_localized_narratives"):
    common.build(LocalizedNarratives, tmp_path / "d1", empty, config="coco")
  no_images = tmp_path / "noimg"
  no_images.mkdir()
  (no_images / "coco_val_localized_narratives.jsonl").write_text(json.dumps(GOOD[0]) + "\n")
  with pytest.raises(common.ManualFileError, match="images/val2017"):
    common.build(LocalizedNarratives, tmp_path / "d2", no_images, config="coco")
