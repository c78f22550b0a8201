"""Host-side scoring of the evaluator's device outputs (`pixelground.inference.eval_lib`): one
JSON-friendly record per example (`_Scorer`), each task's summary metrics over its records
(`summarize`), the predictions files, and the gather of records from every process."""

from __future__ import annotations

import pickle

import jax
import numpy as np

from pixelground import metrics as M
from pixelground.data import tasks as task_lib
from pixelground.data import transforms as T
from pixelground.inference import export, grounding
from pixelground.inference.predictor import mask_to_image
from pixelground.models import pixelllm as P

SEG_TASKS = ("reason_seg", "referring_seg")  # the mask of the first generated `[SEG]`
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
