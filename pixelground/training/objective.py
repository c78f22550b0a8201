"""The training objective: PixelLLM / LISA outputs + a teacher-forced batch → the weighted loss terms
(SPEC §2), each logged separately."""

from __future__ import annotations

import dataclasses
import typing as tp

import jax
import jax.numpy as jnp

from pixelground.models.heads import proposals as prop_lib
from pixelground.training import losses as L

if tp.TYPE_CHECKING:
  from pixelground.models.pixelllm import PixelLLMConfig


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Loss weights (SPEC §2): text CE (label smoothing over the other classes), point L1 × 0.1 on
  absolute pixels, LISA masks BCE × 2 + DICE × 0.5. `task_weights[i]` scales task i's text loss."""
  label_smoothing: float = 0.1
  point_weight: float = 0.1
  mask_bce_weight: float = 2.0
  mask_dice_weight: float = 0.5
  ref_focal_weight: float = 20.0   # PixelLLM referring segmentation: focal × 20 + dice + IoU MSE
  ref_dice_weight: float = 1.0
  ref_iou_weight: float = 1.0
  proposal_weight: float = 1.0     # heatmap focal + GIoU
  box_refine_weight: float = 0.1   # `box_refine`: L1 (pixels, as point_weight) of the refined boxes
  assoc_weight: float = 1.0        # GELLA: noun ↔ entity association BCE
  entity_bce_weight: float = 2.0   # GELLA entity masks: BCE + DICE against the input masks (LISA's)
  entity_dice_weight: float = 0.5
  # Demo aid (0 = off, as in the papers; needs PixelLLMConfig.spatial_tokens): −log of the attention
  # mass that head 0 of the last decoder cross-attention puts on the grid tokens inside each located
  # token's target box.
  attention_grounding_weight: float = 0.0
  task_weights: tuple[float, ...] = ()


def compute_losses(cfg: PixelLLMConfig, loss_cfg: LossConfig, out: dict[str, jax.Array],
                   batch: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(total loss, {term: value}) for a teacher-forced batch; every term is logged separately.

  Each term only sees the rows that carry its targets (masks in the batch), so mixed-task batches
  work: text on target_mask, points on token_box_valid, masks on seg_valid.
  """
  terms: dict[str, jax.Array] = {}
  total = jnp.zeros((), jnp.float32)
  if "logits" in out:  # absent for dense-captioning batches (no main caption)
    ce, per_example = L.text_cross_entropy(out["logits"], batch["target_ids"], batch["target_mask"],
                                           label_smoothing=loss_cfg.label_smoothing)
    if loss_cfg.task_weights and "task_id" in batch:
      w = jnp.asarray(loss_cfg.task_weights, jnp.float32)[batch["task_id"]]
      has = jnp.any(batch["target_mask"], axis=-1).astype(jnp.float32)
      ce = jnp.sum(w * per_example * has) / jnp.maximum(jnp.sum(has), 1.0)
    terms["text_ce"] = ce
    terms["token_accuracy"] = L.token_accuracy(out["logits"], batch["target_ids"], batch["target_mask"])
    total = total + ce
  if "points" in out and "token_boxes" in batch:  # single-task batches may lack other tasks' fields
    target_px = batch["token_boxes"].astype(jnp.float32) * cfg.image_size
    terms["point_l1"] = L.point_l1(out["points"], target_px, batch["token_box_valid"])
    total = total + loss_cfg.point_weight * terms["point_l1"]
    if loss_cfg.attention_grounding_weight and "spatial_attn" in out:
      terms["attention_grounding"] = L.attention_grounding(out["spatial_attn"], batch["token_boxes"],
                                                           batch["token_box_valid"])
      total = total + loss_cfg.attention_grounding_weight * terms["attention_grounding"]
  if cfg.box_refine and "object_box" in out and "token_boxes" in batch and "seg_valid" in batch:
    pos = out["object_box_pos"][:, None]
    rows = batch["seg_valid"][:, 0] & jnp.take_along_axis(batch["token_box_valid"], pos, axis=1)[:, 0]
    target = jnp.take_along_axis(batch["token_boxes"], pos[..., None], axis=1) * cfg.image_size
    preds = [out[k][:, None] for k in ("object_box", "object_box_from_target") if k in out]
    terms["box_refine_l1"] = sum(L.point_l1(p, target.astype(jnp.float32), rows[:, None])
                                 for p in preds) / len(preds)
    total = total + loss_cfg.box_refine_weight * terms["box_refine_l1"]
  if "seg_logits" in out and "seg_masks" in batch:
    masks = batch["seg_masks"].astype(jnp.float32)
    ignore = (jnp.broadcast_to(batch["ignore_mask"][:, None], masks.shape) if "ignore_mask" in batch
              else jnp.zeros(masks.shape, bool))
    valid = seg_rows(cfg, batch)
    bce = L.mask_bce(out["seg_logits"], masks, valid, ignore=ignore)
    dice = L.dice_loss(out["seg_logits"], masks, valid, ignore=ignore)
    terms.update(mask_bce=bce, mask_dice=dice)
    total = total + loss_cfg.mask_bce_weight * bce + loss_cfg.mask_dice_weight * dice
  if "assoc_logits" in out:
    entity_valid = batch["entity_valid"]
    terms["assoc_bce"] = L.association_bce(out["noun_proj"], out["entity_proj"], batch["association"],
                                           seg_rows(cfg, batch), entity_valid)
    emasks = batch["entity_masks"].astype(jnp.float32)
    terms["entity_bce"] = L.mask_bce(out["entity_logits"], emasks, entity_valid)
    terms["entity_dice"] = L.dice_loss(out["entity_logits"], emasks, entity_valid)
    total = (total + loss_cfg.assoc_weight * terms["assoc_bce"]
             + loss_cfg.entity_bce_weight * terms["entity_bce"]
             + loss_cfg.entity_dice_weight * terms["entity_dice"])
  if "region_logits" in out:
    valid = batch["region_valid"]
    terms.update(prop_lib.losses(out["heat"], out["ltrb"], batch["region_boxes"], valid))
    rids = batch["region_ids"]
    rmask = (rids != cfg.t5.pad_id) & valid[..., None]  # EOS (id 1) is a scored token, pad is not
    b, r, lr, v = out["region_logits"].shape
    terms["region_ce"], _ = L.text_cross_entropy(out["region_logits"].reshape(b * r, lr, v),
                                                 rids.reshape(b * r, lr), rmask.reshape(b * r, lr),
                                                 label_smoothing=loss_cfg.label_smoothing)
    total = (total + loss_cfg.proposal_weight * (terms["proposal_heatmap"] + terms["proposal_giou"])
             + terms["region_ce"])
  if "ref_logits" in out and "seg_masks" in batch:
    target = batch["seg_masks"][:, 0].astype(jnp.float32)
    valid = refseg_rows(cfg, batch)
    focal = L.sigmoid_focal_loss(out["ref_logits"], target, valid)
    rdice = L.dice_loss(out["ref_logits"], target, valid)
    riou = L.iou_mse(out["ref_iou"], out["ref_logits"], target, valid)
    terms.update(ref_focal=focal, ref_dice=rdice, ref_iou_mse=riou)
    total = (total + loss_cfg.ref_focal_weight * focal + loss_cfg.ref_dice_weight * rdice
             + loss_cfg.ref_iou_weight * riou)
  terms["total"] = total
  return total, terms


def seg_rows(cfg: PixelLLMConfig, batch: dict[str, jax.Array]) -> jax.Array:
  """(B, K) bool: `[SEG]` slots whose target token really is `[SEG]` (LISA / narrative grounding rows;
  a referring row's slot 0 marks its EOS for the box-prompted mask instead)."""
  at = jnp.take_along_axis(batch["target_ids"], batch["seg_positions"], axis=1)
  return batch["seg_valid"] & (at == cfg.seg_token_id)


def refseg_rows(cfg: PixelLLMConfig, batch: dict[str, jax.Array]) -> jax.Array:
  """(B,) bool: referring-segmentation rows (a mask target and a box target at the EOS, slot 0 pointing
  at the EOS — a LISA row with `TaskConfig.seg_boxes` has its box at a `[SEG]`, which is not EOS)."""
  at = jnp.take_along_axis(batch["target_ids"], batch["seg_positions"][:, :1], axis=1)[:, 0]
  return (batch["seg_valid"][:, 0] & jnp.any(batch["token_box_valid"], axis=-1)
          & (at == cfg.t5.eos_id))
