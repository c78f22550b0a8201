"""Per-task converters: a decoded TFDS example → the fixed-shape arrays one training row needs (SPEC §2).

Every converter returns a subset of one schema (`schema(cfg)`); `pixelground.data.pipeline.Loader`
fills the rest with zeros and adds `task_id`, so all tasks share one compiled train step. Fields
(S = cfg.image_size, Le = cfg.max_prompt_len, Lt = cfg.max_target_len, K = cfg.max_seg,
E = cfg.max_entities; boxes are [x0, y0, x1, y1] NORMALISED to the S×S output canvas):

  image            (S, S, 3) uint8    transformed image, zero padding (the model normalises per encoder)
                                      — or image_sam / image_clip (S, S, 3) f32 with `host_normalize`
  image_mask       (S, S) bool        True on real pixels
  prompt_box       (4,) f32           the prompt box (whole valid image, or the GT region)
  prompt_ids       (Le,) i32          encoder text (task template / question), pad 0, no EOS
  target_ids       (Lt,) i32          decoder target, ends in EOS, pad 0
  target_mask      (Lt,) bool         loss mask of target tokens (EOS included)
  token_boxes      (Lt, 4) f32        per-token box target (LN trace boxes; referring: at the EOS)
  token_box_valid  (Lt,) bool
  seg_positions    (K,) i32           positions of `[SEG]` tokens in target_ids (0 where unused)
  seg_masks        (K, S, S) bool     the mask each `[SEG]` must produce
  seg_valid        (K,) bool
  ignore_mask      (S, S) bool        pixels excluded from mask losses (ReasonSeg "ignore")
  entity_masks     (E, S, S) bool     narrative grounding: one mask per panoptic segment (entity)
  entity_valid     (E,) bool
  entity_ids       (E,) i32           the panoptic segment id in each entity slot (0 = none): scoring
                                      maps slots back to the original image's segments
  association      (K, E) bool        [SEG] noun k ↔ entity e ground truth
  region_boxes     (R, 4) f32         dense captioning: GT regions (matched to proposals by the model)
  region_ids       (R, Lr) i32        their captions (EOS-terminated, pad 0)
  region_valid     (R,) bool

Training draws a random-ratio resize + crop (+ optional flip, refused for text that cannot be
mirrored); evaluation resizes the long side and pads. Templates are picked with the row's rng.
"""

from __future__ import annotations

import dataclasses
import typing as tp

import numpy as np

from pixelground.data import alignment, text_flip
from pixelground.data import transforms as T

LN_TEMPLATES = ("A long image caption:", "A detailed description of the image:",
                "Describe the image in detail:", "A narrative of the image:")
SHORT_CAPTION = "A short image caption:"
REGION_CAPTION = "an object of"
REFER_SEG = "Can you segment {} in this image?"
SEG_ANSWERS = ("Sure, it is [SEG].", "It is [SEG].", "Sure, the segmentation result is [SEG].")
# Why `web_caption` drops a record (the first failing check, in this order); a converter returns
# {DROPPED: index} instead of a row and the loader counts it (`pipeline`).
DROP_REASONS = ("language", "low_score", "small_image", "caption_too_short", "caption_too_long",
                "unreadable")  # the last: a damaged record skipped with config.data.bad_records="skip"
DROPPED = "dropped"  # = pipeline.DROPPED (tasks does not import the pipeline's Grain)


@dataclasses.dataclass(frozen=True)
class TaskConfig:
  image_size: int = 384
  max_prompt_len: int = 32
  max_target_len: int = 128
  max_seg: int = 4
  max_entities: int = 16
  max_regions: int = 16          # dense captioning GT regions per image
  max_region_len: int = 16       # tokens per region caption (incl. EOS)
  train: bool = True
  scale_range: tuple[float, float] = (0.5, 1.5)
  flip: bool = False
  split_sentences: bool = False  # LN: one sentence per target instead of the whole narrative
  # LISA rows also carry the target mask's box at the step that predicts `[SEG]` (for the location head
  # and the attention-grounding loss): off in the papers; the from-scratch demo uses it so the `[SEG]`
  # state learns which object it is about.
  seg_boxes: bool = False
  # panoptic: the prompt's category names in a random order per training example (the decoder learns to
  # walk the given list); False keeps the category list's own order in training as at evaluation (the
  # target then names the categories in one fixed order: a from-scratch aid).
  shuffle_categories: bool = True
  # Encoders whose normalised float32 image the host produces ("sam", "clip"): `image_{enc}` fields
  # replace the uint8 `image`. Empty (default): ship uint8 and normalise on device (4× less transfer).
  host_normalize: tuple[str, ...] = ()
  # Web image–text record filters (`web_caption`; `config.tasks.<name>` keys, defaults keep all).
  min_caption_tokens: int = 0
  max_caption_tokens: int = 0
  languages: tuple[str, ...] = ()
  min_score: float = -1.0
  min_image_side: int = 0


def schema(cfg: TaskConfig) -> dict[str, tuple[tuple[int, ...], tp.Any]]:
  s, le, lt, k, e = cfg.image_size, cfg.max_prompt_len, cfg.max_target_len, cfg.max_seg, cfg.max_entities
  images = ({f"image_{enc}": ((s, s, 3), np.float32) for enc in cfg.host_normalize}
            if cfg.host_normalize else {"image": ((s, s, 3), np.uint8)})
  return {
      **images, "image_mask": ((s, s), np.bool_),
      "prompt_box": ((4,), np.float32),
      "prompt_ids": ((le,), np.int32),
      "target_ids": ((lt,), np.int32), "target_mask": ((lt,), np.bool_),
      "token_boxes": ((lt, 4), np.float32), "token_box_valid": ((lt,), np.bool_),
      "seg_positions": ((k,), np.int32), "seg_masks": ((k, s, s), np.bool_), "seg_valid": ((k,), np.bool_),
      "ignore_mask": ((s, s), np.bool_),
      "entity_masks": ((e, s, s), np.bool_), "entity_valid": ((e,), np.bool_),
      "entity_ids": ((e,), np.int32),
      "association": ((k, e), np.bool_),
      "region_boxes": ((cfg.max_regions, 4), np.float32),
      "region_ids": ((cfg.max_regions, cfg.max_region_len), np.int32),
      "region_valid": ((cfg.max_regions,), np.bool_),
  }


_IMAGE = ("image", "image_mask", "prompt_box", "prompt_ids")
_TEXT = ("target_ids", "target_mask")
_BOXES = ("token_boxes", "token_box_valid")
_SEG = ("seg_positions", "seg_masks", "seg_valid")
_ENTITIES = ("entity_masks", "entity_valid", "entity_ids", "association")
# The fields each converter produces (`task_schema`); a referring example without a mask gets zeros.
# Caption tasks carry (empty) per-token boxes too: they then share LN's compiled train step.
TASK_FIELDS = {"ln": _IMAGE + _TEXT + _BOXES, "caption": _IMAGE + _TEXT + _BOXES,
               "web_caption": _IMAGE + _TEXT + _BOXES,
               "region_caption": _IMAGE + _TEXT + _BOXES, "referring": _IMAGE + _TEXT + _BOXES + _SEG,
               "reason_seg": _IMAGE + _TEXT + _SEG + ("ignore_mask",),
               "referring_seg": _IMAGE + _TEXT + _SEG + ("ignore_mask",),
               "narrative_grounding": _IMAGE + _TEXT + _SEG + _ENTITIES,
               "panoptic": _IMAGE + _TEXT + _SEG + _ENTITIES,
               "dense_caption": _IMAGE + ("region_boxes", "region_ids", "region_valid")}


def task_schema(cfg: TaskConfig, converter: str) -> dict[str, tuple[tuple[int, ...], tp.Any]]:
  """The part of `schema(cfg)` that converter `converter` fills (for single-task batches)."""
  if converter not in TASK_FIELDS:
    raise ValueError(f"no field list for converter '{converter}' (known: {sorted(TASK_FIELDS)})")
  fields = set(TASK_FIELDS[converter])
  if cfg.seg_boxes and converter in ("reason_seg", "referring_seg"):
    fields |= set(_BOXES)
  if cfg.host_normalize:
    fields = (fields - {"image"}) | {f"image_{enc}" for enc in cfg.host_normalize}
  return {k: v for k, v in schema(cfg).items() if k in fields}


def as_text(v) -> str:
  return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def image_hw(image) -> tuple[int, int]:
  """(height, width) of a numpy image or a PIL image."""
  if hasattr(image, "shape"):
    return int(image.shape[0]), int(image.shape[1])
  return int(image.size[1]), int(image.size[0])


def dense_regions(ex: dict, categories=None) -> tuple[np.ndarray, list[str]]:
  """The regions of a dense-captioning example: (boxes (N, 4) xyxy pixels of the original image,
  phrases). vg_densecap examples carry them; a coco_panoptic example gives its "thing" segments' boxes,
  named by category (`categories`: the builder's id → {"name", ...} table)."""
  if "segments" in ex:
    seg = ex["segments"]
    things = np.flatnonzero(np.asarray(seg["isthing"], bool))
    xywh = np.asarray(seg["bbox_xywh"], np.float32).reshape(-1, 4)[things]
    names = [categories[int(c)]["name"] for c in np.asarray(seg["category"])[things]]
    return np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1), names
  return np.asarray(ex["boxes"], np.float32).reshape(-1, 4), [as_text(t) for t in ex["phrases"]]


def _pad(ids: tp.Sequence[int], length: int) -> np.ndarray:
  out = np.zeros(length, np.int32)
  ids = list(ids)[:length]
  out[: len(ids)] = ids
  return out


class Converters:
  """Converters for every task; `tokenizer` is a `pixelground.data.tokenizer.Tokenizer`."""

  def __init__(self, cfg: TaskConfig, tokenizer, categories: tp.Sequence[dict] | None = None):
    """`categories`: the panoptic category list (`builder.info.metadata["categories"]`), needed by
    `panoptic` only."""
    self.cfg, self.tok = cfg, tokenizer
    self.categories = list(categories or [])
    self.seg_id = tokenizer.token_id("[SEG]")
    self.stats = {"ln_fallback_words": 0, "ln_words": 0, "flips_refused": 0}

  # -- shared pieces -----------------------------------------------------------------------------------
  def geometry(self, rng: np.random.Generator, image, texts: tp.Sequence[str] = ()) -> T.Geometry:
    h, w = image_hw(image)
    s = self.cfg.image_size
    if not self.cfg.train:
      return T.resize_pad(h, w, s)
    geom = T.random_resize_crop(rng, h, w, s, self.cfg.scale_range)
    if self.cfg.flip:
      if not all(text_flip.flip_allowed(t) for t in texts):
        self.stats["flips_refused"] += 1
      geom = T.maybe_flip(rng, geom, texts=texts)  # one draw either way: the stream stays in step
    return geom

  def image_fields(self, image: np.ndarray, geom: T.Geometry) -> dict[str, np.ndarray]:
    out, valid = T.apply_image(image, geom)  # converts any mode (grey, RGBA, palette, 16-bit)
    vh, vw = geom.valid
    s = self.cfg.image_size
    fields = {"image_mask": valid, "prompt_box": np.asarray([0, 0, vw / s, vh / s], np.float32)}
    if self.cfg.host_normalize:
      for enc in self.cfg.host_normalize:
        fields[f"image_{enc}"] = T.normalize(out, enc, valid=geom.valid)
    else:
      fields["image"] = out
    return fields

  def prompt(self, text: str) -> np.ndarray:
    return _pad(self.tok.encode(text), self.cfg.max_prompt_len)

  def target(self, ids: tp.Sequence[int]) -> dict[str, np.ndarray]:
    lt = self.cfg.max_target_len
    ids = list(ids)[: lt - 1] + [self.tok.eos_id]
    return {"target_ids": _pad(ids, lt), "target_mask": np.arange(lt) < len(ids)}

  def flip_text(self, geom: T.Geometry, text: str) -> str:
    return text_flip.flip_text(text) if geom.flipped else text

  def norm_boxes(self, boxes_px: np.ndarray, geom: T.Geometry) -> np.ndarray:
    """Pixel xyxy boxes of the source image → normalised canvas xyxy (clipped to the valid area)."""
    return (geom.boxes(np.asarray(boxes_px, np.float32).reshape(-1, 4)) / self.cfg.image_size
            ).astype(np.float32)

  def masks(self, masks: np.ndarray, geom: T.Geometry) -> np.ndarray:
    m = np.asarray(masks)
    if m.ndim == 4:  # (K, H, W, 1) PNG-decoded
      m = m[..., 0]
    return T.apply_masks(m.astype(bool), geom)

  # -- Localized Narratives: caption + per-token trace boxes ---------------------------------------------
  def ln(self, ex: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    image = ex["image"]
    h, w = image_hw(image)
    caption = as_text(ex["caption"])
    utts = ex["utterances"]
    texts = [as_text(t) for t in utts["text"]]
    geom = self.geometry(rng, image, [caption])
    caption = self.flip_text(geom, caption)
    texts = [self.flip_text(geom, t) for t in texts]
    targets = alignment.align_narrative(caption, texts, self.tok, max_len=self.cfg.max_target_len,
                                        split_sentences=self.cfg.split_sentences)
    target = targets[int(rng.integers(len(targets)))] if len(targets) > 1 else targets[0]
    self.stats["ln_fallback_words"] += target.num_fallback
    self.stats["ln_words"] += target.num_words
    out = self.image_fields(image, geom)
    out["prompt_ids"] = self.prompt(LN_TEMPLATES[int(rng.integers(len(LN_TEMPLATES)))]
                                    if self.cfg.train else LN_TEMPLATES[0])
    out.update(self.target(target.ids))
    lt = self.cfg.max_target_len
    boxes = np.zeros((lt, 4), np.float32)
    valid = np.zeros(lt, bool)
    utt_boxes = np.asarray(utts["box"], np.float32).reshape(-1, 4) * np.asarray([w, h, w, h], np.float32)
    canvas = self.norm_boxes(utt_boxes, geom) if len(utt_boxes) else np.zeros((0, 4), np.float32)
    supervised = np.asarray(utts["supervised"], bool).reshape(-1)
    # A trace box is a target even when it has no area (a still mouse); it must stay on the canvas.
    on_canvas = (canvas[:, 2] >= canvas[:, 0]) & (canvas[:, 3] >= canvas[:, 1]) if len(canvas) else \
        np.zeros(0, bool)
    for t, u in enumerate(target.utterance[:lt]):
      if u >= 0 and supervised[u] and on_canvas[u]:
        boxes[t] = canvas[u]
        valid[t] = True
    out["token_boxes"], out["token_box_valid"] = boxes, valid
    return out

  # -- COCO captions ---------------------------------------------------------------------------------
  def caption(self, ex: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    captions = [as_text(c) for c in ex["captions"]]
    text = captions[int(rng.integers(len(captions)))] if self.cfg.train else captions[0]
    geom = self.geometry(rng, ex["image"], [text])
    out = self.image_fields(ex["image"], geom)
    out["prompt_ids"] = self.prompt(SHORT_CAPTION)
    out.update(self.target(self.tok.encode(self.flip_text(geom, text))))
    return out

  # -- web image-text pairs (image_text builder): filtered captioning ---------------------------------
  def drop_reason(self, ex: dict, ids: tp.Sequence[int]) -> str | None:
    """The first `DROP_REASONS` check a web record fails (None: keep). `ids`: its caption's tokens."""
    c = self.cfg
    if c.languages and as_text(ex.get("language", "")) not in c.languages:
      return "language"
    if float(ex.get("score", -1.0)) < c.min_score:
      return "low_score"
    if c.min_image_side and min(image_hw(ex["image"])) < c.min_image_side:
      return "small_image"
    if len(ids) < c.min_caption_tokens:
      return "caption_too_short"
    if c.max_caption_tokens and len(ids) > c.max_caption_tokens:
      return "caption_too_long"
    return None

  def web_caption(self, ex: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """image_text examples (`image`, `text`, `language`, `score`): prompt "A short image caption:",
    target the text (cut to `max_target_len`); a record failing the task's filters → {DROPPED: its
    `DROP_REASONS` index}."""
    text = " ".join(as_text(ex["text"]).split())
    ids = self.tok.encode(text)
    reason = self.drop_reason(ex, ids)
    if reason is not None:
      return {DROPPED: np.int32(DROP_REASONS.index(reason))}
    geom = self.geometry(rng, ex["image"], [text])  # a flip is refused for text naming left / right
    out = self.image_fields(ex["image"], geom)
    out["prompt_ids"] = self.prompt(SHORT_CAPTION)
    out.update(self.target(ids))
    return out

  # -- referring localisation / segmentation (RefCOCO) -------------------------------------------------
  def referring(self, ex: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    sentences = [as_text(s) for s in ex["sentences"]]
    text = sentences[int(rng.integers(len(sentences)))] if self.cfg.train else sentences[0]
    geom = self.geometry(rng, ex["image"], [text])
    text = self.flip_text(geom, text)
    out = self.image_fields(ex["image"], geom)
    out["prompt_ids"] = self.prompt(f"where is {text}")
    out.update(self.target(self.tok.encode(text)))
    lt = self.cfg.max_target_len
    eos_pos = int(out["target_mask"].sum()) - 1
    box = self.norm_boxes(ex["box_xyxy"], geom)[0]
    out["token_boxes"] = np.zeros((lt, 4), np.float32)
    out["token_box_valid"] = np.zeros(lt, bool)
    if geom.keep(np.asarray(ex["box_xyxy"], np.float32).reshape(1, 4))[0]:
      out["token_boxes"][eos_pos] = box
      out["token_box_valid"][eos_pos] = True
    if "mask" in ex:
      k = self.cfg.max_seg
      seg = np.zeros((k,) + out["image_mask"].shape, bool)
      seg[0] = self.masks(np.asarray(ex["mask"])[None], geom)[0]  # (1, H, W, 1) → (S, S)
      out["seg_masks"], out["seg_valid"] = seg, np.arange(k) < 1
      out["seg_positions"] = np.asarray([eos_pos] + [0] * (k - 1), np.int32)
    return out

  # -- location-conditioned captioning (RefCOCO / VG regions) -----------------------------------------
  def region_caption(self, ex: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    if "sentences" in ex:
      texts, boxes = [as_text(s) for s in ex["sentences"]], np.asarray(ex["box_xyxy"]).reshape(1, 4)
      pick = int(rng.integers(len(texts))) if self.cfg.train else 0
      text, box = texts[pick], boxes[0]
    else:  # vg_densecap: one region of the image
      texts, boxes = [as_text(s) for s in ex["phrases"]], np.asarray(ex["boxes"]).reshape(-1, 4)
      pick = int(rng.integers(len(texts))) if self.cfg.train else 0
      text, box = texts[pick], boxes[pick]
    geom = self.geometry(rng, ex["image"], [text])
    out = self.image_fields(ex["image"], geom)
    out["prompt_box"] = self.norm_boxes(box, geom)[0]
    out["prompt_ids"] = self.prompt(REGION_CAPTION)
    out.update(self.target(self.tok.encode(self.flip_text(geom, text))))
    return out

  # -- reasoning / referring segmentation with [SEG] (LISA) -------------------------------------------
  def reason_seg(self, ex: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    queries = [as_text(q) for q in ex["queries"]]
    question = queries[int(rng.integers(len(queries)))] if self.cfg.train else queries[0]
    return self._seg_answer(ex["image"], question, ex["target_mask"], ex["ignore_mask"], rng)

  def referring_seg(self, ex: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """LISA's referring segmentation on RefCOCO: "Can you segment {expression} in this image?" → an
    answer with one `[SEG]` whose mask is the referred object's."""
    sentences = [as_text(s) for s in ex["sentences"]]
    text = sentences[int(rng.integers(len(sentences)))] if self.cfg.train else sentences[0]
    return self._seg_answer(ex["image"], REFER_SEG.format(text), ex["mask"], None, rng)

  def _seg_answer(self, image, question: str, target, ignore, rng: np.random.Generator
                  ) -> dict[str, np.ndarray]:
    """A question → "… [SEG]." example: the first `[SEG]` slot holds `target` (H, W[, 1]); `ignore`
    (same shape, or None) marks pixels never scored."""
    geom = self.geometry(rng, image, [question])
    question = self.flip_text(geom, question)
    out = self.image_fields(image, geom)
    out["prompt_ids"] = self.prompt(question)
    answer = SEG_ANSWERS[int(rng.integers(len(SEG_ANSWERS)))] if self.cfg.train else SEG_ANSWERS[0]
    out.update(self.target(self.tok.encode(answer)))
    k = self.cfg.max_seg
    positions = np.flatnonzero(out["target_ids"] == self.seg_id)[:k]
    seg = np.zeros((k,) + out["image_mask"].shape, bool)
    seg[0] = self.masks(np.asarray(target)[None], geom)[0]
    out["seg_masks"] = seg
    out["seg_valid"] = np.arange(k) < len(positions)
    out["seg_positions"] = _pad(positions, k)
    out["ignore_mask"] = (self.masks(np.asarray(ignore)[None], geom)[0] if ignore is not None
                          else np.zeros(out["image_mask"].shape, bool))
    if self.cfg.seg_boxes and len(positions) and seg[0].any():
      ys, xs = np.nonzero(seg[0])
      lt = self.cfg.max_target_len
      out["token_boxes"] = np.zeros((lt, 4), np.float32)
      out["token_box_valid"] = np.arange(lt) == positions[0]
      out["token_boxes"][positions[0]] = np.asarray(
          [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32) / self.cfg.image_size
    return out

  # -- panoptic narrative grounding (GELLA / PNG): nouns each followed by [SEG] -----------------------
  def narrative_grounding(self, ex: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    from tfds_builders.coco_panoptic import segment_ids

    caption = as_text(ex["caption"])
    geom = self.geometry(rng, ex["image"], [caption])
    out = self.image_fields(ex["image"], geom)
    out["prompt_ids"] = self.prompt(self.flip_text(geom, caption))
    k, e = self.cfg.max_seg, self.cfg.max_entities
    ids_map = segment_ids(np.asarray(ex["panoptic"]))
    entity_ids = [int(i) for i in np.asarray(ex["segments"]["id"])][:e]
    entity_masks = np.zeros((e,) + out["image_mask"].shape, bool)
    if entity_ids:
      entity_masks[: len(entity_ids)] = self.masks(
          np.stack([ids_map == i for i in entity_ids]), geom)
    target, positions, assoc = [], [], np.zeros((k, e), bool)
    offsets = np.asarray(ex["phrase_offsets"])
    flat = np.asarray(ex["phrase_segment_ids"])
    nouns = [(p, as_text(u)) for p, (u, noun) in enumerate(zip(ex["phrases"]["utterance"],
                                                           ex["phrases"]["noun"])) if noun]
    for p, utterance in nouns:
      if len(positions) == k:
        break
      target.extend(self.tok.encode(self.flip_text(geom, utterance)))
      if len(target) >= self.cfg.max_target_len - 2:
        break
      positions.append(len(target))
      target.append(self.seg_id)
      for sid in flat[offsets[p]:offsets[p + 1]]:
        if int(sid) in entity_ids:
          assoc[len(positions) - 1, entity_ids.index(int(sid))] = True
    out.update(self.target(target))
    out["seg_positions"] = _pad(positions, k)
    out["seg_valid"] = np.arange(k) < len(positions)
    seg = np.zeros((k,) + out["image_mask"].shape, bool)
    for j in range(len(positions)):
      seg[j] = np.any(entity_masks[assoc[j]], axis=0) if assoc[j].any() else seg[j]
    out["seg_masks"] = seg
    # An entity cropped away is no entity (its pairs score nowhere).
    out["entity_masks"], out["entity_valid"] = entity_masks, np.any(entity_masks, axis=(1, 2))
    out["association"] = assoc & out["entity_valid"][None]
    out["entity_ids"] = _pad(entity_ids, e)
    return out

  # -- dense captioning (VG / grounded shapes refs): all GT regions + captions ---------------------------
  def dense_caption(self, ex: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """vg_densecap examples (`boxes` pixel xyxy, `phrases`). Regions cropped away are dropped; at most
    `max_regions` are kept (a random subset when training)."""
    boxes, texts = dense_regions(ex, self.categories)
    geom = self.geometry(rng, ex["image"], texts)
    out = self.image_fields(ex["image"], geom)
    out["prompt_ids"] = self.prompt(REGION_CAPTION)
    keep = np.flatnonzero(geom.keep(boxes)) if len(boxes) else np.zeros(0, int)
    if self.cfg.train and len(keep) > self.cfg.max_regions:
      keep = np.sort(rng.choice(keep, self.cfg.max_regions, replace=False))
    keep = keep[: self.cfg.max_regions]
    r, lr = self.cfg.max_regions, self.cfg.max_region_len
    out["region_boxes"] = np.zeros((r, 4), np.float32)
    out["region_ids"] = np.zeros((r, lr), np.int32)
    if len(keep):
      out["region_boxes"][: len(keep)] = self.norm_boxes(boxes[keep], geom)
    for j, i in enumerate(keep):
      ids = self.tok.encode(self.flip_text(geom, texts[i]))[: lr - 1] + [self.tok.eos_id]
      out["region_ids"][j] = _pad(ids, lr)
    out["region_valid"] = np.arange(r) < len(keep)
    return out

  # -- panoptic segmentation (GELLA): category list → "name [SEG]" per entity -------------------------
  def panoptic(self, ex: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """coco_panoptic examples. Prompt: the category names (shuffled when training with
    `shuffle_categories`); target: each entity's category name followed by `[SEG]`, in the prompt's
    category order (the decoder walks the list and names each category as often as it has entities,
    largest entity first), at most min(K, E) entities that fit the target (the largest ones when
    more). Entity slots hold the same entities in a random order when training (the model must
    associate by content, not by slot), in target order at evaluation; association[k, slot of entity
    k]."""
    from tfds_builders.coco_panoptic import segment_ids

    if not self.categories:
      raise ValueError("Converters.panoptic needs `categories` (the panoptic builder's metadata)")
    from pixelground.inference.grounding import category_display_name

    names = [category_display_name(c["name"]) for c in self.categories]
    shuffle = self.cfg.train and self.cfg.shuffle_categories
    order = rng.permutation(len(names)) if shuffle else np.arange(len(names))
    geom = self.geometry(rng, ex["image"], names)
    out = self.image_fields(ex["image"], geom)
    out["prompt_ids"] = self.prompt(", ".join(names[i] for i in order))
    k, e = self.cfg.max_seg, self.cfg.max_entities
    ids_map = segment_ids(np.asarray(ex["panoptic"]))
    seg_ids = np.asarray(ex["segments"]["id"])
    cats = np.asarray(ex["segments"]["category"])
    masks = (self.masks(np.stack([ids_map == i for i in seg_ids]), geom) if len(seg_ids)
             else np.zeros((0,) + out["image_mask"].shape, bool))
    area = masks.reshape(len(masks), -1).sum(-1)
    by_area = [int(j) for j in np.argsort(-area, kind="stable") if area[j] > 0][: min(k, e)]
    rank = {int(c): r for r, c in enumerate(order)}
    chosen = sorted(by_area, key=lambda j: (rank[int(cats[j])], -area[j]))
    target, positions, used = [], [], []
    for j in chosen:
      piece = self.tok.encode(names[int(cats[j])])
      if len(target) + len(piece) + 2 > self.cfg.max_target_len:
        break
      target.extend(piece)
      positions.append(len(target))
      target.append(self.seg_id)
      used.append(int(j))
    out.update(self.target(target))
    slots = rng.permutation(len(used)) if self.cfg.train else np.arange(len(used))
    s_shape = out["image_mask"].shape
    out["entity_masks"] = np.zeros((e,) + s_shape, bool)
    out["seg_masks"] = np.zeros((k,) + s_shape, bool)
    out["association"] = np.zeros((k, e), bool)
    for n, (j, slot) in enumerate(zip(used, slots)):
      out["entity_masks"][slot] = masks[j]
      out["seg_masks"][n] = masks[j]
      out["association"][n, slot] = True
    out["entity_ids"] = np.zeros(e, np.int32)
    out["entity_ids"][slots] = [int(seg_ids[j]) for j in used]
    out["entity_valid"] = np.arange(e) < len(used)
    out["seg_valid"] = np.arange(k) < len(used)
    out["seg_positions"] = _pad(positions, k)
    return out
