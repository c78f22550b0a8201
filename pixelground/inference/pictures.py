"""Pictures of predictions, as `python -m pixelground.predict` and the web demo (`pixelground.serve`)
draw them: the image scaled to at most DRAW_SIDE pixels (small images enlarged), masks tinted in
distinct colours and outlined, the text below with each grounded word in its mask's colour.

    res, pic = draw(image, "caption" | "refer" | "segment" | "densecap", predictor_output, text, box)
    pic = draw_grounding(base, caption, phrases); pic = draw_panoptic(base, id_map, segments, names)
    pic = draw_masks(image, records)                 # SAM's automatic masks
    ids = read_id_map(path)                          # an entity id-map PNG → (H, W) ids
"""

from __future__ import annotations

import os

import numpy as np

DRAW_SIDE = 1024  # pictures are drawn at most this many pixels wide/high
MAX_PIXELS = 50_000 * 50_000  # PIL's bomb guard is lifted up to this (a 8000×8000 photo is fine)


class InputError(ValueError):
  """A problem with the user's input: reported in one line, exit status 2."""


def read_picture(path: str, flag: str, convert):
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


def read_id_map(path: str, flag: str = "--entities") -> np.ndarray:
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

  return read_picture(path, flag, ids)


def draw_scale(image: np.ndarray) -> tuple[np.ndarray, float]:
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


def scale_mask(mask: np.ndarray, shape) -> np.ndarray:
  from PIL import Image
  return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((shape[1], shape[0]))) > 127


def colours(n: int) -> list[tuple[int, int, int]]:
  """n distinct saturated colours (golden-ratio hue steps), readable on white and over photos."""
  import colorsys
  return [tuple(int(255 * c) for c in colorsys.hsv_to_rgb((0.03 + 0.618034 * i) % 1.0, 0.85, 0.85))
          for i in range(n)]


def tint(pic: np.ndarray, mask: np.ndarray, colour, alpha: float = 0.5) -> np.ndarray:
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


def with_runs(pic: np.ndarray, runs: list[tuple[str, tuple[int, int, int]]], max_lines: int = 12):
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
  palette = colours(len(phrases))
  pic = base
  for p, c in zip(phrases, palette):
    pic = tint(pic, scale_mask(p.mask, base.shape), c)
  black = (0, 0, 0)
  runs, cursor = [], 0
  for p, c in sorted(((p, c) for p, c in zip(phrases, palette) if p.span[0] >= 0),
                     key=lambda pc: pc[0].span[0]):
    runs += [(caption[cursor:p.span[0]], black), (caption[p.span[0]:p.span[1]], c)]
    cursor = p.span[1]
  runs.append((caption[cursor:], black))
  missing = [(p, c) for p, c in zip(phrases, palette) if p.span[0] < 0]
  if missing:
    runs.append(("  | not in the caption:", black))
    runs += [(f" {p.text or '(empty)'};", c) for p, c in missing]
  if not phrases:
    runs.append(("  | (no noun phrase grounded)", black))
  return with_runs(pic, runs)


def scale_ids(ids: np.ndarray, shape) -> np.ndarray:
  """(H, W) id map → (h, w) = shape[:2], nearest neighbour."""
  rows = np.minimum((np.arange(shape[0]) * ids.shape[0] / shape[0]).astype(int), ids.shape[0] - 1)
  cols = np.minimum((np.arange(shape[1]) * ids.shape[1] / shape[1]).astype(int), ids.shape[1] - 1)
  return ids[rows][:, cols]


def draw_panoptic(base: np.ndarray, id_map: np.ndarray, segments: list[dict], names: list[str]):
  """Each segment tinted in its own colour and labelled with its category at its most central pixel;
  the segments listed below in their colours."""
  from PIL import Image, ImageDraw

  palette = colours(len(segments))
  small = scale_ids(id_map, base.shape)
  pic = base
  for s, c in zip(segments, palette):
    pic = tint(pic, small == s["id"], c, alpha=0.6)
  img = Image.fromarray(pic)
  draw, font = ImageDraw.Draw(img), _font(max(11, min(18, base.shape[1] // 50)))
  for s, name in zip(segments, names):
    ys, xs = np.nonzero(small == s["id"])
    if len(ys):
      j = int(np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2))
      draw.text((int(xs[j]), int(ys[j])), name, fill="white", font=font, anchor="mm", stroke_width=2,
                stroke_fill="black")
  runs = [(f"{n} ", c) for n, c in zip(names, palette)] or [("(no segment)", (0, 0, 0))]
  return with_runs(np.asarray(img), runs)


def draw_masks(image: np.ndarray, records: list[dict]):
  """Automatic-mask records (binary segmentations of `image`) → PIL picture: every mask tinted in its
  own colour, largest first."""
  from PIL import Image

  base, _ = draw_scale(image)
  pic = base
  order = sorted(range(len(records)), key=lambda i: -records[i]["area"])
  for i, c in zip(order, colours(len(records))):
    pic = tint(pic, scale_mask(records[i]["segmentation"], base.shape), c, alpha=0.45)
  return Image.fromarray(pic)


def draw(image: np.ndarray, task: str, output, text: str | None = None, box: np.ndarray | None = None):
  """A Predictor's output for `task` (caption: `Caption`, refer: `ReferringResult`, segment:
  `Segmentation`, densecap: a list of `DenseCaption`) → (result dict, PIL picture); `text` the
  expression / question, `box` the caption's region (image pixels)."""
  from pixelground.inference import visualize as V

  base, f = draw_scale(image)
  if task == "caption":
    cap = output
    pic = V.draw_caption(base, cap.text, cap.pieces, cap.boxes * f, scale=1)
    res = {"caption": cap.text, "words": cap.pieces, "boxes": cap.boxes.round(1).tolist()}
    if box is not None:
      from PIL import ImageDraw
      ImageDraw.Draw(pic).rectangle(list(np.asarray(box) * f), outline=(255, 255, 255), width=2)
    return res, pic
  if task == "refer":
    r = output
    mask = None if r.mask is None else scale_mask(r.mask, base.shape)
    pic = V.draw_referring(base, text, r.box * f, mask, scale=1)
    res = {"expression": text, "box": r.box.round(1).tolist(), "text": r.text}
    if r.mask is not None:
      res.update(mask_pixels=int(r.mask.sum()), mask_score=r.mask_score)
    return res, pic
  if task == "segment":
    s = output
    masks = np.stack([scale_mask(m, base.shape) for m in s.masks]) if len(s.masks) else s.masks
    pic = V.draw_segmentation(base, text, s.text, masks, scale=1)
    return {"question": text, "answer": s.text, "masks": len(s.masks),
            "mask_pixels": [int(m.sum()) for m in s.masks],
            "mask_scores": np.asarray(s.mask_scores).round(3).tolist()}, pic
  if task != "densecap":
    raise ValueError(f"draw: unknown task {task!r}")
  dense = output
  pic = V.draw_boxes(base, [d.box * f for d in dense], [f"{d.text} ({d.score:.2f})" for d in dense])
  return {"regions": [{"box": d.box.round(1).tolist(), "score": round(d.score, 4), "caption": d.text}
                      for d in dense]}, pic
