"""A second look at an object box on a crop of the image (`PixelLLMConfig.box_refine`)."""

from __future__ import annotations

import typing as tp

import jax
import jax.numpy as jnp
from flax import nnx

from pixelground.models import sam_decoder as dec_lib
from pixelground.models.layers import LayerNorm, Projection, make_param, normal, zeros

if tp.TYPE_CHECKING:
  from pixelground.models.pixelllm import PixelLLMConfig


def ordered_box(box: jax.Array) -> jax.Array:
  """(..., 4) [x0, y0, x1, y1] with each pair sorted (a predicted box may come out flipped)."""
  x0, y0, x1, y1 = jnp.split(box, 4, axis=-1)
  return jnp.concatenate([jnp.minimum(x0, x1), jnp.minimum(y0, y1), jnp.maximum(x0, x1),
                          jnp.maximum(y0, y1)], axis=-1)


def bilinear_sample(image: jax.Array, x: jax.Array, y: jax.Array) -> jax.Array:
  """image (B, H, W, C); x, y (B, ...) coordinates in pixels (pixel i spans [i, i + 1), so its centre
  is i + 0.5) → (B, ..., C) float32 bilinear samples; points off the image read 0."""
  b, h, w, c = image.shape
  fx, fy = x.astype(jnp.float32) - 0.5, y.astype(jnp.float32) - 0.5
  x0, y0 = jnp.floor(fx), jnp.floor(fy)
  flat = image.reshape(b, h * w, c).astype(jnp.float32)
  out = jnp.zeros(x.shape + (c,), jnp.float32)
  for dy, wy in ((0, 1.0 - (fy - y0)), (1, fy - y0)):
    for dx, wx in ((0, 1.0 - (fx - x0)), (1, fx - x0)):
      xi, yi = (x0 + dx).astype(jnp.int32), (y0 + dy).astype(jnp.int32)
      inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
      idx = (jnp.clip(yi, 0, h - 1) * w + jnp.clip(xi, 0, w - 1)).reshape(b, -1)
      v = jax.vmap(lambda f, i: f[i])(flat, idx).reshape(x.shape + (c,))
      out = out + v * jnp.where(inside, wx * wy, 0.0)[..., None]
  return out


class BoxRefiner(nnx.Module):
  """`box_refine` = n (demo aid): box (B, 4) + its decoder state (B, d) + the normalised image
  (B, S, S, 3) → refined box (B, 4), [x0, y0, x1, y1] model-input pixels. The image is resampled on an
  n×n grid over the box grown `GROW`× about its centre (each side at least `MIN_SIDE` px); 3×3 conv
  (3 → C) + GELU, 3×3 conv (C → C) + GELU, two 2×2 stride-2 convs (→ 2C) + GELU, flatten; that plus
  the LN'd state, each projected to `loc_hidden`, summed, GELU, → 4 corrections in units of the crop's
  half sides (zero-initialised: the refiner starts as the identity)."""

  GROW, MIN_SIDE, CHANNELS = 1.6, 4.0, 16

  def __init__(self, cfg: PixelLLMConfig, *, rngs: nnx.Rngs):
    n, c, pd, hid = cfg.box_refine, self.CHANNELS, cfg.weight_dtype, cfg.loc_hidden
    common = dict(dtype=cfg.compute_dtype, param_dtype=pd, rngs=rngs)
    self.n, self.dtype = n, cfg.compute_dtype
    conv = lambda k, i, o: (make_param(rngs, normal((k * k * i) ** -0.5), (k, k, i, o),
                                       (None, None, "conv_in", "conv_out"), pd),
                            make_param(rngs, zeros, (o,), ("conv_out",), pd))
    self.conv1, self.conv1_bias = conv(3, 3, c)
    self.conv2, self.conv2_bias = conv(3, c, c)
    self.down1, self.down1_bias = conv(2, c, 2 * c)
    self.down2, self.down2_bias = conv(2, 2 * c, 2 * c)
    self.proj_crop = Projection(((n // 4) ** 2 * 2 * c,), (hid,), ("mlp",), ("mlp",), use_bias=True,
                                **common)
    self.norm = LayerNorm(cfg.t5.d_model, "embed", eps=1e-6, **common)
    self.proj_state = Projection((cfg.t5.d_model,), (hid,), ("embed",), ("mlp",), **common)
    self.out = Projection((hid,), (4,), ("mlp",), (None,), init_std=0.0, use_bias=True, **common)

  def crop(self, box: jax.Array, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """→ (the n×n crop (B, n, n, 3) float32, the crop's half sides (B, 2) [x, y] pixels)."""
    box = ordered_box(box.astype(jnp.float32))
    centre = (box[:, :2] + box[:, 2:]) / 2
    half = jnp.maximum((box[:, 2:] - box[:, :2]) * self.GROW, self.MIN_SIDE) / 2
    u = (jnp.arange(self.n, dtype=jnp.float32) + 0.5) / self.n * 2 - 1
    xs = centre[:, :1] + u * half[:, :1]  # (B, n)
    ys = centre[:, 1:] + u * half[:, 1:]
    xx = jnp.broadcast_to(xs[:, None, :], (box.shape[0], self.n, self.n))
    yy = jnp.broadcast_to(ys[:, :, None], (box.shape[0], self.n, self.n))
    return bilinear_sample(pixels, xx, yy), half

  def __call__(self, box: jax.Array, state: jax.Array, pixels: jax.Array) -> jax.Array:
    box = ordered_box(jax.lax.stop_gradient(box).astype(jnp.float32))
    crop, half = self.crop(box, pixels)
    dn = ("NHWC", "HWIO", "NHWC")
    y = crop.astype(self.dtype)
    for w, bias in ((self.conv1, self.conv1_bias), (self.conv2, self.conv2_bias)):
      y = jax.lax.conv_general_dilated(y, w[...].astype(self.dtype), (1, 1), ((1, 1), (1, 1)),
                                       dimension_numbers=dn, preferred_element_type=jnp.float32)
      y = dec_lib.gelu(y + bias[...]).astype(self.dtype)
    for w, bias in ((self.down1, self.down1_bias), (self.down2, self.down2_bias)):
      y = dec_lib.gelu(dec_lib.patch_conv(y, w[...], bias[...], self.dtype))
    x = self.proj_crop(y.reshape(y.shape[0], -1)) + self.proj_state(self.norm(state))
    x = jax.nn.gelu(x.astype(jnp.float32), approximate=False).astype(self.dtype)
    delta = self.out(x).astype(jnp.float32)
    return box + delta * jnp.concatenate([half, half], axis=-1)
