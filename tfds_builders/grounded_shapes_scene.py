"""Grounded-shapes scenes: the shapes, stuff regions, colours and the rendered image + panoptic map.

`make_scene(rng, size, ...)` draws one scene (a pure function of the generator's state); the
language side (narratives, expressions, captions, ReasonSeg queries) and the dataset files are in
`tfds_builders.grounded_shapes`. Units: pixels; polygons are (N, 2) float arrays of (x, y) corners.
"""

from __future__ import annotations

import math
import types

import numpy as np
from PIL import Image, ImageDraw

SPLITS = ("train", "validation", "test")
REF_SPLIT = {"train": "train", "validation": "val", "test": "test"}
_SPLIT_CODE = {"train": 1, "validation": 2, "test": 3}
# kind -> (category id, corners, panoptic colour)
KINDS = {"circle": (1, 0, (220, 20, 60)), "triangle": (2, 3, (0, 130, 200)), "square": (3, 4, (60, 180, 75)),
         "hexagon": (4, 6, (245, 130, 48)), "star": (5, 10, (145, 30, 180))}
STUFF = {"sky": (6, (70, 130, 180)), "ground": (7, (150, 110, 60)), "wall": (8, (200, 190, 140)),
         "floor": (9, (110, 80, 50))}
LAYOUTS = (("sky", "ground"), ("wall", "floor"), ("wall",))
PALETTE = {"red": (215, 35, 35), "green": (35, 160, 55), "blue": (35, 75, 215), "yellow": (240, 205, 30),
           "purple": (135, 55, 175), "orange": (245, 135, 25), "pink": (240, 110, 175),
           "black": (30, 30, 30)}
SIZES = {"small": 0.055, "medium": 0.085, "large": 0.125}  # circumradius as a fraction of the image size


def image_id(split: str, index: int) -> int:
  """The integer image id of example `index` of `split` (unique across splits)."""
  return _SPLIT_CODE[split] * 10_000_000 + index + 1


def shape_polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
  """(n, 2) outline in pixels (x, y) of a shape with centre (cx, cy), circumradius r, rotation angle
  (radians). Circles have 48 vertices; stars 10 (5 points, inner radius 0.45 r)."""
  n = {"circle": 48, "star": 10}.get(kind, KINDS[kind][1])
  k = np.arange(n)
  rad = np.where(k % 2 == 1, 0.45 * r, r) if kind == "star" else np.full(n, float(r))
  a = (-math.pi / 4 if kind == "square" else -math.pi / 2) + angle + 2 * math.pi * k / n
  return np.stack([cx + rad * np.cos(a), cy + rad * np.sin(a)], 1)


def polygon_area(poly: np.ndarray) -> float:
  """Area (pixels^2) of an (n, 2) polygon (shoelace formula)."""
  x, y = poly[:, 0], poly[:, 1]
  return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


def _raster(poly: np.ndarray, size: int, value: int = 1, into: Image.Image | None = None) -> Image.Image:
  im = into if into is not None else Image.new("L", (size, size), 0)
  ImageDraw.Draw(im).polygon([tuple(p) for p in poly.tolist()], fill=value, outline=value)
  return im


def _deep_point(mask: np.ndarray, rng: np.random.Generator) -> tuple[float, float, float]:
  """A point deep inside a boolean (H, W) mask: (x, y, clearance), pixels. The clearance is an L1
  radius that stays inside the mask (found by repeated 4-neighbour erosion, subsampled for big masks)."""
  x0, y0, x1, y1 = _bbox(mask)
  f = max(1, (max(y1 - y0, x1 - x0) + 1) // 48)
  m = np.pad(mask[y0:y1 + 1:f, x0:x1 + 1:f], 1)
  depth, last = 0, m
  while m.any():
    last, depth = m, depth + 1
    e = np.zeros_like(m)
    e[1:-1, 1:-1] = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    m = e
  cand = np.argwhere(last)
  r, c = cand[rng.integers(len(cand))]
  return float(x0 + (c - 1) * f + 0.5), float(y0 + (r - 1) * f + 0.5), float((depth - 1) * f)


def _segment_ids(rng: np.random.Generator, colours: list[tuple[int, int, int]]) -> list[int]:
  """Unique non-zero panoptic ids R + 256 G + 256^2 B near each category colour (as COCO does)."""
  out: list[int] = []
  for base in colours:
    while True:
      r, g, b = np.clip(np.asarray(base) + rng.integers(-30, 31, 3), 0, 255).tolist()
      sid = r + 256 * g + 65536 * b
      if sid and sid not in out:
        out.append(sid)
        break
  return out


def _texture(rng: np.random.Generator, name: str, y: np.ndarray, x: np.ndarray) -> np.ndarray:
  """Background texture of a stuff class, float32 broadcastable to (S, S, 3); y is (S, 1), x is (1, S)."""
  jit = rng.integers(-15, 16, 3).astype(np.float32)
  per, ph = rng.uniform(6, 16), rng.uniform(0, 2 * math.pi)
  if name == "sky":
    t = (y / y.shape[0])[..., None]
    return (np.float32([120, 165, 215]) + jit) * (1 - t) + np.float32([205, 215, 228]) * t
  if name == "ground":
    return np.float32([160, 135, 95]) + jit + (9 * np.sin(2 * math.pi * y / per + ph))[..., None]
  if name == "wall":
    slant = np.float32(rng.uniform(-0.5, 0.5))
    stripes = np.sign(np.sin(np.float32(math.pi / per) * (x + slant * y) + np.float32(ph)))
    return np.float32([200, 190, 168]) + jit + (7 * stripes)[..., None]
  planks = np.sin(np.float32(2 * math.pi / per) * (y + np.float32(0.15) * x) + np.float32(ph)) ** 2  # floor
  planks *= planks
  return np.float32([140, 104, 70]) + jit - (14 * planks * planks)[..., None]


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
  """Inclusive pixel bounds (x0, y0, x1, y1) of a non-empty boolean mask."""
  rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
  return int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])


def make_scene(rng: np.random.Generator, size: int, max_shapes: int = 5, scale: float = 1.0,
               colours: int = len(PALETTE)) -> types.SimpleNamespace:
  """Draws a scene of 2..`max_shapes` shapes whose radii are `scale` × SIZES, coloured from the first
  `colours` names of PALETTE. Returns `image` (S, S, 3)
  uint8, `panoptic` (S, S) int64 segment ids, `segs` (shapes
  first, then stuff; each with kind / colour / size / centre / polygon / visible `mask` / area / bbox /
  `sid` / `deep` point / `occluded`) and `n_shapes`."""
  y, x = np.arange(size, dtype=np.float32)[:, None], np.arange(size, dtype=np.float32)[None, :]
  for attempt in range(100):
    shapes = []
    for _ in range(int(rng.integers(2, max_shapes + 1)) if attempt < 50 else 2):
      for _ in range(40):
        kind = list(KINDS)[rng.integers(len(KINDS))]
        sz = list(SIZES)[rng.integers(3)]
        r = SIZES[sz] * scale * size * rng.uniform(0.93, 1.07)
        cx, cy = rng.uniform(r + 2, size - r - 2, 2)
        if all(math.hypot(cx - o.cx, cy - o.cy) >= 0.75 * (r + o.r) for o in shapes):
          angle = rng.uniform(0, 2 * math.pi) if kind == "hexagon" else rng.uniform(-0.25, 0.25)
          shapes.append(types.SimpleNamespace(
              kind=kind, colour=list(PALETTE)[rng.integers(colours)], size=sz, cx=cx, cy=cy, r=r,
              poly=shape_polygon(kind, cx, cy, r, angle), cat=KINDS[kind][0], thing=True))
          break
    if len(shapes) < 2:
      continue
    layout = LAYOUTS[rng.choice(3, p=[0.45, 0.4, 0.15])]
    horizon = rng.uniform(0.35, 0.65) * size + rng.uniform(-0.15, 0.15) * (x - size / 2)
    upper = y < horizon if len(layout) == 2 else np.ones((size, size), bool)
    labels = Image.new("L", (size, size), 0)
    for i, s in enumerate(shapes):
      _raster(s.poly, size, i + 1, into=labels)
      s.full = int((np.asarray(_raster(s.poly, size)) > 0).sum())
    lab = np.asarray(labels)
    stuff = [types.SimpleNamespace(kind=name, cat=STUFF[name][0], thing=False) for name in layout]
    for j, st in enumerate(stuff):
      st.region = upper if j == 0 else ~upper
    segs = shapes + stuff
    for i, s in enumerate(segs):
      s.mask = (lab == i + 1) if s.thing else (s.region & (lab == 0))
      s.area = int(s.mask.sum())
    if any(s.area < 0.6 * s.full for s in shapes) or any(s.area < 0.05 * size * size for s in stuff):
      continue
    for s in segs:
      s.deep = _deep_point(s.mask, rng)
      s.occluded = s.thing and s.area != s.full
    if any(s.deep[2] < 3 for s in shapes):
      continue
    break
  else:
    raise RuntimeError("could not place shapes")  # not reached for sizes >= 64
  sids = _segment_ids(rng, [KINDS[s.kind][2] if s.thing else STUFF[s.kind][1] for s in segs])
  pan = np.zeros((size, size), np.int64)
  for s, sid in zip(segs, sids):
    s.sid = sid
    pan[s.mask] = sid
    x0, y0, x1, y1 = _bbox(s.mask)
    s.bbox = [x0, y0, x1 - x0 + 1, y1 - y0 + 1]
  bg = np.where(upper[..., None], _texture(rng, layout[0], y, x), _texture(rng, layout[-1], y, x))
  img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
  for s in shapes:
    col = np.clip(np.asarray(PALETTE[s.colour]) + rng.integers(-12, 13, 3), 0, 255)
    ImageDraw.Draw(img).polygon([tuple(p) for p in s.poly.tolist()], fill=tuple(col.tolist()),
                                outline=tuple((col * 0.7).astype(int).tolist()))
  noisy = np.asarray(img).astype(np.int16) + rng.integers(-7, 8, (size, size, 1))
  return types.SimpleNamespace(image=np.clip(noisy, 0, 255).astype(np.uint8), panoptic=pan, segs=segs,
                               n_shapes=len(shapes), layout=layout)
