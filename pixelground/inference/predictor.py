"""Per-task inference for PixelLLM / LISA on single images, with cached greedy or beam decoding.

Every function takes the ORIGINAL image (H, W, 3) uint8 (any PIL-convertible mode is converted) and
returns coordinates in that image's pixels (xyxy boxes, x/y points, pixel centres at +0.5): the image
is resized so its long side is the model input size and padded (the evaluation geometry of
`pixelground.data.transforms.resize_pad`), and predictions are mapped back through its inverse.

    Caption           text, pieces (per generated token, EOS excluded), points (N, 2, 2) — the two
                      corners each token's location head predicts — and boxes (N, 4) = their min/max
    ReferringResult   text (the expression as scored), box (4,) read at the position predicting its EOS
                      (teacher-forced, as trained and evaluated), score (its log-likelihood); with a
                      refseg model also mask (H, W) bool + mask_score
    Segmentation      text (the answer), masks (K, H, W) bool — one per `[SEG]` in the answer,
                      mask_scores (K,) (SAM's IoU head)
    DenseCaption      box (4,), score (proposal heatmap peak, sigmoid), text — a list, best first
    GroundedPhrase    (GELLA, `ground`) text, span in the caption, entities, mask (H, W) bool, score —
                      a list, one per noun phrase; `panoptic` → (id map (H, W) int32, segments_info).
                      Both take user entities (an (E, H, W) stack or an (H, W) id map), else use
                      SAM's automatic masks; implemented in `pixelground.inference.grounded`
    auto_masks        SAM's automatic mask generator (`pixelground.inference.auto_masks`): records
                      with segmentation, area, bbox (xywh), predicted_iou, stability_score, ...

Bad calls raise ValueError naming the problem: an image that is not (H, W, 3) / (H, W), an empty text,
a box that is not xyxy inside the image.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import typing as tp

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pixelground.data import tasks as task_lib
from pixelground.data import transforms as T
from pixelground.inference import decoding
from pixelground.models import pixelllm


@dataclasses.dataclass
class Caption:
  text: str
  pieces: list[str]
  points: np.ndarray   # (N, 2, 2) float32: per token two (x, y) corners, original-image pixels
  boxes: np.ndarray    # (N, 4) float32 xyxy: min/max of each token's two points
  score: float


@dataclasses.dataclass
class ReferringResult:
  text: str
  box: np.ndarray      # (4,) float32 xyxy, original-image pixels
  score: float
  mask: np.ndarray | None = None  # (H, W) bool with a refseg model (SAM prompted by the box)
  mask_score: float | None = None


@dataclasses.dataclass
class DenseCaption:
  box: np.ndarray   # (4,) float32 xyxy, original-image pixels
  score: float      # proposal score in (0, 1)
  text: str


@dataclasses.dataclass
class Segmentation:
  text: str
  masks: np.ndarray        # (K, H, W) bool
  mask_scores: np.ndarray  # (K,) float32


def _check_image(image) -> np.ndarray:
  arr = T.to_rgb_uint8(image)
  if arr.ndim != 3 or arr.shape[-1] != 3 or min(arr.shape[:2]) < 1:
    raise ValueError(f"image must be (H, W, 3) or (H, W); got shape {np.shape(image)}")
  return arr


def _check_text(text: str, what: str) -> str:
  if not isinstance(text, str) or not text.strip():
    raise ValueError(f"{what} must be a non-empty string; got {text!r}")
  return text


def _check_box(box, height: int, width: int) -> np.ndarray:
  b = np.asarray(box, np.float32).reshape(-1)
  if b.shape != (4,) or not np.all(np.isfinite(b)):
    raise ValueError(f"box must be 4 finite numbers [x0, y0, x1, y1]; got {box!r}")
  x0, y0, x1, y1 = b
  if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
    raise ValueError(f"box {b.tolist()} is not a non-empty xyxy box inside the {width}×{height} image")
  return b


@functools.partial(nnx.jit, static_argnames=("max_len", "num_beams", "no_repeat_previous", "vocab_limit"))
def _generate(model, batch, *, max_len: int, num_beams: int, no_repeat_previous: bool,
              vocab_limit: int | None = None):
  """Visual tokens → cached greedy/beam decode → per-token points (model-input pixels)."""
  fused, sam = model.image_features(batch["image"], batch["image_mask"])
  visual = model.visual_tokens(fused, batch["prompt_box"])
  ids = batch["prompt_ids"]
  res = decoding.generate(model.t5, ids, ids != model.cfg.t5.pad_id, max_len=max_len,
                          num_beams=num_beams, length_penalty=0.6 if num_beams > 1 else 1.0,
                          no_repeat_previous=no_repeat_previous, prefix_embeds=visual,
                          vocab_limit=vocab_limit)
  return res, model.points(res.hidden, batch["image_mask"], visual), (sam, visual)


@functools.partial(nnx.jit, static_argnames=("k", "max_len", "vocab_limit"))
def _dense(model, batch, *, k: int, max_len: int, vocab_limit: int | None = None):
  """Proposals (top-k heatmap peaks) → one caption per proposal, decoded as a batch of k."""
  from pixelground.models.heads import proposals as prop_lib

  fused, _ = model.image_features(batch["image"], batch["image_mask"])
  heat, ltrb = model.proposal_head(fused)
  boxes, scores = prop_lib.top_proposals(heat, ltrb, k)  # (1, k, 4) normalised, (1, k)
  visual = model.visual_tokens(jnp.repeat(fused, k, axis=0), boxes[0])
  ids = jnp.repeat(batch["prompt_ids"], k, axis=0)
  res = decoding.generate(model.t5, ids, ids != model.cfg.t5.pad_id, max_len=max_len,
                          prefix_embeds=visual, vocab_limit=vocab_limit)
  return boxes[0], scores[0], res.tokens, res.lengths


@nnx.jit
def _refer(model, batch):
  """Teacher-forced referring: (box (B, 4) model-input pixels at the EOS, log-likelihood (B,), mask
  logits (B, S, S) and IoU (B,) with a refseg model, else None)."""
  out = model(batch, heads=pixelllm.TASK_HEADS["referring"])
  box = pixelllm.referring_box(out, batch)
  logp = jax.nn.log_softmax(out["logits"], -1)
  logp = jnp.take_along_axis(logp, batch["target_ids"][..., None], -1)[..., 0]
  score = jnp.sum(jnp.where(batch["target_mask"], logp, 0.0), axis=-1)
  return box, score, out.get("ref_logits"), out.get("ref_iou")


class Predictor:
  """Holds a PixelLLM, its tokenizer and jitted decode functions (compiled once per max_len/beams)."""

  def __init__(self, model, tokenizer, *, max_prompt_len: int = 32, max_entities: int | None = None,
               categories: tp.Sequence[dict] | None = None, sam_checkpoint: str | None = None):
    """`max_entities`: GELLA entity slots (the training `config.data.max_entities`; None: up to the
    colormap's colours); `categories`: the panoptic category list `panoptic` uses by default;
    `sam_checkpoint`: a SAM checkpoint for `auto_masks` (default: the model's own SAM parts)."""
    self.model, self.tok = model, tokenizer
    self.sam_checkpoint = sam_checkpoint
    self._sam_parts = None
    self._generators: dict[str, tp.Any] = {}
    self.size = model.cfg.image_size
    self.max_prompt_len = max_prompt_len
    self.max_entities = max_entities
    self.categories = None if categories is None else list(categories)
    self.config = None      # the training config (from_checkpoint): where panoptic categories come from
    self._looked_up = False
    self.truncated = False  # the last call's prompt was longer than max_prompt_len tokens
    self.last_prompt_len = max_prompt_len  # the last call's prompt length (tasks may have their own)
    self.generated = None   # GELLA: the last ground/panoptic call's generated text (None: teacher-forced)

  @classmethod
  def from_checkpoint(cls, path: str, config=None, *, mesh=None, sam_checkpoint: str | None = None
                      ) -> "Predictor":
    """A Predictor for a training checkpoint: `path` is a training workdir, its checkpoints/ directory
    or one step directory (the newest step unless one is named). `config`: the training config (a
    ConfigDict or a config file path); default: the `config.json` the trainer wrote in the workdir.
    `mesh` defaults to one device (single-image inference)."""
    from pixelground.config import schema
    from pixelground.data import tokenizer as tok_lib
    from pixelground.parallel import sharding
    from pixelground.training import checkpointing, train_state

    root, _ = checkpointing.find_checkpoint(path)
    config = schema.parse(config if config is not None else os.path.join(os.path.dirname(root),
                                                                        "config.json"))
    mesh = mesh or sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    setup = train_state.build_setup(config, mesh)
    state, _ = checkpointing.load_state(setup, path)
    model = train_state.make_model(setup, state)
    pred = cls(model, tok_lib.load_tokenizer(config.tokenizer), max_prompt_len=config.data.max_prompt_len,
               max_entities=config.data.max_entities, sam_checkpoint=sam_checkpoint)
    pred.config = config
    return pred

  # -- shared ------------------------------------------------------------------------------------------
  def _inputs(self, image: np.ndarray, prompt: str, box: np.ndarray | None,
              max_prompt_len: int | None = None):
    """→ (the model batch of one image + prompt, its geometry); the prompt is cut to `max_prompt_len`
    tokens (default `self.max_prompt_len`), `self.truncated` says whether it was."""
    max_prompt_len = max_prompt_len or self.max_prompt_len
    geom = T.resize_pad(image.shape[0], image.shape[1], self.size)
    out, valid = T.apply_image(image, geom)
    vh, vw = geom.valid
    if box is None:
      prompt_box = np.asarray([0, 0, vw / self.size, vh / self.size], np.float32)
    else:
      prompt_box = (geom.boxes(box[None])[0] / self.size).astype(np.float32)
    ids = self.tok.encode(prompt)
    self.truncated = len(ids) > max_prompt_len
    self.last_prompt_len = max_prompt_len
    ids = ids[:max_prompt_len]
    prompt_ids = np.zeros(max_prompt_len, np.int32)
    prompt_ids[: len(ids)] = ids
    batch = {"image": out[None], "image_mask": valid[None], "prompt_box": prompt_box[None],
             "prompt_ids": prompt_ids[None]}
    return {k: jnp.asarray(v) for k, v in batch.items()}, geom

  def _decode(self, batch, max_len, num_beams, no_repeat_previous=False):
    res, points, extras = _generate(self.model, batch, max_len=max_len, num_beams=num_beams,
                                    no_repeat_previous=no_repeat_previous, vocab_limit=self.tok.num_ids)
    n = int(res.lengths[0])
    tokens = [int(t) for t in np.asarray(res.tokens[0, :n])]
    return tokens, np.asarray(points[0, :n]), res, extras

  def _to_image(self, boxes: np.ndarray, geom: T.Geometry) -> np.ndarray:
    return geom.inverse_boxes(np.asarray(boxes, np.float32).reshape(-1, 4)).astype(np.float32)

  # -- tasks -----------------------------------------------------------------------------------------
  def caption(self, image, *, prompt: str = task_lib.LN_TEMPLATES[0], box=None, max_len: int = 128,
              num_beams: int = 1, no_repeat_previous: bool = False) -> Caption:
    """Caption (with per-token locations) of the whole image, or of `box` (xyxy, image pixels)."""
    image = _check_image(image)
    _check_text(prompt, "prompt")
    box = None if box is None else _check_box(box, *image.shape[:2])
    batch, geom = self._inputs(image, prompt, box)
    tokens, points, res, _ = self._decode(batch, max_len, num_beams, no_repeat_previous)
    body = tokens[:-1] if tokens and tokens[-1] == self.tok.eos_id else tokens
    boxes = self._to_image(points[: len(body)], geom)  # each token's 2 points, as a box
    return Caption(text=self.tok.decode(body), pieces=[self.tok.id_to_piece(t) for t in body],
                   points=boxes.reshape(-1, 2, 2), boxes=boxes, score=float(res.scores[0]))

  def region_caption(self, image, box, *, max_len: int = 40, num_beams: int = 1) -> str:
    """Location-conditioned caption ("an object of") for `box` (xyxy, image pixels)."""
    return self.caption(image, prompt=task_lib.REGION_CAPTION, box=box, max_len=max_len,
                        num_beams=num_beams).text

  def referring(self, image, expression: str, *, max_len: int = 40) -> ReferringResult:
    """Referring localisation as trained and evaluated (SPEC 1.7): the expression is the prompt
    ("where is …") and the teacher-forced target; the box is the location head's output at the
    position that predicts its EOS. `text` is the expression as scored (cut to `max_len` − 1 tokens),
    `score` its log-likelihood under the model. With a refseg model also the box-prompted mask."""
    image = _check_image(image)
    _check_text(expression, "expression")
    batch, geom = self._inputs(image, f"where is {expression}", None)
    ids = self.tok.encode(expression)[: max_len - 1] + [self.tok.eos_id]
    target = np.zeros((1, max_len), np.int32)
    target[0, : len(ids)] = ids
    batch |= {"target_ids": jnp.asarray(target), "target_mask": jnp.asarray(target != 0)}
    box, score, logits, iou = _refer(self.model, batch)
    result = ReferringResult(text=self.tok.decode(ids[:-1]), box=self._to_image(np.asarray(box), geom)[0],
                             score=float(score[0]))
    if logits is not None:
      result.mask = mask_to_image(np.asarray(logits)[:1], geom, image.shape[:2])[0]
      result.mask_score = float(iou[0])
    return result

  def dense_captions(self, image, *, k: int = 10, max_len: int = 40) -> list[DenseCaption]:
    """Dense captioning: the proposal head's top-k boxes, each captioned ("an object of")."""
    if not self.model.cfg.proposals:
      raise ValueError("dense_captions() needs a model built with proposals=True")
    if k < 1:
      raise ValueError(f"k must be ≥ 1, got {k}")
    image = _check_image(image)
    batch, geom = self._inputs(image, task_lib.REGION_CAPTION, None)
    boxes, scores, tokens, lengths = _dense(self.model, batch, k=k, max_len=max_len,
                                            vocab_limit=self.tok.num_ids)
    boxes = self._to_image(np.asarray(boxes) * self.size, geom)
    out = []
    for i in range(boxes.shape[0]):
      toks = [int(t) for t in np.asarray(tokens[i, : int(lengths[i])])]
      body = toks[:-1] if toks and toks[-1] == self.tok.eos_id else toks
      out.append(DenseCaption(box=boxes[i], score=float(scores[i]), text=self.tok.decode(body)))
    return out

  def segment(self, image, question: str, *, max_len: int = 40) -> Segmentation:
    """LISA: answer `question`; one mask per `[SEG]` in the answer (original image resolution)."""
    if not self.model.cfg.lisa:
      raise ValueError("segment() needs a model built with lisa=True")
    image = _check_image(image)
    _check_text(question, "question")
    batch, geom = self._inputs(image, question, None)
    tokens, _, res, (sam, visual) = self._decode(batch, max_len, 1)
    seg_id = self.model.cfg.seg_token_id
    positions = [t for t, tok in enumerate(tokens) if tok == seg_id]
    h, w = image.shape[:2]
    body = tokens[:-1] if tokens and tokens[-1] == self.tok.eos_id else tokens
    if not positions:
      return Segmentation(self.tok.decode(body), np.zeros((0, h, w), bool), np.zeros(0, np.float32))
    logits, iou = _masks(self.model, res.hidden, jnp.asarray([positions], jnp.int32), sam, visual,
                         batch["image_mask"])
    masks = mask_to_image(np.asarray(logits[0]), geom, (h, w))
    return Segmentation(self.tok.decode(body), masks, np.asarray(iou[0]))

  # -- class-agnostic masks (pixelground.inference.auto_masks) ---------------------------------------
  def auto_masks(self, image, **options) -> list:
    """SAM's automatic masks of one image (H, W, 3) → records, or of a list of images (one call, crops
    encoded together) → a list of record lists. `options`: `auto_masks.AutoMaskOptions` fields
    (segment-anything's names). SAM is `sam_checkpoint` when given, else this model's SAM encoder,
    prompt encoder and mask decoder."""
    gen = self.mask_generator(**options)
    if isinstance(image, (list, tuple)):
      return gen.generate_batch([_check_image(im) for im in image])
    return gen.generate(_check_image(image))

  def mask_generator(self, **options):
    """The `AutomaticMaskGenerator` for `options` (built once per distinct options)."""
    from pixelground.inference.auto_masks import AutomaticMaskGenerator
    key = repr(sorted(options.items()))
    if key not in self._generators:
      if self._sam_parts is None:
        self._sam_parts = self._load_sam()
      self._generators[key] = AutomaticMaskGenerator(*self._sam_parts, **options)
    return self._generators[key]

  def _load_sam(self):
    if self.sam_checkpoint:
      from pixelground.checkpoints.sam import load_sam
      encoder, decoder = load_sam(self.sam_checkpoint)
      return encoder, decoder.prompt_encoder, decoder.mask_decoder
    from pixelground.inference.auto_masks import model_sam_parts
    return model_sam_parts(self.model, "give a SAM checkpoint (sam_checkpoint=..., predict --sam=...)")

  # -- GELLA (pixelground.inference.grounded) --------------------------------------------------------
  def ground(self, image, caption: str, entities=None, *, phrases: tp.Sequence[str] | None = None,
             max_len: int = 128) -> list:
    """Entity grounding: each noun phrase of `caption` (given `phrases`, teacher-forced; else
    generated) → `grounded.GroundedPhrase` (text, span, entities, mask (H, W) bool, score). `entities`:
    an (E, H, W) bool stack or an (H, W) integer id map (0 = void) of the image (`grounded`);
    None: SAM's automatic masks (`auto_masks`)."""
    from pixelground.inference import grounded
    return grounded.ground(self, image, caption, entities, phrases=phrases, max_len=max_len)

  def panoptic(self, image, entities=None, *, categories: tp.Sequence[dict] | None = None,
               max_len: int = 128) -> tuple[np.ndarray, list[dict]]:
    """Panoptic segmentation of the given entities → (id_map (H, W) int32, 0 = void; segments_info
    [{"id", "category_id", "isthing", "area", "bbox", "score"}]) for `categories` (default
    `panoptic_categories()`); entities as `ground`."""
    from pixelground.inference import grounded
    return grounded.panoptic(self, image, entities, categories=categories, max_len=max_len)

  def panoptic_categories(self) -> list[dict] | None:
    """The panoptic category list: the one given, else the checkpoint's panoptic dataset metadata
    (looked up once; None when neither is available)."""
    if self.categories is None and self.config is not None and not self._looked_up:
      from pixelground.inference import grounded
      self.categories = grounded.checkpoint_categories(self.config)
      self._looked_up = True
    return self.categories


def mask_to_image(logits: np.ndarray, geom: T.Geometry, hw: tuple[int, int]) -> np.ndarray:
  """(K, S, S) model-input mask logits → (K, H, W) bool masks of the original image."""
  vh, vw = geom.valid
  crop = jnp.asarray(logits[:, :vh, :vw], jnp.float32)  # drop the padding
  return np.asarray(jax.image.resize(crop, (crop.shape[0],) + tuple(hw), "bilinear")) > 0


@nnx.jit
def _masks(model, hidden, positions, sam, visual, image_mask):
  return model.decoded_seg_masks(hidden, positions, sam, visual, image_mask)


def teacher_forced_points(model, batch: dict[str, tp.Any]) -> np.ndarray:
  """Location-head outputs (B, T, 4) pixels of the model input under teacher forcing (for checks)."""
  return np.asarray(nnx.jit(lambda m, b: m(b)["points"])(model, batch))
