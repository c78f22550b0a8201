"""Evaluation of every task with the benchmarks' own metrics (SPEC section 6): the library behind
`python -m pixelground.evaluate` and training's periodic evaluation (the same code, so a checkpoint
evaluated later reproduces the numbers its training run printed).

Per task (by converter, `config.tasks[name].converter`, default the task name):

  referring       teacher-forced on the given expression (PixelLLM reads the box at the EOS position):
                  Acc@0.5 (IoU ≥ 0.5) of the box, and with a refseg model the box-prompted mask's
                  cIoU / gIoU — boxes and masks mapped back to the ORIGINAL image and scored there
  reason_seg      greedy decoding of the answer; the first generated `[SEG]` gives the mask (none → an
                  empty mask); cIoU / gIoU on the original image, ReasonSeg's ignore regions excluded
  referring_seg   the same for LISA's RefCOCO question ("Can you segment {expression} …?"), scored
                  against the referred object's mask
  ln              teacher-forced on the narrative: per-token point L1 (normalised, the in-training
                  `trace_l1`), nDTW of the whole trace (the sequence of per-token box centres against
                  the ground-truth trace boxes' centres) and per word (each token's 2 points against
                  its trace box's 2 corners), LBM distance of the whole trace
  caption         greedy decoding; BLEU-4 / METEOR / ROUGE-L / CIDEr against every reference
                  (pycocoevalcap; `config.eval.java_fallback` skips METEOR where Java is missing)
  region_caption  greedy decoding for the referred box; the same caption metrics against all its
                  expressions
  dense_caption   the proposal head's top-k boxes, each captioned; DenseCap mAP (IoU × METEOR grid,
                  ground truth merged at IoU 0.7) and detection-only mAP
  narrative_grounding  (PNG) teacher-forced on the given noun phrases, each followed by `[SEG]`; each
                  phrase owns the entities its association logit puts above 0 (else its best one); the
                  union of their segments on the ORIGINAL image against the phrase's segments: average
                  recall overall / things / stuff / singular / plural, Acc@0.5 (IoU > 0.5), the PNG
                  benchmark's definitions (`config.eval.png_round_trip`: its 256 × 256 mask round
                  trip); phrases that did not fit the target count as IoU 0 (`truncated` says how many)
  panoptic        greedy decoding of "name [SEG]" per entity from the category list; each entity takes
                  the category of its best-associated named `[SEG]` (stuff entities of a category
                  merged); PQ / SQ / RQ overall / things / stuff against the COCO panoptic ground truth
  (both GELLA tasks use the ground-truth segments as entities, or with `config.eval.entities="sam"`
  SAM's automatic masks of the image: `eval_entities`)

Every task also reports its teacher-forced token accuracy (`train_metrics`). Examples are split over
processes (example i → process i mod P); every process runs the same number of global batches (rows
padded with zeros that count nowhere); per-example records are gathered to every process at the end,
so metrics do not depend on the process count. Records (one per example, JSON-friendly) are what
`evaluate` writes as predictions.jsonl.
"""

from __future__ import annotations

import dataclasses
import pickle
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from pixelground import metrics as M
from pixelground.config import schema
from pixelground.data import pipeline
from pixelground.data import tasks as task_lib
from pixelground.data import transforms as T
from pixelground.inference import decoding, eval_entities, export, nonfinite
from pixelground.inference.predictor import mask_to_image
from pixelground.inference import grounding
from pixelground.models import gella as gella_lib
from pixelground.models import pixelllm as P
from pixelground.models.heads import proposals as prop_lib
from pixelground.parallel import runtime, sharding
from pixelground.training import metrics as train_metrics

# Converters `Evaluator` knows how to score.
SUPPORTED = ("referring", "reason_seg", "referring_seg", "ln", "caption", "region_caption",
             "dense_caption", "narrative_grounding", "panoptic")
# Tasks answered with a `[SEG]`: the first generated one's mask is scored.
SEG_TASKS = ("reason_seg", "referring_seg")


def eval_options(config, **overrides) -> schema.EvalConfig:
  """`config.eval` with the non-None `overrides` applied (the evaluate CLI's flags, notebooks)."""
  kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in overrides.items() if v is not None}
  return dataclasses.replace(schema.parse(config).eval, **kw)


# ----------------------------------------------------------------------------------------------------
# Jitted per-task device functions: (params, frozen, batch) → replicated outputs
# ----------------------------------------------------------------------------------------------------

# Captions have LN's heads and batch fields (zero token boxes), so their teacher-forced pass is LN's
# compiled program, as in training: the same token accuracy, its (empty) trace terms count nowhere.
_SAME_FORWARD = {"caption": "ln", "region_caption": "ln"}

def _forward(model: P.PixelLLM, batch, task: str) -> dict[str, jax.Array]:
  """Teacher-forced outputs a task's scoring needs + its in-training metric sums."""
  out = model(batch, heads=P.TASK_HEADS.get(task, ()))
  res = {"tf": train_metrics.batch_metrics(model.cfg, task, out, batch), "index": batch["eval_index"]}
  if task == "referring":
    res["box"] = P.referring_box(out, batch)
    if "ref_logits" in out:
      res["mask_logits"] = out["ref_logits"]
  elif task == "ln":
    res["points"] = out["points"]
  elif task == "narrative_grounding":
    res["assoc_logits"] = out["assoc_logits"]
  return res


def _decode(model: P.PixelLLM, batch, task: str, max_len: int, dense_k: int,
            vocab_limit: int) -> dict[str, jax.Array]:
  """Greedy decoding (cached) for the generative tasks; reason_seg adds the first `[SEG]`'s mask."""
  fused, sam, entities = model.features(batch)
  ids = batch["prompt_ids"]
  if task == "dense_caption":
    heat, ltrb = model.proposal_head(fused)
    boxes, scores = prop_lib.top_proposals(heat, ltrb, dense_k)  # (B, k, 4) normalised, (B, k)
    b, k = boxes.shape[:2]
    visual = model.visual_tokens(jnp.repeat(fused, k, axis=0), boxes.reshape(b * k, 4))
    ids = jnp.repeat(ids, k, axis=0)
    res = decoding.generate(model.t5, ids, ids != model.cfg.t5.pad_id, max_len=max_len,
                            prefix_embeds=visual, vocab_limit=vocab_limit)
    return {"boxes": boxes, "scores": scores, "tokens": res.tokens.reshape(b, k, -1),
            "lengths": res.lengths.reshape(b, k)}
  visual, prefix, prefix_mask = model.prefix(fused, batch["prompt_box"], entities)
  res = decoding.generate(model.t5, ids, ids != model.cfg.t5.pad_id, max_len=max_len,
                          prefix_embeds=prefix, prefix_mask=prefix_mask, vocab_limit=vocab_limit)
  out = {"tokens": res.tokens, "lengths": res.lengths}
  # Generated `[SEG]` tokens (B, L), padding after each sequence's end excluded.
  is_seg = (res.tokens == model.cfg.seg_token_id) & (jnp.arange(res.tokens.shape[1]) < res.lengths[:, None])
  if task in SEG_TASKS:
    pos = jnp.argmax(is_seg, axis=1).astype(jnp.int32)
    logits, _ = model.decoded_seg_masks(res.hidden, pos[:, None], sam, visual, batch["image_mask"])
    out.update(has_seg=jnp.any(is_seg, axis=1), mask_logits=logits[:, 0])
  if task == "panoptic":  # the first K generated `[SEG]`s ↔ the entities
    k = batch["seg_positions"].shape[1]
    pos = jax.vmap(lambda r: jnp.nonzero(r, size=k, fill_value=0)[0])(is_seg).astype(jnp.int32)
    emb, _ = model.entity_outputs(entities)
    nouns, ents = model.associate(res.hidden, pos, emb)
    out.update(seg_pos=pos, num_seg=jnp.minimum(jnp.sum(is_seg, axis=1), k),
               assoc_logits=gella_lib.association_logits(nouns, ents))
  return out


# ----------------------------------------------------------------------------------------------------
# Host-side scoring: one record per example
# ----------------------------------------------------------------------------------------------------

def _plain(mask) -> np.ndarray:
  m = np.asarray(mask)
  return (m[..., 0] if m.ndim == 3 else m).astype(bool)


class _Scorer:
  """Turns one task's device outputs + the source examples into per-example records."""

  def __init__(self, task: str, tokenizer, cfg: P.PixelLLMConfig, categories=None,
               png_round_trip: bool = False):
    self.task, self.tok, self.cfg, self.categories = task, tokenizer, cfg, categories
    self.png_round_trip = png_round_trip

  def _words(self, tokens: np.ndarray, length: int) -> str:
    toks = [int(t) for t in tokens[:length]]
    if toks and toks[-1] == self.tok.eos_id:
      toks = toks[:-1]
    return self.tok.decode(toks)

  def pred_mask(self, ex: dict, out: dict[str, np.ndarray], i: int) -> np.ndarray | None:
    """Example i's predicted mask, (H, W) bool of the original image: the referring box-prompted mask
    (None without a refseg head), or the first generated `[SEG]`'s (empty when none was generated)."""
    hw = task_lib.image_hw(ex["image"])
    if "mask_logits" not in out:
      return None
    if self.task in SEG_TASKS and not out["has_seg"][i]:
      return np.zeros(hw, bool)
    geom = T.resize_pad(hw[0], hw[1], self.cfg.image_size)
    return mask_to_image(out["mask_logits"][i][None], geom, hw)[0]

  def record(self, ex: dict, row: dict[str, np.ndarray], out: dict[str, np.ndarray], i: int,
             entity_map: np.ndarray | None = None) -> dict:
    """`entity_map`: the (H, W) ids of automatic entities (`eval_entities`) the row's entity slots
    hold; None: the ground-truth segments."""
    hw = task_lib.image_hw(ex["image"])
    geom = T.resize_pad(hw[0], hw[1], self.cfg.image_size)
    task = self.task
    if task == "referring":
      gt = np.asarray(ex["box_xyxy"], np.float32).reshape(4)
      box = geom.inverse_boxes(np.asarray(out["box"][i], np.float32)[None])[0]
      iou = float(M.box_iou(box[None], gt[None])[0])
      rec = {"expression": task_lib.as_text(ex["sentences"][0]), "box": box.round(2).tolist(),
             "gt_box": gt.round(2).tolist(), "box_iou": iou}
      if "mask_logits" in out and "mask" in ex:
        pred = self.pred_mask(ex, out, i)
        inter, union = M.intersection_union(pred, _plain(ex["mask"]))
        rec.update(mask_inter=int(inter), mask_union=int(union))
      return rec
    if task in SEG_TASKS:
      answer = self._words(out["tokens"][i], int(out["lengths"][i]))
      if task == "reason_seg":
        query, target, ignore = (task_lib.as_text(ex["queries"][0]), _plain(ex["target_mask"]),
                                 _plain(ex["ignore_mask"]))
      else:
        query = task_lib.REFER_SEG.format(task_lib.as_text(ex["sentences"][0]))
        target, ignore = _plain(ex["mask"]), None
      pred = self.pred_mask(ex, out, i)
      inter, union = M.intersection_union(pred, target, ignore)
      return {"query": query, "answer": answer,
              "has_seg": bool(out["has_seg"][i]), "mask_inter": int(inter), "mask_union": int(union)}
    if task == "ln":
      valid = row["token_box_valid"] & np.any(row["token_boxes"] != 0, axis=-1)
      vh, vw = geom.valid
      scale = np.asarray([vw, vh, vw, vh], np.float32)
      pred = np.asarray(out["points"][i], np.float32)[valid] / scale          # (N, 4) normalised
      gt = row["token_boxes"][valid] * self.cfg.image_size / scale            # (N, 4) normalised
      rec = {"caption": task_lib.as_text(ex["caption"]), "num_points": int(valid.sum())}
      if valid.any():
        l1 = M.token_point_l1(pred, gt)
        centre = lambda b: np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2], -1)
        rec.update(point_l1_sum=float(np.nansum(l1)), ndtw=float(M.ndtw(centre(pred), centre(gt))),
                   word_ndtw=float(np.mean(M.per_word_ndtw(list(pred.reshape(-1, 2, 2)),
                                                           list(gt.reshape(-1, 2, 2))))),
                   lbm=float(M.lbm_distance(centre(pred), centre(gt))),
                   trace=centre(pred).round(4).tolist())
      return rec
    if task == "caption":
      return {"image_id": export.image_id(ex),
              "caption": self._words(out["tokens"][i], int(out["lengths"][i])),
              "references": [task_lib.as_text(c) for c in ex["captions"]]}
    if task == "region_caption":
      return {"image_id": export.image_id(ex),
              "caption": self._words(out["tokens"][i], int(out["lengths"][i])),
              "box": np.asarray(ex["box_xyxy"], np.float32).reshape(4).round(2).tolist(),
              "references": [task_lib.as_text(s) for s in ex["sentences"]]}
    if task == "narrative_grounding":
      return _png_record(ex, row, out["assoc_logits"][i], entity_map, self.png_round_trip)
    if task == "panoptic":
      return self._panoptic_record(ex, row, out, i, entity_map)
    if task == "dense_caption":
      boxes = geom.inverse_boxes(np.asarray(out["boxes"][i], np.float32) * self.cfg.image_size)
      texts = [self._words(t, int(n)) for t, n in zip(out["tokens"][i], out["lengths"][i])]
      gt_boxes, gt_phrases = task_lib.dense_regions(ex, self.categories)
      return {"image_id": export.image_id(ex), "boxes": boxes.round(2).tolist(),
              "scores": np.asarray(out["scores"][i]).round(4).tolist(),
              "captions": texts, "gt_boxes": gt_boxes.round(2).tolist(), "gt_phrases": gt_phrases}
    raise ValueError(f"no scorer for task '{task}'")

  def _panoptic_record(self, ex: dict, row: dict, out: dict[str, np.ndarray], i: int,
                       entity_map: np.ndarray | None = None) -> dict:
    """Generated names → categories; entities (the row's segments, on the original image) → the
    predicted panoptic map; its per-category PQ sums against the ground truth."""
    from tfds_builders.coco_panoptic import segment_ids

    toks = [int(t) for t in out["tokens"][i][: int(out["lengths"][i])]]
    pos = [int(p) for p in out["seg_pos"][i][: int(out["num_seg"][i])]]
    lookup = grounding.category_lookup(self.categories)
    names, start = [], 0
    for p in pos:  # the words between consecutive `[SEG]`s name the next one
      names.append(self.tok.decode([t for t in toks[start:p] if t != self.tok.eos_id]).strip(" ,."))
      start = p + 1
    k = out["assoc_logits"].shape[1]
    noun_cats = np.full(k, -1, np.int64)
    for j, name in enumerate(names):
      cat = grounding.parse_category(name, lookup)
      noun_cats[j] = -1 if cat is None else cat
    ids_map = segment_ids(np.asarray(ex["panoptic"]))
    source = ids_map if entity_map is None else entity_map
    ents = np.stack([source == int(e) for e in row["entity_ids"]])
    valid = np.asarray(row["entity_valid"], bool) & (np.asarray(row["entity_ids"]) > 0)
    pred_map, pred_segs = grounding.panoptic_prediction(out["assoc_logits"][i], ents, valid, noun_cats,
                                                        self.categories)
    gt_segs = [{"id": int(sid), "category_id": int(cid), "iscrowd": int(crowd)} for sid, cid, crowd in
               zip(ex["segments"]["id"], ex["segments"]["category_id"], ex["segments"]["iscrowd"])]
    acc = M.PQAccumulator(self.categories)
    acc.add(ids_map, gt_segs, pred_map, pred_segs)
    from pycocotools import mask as mask_utils

    segs = []
    for sg in pred_segs:
      rle = mask_utils.encode(np.asfortranarray(pred_map == sg["id"]))
      segs.append({k: v for k, v in sg.items()} | {"rle": rle["counts"].decode("ascii")})
    return {"image_id": int(ex.get("image/id", -1)), "generated": self._words(out["tokens"][i],
                                                                              int(out["lengths"][i])),
            "names": names, "height": int(ids_map.shape[0]), "width": int(ids_map.shape[1]),
            "segments_info": segs,
            "pq_sums": {str(c): [acc.iou[c], acc.tp[c], acc.fp[c], acc.fn[c]]
                        for c in set(acc.tp) | set(acc.fp) | set(acc.fn)}}

  def visual(self, ex: dict, rec: dict, out: dict[str, np.ndarray], i: int,
             entity_map: np.ndarray | None = None) -> dict:
    """What a figure draws for one example: its record (`record`: boxes xyxy pixels of the original
    image) + the image and the predicted masks at its resolution — referring: "mask" (H, W) or None
    without refseg; reason_seg: "masks" (K, H, W), the first generated `[SEG]`'s, K = 0 without one."""
    if self.task == "narrative_grounding":  # each phrase's union of its entities' segments
      from tfds_builders.coco_panoptic import segment_ids

      ids_map = segment_ids(np.asarray(ex["panoptic"])) if entity_map is None else entity_map
      masks = np.stack([np.isin(ids_map, ids) for ids in rec["entities"]]) if rec["entities"] else (
          np.zeros((0,) + ids_map.shape, bool))
      return rec | {"image": np.asarray(ex["image"]), "masks": masks}
    pred = self.pred_mask(ex, out, i)
    if self.task in SEG_TASKS:
      return rec | {"image": np.asarray(ex["image"]), "masks": pred[None][: int(rec["has_seg"])]}
    return rec | {"image": np.asarray(ex["image"]), "mask": pred}


def summarize(task: str, records: list[dict], *, java_fallback: bool = False,
              categories=None) -> dict[str, float]:
  """Per-example records of one task → the task's metrics (names without the task prefix);
  `categories` (the panoptic category list) for "panoptic"."""
  if not records:
    return {}
  if task == "referring":
    out = {"acc50": float(np.mean([r["box_iou"] >= 0.5 for r in records])),
           "mean_box_iou": float(np.mean([r["box_iou"] for r in records]))}
    if "mask_inter" in records[0]:
      out.update(_mask_summary(records, "mask_"))
    return out
  if task in SEG_TASKS:
    return _mask_summary(records, "") | {"seg_rate": float(np.mean([r["has_seg"] for r in records]))}
  if task == "ln":
    scored = [r for r in records if r["num_points"]]
    n = sum(r["num_points"] for r in scored)
    return {"point_l1": sum(r["point_l1_sum"] for r in scored) / max(n, 1),
            "ndtw": float(np.mean([r["ndtw"] for r in scored])) if scored else float("nan"),
            "word_ndtw": float(np.mean([r["word_ndtw"] for r in scored])) if scored else float("nan"),
            "lbm": float(np.mean([r["lbm"] for r in scored])) if scored else float("nan")}
  if task in ("caption", "region_caption"):
    refs = {i: r["references"] for i, r in enumerate(records)}
    preds = {i: r["caption"] for i, r in enumerate(records)}
    scores = M.caption_metrics(refs, preds, java_fallback=java_fallback)
    return {k: float(v) for k, v in scores.items() if k in ("Bleu_4", "METEOR", "ROUGE_L", "CIDEr")}
  if task == "dense_caption":
    ev = M.DenseCapEvaluator()
    for r in records:
      ev.add(np.asarray(r["boxes"], np.float32).reshape(-1, 4), np.asarray(r["scores"], np.float32),
             r["captions"], np.asarray(r["gt_boxes"], np.float32).reshape(-1, 4), r["gt_phrases"])
    res = ev.result()
    return {"map": float(res["map"]), "det_map": float(res["det_map"])}
  if task == "narrative_grounding":
    acc = M.PNGAccumulator()
    for r in records:
      acc.add_ious(r["ious"], r["things"], r["plural"])
    res = acc.result()
    return {k: float(res[k]) for k in ("ar", "ar_things", "ar_stuff", "ar_singular", "ar_plural",
                                       "acc50")} | {"phrases": res["count"],
                                                    "truncated": sum(r["truncated"] for r in records)}
  if task == "panoptic":
    acc = M.PQAccumulator(categories)
    for r in records:
      for c, (iou, tp, fp, fn) in r["pq_sums"].items():
        acc.iou[int(c)] += iou
        acc.tp[int(c)] += tp
        acc.fp[int(c)] += fp
        acc.fn[int(c)] += fn
    res = acc.result()
    return {f"{m}{'' if part == 'all' else '_' + part}": float(res[part][m])
            for part in ("all", "things", "stuff") for m in ("pq", "sq", "rq")}
  raise ValueError(f"no summary for task '{task}'")


def _png_record(ex: dict, row: dict, logits: np.ndarray, entity_map: np.ndarray | None = None,
                round_trip: bool = False) -> dict:
  """One PNG example: every groundable phrase's IoU (ORIGINAL image) with its flags; a phrase's mask
  is the union of its entities' segments (or of the automatic entities of `entity_map`); with
  `round_trip` after the benchmark's 256 × 256 mask round trip (`pixelground.metrics.png`)."""
  from tfds_builders.coco_panoptic import segment_ids

  ids_map = segment_ids(np.asarray(ex["panoptic"]))
  pred_map = ids_map if entity_map is None else entity_map
  phrases = ex["phrases"]
  nouns = [p for p, noun in enumerate(phrases["noun"]) if noun]
  offsets, flat = np.asarray(ex["phrase_offsets"]), np.asarray(ex["phrase_segment_ids"])
  noun_valid = np.asarray(row["seg_valid"], bool)
  entity_valid = np.asarray(row["entity_valid"], bool)
  owned = grounding.phrase_entities(np.asarray(logits), noun_valid, entity_valid)
  ious, chosen = [], []
  for j, p in enumerate(nouns):
    gt = np.isin(ids_map, flat[offsets[p]:offsets[p + 1]])
    ids = np.asarray(row["entity_ids"])[owned[j]] if j < noun_valid.sum() else np.zeros(0, int)
    chosen.append([int(x) for x in ids])
    pred = np.isin(pred_map, ids)[None]
    ious.append(float(M.png_iou(pred, gt[None], round_trip_masks=round_trip)[0]))
  return {"caption": task_lib.as_text(ex["caption"]),
          "phrases": [task_lib.as_text(phrases["utterance"][p]) for p in nouns], "entities": chosen,
          "ious": ious, "things": [bool(phrases["isthing"][p]) for p in nouns],
          "plural": [bool(phrases["plural"][p]) for p in nouns],
          "truncated": int(len(nouns) - min(len(nouns), int(noun_valid.sum())))}


def panoptic_map(record: dict) -> np.ndarray:
  """A panoptic record's predicted segment-id map (H, W) int32 of the original image, from its
  segments' RLE."""
  from pycocotools import mask as mask_utils

  out = np.zeros((record["height"], record["width"]), np.int32)
  for sg in record["segments_info"]:
    rle = {"size": [record["height"], record["width"]], "counts": sg["rle"].encode("ascii")}
    out[mask_utils.decode(rle).astype(bool)] = sg["id"]
  return out


def _mask_summary(records: list[dict], prefix: str) -> dict[str, float]:
  """Records with mask_inter / mask_union pixel counts → {prefix}giou, {prefix}ciou."""
  inter = np.asarray([r["mask_inter"] for r in records], np.float64)
  union = np.asarray([r["mask_union"] for r in records], np.float64)
  iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
  return {f"{prefix}giou": float(iou.mean()),
          f"{prefix}ciou": float(inter.sum() / union.sum()) if union.sum() else 1.0}


def write_outputs(out_dir: str, tag: str, result: dict, records: dict[str, list[dict]]) -> None:
  """eval_<tag>.json (the metrics) and predictions_<tag>.jsonl (one line per example) in `out_dir`."""
  import json
  import os

  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, f"eval_{tag}.json"), "w") as f:
    json.dump(result, f, indent=1)
  with open(os.path.join(out_dir, f"predictions_{tag}.jsonl"), "w") as f:
    for task, recs in records.items():
      for r in recs:
        f.write(json.dumps({"task": task, **r}) + "\n")


def _allgather_objects(obj) -> list:
  """Every process's `obj` (any picklable), in process order (one entry when single-process)."""
  if jax.process_count() == 1:
    return [obj]
  from pixelground.parallel import runtime

  data = np.frombuffer(pickle.dumps(obj), np.uint8)
  sizes = runtime.allgather(np.asarray([data.size], np.int64))
  buf = np.zeros(int(np.max(sizes)), np.uint8)
  buf[: data.size] = data
  allbufs = runtime.allgather(buf)
  return [pickle.loads(allbufs[p, : int(sizes[p][0])].tobytes()) for p in range(jax.process_count())]


# ----------------------------------------------------------------------------------------------------
# The evaluator
# ----------------------------------------------------------------------------------------------------

class Evaluator:
  """Evaluates a train state on the held-out split of `config.tasks` (each task's `eval_split`,
  default "validation"). `run(state)` → {"<task>/<metric>": value, ...}; `records` then holds the
  per-example predictions {task: [record, ...]} (gathered from every process, in example order) and
  `kept` {task: {example index: `_Scorer.visual`}} the first `keep_examples` that this process scored
  (referring and reason_seg; the demo figure draws them without compiling inference programs)."""

  def __init__(self, config, setup, tokenizer, *, options: schema.EvalConfig | None = None,
               keep_examples: int = 0, split: str | None = None):
    """`options`: `config.eval` unless given (`eval_options`); `keep_examples`: per task, the first k
    examples' images + predictions are kept in `kept`; `split`: every task's split instead of its
    `eval_split`."""
    from pixelground.training import datasets

    config = schema.parse(config)
    self.setup, self.tok = setup, tokenizer
    self.opts = options or config.eval
    self.keep_examples = keep_examples
    names = list(self.opts.tasks or [n for n in config.tasks if config.converter(n) in SUPPORTED])
    for n in names:
      if n not in config.tasks:
        raise ValueError(f"config.eval.tasks: unknown task '{n}' (config.tasks has {list(config.tasks)}).")
      conv = config.converter(n)
      if conv not in SUPPORTED:
        raise ValueError(f"config.eval.tasks: task '{n}' (converter '{conv}') has no evaluation; "
                         f"supported: {SUPPORTED}.")
    nproc = jax.process_count()
    if self.opts.batch_size % nproc:
      raise ValueError(f"config.eval.batch_size={self.opts.batch_size} must divide by {nproc} processes.")
    self.tasks = {t.name: t for t in datasets.data_tasks(config, tokenizer, split=split,
                                                           train=False, names=names)}
    self.names = [n for n in names if n in self.tasks]
    self.conv = {n: config.converter(n) for n in self.names}
    self.schema = task_lib.schema(config.task_config(train=False))
    self.records: dict[str, list[dict]] = {}
    self.kept: dict[str, dict[int, dict]] = {}
    rep = NamedSharding(setup.mesh, PartitionSpec())
    graphdef, cfg = setup.graphdef, setup.cfg

    def forward(params, frozen, batch, task):
      return _forward(nnx.merge(graphdef, params, frozen), batch, task)

    def decode(params, frozen, batch, task):
      return _decode(nnx.merge(graphdef, params, frozen), batch, task, self.opts.max_decode_len,
                     self.opts.dense_k, tokenizer.num_ids)

    self._forward = runtime.AheadOfTime(jax.jit(forward, static_argnums=3, out_shardings=rep), "forward")
    self._decode = runtime.AheadOfTime(jax.jit(decode, static_argnums=3, out_shardings=rep), "decode")
    self.scorers = {n: _Scorer(self.conv[n], tokenizer, cfg, self._categories(self.tasks[n]),
                               self.opts.png_round_trip) for n in self.names}
    self.auto = (eval_entities.AutoEntities(self.opts.sam_checkpoint, cfg.image_size)
                 if self.opts.entities == "sam" and any(self.conv[n] in eval_entities.TASKS
                                                        for n in self.names) else None)

  @staticmethod
  def _categories(task):
    conv = getattr(task.convert, "__self__", None)
    return getattr(conv, "categories", None)

  def _indices(self, n_total: int) -> tuple[list[int], int]:
    n = min(n_total, self.opts.max_examples) if self.opts.max_examples else n_total
    pid, nproc = jax.process_index(), jax.process_count()
    local = self.opts.batch_size // nproc
    mine = list(range(pid, n, nproc))
    per_process = -(-n // nproc)  # every process runs as many batches as the fullest one
    return mine, -(-per_process // local)

  def run(self, state, *, progress: bool = False) -> dict[str, float]:
    from concurrent.futures import ThreadPoolExecutor

    t0 = time.perf_counter()
    self.records, self.kept = {}, {}
    if self.auto is not None:
      self.auto.bind(self.setup, state)
    tfs, counts, summaries = {}, {}, {}
    # Each task's summary is computed beside the next task's device work (caption metrics wait ~7 s
    # on Java's METEOR / PTB tokenizer processes). Host↔device copies are explicit (device_put /
    # device_get): an implicit one is an error here.
    with ThreadPoolExecutor(1) as pool, jax.transfer_guard("disallow"):
      for name in self.names:
        recs, tfs[name] = self._run_task(name, state, progress)
        self.records[name], counts[name] = recs, len(recs)
        summaries[name] = pool.submit(summarize, self.conv[name], recs,
                                      java_fallback=self.opts.java_fallback,
                                      categories=self.scorers[name].categories)
    results: dict[str, float] = {}
    for name in self.names:
      nonfinite = sum(1 for r in self.records[name] if r.get("nonfinite"))
      metrics = tfs[name] | summaries[name].result() | {"count": counts[name], "nonfinite": nonfinite}
      results.update({f"{name}/{k}": v for k, v in metrics.items()})
    results["eval_seconds"] = time.perf_counter() - t0
    return results

  def _run_task(self, name: str, state, progress: bool) -> tuple[list[dict], dict[str, float]]:
    task, conv, scorer = self.tasks[name], self.conv[name], self.scorers[name]
    mine, num_batches = self._indices(len(task.source))
    local = self.opts.batch_size // jax.process_count()
    batch_schema = task.schema or self.schema
    task_id = self.names.index(name)
    acc = train_metrics.Accumulator()
    recs: list[tuple[int, dict]] = []
    bar = None
    if progress and jax.process_index() == 0:
      from tqdm import tqdm
      bar = tqdm(total=num_batches, desc=f"eval {name}", unit="batch", mininterval=2.0)
    for b in range(num_batches):
      idx = mine[b * local:(b + 1) * local]
      exs = [task.source[i] for i in idx]
      rows = [pipeline._pad_to_schema(task.convert(ex, np.random.default_rng(i)), batch_schema, task_id, name)
              for i, ex in zip(idx, exs)]
      maps = [None] * len(rows)
      if self.auto is not None and conv in eval_entities.TASKS:
        rows, maps = self.auto.rows(exs, rows)
      zero = {k: np.zeros_like(v) for k, v in rows[0].items()} if rows else self._zero_row(batch_schema, name)
      padded = rows + [zero] * (local - len(rows))
      batch = {k: np.stack([r[k] for r in padded]) for k in padded[0]}
      batch["eval_index"] = np.asarray(idx + [-1] * (local - len(idx)), np.int32)
      with sharding.use(self.setup.mesh, self.setup.rules):
        gb = sharding.global_batch(batch, self.setup.mesh, self.setup.rules)
        out = self._forward(state["params"], state["frozen"], gb, _SAME_FORWARD.get(conv, conv))
        if conv in SEG_TASKS + ("caption", "region_caption", "dense_caption", "panoptic"):
          out |= self._decode(state["params"], state["frozen"], gb, conv)
      acc.add(out.pop("tf"))
      host = {k: np.asarray(v) for k, v in jax.device_get(out).items()}
      host, bad = nonfinite.sanitize(host, self.setup.cfg.image_size)
      where = {int(i): r for r, i in enumerate(host["index"])}  # outputs are replicated: find our rows
      for j, (i, ex) in enumerate(zip(idx, exs)):
        rec = scorer.record(ex, rows[j], host, where[i], maps[j])
        if bad[where[i]]:
          rec["nonfinite"] = True
        recs.append((i, {"index": i} | rec))
        if i < self.keep_examples and conv in ("referring", "narrative_grounding") + SEG_TASKS:
          self.kept.setdefault(name, {})[i] = scorer.visual(ex, rec, host, where[i], maps[j])
      if bar is not None:
        bar.update(1)
    if bar is not None:
      bar.close()
    gathered = [r for part in _allgather_objects(recs) for r in part]
    gathered.sort(key=lambda x: x[0])
    # Of the in-training metrics only the teacher-forced token accuracy is not recomputed here.
    tf = {"token_acc": v for k, v in acc.result().items() if k.endswith("_acc")}
    return [r for _, r in gathered], tf

  def write(self, out_dir: str, tag: str, result: dict) -> None:
    """`write_outputs` of the last `run`, plus each panoptic task's predictions in the COCO panoptic
    results format: out_dir/panoptic_<task>_<tag>/panoptic_pred.json + panoptic_pred/<image id>.png."""
    import os

    write_outputs(out_dir, tag, result, self.records)
    for name, recs in self.records.items():
      if self.conv[name] == "panoptic":
        preds = [(r["image_id"], f"{r['image_id']:012d}.png", panoptic_map(r),
                  [{k: v for k, v in sg.items() if k != "rle"} for sg in r["segments_info"]])
                 for r in recs]
        grounding.write_coco_panoptic(os.path.join(out_dir, f"panoptic_{name}_{tag}"), preds,
                                      self.scorers[name].categories)

  def _zero_row(self, schema, name):
    return {k: np.zeros(shape, dtype) for k, (shape, dtype) in schema.items()} | {
        "task_id": np.zeros((), np.int32)}
