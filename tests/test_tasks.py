"""Per-task converters on the real builders' grounded-shapes datasets, and a mixed Grain loader over them."""

import numpy as np
import pytest

from pixelground.data import pipeline, tasks
from pixelground.data.tokenizer import load_tokenizer
from tfds_builders import build_grounded_shapes
from tfds_builders.coco_captions import CocoCaptions
from tfds_builders.coco_panoptic import CocoPanoptic
from tfds_builders.localized_narratives import LocalizedNarratives
from tfds_builders.panoptic_narrative_grounding import PanopticNarrativeGrounding
from tfds_builders.reasonseg import ReasonSeg
from tfds_builders.refcoco import RefCoco

S = 128


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("gs")
  build_grounded_shapes.build_all(str(root / "raw"), str(root / "tfds"), num_train=6, num_validation=2,
                                  num_test=0, seed=11)
  load = lambda cls: cls(data_dir=str(root / "tfds"), config="grounded_shapes").as_data_source(
      split="train")
  pan = CocoPanoptic(data_dir=str(root / "tfds"), config="grounded_shapes")
  return {"ln": load(LocalizedNarratives), "caption": load(CocoCaptions), "ref": load(RefCoco),
          "reason": load(ReasonSeg), "png": load(PanopticNarrativeGrounding),
          "pan": pan.as_data_source(split="train"), "categories": pan.info.metadata["categories"]}


@pytest.fixture(scope="module")
def tok():
  return load_tokenizer("tiny")


def _check_schema(row, cfg):
  sch = tasks.schema(cfg)
  for k, v in row.items():
    assert k in sch, k
    assert np.asarray(v).shape == sch[k][0], (k, np.asarray(v).shape, sch[k][0])


def test_ln_eval_boxes_are_the_utterance_boxes(data, tok):
  cfg = tasks.TaskConfig(image_size=S, train=False)
  conv = tasks.Converters(cfg, tok)
  ex = data["ln"][0]
  row = conv.ln(ex, np.random.default_rng(0))
  _check_schema(row, cfg)
  h, w = ex["image"].shape[:2]
  scale = S / max(h, w)  # eval: long side → S, pad bottom/right; boxes normalised to the canvas
  utt_boxes = ex["utterances"]["box"] * np.array([w, h, w, h]) * scale / S
  assert row["token_box_valid"].sum() > 5
  ids = row["target_ids"][row["target_mask"]]
  assert ids[-1] == tok.eos_id and not row["token_box_valid"][len(ids) - 1]
  # Every supervised token's box is one of the utterance boxes, in caption order.
  for t in np.flatnonzero(row["token_box_valid"]):
    d = np.abs(utt_boxes - row["token_boxes"][t]).max(axis=1)
    assert d.min() < 1e-5, t
  assert conv.stats["ln_fallback_words"] == 0


def test_train_rows_all_tasks(data, tok):
  cfg = tasks.TaskConfig(image_size=S, train=True, flip=True)
  conv = tasks.Converters(cfg, tok)
  rng = np.random.default_rng(1)
  for i in range(3):
    _check_schema(conv.ln(data["ln"][i], rng), cfg)
    _check_schema(conv.caption(data["caption"][i], rng), cfg)
    row = conv.referring(data["ref"][i], rng)
    _check_schema(row, cfg)
    eos = int(row["target_mask"].sum()) - 1
    if row["token_box_valid"][eos]:  # the box target sits at the EOS and contains the object's mask
      x0, y0, x1, y1 = row["token_boxes"][eos] * S
      ys, xs = np.nonzero(row["seg_masks"][0])
      if len(xs):
        assert xs.min() >= x0 - 1 and xs.max() + 1 <= x1 + 1 and ys.min() >= y0 - 1 and ys.max() + 1 <= y1 + 1
    row = conv.region_caption(data["ref"][i], rng)
    _check_schema(row, cfg)
    row = conv.reason_seg(data["reason"][i], rng)
    _check_schema(row, cfg)
    k = int(row["seg_valid"].sum())
    assert k == 1 and row["target_ids"][row["seg_positions"][0]] == tok.token_id("[SEG]")
    row = conv.narrative_grounding(data["png"][i], rng)
    _check_schema(row, cfg)
    n = int(row["seg_valid"].sum())
    assert n >= 1
    for j in range(n):
      assert row["target_ids"][row["seg_positions"][j]] == tok.token_id("[SEG]")
      union = np.any(row["entity_masks"][row["association"][j]], axis=0)
      np.testing.assert_array_equal(row["seg_masks"][j], union)


def test_referring_seg_asks_lisa_style_for_the_referred_mask(data, tok):
  """LISA's RefCOCO rows: the expression inside the question, one `[SEG]` in the answer, and the
  referring converter's mask of the same object under the same geometry (evaluation: no randomness)."""
  cfg = tasks.TaskConfig(image_size=S, train=False)
  conv = tasks.Converters(cfg, tok)
  for i in range(3):
    ex = data["ref"][i]
    row = conv.referring_seg(ex, np.random.default_rng(0))
    _check_schema(row, cfg)
    assert set(row) == set(tasks.task_schema(cfg, "referring_seg"))
    question = tok.decode([t for t in row["prompt_ids"] if t])
    assert question == tasks.REFER_SEG.format(tasks.as_text(ex["sentences"][0]))
    assert row["seg_valid"].tolist() == [True, False, False, False]
    assert row["target_ids"][row["seg_positions"][0]] == tok.token_id("[SEG]")
    ref = conv.referring(ex, np.random.default_rng(0))
    np.testing.assert_array_equal(row["seg_masks"][0], ref["seg_masks"][0])
    assert row["seg_masks"][0].any() and not row["ignore_mask"].any()


def test_seg_boxes_put_the_mask_box_at_the_seg_step(data, tok):
  """TaskConfig.seg_boxes (demo): a LISA row's only box target is its mask's tight box, at the step that
  predicts `[SEG]`; without the option the row has no box target; `refseg_rows` ignores such rows."""
  import jax.numpy as jnp
  from pixelground.models import pixelllm as P
  from pixelground.training import objective

  tiny = P.tiny_config(vocab_size=tok.vocab_size)

  plain = tasks.Converters(tasks.TaskConfig(image_size=S, train=True), tok)
  boxed = tasks.Converters(tasks.TaskConfig(image_size=S, train=True, seg_boxes=True), tok)
  for i in range(3):
    row = boxed.reason_seg(data["reason"][i], np.random.default_rng(i))
    _check_schema(row, boxed.cfg)
    assert set(row) <= set(tasks.task_schema(boxed.cfg, "reason_seg"))  # single-task batches too
    pos = int(row["seg_positions"][0])
    assert np.flatnonzero(row["token_box_valid"]).tolist() == [pos]
    ys, xs = np.nonzero(row["seg_masks"][0])
    np.testing.assert_allclose(row["token_boxes"][pos] * S, [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1],
                               atol=1e-4)
    base = plain.reason_seg(data["reason"][i], np.random.default_rng(i))
    assert not np.asarray(base.get("token_box_valid", np.zeros(1, bool))).any()
    np.testing.assert_array_equal(base["seg_masks"], row["seg_masks"])
    ref = boxed.referring(data["ref"][i], np.random.default_rng(i))
    batch = {k: jnp.asarray(np.stack([row[k], ref[k]])) for k in
             ("target_ids", "seg_positions", "seg_valid", "token_box_valid")}
    assert np.asarray(objective.refseg_rows(tiny, batch)).tolist() == [False, bool(ref["token_box_valid"].any())]


def test_mixed_loader_over_real_datasets(data, tok):
  cfg = tasks.TaskConfig(image_size=S)
  conv = tasks.Converters(cfg, tok)
  mix = [pipeline.Task("ln", data["ln"], conv.ln, 2.0),
         pipeline.Task("caption", data["caption"], conv.caption, 1.0),
         pipeline.Task("referring", data["ref"], conv.referring, 1.0),
         pipeline.Task("reason_seg", data["reason"], conv.reason_seg, 1.0),
         pipeline.Task("grounding", data["png"], conv.narrative_grounding, 1.0)]
  it = iter(pipeline.Loader(mix, tasks.schema(cfg), batch_size=4, seed=0))
  seen = set()
  for _ in range(6):
    batch = next(it)
    assert batch["image"].shape == (4, S, S, 3) and batch["image"].dtype == np.uint8
    assert batch["target_ids"].shape == (4, cfg.max_target_len)
    seen.update(batch["task_id"].tolist())
  assert seen == {0, 1, 2, 3, 4}


def test_panoptic_and_dense_caption(data, tok):
  cfg = tasks.TaskConfig(image_size=S, train=False)
  conv = tasks.Converters(cfg, tok, categories=data["categories"])
  ex = data["pan"][0]
  row = conv.panoptic(ex, np.random.default_rng(0))
  _check_schema(row, cfg)
  n = int(row["seg_valid"].sum())
  assert n == min(len(ex["segments"]["id"]), cfg.max_seg)
  names = {c["name"] for c in data["categories"]}
  text = tok.decode(row["target_ids"])
  assert text.count("[SEG]") == n and any(name in text for name in names)
  np.testing.assert_array_equal(row["association"][:n, :n], np.eye(n, dtype=bool))
  for j in range(n):
    assert row["target_ids"][row["seg_positions"][j]] == tok.token_id("[SEG]")
    np.testing.assert_array_equal(row["seg_masks"][j], row["entity_masks"][j])
  # Dense captioning from a VG-style example: regions kept with their captions, in canvas coordinates.
  image = np.zeros((60, 100, 3), np.uint8)
  ex = {"image": image, "boxes": np.array([[10, 5, 30, 25], [50, 10, 90, 50]], np.float32),
        "phrases": [b"a red circle", b"the blue square"]}
  row = conv.dense_caption(ex, np.random.default_rng(0))
  _check_schema(row, cfg)
  assert row["region_valid"].sum() == 2
  np.testing.assert_allclose(row["region_boxes"][1], np.array([50, 10, 90, 50]) * (S / 100) / S, atol=1e-6)
  assert tok.decode(row["region_ids"][0]) == "a red circle"
