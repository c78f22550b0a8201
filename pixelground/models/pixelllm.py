"""PixelLLM (+ LISA's embedding-as-mask) composed from pixelground's parts (SPEC.md sections 1–2).

    image (B, S, S, 3) uint8, zero-padded, with its padding mask
      → SAM encoder (ImageNet-normalised)   (B, gs, gs, 256)    ┐ optional, frozen
      → EVA02 (CLIP-normalised)             (B, ge, ge, We)     ┘ optional, trained
      → fused map: SAM resized (bicubic) to the EVA grid, concatenated on channels  (B, g, g, C)
    prompt box (B, 4) normalised xyxy → SAM prompt encoder (frozen): 2 corner tokens + "no mask" map
      → prompt feature extractor: dense projections to W, 32 learned queries + prompt tokens through a
        two-way transformer over the fused map (+ its Fourier PE), per-query W → Hq, Hq → d_model, LN
      → 32 visual tokens (B, 32, d_model) [+ k² pooled image tokens with `spatial_tokens` = k (demo)]
    T5: encoder input = [visual tokens; embedded prompt text]; decoder (teacher-forced or cached)
      → logits, final hidden states h (B, T, d_model)
    location head: LN + 4-layer MLP on h → 2 points per token, (v+1)/2 × the unpadded input size, pixels
      [demo `pointer_head`: attention from h to the k² grid tokens; points = attended cell centre +
      v/2 × the unpadded size]
    LISA: h at each position that predicts `[SEG]` → Linear(d→d) → ReLU → Linear(d→256) → one sparse
      prompt of SAM's mask decoder (dense = "no mask") → one mask per `[SEG]`, upsampled to S×S.

Shapes: B batch, S input size (384), g fused grid (27 with EVA02-L/14 at 384; 24 with SAM only), T target
length, K `[SEG]` slots. Points/boxes are in absolute pixels of the S×S model input unless noted.
Images arrive as uint8 and are normalised here per encoder (4× less host→device traffic), padding
re-zeroed after normalisation.
"""

from __future__ import annotations

import dataclasses
import math
import typing as tp

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pixelground.config.parse import ModelConfig
from pixelground.models import eva02 as eva_lib
from pixelground.models import gella as gella_lib
from pixelground.models import sam_decoder as dec_lib
from pixelground.models import sam_encoder as sam_lib
from pixelground.models import t5 as t5_lib
from pixelground.models.extractor import PromptExtractor
from pixelground.models.heads import proposals as prop_lib
from pixelground.models.heads.box_refiner import BoxRefiner, ordered_box
from pixelground.models.heads.location import LocationHead
from pixelground.models.heads.mask_adapter import MaskAdapter
from pixelground.models.heads.mask_detail import MaskDetail
from pixelground.models.heads.seg_projection import SegProjection
from pixelground.models.layers import count_params
from pixelground.models.resize import resize_bicubic

IMAGENET_MEAN = np.asarray([123.675, 116.28, 103.53], np.float32)
IMAGENET_STD = np.asarray([58.395, 57.12, 57.375], np.float32)
CLIP_MEAN = np.asarray(eva_lib.CLIP_MEAN, np.float32) * 255.0
CLIP_STD = np.asarray(eva_lib.CLIP_STD, np.float32) * 255.0


@dataclasses.dataclass(frozen=True)
class PixelLLMConfig(ModelConfig):
  """PixelLLM hyper-parameters; each sub-model keeps its own config (and dtypes)."""
  image_size: int = 384
  sam: sam_lib.SamEncoderConfig | None = dataclasses.field(
      default_factory=lambda: sam_lib.preset("sam-vit-h"))
  eva: eva_lib.Eva02Config | None = dataclasses.field(
      default_factory=lambda: eva_lib.preset("eva02-l-14"))
  prompt: dec_lib.SamDecoderConfig = dataclasses.field(default_factory=dec_lib.SamDecoderConfig)
  t5: t5_lib.T5Config = dataclasses.field(default_factory=lambda: t5_lib.preset("flan-t5-xl"))
  num_queries: int = 32
  extractor_width: int = 512
  extractor_depth: int = 6
  extractor_heads: int = 8
  extractor_mlp: int = 2048
  query_hidden: int = 1024
  # From-scratch aids (all off in the paper configs; docs/demo.md explains each and what it measured).
  # spatial_tokens = k: the extractor's updated image tokens (+ PE + an (x, y) embedding), pooled to a
  # k×k grid, follow the queries into T5 — a decoder can then find an object in one attention hop.
  spatial_tokens: int = 0
  # pointer_head (needs spatial_tokens): the location head attends to the k×k grid tokens and predicts
  # its 2 points as offsets from the attended cell centre.
  pointer_head: bool = False
  # pointer_window = r (needs pointer_head): object boxes (the referring EOS box, a `[SEG]` box) at
  # evaluation read the pointer's attention only in the (2r + 1)² cells around its argmax, so
  # attention split between two objects points at one of them. Training keeps the full attention.
  pointer_window: int = 0
  # The box that prompts the referring-mask decoder in training: "predicted" (as at inference) or
  # "target" (ground truth: a from-scratch mask decoder fed poor boxes learns to ignore its prompt).
  refseg_train_box: str = "predicted"
  # `[SEG]` masks also prompted with the box the location head predicts at the `[SEG]` token
  # ("predicted"), or with the ground-truth box in training ("target", `TaskConfig.seg_boxes`).
  seg_box_prompt: str = ""
  # mask_detail = C: a high-resolution image branch (3×3 conv, then a patch conv to the mask decoder's
  # output grid) that the hypernetworks read beside the upscaled embedding (HQ-SAM's early fusion).
  mask_detail: int = 0
  # Ground-truth box prompts ("target" above) jittered by N(0, (noise × box side)²) per corner in
  # training, as SAM trains its box prompts, so the decoder learns from imprecise boxes.
  train_box_noise: float = 0.0
  # box_refine = n: a conv net on an n×n crop of the image around each object box, with the box's
  # decoder state, regresses a correction (trained on its own L1); both mask prompts read the result.
  box_refine: int = 0
  loc_hidden: int = 512
  loc_layers: int = 4
  lisa: bool = False          # `[SEG]` → SAM mask decoder path (needs `sam`)
  refseg: bool = False        # referring segmentation: predicted box → SAM mask decoder (+ adapter)
  adapter_depth: int = 2
  adapter_heads: int = 8
  proposals: bool = False     # dense captioning: class-agnostic proposal head + per-region captions
  proposal_width: int = 256
  # GELLA (SPEC 1.10): entity masks → colormap → Swin → ResoBlend into the fused map; entity decoder and
  # noun ↔ entity association (`pixelground.models.gella`).
  gella: gella_lib.GellaConfig | None = None
  seg_token_id: int = -1      # the tokenizer's `[SEG]` id (LISA)
  dtype: str = "float32"
  param_dtype: str = "float32"

  def __post_init__(self):
    if self.sam is None and self.eva is None:
      raise ValueError("PixelLLMConfig: at least one image encoder (sam or eva) is needed.")
    if self.refseg and self.sam is None:
      raise ValueError("PixelLLMConfig: refseg=True needs the SAM encoder.")
    if self.lisa and self.sam is None:
      raise ValueError("PixelLLMConfig: lisa=True needs the SAM encoder (its mask decoder reads SAM's "
                       "image embedding).")
    if self.lisa and self.seg_token_id < 0:
      raise ValueError("PixelLLMConfig: lisa=True needs seg_token_id (the tokenizer's [SEG] id).")
    if self.sam is not None and self.sam.out_channels != self.prompt.prompt_dim:
      raise ValueError(f"PixelLLMConfig: SAM out_channels {self.sam.out_channels} must equal the "
                       f"prompt dim {self.prompt.prompt_dim}.")
    if self.spatial_tokens < 0 or (self.spatial_tokens and self.grid % self.spatial_tokens):
      raise ValueError(f"PixelLLMConfig: spatial_tokens {self.spatial_tokens} must divide the feature "
                       f"grid {self.grid}.")
    if self.refseg_train_box not in ("predicted", "target"):
      raise ValueError(f"PixelLLMConfig: refseg_train_box {self.refseg_train_box!r} must be "
                       "'predicted' or 'target'.")
    if self.seg_box_prompt not in ("", "predicted", "target"):
      raise ValueError(f"PixelLLMConfig: seg_box_prompt {self.seg_box_prompt!r} must be '', "
                       "'predicted' or 'target'.")
    if self.mask_detail < 0 or (self.mask_detail and (
        self.sam is None or self.image_size % (4 * self.sam_grid))):
      raise ValueError(f"PixelLLMConfig: mask_detail {self.mask_detail} needs the SAM encoder and "
                       f"image_size {self.image_size} divisible by 4 × the SAM grid {self.sam_grid}.")
    if not 0.0 <= self.train_box_noise <= 1.0:
      raise ValueError(f"PixelLLMConfig: train_box_noise {self.train_box_noise} must be in [0, 1].")
    if self.box_refine < 0 or self.box_refine % 4 or (self.box_refine and self.sam is None):
      raise ValueError(f"PixelLLMConfig: box_refine {self.box_refine} must be 0 or a multiple of 4, "
                       "and needs the SAM encoder (it reads SAM's normalised pixels).")
    if self.pointer_window < 0 or (self.pointer_window and not self.pointer_head):
      raise ValueError(f"PixelLLMConfig: pointer_window {self.pointer_window} needs pointer_head.")
    if self.pointer_head and not self.spatial_tokens:
      raise ValueError("PixelLLMConfig: pointer_head=True needs spatial_tokens (the grid it points at).")
    if self.prompt.image_size != self.image_size:
      raise ValueError(f"PixelLLMConfig: prompt.image_size {self.prompt.image_size} must equal "
                       f"image_size {self.image_size} (prompt boxes are in model-input pixels).")

  @property
  def sam_grid(self) -> int:
    return self.image_size // self.sam.patch_size if self.sam else 0

  @property
  def eva_grid(self) -> int:
    return self.image_size // self.eva.patch_size if self.eva else 0

  @property
  def grid(self) -> int:
    """The fused map's grid: EVA02's when present (SAM is resized to it), else SAM's."""
    return self.eva_grid or self.sam_grid

  @property
  def num_visual_tokens(self) -> int:
    """Tokens in front of T5's prompt text: the queries, then the k×k grid tokens (`spatial_tokens`)."""
    return self.num_queries + self.spatial_tokens ** 2

  @property
  def feature_dim(self) -> int:
    return (self.sam.out_channels if self.sam else 0) + (self.eva.width if self.eva else 0)


EntityState = gella_lib.EntityState


class MaskFeatures(tp.NamedTuple):
  """What SAM's mask decoder reads of an image: `emb` the SAM embedding (B, gs, gs, P) and, with
  `mask_detail` or `box_refine`, `pixels` the normalised input (B, S, S, 3) the detail branch and the
  box refiner read (else None; both run only where their output is used)."""
  emb: jax.Array
  pixels: jax.Array | None = None


def jitter_boxes(rng: jax.Array, boxes: jax.Array, noise: float, size: int) -> jax.Array:
  """boxes (..., 4) [x0, y0, x1, y1] pixels → each coordinate + N(0, (noise × that axis's side)²),
  clipped to [0, size] (`train_box_noise`)."""
  side = jnp.abs(boxes[..., 2:] - boxes[..., :2])
  side = jnp.concatenate([side, side], axis=-1)
  return jnp.clip(boxes + noise * side * jax.random.normal(rng, boxes.shape, boxes.dtype), 0.0, size)


def _normalise(image: jax.Array, mask: jax.Array, mean: np.ndarray, std: np.ndarray) -> jax.Array:
  x = (image.astype(jnp.float32) - mean) / std
  return jnp.where(mask[..., None], x, 0.0)


def valid_size(image_mask: jax.Array) -> jax.Array:
  """(B, S, S) padding mask (content top-left) → (B, 2) [width, height] of the content in pixels."""
  w = jnp.sum(image_mask[:, 0, :], axis=-1)
  h = jnp.sum(image_mask[:, :, 0], axis=-1)
  return jnp.stack([w, h], axis=-1).astype(jnp.float32)


class PixelLLM(nnx.Module):
  """The model; see the module docstring. Sub-modules: sam_encoder (optional), eva (optional),
  prompt_encoder, extractor, t5, loc_head, and with `lisa` seg_proj + mask_decoder."""

  def __init__(self, cfg: PixelLLMConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.sam_encoder = sam_lib.SamImageEncoder(cfg.sam, rngs=rngs) if cfg.sam else None
    self.eva = eva_lib.Eva02(cfg.eva, rngs=rngs) if cfg.eva else None
    self.prompt_encoder = dec_lib.PromptEncoder(cfg.prompt, rngs=rngs)
    self.extractor = PromptExtractor(cfg, rngs=rngs)
    self.t5 = t5_lib.T5(cfg.t5, rngs=rngs)
    common = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, rngs=rngs)
    self.loc_head = LocationHead(cfg.t5.d_model, cfg.loc_hidden, cfg.loc_layers,
                                 pointer=cfg.pointer_head, window=cfg.pointer_window, **common)
    self.seg_proj = (SegProjection(cfg.t5.d_model, cfg.prompt.prompt_dim, **common) if cfg.lisa
                     else None)
    self.mask_adapter = MaskAdapter(cfg, rngs=rngs) if cfg.refseg else None
    self.proposal_head = (prop_lib.ProposalHead(cfg.feature_dim, cfg.proposal_width, **common)
                          if cfg.proposals else None)
    masks = cfg.lisa or cfg.refseg
    self.mask_decoder = (dec_lib.MaskDecoder(cfg.prompt, detail_channels=cfg.mask_detail, rngs=rngs)
                         if masks else None)
    self.mask_detail = MaskDetail(cfg, rngs=rngs) if masks and cfg.mask_detail else None
    self.box_refiner = BoxRefiner(cfg, rngs=rngs) if cfg.box_refine else None
    self.gella = (gella_lib.Gella(cfg.gella, cfg.feature_dim, cfg.t5.d_model, cfg.prompt.prompt_dim,
                                  rngs=rngs) if cfg.gella else None)

  # -- vision ----------------------------------------------------------------------------------------
  def image_features(self, image: jax.Array, image_mask: jax.Array, *, rng: jax.Array | None = None
                     ) -> tuple[jax.Array, MaskFeatures | None]:
    """image (B, S, S, 3) uint8/float 0–255, image_mask (B, S, S) bool → (fused (B, g, g, C),
    `MaskFeatures` (SAM embedding (B, gs, gs, 256) [+ the normalised pixels for `mask_detail`]) or None
    without SAM). `rng` turns on EVA02's drop path."""
    if image.ndim != 4 or image.shape[-1] != 3 or image.shape[1:3] != (self.cfg.image_size,) * 2:
      raise ValueError(f"PixelLLM expects images (B, {self.cfg.image_size}, {self.cfg.image_size}, 3), "
                       f"got {image.shape}.")
    parts, sam = [], None
    if self.sam_encoder is not None:
      pixels = _normalise(image, image_mask, IMAGENET_MEAN, IMAGENET_STD)
      keep = self.mask_detail is not None or self.box_refiner is not None
      sam = MaskFeatures(self.sam_encoder(pixels), pixels if keep else None)
      parts.append(sam.emb)
    if self.eva is not None:
      eva = self.eva(_normalise(image, image_mask, CLIP_MEAN, CLIP_STD), rng=rng)
      if parts:
        parts[0] = resize_bicubic(parts[0], eva.shape[1:3])
      parts.append(eva)
    return jnp.concatenate(parts, axis=-1), sam

  def visual_tokens(self, fused: jax.Array, prompt_box: jax.Array) -> jax.Array:
    """fused (B, g, g, C); prompt_box (B, 4) normalised xyxy of the S×S input → (B, Q [+ k²], d_model)
    (see `spatial_tokens`)."""
    g = fused.shape[1:3]
    boxes = prompt_box.astype(jnp.float32) * self.cfg.image_size
    sparse, dense = self.prompt_encoder(boxes=boxes, grid=g)
    pe = self.prompt_encoder.pe.dense_pe(g)
    return self.extractor(fused, pe, sparse, dense)

  def features(self, batch: dict[str, jax.Array], *, rng: jax.Array | None = None
               ) -> tuple[jax.Array, MaskFeatures | None, EntityState | None]:
    """`image_features`, then with GELLA the entity colormap blended in: → (fused (B, g, g, C),
    `MaskFeatures` or None, `EntityState` or None). Entities are `entity_masks` (B, E, S, S) /
    `entity_valid` (B, E) of the batch; a batch without them (other tasks) or a row without a valid
    entity keeps the plain image features (as at inference). Colours come from `rng` (training) or a
    fixed key (evaluation: the same colours for the same entity slots every run)."""
    fused, sam = self.image_features(batch["image"], batch["image_mask"], rng=rng)
    if self.gella is None or "entity_masks" not in batch:
      return fused, sam, None
    masks = batch["entity_masks"]
    valid = batch.get("entity_valid", jnp.any(masks, axis=(2, 3)))
    rows = jnp.any(valid, axis=1)[:, None, None, None]  # the rows GELLA handles
    if self.cfg.gella.detach_sam and sam is not None:  # SAM's channels lead the fused map
      fused = gella_lib.detach_leading(fused, sam.emb.shape[-1], rows)
    key = jax.random.fold_in(rng, 7) if rng is not None else jax.random.key(0)
    pyramid = self.gella.encode_colormap(masks, valid, key)
    pe = self.gella.blend_pe(self.prompt_encoder.pe.dense_pe(fused.shape[1:3]))
    blended_fused, blended = self.gella.resoblend(fused, pyramid, pe)
    shapes = self.gella.shape_codes(masks, valid) if self.cfg.gella.shape_stem else None
    if self.cfg.gella.shape_blend:
      blended_fused = self.gella.blend_shapes(blended_fused, shapes, masks)
    fused = jnp.where(rows, blended_fused, fused)
    pixels = (_normalise(batch["image"], batch["image_mask"], IMAGENET_MEAN, IMAGENET_STD)
              if self.cfg.gella.image_stem else None)
    state = EntityState(blended, pyramid[0], masks, valid, pixels, shapes)
    if self.cfg.gella.entity_tokens:
      state = state._replace(decoded=self._decode_entities(state))
    return fused, sam, state

  def prefix(self, fused: jax.Array, prompt_box: jax.Array, entities: EntityState | None
             ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """→ (visual tokens (B, Q + k², d), T5 prefix (B, P, d), its mask (B, P) or None = all): the visual
    tokens, with GELLA's `entity_tokens` one token per entity slot after them (empty ones masked)."""
    visual = self.visual_tokens(fused, prompt_box)
    if entities is None or entities.decoded is None:
      return visual, visual, None
    tokens = self.gella.token_proj(entities.decoded[0]).astype(visual.dtype)
    mask = jnp.concatenate([jnp.ones(visual.shape[:2], bool), entities.valid], axis=1)
    return visual, jnp.concatenate([visual, tokens], axis=1), mask

  def _encode(self, batch: dict[str, jax.Array], *, rng: jax.Array | None = None):
    fused, sam, entities = self.features(batch, rng=rng)
    visual, prefix, prefix_mask = self.prefix(fused, batch["prompt_box"], entities)
    ids = batch["prompt_ids"]
    enc, mask = self.t5.encode(ids, ids != self.cfg.t5.pad_id, prefix_embeds=prefix,
                               prefix_mask=prefix_mask)
    return enc, mask, sam, visual, fused, entities

  def encode(self, batch: dict[str, jax.Array], *, rng: jax.Array | None = None):
    """→ (encoder_out (B, Q + Le, d), encoder_mask (B, Q + Le), `MaskFeatures` or None, visual tokens,
    fused map)."""
    return self._encode(batch, rng=rng)[:5]

  # -- GELLA -----------------------------------------------------------------------------------------
  def entity_outputs(self, entities: EntityState) -> tuple[jax.Array, jax.Array]:
    """→ (entity embeddings Evc (B, E, D), entity mask logits (B, E, S, S) float32, bilinear from the
    decoder's h×h grid)."""
    emb, logits = entities.decoded or self._decode_entities(entities)
    b, e = logits.shape[:2]
    s = self.cfg.image_size
    return emb, jax.image.resize(logits, (b, e, s, s), "bilinear")

  def _decode_entities(self, entities: EntityState) -> tuple[jax.Array, jax.Array]:
    e, pe = entities, self.prompt_encoder.pe.dense_pe
    return self.gella.entity_decoder(e.level0, e.blended, e.masks, e.valid, pe(e.level0.shape[1:3]),
                                     pe(e.blended.shape[1:3]), e.pixels, e.shapes)

  def associate(self, hidden: jax.Array, positions: jax.Array, entity_emb: jax.Array
                ) -> tuple[jax.Array, jax.Array]:
    """hidden (B, T, d) decoder states, positions (B, K) of the `[SEG]`-predicting steps, Evc (B, E, D)
    → projected nouns (B, K, A) and entities (B, E, A) float32 (logits = `gella.association_logits`).
    With `GellaConfig.noun_pool` a noun is the mean of its phrase's states (`gella.phrase_states`)."""
    if self.cfg.gella.noun_pool:
      nouns = gella_lib.phrase_states(hidden, positions)
    else:
      nouns = jnp.take_along_axis(hidden, positions[..., None], axis=1)
    return self.gella.association(nouns, entity_emb)

  def region_captions(self, fused: jax.Array, boxes: jax.Array, prompt_ids: jax.Array,
                      region_ids: jax.Array) -> jax.Array:
    """Teacher-forced captions of R regions per image: fused (B, g, g, C), boxes (B, R, 4) normalised,
    prompt_ids (B, Le), region_ids (B, R, Lr) → logits (B, R, Lr, V)."""
    b, r = boxes.shape[:2]
    visual = self.visual_tokens(jnp.repeat(fused, r, axis=0), boxes.reshape(b * r, 4))
    ids = jnp.repeat(prompt_ids, r, axis=0)
    enc, mask = self.t5.encode(ids, ids != self.cfg.t5.pad_id, prefix_embeds=visual)
    targets = region_ids.reshape(b * r, -1)
    start = jnp.full((b * r, 1), self.cfg.t5.decoder_start_id, targets.dtype)
    logits, _ = self.t5.decode(jnp.concatenate([start, targets[:, :-1]], axis=1), enc, mask)
    return logits.reshape(b, r, targets.shape[-1], -1)

  # -- heads -----------------------------------------------------------------------------------------
  def points(self, hidden: jax.Array, image_mask: jax.Array, visual: jax.Array | None = None, *,
             local: bool = False) -> jax.Array:
    """hidden (B, T, d) → (B, T, 4) [x0, y0, x1, y1] absolute pixels of the unpadded input. `visual`
    (B, Q + k², d): the visual tokens, needed with `pointer_head`; `local` as in `locate`."""
    return self.locate(hidden, image_mask, visual, local=local)[0]

  def locate(self, hidden: jax.Array, image_mask: jax.Array, visual: jax.Array | None = None, *,
             local: bool = False) -> tuple[jax.Array, jax.Array | None]:
    """→ (points as in `points`, the pointer's attention (B, T, k²) or None without `pointer_head`).
    Without the pointer a token's points are (v + 1) / 2 × the unpadded size; with it they are the
    attended cell centre (pixels of the S×S input) + v / 2 × the unpadded size. `local`: object boxes
    at evaluation — the pointer reads only its `pointer_window` around the argmax."""
    size = valid_size(image_mask)  # (B, 2) [w, h]
    scale = jnp.concatenate([size, size], axis=-1)[:, None, :]
    if not self.cfg.pointer_head:
      return (self.loc_head(hidden)[0] + 1.0) * 0.5 * scale, None
    if visual is None:
      raise ValueError("PixelLLM.points: pointer_head needs the visual tokens (`visual`).")
    grid = visual[:, self.cfg.num_queries:self.cfg.num_visual_tokens]
    v, probs, centre = self.loc_head(hidden, grid, local=local)
    c = (jnp.concatenate([centre, centre], axis=-1) + 1.0) * 0.5 * self.cfg.image_size
    return c + v * 0.5 * scale, probs

  def decoded_seg_masks(self, hidden: jax.Array, positions: jax.Array, sam: MaskFeatures,
                        visual: jax.Array, image_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`seg_masks` for a decoded sequence: with `seg_box_prompt` the boxes are the location head's
    (`points` of `hidden`; `visual` and `image_mask` as there)."""
    hidden = hidden.astype(jnp.float32)
    boxes = self.points(hidden, image_mask, visual, local=True) if self.cfg.seg_box_prompt else None
    return self.seg_masks(hidden, positions, sam, boxes=boxes)

  def seg_masks(self, hidden: jax.Array, positions: jax.Array, sam: MaskFeatures, *,
                boxes: jax.Array | None = None) -> jax.Array:
    """LISA masks: hidden (B, T, d), positions (B, K) of the `[SEG]`-predicting steps, `MaskFeatures`
    of the images → mask logits (B, K, S, S) (bilinear from SAM's 4× grid) and IoU (B, K). With
    `seg_box_prompt`, `boxes` (B, T, 4) [x0, y0, x1, y1] model-input pixels (`points`) are needed: the
    box at each `[SEG]` step prompts its mask too."""
    b, k = positions.shape
    h = jnp.take_along_axis(hidden, positions[..., None], axis=1)  # (B, K, d)
    prompt = self.seg_proj(h).reshape(b * k, 1, -1)
    if self.cfg.seg_box_prompt:
      if boxes is None:
        raise ValueError("PixelLLM.seg_masks: seg_box_prompt needs the per-token boxes (`boxes`).")
      box = jnp.take_along_axis(boxes, positions[..., None], axis=1).reshape(b * k, 4)
      if self.box_refiner is not None:
        box = self.box_refiner(box, h.reshape(b * k, -1), jnp.repeat(sam.pixels, k, axis=0))
      corners = self.prompt_encoder.embed_boxes(ordered_box(jax.lax.stop_gradient(box)))
      prompt = jnp.concatenate([prompt, corners.astype(prompt.dtype)], axis=1)  # (B·K, 3, P)
    gs = sam.emb.shape[1:3]
    emb = jnp.repeat(sam.emb, k, axis=0)
    detail = self._detail(sam)
    detail = None if detail is None else jnp.repeat(detail, k, axis=0)
    dense = jnp.broadcast_to(self.prompt_encoder.no_mask_embed[...].astype(emb.dtype),
                             emb.shape[:3] + (emb.shape[-1],))
    pe = self.prompt_encoder.pe.dense_pe(gs)
    masks, iou = self.mask_decoder(emb, pe, prompt, dense, multimask_output=False, detail=detail)
    s = self.cfg.image_size
    masks = jax.image.resize(masks[:, 0].astype(jnp.float32), (b * k, s, s), "bilinear")
    return masks.reshape(b, k, s, s), iou.reshape(b, k)

  # -- teacher-forced forward ------------------------------------------------------------------------
  def __call__(self, batch: dict[str, jax.Array], *, rng: jax.Array | None = None,
               heads: tp.Collection[str] | None = None, train: bool = False) -> dict[str, jax.Array]:
    """Teacher-forced outputs for a training batch (fields of `pixelground.data.tasks.schema`):
    logits (B, T, V) f32, hidden (B, T, d), points (B, T, 4) pixels; with the "lisa" head seg_logits
    (B, K, S, S) and seg_iou (B, K); "refseg": ref_logits (B, S, S), ref_iou (B,); "proposals": heat,
    ltrb, region_logits (B, R, Lr, V).

    `heads` picks which of the configured heads run (see `TASK_HEADS`: a single-task batch only pays for
    its own); None runs every configured head whose inputs are in the batch. Without `target_ids`
    (dense captioning) the main caption decode is skipped. `train` (the trainer's loss) lets
    `refseg_train_box` / `seg_box_prompt` = "target" prompt the referring / `[SEG]` masks with the
    ground-truth boxes (moved by `train_box_noise` when `rng` is given; `rng` also drives EVA02's drop
    path)."""
    enabled = self.heads if heads is None else set(heads) & self.heads
    enc, enc_mask, sam, visual, fused, entities = self._encode(batch, rng=rng)
    out: dict[str, jax.Array] = {}
    if "target_ids" in batch:
      targets = batch["target_ids"]
      start = jnp.full(targets.shape[:1] + (1,), self.cfg.t5.decoder_start_id, targets.dtype)
      dec_in = jnp.concatenate([start, targets[:, :-1]], axis=1)
      if self.cfg.spatial_tokens and not self.cfg.pointer_head:  # for the optional grounding loss
        logits, hidden, probs = self.t5.decode(dec_in, enc, enc_mask, cross_probs=True)
        grid = slice(self.cfg.num_queries, self.cfg.num_visual_tokens)
        out["spatial_attn"] = probs[:, 0, :, grid]  # head 0 over the k×k grid tokens (B, T, k²)
      else:
        logits, hidden = self.t5.decode(dec_in, enc, enc_mask)
      points, pointer = self.locate(hidden, batch["image_mask"], visual)
      if pointer is not None:
        out["spatial_attn"] = pointer  # the location head's own attention (B, T, k²)
      out.update(logits=logits, hidden=hidden, points=points)
      # Object boxes (referring, `[SEG]`): at evaluation through the `pointer_window`.
      objects = (self.points(hidden, batch["image_mask"], visual, local=True)
                 if self.cfg.pointer_window and not train else points)
      # Per-token boxes with the ground truth where the row has one (the "target" training prompts).
      targeted = objects
      if train and "token_boxes" in batch:
        has = batch["token_box_valid"][..., None] & jnp.any(batch["token_boxes"] != 0, -1, keepdims=True)
        gt = batch["token_boxes"].astype(jnp.float32) * self.cfg.image_size
        if self.cfg.train_box_noise and rng is not None:
          gt = jitter_boxes(jax.random.fold_in(rng, 1), gt, self.cfg.train_box_noise, self.cfg.image_size)
        targeted = jnp.where(has, gt, points)
      if "refbox" in enabled:
        # The object box's token: the `[SEG]` (LISA rows) or the EOS (referring: slot 0 marks it).
        pos = (batch["seg_positions"][:, 0] if "seg_positions" in batch
               else jnp.sum(batch["target_mask"], axis=-1).astype(jnp.int32) - 1)
        at = lambda x: jnp.take_along_axis(x, pos[:, None, None], axis=1)[:, 0]
        state = jax.lax.stop_gradient(at(hidden))  # a second stage: it leaves the first alone
        out["object_box_pos"] = pos
        out["object_box"] = (self.box_refiner(at(objects), state, sam.pixels)
                             if self.box_refiner is not None else ordered_box(at(objects)))
        if train and "token_boxes" in batch and self.box_refiner is not None:  # small errors too
          out["object_box_from_target"] = self.box_refiner(at(targeted), state, sam.pixels)
      if "lisa" in enabled and "seg_positions" in batch:
        boxes = targeted if self.cfg.seg_box_prompt == "target" else objects
        out["seg_logits"], out["seg_iou"] = self.seg_masks(hidden, batch["seg_positions"], sam,
                                                           boxes=boxes)
      if "refseg" in enabled:
        eos = jnp.sum(batch["target_mask"], axis=-1).astype(jnp.int32) - 1
        boxes = targeted if self.cfg.refseg_train_box == "target" else objects
        box = jnp.take_along_axis(boxes, eos[:, None, None], axis=1)[:, 0]
        if "object_box" in out:  # refined (its copy from the ground truth in "target" training)
          use_target = (train and self.cfg.refseg_train_box == "target"
                        and "object_box_from_target" in out)
          box = out["object_box_from_target"] if use_target else out["object_box"]
        out["ref_logits"], out["ref_iou"] = self.box_mask(box, visual, hidden, sam)
      if "gella" in enabled and "entity_masks" in batch and "seg_positions" in batch:
        emb, out["entity_logits"] = self.entity_outputs(entities)
        out["noun_proj"], out["entity_proj"] = self.associate(hidden, batch["seg_positions"], emb)
        out["assoc_logits"] = gella_lib.association_logits(out["noun_proj"], out["entity_proj"])
    if "proposals" in enabled and "region_boxes" in batch:
      out["heat"], out["ltrb"] = self.proposal_head(fused)
      out["region_logits"] = self.region_captions(fused, batch["region_boxes"], batch["prompt_ids"],
                                                  batch["region_ids"])
    return out

  @property
  def heads(self) -> set[str]:
    """The optional heads this model was built with."""
    return {h for h, on in (("lisa", self.cfg.lisa), ("refseg", self.cfg.refseg),
                            ("proposals", self.cfg.proposals), ("gella", self.cfg.gella),
                            ("refbox", self.cfg.box_refine or self.cfg.pointer_window)) if on}


  def _detail(self, sam: MaskFeatures) -> jax.Array | None:
    """The mask decoder's `mask_detail` map (B, 4gs, 4gs, C), or None without it."""
    return None if self.mask_detail is None else self.mask_detail(sam.pixels)

  def box_mask(self, box: jax.Array, visual: jax.Array, hidden: jax.Array, sam: MaskFeatures
               ) -> tuple[jax.Array, jax.Array]:
    """Referring segmentation (SPEC 1.8): the predicted box (B, 4) [x0, y0, x1, y1] model-input pixels
    (gradient stopped: the box head trains on its own L1) prompts SAM's mask decoder, its 2 corner
    tokens shifted by the gated adapter → (mask logits (B, S, S), IoU (B,))."""
    b = box.shape[0]
    sparse = self.prompt_encoder.embed_boxes(ordered_box(jax.lax.stop_gradient(box)))  # (B, 2, P)
    sparse = sparse + self.mask_adapter(visual, hidden).astype(sparse.dtype)
    gs = sam.emb.shape[1:3]
    dense = jnp.broadcast_to(self.prompt_encoder.no_mask_embed[...].astype(sam.emb.dtype),
                             sam.emb.shape)
    masks, iou = self.mask_decoder(sam.emb, self.prompt_encoder.pe.dense_pe(gs), sparse, dense,
                                   multimask_output=False, detail=self._detail(sam))
    s = self.cfg.image_size
    return jax.image.resize(masks[:, 0].astype(jnp.float32), (b, s, s), "bilinear"), iou[:, 0]


def param_counts(cfg: PixelLLMConfig, trainable: tp.Any = None) -> dict[str, tp.Any]:
  """Parameter counts from `nnx.eval_shape` (nothing allocated): {"parts": {top-level part: n},
  "lora", "t5_base", "total", "trainable"} — `trainable` is an NNX filter (default `trainable_filter()`).
  LoRA factors are `nnx.LoRAParam` (a Param subclass): counted inside "t5" and on their own."""
  model = nnx.eval_shape(lambda: PixelLLM(cfg, rngs=nnx.Rngs(0)))
  parts: dict[str, int] = {}
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    parts[str(path[0])] = parts.get(str(path[0]), 0) + math.prod(var.shape)
  lora = count_params(model, nnx.LoRAParam)
  return {"parts": parts, "lora": lora, "t5_base": parts.get("t5", 0) - lora,
          "total": sum(parts.values()),
          "trainable": count_params(model, trainable if trainable is not None else trainable_filter())}


def referring_box(out: dict[str, jax.Array], batch: dict[str, jax.Array]) -> jax.Array:
  """The referring box (B, 4) [x0, y0, x1, y1] model-input pixels of a referring batch's teacher-forced
  outputs `out`: the object box where the model made one (refined with `box_refine`, through the
  `pointer_window` at evaluation), else the location head's point pair at the EOS."""
  if "object_box" in out:
    return out["object_box"]
  eos = jnp.maximum(jnp.sum(batch["target_mask"], axis=-1).astype(jnp.int32) - 1, 0)
  return jnp.take_along_axis(out["points"], eos[:, None, None], axis=1)[:, 0]


# Heads each task needs (`PixelLLM.__call__(batch, heads=...)`); anything else is not computed.
TASK_HEADS = {"ln": (), "caption": (), "web_caption": (), "region_caption": (),
              "referring": ("refseg", "refbox"),
              "reason_seg": ("lisa", "refbox"), "referring_seg": ("lisa", "refbox"),
              "narrative_grounding": ("gella",), "panoptic": ("gella",),
              "dense_caption": ("proposals",)}


# Trained in the PixelLLM LN/referring recipes (SPEC §3): EVA02, the prompt extractor (+ projection),
# the location head (+ its box refiner), LoRA factors; the LISA projection and mask decoder (+ its
# detail branch) when present. Everything else (SAM encoder, prompt encoder, T5 base weights) is frozen.
TRAINABLE = (r"^eva\.", r"^extractor\.", r"^loc_head\.", r"^box_refiner\.", r"^seg_proj\.",
             r"^mask_decoder\.", r"^mask_detail\.", r"^mask_adapter\.", r"^proposal_head\.",
             r"^gella\.")


def trainable_filter(patterns: tp.Sequence[str] = TRAINABLE, *, lora: bool = True):
  """An NNX filter: Params whose dotted path matches one of `patterns`, plus every `nnx.LoRAParam`
  when `lora`. Use as `nnx.Optimizer(model, tx, wrt=trainable_filter())`: frozen weights then carry
  no optimizer state and get no gradients."""
  import re

  regs = [re.compile(p) for p in patterns]

  def keep(path, value) -> bool:
    if lora and isinstance(value, nnx.LoRAParam):
      return True
    if not isinstance(value, nnx.Param):
      return False
    name = ".".join(str(p) for p in path)
    return any(r.search(name) for r in regs)

  return keep


def tiny_config(*, vocab_size: int, seg_token_id: int = -1, lisa: bool = False, image_size: int = 64,
                use_sam: bool = True, use_eva: bool = True, refseg: bool = False,
                proposals: bool = False, gella: bool = False) -> PixelLLMConfig:
  """A CPU-sized PixelLLM for tests and the demo: the same structure, every width tiny."""
  grid = image_size // 16
  sam = (sam_lib.SamEncoderConfig(image_size=image_size, width=32, depth=2, num_heads=2, window_size=2,
                                  global_blocks=(1,), out_channels=32) if use_sam else None)
  eva = (eva_lib.Eva02Config(image_size=(image_size // 14) * 14, width=32, depth=2, num_heads=2,
                             mlp_dim=64, rope_ref_grid=image_size // 14) if use_eva else None)
  prompt = dec_lib.SamDecoderConfig(prompt_dim=32, grid_size=grid, image_size=image_size,
                                    mask_in_chans=8, depth=2, num_heads=2, mlp_dim=64,
                                    iou_head_hidden=32)
  t5 = t5_lib.T5Config(vocab_size=vocab_size, d_model=64, num_heads=2, head_dim=32, d_ff=128,
                       num_encoder_layers=2, num_decoder_layers=2, lora_rank=8, lora_alpha=16.0,
                       lora_targets=t5_lib.LORA_TARGETS)
  return PixelLLMConfig(image_size=image_size, sam=sam, eva=eva, prompt=prompt, t5=t5, num_queries=8,
                        extractor_width=32, extractor_depth=2, extractor_heads=2, extractor_mlp=64,
                        query_hidden=48, loc_hidden=32, lisa=lisa, seg_token_id=seg_token_id,
                        refseg=refseg, adapter_heads=2, proposals=proposals, proposal_width=32,
                        gella=gella_lib.tiny_gella(image_size) if gella else None)
