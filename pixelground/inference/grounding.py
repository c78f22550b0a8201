"""GELLA post-processing (pure numpy): noun↔entity association logits → phrase masks (Panoptic Narrative
Grounding) and → a COCO panoptic prediction (SPEC sections 1.10, 5.3, 5.5, 6).

GELLA writes K semantic nouns, each followed by `[SEG]`, and scores every (noun, entity) pair with an
association logit (K, E); the E entities are class-agnostic masks (ground-truth panoptic segments in
training, SAM automatic masks at test time).

* `phrase_entities` / `phrase_masks`: noun k owns every valid entity with logit > 0 (sigmoid > 0.5); a
  valid noun owning none falls back to its argmax valid entity; its mask is the union of its entities'
  masks (what `pixelground.metrics.png` scores).
* `panoptic_prediction`: each entity takes the category of its best-associated noun (among nouns whose
  generated name parsed to a category, see `category_lookup` / `parse_category`); entities are painted
  largest first so smaller ones stay visible; a stuff category is one segment per image (COCO panoptic),
  a thing keeps one segment per entity. Output: a segment-id map + `segments_info` for `PQAccumulator`.
* `write_coco_panoptic` / `read_coco_panoptic`: the COCO panoptic results format (RGB-encoded id PNGs
  plus one JSON) that the official `panopticapi` evaluation reads.
"""

from __future__ import annotations

import json
import os
import re
import typing as tp
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from pixelground.metrics.panoptic import id_to_rgb, read_panoptic_png

PRED_DIR = "panoptic_pred"  # PNG folder and JSON stem written by `write_coco_panoptic`


def _sigmoid(x) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free


def _valid(valid, n: int, what: str) -> np.ndarray:
  """(n,) bool validity flags; None → all valid."""
  if valid is None:
    return np.ones(n, bool)
  valid = np.asarray(valid, bool).reshape(-1)
  if valid.shape != (n,):
    raise ValueError(f"{what} has shape {valid.shape}, expected ({n},)")
  return valid


def _logits(logits, num_entities: int | None = None) -> np.ndarray:
  logits = np.asarray(logits, np.float64)
  if logits.ndim != 2 or (num_entities is not None and logits.shape[1] != num_entities):
    raise ValueError(f"logits must be (K, E{'' if num_entities is None else f' = {num_entities}'}), "
                     f"got {logits.shape}")
  return logits


def _entity_masks(entity_masks) -> np.ndarray:
  masks = np.asarray(entity_masks).astype(bool)
  if masks.ndim != 3:
    raise ValueError(f"entity_masks must be (E, H, W), got {masks.shape}")
  return masks


# -- phrase grounding (PNG) ----------------------------------------------------------------------------

def phrase_entities(logits, noun_valid=None, entity_valid=None) -> np.ndarray:
  """Which entities each noun owns.

  Args:
    logits: (K, E) float association logits (noun × entity).
    noun_valid: (K,) bool, or None for all valid; invalid nouns own nothing.
    entity_valid: (E,) bool, or None for all valid; invalid entities are never owned.

  Returns:
    (K, E) bool: valid noun k owns every valid entity with logit > 0 (sigmoid > 0.5); if there is
    none, it owns its argmax valid entity (the first on ties). Nothing is owned when no entity is valid.
    A non-finite logit is no association: a noun whose valid logits are all non-finite owns nothing.
  """
  logits = _logits(logits)
  k, e = logits.shape
  noun_valid = _valid(noun_valid, k, "noun_valid")
  entity_valid = _valid(entity_valid, e, "entity_valid")
  usable = np.isfinite(logits) & entity_valid[None, :]
  own = (np.where(usable, logits, -np.inf) > 0) & noun_valid[:, None]
  masked = np.where(usable, logits, -np.inf)
  fallback = noun_valid & ~own.any(axis=1) & usable.any(axis=1)
  own[np.flatnonzero(fallback), np.argmax(masked[fallback], axis=1)] = True
  return own


def phrase_masks(logits, entity_masks, noun_valid=None, entity_valid=None) -> np.ndarray:
  """Per-noun predicted masks: the union of the entities each noun owns (`phrase_entities`).

  Args:
    logits: (K, E) float association logits.
    entity_masks: (E, H, W) bool entity masks.
    noun_valid: (K,) bool or None (all valid); entity_valid: (E,) bool or None (all valid).

  Returns:
    (K, H, W) bool; an invalid noun's mask is empty.
  """
  masks = _entity_masks(entity_masks)
  own = phrase_entities(_logits(logits, masks.shape[0]), noun_valid, entity_valid)
  # (K, E) @ (E, H·W) counts owned entities per pixel; > 0 is the union.
  counts = own.astype(np.int32) @ masks.reshape(masks.shape[0], -1).astype(np.int32)
  return (counts > 0).reshape((own.shape[0],) + masks.shape[1:])


# -- category names ------------------------------------------------------------------------------------

def category_display_name(name: str) -> str:
  """COCO panoptic category name → the name the model reads and writes ("sky-other-merged" → "sky",
  "wall-brick" → "wall brick"): drop "-merged" and "-other", then hyphens become spaces."""
  return name.replace("-merged", "").replace("-other", "").replace("-", " ")


_TRIM = " \t\r\n.,;:!?\"'`()[]{}"


def _normalise(text: str) -> str:
  return " ".join(category_display_name(text).lower().strip(_TRIM).split())


def category_lookup(categories: Iterable[Mapping]) -> dict[str, int]:
  """{display name (lower-cased, stripped, single spaces): category id} for COCO panoptic `categories`
  (dicts with "id" and "name"). Raises if two categories share a display name."""
  out: dict[str, int] = {}
  for c in categories:
    key = _normalise(str(c["name"]))
    if key in out and out[key] != int(c["id"]):
      raise ValueError(f"categories {out[key]} and {c['id']} share the display name {key!r}")
    out[key] = int(c["id"])
  return out


def parse_category(text: str, lookup: Mapping[str, int]) -> int | None:
  """A generated category name → its id via `category_lookup`'s table, or None if unknown. Tolerates
  case, surrounding / repeated whitespace, surrounding punctuation and quotes, and raw COCO spellings
  ("sky-other-merged")."""
  return lookup.get(_normalise(text))


# -- panoptic prediction -------------------------------------------------------------------------------

def _isthing_table(categories) -> dict[int, bool]:
  if isinstance(categories, Mapping):
    return {int(k): bool(v) for k, v in categories.items()}
  return {int(c["id"]): bool(c["isthing"]) for c in categories}


def _bbox(mask: np.ndarray) -> list[int]:
  """(H, W) bool, non-empty → COCO [x, y, w, h] in pixels (w = x_max − x_min + 1, as COCO panoptic)."""
  rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
  return [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]


def entity_categories(logits, entity_valid, noun_categories,
                      categories) -> tuple[np.ndarray, np.ndarray]:
  """Category of each entity from its best-associated usable noun.

  Args:
    logits: (K, E) float association logits.
    entity_valid: (E,) bool or None (all valid).
    noun_categories: (K,) int category id per noun; −1 (or any id not in `categories`) = unusable.
    categories: COCO panoptic categories (dicts with "id", "isthing") or {id: isthing}.

  Returns:
    (category (E,) int64, 0 = void; score (E,) float64 = sigmoid of the winning logit, 0 for void).
    Non-finite logits are no association: an entity with no finite logit to a usable noun is void.
  """
  logits = _logits(logits)
  k, e = logits.shape
  entity_valid = _valid(entity_valid, e, "entity_valid")
  noun_categories = np.asarray(noun_categories, np.int64).reshape(-1)
  if noun_categories.shape != (k,):
    raise ValueError(f"noun_categories has shape {noun_categories.shape}, expected ({k},)")
  table = _isthing_table(categories)
  known = np.array([int(c) in table for c in noun_categories], bool).reshape(k)
  category, score = np.zeros(e, np.int64), np.zeros(e, np.float64)
  usable = known[:, None] & np.isfinite(logits)
  if usable.any():
    masked = np.where(usable, logits, -np.inf)
    best = np.argmax(masked, axis=0)  # (E,)
    has = entity_valid & usable.any(axis=0)
    category = np.where(has, noun_categories[best], 0)
    score = np.where(has, _sigmoid(masked[best, np.arange(e)]), 0.0)
  return category, score


def panoptic_prediction(logits, entity_masks, entity_valid, noun_categories, categories, *,
                        min_area: int = 0, min_score: float = 0.0
                        ) -> tuple[np.ndarray, list[dict[str, tp.Any]]]:
  """A COCO panoptic prediction for one image from GELLA's nouns and entities.

  Args:
    logits: (K, E) float association logits.
    entity_masks: (E, H, W) bool entity masks (may overlap).
    entity_valid: (E,) bool or None (all valid).
    noun_categories: (K,) int category id of each noun's generated name; −1 = unknown / invalid noun
      (ids absent from `categories` count as unknown too).
    categories: COCO panoptic categories (dicts with "id", "isthing") or {id: isthing}.
    min_area: an entity whose painted (visible) area is below this many pixels is dropped (→ void).
    min_score: an entity whose winning association probability (sigmoid) is below this is void;
      0 keeps every entity that has a usable noun.

  Returns:
    id_map: (H, W) int32 segment ids, 0 = void, segments numbered 1..N.
    segments_info: N dicts {"id", "category_id", "isthing" (0/1), "area" (pixels), "bbox" [x, y, w, h]
      (pixels), "score" (sigmoid of the winning logit; the max over a merged stuff segment)}, in
      order of id. Each valid entity with a usable noun takes that noun's category; entities are
      painted in decreasing mask area (ties: index order), so a smaller entity stays visible on top of
      a larger one. All entities of one stuff category (isthing 0) form one segment; a thing entity is
      its own segment. Segments are numbered in order of their first entity's index.
  """
  masks = _entity_masks(entity_masks)
  e, h, w = masks.shape
  isthing = _isthing_table(categories)
  category, score = entity_categories(_logits(logits, e), entity_valid, noun_categories, isthing)
  category = np.where(score >= min_score, category, 0)
  areas = masks.reshape(e, -1).sum(axis=1)
  owner = np.full((h, w), -1, np.int64)  # entity painted last on each pixel
  for i in sorted(np.flatnonzero((category > 0) & (areas > 0)), key=lambda i: (-areas[i], i)):
    owner[masks[i]] = i
  visible = np.bincount(owner[owner >= 0], minlength=e) if e else np.zeros(0, np.int64)
  kept = [i for i in range(e) if category[i] > 0 and visible[i] > 0 and visible[i] >= min_area]
  groups: dict[tuple[int, int], list[int]] = {}  # (category, entity or −1 for stuff) → entities
  for i in kept:
    cat = int(category[i])
    groups.setdefault((cat, i if isthing[cat] else -1), []).append(i)
  lut = np.zeros(e + 1, np.int32)  # entity index + 1 → segment id (index 0: unpainted → void)
  segments_info = []
  for sid, ((cat, _), members) in enumerate(groups.items(), start=1):
    lut[np.asarray(members) + 1] = sid
    segments_info.append({"id": sid, "category_id": cat, "isthing": int(isthing[cat]),
                          "score": float(max(score[i] for i in members))})
  id_map = lut[owner + 1]
  for s in segments_info:
    seg = id_map == s["id"]
    s["area"], s["bbox"] = int(seg.sum()), _bbox(seg)
  return id_map, segments_info


# -- COCO panoptic results files -----------------------------------------------------------------------

def _jsonable(x):
  if isinstance(x, Mapping):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple, np.ndarray)):
    return [_jsonable(v) for v in x]
  if isinstance(x, np.bool_):
    return bool(x)
  if isinstance(x, np.integer):
    return int(x)
  if isinstance(x, np.floating):
    return float(x)
  return x


def png_file_name(file_name: str) -> str:
  """The PNG name of an image in the results: its base name with the extension replaced by ".png"."""
  return os.path.splitext(os.path.basename(str(file_name)))[0] + ".png"


def write_coco_panoptic(out_dir, predictions: Sequence[tuple[int, str, tp.Any, Sequence[Mapping]]],
                        categories: Sequence[Mapping]) -> str:
  """Writes predictions in the COCO panoptic results format.

  Args:
    out_dir: folder to write into (created if needed).
    predictions: (image_id, file_name, id_map (H, W) int in [0, 256³), segments_info) per image;
      file_name is the image's (or PNG's) name: the PNG is `png_file_name(file_name)`.
    categories: the COCO panoptic categories, copied into the JSON.

  Writes out_dir/panoptic_pred/<name>.png (RGB, id = R + 256·G + 256²·B) per image and
  out_dir/panoptic_pred.json = {"annotations": [{"image_id", "file_name", "segments_info"}],
  "categories"}. Returns the JSON's path.
  """
  from PIL import Image

  png_dir = os.path.join(os.fspath(out_dir), PRED_DIR)
  os.makedirs(png_dir, exist_ok=True)
  annotations, seen = [], set()
  for image_id, file_name, id_map, segments_info in predictions:
    name = png_file_name(file_name)
    if name in seen:
      raise ValueError(f"two predictions write the same PNG {name!r}")
    seen.add(name)
    id_map = np.asarray(id_map)
    if id_map.ndim != 2:
      raise ValueError(f"image {image_id}: id_map must be (H, W), got {id_map.shape}")
    Image.fromarray(id_to_rgb(id_map)).save(os.path.join(png_dir, name))
    annotations.append({"image_id": _jsonable(image_id), "file_name": name,
                        "segments_info": _jsonable(list(segments_info))})
  path = os.path.join(os.fspath(out_dir), PRED_DIR + ".json")
  with open(path, "w", encoding="utf-8") as f:
    json.dump({"annotations": annotations, "categories": _jsonable(list(categories))}, f)
  return path


def read_coco_panoptic(json_path) -> dict[int, tuple[np.ndarray, list[dict]]]:
  """Reads `write_coco_panoptic`'s output (or any COCO panoptic JSON whose PNG folder is the JSON's
  path without ".json") → {image_id: (id_map (H, W) int64, segments_info)}."""
  json_path = os.fspath(json_path)
  png_dir = re.sub(r"\.json$", "", json_path)
  with open(json_path, encoding="utf-8") as f:
    data = json.load(f)
  return {a["image_id"]: (read_panoptic_png(os.path.join(png_dir, a["file_name"])), a["segments_info"])
          for a in data["annotations"]}
