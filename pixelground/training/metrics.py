"""Held-out metrics computed during training, teacher-forced (one forward pass per batch, no decoding).

Each task's batch gives per-metric (sum, count) pairs; `Accumulator` adds them over an eval set. All
figures are means over examples (or tokens) of the held-out split:

  referring_acc50   fraction of referring expressions whose box — the location head's output at the EOS,
                    with the expression teacher-forced (PixelLLM's referring localisation) — has IoU ≥ 0.5
                    with the ground-truth box (both xyxy in model-input pixels)
  referring_miou    mean over examples of the box-prompted mask's IoU with the GT mask (= gIoU)
  trace_l1          LN: mean |predicted − true| over the 4 coordinates of each supervised word's trace box,
                    in units of the image's (unpadded) width / height — i.e. normalised coordinates
  caption_token_acc COCO-style captions: teacher-forced next-token accuracy over target tokens (EOS incl.)
  ln_token_acc      the same on Localized-Narratives captions
  region_token_acc  location-conditioned captions (box prompt)
  seg_miou          LISA: mean over `[SEG]` masks of IoU with the GT mask (pixels marked "ignore" excluded)
  dense_region_acc  dense captioning: teacher-forced token accuracy of the GT regions' captions
  assoc_acc         GELLA: share of (valid noun, valid entity) pairs whose association logit has the
                    ground truth's sign
  entity_miou       GELLA: mean over valid entities of the entity decoder's mask IoU with its input mask
The full evaluation suite (generation, CIDEr, mAP, cIoU, ...) lives in the evaluation CLIs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pixelground.training import losses as L
from pixelground.models import pixelllm as P
from pixelground.training import objective

# task name → the token-accuracy metric its text reports
_TOKEN_ACC = {"caption": "caption_token_acc", "web_caption": "web_caption_token_acc", "ln": "ln_token_acc",
              "region_caption": "region_token_acc",
              "referring": "referring_token_acc", "reason_seg": "seg_answer_token_acc",
              "referring_seg": "seg_answer_token_acc", "narrative_grounding": "noun_token_acc",
              "panoptic": "panoptic_token_acc"}


def box_iou(a: jax.Array, b: jax.Array) -> jax.Array:
  """IoU of xyxy boxes (..., 4) (any consistent units; corners in either order) → (...)."""
  def norm(x):
    return jnp.concatenate([jnp.minimum(x[..., :2], x[..., 2:]), jnp.maximum(x[..., :2], x[..., 2:])], -1)
  a, b = norm(a.astype(jnp.float32)), norm(b.astype(jnp.float32))
  lo, hi = jnp.maximum(a[..., :2], b[..., :2]), jnp.minimum(a[..., 2:], b[..., 2:])
  inter = jnp.prod(jnp.maximum(hi - lo, 0.0), axis=-1)
  area = lambda x: jnp.prod(x[..., 2:] - x[..., :2], axis=-1)
  union = area(a) + area(b) - inter
  return jnp.where(union > 0, inter / jnp.maximum(union, 1e-9), 0.0)


def _token_correct(logits, targets, mask):
  correct = (jnp.argmax(logits, -1) == targets) & mask
  return jnp.sum(correct).astype(jnp.float32), jnp.sum(mask).astype(jnp.float32)


def batch_metrics(cfg: P.PixelLLMConfig, task: str, out: dict[str, jax.Array],
                  batch: dict[str, jax.Array]) -> dict[str, tuple[jax.Array, jax.Array]]:
  """{metric: (sum, count)} for one teacher-forced batch of a single task (jit-friendly)."""
  m: dict[str, tuple[jax.Array, jax.Array]] = {}
  if "logits" in out and task in _TOKEN_ACC:
    m[_TOKEN_ACC[task]] = _token_correct(out["logits"], batch["target_ids"], batch["target_mask"])
  size = P.valid_size(batch["image_mask"])  # (B, 2) unpadded [w, h] pixels
  if task == "ln":
    target = batch["token_boxes"].astype(jnp.float32) * cfg.image_size
    scale = jnp.concatenate([size, size], -1)[:, None, :]
    err = jnp.abs(out["points"] - target) / scale  # (B, T, 4) normalised
    valid = batch["token_box_valid"][..., None].astype(jnp.float32)
    m["trace_l1"] = (jnp.sum(err * valid), 4.0 * jnp.sum(batch["token_box_valid"]).astype(jnp.float32))
  if task == "referring":
    eos = jnp.sum(batch["target_mask"], axis=-1).astype(jnp.int32) - 1
    pred = P.referring_box(out, batch)
    gt = jnp.take_along_axis(batch["token_boxes"], eos[:, None, None], axis=1)[:, 0] * cfg.image_size
    has_box = jnp.take_along_axis(batch["token_box_valid"], eos[:, None], axis=1)[:, 0]
    hit = (box_iou(pred, gt) >= 0.5) & has_box
    m["referring_acc50"] = (jnp.sum(hit).astype(jnp.float32), jnp.sum(has_box).astype(jnp.float32))
    if "ref_logits" in out:
      valid = objective.refseg_rows(cfg, batch)
      iou = L.mask_iou(out["ref_logits"], batch["seg_masks"][:, 0].astype(jnp.float32),
                       ignore=~batch["image_mask"])
      m["referring_miou"] = (jnp.sum(jnp.where(valid, iou, 0.0)), jnp.sum(valid).astype(jnp.float32))
  if task in ("reason_seg", "referring_seg") and "seg_logits" in out:
    valid = objective.seg_rows(cfg, batch)
    ignore = batch["ignore_mask"][:, None] | ~batch["image_mask"][:, None]
    iou = L.mask_iou(out["seg_logits"], batch["seg_masks"].astype(jnp.float32),
                     ignore=jnp.broadcast_to(ignore, out["seg_logits"].shape))
    m["seg_miou"] = (jnp.sum(jnp.where(valid, iou, 0.0)), jnp.sum(valid).astype(jnp.float32))
  if "assoc_logits" in out:
    pairs = objective.seg_rows(cfg, batch)[:, :, None] & batch["entity_valid"][:, None, :]
    right = ((out["assoc_logits"] > 0) == batch["association"]) & pairs
    m["assoc_acc"] = (jnp.sum(right).astype(jnp.float32), jnp.sum(pairs).astype(jnp.float32))
    iou = L.mask_iou(out["entity_logits"], batch["entity_masks"].astype(jnp.float32))
    ev = batch["entity_valid"]
    m["entity_miou"] = (jnp.sum(jnp.where(ev, iou, 0.0)), jnp.sum(ev).astype(jnp.float32))
  if task == "dense_caption" and "region_logits" in out:
    rids = batch["region_ids"]
    mask = (rids != cfg.t5.pad_id) & batch["region_valid"][..., None]
    m["dense_region_acc"] = _token_correct(out["region_logits"], rids, mask)
  return m


class Accumulator:
  """Adds (sum, count) pairs on the host; `result()` → {metric: mean} (metrics with no count omitted)."""

  def __init__(self):
    self.sums: dict[str, float] = {}
    self.counts: dict[str, float] = {}

  def add(self, metrics: dict[str, tuple]) -> None:
    for k, (s, c) in jax.device_get(metrics).items():
      self.sums[k] = self.sums.get(k, 0.0) + float(np.asarray(s))
      self.counts[k] = self.counts.get(k, 0.0) + float(np.asarray(c))

  def result(self) -> dict[str, float]:
    return {k: self.sums[k] / self.counts[k] for k in sorted(self.sums) if self.counts[k] > 0}
