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

MAX_PIXELS = 50_000 * 50_000  # PIL's bomb guard is lifted up to this (a 8000×8000 photo is fine)
DRAW_SIDE = 1024              # pictures are drawn at most this many pixels wide/high


class InputError(ValueError):
  """A problem with the user's input: reported in one line, exit status 2."""


def _read_picture(path: str, flag: str, convert):
  """Opens image file `path` (named by command-line flag `flag` in errors), returns `convert(img)` of
  the loaded PIL image; a missing, empty or unreadable file is an `InputError`."""
  from PIL import Image, UnidentifiedImageError

  if not os.path.isfile(path):
    raise InputError(f"{flag}: {path} does not exist or is not a file")
  if os.path.getsize(path) == 0:
    raise InputError(f"{flag}: {path} is empty (0 bytes)")
  Image.MAX_IMAGE_PIXELS = MAX_PIXELS
  try:
    with Image.open(path) as img:
      img.load()
      return convert(img)
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
    raise InputError(f"{flag}: {path} is not a readable image ({type(e).__name__}: {e})") from None


def read_image(path: str) -> np.ndarray:
  """Image file → (H, W, 3) uint8 RGB (any PIL mode converted, see transforms.to_rgb_uint8)."""
  from pixelground.data import transforms as T

  return _read_picture(path, "--image", T.to_rgb_uint8)


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


def _draw_scale(image: np.ndarray) -> tuple[np.ndarray, float]:
  """(picture base image, factor from image pixels to picture pixels): small images are enlarged
  (nearest), big ones reduced so the longer side is DRAW_SIDE."""
  from PIL import Image

  side = max(image.shape[:2])
  f = DRAW_SIDE / side if side > DRAW_SIDE else float(max(1, 256 // side))
  if f == 1.0:
    return image, 1.0
  w, h = max(1, round(image.shape[1] * f)), max(1, round(image.shape[0] * f))
  resample = Image.NEAREST if f > 1 else Image.BILINEAR
  return np.asarray(Image.fromarray(image).resize((w, h), resample)), f


def _scale_mask(mask: np.ndarray, shape) -> np.ndarray:
  from PIL import Image
  return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((shape[1], shape[0]))) > 127


def read_id_map(path: str) -> np.ndarray:
  """Entity id-map PNG → (H, W) int64 ids: RGB(A) in the COCO panoptic encoding (R + 256·G + 256²·B),
  single-channel modes (L, I;16, I, P indices, 1) as stored; 0 = void."""
  from pixelground.metrics.panoptic import rgb_to_id

  def ids(img):
    if img.mode in ("RGB", "RGBA"):
      return rgb_to_id(np.asarray(img.convert("RGB")))
    if img.mode in ("LA", "La", "PA"):
      return np.asarray(img)[..., 0].astype(np.int64)
    if img.mode in ("L", "P", "1", "I") or img.mode.startswith("I;16"):
      return np.asarray(img).astype(np.int64)
    return rgb_to_id(np.asarray(img.convert("RGB")))

  return _read_picture(path, "--entities", ids)


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


def _colours(n: int) -> list[tuple[int, int, int]]:
  """n distinct saturated colours (golden-ratio hue steps), readable on white and over photos."""
  import colorsys
  return [tuple(int(255 * c) for c in colorsys.hsv_to_rgb((0.03 + 0.618034 * i) % 1.0, 0.85, 0.85))
          for i in range(n)]


def _tint(pic: np.ndarray, mask: np.ndarray, colour, alpha: float = 0.5) -> np.ndarray:
  """`mask` (h, w) bool of the picture blended with `colour` and outlined in white."""
  out = pic.copy()
  out[mask] = (out[mask] * (1 - alpha) + np.asarray(colour, np.float32) * alpha).astype(np.uint8)
  p = np.pad(mask, 1)
  edge = mask & ~(p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:])
  out[edge] = 255
  return out


def _font(size: int):
  from PIL import ImageFont
  try:
    return ImageFont.load_default(size=size)
  except TypeError:  # Pillow < 10.1: the fixed bitmap font
    return ImageFont.load_default()


def _with_runs(pic: np.ndarray, runs: list[tuple[str, tuple[int, int, int]]], max_lines: int = 12):
  """The picture with `runs` [(text, colour)] word-wrapped on a white strip below it → PIL image."""
  import re

  from PIL import Image, ImageDraw

  width = pic.shape[1]
  font = _font(max(12, min(22, width // 40)))
  measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
  line_h = int(font.size * 1.35) if hasattr(font, "size") else 14
  lines, x, margin = [[]], 6, 6
  for text, colour in runs:
    for word in re.split(r"(\s+)", text):
      if not word:
        continue
      w = measure.textlength(word, font=font)
      if word.isspace():
        x += w if x > margin else 0
        continue
      if x + w > width - margin and x > margin:
        lines.append([])
        x = margin
      lines[-1].append((x, word, colour))
      x += w
  lines = lines[:max_lines]
  out = Image.new("RGB", (width, pic.shape[0] + line_h * len(lines) + 8), "white")
  out.paste(Image.fromarray(pic), (0, 0))
  draw = ImageDraw.Draw(out)
  for i, line in enumerate(lines):
    for x, word, colour in line:
      draw.text((x, pic.shape[0] + 4 + i * line_h), word, fill=colour, font=font)
  return out


def draw_grounding(base: np.ndarray, caption: str, phrases: list):
  """Each phrase's mask tinted in its own colour; the caption below with each phrase in that colour
  (phrases not found in the caption are listed after it)."""
  colours = _colours(len(phrases))
  pic = base
  for p, c in zip(phrases, colours):
    pic = _tint(pic, _scale_mask(p.mask, base.shape), c)
  black = (0, 0, 0)
  runs, cursor = [], 0
  for p, c in sorted(((p, c) for p, c in zip(phrases, colours) if p.span[0] >= 0),
                     key=lambda pc: pc[0].span[0]):
    runs += [(caption[cursor:p.span[0]], black), (caption[p.span[0]:p.span[1]], c)]
    cursor = p.span[1]
  runs.append((caption[cursor:], black))
  missing = [(p, c) for p, c in zip(phrases, colours) if p.span[0] < 0]
  if missing:
    runs.append(("  | not in the caption:", black))
    runs += [(f" {p.text or '(empty)'};", c) for p, c in missing]
  if not phrases:
    runs.append(("  | (no noun phrase grounded)", black))
  return _with_runs(pic, runs)


def _scale_ids(ids: np.ndarray, shape) -> np.ndarray:
  """(H, W) id map → (h, w) = shape[:2], nearest neighbour."""
  rows = np.minimum((np.arange(shape[0]) * ids.shape[0] / shape[0]).astype(int), ids.shape[0] - 1)
  cols = np.minimum((np.arange(shape[1]) * ids.shape[1] / shape[1]).astype(int), ids.shape[1] - 1)
  return ids[rows][:, cols]


def draw_panoptic(base: np.ndarray, id_map: np.ndarray, segments: list[dict], names: list[str]):
  """Each segment tinted in its own colour and labelled with its category at its most central pixel;
  the segments listed below in their colours."""
  from PIL import Image, ImageDraw

  colours = _colours(len(segments))
  small = _scale_ids(id_map, base.shape)
  pic = base
  for s, c in zip(segments, colours):
    pic = _tint(pic, small == s["id"], c, alpha=0.6)
  img = Image.fromarray(pic)
  draw, font = ImageDraw.Draw(img), _font(max(11, min(18, base.shape[1] // 50)))
  for s, name in zip(segments, names):
    ys, xs = np.nonzero(small == s["id"])
    if len(ys):
      j = int(np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2))
      draw.text((int(xs[j]), int(ys[j])), name, fill="white", font=font, anchor="mm", stroke_width=2,
                stroke_fill="black")
  runs = [(f"{n} ", c) for n, c in zip(names, colours)] or [("(no segment)", (0, 0, 0))]
  return _with_runs(np.asarray(img), runs)


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
  base, _ = _draw_scale(image)
  pic = base
  order = sorted(range(len(records)), key=lambda i: -records[i]["area"])
  for i, c in zip(order, _colours(len(records))):
    pic = _tint(pic, _scale_mask(records[i]["segmentation"], base.shape), c, alpha=0.45)
  summary = [{k: r[k] for k in ("bbox", "area", "predicted_iou", "stability_score", "point_coords")}
             for r in records]
  res = {"masks": len(records), "records": summary}
  if rle_out:
    os.makedirs(os.path.dirname(os.path.abspath(rle_out)), exist_ok=True)
    with open(rle_out, "w", encoding="utf-8") as f:
      json.dump([r | {"segmentation": mask_ops.encode_rle(r["segmentation"][None])[0]} for r in records],
                f)
    res["rle_out"] = rle_out
  from PIL import Image
  return res, Image.fromarray(pic)


def run(predictor, image: np.ndarray, task: str, text: str | None, box: np.ndarray | None,
        top_k: int = 5, *, entities=None, phrases=None, categories=None):
  """→ (result dict (JSON-friendly, image pixels), PIL picture). ground / panoptic: `entities` the
  (H, W) id map, `phrases` (ground) and `categories` (panoptic) as `grounding_inputs` returns them."""
  from pixelground.inference import visualize as V

  base, f = _draw_scale(image)
  if task in ("ground", "panoptic"):
    return _run_grounding(predictor, image, base, task, text, entities, phrases, categories)
  if task == "caption":
    kw = {} if not text or not text.strip() else {"prompt": text}
    cap = predictor.caption(image, box=box, **kw)
    pic = V.draw_caption(base, cap.text, cap.pieces, cap.boxes * f, scale=1)
    res = {"caption": cap.text, "words": cap.pieces, "boxes": cap.boxes.round(1).tolist()}
    if box is not None:
      from PIL import ImageDraw
      ImageDraw.Draw(pic).rectangle(list(box * f), outline=(255, 255, 255), width=2)
    return res, pic
  if task in ("refer", "segment") and (not text or not text.strip()):
    raise InputError(f"--text: task '{task}' needs a non-empty --text")
  if task == "refer":
    r = predictor.referring(image, text)
    mask = None if r.mask is None else _scale_mask(r.mask, base.shape)
    pic = V.draw_referring(base, text, r.box * f, mask, scale=1)
    res = {"expression": text, "box": r.box.round(1).tolist(), "text": r.text}
    if r.mask is not None:
      res.update(mask_pixels=int(r.mask.sum()), mask_score=r.mask_score)
    return res, pic
  if task == "segment":
    s = predictor.segment(image, text)
    masks = np.stack([_scale_mask(m, base.shape) for m in s.masks]) if len(s.masks) else s.masks
    pic = V.draw_segmentation(base, text, s.text, masks, scale=1)
    return {"question": text, "answer": s.text, "masks": len(s.masks),
            "mask_pixels": [int(m.sum()) for m in s.masks],
            "mask_scores": np.asarray(s.mask_scores).round(3).tolist()}, pic
  dense = predictor.dense_captions(image, k=top_k)
  pic = V.draw_boxes(base, [d.box * f for d in dense], [f"{d.text} ({d.score:.2f})" for d in dense])
  return {"regions": [{"box": d.box.round(1).tolist(), "score": round(d.score, 4), "caption": d.text}
                      for d in dense]}, pic


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
    return res, draw_grounding(base, text, found)
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
  return res, draw_panoptic(base, id_map, segments, [category_display_name(n) for n in names])


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
