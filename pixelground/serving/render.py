"""Text for the page, coloured like the pictures: each grounded word in the colour of its trace point,
box or mask. The pictures themselves are the `predict` CLI's (`predict.draw`, `draw_grounding`,
`draw_panoptic`, `draw_masks`); the colours come from the same tables (`visualize.COLOURS`,
`pictures.colours`), so a word and its mask always match."""

from __future__ import annotations

import html
import re

import numpy as np

from pixelground.inference import pictures
from pixelground.inference import visualize as V

SEG = "[SEG]"
REFER_COLOUR = (230, 25, 75)  # visualize.draw_referring's box and mask


def span(text: str, colour=None, cls: str | None = None) -> str:
  style = "" if colour is None else f' style="color: rgb{tuple(int(c) for c in colour)}; font-weight: 600"'
  attr = "" if cls is None else f' class="{cls}"'
  return f"<span{attr}{style}>{html.escape(text)}</span>"


def seg_colour(k: int):
  """The colour of the k-th `[SEG]` mask in `visualize.draw_segmentation`."""
  return V.COLOURS[(k + 2) % len(V.COLOURS)]


def caption_html(cap) -> str:
  """Each word in the colour of its trace point (`visualize.draw_caption`: word k, COLOURS[k])."""
  words, k = [], -1
  for piece in cap.pieces:
    if piece.startswith("\u2581") or k < 0:
      k += 1
      words.append([piece.lstrip("\u2581"), k])
    else:
      words[-1][0] += piece
  return " ".join(span(w, V.COLOURS[i % len(V.COLOURS)], "word") for w, i in words if w) or span(
      "(empty caption)")


def answer_html(text: str) -> str:
  """A LISA answer: each `[SEG]` and the word before it in the colour of that `[SEG]`'s mask."""
  parts = text.split(SEG)
  out = []
  for k, part in enumerate(parts[:-1]):
    head, _, last = part.rstrip().rpartition(" ")
    out.append(html.escape(head + " " if head else "") + span(last, seg_colour(k)) + " " +
               span(SEG, seg_colour(k), "seg"))
  out.append(html.escape(parts[-1]))
  return "".join(out) or span("(empty answer)")


def refer_html(expression: str, result) -> str:
  box = ", ".join(f"{v:.0f}" for v in result.box)
  out = f"{span(expression, REFER_COLOUR, 'word')} → box [{box}]"
  if result.mask is not None:
    out += f", mask of {int(result.mask.sum())} px (predicted IoU {result.mask_score:.2f})"
  return out


def dense_html(regions) -> str:
  return "<br>".join(f"{span(d.text or '(empty)', V.COLOURS[i % len(V.COLOURS)], 'word')} "
                     f"({d.score:.2f})" for i, d in enumerate(regions)) or span("(no region)")


def ground_html(caption: str, phrases) -> str:
  """The caption with each grounded phrase in its mask's colour (`pictures.draw_grounding`)."""
  palette, out, cursor = pictures.colours(len(phrases)), [], 0
  for p, c in sorted(((p, c) for p, c in zip(phrases, palette) if p.span[0] >= 0),
                     key=lambda pc: pc[0].span[0]):
    out += [html.escape(caption[cursor:p.span[0]]), span(caption[p.span[0]:p.span[1]], c, "word")]
    cursor = p.span[1]
  out.append(html.escape(caption[cursor:]))
  missing = [span(p.text or "(empty)", c, "word") for p, c in zip(phrases, palette) if p.span[0] < 0]
  if missing:
    out.append(" — not in the caption: " + "; ".join(missing))
  if not phrases:
    out.append(" — (no noun phrase grounded)")
  return "".join(out)


def names_html(names: list[str]) -> str:
  """Panoptic segments / automatic masks listed in their colours (`pictures.colours`)."""
  return " ".join(span(n, c, "word") for n, c in zip(names, pictures.colours(len(names)))) or span(
      "(nothing found)")


def timing_html(timing, draw_s: float, new_compiles: int | None, extra: str = "") -> str:
  parts = [f"queued {timing.queued_s * 1e3:.0f} ms", f"batch of {timing.batch}",
           f"model {timing.model_s * 1e3:.0f} ms", f"drawing {draw_s * 1e3:.0f} ms",
           f"total {(timing.total_s + draw_s) * 1e3:.0f} ms"]
  if extra:
    parts.append(extra)
  if new_compiles is not None:
    parts.append(f"new compilations since warm-up: {new_compiles}")
  return f'<span class="timing">{" · ".join(parts)}</span>'


def message_html(notes: list[str], error: str | None = None) -> str:
  out = [f'<div class="pg-error">⚠ {html.escape(error)}</div>'] if error else []
  out += [f'<div class="pg-note">{html.escape(n)}</div>' for n in notes if n]
  return "".join(out)


def strip_tags(text: str) -> str:
  return re.sub(r"<[^>]+>", "", text)


def count_masks(masks: np.ndarray | None) -> int:
  return 0 if masks is None else int(len(masks))
