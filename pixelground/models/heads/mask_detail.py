"""A high-resolution image branch for SAM's mask decoder (`PixelLLMConfig.mask_detail`)."""

from __future__ import annotations

import typing as tp

import jax
import jax.numpy as jnp
from flax import nnx

from pixelground.models import sam_decoder as dec_lib
from pixelground.models.layers import make_param, normal, zeros

if tp.TYPE_CHECKING:
  from pixelground.models.pixelllm import PixelLLMConfig


class MaskDetail(nnx.Module):
  """`mask_detail` (demo aid): image (B, S, S, 3) ImageNet-normalised → (B, 4gs, 4gs, C) features at
  SAM's mask-decoder output resolution: 3×3 conv (3 → C) + GELU at S×S, then an s×s stride-s conv
  (C → C), s = S / (4 gs)."""

  def __init__(self, cfg: PixelLLMConfig, *, rngs: nnx.Rngs):
    c, pd = cfg.mask_detail, cfg.weight_dtype
    self.stride, self.dtype = cfg.image_size // (4 * cfg.sam_grid), cfg.compute_dtype
    self.conv1 = make_param(rngs, normal(27 ** -0.5), (3, 3, 3, c), (None, None, "channels", "conv_out"), pd)
    self.conv1_bias = make_param(rngs, zeros, (c,), ("conv_out",), pd)
    s = self.stride
    self.conv2 = make_param(rngs, normal((s * s * c) ** -0.5), (s, s, c, c),
                            (None, None, "conv_in", "conv_out"), pd)
    self.conv2_bias = make_param(rngs, zeros, (c,), ("conv_out",), pd)

  def __call__(self, x: jax.Array) -> jax.Array:
    dn = ("NHWC", "HWIO", "NHWC")
    y = jax.lax.conv_general_dilated(x.astype(self.dtype), self.conv1[...].astype(self.dtype), (1, 1),
                                     ((1, 1), (1, 1)), dimension_numbers=dn,
                                     preferred_element_type=jnp.float32)
    y = dec_lib.gelu(y + self.conv1_bias[...]).astype(self.dtype)
    return dec_lib.patch_conv(y, self.conv2[...], self.conv2_bias[...], self.dtype)
