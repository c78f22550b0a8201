r"""Try a checkpoint on one image: prints the result and draws it.

    python -m pixelground.predict --checkpoint=workdir/demo --image=photo.jpg --task=caption --out=cap.png
    python -m pixelground.predict --checkpoint=workdir/demo --image=photo.jpg --task=refer \
        --text="the red circle" --out=ref.png
    python -m pixelground.predict ... --task=segment --text="Which shape has the most corners?"
    python -m pixelground.predict ... --task=densecap [--top_k=5]
    python -m pixelground.predict ... --task=caption --box=10,20,120,200     (location-conditioned)

Tasks: caption (with a per-word trace; with --box: a caption of that region), refer (box + mask),
segment (LISA `[SEG]` masks), densecap (proposals with captions). Boxes are x0,y0,x1,y1 in pixels of
the image as stored. The config defaults to the config.json the trainer wrote next to the checkpoints.
The printed result's last line is JSON. Bad inputs (unreadable or empty files, empty text, a box outside
the image, ...) exit with status 2 and a one-line message; over-long text is truncated with a warning;
any image mode (grayscale, RGBA, 16-bit, palette) is converted to RGB; huge images are fine (they are
resized to the model input; the picture is drawn at most 1024 px wide).
"""

from __future__ import annotations

import functools
import json
import os
import sys

import numpy as np
from absl import app, flags

TASKS = ("caption", "refer", "segment", "densecap")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Workdir, checkpoints/ dir or checkpoints/<step>.")
_CONFIG = flags.DEFINE_string("config", None, "Training config (.py or config.json); default: the "
                              "workdir's config.json.")
_IMAGE = flags.DEFINE_string("image", None, "Image file (any format PIL reads).")
_TASK = flags.DEFINE_enum("task", "caption", TASKS, "What to predict.")
_TEXT = flags.DEFINE_string("text", None, "refer: the expression; segment: the question; caption: an "
                            "optional prompt.")
_BOX = flags.DEFINE_string("box", None, "caption: x0,y0,x1,y1 region (image pixels).")
_TOP_K = flags.DEFINE_integer("top_k", 5, "densecap: number of proposals.")
_OUT = flags.DEFINE_string("out", None, "Write the picture here (PNG).")
flags.mark_flags_as_required(["checkpoint", "image"])

MAX_PIXELS = 50_000 * 50_000  # PIL's bomb guard is lifted up to this (a 8000×8000 photo is fine)
DRAW_SIDE = 1024              # pictures are drawn at most this many pixels wide/high


class InputError(ValueError):
  """A problem with the user's input: reported in one line, exit status 2."""


def read_image(path: str) -> np.ndarray:
  """Image file → (H, W, 3) uint8 RGB (any PIL mode converted, see transforms.to_rgb_uint8)."""
  from PIL import Image, UnidentifiedImageError

  from pixelground.data import transforms as T

  if not os.path.isfile(path):
    raise InputError(f"--image: {path} does not exist or is not a file")
  if os.path.getsize(path) == 0:
    raise InputError(f"--image: {path} is empty (0 bytes)")
  Image.MAX_IMAGE_PIXELS = MAX_PIXELS
  try:
    with Image.open(path) as img:
      img.load()
      return T.to_rgb_uint8(img)
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
    raise InputError(f"--image: {path} is not a readable image ({type(e).__name__}: {e})") from None


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


@functools.lru_cache(maxsize=2)
def load_predictor(checkpoint: str, config: str | None):
  """Predictor.from_checkpoint, kept for the process (a notebook or test calling `main` repeatedly
  restores and compiles once)."""
  from pixelground.inference.predictor import Predictor
  return Predictor.from_checkpoint(checkpoint, config)


def run(predictor, image: np.ndarray, task: str, text: str | None, box: np.ndarray | None,
        top_k: int = 5):
  """→ (result dict (JSON-friendly, image pixels), PIL picture)."""
  from pixelground.inference import visualize as V

  base, f = _draw_scale(image)
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


def main(argv):
  del argv
  try:
    image = read_image(_IMAGE.value)
    box = parse_box(_BOX.value)
    if box is not None and _TASK.value != "caption":
      raise InputError("--box: only --task=caption takes a box (a location-conditioned caption)")
    try:
      predictor = load_predictor(_CHECKPOINT.value, _CONFIG.value)
    except FileNotFoundError as e:
      raise InputError(str(e)) from None
    result, picture = run(predictor, image, _TASK.value, _TEXT.value, box, _TOP_K.value)
  except (InputError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if predictor.truncated:
    print(f"warning: --text was longer than the model's {predictor.max_prompt_len}-token prompt; "
          f"it was truncated", file=sys.stderr)
  result = {"task": _TASK.value, "image": _IMAGE.value, "size": list(image.shape[:2])} | result
  if _OUT.value:
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    picture.save(_OUT.value)
    result["picture"] = _OUT.value
  for k, v in result.items():
    if k not in ("boxes", "words"):
      print(f"{k}: {v}")
  print(json.dumps(result))
  return 0


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
