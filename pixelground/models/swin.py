"""Swin Transformer backbone in Flax NNX (GELLA's colormap encoder, SPEC.md section 1.10).

Architecture (Liu et al. 2021, Hugging Face `SwinModel` semantics): a 4×4/stride-4 patch embedding conv
(with bias) + LayerNorm, then 4 stages of pre-LN blocks with windowed multi-head self-attention
(every odd block cyclically shifts the map by window//2 and masks pairs of tokens that come from
different regions of the unshifted map), a learned relative position bias table ((2W-1)², heads) per
block, q/k/v/proj with bias, an MLP with exact (erf) GELU, and 2×2 patch merging (concat → LayerNorm →
linear 4C→2C without bias) between stages.

Shapes (NHWC throughout): pixels (B, H, W, C_in) → 4 feature maps
  (B, ⌈H/4⌉, ⌈W/4⌉, D), (B, ⌈H/8⌉, ⌈W/8⌉, 2D), (B, ⌈H/16⌉, ⌈W/16⌉, 4D), (B, ⌈H/32⌉, ⌈W/32⌉, 8D)
(⌈⌉ as the reference pads: inputs to the patch size, odd maps before each merge). Stage i's map is the
output of its last block *before* patch merging; this equals transformers'
`SwinModel(pixel_values, output_hidden_states=True, output_hidden_states_before_downsampling=True)
.reshaped_hidden_states[1:]` (NCHW there). `final_norm=True` also applies the model's final LayerNorm to
the last map (= `last_hidden_state`).

Window size: with `always_partition=False` (SwinModel's default) a stage whose map has
min(h, w) <= window uses window = min(h, w) and no shift. When that clipped window is smaller than the
configured one, transformers crashes (its bias is sized for the full window); we take the bias of each
relative offset from the full table (same table centre), which is what a table of the clipped size
would hold if cut from the full one. With `always_partition=True` (SwinBackbone's choice) the window is
never clipped: maps are zero-padded to window multiples and every odd block shifts.

Logical axes: "embed" (channels of a stage), "mlp" (MLP hidden), "heads", "kv" (head dim), and new ones:
"conv_in" (input channels of the patch conv), "relpos" (relative position table rows), "merge_in"
(the 4C concatenated channels of patch merging). Unlisted names are replicated by the default rules.
"""

from __future__ import annotations

import dataclasses
import typing as tp

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pixelground.config.parse import ModelConfig, preset_config
from pixelground.models.layers import LayerNorm, Projection, make_param, normal

MASK_VALUE = -100.0  # the reference's additive mask for cross-region pairs in shifted windows


@dataclasses.dataclass(frozen=True)
class SwinConfig(ModelConfig):
  """Swin hyper-parameters. Defaults are Swin-Tiny (patch 4, window 7)."""
  image_size: int = 224          # nominal; the model runs at any input size
  patch_size: int = 4
  in_channels: int = 3
  embed_dim: int = 96
  depths: tuple[int, ...] = (2, 2, 6, 2)
  num_heads: tuple[int, ...] = (3, 6, 12, 24)
  window_size: int = 7
  mlp_ratio: float = 4.0
  layer_norm_eps: float = 1e-5
  always_partition: bool = False  # True: never clip the window to small maps (SwinBackbone)
  dtype: str = "float32"          # compute dtype
  param_dtype: str = "float32"    # storage dtype

  def __post_init__(self):
    if len(self.depths) != len(self.num_heads):
      raise ValueError(f"SwinConfig: depths {self.depths} and num_heads {self.num_heads} differ in "
                       "length.")
    for i, h in enumerate(self.num_heads):
      if self.stage_dim(i) % h:
        raise ValueError(f"SwinConfig: stage {i} width {self.stage_dim(i)} not divisible by {h} heads.")

  def stage_dim(self, i: int) -> int:
    return self.embed_dim * 2 ** i


PRESETS: dict[str, dict[str, tp.Any]] = {
    "swin-tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    "swin-small": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    "swin-base": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
}


def preset(name: str, **overrides) -> SwinConfig:
  """`SwinConfig` for a named preset (e.g. "swin-tiny"), with field overrides."""
  return preset_config(SwinConfig, PRESETS, name, "Swin", **overrides)


def config_from_hf(hf: dict[str, tp.Any], **overrides) -> SwinConfig:
  """`SwinConfig` from a transformers `SwinConfig` dict (config.json)."""
  if hf.get("use_absolute_embeddings", False):
    raise ValueError("Swin checkpoints with absolute position embeddings are not supported.")
  if hf.get("hidden_act", "gelu") != "gelu" or not hf.get("qkv_bias", True):
    raise ValueError(f"Swin: only hidden_act='gelu' with qkv_bias=True is supported, got "
                     f"{hf.get('hidden_act')!r}, qkv_bias={hf.get('qkv_bias')}.")
  image_size = hf.get("image_size", 224)
  patch = hf.get("patch_size", 4)
  kw = dict(image_size=image_size if isinstance(image_size, int) else int(image_size[0]),
            patch_size=patch if isinstance(patch, int) else int(patch[0]),
            in_channels=hf.get("num_channels", 3), embed_dim=hf["embed_dim"],
            depths=tuple(hf["depths"]), num_heads=tuple(hf["num_heads"]),
            window_size=hf["window_size"], mlp_ratio=float(hf.get("mlp_ratio", 4.0)),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-5))
  return SwinConfig(**{**kw, **overrides})


# ----------------------------------------------------------------------------------------------------
# Static (trace-time) helpers: window geometry, relative position index, shift mask
# ----------------------------------------------------------------------------------------------------

def relative_position_index(window: int, table_window: int) -> np.ndarray:
  """(w², w²) rows of the ((2T-1)², heads) table for each query/key pair of a w×w window (w <= T)."""
  coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij")).reshape(2, -1)
  rel = coords[:, :, None] - coords[:, None, :] + (table_window - 1)  # (2, N, N), offsets ≥ 0
  return rel[0] * (2 * table_window - 1) + rel[1]


def shift_mask(height: int, width: int, window: int, shift: int) -> np.ndarray:
  """(num_windows, w², w²) additive mask: MASK_VALUE where the two tokens of a shifted window come
  from different regions of the unshifted (padded) map, 0 elsewhere."""
  def regions(n):
    i = np.arange(n)
    return (i >= n - window).astype(np.int32) + (i >= n - shift).astype(np.int32)
  ids = regions(height)[:, None] * 3 + regions(width)[None, :]
  ids = ids.reshape(height // window, window, width // window, window).transpose(0, 2, 1, 3)
  ids = ids.reshape(-1, window * window)
  return np.where(ids[:, :, None] != ids[:, None, :], MASK_VALUE, 0.0).astype(np.float32)


def to_windows(x: jax.Array, window: int) -> jax.Array:
  """(B, H, W, C) with H, W multiples of `window` → (B, num_windows, window², C), row-major windows."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // window, window, w // window, window, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // window) * (w // window), window * window, c)


def from_windows(x: jax.Array, window: int, height: int, width: int) -> jax.Array:
  """Inverse of `to_windows`: (B, num_windows, window², C) → (B, H, W, C)."""
  b, _, _, c = x.shape
  x = x.reshape(b, height // window, width // window, window, window, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, height, width, c)


# ----------------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------------

class WindowAttention(nnx.Module):
  """Multi-head self-attention inside windows with a learned relative position bias."""

  def __init__(self, dim: int, num_heads: int, window: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.num_heads, self.head_dim, self.window, self.dtype = num_heads, dim // num_heads, window, dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    hk = (num_heads, self.head_dim)
    self.q = Projection((dim,), hk, ("embed",), ("heads", "kv"), use_bias=True, **kw)
    self.k = Projection((dim,), hk, ("embed",), ("heads", "kv"), use_bias=True, **kw)
    self.v = Projection((dim,), hk, ("embed",), ("heads", "kv"), use_bias=True, **kw)
    self.proj = Projection(hk, (dim,), ("heads", "kv"), ("embed",), use_bias=True, **kw)
    self.relpos_table = make_param(rngs, normal(0.02), ((2 * window - 1) ** 2, num_heads),
                                   ("relpos", "heads"), param_dtype)

  def __call__(self, x: jax.Array, window: int, mask: np.ndarray | None) -> jax.Array:
    """x: (B, num_windows, window², D); mask: (num_windows, window², window²) or None."""
    q = self.q(x) * (self.head_dim ** -0.5)
    k, v = self.k(x), self.v(x)
    logits = jnp.einsum("bwqhk,bwshk->bwhqs", q, k, preferred_element_type=jnp.float32)
    index = relative_position_index(window, self.window)  # static
    bias = self.relpos_table[...].astype(jnp.float32)[index]  # (N, N, heads)
    logits = logits + bias.transpose(2, 0, 1)
    if mask is not None:
      logits = logits + jnp.asarray(mask)[:, None]
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("bwhqs,bwshk->bwqhk", probs, v, preferred_element_type=jnp.float32)
    return self.proj(out.astype(self.dtype))


class SwinBlock(nnx.Module):
  """Pre-LN block: x + WindowAttention(LN(x)) then x + MLP(LN(x)); odd blocks use shifted windows."""

  def __init__(self, cfg: SwinConfig, dim: int, num_heads: int, shifted: bool, *, rngs: nnx.Rngs):
    dt, pdt = cfg.compute_dtype, cfg.weight_dtype
    kw = dict(dtype=dt, param_dtype=pdt, rngs=rngs)
    self.cfg, self.shifted = cfg, shifted
    hidden = int(cfg.mlp_ratio * dim)
    self.norm1 = LayerNorm(dim, "embed", eps=cfg.layer_norm_eps, **kw)
    self.attn = WindowAttention(dim, num_heads, cfg.window_size, **kw)
    self.norm2 = LayerNorm(dim, "embed", eps=cfg.layer_norm_eps, **kw)
    self.fc1 = Projection((dim,), (hidden,), ("embed",), ("mlp",), use_bias=True, **kw)
    self.fc2 = Projection((hidden,), (dim,), ("mlp",), ("embed",), use_bias=True, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (B, h, w, D) → same shape."""
    _, h, w, _ = x.shape
    window = self.cfg.window_size
    shift = window // 2 if self.shifted else 0
    if not self.cfg.always_partition and min(h, w) <= window:
      window, shift = min(h, w), 0  # the reference's clipping for small maps
    y = self.norm1(x)
    # Zero-pad the normalised map (right/bottom) to window multiples, as the reference does.
    hp, wp = -(-h // window) * window, -(-w // window) * window
    y = jnp.pad(y, ((0, 0), (0, hp - h), (0, wp - w), (0, 0)))
    if shift:
      y = jnp.roll(y, (-shift, -shift), axis=(1, 2))
    mask = shift_mask(hp, wp, window, shift) if shift else None
    y = from_windows(self.attn(to_windows(y, window), window, mask), window, hp, wp)
    if shift:
      y = jnp.roll(y, (shift, shift), axis=(1, 2))
    x = x + y[:, :h, :w, :]
    y = jax.nn.gelu(self.fc1(self.norm2(x)).astype(jnp.float32), approximate=False)  # exact GELU
    return x + self.fc2(y.astype(self.cfg.compute_dtype))


class PatchMerging(nnx.Module):
  """(B, h, w, C) → (B, ⌈h/2⌉, ⌈w/2⌉, 2C): 2×2 neighbours concatenated → LayerNorm → linear (no bias)."""

  def __init__(self, cfg: SwinConfig, dim: int, *, rngs: nnx.Rngs):
    kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, rngs=rngs)
    self.norm = LayerNorm(4 * dim, "merge_in", eps=cfg.layer_norm_eps, **kw)
    self.reduction = Projection((4 * dim,), (2 * dim,), ("merge_in",), ("embed",), use_bias=False,
                                **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))  # odd sizes: zero row/column
    h2, w2 = (h + 1) // 2, (w + 1) // 2
    # Channel order of the reference: (row 0, col 0), (row 1, col 0), (row 0, col 1), (row 1, col 1).
    x = x.reshape(b, h2, 2, w2, 2, c).transpose(0, 1, 3, 4, 2, 5).reshape(b, h2, w2, 4 * c)
    return self.reduction(self.norm(x))


class SwinStage(nnx.Module):
  def __init__(self, cfg: SwinConfig, index: int, *, rngs: nnx.Rngs):
    dim = cfg.stage_dim(index)
    self.blocks = nnx.List([SwinBlock(cfg, dim, cfg.num_heads[index], shifted=bool(i % 2), rngs=rngs)
                            for i in range(cfg.depths[index])])
    last = index == len(cfg.depths) - 1
    self.downsample = None if last else PatchMerging(cfg, dim, rngs=rngs)

  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Returns (stage output before merging, input of the next stage)."""
    for block in self.blocks:
      x = block(x)
    return x, (x if self.downsample is None else self.downsample(x))


class Swin(nnx.Module):
  """Swin backbone: pixels (B, H, W, C_in) → list of per-stage feature maps (NHWC, see module doc)."""

  def __init__(self, cfg: SwinConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    p, d = cfg.patch_size, cfg.embed_dim
    kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, rngs=rngs)
    # The stride-p p×p conv is a linear map of each p×p×C_in patch: kernel (p, p, C_in, D).
    self.patch_embed = Projection((p, p, cfg.in_channels), (d,), (None, None, "conv_in"), ("embed",),
                                  use_bias=True, **kw)
    self.embed_norm = LayerNorm(d, "embed", eps=cfg.layer_norm_eps, **kw)
    self.stages = nnx.List([SwinStage(cfg, i, rngs=rngs) for i in range(len(cfg.depths))])
    self.final_norm = LayerNorm(cfg.stage_dim(len(cfg.depths) - 1), "embed", eps=cfg.layer_norm_eps,
                                **kw)

  def embed(self, pixels: jax.Array) -> jax.Array:
    """(B, H, W, C_in) → (B, ⌈H/p⌉, ⌈W/p⌉, D); inputs are zero-padded right/bottom to multiples of p."""
    b, h, w, c = pixels.shape
    p = self.cfg.patch_size
    hp, wp = -(-h // p) * p, -(-w // p) * p
    x = jnp.pad(pixels, ((0, 0), (0, hp - h), (0, wp - w), (0, 0)))
    x = x.reshape(b, hp // p, p, wp // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return self.embed_norm(self.patch_embed(x))

  def __call__(self, pixels: jax.Array, *, final_norm: bool = False) -> list[jax.Array]:
    """pixels (B, H, W, C_in) → [stage i output before merging: (B, ⌈H/(p·2^i)⌉, ⌈W/(p·2^i)⌉, D·2^i)].
    `final_norm`: apply the final LayerNorm to the last map (transformers' `last_hidden_state`)."""
    x = self.embed(pixels)
    outs = []
    for stage in self.stages:
      out, x = stage(x)
      outs.append(out)
    if final_norm:
      outs[-1] = self.final_norm(outs[-1])
    return outs
