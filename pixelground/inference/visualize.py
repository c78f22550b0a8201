"""Drawing predictions: per-word traces, boxes, masks (PIL only). Used by the demo and the notebooks.

    panel = draw_caption(image, caption)            # trace: each word's box centre, joined in word order
    panel = draw_referring(image, expr, result, gt_box=None, gt_mask=None)
    panel = draw_segmentation(image, question, seg, gt_mask=None)
    panel = draw_boxes(image, boxes, labels)           # dense captions
    save_grid([[panel, ...], ...], "out.png")

Boxes are xyxy in pixels of `image`; masks are (H, W) bool of `image`.
"""

from __future__ import annotations

import textwrap
import typing as tp

import numpy as np
from PIL import Image, ImageDraw

SCALE = 4          # panels are drawn at 4× the (tiny) demo images
TEXT_H = 64        # caption strip under each panel, pixels
COLOURS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60)]


def _canvas(image: np.ndarray, scale: int) -> Image.Image:
  img = Image.fromarray(np.asarray(image, np.uint8)).convert("RGB")
  return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def _edge(mask: np.ndarray) -> np.ndarray:
  """Pixels of `mask` (H, W) bool with a 4-neighbour outside it (or on the image border)."""
  p = np.pad(mask, 1)
  inner = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
  return mask & ~inner


def _overlay(img: Image.Image, mask: np.ndarray, colour, alpha: float = 0.45) -> Image.Image:
  """`mask` (H, W) bool tinted with `colour` and outlined in white (a tint alone vanishes on a shape of
  a similar colour)."""
  mask = np.asarray(mask, bool)
  m = Image.fromarray((mask * int(255 * alpha)).astype(np.uint8)).resize(img.size, Image.NEAREST)
  out = Image.composite(Image.new("RGB", img.size, colour), img, m)
  e = Image.fromarray(_edge(mask).astype(np.uint8) * 255).resize(img.size, Image.NEAREST)
  return Image.composite(Image.new("RGB", img.size, (255, 255, 255)), out, e)


def _with_text(img: Image.Image, text: str) -> Image.Image:
  out = Image.new("RGB", (img.width, img.height + TEXT_H), "white")
  out.paste(img, (0, 0))
  lines = textwrap.wrap(text, width=max(10, img.width // 6))[:5]
  ImageDraw.Draw(out).multiline_text((3, img.height + 2), "\n".join(lines), fill="black", spacing=1)
  return out


def draw_caption(image: np.ndarray, text: str, pieces: tp.Sequence[str], boxes: np.ndarray,
                 scale: int = SCALE) -> Image.Image:
  """Caption with its trace: `boxes` (T, 4) xyxy image pixels, one per piece (token); a dot at each
  word-start piece's box centre, lines joining them in order, the first letters of the word beside it."""
  img = _canvas(image, scale)
  draw = ImageDraw.Draw(img)
  centres, labels = [], []
  for piece, box in zip(pieces, np.asarray(boxes).reshape(-1, 4)):
    if not piece.startswith("\u2581"):  # continuation piece of the same word
      continue
    cx, cy = (box[0] + box[2]) / 2 * scale, (box[1] + box[3]) / 2 * scale
    centres.append((cx, cy))
    labels.append(piece[1:4])
  for i, (a, b) in enumerate(zip(centres[:-1], centres[1:])):
    draw.line([a, b], fill=COLOURS[i % len(COLOURS)], width=2)
  for i, ((cx, cy), lab) in enumerate(zip(centres, labels)):
    c = COLOURS[i % len(COLOURS)]
    draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=c)
    draw.text((cx + 4, cy - 5), lab, fill=c)
  return _with_text(img, "caption: " + text)


def draw_referring(image: np.ndarray, expression: str, box: np.ndarray, mask: np.ndarray | None,
                   gt_box: np.ndarray | None = None, scale: int = SCALE) -> Image.Image:
  """Predicted box (red) and mask (red tint), ground-truth box (green, dashed-looking thin)."""
  img = _canvas(image, scale)
  if mask is not None:
    img = _overlay(img, mask, (230, 25, 75))
  draw = ImageDraw.Draw(img)
  if gt_box is not None:
    draw.rectangle(list(np.asarray(gt_box, float) * scale), outline=(60, 200, 75), width=1)
  draw.rectangle(list(np.asarray(box, float) * scale), outline=(230, 25, 75), width=2)
  return _with_text(img, f"referring: {expression}")


def draw_segmentation(image: np.ndarray, question: str, answer: str, masks: np.ndarray,
                      scale: int = SCALE) -> Image.Image:
  """LISA: every `[SEG]` mask tinted, the question and the generated answer under it."""
  img = _canvas(image, scale)
  for i, m in enumerate(np.asarray(masks)):
    img = _overlay(img, m, COLOURS[(i + 2) % len(COLOURS)])
  return _with_text(img, f"Q: {question}  A: {answer}")


def draw_grounding(image: np.ndarray, caption: str, phrases: tp.Sequence[str], masks: np.ndarray,
                   scale: int = SCALE) -> Image.Image:
  """Grounded narrative (GELLA / PNG): phrase k's mask (H, W) bool of `image` tinted in colour k; under
  the image the caption, then each phrase written in its mask's colour."""
  img = _canvas(image, scale)
  for k, m in enumerate(np.asarray(masks)):
    img = _overlay(img, m, COLOURS[k % len(COLOURS)])
  lines = textwrap.wrap(caption, width=max(10, img.width // 6))[:3]
  out = Image.new("RGB", (img.width, img.height + TEXT_H + 12 * ((len(phrases) + 1) // 2)), "white")
  out.paste(img, (0, 0))
  draw = ImageDraw.Draw(out)
  draw.multiline_text((3, img.height + 2), "\n".join(lines), fill="black", spacing=1)
  y0 = img.height + 2 + 12 * len(lines) + 4
  for k, phrase in enumerate(phrases):
    x, y = 3 + (k % 2) * img.width // 2, y0 + 12 * (k // 2)
    draw.rectangle([x, y + 2, x + 7, y + 9], fill=COLOURS[k % len(COLOURS)])
    draw.text((x + 10, y), phrase[: img.width // 12], fill=COLOURS[k % len(COLOURS)])
  return out


def draw_boxes(image: np.ndarray, boxes: tp.Sequence[np.ndarray], labels: tp.Sequence[str],
               scale: int = 1) -> Image.Image:
  """Dense captions: each box (xyxy image pixels) outlined in its colour with its label at the corner."""
  img = _canvas(image, scale)
  draw = ImageDraw.Draw(img)
  for i, (box, label) in enumerate(zip(boxes, labels)):
    c = COLOURS[i % len(COLOURS)]
    b = [float(v) * scale for v in np.asarray(box).reshape(4)]
    draw.rectangle(b, outline=c, width=2)
    draw.text((b[0] + 2, b[1] + 1), label, fill=c, stroke_width=1, stroke_fill=(0, 0, 0))
  return _with_text(img, "; ".join(labels))


def save_grid(rows: tp.Sequence[tp.Sequence[Image.Image]], path: str) -> None:
  w = max(sum(p.width for p in r) for r in rows)
  h = sum(max(p.height for p in r) for r in rows)
  out = Image.new("RGB", (w, h), "white")
  y = 0
  for r in rows:
    x = 0
    for p in r:
      out.paste(p, (x, y))
      x += p.width
    y += max(p.height for p in r)
  out.save(path)


def demo_figure(config, model, tokenizer, path: str,
                kept: tp.Mapping[str, tp.Mapping[int, dict]] | None = None) -> None:
  """The demo's figure: for `config.visualize.num_images` held-out images, one row each — the
  generated LN caption with its trace, a referring expression's box + mask, a ReasonSeg `[SEG]` mask
  (its own held-out image) and the grounded narrative (GELLA `png`), each panel when the config has
  that task. `kept`: the evaluator's kept examples (`eval_lib.Evaluator.kept`, the predictions it
  scored); panels it lacks are predicted here (`inference.Predictor`)."""
  from pixelground.config import schema
  from pixelground.data import tasks as task_lib
  from pixelground.inference import predictor as inference
  from pixelground.training import datasets

  config = schema.parse(config)
  predictor = inference.Predictor(model, tokenizer, max_prompt_len=config.data.max_prompt_len)
  kept = kept or {}
  n = config.visualize.num_images
  src = {}
  for name in ("ln", "referring", "reason_seg"):  # the panels of the tasks the config trains
    if name not in config.tasks:
      continue
    t = config.tasks[name]
    builder = datasets.open_builder(t.dataset, datasets.data_dir(config), f"config.tasks.{name}")
    src[name] = builder.as_data_source(t.eval_split)
  rows = []
  for i in range(n):
    row = []
    if "ln" in src:
      ex = src["ln"][i]
      cap = predictor.caption(np.asarray(ex["image"]), max_len=config.data.max_target_len)
      row.append(draw_caption(np.asarray(ex["image"]), cap.text, cap.pieces, cap.boxes))
    ref = kept.get("referring", {}).get(i)
    if ref is None and "referring" in src:
      ex_ref = src["referring"][i]
      expr = task_lib.as_text(ex_ref["sentences"][0])
      r = predictor.referring(np.asarray(ex_ref["image"]), expr)
      ref = {"image": np.asarray(ex_ref["image"]), "expression": expr, "box": r.box, "mask": r.mask,
             "gt_box": np.asarray(ex_ref["box_xyxy"]).reshape(4)}
    if ref is not None:
      row.append(draw_referring(ref["image"], ref["expression"], ref["box"], ref["mask"],
                                gt_box=ref["gt_box"]))
    seg = kept.get("reason_seg", {}).get(i)
    if seg is None and "reason_seg" in src:
      ex_seg = src["reason_seg"][i]
      q = task_lib.as_text(ex_seg["queries"][0])
      r = predictor.segment(np.asarray(ex_seg["image"]), q)
      seg = {"image": np.asarray(ex_seg["image"]), "query": q, "answer": r.text, "masks": r.masks}
    if seg is not None:
      row.append(draw_segmentation(seg["image"], seg["query"], seg["answer"], seg["masks"]))
    ground = kept.get("png", {}).get(i)
    if ground is not None:  # GELLA: the held-out narrative's phrases over the ground-truth entities
      row.append(draw_grounding(ground["image"], ground["caption"], ground["phrases"], ground["masks"]))
    if row:
      rows.append(row)
  if not rows:
    raise ValueError("config.visualize: none of the figure's tasks (ln, referring, reason_seg, png) is "
                     "in config.tasks; set config.visualize.enabled=False.")
  save_grid(rows, path)
