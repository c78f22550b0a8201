"""Tests for pixelground.data.transforms: geometry properties (hypothesis) and examples.

Properties, over random image sizes, shapes and train (random resize-crop + flip) / eval (resize-pad)
geometries: a transformed mask's pixel bounding box equals the transformed box within 1 output pixel;
points inside a box stay inside the transformed box; the padding mask is True exactly on the valid
region; the image content lands where the boxes say; flipping twice is the identity; normalisation
keeps the padding at 0.
"""

import dataclasses
import io

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from pixelground.data import transforms as T

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- helpers -----------------------------------------------------------------------------------------


def draw_geometry(data, h, w, out_size):
  """A train (random resize-crop + maybe flip) or eval (resize-pad) geometry for an h × w image."""
  rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
  if data.draw(st.booleans(), label="train"):
    lo = data.draw(st.floats(0.1, 2.5), label="scale_lo")
    hi = data.draw(st.floats(lo, 2.5), label="scale_hi")
    g = T.random_resize_crop(rng, h, w, out_size, (lo, hi))
    return T.maybe_flip(rng, g, p=0.5)
  g = T.resize_pad(h, w, out_size)
  return dataclasses.replace(g, flipped=data.draw(st.booleans(), label="flip_eval"))


def pixel_bbox(mask):
  """xyxy exclusive pixel bounding box of a non-empty 2-D bool mask."""
  rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
  return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], np.float64)


def draw_shapes(data, h, w, scale):
  """(K, h, w) bool masks (rectangles, and ellipses large enough for nearest-neighbour sampling at this
  scale) with their exact pixel boxes (K, 4), and whether each is a rectangle."""
  masks, boxes, is_rect = [], [], []
  # Ellipses: radii ≥ 2 output pixels and aspect ≤ 3, so no extremal row/column of the shape is thinner
  # than the sampling step for more than a fraction of an output pixel (see test docstring).
  r_min = max(2.0, 2.0 / scale)
  for _ in range(data.draw(st.integers(1, 4), label="num_shapes")):
    m = np.zeros((h, w), bool)
    if r_min * 2 + 2 > min(h, w) or data.draw(st.booleans(), label="rect"):
      x0 = data.draw(st.integers(0, w - 1), label="x0")
      x1 = data.draw(st.integers(x0 + 1, w), label="x1")
      y0 = data.draw(st.integers(0, h - 1), label="y0")
      y1 = data.draw(st.integers(y0 + 1, h), label="y1")
      m[y0:y1, x0:x1] = True
      is_rect.append(True)
    else:
      b = data.draw(st.floats(r_min, min(h, w) / 2), label="rb")
      a = data.draw(st.floats(max(r_min, b / 3), min(3 * b, w / 2)), label="ra")
      b = max(b, a / 3)
      cx = data.draw(st.floats(0, w), label="cx")
      cy = data.draw(st.floats(0, h), label="cy")
      yy, xx = np.mgrid[0:h, 0:w] + 0.5
      m = ((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2 <= 1.0
      if not m.any():
        continue
      is_rect.append(False)
    masks.append(m)
    boxes.append(pixel_bbox(m))
  return np.array(masks), np.array(boxes), np.array(is_rect)


sizes = st.tuples(st.integers(20, 300), st.integers(20, 300))
out_sizes = st.sampled_from([24, 48, 96, 384])


# --- geometry properties ------------------------------------------------------------------------------


@SETTINGS
@given(size=sizes, out_size=out_sizes, data=st.data())
def test_mask_boxes_match_transformed_boxes(size, out_size, data):
  """Nearest-neighbour sampling at output pixel centres puts a rectangle's edges within 0.5 pixel of
  the transformed box edges (bound: 1 pixel). An ellipse's tips are thin: the sampled source rows /
  columns are one step 1/scale apart, so up to one output pixel of a tip falls between two of them, and
  near the tip the chord is narrower than the step, so the sampled columns may miss it for another
  b·s / (8a²) output pixels (radius a across, b along, s = 1/scale); with radii ≥ 2 output pixels and
  aspect ≤ 3 that is < 3/16, so the ellipse bound is 1.2 pixels (e.g. radius 4 px at scale 0.64 whose
  one-pixel tip lies in an unsampled column: 1.12). A clipped ellipse's visible part is smaller than
  its clipped box, so there only containment is checked."""
  h, w = size
  g = draw_geometry(data, h, w, out_size)
  masks, boxes, is_rect = draw_shapes(data, h, w, g.scale)
  if len(masks) == 0:
    return
  out = T.apply_masks(masks, g)
  assert out.shape == (len(masks), out_size, out_size) and out.dtype == bool
  assert not out[:, g.valid[0]:].any() and not out[:, :, g.valid[1]:].any()
  tb = g.boxes(boxes).astype(np.float64)
  raw = g.boxes_unclipped(boxes).astype(np.float64)
  keep = g.keep(boxes)
  vh, vw = g.valid
  for k in range(len(masks)):
    if not out[k].any():
      continue
    assert keep[k]
    ob = pixel_bbox(out[k])
    # Containment: no output pixel outside the transformed box (+1 pixel).
    assert ob[0] >= tb[k, 0] - 1 and ob[1] >= tb[k, 1] - 1
    assert ob[2] <= tb[k, 2] + 1 and ob[3] <= tb[k, 3] + 1
    inside = raw[k, 0] >= 0 and raw[k, 1] >= 0 and raw[k, 2] <= vw and raw[k, 3] <= vh
    if is_rect[k] or inside:
      event("rectangle compared" if is_rect[k] else "ellipse compared")
      bound = 1.0 if is_rect[k] else 1.2
      np.testing.assert_array_less(np.abs(ob - tb[k]), bound + 1e-6,
                                   err_msg=f"shape {k} rect={is_rect[k]} geometry {g}")


@SETTINGS
@given(size=sizes, out_size=out_sizes, data=st.data())
def test_points_in_box_stay_in_transformed_box(size, out_size, data):
  h, w = size
  g = draw_geometry(data, h, w, out_size)
  rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="pts"))
  x0, x1 = np.sort(rng.uniform(0, w, 2))
  y0, y1 = np.sort(rng.uniform(0, h, 2))
  box = np.array([[x0, y0, x1, y1]])
  p = np.stack([rng.uniform(x0, x1, 50), rng.uniform(y0, y1, 50)], -1)
  p = np.concatenate([p, [[x0, y0], [x1, y1], [x0, y1], [x1, y0]]])  # corners too
  q = g.points(p).astype(np.float64)
  raw = g.boxes_unclipped(box)[0].astype(np.float64)
  tol = 1e-4
  assert np.all(q[:, 0] >= raw[0] - tol) and np.all(q[:, 0] <= raw[2] + tol)
  assert np.all(q[:, 1] >= raw[1] - tol) and np.all(q[:, 1] <= raw[3] + tol)
  clipped = g.boxes(box)[0]
  inside = g.points_inside(p)
  qi = q[inside]
  assert np.all(qi[:, 0] >= clipped[0] - tol) and np.all(qi[:, 0] <= clipped[2] + tol)
  assert np.all(qi[:, 1] >= clipped[1] - tol) and np.all(qi[:, 1] <= clipped[3] + tol)
  # The inverse map brings points back (evaluation maps predictions to source pixels).
  np.testing.assert_allclose(g.inverse_points(q), p, atol=1e-3 * max(1.0, 1.0 / g.scale))
  # Normalised traces follow the same map, in units of the output canvas.
  tr, valid = T.apply_traces(p / np.array([w, h]), g)
  np.testing.assert_allclose(tr * out_size, q, atol=1e-3)
  np.testing.assert_array_equal(valid, inside)


@SETTINGS
@given(size=sizes, out_size=st.sampled_from([24, 48, 96]), data=st.data())
def test_image_padding_mask_and_content_alignment(size, out_size, data):
  """The mask is True exactly on the valid region, the padding is 0, and a bright rectangle drawn into
  the image lands where its transformed box says (threshold at half intensity, within 1 pixel)."""
  h, w = size
  g = draw_geometry(data, h, w, out_size)
  m = max(2.0, 2.0 / g.scale)  # ≥ 2 output pixels, so the (antialiased) bilinear peak survives
  if 2 * m + 2 > min(h, w):
    m = 0.0
  rw = data.draw(st.integers(int(np.ceil(m)) or 1, w), label="rw")
  rh = data.draw(st.integers(int(np.ceil(m)) or 1, h), label="rh")
  x0 = data.draw(st.integers(0, w - rw), label="rx0")
  y0 = data.draw(st.integers(0, h - rh), label="ry0")
  img = np.zeros((h, w, 3), np.uint8)
  img[..., 1] = 40  # a background colour, so padding (0) differs from the image
  img[y0:y0 + rh, x0:x0 + rw, 0] = 255
  out, mask = T.apply_image(img, g)
  assert out.shape == (out_size, out_size, 3) and out.dtype == np.uint8
  assert mask.shape == (out_size, out_size) and mask.dtype == bool
  vh, vw = g.valid
  expected = np.zeros_like(mask)
  expected[:vh, :vw] = True
  np.testing.assert_array_equal(mask, expected)
  assert not out[~mask].any()
  assert np.all(out[mask][:, 1] == 40)  # every valid pixel is fully covered by the image
  bright = out[..., 0] > 127
  box = g.boxes(np.array([[x0, y0, x0 + rw, y0 + rh]], np.float64))[0].astype(np.float64)
  # Compare where the visible rectangle spans ≥ 2 output pixels each way: a corner pixel of a thinner one
  # mixes two partial coverages and may fall below half intensity.
  if m == 0.0 or min(box[2] - box[0], box[3] - box[1]) < 2.0:
    return
  assert bright.any()
  event("content box compared")
  ob = pixel_bbox(bright)
  np.testing.assert_array_less(np.abs(ob - box), 1.0 + 1e-6, err_msg=f"{g}")


@SETTINGS
@given(size=sizes, out_size=out_sizes, data=st.data())
def test_flip_twice_is_identity(size, out_size, data):
  h, w = size
  g = draw_geometry(data, h, w, out_size)
  rng = np.random.default_rng(0)
  b = np.sort(rng.uniform(0, [w, h, w, h], (8, 4)).reshape(8, 2, 2), axis=1).reshape(8, 4)
  b = b[:, [0, 2, 1, 3]]  # (x0, x1, y0, y1) sorted pairs → xyxy
  gf = dataclasses.replace(g, flipped=not g.flipped)
  gff = dataclasses.replace(gf, flipped=not gf.flipped)
  np.testing.assert_array_equal(gff.boxes(b), g.boxes(b))
  # A flipped geometry mirrors the boxes inside the valid width.
  vw = g.valid[1]
  bb, bf = g.boxes(b), gf.boxes(b)
  np.testing.assert_allclose(bf[:, [0, 2]], vw - bb[:, [2, 0]], atol=1e-4)
  np.testing.assert_allclose(bf[:, [1, 3]], bb[:, [1, 3]], atol=1e-4)
  # maybe_flip with p=1 twice is the identity.
  assert T.maybe_flip(rng, T.maybe_flip(rng, g, p=1.0), p=1.0) == g
  # Flipped image = the image mirrored inside its valid width; same for masks.
  img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
  a, mask_a = T.apply_image(img, g)
  f, mask_f = T.apply_image(img, gf)
  np.testing.assert_array_equal(mask_a, mask_f)
  np.testing.assert_array_equal(f[:, :vw], a[:, vw - 1::-1] if vw else f[:, :0])
  mk = rng.random((2, h, w)) < 0.3
  ma, mf = T.apply_masks(mk, g), T.apply_masks(mk, gf)
  np.testing.assert_array_equal(mf[:, :, :vw], ma[:, :, vw - 1::-1])


@SETTINGS
@given(size=sizes, out_size=st.sampled_from([24, 96, 384]), encoder=st.sampled_from(["sam", "clip"]),
       data=st.data())
def test_normalize_keeps_padding_zero(size, out_size, encoder, data):
  h, w = size
  g = draw_geometry(data, h, w, out_size)
  img = np.random.default_rng(1).integers(0, 256, (h, w, 3), dtype=np.uint8)
  out, mask = T.apply_image(img, g)
  mean, std, div = T.NORMALIZATION[encoder]
  ref = (out.astype(np.float64) / div - np.array(mean)) / np.array(std)
  for x in (T.normalize(out, encoder, valid=g.valid), T.normalize(out, encoder, mask=mask)):
    assert x.dtype == np.float32 and x.shape == out.shape
    assert np.all(x[~mask] == 0.0)
    np.testing.assert_allclose(x[mask], ref[mask], rtol=1e-5, atol=1e-5)
  full = T.normalize(out, encoder)  # no padding information: every pixel normalised
  np.testing.assert_allclose(full, ref, rtol=1e-5, atol=1e-5)


@SETTINGS
@given(size=sizes, out_size=out_sizes, lo=st.floats(0.1, 2.0), width=st.floats(0.0, 1.0),
       seed=st.integers(0, 2**32 - 1))
def test_random_resize_crop_ranges(size, out_size, lo, width, seed):
  h, w = size
  hi = lo + width
  g = T.random_resize_crop(np.random.default_rng(seed), h, w, out_size, (lo, hi))
  s = g.scale * max(h, w) / out_size
  assert lo - 1e-9 <= s <= hi + 1e-9
  assert not g.flipped and g.in_size == (h, w) and g.out_size == out_size
  for n, off, v in ((w, g.offset[0], g.valid[1]), (h, g.offset[1], g.valid[0])):
    full = int(np.floor(n * g.scale + 1e-6))
    assert off <= 0 and off == int(off) and -off <= max(0, full - out_size)
    assert 1 <= v <= out_size
    assert v == max(1, min(out_size, full + int(off)))


@pytest.mark.parametrize("h,w", [(480, 640), (640, 480), (333, 500), (20, 300), (384, 384), (1000, 7)])
def test_resize_pad(h, w):
  g = T.resize_pad(h, w, 384)
  assert g.offset == (0.0, 0.0) and not g.flipped
  long_valid = g.valid[0] if h >= w else g.valid[1]
  short_valid = g.valid[1] if h >= w else g.valid[0]
  assert long_valid == 384
  assert short_valid == max(1, int(np.floor(min(h, w) * 384 / max(h, w) + 1e-6)))
  # Whole-image box → the valid region (the last partial output pixel of the short side is padding).
  np.testing.assert_allclose(g.boxes(np.array([[0, 0, w, h]])), [[0, 0, g.valid[1], g.valid[0]]],
                             atol=1e-3)
  np.testing.assert_allclose(g.boxes_unclipped(np.array([[0, 0, w, h]])),
                             [[0, 0, w * g.scale, h * g.scale]], atol=1e-3)
  np.testing.assert_allclose(g.inverse_boxes(g.boxes_unclipped(np.array([[1, 2, w - 1, h - 1]]))),
                             [[1, 2, w - 1, h - 1]], atol=1e-2)


def test_boxes_and_keep_examples():
  g = T.Geometry(scale=2.0, offset=(-10.0, 0.0), flipped=False, out_size=20, valid=(10, 20),
                 in_size=(5, 20))
  b = np.array([[2, 0, 5, 1],     # columns 2..4 → output [−6, 0): cropped away
                [5, 1, 8, 2],     # → [0, 2, 6, 4]
                [14, 4, 20, 5],   # → [18, 8, 30, 10] clipped to [18, 8, 20, 10]
                [3, 1, 3, 4]])    # zero width
  np.testing.assert_allclose(g.boxes(b), [[0, 0, 0, 2], [0, 2, 6, 4], [18, 8, 20, 10], [0, 2, 0, 8]])
  np.testing.assert_array_equal(g.keep(b), [False, True, True, False])
  gf = dataclasses.replace(g, flipped=True)
  np.testing.assert_allclose(gf.boxes(b[1:3]), [[14, 2, 20, 4], [0, 8, 2, 10]])
  # Pixel centre convention: source pixel (0, 5) centre (5.5, 0.5) → output (1, 1).
  np.testing.assert_allclose(g.points(np.array([[5.5, 0.5]])), [[1.0, 1.0]])
  np.testing.assert_allclose(gf.points(np.array([[5.5, 0.5]])), [[19.0, 1.0]])
  assert g.boxes(b.reshape(2, 2, 4)).shape == (2, 2, 4)


def test_label_map_and_traces_examples():
  g = T.resize_pad(4, 2, 8)  # scale 2, valid (8, 4)
  labels = np.arange(8, dtype=np.int32).reshape(4, 2)
  out = T.apply_label_map(labels, g, fill=-1)
  np.testing.assert_array_equal(out[:, :4], np.repeat(np.repeat(labels, 2, 0), 2, 1))
  assert np.all(out[:, 4:] == -1)
  tr, valid = T.apply_traces(np.array([[0.5, 0.5], [1.0, 1.0], [1.5, 0.2], [np.nan, 0.1]]), g)
  np.testing.assert_allclose(tr[:3], [[2 / 8, 4 / 8], [4 / 8, 8 / 8], [6 / 8, 1.6 / 8]], atol=1e-6)
  np.testing.assert_array_equal(valid, [True, True, False, False])
  with pytest.raises(ValueError):
    T.apply_traces(np.zeros((1, 2)), dataclasses.replace(g, in_size=None))


def test_jpeg_draft_decode_matches_full_decode():
  """`reduce_for` decodes a JPEG at reduced size for strong downscales; the result matches the full
  decode's resize (same geometry) up to resampling differences."""
  yy, xx = np.mgrid[0:480, 0:640]
  img = np.stack([xx * 255 // 639, yy * 255 // 479, np.full_like(xx, 90)], -1).astype(np.uint8)
  img[100:300, 200:400] = (250, 20, 20)
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, "JPEG", quality=95)
  data = buf.getvalue()
  g = T.random_resize_crop(np.random.default_rng(0), 480, 640, 96, (0.5, 0.5))
  full, mask_full = T.apply_image(T.open_image(data), g)
  im = T.open_image(data)
  factor = T.reduce_for(im, g)
  assert factor < 1.0
  reduced, mask_red = T.apply_image(im, g, image_scale=factor)
  assert im.size[0] < 640
  np.testing.assert_array_equal(mask_full, mask_red)
  assert np.abs(full.astype(int) - reduced.astype(int)).mean() < 3.0
  # Sizes inferred from geom.in_size when image_scale is not given.
  inferred, _ = T.apply_image(im, g)
  assert np.abs(full.astype(int) - inferred.astype(int)).mean() < 3.0
  # No reduction for mild downscales.
  assert T.reduce_for(T.open_image(data), T.resize_pad(480, 640, 384)) == 1.0


# --- colour conversion --------------------------------------------------------------------------------


def _png_roundtrip(img):
  buf = io.BytesIO()
  img.save(buf, "PNG")
  return Image.open(io.BytesIO(buf.getvalue()))


def test_to_rgb_uint8_pil_modes():
  gray = np.array([[0, 128], [200, 255]], np.uint8)
  exp_gray = np.repeat(gray[..., None], 3, -1)
  np.testing.assert_array_equal(T.to_rgb_uint8(Image.fromarray(gray, "L")), exp_gray)
  np.testing.assert_array_equal(T.to_rgb_uint8(Image.fromarray(gray > 100)),
                                np.repeat(np.where(gray > 100, 255, 0)[..., None], 3, -1))
  # 16-bit grayscale PNG: scaled by 255/65535.
  g16 = np.array([[0, 257 * 100], [65535, 32896]], np.uint16)
  img16 = _png_roundtrip(Image.fromarray(g16))
  assert img16.mode.startswith("I")
  np.testing.assert_array_equal(T.to_rgb_uint8(img16)[..., 0], [[0, 100], [255, 128]])
  i32 = Image.fromarray(np.array([[0, 65535], [-5, 70000]], np.int32), "I")
  np.testing.assert_array_equal(T.to_rgb_uint8(i32)[..., 1], [[0, 255], [0, 255]])
  f = Image.fromarray(np.array([[0.0, 0.5], [1.0, 2.0]], np.float32), "F")
  np.testing.assert_array_equal(T.to_rgb_uint8(f)[..., 2], [[0, 128], [255, 255]])
  # RGBA / LA: composited on black.
  rgba = np.array([[[200, 100, 50, 128], [10, 20, 30, 255]]], np.uint8)
  np.testing.assert_array_equal(T.to_rgb_uint8(Image.fromarray(rgba, "RGBA")),
                                [[[100, 50, 25], [10, 20, 30]]])
  la = Image.fromarray(np.array([[[200, 0], [200, 255]]], np.uint8), "LA")
  np.testing.assert_array_equal(T.to_rgb_uint8(la), [[[0, 0, 0], [200, 200, 200]]])
  # Palette, with and without transparency.
  p = Image.new("P", (2, 1))
  p.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
  p.putpixel((1, 0), 1)
  np.testing.assert_array_equal(T.to_rgb_uint8(p), [[[255, 0, 0], [0, 255, 0]]])
  p.info["transparency"] = 0
  np.testing.assert_array_equal(T.to_rgb_uint8(_png_roundtrip(p)), [[[0, 0, 0], [0, 255, 0]]])
  # CMYK, YCbCr, RGB.
  cmyk = Image.new("CMYK", (1, 1), (0, 255, 255, 0))
  np.testing.assert_array_equal(T.to_rgb_uint8(cmyk), [[[255, 0, 0]]])
  ycc = Image.new("RGB", (3, 2), (10, 200, 30)).convert("YCbCr")
  assert np.abs(T.to_rgb_uint8(ycc).astype(int) - [10, 200, 30]).max() <= 3
  rgb = Image.new("RGB", (3, 2), (1, 2, 3))
  out = T.to_rgb_uint8(rgb)
  assert out.shape == (2, 3, 3) and out.dtype == np.uint8 and np.all(out == [1, 2, 3])
  for mode in ("HSV", "LAB", "I;16B", "RGBX", "RGBa", "La", "PA"):
    try:
      img = Image.new(mode, (4, 3))
    except (ValueError, OSError):
      continue
    out = T.to_rgb_uint8(img)
    assert out.shape == (3, 4, 3) and out.dtype == np.uint8, mode


def test_to_rgb_uint8_arrays():
  np.testing.assert_array_equal(T.to_rgb_uint8(np.array([[True, False]]))[0, :, 0], [255, 0])
  np.testing.assert_array_equal(T.to_rgb_uint8(np.array([[65535, 257]], np.uint16))[0, :, 0], [255, 1])
  np.testing.assert_array_equal(T.to_rgb_uint8(np.array([[65535, 257]], ">u2"))[0, :, 0], [255, 1])
  np.testing.assert_array_equal(T.to_rgb_uint8(np.array([[0.0, 0.5, np.nan, 7.0]]))[0, :, 0],
                                [0, 128, 0, 255])
  np.testing.assert_array_equal(T.to_rgb_uint8(np.array([[-4, 300, 17]], np.int64))[0, :, 0],
                                [0, 255, 17])
  np.testing.assert_array_equal(T.to_rgb_uint8(np.full((1, 1, 1), 9, np.uint8)), [[[9, 9, 9]]])
  np.testing.assert_array_equal(T.to_rgb_uint8(np.array([[[200, 0], [200, 255]]], np.uint8)),
                                [[[0, 0, 0], [200, 200, 200]]])
  np.testing.assert_array_equal(T.to_rgb_uint8(np.array([[[200, 100, 50, 128]]], np.uint8)),
                                [[[100, 50, 25]]])
  np.testing.assert_array_equal(T.to_rgb_uint8(np.arange(5, dtype=np.uint8).reshape(1, 1, 5)),
                                [[[0, 1, 2]]])
  x = np.zeros((2, 3, 3), np.uint8)
  assert T.to_rgb_uint8(x) is x


def test_maybe_flip_refuses_unsafe_text():
  g = T.resize_pad(100, 200, 64)
  assert T.maybe_flip(np.random.default_rng(0), g, p=1.0, texts=["the dog on the left"]).flipped
  assert not T.maybe_flip(np.random.default_rng(0), g, p=1.0, texts=["the west gate"]).flipped
  assert not T.maybe_flip(np.random.default_rng(0), g, p=0.0).flipped
  # One draw either way: the stream stays aligned whether or not the text allowed the flip.
  r1, r2 = np.random.default_rng(3), np.random.default_rng(3)
  T.maybe_flip(r1, g, texts=["left"]), T.maybe_flip(r2, g, texts=["west"])
  assert r1.random() == r2.random()


def test_normalize_constants_and_errors():
  x = np.array([[[123, 116, 103]]], np.uint8)
  sam = T.normalize(x, "sam")
  np.testing.assert_allclose(sam[0, 0], (np.array([123, 116, 103]) - [123.675, 116.28, 103.53])
                             / [58.395, 57.12, 57.375], rtol=1e-5, atol=1e-6)
  clip = T.normalize(np.full((1, 1, 3), 255, np.uint8), "clip")
  np.testing.assert_allclose(clip[0, 0], (1 - np.array([0.48145466, 0.4578275, 0.40821073]))
                             / [0.26862954, 0.26130258, 0.27577711], rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="unknown encoder"):
    T.normalize(x, "imagenet21k")
