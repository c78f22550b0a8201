"""The evaluation library: task summaries on hand-made records (known answers), and the Evaluator on a
tiny grounded-shapes split — results independent of the batch size and the mesh, one record per example,
boxes and masks in original-image pixels."""

import os

import numpy as np
import pytest

import jax

from pixelground.inference import eval_lib
from pixelground.parallel import sharding
from pixelground.training import datasets, train_state
from pixelground.config import schema
from pixelground.config.parse import load_config
from pixelground.data import tokenizer as tok_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_summaries_known_answers():
  ref = [{"box_iou": 0.5, "mask_inter": 3, "mask_union": 4}, {"box_iou": 0.499, "mask_inter": 0, "mask_union": 0},
         {"box_iou": 0.9, "mask_inter": 1, "mask_union": 6}]
  s = eval_lib.summarize("referring", ref)
  assert s["acc50"] == pytest.approx(2 / 3)  # IoU ≥ 0.5 is a hit
  assert s["mean_box_iou"] == pytest.approx((0.5 + 0.499 + 0.9) / 3)
  assert s["mask_giou"] == pytest.approx((3 / 4 + 1.0 + 1 / 6) / 3)  # empty vs empty scores 1
  assert s["mask_ciou"] == pytest.approx(4 / 10)
  for task in ("reason_seg", "referring_seg"):
    rs = eval_lib.summarize(task, [{"mask_inter": 2, "mask_union": 8, "has_seg": True},
                                   {"mask_inter": 0, "mask_union": 5, "has_seg": False}])
    assert rs == pytest.approx({"giou": 0.125, "ciou": 2 / 13, "seg_rate": 0.5})
  ln = eval_lib.summarize("ln", [{"num_points": 2, "point_l1_sum": 0.3, "ndtw": 0.5, "word_ndtw": 0.4,
                                  "lbm": 0.1},
                                 {"num_points": 0},
                                 {"num_points": 1, "point_l1_sum": 0.3, "ndtw": 1.0, "word_ndtw": 1.0,
                                  "lbm": 0.0}])
  assert ln == pytest.approx({"point_l1": 0.2, "ndtw": 0.75, "word_ndtw": 0.7, "lbm": 0.05})
  assert eval_lib.summarize("caption", []) == {}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
  os.environ["PIXELGROUND_CACHE"] = str(tmp_path_factory.mktemp("cache"))
  config = load_config(os.path.join(ROOT, "tests", "configs", "train_small.py"))
  full = load_config(os.path.join(ROOT, "configs", "demo.py"))
  with config.unlocked():
    for name in ("referring", "reason_seg"):
      config.tasks[name] = full.tasks[name]
    config.eval.max_decode_len = 8
  config = schema.parse(config)
  datasets.prepare_data(config)
  tok = tok_lib.load_tokenizer(config.tokenizer)
  return config, tok


def _evaluate(config, tok, mesh_axes, batch_size, tasks, devices=None, state=None, keep=0):
  mesh = sharding.make_mesh(mesh_axes, devices=devices)
  setup = train_state.build_setup(config, mesh)
  # One initialisation (its compile is the slow part), placed on each mesh.
  state = train_state.init_state(setup) if state is None else jax.device_put(state, setup.state_shardings)
  opts = eval_lib.eval_options(config, tasks=tasks, max_examples=6, batch_size=batch_size)
  ev = eval_lib.Evaluator(config, setup, tok, options=opts, keep_examples=keep)
  result = ev.run(state)
  if keep:
    _check_kept(ev, train_state.make_model(setup, state), tok, keep,
                config.data.max_prompt_len)
  return result, ev.records, state


def _check_kept(ev, model, tok, keep, max_prompt_len):
  """The kept examples (what the demo figure draws) are the scored predictions, and what the
  single-image Predictor gives for the same input."""
  from pixelground.inference import predictor as inference

  pred = inference.Predictor(model, tok, max_prompt_len=max_prompt_len)
  assert sorted(ev.kept) == ["reason_seg", "referring"] and all(len(v) == keep for v in ev.kept.values())
  for i, k in ev.kept["referring"].items():
    rec = ev.records["referring"][i]
    assert k["expression"] == rec["expression"]
    np.testing.assert_allclose(k["box"], rec["box"], atol=0.01)
    np.testing.assert_allclose(k["gt_box"], rec["gt_box"], atol=0.01)
    r = pred.referring(k["image"], k["expression"])
    np.testing.assert_allclose(k["box"], r.box, atol=0.05)
    assert k["mask"].shape == r.mask.shape == k["image"].shape[:2]
    assert np.mean(k["mask"] == r.mask) > 0.99
  for i, k in ev.kept["reason_seg"].items():
    rec = ev.records["reason_seg"][i]
    assert (k["query"], k["answer"]) == (rec["query"], rec["answer"])
    assert len(k["masks"]) == int(rec["has_seg"])
    s = pred.segment(k["image"], k["query"], max_len=ev.opts.max_decode_len)
    assert s.text == k["answer"] and s.masks.shape[1:] == k["masks"].shape[1:]
    if len(k["masks"]):
      assert np.mean(k["masks"][0] == s.masks[0]) > 0.99


def test_evaluator_independent_of_batch_and_mesh(small):
  config, tok = small
  one = {"data": 1, "fsdp": 1, "tensor": 1}
  a, rec_a, state = _evaluate(config, tok, one, 4, ("referring", "reason_seg", "ln"),
                              devices=jax.devices()[:1], keep=2)                   # 2 batches, one padded
  b, rec_b, _ = _evaluate(config, tok, {"data": 2, "fsdp": 2, "tensor": 2}, 8, ("referring", "ln"),
                          state=state)                                             # 1 batch, 2 pad rows
  for k in b:
    if k != "eval_seconds":
      assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k
  for task in ("referring", "reason_seg", "ln"):
    assert [r["index"] for r in rec_a[task]] == list(range(6))
    assert a[f"{task}/count"] == 6
  assert [r["index"] for r in rec_b["referring"]] == list(range(6))
  # Boxes come back in the original image's pixels (the validation images are 64 × 64).
  for r in rec_a["referring"]:
    assert len(r["box"]) == 4 and len(r["gt_box"]) == 4 and 0 <= r["box_iou"] <= 1
    assert r["mask_union"] <= 64 * 64
  for r in rec_a["reason_seg"]:
    assert isinstance(r["answer"], str) and r["mask_inter"] <= r["mask_union"]
  assert 0 < a["ln/point_l1"] < 1 and 0 < a["ln/ndtw"] <= 1
  assert a["referring/acc50"] == np.mean([r["box_iou"] >= 0.5 for r in rec_a["referring"]])


def test_unknown_or_unsupported_task_is_named(small):
  config, tok = small
  setup = train_state.build_setup(config, sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1},
                                                           devices=jax.devices()[:1]))
  with pytest.raises(ValueError, match="unknown task 'nope'"):
    eval_lib.Evaluator(config, setup, tok, options=schema.EvalConfig(tasks=("nope",)))
