"""The evaluator's PNG and panoptic code paths (pixelground.inference.eval_lib) on the real COCO
panoptic sample: the builders' examples → the evaluation converters → the scorers and summaries, fed
the ground-truth association over the true segments, give AR = 1 and PQ = 1; a wrong association
does not."""

import json
import os

import numpy as np
import pytest

from pixelground.data import tasks as task_lib
from pixelground.data.tokenizer import load_tokenizer
from pixelground.inference import eval_lib, grounding
from pixelground.metrics import panoptic as pq_lib
from tfds_builders import coco_panoptic, common
from tfds_builders.panoptic_narrative_grounding import PanopticNarrativeGrounding

HERE = os.path.dirname(os.path.abspath(__file__))
SAMPLE = os.path.join(HERE, "..", "..", "shared", "data", "coco_panoptic_sample")
VOCAB = os.path.join(HERE, "..", "..", "shared", "data", "t5_vocab", "spiece.model")


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
  if not os.path.isdir(SAMPLE) or not os.path.isfile(VOCAB):
    pytest.skip("real COCO panoptic sample / T5 vocabulary not found under ../shared/data")
  root = tmp_path_factory.mktemp("png")
  manual = root / "manual"
  (manual / "annotations").mkdir(parents=True)
  os.symlink(os.path.abspath(os.path.join(SAMPLE, "panoptic_examples.json")),
             manual / "annotations" / "panoptic_val2017.json")
  os.symlink(os.path.abspath(os.path.join(SAMPLE, "panoptic_examples")),
             manual / "annotations" / "panoptic_val2017")
  os.symlink(os.path.abspath(os.path.join(SAMPLE, "input_images")), manual / "val2017")
  with open(os.path.join(SAMPLE, "panoptic_examples.json")) as f:
    data = json.load(f)
  cats = {c["id"]: c for c in data["categories"]}
  # A narrative per image: one phrase per category present, owning all its segments (plural when
  # more than one), and a non-noun phrase between them.
  narratives = []
  for ann in data["annotations"]:
    by_cat = {}
    for s in ann["segments_info"]:
      by_cat.setdefault(s["category_id"], []).append(s["id"])
    segments = []
    for cid, ids in by_cat.items():
      name = grounding.category_display_name(cats[cid]["name"])
      segments.append({"utterance": f"the {name}", "noun": True, "plural": len(ids) > 1,
                       "segment_ids": ids})
      segments.append({"utterance": "and", "noun": False, "plural": False, "segment_ids": []})
    narratives.append({"image_id": ann["image_id"], "segments": segments,
                       "caption": " ".join(s["utterance"] for s in segments)})
  with open(manual / "annotations" / "png_coco_val2017.json", "w") as f:
    json.dump(narratives, f)
  png = common.build(PanopticNarrativeGrounding, root / "data", manual, config="2017")
  pan = common.build(coco_panoptic.CocoPanoptic, root / "data", manual, config="2017")
  get = lambda b: [b.as_data_source(split="validation")[i] for i in range(2)]
  return get(png), get(pan), pan.info.metadata["categories"], load_tokenizer(VOCAB)


def _converters(tok, categories):
  cfg = task_lib.TaskConfig(image_size=640, max_prompt_len=600, max_target_len=320, max_seg=40,
                            max_entities=40, train=False)
  return task_lib.Converters(cfg, tok, categories=categories)


def _logits(assoc):
  return np.where(assoc, 10.0, -10.0).astype(np.float32)


def test_png_ground_truth_association_scores_one(sample):
  png_examples, _, categories, tok = sample
  conv = _converters(tok, categories)
  records, shifted = [], []
  for ex in png_examples:
    row = conv.narrative_grounding(ex, np.random.default_rng(0))
    assert row["entity_valid"].sum() == len(ex["segments"]["id"])  # every segment is an entity
    records.append(eval_lib._png_record(ex, row, _logits(row["association"])))
    shifted.append(eval_lib._png_record(ex, row, _logits(np.roll(row["association"], 1, axis=1))))
  res = eval_lib.summarize("narrative_grounding", records)
  assert res["phrases"] == sum(len(r["ious"]) for r in records) == 12 and res["truncated"] == 0
  # The PNG benchmark's AR of perfect masks is 0.99999 (its left Riemann sum stops at τ = 1 − 1e-5).
  for k in ("ar", "ar_things", "ar_stuff", "ar_singular", "ar_plural"):
    assert res[k] == pytest.approx(0.99999, abs=1e-12), (k, res)
  assert res["acc50"] == 1.0, res
  assert eval_lib.summarize("narrative_grounding", shifted)["ar"] < 0.5


def _panoptic_out(row, assoc):
  toks = row["target_ids"]
  k = row["seg_positions"].shape[0]
  return {"tokens": toks[None], "lengths": np.asarray([int((toks != 0).sum())]),
          "seg_pos": row["seg_positions"][None], "num_seg": np.asarray([int(row["seg_valid"].sum())]),
          "assoc_logits": _logits(assoc)[None, :k]}


def test_panoptic_ground_truth_association_scores_one(sample, tmp_path):
  _, pan_examples, categories, tok = sample
  conv = _converters(tok, categories)
  scorer = eval_lib._Scorer("panoptic", tok, None, categories)
  records, wrong = [], []
  for ex in pan_examples:
    row = conv.panoptic(ex, np.random.default_rng(0))
    assert row["entity_valid"].sum() == len(ex["segments"]["id"])
    records.append(scorer._panoptic_record(ex, row, _panoptic_out(row, row["association"]), 0))
    wrong.append(scorer._panoptic_record(ex, row, _panoptic_out(row, np.roll(row["association"], 1, 1)),
                                         0))
  # The generated names (here the target, decoded) name real categories.
  assert all(grounding.parse_category(n, grounding.category_lookup(categories)) is not None
             for r in records for n in r["names"])
  res = eval_lib.summarize("panoptic", records, categories=categories)
  for k in ("pq", "sq", "rq", "pq_things", "pq_stuff"):
    assert res[k] == pytest.approx(1.0, abs=1e-12), (k, res)
  assert eval_lib.summarize("panoptic", wrong, categories=categories)["pq"] < 0.9
  # The written COCO panoptic results read back to the same PQ.
  preds = [(r["image_id"], f"{r['image_id']:012d}.png", eval_lib.panoptic_map(r),
            [{k: v for k, v in s.items() if k != "rle"} for s in r["segments_info"]]) for r in records]
  path = grounding.write_coco_panoptic(tmp_path, preds, categories)
  back = grounding.read_coco_panoptic(path)
  acc = pq_lib.PQAccumulator(categories)
  for ex in pan_examples:
    ids = coco_panoptic.segment_ids(np.asarray(ex["panoptic"]))
    gt = [{"id": int(i), "category_id": int(c), "iscrowd": int(w)} for i, c, w in
          zip(ex["segments"]["id"], ex["segments"]["category_id"], ex["segments"]["iscrowd"])]
    pred_ids, pred_segs = back[int(ex["image/id"])]
    acc.add(ids, gt, pred_ids, pred_segs)
  assert acc.result()["all"]["pq"] == pytest.approx(1.0, abs=1e-12)


def _as_auto_records(ids_map: np.ndarray) -> list[dict]:
  """The ground-truth segments dressed as automatic-mask records (what a perfect SAM would give)."""
  out = []
  for sid in np.unique(ids_map[ids_map != 0]):
    m = ids_map == sid
    out.append({"segmentation": m, "area": int(m.sum()), "predicted_iou": 1.0 - 1e-6 * len(out)})
  return out


def test_automatic_entities_path_scores_one_with_perfect_masks(sample):
  """`config.eval.entities="sam"`: rows get automatic entities (`eval_entities.auto_row`), scoring unions
  those masks. Automatic masks equal to the true segments, with the association `auto_row` derives
  from the ground-truth masks, give AR = 1 and PQ = 1 again; a shifted association does not."""
  from pixelground.inference import eval_entities
  from pixelground.inference.auto_masks import entity_id_map

  png_examples, pan_examples, categories, tok = sample
  conv = _converters(tok, categories)
  records, shifted, pan_records = [], [], []
  for ex in png_examples:
    row = conv.narrative_grounding(ex, np.random.default_rng(0))
    gt_map = coco_panoptic.segment_ids(np.asarray(ex["panoptic"]))
    auto = entity_id_map(_as_auto_records(gt_map), gt_map.shape, 40)
    assert len(np.unique(auto)) == len(np.unique(gt_map))
    arow = eval_entities.auto_row(row, auto, 640)
    assert arow["entity_valid"].sum() == len(ex["segments"]["id"])
    assert (arow["association"].sum(1) == row["association"].sum(1)).all()
    records.append(eval_lib._png_record(ex, arow, _logits(arow["association"]), auto))
    shifted.append(eval_lib._png_record(ex, arow, _logits(np.roll(arow["association"], 1, axis=1)),
                                        auto))
  assert eval_lib.summarize("narrative_grounding", records)["ar"] == pytest.approx(0.99999, abs=1e-12)
  assert eval_lib.summarize("narrative_grounding", shifted)["ar"] < 0.9
  scorer = eval_lib._Scorer("panoptic", tok, None, categories)
  for ex in pan_examples:
    row = conv.panoptic(ex, np.random.default_rng(0))
    gt_map = coco_panoptic.segment_ids(np.asarray(ex["panoptic"]))
    auto = entity_id_map(_as_auto_records(gt_map), gt_map.shape, 40)
    arow = eval_entities.auto_row(row, auto, 640)
    pan_records.append(scorer._panoptic_record(ex, arow, _panoptic_out(row, arow["association"]), 0,
                                               auto))
  assert eval_lib.summarize("panoptic", pan_records, categories=categories)["pq"] == pytest.approx(1.0)
