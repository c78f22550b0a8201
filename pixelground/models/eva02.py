"""EVA02 ViT image encoder (B/L, patch 14) in Flax NNX (SPEC.md section 1.2).

pixels (B, H, W, 3), CLIP-normalised, NHWC
  → patch embedding: 14×14 conv, stride 14, with bias (rows/columns past the last full patch are
    dropped, like the stride-14 conv: 384 px → 27×27)                   (B, h, w, D)
  → [CLS] + tokens, + absolute position embedding (CLS entry, and the g×g patch table bicubic-resized
    with antialiasing to h×w exactly as timm's `resample_abs_pos_embed` does; g = image_size/patch)
  → `depth` pre-LN blocks:
      x + attn(LN(x)):  q (bias), k (no bias), v (bias); 2-D rotary embedding on the patch tokens'
                        q and k (CLS untouched); softmax(q·kᵀ/√K)·v; output projection (bias)
      x + mlp(LN(x)):   SwiGLU: fc2(LN(silu(fc1_g(x)) * fc1_x(x))) — the "sub-LN" inside the MLP
    with stochastic depth (drop path) on both branches when an `rng` is given (training)
  → final LayerNorm (when `final_norm`; timm's "avg pool" variants have none)
  → patch-feature map (B, h, w, D), CLS dropped (also returned on request).

Rotary embedding (timm `RotaryEmbeddingCat`, EVA02 style): head dim K is split into K/2 pairs
(2i, 2i+1); pair i rotates by angle f_i, where f = [y·ω, x·ω] with ω_j = θ^(-j/(K/4)), j < K/4,
θ = 10000, and y, x are the token's row/column index rescaled to the pretraining grid
(y = row · ref/h with ref = `rope_ref_grid`, 16 for the 224-pixel EVA02 checkpoints).

Shapes: B batch, D width, H heads, K head dim (D/H), M MLP hidden width, N = h·w patch tokens.
Logical axes: "embed", "heads", "kv", "mlp", plus "patch", "channels", "height", "width" (unsharded).
Identical blocks → the stack is scanned by default (`scan_layers`), with remat per block.
"""

from __future__ import annotations

import dataclasses
import typing as tp

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pixelground.config.parse import ModelConfig, preset_config
from pixelground.models.layers import count_params, LayerNorm, LayerStack, Projection, make_param, normal, zeros
from pixelground.models.resize import resize_bicubic

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # on the 0-1 scale
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class Eva02Config(ModelConfig):
  """EVA02 hyper-parameters. Defaults are EVA02-L/14 at 224 px (timm `eva02_large_patch14_224`)."""
  image_size: int = 224      # pretraining size: the position table is (image_size/patch)²
  patch_size: int = 14
  pos_embed_init: float = 0.02  # std of the position table at init (pretrained weights replace it)
  width: int = 1024
  depth: int = 24
  num_heads: int = 16
  mlp_dim: int = 2730        # int(width · 4 · 2/3)
  rope_ref_grid: int = 16    # the grid the rotary frequencies were trained on (224/14)
  rope_theta: float = 10000.0
  final_norm: bool = True
  layer_norm_eps: float = 1e-6
  drop_path_rate: float = 0.0  # max stochastic-depth rate (linear over depth); 0.1 when fine-tuned
  scan_layers: bool = True
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: str = "none"        # "none" | "full" | "dots"

  def __post_init__(self):
    if self.width % self.num_heads:
      raise ValueError(f"Eva02Config: width {self.width} is not divisible by num_heads {self.num_heads}.")
    if self.head_dim % 4:
      raise ValueError(f"Eva02Config: head dim {self.head_dim} must be a multiple of 4 for the 2-D "
                       "rotary embedding.")
    if self.image_size % self.patch_size:
      raise ValueError(f"Eva02Config: image_size {self.image_size} is not a multiple of patch_size "
                       f"{self.patch_size}.")
    if not 0.0 <= self.drop_path_rate < 1.0:
      raise ValueError(f"Eva02Config: drop_path_rate {self.drop_path_rate} outside [0, 1).")

  @property
  def grid_size(self) -> int:
    return self.image_size // self.patch_size

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads


PRESETS: dict[str, dict[str, tp.Any]] = {
    "eva02-b-14": dict(width=768, depth=12, num_heads=12, mlp_dim=2048),
    "eva02-l-14": dict(width=1024, depth=24, num_heads=16, mlp_dim=2730),
}


def preset(name: str, **overrides) -> Eva02Config:
  """`Eva02Config` for a named preset ("eva02-b-14", "eva02-l-14"), with overrides."""
  return preset_config(Eva02Config, PRESETS, name, "EVA02", **overrides)


def rope_angles(cfg: Eva02Config, h: int, w: int) -> np.ndarray:
  """(h·w, K/2) rotation angle of each (token, pair); tokens row-major, float32 like timm."""
  nb = cfg.head_dim // 4
  bands = (1.0 / cfg.rope_theta ** (np.arange(nb, dtype=np.float32) / np.float32(nb))).astype(np.float32)
  ref = np.float32(cfg.rope_ref_grid)
  ys = np.arange(h, dtype=np.float32) / np.float32(h) * ref
  xs = np.arange(w, dtype=np.float32) / np.float32(w) * ref
  yy, xx = np.meshgrid(ys, xs, indexing="ij")
  ang = np.concatenate([yy[..., None] * bands, xx[..., None] * bands], axis=-1)  # (h, w, K/2)
  return ang.reshape(h * w, 2 * nb).astype(np.float32)


def apply_rope(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
  """Rotates pairs (2i, 2i+1) of the last dim of x (B, N, H, K) by angles with sin/cos (N, K/2)."""
  xf = x.astype(jnp.float32).reshape(x.shape[:-1] + (-1, 2))
  x0, x1 = xf[..., 0], xf[..., 1]
  s, c = sin[None, :, None, :], cos[None, :, None, :]
  out = jnp.stack([x0 * c - x1 * s, x1 * c + x0 * s], axis=-1)
  return out.reshape(x.shape).astype(x.dtype)


def drop_path(x: jax.Array, rate: jax.Array, key: jax.Array | None) -> jax.Array:
  """Stochastic depth on a residual branch x (B, ...): each sample is kept with prob 1 - rate and
  rescaled by 1/(1 - rate); identity when `key` is None."""
  if key is None:
    return x
  keep = 1.0 - rate
  mask = jax.random.bernoulli(key, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / keep.astype(x.dtype), jnp.zeros_like(x))


class Attention(nnx.Module):
  """Self-attention with rotary q/k on the patch tokens. q/k/v kernels (D, H, K); q, v biases (H, K);
  proj kernel (H, K, D) + bias (D,)."""

  def __init__(self, cfg: Eva02Config, *, rngs: nnx.Rngs):
    d, h, k = cfg.width, cfg.num_heads, cfg.head_dim
    common = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, rngs=rngs)
    self.q = Projection((d,), (h, k), ("embed",), ("heads", "kv"), use_bias=True, **common)
    self.k = Projection((d,), (h, k), ("embed",), ("heads", "kv"), use_bias=False, **common)
    self.v = Projection((d,), (h, k), ("embed",), ("heads", "kv"), use_bias=True, **common)
    self.proj = Projection((h, k), (d,), ("heads", "kv"), ("embed",), use_bias=True, **common)
    self.dtype = cfg.compute_dtype

  def __call__(self, x: jax.Array, sin: jax.Array, cos: jax.Array, num_prefix: int) -> jax.Array:
    """x: (B, T, D) with `num_prefix` leading non-patch tokens → (B, T, D)."""
    q, k, v = self.q(x), self.k(x), self.v(x)  # (B, T, H, K)
    q = jnp.concatenate([q[:, :num_prefix], apply_rope(q[:, num_prefix:], sin, cos)], axis=1)
    k = jnp.concatenate([k[:, :num_prefix], apply_rope(k[:, num_prefix:], sin, cos)], axis=1)
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bqhk,bthk->bhqt", q, k, preferred_element_type=jnp.float32) * scale
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqt,bthk->bqhk", probs, v, preferred_element_type=jnp.float32)
    return self.proj(out.astype(self.dtype))


class Block(nnx.Module):
  """Pre-LN block: x + dp(attn(norm1(x))), then x + dp(fc2(norm(silu(fc1_g(y)) · fc1_x(y)))),
  y = norm2(x)."""

  def __init__(self, cfg: Eva02Config, *, rngs: nnx.Rngs):
    d, m = cfg.width, cfg.mlp_dim
    common = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, rngs=rngs)
    self.norm1 = LayerNorm(d, "embed", eps=cfg.layer_norm_eps, **common)
    self.attn = Attention(cfg, rngs=rngs)
    self.norm2 = LayerNorm(d, "embed", eps=cfg.layer_norm_eps, **common)
    self.fc1_g = Projection((d,), (m,), ("embed",), ("mlp",), use_bias=True, **common)
    self.fc1_x = Projection((d,), (m,), ("embed",), ("mlp",), use_bias=True, **common)
    self.mlp_norm = LayerNorm(m, "mlp", eps=cfg.layer_norm_eps, **common)
    self.fc2 = Projection((m,), (d,), ("mlp",), ("embed",), use_bias=True, **common)

  def __call__(self, x: jax.Array, per_layer: tp.Any, *, sin: jax.Array, cos: jax.Array,
               num_prefix: int) -> tuple[jax.Array, None]:
    """x: (B, T, D); per_layer: None (no drop path) or (key (2,), rate ()) → ((B, T, D), None)."""
    if per_layer is None:
      k1 = k2 = None
      rate = None
    else:
      key, rate = per_layer
      k1, k2 = jax.random.split(key)
    x = x + drop_path(self.attn(self.norm1(x), sin, cos, num_prefix), rate, k1)
    y = self.norm2(x)
    g = jax.nn.silu(self.fc1_g(y).astype(jnp.float32))
    hidden = (g * self.fc1_x(y).astype(jnp.float32)).astype(x.dtype)
    return x + drop_path(self.fc2(self.mlp_norm(hidden)), rate, k2), None


class Eva02(nnx.Module):
  """EVA02 ViT: pixels (B, H, W, 3) CLIP-normalised, NHWC → patch features (B, H/P, W/P, D).

  Parameters: patch_embed_kernel (P, P, 3, D), patch_embed_bias (D,), cls_token (D,),
  cls_pos_embed (D,), pos_embed (1, g, g, D), blocks.layers.* (see `Block`; stacked on a leading
  "layers" axis when scanned), norm.{scale,bias} (D,) when `final_norm`.
  """

  def __init__(self, cfg: Eva02Config, *, rngs: nnx.Rngs):
    self.cfg = cfg
    p, d, g, pd = cfg.patch_size, cfg.width, cfg.grid_size, cfg.weight_dtype
    self.patch_embed_kernel = make_param(rngs, normal((3 * p * p) ** -0.5), (p, p, 3, d),
                                         ("patch", "patch", "channels", "embed"), pd)
    self.patch_embed_bias = make_param(rngs, zeros, (d,), ("embed",), pd)
    self.cls_token = make_param(rngs, normal(0.02), (d,), ("embed",), pd)
    self.cls_pos_embed = make_param(rngs, normal(0.02), (d,), ("embed",), pd)
    self.pos_embed = make_param(rngs, normal(cfg.pos_embed_init), (1, g, g, d),
                                (None, "height", "width", "embed"), pd)
    self.blocks = LayerStack(lambda r: Block(cfg, rngs=r), cfg.depth, scan=cfg.scan_layers,
                             remat=cfg.remat, rngs=rngs)
    self.norm = (LayerNorm(d, "embed", eps=cfg.layer_norm_eps, dtype=cfg.compute_dtype,
                           param_dtype=pd, rngs=rngs) if cfg.final_norm else None)

  def embed_patches(self, pixels: jax.Array) -> jax.Array:
    """(B, H, W, 3) → (B, H//P, W//P, D)."""
    p, dtype = self.cfg.patch_size, self.cfg.compute_dtype
    b, hh, ww, c = pixels.shape
    h, w = hh // p, ww // p
    x = pixels[:, : h * p, : w * p].astype(dtype).reshape(b, h, p, w, p, c)
    y = jnp.einsum("bypxqc,pqcd->byxd", x, self.patch_embed_kernel[...].astype(dtype),
                   preferred_element_type=jnp.float32)
    return (y + self.patch_embed_bias[...].astype(jnp.float32)).astype(dtype)

  def __call__(self, pixels: jax.Array, *, rng: jax.Array | None = None,
               return_cls: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
    """pixels (B, H, W, 3) → features (B, H//P, W//P, D) [, cls (B, D)].

    `rng`: a PRNG key turns on stochastic depth (training); None is the deterministic forward.
    """
    if pixels.ndim != 4 or pixels.shape[-1] != 3:
      raise ValueError(f"Eva02 expects NHWC pixels (B, H, W, 3), got {pixels.shape}.")
    cfg, dtype = self.cfg, self.cfg.compute_dtype
    x = self.embed_patches(pixels)
    b, h, w, d = x.shape
    pos = resize_bicubic(self.pos_embed[...], (h, w), antialias=True)
    x = (x.astype(jnp.float32) + pos.astype(jnp.float32)).astype(dtype).reshape(b, h * w, d)
    cls = (self.cls_token[...].astype(jnp.float32) + self.cls_pos_embed[...].astype(jnp.float32))
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(dtype), (b, 1, d)), x], axis=1)
    ang = jnp.asarray(rope_angles(cfg, h, w))
    shared = dict(sin=jnp.sin(ang), cos=jnp.cos(ang), num_prefix=1)
    per_layer = None
    if rng is not None and cfg.drop_path_rate > 0:
      rates = jnp.linspace(0.0, cfg.drop_path_rate, cfg.depth, dtype=jnp.float32)
      per_layer = (jax.random.split(rng, cfg.depth), rates)
    x, _ = self.blocks(x, per_layer, **shared)
    if self.norm is not None:
      x = self.norm(x)
    feats = x[:, 1:].reshape(b, h, w, d)
    return (feats, x[:, 0]) if return_cls else feats


def num_params(cfg: Eva02Config) -> int:
  """Parameter count (no allocation)."""
  return count_params(nnx.eval_shape(lambda: Eva02(cfg, rngs=nnx.Rngs(0))))
