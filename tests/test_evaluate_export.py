"""`python -m pixelground.evaluate --format=coco` end to end, as the README writes it: a short training
run (tests/configs/export_small.py: dense captioning, captions, GELLA panoptic), then the evaluate CLI
as a subprocess; the files it writes are read back with the official tools' readers (pycocotools'
COCO / COCOeval, pycocoevalcap's COCOEvalCap, COCO panoptic JSON + PNGs through rgb2id) and give the
metrics JSON of the same run.

Slow (@pytest.mark.slow, `--runslow`): about 7 min on 2 CPU cores, nearly all of it the trainer
compiling its three train steps (the evaluate CLI itself takes about 1 min)."""

import contextlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import coco_files
from pixelground import metrics as M
from pixelground.inference import export

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "tests", "configs", "export_small.py")
TASKS = ("dense_caption", "caption", "panoptic")


def _run(env, *args, timeout):
  p = subprocess.run([sys.executable, "-m", *args], env=env, cwd=ROOT, capture_output=True, text=True,
                     timeout=timeout)
  assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
  return p.stdout


def _quiet(fn, *args):
  with contextlib.redirect_stdout(io.StringIO()):
    return fn(*args)


def check_dense_caption(out, tag, records, metrics):
  """Detections + ground-truth regions read by pycocotools (+ the captions of predictions.jsonl) give
  the run's DenseCap mAP / det_map; COCOeval on the files equals DetectionEvaluator on the records."""
  from pycocotools.coco import COCO
  from pycocotools.cocoeval import COCOeval

  gt = _quiet(COCO, os.path.join(out, f"dense_caption_{tag}_regions_gt.json"))
  res = _quiet(gt.loadRes, os.path.join(out, f"dense_caption_{tag}_detections.json"))
  def xyxy(anns):  # COCO xywh pixels → xyxy pixels
    b = np.asarray([a["bbox"] for a in anns], np.float64).reshape(-1, 4)
    return np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], axis=1)

  dense, ours = M.DenseCapEvaluator(), M.DetectionEvaluator()
  for image_id, r in zip(export._ids(records), records):
    dets = res.loadAnns(res.getAnnIds(imgIds=[image_id]))
    anns = gt.loadAnns(gt.getAnnIds(imgIds=[image_id]))
    boxes, gt_boxes = xyxy(dets), xyxy(anns)
    np.testing.assert_allclose(boxes, np.reshape(r["boxes"], (-1, 4)), rtol=0, atol=1e-9)
    assert [a["phrase"] for a in anns] == r["gt_phrases"] and len(dets) == len(r["captions"])
    scores = [d["score"] for d in dets]
    dense.add(boxes, scores, r["captions"], gt_boxes, [a["phrase"] for a in anns])
    n, g = len(r["boxes"]), len(r["gt_boxes"])
    ours.add(np.reshape(r["boxes"], (n, 4)), r["scores"], np.ones(n), np.reshape(r["gt_boxes"], (g, 4)),
             np.ones(g), image_id=image_id)
  got = dense.result()
  assert got["num_preds"] == len(res.getAnnIds()) > 0
  for k in ("map", "det_map"):
    assert got[k] == pytest.approx(metrics[f"dense_caption/{k}"], abs=1e-12), k
  ev = COCOeval(gt, res, "bbox")
  _quiet(lambda: (ev.evaluate(), ev.accumulate(), ev.summarize()))
  np.testing.assert_allclose(ours.result()["stats"], ev.stats, rtol=0, atol=1e-12)
  return {"map": got["map"], "det_map": got["det_map"], "coco_ap": float(ev.stats[0])}


def check_caption(out, tag, metrics):
  """COCOEvalCap on the caption results + references files gives the run's caption metrics."""
  import pycocoevalcap.eval as cap_eval
  from pycocotools.coco import COCO

  gt = _quiet(COCO, os.path.join(out, f"caption_{tag}_captions_gt.json"))
  res = _quiet(gt.loadRes, os.path.join(out, f"caption_{tag}_captions.json"))
  official = cap_eval.COCOEvalCap(gt, res)
  _quiet(official.evaluate)
  for k in ("Bleu_4", "METEOR", "ROUGE_L", "CIDEr"):
    assert official.eval[k] == pytest.approx(metrics[f"caption/{k}"], abs=1e-12), k
  return {k: official.eval[k] for k in ("Bleu_4", "METEOR", "CIDEr")}


def check_panoptic(out, tag, metrics, gt_examples):
  """The COCO panoptic JSON + PNGs: every PNG's ids (rgb2id) are the JSON's segments, with their areas,
  boxes and known categories; PQ of the re-read files against the split's ground truth is the run's."""
  from PIL import Image
  from tfds_builders.coco_panoptic import segment_ids

  folder = os.path.join(out, f"panoptic_panoptic_{tag}")
  with open(os.path.join(folder, "panoptic_pred.json")) as f:
    data = json.load(f)
  categories = {c["id"]: c for c in data["categories"]}
  acc = M.PQAccumulator(data["categories"])
  segments = 0
  assert sorted(a["image_id"] for a in data["annotations"]) == sorted(gt_examples)
  for ann in data["annotations"]:
    with Image.open(os.path.join(folder, "panoptic_pred", ann["file_name"])) as im:
      assert im.mode == "RGB"
      ids = M.panoptic.rgb_to_id(np.asarray(im))
    infos = ann["segments_info"]
    assert sorted(set(np.unique(ids).tolist()) - {0}) == sorted(s["id"] for s in infos)
    for s in infos:
      ys, xs = np.nonzero(ids == s["id"])
      assert s["area"] == len(ys) > 0
      assert s["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
      assert s["category_id"] in categories and s["isthing"] == categories[s["category_id"]]["isthing"]
    segments += len(infos)
    ex = gt_examples[ann["image_id"]]
    gt_segs = [{"id": int(i), "category_id": int(c), "iscrowd": int(k)} for i, c, k in
               zip(ex["segments"]["id"], ex["segments"]["category_id"], ex["segments"]["iscrowd"])]
    acc.add(segment_ids(np.asarray(ex["panoptic"])), gt_segs, ids, infos)
  assert segments > 0  # the short run's decoder does write "name [SEG]" lists
  res = acc.result()
  for part, suffix in (("all", ""), ("things", "_things"), ("stuff", "_stuff")):
    for m in ("pq", "sq", "rq"):
      assert res[part][m] == pytest.approx(metrics[f"panoptic/{m}{suffix}"], abs=1e-12), (part, m)
  return {"pq": res["all"]["pq"], "segments": segments}


def panoptic_ground_truth(config_path, cache) -> dict:
  """{image id: example} of the panoptic task's evaluation split (prepared data under `cache`)."""
  from pixelground.config import schema
  from pixelground.config.parse import load_config
  from pixelground.training import datasets

  old = os.environ.get("PIXELGROUND_CACHE")
  os.environ["PIXELGROUND_CACHE"] = cache
  try:
    config = schema.parse(load_config(config_path))
    task = config.tasks["panoptic"]
    builder = datasets.open_builder(task.dataset, datasets.data_dir(config), "panoptic")
  finally:
    if old is None:
      os.environ.pop("PIXELGROUND_CACHE")
    else:
      os.environ["PIXELGROUND_CACHE"] = old
  source = builder.as_data_source(task.eval_split)
  return {export.image_id(ex): ex for ex in (source[i] for i in range(len(source)))}


@pytest.mark.slow
def test_evaluate_coco_files_give_the_metrics(cli_env, tmp_path, monkeypatch):
  coco_files.caption_eval(monkeypatch)  # skips without Java; SPICE stubbed for the check below
  run, out = str(tmp_path / "run"), str(tmp_path / "eval")
  _run(cli_env, "pixelground.train", f"--config={CONFIG}", f"--workdir={run}", timeout=1800)
  stdout = _run(cli_env, "pixelground.evaluate", f"--config={CONFIG}", f"--checkpoint={run}",
                f"--workdir={out}", f"--tasks={','.join(TASKS)}", "--max_examples=8", "--format=coco",
                timeout=900)
  metrics = json.loads(stdout.strip().splitlines()[-1])
  tag = str(metrics["step"])
  with open(os.path.join(out, f"eval_{tag}.json")) as f:
    assert json.load(f) == metrics
  with open(os.path.join(out, f"predictions_{tag}.jsonl")) as f:
    lines = [json.loads(line) for line in f]
  records = {t: [r for r in lines if r["task"] == t] for t in TASKS}
  assert all(len(records[t]) == 8 for t in TASKS)
  seen = {"dense_caption": check_dense_caption(out, tag, records["dense_caption"], metrics),
          "caption": check_caption(out, tag, metrics),
          "panoptic": check_panoptic(out, tag, metrics,
                                     panoptic_ground_truth(CONFIG, cli_env["PIXELGROUND_CACHE"]))}
  print("\nexported files of the evaluate CLI:", json.dumps(seen))
