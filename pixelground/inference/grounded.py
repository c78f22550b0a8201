"""GELLA inference on one image (SPEC 1.10): entity grounding of a caption's noun phrases and panoptic
segmentation from a category list. `Predictor.ground` / `Predictor.panoptic` delegate here.

Entities are class-agnostic masks of the ORIGINAL image given by the caller: an (E, H, W) bool stack, or
an (H, W) integer id map (0 = void, every other id one entity: a COCO panoptic PNG decoded with
`pixelground.metrics.panoptic.read_panoptic_png`, a grayscale or indexed PNG). They are resized to the
model input with the image's geometry (`transforms.resize_pad`, nearest neighbour) and padded to the
model's entity slots (`Predictor.max_entities`, the training `config.data.max_entities`); an entity
that vanishes at the model's resolution is an invalid slot (never owned). Without entities
(`entities=None`) they are SAM's automatic masks of the image (`Predictor.auto_masks`, default options;
`auto_masks.entity_id_map`: the model's slot count of highest predicted IoU, smaller masks on top).

    ground(image, caption, entities, phrases=None) → [GroundedPhrase], one per noun phrase:
      prompt = the caption; with `phrases` the target is teacher-forced exactly as
      `Converters.narrative_grounding` writes it ("phrase [SEG] phrase [SEG] … EOS"), without them it is
      generated greedily and the phrases are the texts before each generated `[SEG]` (none generated →
      an empty list, not an error: the model found nothing to ground). Each phrase owns the entities its
      association logit puts above 0, else its best one (`grounding.phrase_entities`); its mask is the
      union of those entities' ORIGINAL-resolution masks, its score the highest association
      probability (sigmoid) among them.
    panoptic(image, entities, categories) → (id_map (H, W) int32, segments_info): prompt = the category
      display names joined by ", " in id order (as `Converters.panoptic` at evaluation); generated
      "name [SEG]" pairs; each entity takes the category of its best-associated parsable name
      (`grounding.panoptic_prediction`: stuff entities of one category merged, 0 = void).

Bad calls raise ValueError (the CLI's exit-2 path) naming the problem: no entities, more entities than
the model's slots / colormap colours, an id map of another size than the image, a caption without words
or an empty phrase list, a model without GELLA parts, no category list.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import typing as tp
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pixelground.data import transforms as T
from pixelground.inference import decoding
from pixelground.inference import grounding
from pixelground.models import gella as gella_lib

PHRASE_TRIM = " \t\r\n,.;:"  # stripped from generated phrase texts (as the panoptic scorer does)


@dataclasses.dataclass
class GroundedPhrase:
  text: str
  span: tuple[int, int]  # [start, end) character offsets in the caption; (-1, -1) when not found
  entities: list[int]    # owned entities: indices into the (E, H, W) stack, or ids of the id map
  mask: np.ndarray       # (H, W) bool of the original image: the union of the owned entities' masks
  score: float           # highest association probability (sigmoid) among the owned entities


@dataclasses.dataclass
class Entities:
  """Entities ready for the model: `masks` (E, H, W) bool of the original image, `labels` (E,) int64
  (what results report: stack indices or id-map ids), `model_masks` (M, S, S) bool padded to the M
  model slots, `valid` (M,) bool (False: padding, or an entity that vanished at the model's size)."""
  masks: np.ndarray
  labels: np.ndarray
  model_masks: np.ndarray
  valid: np.ndarray

  def batch(self) -> dict[str, jnp.ndarray]:
    return {"entity_masks": jax.device_put(self.model_masks[None]),
            "entity_valid": jax.device_put(self.valid[None])}


# ----------------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------------

def require_gella(model, what: str) -> None:
  if getattr(model.cfg, "gella", None) is None:
    raise ValueError(f"{what}() needs a GELLA model (PixelLLMConfig.gella, e.g. configs/png_gella_t5xl.py "
                     f"or configs/panoptic_gella_t5xl.py); this model has no entity-grounding parts")


def check_caption(caption) -> str:
  """A caption to ground: a string with at least one word character (else no noun phrase can exist)."""
  if not isinstance(caption, str) or not caption.strip():
    raise ValueError(f"caption must be a non-empty string; got {caption!r}")
  if not re.search(r"\w", caption):
    raise ValueError(f"caption {caption!r} has no words: no noun phrase to ground")
  return caption


def check_phrases(phrases) -> list[str]:
  if isinstance(phrases, str) or not isinstance(phrases, Sequence):
    raise ValueError(f"phrases must be a list of noun-phrase strings; got {phrases!r}")
  out = []
  for i, p in enumerate(phrases):
    if not isinstance(p, str) or not p.strip():
      raise ValueError(f"phrases[{i}] must be a non-empty string; got {p!r}")
    out.append(p.strip())
  if not out:
    raise ValueError("phrases is empty: no noun phrase to ground")
  return out


def entity_labels(entities, hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
  """Validates `entities` for an image of size `hw` = (H, W) → (the entities as given (E, H, W) bool
  or (H, W) int64 id map, labels (E,) int64: stack indices, or the id map's non-zero ids ascending)."""
  if entities is None:
    raise ValueError("entity masks are needed: pass an (E, H, W) bool array or an (H, W) integer id map "
                     "(0 = void; e.g. a panoptic PNG)")
  arr = np.asarray(entities)
  if arr.ndim == 3:
    if tuple(arr.shape[1:]) != tuple(hw):
      raise ValueError(f"entity masks are {arr.shape[2]}×{arr.shape[1]} (W×H) but the image is "
                       f"{hw[1]}×{hw[0]}; they must be masks of the same image")
    masks = arr.astype(bool) if arr.dtype != np.bool_ else arr
    if masks.shape[0] == 0 or not masks.any():
      raise ValueError("no entities: every entity mask is empty (at least one non-empty mask is needed)")
    return masks, np.arange(masks.shape[0], dtype=np.int64)
  if arr.ndim == 2:
    if tuple(arr.shape) != tuple(hw):
      raise ValueError(f"the entity id map is {arr.shape[1]}×{arr.shape[0]} (W×H) but the image is "
                       f"{hw[1]}×{hw[0]}; it must label the pixels of the same image")
    if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
      raise ValueError(f"the entity id map must hold integer ids (0 = void); got dtype {arr.dtype}")
    ids = arr.astype(np.int64)
    if ids.min() < 0:
      raise ValueError("the entity id map has negative ids; ids must be ≥ 0 (0 = void)")
    labels = np.unique(ids)
    labels = labels[labels != 0]
    if not len(labels):
      raise ValueError("no entities: the id map is all 0 (void); at least one non-zero id is needed")
    return ids, labels
  raise ValueError(f"entities must be an (E, H, W) bool array or an (H, W) id map; got shape {arr.shape}")


def entity_limit(predictor) -> int:
  """The most entities the model takes: its entity slots (`max_entities`) and colormap colours."""
  colours = predictor.model.cfg.gella.max_colours
  return min(colours, predictor.max_entities) if predictor.max_entities else colours


def check_count(predictor, n: int) -> None:
  colours = predictor.model.cfg.gella.max_colours
  if n > entity_limit(predictor):
    slots = (f"{predictor.max_entities} entity slots (config.data.max_entities)"
             if predictor.max_entities else "no slot limit")
    raise ValueError(f"{n} entities exceed what the model takes: {slots} and {colours} distinct "
                     f"colormap colours; give at most {entity_limit(predictor)} entities")


def auto_entities(predictor, image: np.ndarray) -> np.ndarray:
  """SAM's automatic masks of `image` as an (H, W) entity id map (see the module docstring)."""
  from pixelground.inference.auto_masks import entity_id_map
  ids = entity_id_map(predictor.auto_masks(image), image.shape[:2], entity_limit(predictor))
  if not ids.any():
    raise ValueError("no entities: SAM's automatic mask generator found no mask in the image; pass "
                     "entity masks or an id map")
  return ids


def prepare_entities(predictor, entities, hw: tuple[int, int], image: np.ndarray | None = None
                     ) -> Entities:
  """Validated, resized and padded entities (`Entities`) for one image of size `hw`; without
  `entities`, SAM's automatic masks of `image`."""
  if entities is None and image is not None:
    entities = auto_entities(predictor, image)
  given, labels = entity_labels(entities, hw)
  check_count(predictor, len(labels))
  geom = T.resize_pad(hw[0], hw[1], predictor.size)
  if given.ndim == 2:  # id map: resize the ids once, then split
    small = T.apply_label_map(given, geom, fill=0)
    model = small[None] == labels[:, None, None]
    masks = given[None] == labels[:, None, None]
  else:
    model, masks = T.apply_masks(given, geom), given
  e = len(labels)
  m = predictor.max_entities or -(-e // 8) * 8
  padded = np.zeros((m,) + model.shape[1:], bool)
  padded[:e] = model
  valid = padded.any(axis=(1, 2))
  if not valid.any():
    raise ValueError(f"no entities: all {e} entities vanish at the model's {predictor.size}-px input "
                     "(each is smaller than one model pixel)")
  return Entities(masks, labels, padded, valid)


def check_categories(categories) -> list[dict]:
  """COCO panoptic categories (a list of {"id", "name", "isthing"}, or a JSON dict holding one under
  "categories") → the list sorted by id (the builder's metadata order)."""
  if isinstance(categories, Mapping) and "categories" in categories:
    categories = categories["categories"]
  if categories is None or isinstance(categories, (str, bytes)) or not isinstance(categories, Sequence):
    raise ValueError("panoptic() needs the category list: pass categories=[{'id', 'name', 'isthing'}, ...] "
                     "(the checkpoint's panoptic dataset metadata is not available here)")
  out = []
  for i, c in enumerate(categories):
    if not isinstance(c, Mapping) or not {"id", "name", "isthing"} <= set(c):
      raise ValueError(f"categories[{i}] must be a dict with 'id', 'name' and 'isthing'; got {c!r}")
    out.append(dict(c))
  if not out:
    raise ValueError("categories is empty: panoptic() needs at least one category")
  return sorted(out, key=lambda c: int(c["id"]))


def checkpoint_categories(config) -> list[dict] | None:
  """The category list of `config`'s panoptic task (its prepared dataset's metadata), or None when
  there is no such task or its dataset is not prepared here."""
  if config is None:
    return None
  try:
    from pixelground.training import datasets

    for name, t in config.tasks.items():
      if config.converter(name) != "panoptic":
        continue
      builder = datasets.open_builder(t.dataset, datasets.data_dir(config), f"config.tasks.{name}")
      cats = builder.info.metadata.get("categories") if builder.info.metadata else None
      if cats:
        return list(cats)
  except Exception:  # noqa: BLE001 — no data here: the caller asks for `categories=`
    return None
  return None


# ----------------------------------------------------------------------------------------------------
# Text
# ----------------------------------------------------------------------------------------------------

def phrase_spans(caption: str, phrases: Sequence[str]) -> list[tuple[int, int]]:
  """[start, end) of each phrase's first case-insensitive occurrence in `caption` after the previous
  found span; (-1, -1) when not found (or empty)."""
  low, cursor, out = caption.lower(), 0, []
  for p in phrases:
    p = p.strip().lower()
    i = low.find(p, cursor) if p else -1
    if i < 0:
      out.append((-1, -1))
    else:
      out.append((i, i + len(p)))
      cursor = i + len(p)
  return out


def teacher_target(tok, phrases: Sequence[str], seg_id: int) -> tuple[list[int], list[int]]:
  """"phrase [SEG] phrase [SEG] … EOS" as `Converters.narrative_grounding` writes it → (ids, position
  of each `[SEG]` in ids)."""
  ids, positions = [], []
  for p in phrases:
    ids.extend(tok.encode(p))
    positions.append(len(ids))
    ids.append(seg_id)
  return ids + [tok.eos_id], positions


def split_generated(tok, tokens: Sequence[int], seg_id: int) -> tuple[list[str], list[int]]:
  """Generated ids → (the text before each `[SEG]` (after the previous one), each `[SEG]`'s position)."""
  texts, positions, start = [], [], 0
  for t, tok_id in enumerate(tokens):
    if tok_id == seg_id:
      body = [i for i in tokens[start:t] if i != tok.eos_id]
      texts.append(tok.decode(body).strip(PHRASE_TRIM))
      positions.append(t)
      start = t + 1
  return texts, positions


def prompt_len(predictor, converter: str) -> int:
  """The prompt length the checkpoint's `converter` task was trained with (its own `TaskSpec` length
  where the config sets one), else the predictor's."""
  config = predictor.config
  for name in (config.tasks if config is not None else ()):
    if config.converter(name) == converter:
      try:
        return config.task_config(train=False, task=name).max_prompt_len
      except TypeError:  # a config API without per-task lengths
        return config.data.max_prompt_len
  return predictor.max_prompt_len


def _bucket(n: int, step: int) -> int:
  return max(step, -(-n // step) * step)


# ----------------------------------------------------------------------------------------------------
# Device functions
# ----------------------------------------------------------------------------------------------------

@nnx.jit
def _teacher_forced(model, batch):
  """(1, K, M) association logits of the teacher-forced `[SEG]` positions (`seg_positions`)."""
  return model(batch, heads=("gella",))["assoc_logits"]


@functools.partial(nnx.jit, static_argnames=("max_len", "vocab_limit"))
def _generated(model, batch, *, max_len: int, vocab_limit: int | None):
  """Greedy decoding over the entity-blended features → (tokens (1, L), lengths (1,), association
  logits (1, L, M) of every generated step: the host picks the `[SEG]`-predicting rows)."""
  fused, _, entities = model.features(batch)
  _, prefix, prefix_mask = model.prefix(fused, batch["prompt_box"], entities)
  ids = batch["prompt_ids"]
  res = decoding.generate(model.t5, ids, ids != model.cfg.t5.pad_id, max_len=max_len,
                          prefix_embeds=prefix, prefix_mask=prefix_mask, vocab_limit=vocab_limit)
  emb, _ = model.entity_outputs(entities)
  steps = jnp.broadcast_to(jnp.arange(res.tokens.shape[1])[None], res.tokens.shape)
  nouns, ents = model.associate(res.hidden, steps, emb)
  return res.tokens, res.lengths, gella_lib.association_logits(nouns, ents)


def _seg_id(predictor) -> int:
  sid = predictor.model.cfg.seg_token_id
  return sid if sid >= 0 else predictor.tok.token_id("[SEG]")


def _generate(predictor, batch, max_len: int) -> tuple[list[str], list[int], np.ndarray]:
  """→ (phrase texts, `[SEG]` positions, their association logits (K, M)); sets `generated`."""
  tokens, lengths, logits = _generated(predictor.model, batch, max_len=max_len,
                                       vocab_limit=predictor.tok.num_ids)
  tokens, lengths, logits = np.asarray(tokens), np.asarray(lengths), np.asarray(logits)  # host slicing:
  toks = [int(t) for t in tokens[0, : int(lengths[0])]]  # no eager program per answer length
  predictor.generated = predictor.tok.decode(toks)
  texts, pos = split_generated(predictor.tok, toks, _seg_id(predictor))
  return texts, pos, logits[0][np.asarray(pos, np.int64)]


# ----------------------------------------------------------------------------------------------------
# Tasks
# ----------------------------------------------------------------------------------------------------

def ground(predictor, image, caption: str, entities=None, *, phrases: Sequence[str] | None = None,
           max_len: int = 128) -> list[GroundedPhrase]:
  """See the module docstring; `max_len` bounds the generated tokens (no `phrases`)."""
  from pixelground.inference.predictor import _check_image

  require_gella(predictor.model, "ground")
  image = _check_image(image)
  caption = check_caption(caption)
  given = None if phrases is None else check_phrases(phrases)
  ents = prepare_entities(predictor, entities, image.shape[:2], image)
  batch, _ = predictor._inputs(image, caption, None, prompt_len(predictor, "narrative_grounding"))
  batch |= ents.batch()
  if given is not None:
    predictor.generated = None
    ids, pos = teacher_target(predictor.tok, given, _seg_id(predictor))
    target = np.zeros((1, _bucket(len(ids), 16)), np.int32)
    target[0, : len(ids)] = ids
    positions = np.zeros((1, _bucket(len(pos), 4)), np.int32)
    positions[0, : len(pos)] = pos
    batch |= {"target_ids": jax.device_put(target), "target_mask": jax.device_put(target != 0),
              "seg_positions": jax.device_put(positions)}
    logits = np.asarray(_teacher_forced(predictor.model, batch))[0, : len(pos)]
    texts = given
  else:
    texts, _, logits = _generate(predictor, batch, max_len)
  if not texts:
    return []
  own = grounding.phrase_entities(logits, None, ents.valid)[:, : len(ents.labels)]
  probs = 1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64)))
  out = []
  for k, (text, span) in enumerate(zip(texts, phrase_spans(caption, texts))):
    idx = np.flatnonzero(own[k])
    mask = ents.masks[idx].any(axis=0) if len(idx) else np.zeros(image.shape[:2], bool)
    out.append(GroundedPhrase(text=text, span=span, entities=[int(x) for x in ents.labels[idx]],
                              mask=mask, score=float(probs[k, idx].max()) if len(idx) else 0.0))
  return out


def panoptic(predictor, image, entities=None, *, categories=None, max_len: int = 128
             ) -> tuple[np.ndarray, list[dict[str, tp.Any]]]:
  """See the module docstring. `categories` (COCO panoptic {"id", "name", "isthing"} dicts): default
  the checkpoint's panoptic dataset metadata (`Predictor.panoptic_categories`)."""
  from pixelground.inference.predictor import _check_image

  require_gella(predictor.model, "panoptic")
  image = _check_image(image)
  cats = check_categories(categories if categories is not None else predictor.panoptic_categories())
  ents = prepare_entities(predictor, entities, image.shape[:2], image)
  prompt = ", ".join(grounding.category_display_name(str(c["name"])) for c in cats)
  batch, _ = predictor._inputs(image, prompt, None, prompt_len(predictor, "panoptic"))
  batch |= ents.batch()
  names, _, logits = _generate(predictor, batch, max_len)
  lookup = grounding.category_lookup(cats)
  noun_cats = [grounding.parse_category(n, lookup) for n in names]
  noun_cats = np.asarray([-1 if c is None else c for c in noun_cats], np.int64)
  e = len(ents.labels)
  id_map, segments = grounding.panoptic_prediction(logits[:, :e], ents.masks, ents.valid[:e], noun_cats,
                                                   cats)
  return id_map.astype(np.int32), segments
