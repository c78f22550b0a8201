"""Per-task inference for PixelLLM / LISA (one image or a batch), cached greedy or beam decoding.

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

Batched: `caption_batch`, `region_caption_batch`, `referring_batch`, `segment_batch`,
`dense_captions_batch` take lists (images, texts, boxes) and run them in compiled calls padded to shape
buckets (`Predictor.buckets`, `pixelground.inference.batching`), so new requests reuse the compiled
programs; `segment_stream` yields a LISA answer chunk by chunk with each `[SEG]`'s mask as soon as it is
generated (`pixelground.inference.streaming`). The single-image methods call the batched ones with a
list of one.

Bad calls raise ValueError naming the problem: an image that is not (H, W, 3) / (H, W), an empty text,
a box that is not xyxy inside the image.
"""

from __future__ import annotations

import dataclasses
import os
import typing as tp

import jax
import numpy as np
from flax import nnx

from pixelground.data import tasks as task_lib
from pixelground.data import transforms as T
from pixelground.inference import batching


@dataclasses.dataclass
class Caption:
  text: str
  pieces: list[str]
  points: np.ndarray   # (N, 2, 2) float32: per token two (x, y) corners, original-image pixels
  boxes: np.ndarray    # (N, 4) float32 xyxy: min/max of each token's two points
  score: float
  truncated: bool = False  # the prompt was cut to the prompt length


@dataclasses.dataclass
class ReferringResult:
  text: str
  box: np.ndarray      # (4,) float32 xyxy, original-image pixels
  score: float
  mask: np.ndarray | None = None  # (H, W) bool with a refseg model (SAM prompted by the box)
  mask_score: float | None = None
  truncated: bool = False  # the prompt ("where is …") was cut to the prompt length


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
  truncated: bool = False  # the question was cut to the prompt length


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


def _check_list(values, n: int, what: str) -> list:
  values = list(values)
  if len(values) != n:
    raise ValueError(f"{what}: {len(values)} given for {n} images; give one per image")
  return values


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
    self._programs = None
    self.size = model.cfg.image_size
    self.max_prompt_len = max_prompt_len
    self.max_entities = max_entities
    self.categories = None if categories is None else list(categories)
    self.config = None      # the training config (from_checkpoint): where panoptic categories come from
    self._looked_up = False
    self.truncated = False  # the last call's prompt was longer than max_prompt_len tokens
    self.last_prompt_len = max_prompt_len  # the last call's prompt length (tasks may have their own)
    self.generated = None   # GELLA: the last ground/panoptic call's generated text (None: teacher-forced)
    # Padded shapes of the batched calls (a server sets its own: `serving.engine`).
    self.buckets = batching.Buckets(prompt_lens=tuple(p for p in batching.Buckets().prompt_lens
                                                      if p < max_prompt_len) + (max_prompt_len,))

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
  @property
  def programs(self) -> batching.Programs:
    """The compiled programs of `self.model` (built at first use, again if the model is replaced)."""
    if self._programs is None or self._programs.model is not self.model:
      self._programs = batching.Programs(self.model)
    return self._programs

  def _inputs(self, image: np.ndarray, prompt: str, box: np.ndarray | None,
              max_prompt_len: int | None = None):
    """→ (the model batch of one image + prompt padded to `max_prompt_len` tokens (default
    `self.max_prompt_len`; `self.truncated` says whether it was cut), its geometry). GELLA's path."""
    max_prompt_len = max_prompt_len or self.max_prompt_len
    b = batching.prepare(self, [image], [prompt], [box], max_prompt_len=max_prompt_len,
                         buckets=batching.Buckets((1,), (max_prompt_len,)))
    self.truncated, self.last_prompt_len = b.truncated[0], max_prompt_len
    return b.arrays, b.geoms[0]

  def _batches(self, images, prompts, boxes=None, max_prompt_len: int | None = None):
    """Checked inputs → (chunk rows, `batching.Batch`) pairs; sets `truncated` (any row cut)."""
    max_prompt_len = max_prompt_len or self.max_prompt_len
    out = []
    for sl in batching.chunks(len(images), self.buckets):
      out.append((sl, batching.prepare(self, images[sl], prompts[sl], None if boxes is None else
                                       boxes[sl], max_prompt_len=max_prompt_len, buckets=self.buckets)))
    self.truncated = any(t for _, b in out for t in b.truncated)
    self.last_prompt_len = max_prompt_len
    return out

  def _check(self, images, texts, what: str) -> tuple[list[np.ndarray], list[str]]:
    if isinstance(images, np.ndarray) and images.ndim == 4:
      images = list(images)
    images = [_check_image(im) for im in images]
    if not images:
      raise ValueError("no images: give a list of at least one image")
    texts = _check_list([texts] * len(images) if isinstance(texts, str) else texts, len(images), what)
    return images, [_check_text(t, what) for t in texts]

  def _to_image(self, boxes: np.ndarray, geom: T.Geometry) -> np.ndarray:
    return geom.inverse_boxes(np.asarray(boxes, np.float32).reshape(-1, 4)).astype(np.float32)

  # -- tasks (batched; the single-image methods call them with a list of one) -------------------------
  def caption_batch(self, images, prompts: str | tp.Sequence[str] = task_lib.LN_TEMPLATES[0],
                    boxes=None, *, max_len: int = 128, num_beams: int = 1,
                    no_repeat_previous: bool = False) -> list[Caption]:
    """Captions (with per-token locations) of each image, or of its box (xyxy image pixels; None
    entries: the whole image); one prompt for all or one per image."""
    images, prompts = self._check(images, prompts, "prompt")
    if boxes is not None:
      boxes = [None if b is None else _check_box(b, *im.shape[:2])
               for b, im in zip(_check_list(boxes, len(images), "boxes"), images)]
    out = []
    for sl, b in self._batches(images, prompts, boxes):
      res, points, _ = self.programs.generate(b.arrays, max_len=max_len, num_beams=num_beams,
                                         no_repeat_previous=no_repeat_previous,
                                         vocab_limit=self.tok.num_ids)
      tokens, lengths, scores = (np.asarray(x) for x in (res.tokens, res.lengths, res.scores))
      points = np.asarray(points)
      for r in range(b.n):
        text, body = batching.text_of(self.tok, [int(t) for t in tokens[r, : lengths[r]]])
        boxes_r = self._to_image(points[r, : len(body)], b.geoms[r])  # each token's 2 points
        out.append(Caption(text=text, pieces=[self.tok.id_to_piece(t) for t in body],
                           points=boxes_r.reshape(-1, 2, 2), boxes=boxes_r, score=float(scores[r]),
                           truncated=b.truncated[r]))
    return out

  def caption(self, image, *, prompt: str = task_lib.LN_TEMPLATES[0], box=None, max_len: int = 128,
              num_beams: int = 1, no_repeat_previous: bool = False) -> Caption:
    """Caption (with per-token locations) of the whole image, or of `box` (xyxy, image pixels)."""
    return self.caption_batch([image], [prompt], [box], max_len=max_len, num_beams=num_beams,
                              no_repeat_previous=no_repeat_previous)[0]

  def region_caption_batch(self, images, boxes, *, max_len: int = 40, num_beams: int = 1) -> list[str]:
    """Location-conditioned captions ("an object of") of one box (xyxy, image pixels) per image."""
    return [c.text for c in self.caption_batch(images, task_lib.REGION_CAPTION, boxes, max_len=max_len,
                                               num_beams=num_beams)]

  def region_caption(self, image, box, *, max_len: int = 40, num_beams: int = 1) -> str:
    """Location-conditioned caption ("an object of") for `box` (xyxy, image pixels)."""
    return self.region_caption_batch([image], [box], max_len=max_len, num_beams=num_beams)[0]

  def referring_batch(self, images, expressions: tp.Sequence[str], *, max_len: int = 40
                      ) -> list[ReferringResult]:
    """`referring` of one expression per image, batched."""
    images, expressions = self._check(images, expressions, "expression")
    out = []
    for sl, b in self._batches(images, [f"where is {e}" for e in expressions]):
      target = np.zeros((b.arrays["image"].shape[0], max_len), np.int32)
      ids = [self.tok.encode(e)[: max_len - 1] + [self.tok.eos_id] for e in expressions[sl]]
      for r, i in enumerate(ids):
        target[r, : len(i)] = i
      target = batching.pad_rows(target[: b.n], target.shape[0])
      arrays = b.arrays | {"target_ids": jax.device_put(target), "target_mask": jax.device_put(target != 0)}
      box, score, logits, iou = (None if x is None else np.asarray(x)
                                 for x in self.programs.refer(arrays))
      for r in range(b.n):
        res = ReferringResult(text=self.tok.decode(ids[r][:-1]), box=self._to_image(box[r], b.geoms[r])[0],
                              score=float(score[r]), truncated=b.truncated[r])
        if logits is not None:
          res.mask = batching.mask_to_image(logits[r: r + 1], b.geoms[r], b.sizes[r])[0]
          res.mask_score = float(iou[r])
        out.append(res)
    return out

  def referring(self, image, expression: str, *, max_len: int = 40) -> ReferringResult:
    """Referring localisation as trained and evaluated (SPEC 1.7): the expression is the prompt
    ("where is …") and the teacher-forced target; the box is the location head's output at the
    position that predicts its EOS. `text` is the expression as scored (cut to `max_len` − 1 tokens),
    `score` its log-likelihood under the model. With a refseg model also the box-prompted mask."""
    return self.referring_batch([image], [expression], max_len=max_len)[0]

  def dense_captions_batch(self, images, *, k: int = 10, max_len: int = 40) -> list[list[DenseCaption]]:
    """`dense_captions` of each image, batched (B images → one decode of B·k regions)."""
    if not self.model.cfg.proposals:
      raise ValueError("dense_captions() needs a model built with proposals=True")
    if k < 1:
      raise ValueError(f"k must be ≥ 1, got {k}")
    images, prompts = self._check(images, task_lib.REGION_CAPTION, "prompt")
    out = []
    for sl, b in self._batches(images, prompts):
      boxes, scores, tokens, lengths = (np.asarray(x) for x in self.programs.dense(
          b.arrays, k=k, max_len=max_len, vocab_limit=self.tok.num_ids))
      for r in range(b.n):
        rb = self._to_image(boxes[r] * self.size, b.geoms[r])
        out.append([DenseCaption(box=rb[i], score=float(scores[r, i]), text=batching.text_of(
            self.tok, [int(t) for t in tokens[r, i, : lengths[r, i]]])[0]) for i in range(rb.shape[0])])
    return out

  def dense_captions(self, image, *, k: int = 10, max_len: int = 40) -> list[DenseCaption]:
    """Dense captioning: the proposal head's top-k boxes, each captioned ("an object of")."""
    return self.dense_captions_batch([image], k=k, max_len=max_len)[0]

  def segment_batch(self, images, questions: tp.Sequence[str], *, max_len: int = 40,
                    max_prompt_len: int | None = None) -> list[Segmentation]:
    """`segment` of one question per image, batched; `max_prompt_len` (default the model's) bounds
    the question's tokens (a chat history needs more)."""
    if not self.model.cfg.lisa:
      raise ValueError("segment() needs a model built with lisa=True")
    images, questions = self._check(images, questions, "question")
    out = []
    for sl, b in self._batches(images, questions, max_prompt_len=max_prompt_len):
      res, _, (sam, visual) = self.programs.generate(b.arrays, max_len=max_len, num_beams=1,
                                                no_repeat_previous=False, vocab_limit=self.tok.num_ids)
      tokens, lengths = np.asarray(res.tokens), np.asarray(res.lengths)
      ids = [[int(t) for t in tokens[r, : lengths[r]]] for r in range(b.n)]
      seg = self.model.cfg.seg_token_id
      positions = [[t for t, tok in enumerate(i) if tok == seg] for i in ids]
      masks = batching.row_masks(self.programs, res.hidden, positions, sam, visual,
                                 b.arrays["image_mask"], b)
      out += [Segmentation(batching.text_of(self.tok, i)[0], m, s, truncated=t)
              for i, (m, s), t in zip(ids, masks, b.truncated)]
    return out

  def segment(self, image, question: str, *, max_len: int = 40) -> Segmentation:
    """LISA: answer `question`; one mask per `[SEG]` in the answer (original image resolution)."""
    return self.segment_batch([image], [question], max_len=max_len)[0]

  def segment_stream(self, images, questions: tp.Sequence[str], *, max_len: int = 40, chunk: int = 4,
                     max_prompt_len: int | None = None):
    """`segment_batch` streamed: yields a `streaming.StreamUpdate` (each row's text and masks so far)
    after every `chunk` decoder positions; a `[SEG]`'s mask comes with the chunk that generated it."""
    from pixelground.inference import streaming
    if not self.model.cfg.lisa:
      raise ValueError("segment_stream() needs a model built with lisa=True")
    images, questions = self._check(images, questions, "question")
    if len(images) > self.buckets.batch_sizes[-1]:
      raise ValueError(f"segment_stream: {len(images)} images; at most {self.buckets.batch_sizes[-1]} "
                       f"(the largest batch bucket) per call")
    return streaming.segment_stream(self, images, questions, max_len=max_len, chunk=chunk,
                                    max_prompt_len=max_prompt_len)

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


mask_to_image = batching.mask_to_image  # (K, S, S) logits → (K, H, W) bool of the original image
_masks = nnx.jit(batching._seg_masks)  # (model, hidden, positions, sam, visual, image_mask)


def teacher_forced_points(model, batch: dict[str, tp.Any]) -> np.ndarray:
  """Location-head outputs (B, T, 4) pixels of the model input under teacher forcing (for checks)."""
  return np.asarray(nnx.jit(lambda m, b: m(b)["points"])(model, batch))
