"""Image, box, point, mask and text transforms for the input pipeline (SPEC.md 1.1, 1.2, 3), in numpy.

Everything here runs on host CPU inside Grain workers; nothing imports JAX.

Conventions (all coordinates are PIXELS of the image they refer to unless a name says "normalised"):
  * images are (H, W, 3) uint8 RGB; pixel (i, j) is row i, column j;
  * continuous coordinates: the centre of pixel (i, j) is the point (x, y) = (j + 0.5, i + 0.5), so the
    image spans [0, W] × [0, H];
  * boxes are xyxy [x0, y0, x1, y1] with exclusive far edges: a box covering pixel columns 2..4 has
    x0 = 2, x1 = 5 (its width is x1 - x0 pixels);
  * points are [x, y].

A `Geometry` is the whole spatial map from a source image (H, W) to the square model input
(out_size × out_size): scale (output pixels per source pixel, one factor for both axes, so aspect is
kept), then a shift (the crop), then an optional horizontal flip of the image content, then zero
padding at the bottom/right:

    x_out = x_src · scale + dx          y_out = y_src · scale + dy
    flipped: x_out ← valid_w - x_out    (the content is mirrored inside its valid width, so padding
                                         stays at the right)

The image content occupies rows [0, valid_h) and columns [0, valid_w) of the output; the rest is
padding (zeros, `mask` False). The valid extent is floor(scaled extent) clipped to out_size, so every
valid output pixel is fully covered by source pixels and the map above is exact for images, masks,
boxes and points alike (no per-axis rounding of the resized size).

Training (SPEC 3): `random_resize_crop` (long side → out_size · s, s ~ U(scale_range), random
out_size crop when larger, padding when smaller) then `maybe_flip`; evaluation: `resize_pad`.
`apply_image` resamples only the source region that lands in the crop, in one PIL bilinear resize
(antialiased when downscaling); `apply_masks` samples the same map nearest-neighbour at output pixel
centres.

A horizontal flip must either swap "left"/"right" in the text (`text_flip.flip_text`) or not happen
(`text_flip.flip_allowed` is False for text with east/west, clockwise, or "left"/"right" used in a
non-directional sense such as "the man who left" or "right next to"). `maybe_flip(..., texts=...)`
refuses the flip when any text is not flip-safe.

Normalisation (`normalize`): "sam" = ImageNet mean/std on the 0–255 scale, "clip" = CLIP mean/std on
the 0–1 scale. Padding is 0 AFTER normalisation: `normalize` writes only the valid region into a
zero canvas (or re-zeros where `mask` is False), never normalises the padding's zeros.
"""

from __future__ import annotations

import dataclasses
import io
import math
import typing as tp

import numpy as np
from PIL import Image

from pixelground.data import text_flip

# ---------------------------------------------------------------------------------------------------
# Decoding / colour conversion
# ---------------------------------------------------------------------------------------------------

_ALPHA_MODES = ("RGBA", "LA", "PA")


def _composite_black(color: np.ndarray, alpha: np.ndarray) -> np.ndarray:
  """uint8 colour (H, W, C) × alpha (H, W) / 255, rounded: the image composited on black."""
  prod = color.astype(np.uint16) * alpha.astype(np.uint16)[..., None]
  return ((prod + 127) // 255).astype(np.uint8)


def _to_uint8_values(a: np.ndarray) -> np.ndarray:
  """Any numeric array → uint8 by its dtype's convention (see `to_rgb_uint8`)."""
  if a.dtype == np.uint8:
    return a
  if a.dtype == np.bool_:
    return a.astype(np.uint8) * np.uint8(255)
  if a.dtype.kind == "u" and a.dtype.itemsize == 2:
    a = a.astype(np.uint32)
    return ((a * 255 + 32767) // 65535).astype(np.uint8)
  if np.issubdtype(a.dtype, np.floating):
    f = np.nan_to_num(a.astype(np.float32), nan=0.0, posinf=1.0, neginf=0.0)
    return np.clip(f * 255.0 + 0.5, 0.0, 255.0).astype(np.uint8)
  if np.issubdtype(a.dtype, np.integer):
    return np.clip(a, 0, 255).astype(np.uint8)
  return np.zeros(a.shape, np.uint8)  # object / complex / string arrays: nothing sensible to show


def _array_to_rgb(a: np.ndarray) -> np.ndarray:
  """(H, W), (H, W, 1|2|3|4|>4) array of any dtype → (H, W, 3) uint8."""
  a = _to_uint8_values(np.asarray(a))
  if a.ndim == 2:
    a = a[..., None]
  if a.ndim != 3:
    raise ValueError(f"an image array must be (H, W) or (H, W, C), got shape {a.shape}")
  c = a.shape[-1]
  if c == 0:
    return np.zeros(a.shape[:2] + (3,), np.uint8)
  if c == 1:
    return np.repeat(a, 3, axis=-1)
  if c == 2:  # gray + alpha
    return np.repeat(_composite_black(a[..., :1], a[..., 1]), 3, axis=-1)
  if c == 4:
    return _composite_black(a[..., :3], a[..., 3])
  if c == 3:
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)
  return np.ascontiguousarray(a[..., :3])  # > 4 channels: the extra ones are dropped


def _pil_to_rgb(img: Image.Image) -> np.ndarray:
  mode = img.mode
  if mode == "RGB":
    return np.asarray(img)
  if mode in ("L", "1"):
    return np.repeat(np.asarray(img.convert("L"))[..., None], 3, axis=-1)
  if mode.startswith("I;16"):  # 16-bit grayscale PNG/TIFF: scale 0..65535 → 0..255
    return _array_to_rgb(np.asarray(img).astype(np.uint16))
  if mode == "I":  # 32-bit integer: by convention a 16-bit image (PNG 16-bit grayscale in old Pillow)
    return _array_to_rgb(np.clip(np.asarray(img), 0, 65535).astype(np.uint16))
  if mode == "F":  # float: 0..1
    return _array_to_rgb(np.asarray(img, dtype=np.float32))
  if mode == "P" and "transparency" not in img.info:
    return np.asarray(img.convert("RGB"))
  if mode in ("P", "PA"):
    img = img.convert("RGBA")
    mode = "RGBA"
  if mode in ("RGBa", "La"):  # premultiplied alpha: the colour channels already are "on black"
    return _array_to_rgb(np.asarray(img)[..., :-1])
  if mode in _ALPHA_MODES:
    rgba = np.asarray(img.convert("RGBA"))
    return _composite_black(rgba[..., :3], rgba[..., 3])
  try:  # RGBX, CMYK, YCbCr, HSV, LAB, ...: PIL's own conversion
    return np.asarray(img.convert("RGB"))
  except (ValueError, OSError):  # no conversion to RGB: read the raw channels
    return _array_to_rgb(np.asarray(img))


def to_rgb_uint8(image: Image.Image | np.ndarray) -> np.ndarray:
  """Any PIL image or numpy array → (H, W, 3) uint8 RGB.

  PIL modes: RGB as is; L / 1 replicated to 3 channels; I;16* (16-bit PNG/TIFF) scaled by 255/65535;
  I (32-bit int) read as 16-bit (clipped to 0..65535, then scaled); F (float) read as 0..1 (clipped,
  NaN → 0); P converted through its palette (with its transparency); CMYK / YCbCr / HSV / LAB through
  PIL's conversion. Alpha (RGBA, LA, PA, RGBa, P with transparency) is COMPOSITED ON BLACK
  (rgb · alpha / 255): a fully transparent pixel is black, whatever colour it happens to store.

  Arrays by dtype: uint8 as is; bool → 0/255; uint16 scaled by 255/65535; floats read as 0..1;
  other integers clipped to 0..255. By shape: (H, W) and (H, W, 1) gray, (H, W, 2) gray + alpha,
  (H, W, 3) RGB, (H, W, 4) RGBA (alpha composited on black), (H, W, >4) first 3 channels.

  EXIF orientation is NOT applied: dataset annotations refer to the stored pixel grid.
  """
  if isinstance(image, Image.Image):
    return _pil_to_rgb(image)
  return _array_to_rgb(image)


def open_image(data: bytes) -> Image.Image:
  """Encoded image bytes → a lazily decoded PIL image (its size is known from the header alone)."""
  return Image.open(io.BytesIO(data))


# ---------------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------------


def _extent(n: int, scale: float, offset: float, out_size: int) -> int:
  """Output pixels [0, e) fully covered by a source extent of n pixels scaled and shifted; ≥ 1."""
  e = int(math.floor(n * scale + offset + 1e-6))
  return max(1, min(out_size, e))


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Source image → square model input map (module docstring has the formulas).

  scale: output pixels per source pixel. offset: (dx, dy) output pixels added after scaling (≤ 0 for
  a crop). flipped: content mirrored horizontally inside the valid width. out_size: the output is
  out_size × out_size pixels. valid: (height, width) in output pixels of the image content at the
  top-left; the rest is zero padding. in_size: (height, width) of the source image in pixels.
  """
  scale: float
  offset: tuple[float, float]
  flipped: bool
  out_size: int
  valid: tuple[int, int]
  in_size: tuple[int, int] | None = None

  # --- forward maps: source pixels → output pixels -------------------------------------------------

  def _x(self, x: np.ndarray) -> np.ndarray:
    x = x * self.scale + self.offset[0]
    return self.valid[1] - x if self.flipped else x

  def _y(self, y: np.ndarray) -> np.ndarray:
    return y * self.scale + self.offset[1]

  def boxes_unclipped(self, b: np.ndarray) -> np.ndarray:
    """(..., 4) xyxy source-pixel boxes → output-pixel boxes, not clipped (float32)."""
    b = np.asarray(b, np.float64)
    xa, xb = self._x(b[..., 0]), self._x(b[..., 2])
    if self.flipped:
      xa, xb = xb, xa
    return np.stack([xa, self._y(b[..., 1]), xb, self._y(b[..., 3])], axis=-1).astype(np.float32)

  def boxes(self, b: np.ndarray) -> np.ndarray:
    """(..., 4) xyxy source-pixel boxes → output-pixel boxes clipped to the valid region (float32).

    Boxes that fall outside the valid region come back with zero width or height; `keep` says which.
    """
    out = self.boxes_unclipped(b)
    h, w = self.valid
    np.clip(out[..., 0::2], 0.0, w, out=out[..., 0::2])
    np.clip(out[..., 1::2], 0.0, h, out=out[..., 1::2])
    return out

  def keep(self, b: np.ndarray, min_size: float = 0.0) -> np.ndarray:
    """(...,) bool: the SOURCE boxes `b` whose transformed, clipped box has width and height > min_size
    (output pixels)."""
    out = self.boxes(b)
    return ((out[..., 2] - out[..., 0]) > min_size) & ((out[..., 3] - out[..., 1]) > min_size)

  def points(self, p: np.ndarray) -> np.ndarray:
    """(..., 2) [x, y] source-pixel points → output-pixel points, not clipped (float32)."""
    p = np.asarray(p, np.float64)
    return np.stack([self._x(p[..., 0]), self._y(p[..., 1])], axis=-1).astype(np.float32)

  def points_inside(self, p: np.ndarray) -> np.ndarray:
    """(...,) bool: the SOURCE points `p` that land inside the valid region (edges included)."""
    q = self.points(p)
    h, w = self.valid
    return (np.isfinite(q).all(axis=-1) & (q[..., 0] >= 0) & (q[..., 0] <= w)
            & (q[..., 1] >= 0) & (q[..., 1] <= h))

  # --- inverse maps: output pixels → source pixels (evaluation) ----------------------------------

  def inverse_points(self, q: np.ndarray) -> np.ndarray:
    """(..., 2) output-pixel points → source-pixel points (float32)."""
    q = np.asarray(q, np.float64)
    x = q[..., 0]
    if self.flipped:
      x = self.valid[1] - x
    return np.stack([(x - self.offset[0]) / self.scale, (q[..., 1] - self.offset[1]) / self.scale],
                    axis=-1).astype(np.float32)

  def inverse_boxes(self, b: np.ndarray) -> np.ndarray:
    """(..., 4) xyxy output-pixel boxes → source-pixel boxes (float32), clipped to the source image
    when `in_size` is known."""
    b = np.asarray(b, np.float64)
    p0 = self.inverse_points(b[..., 0:2])
    p1 = self.inverse_points(b[..., 2:4])
    out = np.concatenate([np.minimum(p0, p1), np.maximum(p0, p1)], axis=-1)
    if self.in_size is not None:
      h, w = self.in_size
      np.clip(out[..., 0::2], 0.0, w, out=out[..., 0::2])
      np.clip(out[..., 1::2], 0.0, h, out=out[..., 1::2])
    return out


def resize_pad(height: int, width: int, out_size: int) -> Geometry:
  """Evaluation geometry: the long side becomes out_size pixels, the short side is padded at the
  bottom/right. height, width: source image size in pixels."""
  scale = out_size / max(height, width)
  valid = (_extent(height, scale, 0.0, out_size), _extent(width, scale, 0.0, out_size))
  return Geometry(scale, (0.0, 0.0), False, out_size, valid, (height, width))


def random_resize_crop(rng: np.random.Generator, height: int, width: int, out_size: int,
                       scale_range: tuple[float, float] = (0.5, 2.0)) -> Geometry:
  """Training geometry (large-scale jitter, SPEC 3): resize so that the LONG side is out_size · s pixels,
  s ~ U(scale_range); where the resized image is larger than out_size, a uniformly random integer-offset
  out_size crop; where smaller, zero padding at the bottom/right. height, width: source pixels."""
  lo, hi = scale_range
  s = float(rng.uniform(lo, hi)) if hi > lo else float(lo)
  scale = out_size * s / max(height, width)
  offset = []
  for n in (width, height):
    full = max(1, int(math.floor(n * scale + 1e-6)))
    offset.append(-float(rng.integers(0, full - out_size + 1)) if full > out_size else 0.0)
  dx, dy = offset
  valid = (_extent(height, scale, dy, out_size), _extent(width, scale, dx, out_size))
  return Geometry(scale, (dx, dy), False, out_size, valid, (height, width))


def maybe_flip(rng: np.random.Generator, geom: Geometry, p: float = 0.5,
               texts: tp.Iterable[str] = ()) -> Geometry:
  """Composes a horizontal flip into `geom` with probability p (one uniform draw from rng, always).

  When any of `texts` is not flip-safe (`text_flip.flip_allowed` False) the geometry comes back unflipped; the
  caller applies `text_flip.flip_text` to the texts exactly when the result's `flipped` differs from the input's.
  """
  u = rng.random()
  if u >= p or not all(text_flip.flip_allowed(t) for t in texts):
    return geom
  return dataclasses.replace(geom, flipped=not geom.flipped)


# ---------------------------------------------------------------------------------------------------
# Applying a geometry to pixels
# ---------------------------------------------------------------------------------------------------


def reduce_for(image: Image.Image, geom: Geometry) -> float:
  """Lets a not-yet-decoded JPEG (from `open_image`, before anything loads its pixels) decode at 1/2,
  1/4 or 1/8 size (libjpeg DCT scaling) when `geom` downscales at least that much (geom.scale ≤ 0.5);
  much faster for large images. Returns the decoded image's pixels
  per source pixel, to pass to `apply_image(..., image_scale=...)` (1.0 when nothing changed)."""
  if getattr(image, "format", None) != "JPEG" or geom.scale > 0.5 or image.mode not in ("RGB", "L"):
    return 1.0
  w, h = image.size
  target = (max(1, math.ceil(w * geom.scale)), max(1, math.ceil(h * geom.scale)))
  res = image.draft(image.mode, target)
  if res is None:
    return 1.0
  return res[1][2] / w


def _source_box(geom: Geometry, img_w: int, img_h: int, sx: float, sy: float):
  """The region of the (possibly reduced) image that maps onto the valid output area, in its pixels."""
  vh, vw = geom.valid
  dx, dy = geom.offset
  s = geom.scale
  x0 = max(0.0, -dx / s * sx)
  y0 = max(0.0, -dy / s * sy)
  x1 = min(float(img_w), (vw - dx) / s * sx)
  y1 = min(float(img_h), (vh - dy) / s * sy)
  return x0, y0, max(x1, x0 + 1e-3), max(y1, y0 + 1e-3)


def apply_image(image: Image.Image | np.ndarray, geom: Geometry, image_scale: float | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
  """Source image (H, W, 3) uint8 or a PIL image → ((out, out, 3) uint8, (out, out) bool mask).

  One PIL bilinear resize of only the source region that lands in the crop (PIL antialiases when
  downscaling), flip, zero padding; mask is True on real image pixels. image_scale: pixels of `image`
  per source pixel of `geom` (from `reduce_for`); None = 1, or inferred per axis from geom.in_size when
  the sizes differ.
  """
  if isinstance(image, Image.Image):
    pil = image if image.mode == "RGB" else Image.fromarray(to_rgb_uint8(image))
  else:
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3:
      arr = to_rgb_uint8(arr)
    pil = Image.fromarray(arr)
  w, h = pil.size
  if image_scale is not None:
    sx = sy = float(image_scale)
  elif geom.in_size is not None and (h, w) != tuple(geom.in_size):
    sx, sy = w / geom.in_size[1], h / geom.in_size[0]
  else:
    sx = sy = 1.0
  vh, vw = geom.valid
  n = geom.out_size
  box = _source_box(geom, w, h, sx, sy)
  # reducing_gap: box-filter reduce by an integer factor first when downscaling ≥ 6× (PIL's documented
  # near-lossless speed-up); the box math keeps the geometry exact.
  resized = pil.resize((vw, vh), Image.BILINEAR, box=box, reducing_gap=3.0)
  if geom.flipped:
    resized = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  content = np.asarray(resized)
  out = np.zeros((n, n, 3), np.uint8)
  out[:vh, :vw] = content
  mask = np.zeros((n, n), bool)
  mask[:vh, :vw] = True
  return out, mask


def _nearest_indices(geom: Geometry, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
  """Source row (valid_h,) and column (valid_w,) indices sampled at the output pixel centres."""
  vh, vw = geom.valid
  dx, dy = geom.offset
  s = geom.scale
  xo = np.arange(vw, dtype=np.float64) + 0.5
  if geom.flipped:
    xo = vw - xo
  cols = np.clip(np.floor((xo - dx) / s), 0, w - 1).astype(np.intp)
  yo = np.arange(vh, dtype=np.float64) + 0.5
  rows = np.clip(np.floor((yo - dy) / s), 0, h - 1).astype(np.intp)
  return rows, cols


def apply_label_map(labels: np.ndarray, geom: Geometry, fill: int = 0) -> np.ndarray:
  """(..., H, W) array of any dtype (label / instance-id / colour maps) → (..., out, out), nearest
  neighbour at output pixel centres, `fill` on padding."""
  labels = np.asarray(labels)
  h, w = labels.shape[-2:]
  rows, cols = _nearest_indices(geom, h, w)
  n = geom.out_size
  out = np.full(labels.shape[:-2] + (n, n), fill, labels.dtype)
  vh, vw = geom.valid
  out[..., :vh, :vw] = np.take(np.take(labels, rows, axis=-2), cols, axis=-1)
  return out


def apply_masks(masks: np.ndarray, geom: Geometry) -> np.ndarray:
  """(K, H, W) bool/uint8 masks (nonzero = inside) → (K, out, out) bool, nearest neighbour with the
  same geometry as `apply_image`; padding is False."""
  masks = np.asarray(masks)
  if masks.dtype != np.bool_:
    masks = masks != 0
  return apply_label_map(masks, geom, fill=False)


def apply_traces(traces: np.ndarray, geom: Geometry, in_size: tuple[int, int] | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
  """(..., 2) [x, y] normalised to the SOURCE image ([0, 1] spans its width/height) → ((..., 2) float32
  normalised to the OUTPUT CANVAS (divided by out_size, padding included, so [0, 1] spans the whole
  out_size × out_size input), (...,) bool valid = finite and inside the valid region).

  Invalid points are returned as computed, not clipped; callers zero them (zeros = unsupervised in the
  trace loss) or clip as they need. Boxes given as corner pairs must be re-sorted after a flip (x0/x1
  swap); `Geometry.boxes` on pixel boxes does that. in_size: (height, width) of the source image;
  default geom.in_size.
  """
  size = in_size if in_size is not None else geom.in_size
  if size is None:
    raise ValueError("apply_traces needs the source image size: pass in_size or a Geometry with in_size")
  h, w = size
  t = np.asarray(traces, np.float64)
  px = t * np.array([w, h], np.float64)
  q = geom.points(px).astype(np.float64)
  vh, vw = geom.valid
  valid = (np.isfinite(q).all(axis=-1) & (q[..., 0] >= 0) & (q[..., 0] <= vw)
           & (q[..., 1] >= 0) & (q[..., 1] <= vh))
  return (q / geom.out_size).astype(np.float32), valid


# ---------------------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------------------

# (mean, std) per encoder, on the scale of the uint8 input divided by `divisor`.
NORMALIZATION = {
    "sam": ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375), 1.0),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711), 255.0),
}


def _scale_shift(encoder: str) -> tuple[np.ndarray, np.ndarray]:
  try:
    mean, std, div = NORMALIZATION[encoder]
  except KeyError:
    raise ValueError(f"unknown encoder normalisation '{encoder}'; known: {sorted(NORMALIZATION)}") from None
  mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
  # (x / div - mean) / std = x · scale + shift, computed in float64 once, stored float32.
  return (1.0 / (div * std)).astype(np.float32), (-mean / std).astype(np.float32)


_ROWS: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}


def _rows(encoder: str, width: int) -> tuple[np.ndarray, np.ndarray]:
  """(width · 3,) float32 scale and shift rows: a pixel row of an (H, W, 3) image viewed as (H, W · 3)
  is normalised by one long multiply-add (broadcasting a length-3 axis is several times slower)."""
  key = (encoder, width)
  rows = _ROWS.get(key)
  if rows is None:
    scale, shift = _scale_shift(encoder)
    rows = (np.tile(scale, width), np.tile(shift, width))
    if len(_ROWS) < 256:
      _ROWS[key] = rows
  return rows


def normalize(image: np.ndarray, encoder: str, valid: tuple[int, int] | None = None,
              mask: np.ndarray | None = None) -> np.ndarray:
  """(H, W, 3) uint8 → (H, W, 3) float32 normalised for `encoder` ("sam": (x - mean) / std with the
  ImageNet mean/std on 0–255; "clip": (x / 255 - mean) / std with CLIP's mean/std).

  Padding is 0 AFTER normalisation: with `valid` = (height, width) only the top-left content region is
  normalised into a zero canvas (fastest; pass `geom.valid`); with `mask` (H, W) bool the pixels where
  it is False are set to 0. Without either, every pixel is normalised. float32 throughout.
  """
  image = np.ascontiguousarray(image)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"normalize expects (H, W, 3), got {image.shape}")
  h, w, _ = image.shape
  scale, shift = _rows(encoder, w)
  vh, vw = (h, w) if valid is None else (min(h, valid[0]), min(w, valid[1]))
  out = (np.zeros if (vh, vw) != (h, w) else np.empty)((h, w, 3), np.float32)
  src = image.reshape(h, w * 3)[:vh, :vw * 3]
  dst = out.reshape(h, w * 3)[:vh, :vw * 3]
  dst[...] = src
  dst *= scale[:vw * 3]
  dst += shift[:vw * 3]
  if mask is not None:
    out.reshape(h, w * 3)[...] *= np.repeat(np.asarray(mask, bool), 3, axis=1)
  return out
