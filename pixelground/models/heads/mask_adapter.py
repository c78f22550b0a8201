"""PixelLLM's gated mask adapter for referring segmentation (SPEC 1.8)."""

from __future__ import annotations

import typing as tp

import jax
import jax.numpy as jnp
from flax import nnx

from pixelground.models import sam_decoder as dec_lib
from pixelground.models.layers import Projection, make_param, normal, zeros

if tp.TYPE_CHECKING:
  from pixelground.models.pixelllm import PixelLLMConfig


class MaskAdapter(nnx.Module):
  """SPEC 1.8: 2 learned tokens through a two-way transformer over [visual tokens; decoder states]
  (both projected to the prompt dim P first: the adapter stays small, ~1M parameters at P = 256),
  then a P → P projection gated by tanh(α) (α = 0 at init: SAM's box prompt is unchanged at the start)
  → added to the 2 box-corner tokens."""

  def __init__(self, cfg: PixelLLMConfig, *, rngs: nnx.Rngs):
    d, p = cfg.t5.d_model, cfg.prompt.prompt_dim
    common = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, rngs=rngs)
    self.proj_in = Projection((d,), (p,), ("embed",), (None,), use_bias=True, **common)
    self.tokens = make_param(rngs, normal(0.02), (2, p), (None, None), cfg.weight_dtype)
    self.transformer = dec_lib.TwoWayTransformer(cfg.adapter_depth, p, cfg.adapter_heads, 2 * p, 2,
                                                 **common)
    self.proj_out = Projection((p,), (p,), (None,), (None,), use_bias=True, **common)
    self.alpha = make_param(rngs, zeros, (), (), jnp.float32)
    self.dtype = cfg.compute_dtype

  def __call__(self, visual: jax.Array, hidden: jax.Array) -> jax.Array:
    """visual (B, Q, d) visual tokens; hidden (B, T, d) decoder states → (B, 2, P) additive update."""
    b = visual.shape[0]
    keys = self.proj_in(jnp.concatenate([visual.astype(self.dtype), hidden.astype(self.dtype)], axis=1))
    tokens = jnp.broadcast_to(self.tokens[...].astype(self.dtype)[None], (b,) + self.tokens.shape)
    out, _ = self.transformer(tokens, keys, jnp.zeros(keys.shape[1:], self.dtype))
    return self.proj_out(out) * jnp.tanh(self.alpha[...]).astype(self.dtype)
