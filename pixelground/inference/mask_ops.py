"""Building blocks of the automatic mask generator (`auto_masks`): point grids, crop boxes, mask
resizing, stability scores, mask boxes, box NMS, small-region removal and run-length encodings.

Conventions (as segment-anything's automatic mask generator, whose option names `auto_masks` keeps):
  * points are (x, y) in pixels; point grids are normalised to [0, 1] (cell centres);
  * boxes are xyxy in pixels with *inclusive* max coordinates for boxes read off masks (a one-pixel
    mask at (x, y) has box [x, y, x, y]); crop boxes are xyxy with exclusive max (slice bounds);
  * masks are (..., H, W) logits (float) or bool; RLEs are COCO RLEs of the (H, W) mask, either
    uncompressed ({"size": [H, W], "counts": [run lengths in column-major order, zeros first]}) or
    compressed (pycocotools' {"size", "counts": str}).
The jax functions are traced inside the generator's compiled programs; the numpy ones run on the host
on the few masks that survive the filters.
"""

from __future__ import annotations

import itertools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np


# -- prompts and crops -------------------------------------------------------------------------------
def point_grid(n_per_side: int) -> np.ndarray:
  """(n², 2) float64 (x, y) cell centres of an n×n grid over [0, 1]², rows (y) outer, x inner."""
  offset = 1.0 / (2 * n_per_side)
  side = np.linspace(offset, 1 - offset, n_per_side)
  xs = np.tile(side[None, :], (n_per_side, 1))
  ys = np.tile(side[:, None], (1, n_per_side))
  return np.stack([xs, ys], axis=-1).reshape(-1, 2)


def layer_point_grids(n_per_side: int, n_layers: int, downscale: int) -> list[np.ndarray]:
  """One grid per crop layer 0..n_layers: layer i has int(n_per_side / downscale**i) points per side."""
  return [point_grid(int(n_per_side / downscale ** i)) for i in range(n_layers + 1)]


def crop_boxes(height: int, width: int, n_layers: int, overlap_ratio: float
               ) -> tuple[list[list[int]], list[int]]:
  """Crops of an image: layer 0 is the whole image, layer i ≥ 1 a 2^i × 2^i grid of overlapping crops
  (overlap = overlap_ratio · short side · 2 / 2^i pixels). → (xyxy crop boxes (exclusive max),
  their layer indices)."""
  boxes, layers = [[0, 0, width, height]], [0]
  short = min(height, width)

  def crop_len(length, n, overlap):
    return int(math.ceil((overlap * (n - 1) + length) / n))

  for layer in range(n_layers):
    n = 2 ** (layer + 1)
    overlap = int(overlap_ratio * short * (2 / n))
    cw, ch = crop_len(width, n, overlap), crop_len(height, n, overlap)
    x0s = [int((cw - overlap) * i) for i in range(n)]
    y0s = [int((ch - overlap) * i) for i in range(n)]
    for x0, y0 in itertools.product(x0s, y0s):
      boxes.append([x0, y0, min(x0 + cw, width), min(y0 + ch, height)])
      layers.append(layer + 1)
  return boxes, layers


def resized_shape(height: int, width: int, long_side: int) -> tuple[int, int]:
  """(h, w) of an image scaled so its long side is `long_side` (rounded half up)."""
  scale = long_side / max(height, width)
  return int(height * scale + 0.5), int(width * scale + 0.5)


# -- on-device mask maths ----------------------------------------------------------------------------
def _linear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Source indices i0, i1 and weight of i1 for linear resampling n_in → n_out with half-pixel centres
  and clamped borders (PyTorch's `interpolate(mode="bilinear", align_corners=False)`): a float32 scale
  and src = scale·(i + 0.5) − 0.5 rounded once to float32, as its fused multiply-add does."""
  scale = np.float32(n_in) / np.float32(n_out)
  src = (np.float64(scale) * (np.arange(n_out) + 0.5) - 0.5).astype(np.float32)
  src = np.maximum(src, np.float32(0.0))
  i0 = np.minimum(src.astype(np.int64), n_in - 1)
  i1 = np.minimum(i0 + 1, n_in - 1)
  return i0.astype(np.int32), i1.astype(np.int32), (src - i0).astype(np.float32)


def _upsample_pow2(x: jax.Array, axis: int, factor: int) -> jax.Array:
  """Linear upsampling by a power of two along `axis` (torch's arithmetic, which is exact for these
  factors): output k·i + j mixes input i with its neighbour i ∓ 1 (the border repeated) by fixed
  weights — shifted copies and a reshape instead of a gather (XLA's CPU gathers are slow)."""
  n = x.shape[axis]
  edge = lambda a, b: jax.lax.slice_in_dim(x, a, b, axis=axis)  # noqa: E731
  prev = jnp.concatenate([edge(0, 1), edge(0, n - 1)], axis)
  nxt = jnp.concatenate([edge(1, n), edge(n - 1, n)], axis)
  parts = []
  for j in range(factor):
    d = (j + 0.5) / factor - 0.5   # source offset of output j within its input cell
    parts.append(-d * prev + (1 + d) * x if d < 0 else (1 - d) * x + d * nxt)
  out = jnp.stack(parts, axis=axis + 1)
  return out.reshape(x.shape[:axis] + (factor * n,) + x.shape[axis + 1:])


def _resize_axis(x: jax.Array, axis: int, n_out: int) -> jax.Array:
  n_in = x.shape[axis]
  if n_out == n_in:
    return x
  factor = n_out // n_in
  if n_out == factor * n_in and factor & (factor - 1) == 0:
    return _upsample_pow2(x, axis, factor)
  return _resample_blocks(x, axis, n_out)


def _resample_blocks(x: jax.Array, axis: int, n_out: int, block: int = 32) -> jax.Array:
  """Linear resampling along `axis` as small dense products: each run of `block` outputs reads one
  window of L consecutive inputs (static slices) through an (L, block) matrix holding the two taps of
  every output (`_linear_taps`), so the work is L multiply-adds per output and no gather runs."""
  n_in = x.shape[axis]
  i0, i1, w = _linear_taps(n_in, n_out)
  n_blocks = -(-n_out // block)
  pad = n_blocks * block - n_out
  i0, i1 = np.pad(i0, (0, pad), mode="edge"), np.pad(i1, (0, pad), mode="edge")
  w = np.pad(w, (0, pad))
  starts = i0.reshape(n_blocks, block).min(1)
  length = min(n_in, int((i1.reshape(n_blocks, block).max(1) - starts).max()) + 1)
  starts = np.minimum(starts, n_in - length)
  mat = np.zeros((n_blocks, length, block), np.float32)
  b, j = np.divmod(np.arange(n_blocks * block), block)
  np.add.at(mat, (b, i0 - starts[b], j), 1 - w)
  np.add.at(mat, (b, i1 - starts[b], j), w)
  windows = jnp.stack([jax.lax.slice_in_dim(x, int(s), int(s) + length, axis=axis) for s in starts],
                      axis=axis)                                   # (..., n_blocks, L, ...)
  x = jnp.moveaxis(windows, (axis, axis + 1), (-2, -1)) if axis != x.ndim - 1 else windows
  out = jnp.einsum("...bl,blj->...bj", x, jnp.asarray(mat), precision=jax.lax.Precision.HIGHEST)
  out = out.reshape(out.shape[:-2] + (n_blocks * block,))[..., :n_out]
  return jnp.moveaxis(out, -1, axis) if axis != out.ndim - 1 else out


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """(..., h, w) float → (..., H, W): bilinear, half-pixel centres, no antialiasing (the resampling of
  PyTorch's `F.interpolate(..., mode="bilinear", align_corners=False)`, width first as torch sums);
  same size → unchanged."""
  x = _resize_axis(x, x.ndim - 1, int(size[1]))
  return _resize_axis(x, x.ndim - 2, int(size[0]))


def stability_score(logits: jax.Array, threshold: float, offset: float) -> jax.Array:
  """(..., H, W) logits → (...,) IoU between the masks cut at threshold + offset and threshold - offset
  (the first is inside the second): #(logit > t + o) / #(logit > t - o)."""
  inter = jnp.sum(logits > threshold + offset, axis=(-2, -1), dtype=jnp.int32)
  union = jnp.sum(logits > threshold - offset, axis=(-2, -1), dtype=jnp.int32)
  return inter.astype(jnp.float32) / union.astype(jnp.float32)


def mask_boxes(masks: jax.Array) -> jax.Array:
  """(..., H, W) bool → (..., 4) int32 xyxy boxes with inclusive max coordinates; [0, 0, 0, 0] for an
  empty mask."""
  h, w = masks.shape[-2:]
  rows, cols = jnp.any(masks, axis=-1), jnp.any(masks, axis=-2)
  ys, xs = jnp.arange(h, dtype=jnp.int32), jnp.arange(w, dtype=jnp.int32)
  y1 = jnp.max(jnp.where(rows, ys, -1), axis=-1)
  y0 = jnp.min(jnp.where(rows, ys, h), axis=-1)
  x1 = jnp.max(jnp.where(cols, xs, -1), axis=-1)
  x0 = jnp.min(jnp.where(cols, xs, w), axis=-1)
  box = jnp.stack([x0, y0, x1, y1], axis=-1)
  return jnp.where((x1 >= 0)[..., None], box, 0)


# -- host-side filters -------------------------------------------------------------------------------
def near_crop_edge(boxes: np.ndarray, crop_box, image_box, atol: float = 20.0) -> np.ndarray:
  """boxes (N, 4) xyxy in crop pixels → (N,) bool: a side lies within `atol` pixels of the crop's
  border where that border is not also the image's (such masks are likely cut by the crop)."""
  b = boxes.astype(np.float32) + np.asarray(crop_box[:2] * 2, np.float32)
  near_crop = np.abs(b - np.asarray(crop_box, np.float32)) <= atol
  near_image = np.abs(b - np.asarray(image_box, np.float32)) <= atol
  return np.any(near_crop & ~near_image, axis=1)


def box_nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
  """Greedy NMS: boxes (N, 4) xyxy, scores (N,) → indices kept, by decreasing score (ties: lower index
  first). A box is dropped when its IoU with a kept box exceeds `iou_threshold`; areas are
  (x1 - x0)·(y1 - y0) in float32, so a zero-area box suppresses nothing and is never suppressed."""
  n = len(boxes)
  if n == 0:
    return np.zeros((0,), np.int64)
  b = np.asarray(boxes, np.float32)
  order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
  b = b[order]
  area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
  x0 = np.maximum(b[:, None, 0], b[None, :, 0])
  y0 = np.maximum(b[:, None, 1], b[None, :, 1])
  x1 = np.minimum(b[:, None, 2], b[None, :, 2])
  y1 = np.minimum(b[:, None, 3], b[None, :, 3])
  inter = np.maximum(x1 - x0, np.float32(0)) * np.maximum(y1 - y0, np.float32(0))
  with np.errstate(invalid="ignore", divide="ignore"):
    over = inter / (area[:, None] + area[None, :] - inter) > np.float32(iou_threshold)
  removed = np.zeros(n, bool)
  keep = []
  for i in range(n):
    if removed[i]:
      continue
    keep.append(i)
    removed |= over[i]
  return order[np.asarray(keep, np.int64)]


def remove_small_regions(mask: np.ndarray, area: float, mode: str) -> tuple[np.ndarray, bool]:
  """Fills holes ("holes") or drops islands ("islands") of fewer than `area` pixels (8-connected) in a
  (H, W) bool mask; if every island is small the largest one stays. → (mask, changed)."""
  from scipy import ndimage

  if mode not in ("holes", "islands"):
    raise ValueError(f"remove_small_regions: mode must be 'holes' or 'islands', got {mode!r}")
  holes = mode == "holes"
  work = np.logical_xor(mask, holes)
  labels, n = ndimage.label(work, structure=np.ones((3, 3), bool))
  sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
  small = [i + 1 for i, s in enumerate(sizes) if s < area]
  if not small:
    return mask, False
  fill = [0] + small
  if not holes:
    fill = [i for i in range(n + 1) if i not in fill] or [int(np.argmax(sizes)) + 1]
  return np.isin(labels, fill), True


# -- run-length encodings ----------------------------------------------------------------------------
def encode_rle(masks: np.ndarray) -> list[dict]:
  """(N, H, W) bool → compressed COCO RLEs (pycocotools; "counts" a str, JSON-ready)."""
  from pycocotools import mask as mask_utils

  if len(masks) == 0:
    return []
  rles = mask_utils.encode(np.asfortranarray(np.moveaxis(masks.astype(np.uint8), 0, -1)))
  for r in rles:
    r["counts"] = r["counts"].decode("ascii")
  return rles


def decode_rle(rle: dict) -> np.ndarray:
  """A compressed COCO RLE → (H, W) bool."""
  from pycocotools import mask as mask_utils

  r = dict(rle, counts=rle["counts"].encode("ascii") if isinstance(rle["counts"], str)
           else rle["counts"])
  with warnings.catch_warnings():  # pycocotools' Cython under NumPy 2 (`__array__` without `copy`)
    warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
    return mask_utils.decode(r).astype(bool)


def uncompressed_rle(mask: np.ndarray) -> dict:
  """(H, W) bool → {"size": [H, W], "counts": run lengths of the column-major pixels, zeros first}."""
  h, w = mask.shape
  flat = np.asarray(mask, bool).T.ravel()
  change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
  bounds = np.concatenate([[0], change, [h * w]])
  counts = np.diff(bounds).tolist()
  if h * w and flat[0]:
    counts = [0] + counts
  return {"size": [h, w], "counts": counts}
