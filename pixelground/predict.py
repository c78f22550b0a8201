r"""Try a checkpoint on one image: prints the result and draws it.

    python -m pixelground.predict --checkpoint=workdir/demo --image=photo.jpg --task=caption --out=cap.png
    python -m pixelground.predict --checkpoint=workdir/demo --image=photo.jpg --task=refer \
        --text="the red circle" --out=ref.png
    python -m pixelground.predict ... --task=segment --text="Which shape has the most corners?"
    python -m pixelground.predict ... --task=densecap [--top_k=5]
    python -m pixelground.predict ... --task=caption --box=10,20,120,200     (location-conditioned)
    python -m pixelground.predict --checkpoint=/ckpt/png_gella --image=photo.jpg --task=ground \
        --text="a man walks a dog on the beach" [--phrases="a man;a dog;the beach"] --entities=ids.png
    python -m pixelground.predict ... --task=panoptic --entities=ids.png [--categories=cats.json]
    python -m pixelground.predict --sam=/ckpt/sam_vit_h_4b8939.pth --image=photo.jpg --task=masks \
        [--points_per_side=32 --crop_n_layers=1 --rle_out=masks.json] --out=masks.png

Tasks: caption (with a per-word trace; with --box: a caption of that region), refer (box + mask),
segment (LISA `[SEG]` masks), densecap (proposals with captions); with a GELLA checkpoint ground (the
noun phrases of --text, given by --phrases or generated, each grounded to entities of --entities) and
panoptic (each entity of --entities gets a category); masks (SAM's automatic mask generator: every
mask drawn, --rle_out writes them as COCO RLE records; needs --sam or a checkpoint with SAM's encoder
and mask decoder). --entities is an id-map PNG of the same size as the image: RGB in the COCO panoptic
encoding (id = R + 256·G + 256²·B) or single-channel ids (grayscale, 16-bit, indexed); 0 = void, every
other id one entity; without --entities the entities are SAM's automatic masks (--sam or the
checkpoint's SAM). --categories: a COCO panoptic categories JSON (a list, or a dict with
"categories"); default the checkpoint's panoptic dataset.
ground without --phrases: when the model writes no noun phrase the result is empty, with a warning
(exit 0); a --text without any word has no noun phrase to ground (exit 2).
Boxes are x0,y0,x1,y1 in pixels of the image as stored. The config defaults to the config.json the
trainer wrote next to the checkpoints. The printed result's last line is JSON. Bad inputs (unreadable or
empty files, empty text, a box outside the image, an id map of another size, no or too many entities,
...) exit with status 2 and a one-line message; over-long text is truncated with a warning; any image
mode (grayscale, RGBA, 16-bit, palette) is converted to RGB; huge images are fine (they are resized to
the model input; the picture is drawn at most 1024 px wide).
"""

from __future__ import annotations

import functools
import json
import os
import sys

import numpy as np
from absl import app, flags, logging

from pixelground.inference import pictures
from pixelground.inference.pictures import DRAW_SIDE, InputError, read_id_map  # noqa: F401

TASKS = ("caption", "refer", "segment", "densecap", "ground", "panoptic", "masks")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Workdir, checkpoints/ dir or checkpoints/<step>.")
_CONFIG = flags.DEFINE_string("config", None, "Training config (.py or config.json); default: the "
                              "workdir's config.json.")
_IMAGE = flags.DEFINE_string("image", None, "Image file (any format PIL reads).")
_TASK = flags.DEFINE_enum("task", "caption", TASKS, "What to predict.")
_TEXT = flags.DEFINE_string("text", None, "refer: the expression; segment: the question; ground: the "
                            "caption; caption: an optional prompt.")
_PHRASES = flags.DEFINE_string("phrases", None, "ground: the caption's noun phrases, ';'-separated "
                               "(default: the model writes them).")
_ENTITIES = flags.DEFINE_string("entities", None, "ground / panoptic: an id-map PNG of the image's "
                                "entities (COCO panoptic RGB ids or single-channel ids; 0 = void).")
_CATEGORIES = flags.DEFINE_string("categories", None, "panoptic: COCO panoptic categories JSON (default: "
                                  "the checkpoint's panoptic dataset).")
_BOX = flags.DEFINE_string("box", None, "caption: x0,y0,x1,y1 region (image pixels).")
_TOP_K = flags.DEFINE_integer("top_k", 5, "densecap: number of proposals.")
_OUT = flags.DEFINE_string("out", None, "Write the picture here (PNG).")
_SAM = flags.DEFINE_string("sam", None, "SAM checkpoint (sam_vit_*.pth or HF SamModel) for --task=masks "
                           "and for ground / panoptic without --entities (default: the checkpoint's SAM).")
_POINTS = flags.DEFINE_integer("points_per_side", 32, "masks: point grid side (automatic masks).")
_CROP_LAYERS = flags.DEFINE_integer("crop_n_layers", 0, "masks: crop layers (automatic masks).")
_PRED_IOU = flags.DEFINE_float("pred_iou_thresh", 0.88, "masks: predicted-IoU threshold.")
_STABILITY = flags.DEFINE_float("stability_score_thresh", 0.95, "masks: stability-score threshold.")
_MIN_AREA = flags.DEFINE_integer("min_mask_region_area", 0, "masks: remove islands / holes smaller "
                                 "than this many pixels.")
_RLE_OUT = flags.DEFINE_string("rle_out", None, "masks: write the records (COCO RLE masks) as JSON.")
flags.mark_flags_as_required(["image"])

def read_image(path: str) -> np.ndarray:
  """Image file → (H, W, 3) uint8 RGB (any PIL mode converted, see transforms.to_rgb_uint8)."""
  from pixelground.data import transforms as T

  return pictures.read_picture(path, "--image", T.to_rgb_uint8)


def parse_box(text: str | None) -> np.ndarray | None:
  if text is None or not text.strip():
    return None
  try:
    vals = [float(v) for v in text.replace(" ", "").split(",")]
  except ValueError:
    raise InputError(f"--box: expected x0,y0,x1,y1 numbers, got {text!r}") from None
  if len(vals) != 4:
    raise InputError(f"--box: expected 4 numbers x0,y0,x1,y1, got {len(vals)}")
  return np.asarray(vals, np.float32)


def read_categories(path: str) -> list[dict]:
  """COCO panoptic categories JSON (a list, or a dict with "categories") → the checked list."""
  from pixelground.inference import grounded

  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except OSError as e:
    raise InputError(f"--categories: cannot read {path} ({type(e).__name__}: {e})") from None
  except ValueError as e:
    raise InputError(f"--categories: {path} is not JSON ({e})") from None
  try:
    return grounded.check_categories(data)
  except ValueError as e:
    raise InputError(f"--categories: {path}: {e}") from None


def grounding_inputs(task: str, image: np.ndarray, text: str | None, phrases: str | None,
                     entities: str | None, categories: str | None) -> dict:
  """The flags of ground / panoptic checked before the checkpoint is loaded → keyword arguments of
  `run` (entities: the (H, W) id map, or None for SAM's automatic masks; phrases: a list or None;
  categories: a list or None)."""
  from pixelground.inference import grounded

  for flag, value, takers in (("--phrases", phrases, ("ground",)),
                              ("--entities", entities, ("ground", "panoptic")),
                              ("--categories", categories, ("panoptic",))):
    if value is not None and task not in takers:
      raise InputError(f"{flag}: only --task={' / --task='.join(takers)} takes it")
  if task not in ("ground", "panoptic"):
    return {}
  if task == "ground":
    if not text or not text.strip():
      raise InputError("--text: task 'ground' needs the caption to ground as --text")
    try:
      grounded.check_caption(text)
    except ValueError as e:
      raise InputError(f"--text: {e}") from None
  out = {"entities": None}
  if entities:
    ids = read_id_map(entities)
    try:
      grounded.entity_labels(ids, image.shape[:2])
    except ValueError as e:
      raise InputError(f"--entities: {entities}: {e}") from None
    out["entities"] = ids
  if phrases is not None:
    out["phrases"] = [p.strip() for p in phrases.split(";") if p.strip()]
    if not out["phrases"]:
      raise InputError(f"--phrases: {phrases!r} holds no noun phrase to ground")
  if categories:
    out["categories"] = read_categories(categories)
  return out


@functools.lru_cache(maxsize=2)
def load_predictor(checkpoint: str, config: str | None, sam: str | None = None):
  """Predictor.from_checkpoint, kept for the process (a notebook or test calling `main` repeatedly
  restores and compiles once)."""
  from pixelground.inference.predictor import Predictor
  return Predictor.from_checkpoint(checkpoint, config, sam_checkpoint=sam)


@functools.lru_cache(maxsize=2)
def load_sam_generator(sam: str, options: tuple):
  """The automatic mask generator of a SAM checkpoint alone (`--task=masks --sam=... `, no checkpoint)."""
  from pixelground.inference.auto_masks import AutomaticMaskGenerator
  return AutomaticMaskGenerator.from_sam(sam, **dict(options))


def mask_options() -> dict:
  return dict(points_per_side=_POINTS.value, crop_n_layers=_CROP_LAYERS.value,
              pred_iou_thresh=_PRED_IOU.value, stability_score_thresh=_STABILITY.value,
              min_mask_region_area=_MIN_AREA.value)


def run_masks(generator, image: np.ndarray, rle_out: str | None = None):
  """Automatic masks of `image` → (result dict, picture: every mask tinted, largest first)."""
  from pixelground.inference import mask_ops

  records = generator.generate(image)
  pic = pictures.draw_masks(image, records)
  summary = [{k: r[k] for k in ("bbox", "area", "predicted_iou", "stability_score", "point_coords")}
             for r in records]
  res = {"masks": len(records), "records": summary}
  if rle_out:
    os.makedirs(os.path.dirname(os.path.abspath(rle_out)), exist_ok=True)
    with open(rle_out, "w", encoding="utf-8") as f:
      json.dump([r | {"segmentation": mask_ops.encode_rle(r["segmentation"][None])[0]} for r in records],
                f)
    res["rle_out"] = rle_out
  return res, pic


def run(predictor, image: np.ndarray, task: str, text: str | None, box: np.ndarray | None,
        top_k: int = 5, *, entities=None, phrases=None, categories=None):
  """→ (result dict (JSON-friendly, image pixels), PIL picture). ground / panoptic: `entities` the
  (H, W) id map, `phrases` (ground) and `categories` (panoptic) as `grounding_inputs` returns them."""
  if task in ("ground", "panoptic"):
    base, _ = pictures.draw_scale(image)
    return _run_grounding(predictor, image, base, task, text, entities, phrases, categories)
  if task == "caption":
    kw = {} if not text or not text.strip() else {"prompt": text}
    return pictures.draw(image, task, predictor.caption(image, box=box, **kw), box=box)
  if task in ("refer", "segment") and (not text or not text.strip()):
    raise InputError(f"--text: task '{task}' needs a non-empty --text")
  if task == "refer":
    return pictures.draw(image, task, predictor.referring(image, text), text)
  if task == "segment":
    return pictures.draw(image, task, predictor.segment(image, text), text)
  return pictures.draw(image, task, predictor.dense_captions(image, k=top_k))


def _run_grounding(predictor, image, base, task, text, entities, phrases, categories):
  if entities is None:
    from pixelground.inference import grounded
    entities = grounded.auto_entities(predictor, image)
  n = int(len(np.unique(entities[entities != 0])))
  if task == "ground":
    found = predictor.ground(image, text, entities, phrases=phrases)
    if not found:
      print("warning: the model wrote no noun phrase ([SEG]) for --text; nothing was grounded",
            file=sys.stderr)
    for p in found:
      if p.span[0] < 0:
        print(f"warning: phrase {p.text!r} does not occur in --text", file=sys.stderr)
    res = {"caption": text, "entities": n,
           "phrases": [{"text": p.text, "span": list(p.span), "entities": p.entities,
                        "mask_pixels": int(p.mask.sum()), "score": round(p.score, 4)} for p in found]}
    if predictor.generated is not None:
      res["generated"] = predictor.generated
    return res, pictures.draw_grounding(base, text, found)
  if categories is None and predictor.panoptic_categories() is None:
    raise InputError("--categories: this checkpoint's panoptic category list is not available here; "
                     "pass --categories=FILE (a COCO panoptic categories JSON)")
  id_map, segments = predictor.panoptic(image, entities, categories=categories)
  cats = {int(c["id"]): str(c["name"]) for c in categories or predictor.panoptic_categories() or []}
  names = [cats.get(int(s["category_id"]), str(s["category_id"])) for s in segments]
  res = {"entities": n, "generated": predictor.generated,
         "segments": [s | {"category": name, "score": round(float(s["score"]), 4)}
                      for s, name in zip(segments, names)]}
  from pixelground.inference.grounding import category_display_name
  return res, pictures.draw_panoptic(base, id_map, segments, [category_display_name(n) for n in names])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # checkpoint restore logs INFO lines: keep errors one line
  try:
    image = read_image(_IMAGE.value)
    box = parse_box(_BOX.value)
    if box is not None and _TASK.value != "caption":
      raise InputError("--box: only --task=caption takes a box (a location-conditioned caption)")
    extra = grounding_inputs(_TASK.value, image, _TEXT.value, _PHRASES.value, _ENTITIES.value,
                             _CATEGORIES.value)
    if _SAM.value and not os.path.isfile(_SAM.value) and not os.path.isdir(_SAM.value):
      raise InputError(f"--sam: {_SAM.value} does not exist")
    predictor = None
    if _TASK.value == "masks" and _SAM.value and not _CHECKPOINT.value:
      generator = load_sam_generator(_SAM.value, tuple(sorted(mask_options().items())))
    elif not _CHECKPOINT.value:
      raise InputError("--checkpoint: required (for --task=masks, --sam alone is enough)")
    else:
      try:
        predictor = load_predictor(_CHECKPOINT.value, _CONFIG.value, _SAM.value)
      except FileNotFoundError as e:
        raise InputError(str(e)) from None
      generator = predictor.mask_generator(**mask_options()) if _TASK.value == "masks" else None
    if _TASK.value == "masks":
      result, picture = run_masks(generator, image, _RLE_OUT.value)
    else:
      result, picture = run(predictor, image, _TASK.value, _TEXT.value, box, _TOP_K.value, **extra)
  except (InputError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if predictor is not None and predictor.truncated:
    what = "the category list (the panoptic prompt)" if _TASK.value == "panoptic" else "--text"
    print(f"warning: {what} was longer than the model's {predictor.last_prompt_len}-token prompt; "
          f"it was truncated", file=sys.stderr)
  result = {"task": _TASK.value, "image": _IMAGE.value, "size": list(image.shape[:2])} | result
  if _OUT.value:
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    picture.save(_OUT.value)
    result["picture"] = _OUT.value
  for k, v in result.items():
    if k not in ("boxes", "words", "records"):
      print(f"{k}: {v}")
  print(json.dumps(result))
  return 0


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
