"""SAM ViT image encoder (ViT-B/L/H) in Flax NNX (SPEC.md section 1.1).

pixels (B, H, W, 3), already normalised (ImageNet mean/std on the 0-255 scale), NHWC
  → patch embedding: 16×16 conv, stride 16, with bias            (B, h, w, D), h = H/16, w = W/16
  → + absolute position embedding (g×g for the native image size; bicubic-resized to h×w otherwise)
  → `depth` pre-LN blocks: windowed attention (window 14; the map is zero-padded to a multiple of the
    window after the first LayerNorm, as SAM does) except in the global blocks; decomposed relative
    position bias (height and width tables of 2·S-1 rows per block, S = window or global grid,
    linearly interpolated when the needed length differs); GELU (erf) MLP
  → neck: 1×1 conv (no bias) → LayerNorm2d → 3×3 conv (no bias, padding 1) → LayerNorm2d
  → (B, h, w, out_channels) NHWC.

Resizing follows PyTorch exactly (`pixelground.models.resize`): `F.interpolate(mode="bicubic",
align_corners=False)` for the position embedding and `mode="linear"` for the rel-pos tables.

Shapes: B batch, D width, H heads, K head dim (D/H), M MLP width, C out_channels.
Logical axis names used besides "embed", "mlp", "heads", "kv": "patch" (patch kernel rows/columns),
"channels" (input colour channels), "height"/"width" (position-embedding grid), "relpos" (rel-pos
table rows), "conv_in"/"conv_out" (neck channels). None of them is sharded by the default rules.

Blocks are unrolled (`LayerStack(scan=False)`): windowed and global blocks have rel-pos tables of
different sizes, so they cannot share one scanned body. `remat` picks a `jax.checkpoint` policy per
block.
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
from pixelground.models.resize import linear_matrix, resize_bicubic


@dataclasses.dataclass(frozen=True)
class SamEncoderConfig(ModelConfig):
  """SAM image-encoder hyper-parameters. Defaults are SAM ViT-H at 1024 px."""
  image_size: int = 1024   # native input size: the position embedding is (image_size/patch)²
  patch_size: int = 16
  pos_embed_init: float = 0.02  # std of the position table at init (pretrained weights replace it)
  width: int = 1280
  depth: int = 32
  num_heads: int = 16
  mlp_ratio: float = 4.0
  window_size: int = 14
  global_blocks: tuple[int, ...] = (7, 15, 23, 31)
  out_channels: int = 256
  layer_norm_eps: float = 1e-6
  dtype: str = "float32"        # compute dtype
  param_dtype: str = "float32"  # storage dtype of the (frozen) weights
  remat: str = "none"           # "none" | "full" | "dots": jax.checkpoint policy per block
  # Query-blocked attention: at most this many logits per head per block (global blocks at 1024 px
  # use blocks of one map row, 64 × 4096); smaller maps attend in one block.
  attention_chunk: int = 1 << 18

  def __post_init__(self):
    if self.width % self.num_heads:
      raise ValueError(f"SamEncoderConfig: width {self.width} is not divisible by num_heads "
                       f"{self.num_heads}.")
    if self.image_size % self.patch_size:
      raise ValueError(f"SamEncoderConfig: image_size {self.image_size} is not a multiple of "
                       f"patch_size {self.patch_size}.")
    bad = [i for i in self.global_blocks if not 0 <= i < self.depth]
    if bad:
      raise ValueError(f"SamEncoderConfig: global_blocks {bad} outside 0..{self.depth - 1}.")
    object.__setattr__(self, "global_blocks", tuple(int(i) for i in self.global_blocks))

  @property
  def grid_size(self) -> int:
    return self.image_size // self.patch_size

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads

  @property
  def mlp_dim(self) -> int:
    return int(self.width * self.mlp_ratio)


PRESETS: dict[str, dict[str, tp.Any]] = {
    "sam-vit-b": dict(width=768, depth=12, num_heads=12, global_blocks=(2, 5, 8, 11)),
    "sam-vit-l": dict(width=1024, depth=24, num_heads=16, global_blocks=(5, 11, 17, 23)),
    "sam-vit-h": dict(width=1280, depth=32, num_heads=16, global_blocks=(7, 15, 23, 31)),
}


def preset(name: str, **overrides) -> SamEncoderConfig:
  """`SamEncoderConfig` for a named preset ("sam-vit-b", "sam-vit-l", "sam-vit-h"), with overrides."""
  return preset_config(SamEncoderConfig, PRESETS, name, "SAM", **overrides)


def relative_table(table: jax.Array, size: int) -> jax.Array:
  """(size, size, K) rel-pos embeddings R[i, j] = table'[i - j + size - 1] for queries/keys 0..size-1.

  `table` is (L, K); it is first resized linearly to 2·size-1 rows when L differs (SAM's rule).
  """
  needed = 2 * size - 1
  table = table.astype(jnp.float32)
  if table.shape[0] != needed:
    m = jnp.asarray(linear_matrix(table.shape[0], needed), jnp.float32)
    table = jnp.dot(m, table, precision=jax.lax.Precision.HIGHEST)
  idx = np.arange(size)[:, None] - np.arange(size)[None, :] + size - 1
  return table[idx]


# ----------------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------------

class Attention(nnx.Module):
  """Multi-head self-attention over a (B, h, w, D) map with decomposed relative position bias.

  qkv.kernel (D, 3, H, K) + bias (3, H, K); proj.kernel (H, K, D) + bias (D,); rel_pos_h/w
  (2·S-1, K), S = `size` (window or global grid at the native image size).
  """

  def __init__(self, cfg: SamEncoderConfig, size: int, *, rngs: nnx.Rngs):
    d, h, k = cfg.width, cfg.num_heads, cfg.head_dim
    self.num_heads, self.dtype = h, cfg.compute_dtype
    self.chunk_elems = cfg.attention_chunk
    pd = cfg.weight_dtype
    self.qkv_kernel = make_param(rngs, normal(d ** -0.5), (d, 3, h, k), ("embed", None, "heads", "kv"), pd)
    self.qkv_bias = make_param(rngs, zeros, (3, h, k), (None, "heads", "kv"), pd)
    self.proj_kernel = make_param(rngs, normal(d ** -0.5), (h, k, d), ("heads", "kv", "embed"), pd)
    self.proj_bias = make_param(rngs, zeros, (d,), ("embed",), pd)
    self.rel_pos_h = make_param(rngs, normal(0.02), (2 * size - 1, k), ("relpos", "kv"), pd)
    self.rel_pos_w = make_param(rngs, normal(0.02), (2 * size - 1, k), ("relpos", "kv"), pd)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (B, h, w, D) (a batch of windows, or the whole map) → (B, h, w, D)."""
    b, hh, ww, d = x.shape
    qkv = jnp.einsum("byxd,dthk->tbyxhk", x.astype(self.dtype), self.qkv_kernel[...].astype(self.dtype),
                     preferred_element_type=jnp.float32)
    qkv = (qkv + self.qkv_bias[...].astype(jnp.float32)[:, None, None, None]).astype(self.dtype)
    q, k, v = qkv[0], qkv[1], qkv[2]  # (B, h, w, H, K)
    n, nh, kd = hh * ww, self.num_heads, q.shape[-1]
    # Decomposed rel-pos bias (MViTv2): the *unscaled* query against per-axis position embeddings.
    rh = relative_table(self.rel_pos_h[...], hh)  # (h, h, K): [query row, key row]
    rw = relative_table(self.rel_pos_w[...], ww)
    q32 = q.astype(jnp.float32)
    bias_h = jnp.einsum("byxhk,yik->bhyxi", q32, rh).reshape(b, nh, n, hh)
    bias_w = jnp.einsum("byxhk,xjk->bhyxj", q32, rw).reshape(b, nh, n, ww)
    qt = q.reshape(b, n, nh, kd).transpose(0, 2, 1, 3)  # (B, H, N, K)
    kt = k.reshape(b, n, nh, kd).transpose(0, 2, 3, 1)  # (B, H, K, N)
    vt = v.reshape(b, n, nh, kd).transpose(0, 2, 1, 3)  # (B, H, N, K)
    scale = kd ** -0.5

    def attend(q_c, bh_c, bw_c):  # a block of C query rows: (B, H, C, K), (B, H, C, h), (B, H, C, w)
      c = q_c.shape[2]
      logits = jnp.matmul(q_c, kt, preferred_element_type=jnp.float32) * scale
      logits = (logits.reshape(b, nh, c, hh, ww) + bh_c[..., :, None] + bw_c[..., None, :])
      probs = jax.nn.softmax(logits.reshape(b, nh, c, n), axis=-1).astype(self.dtype)
      return jnp.matmul(probs, vt, preferred_element_type=jnp.float32).astype(self.dtype)

    # Big maps (global blocks at 1024 px: 4096² logits per head) attend in blocks of query rows under
    # lax.map: the same arithmetic, but temporaries stay small and are reused (≈2× faster on CPU).
    rows = _query_rows_per_chunk(hh, ww * n, self.chunk_elems)
    if rows >= hh:
      out = attend(qt, bias_h, bias_w)
    else:
      nc, c = hh // rows, rows * ww
      split = lambda a: jnp.moveaxis(a.reshape(b, nh, nc, c, a.shape[-1]), 2, 0)
      out = jax.lax.map(lambda args: attend(*args), (split(qt), split(bias_h), split(bias_w)))
      out = jnp.moveaxis(out, 0, 2).reshape(b, nh, n, kd)
    y = jnp.einsum("bhqk,hkd->bqd", out, self.proj_kernel[...].astype(self.dtype),
                   preferred_element_type=jnp.float32)
    y = y + self.proj_bias[...].astype(jnp.float32)
    return y.astype(self.dtype).reshape(b, hh, ww, d)


def _query_rows_per_chunk(h: int, elems_per_row: int, budget: int) -> int:
  """Largest divisor r of h with r · elems_per_row ≤ budget (at least 1): query rows per block."""
  best = 1
  for r in range(1, h + 1):
    if h % r == 0 and r * elems_per_row <= budget:
      best = r
  return best


def window_partition(x: jax.Array, window: int) -> tuple[jax.Array, tuple[int, int]]:
  """(B, h, w, D) → (B·nh·nw, window, window, D), zero-padding h, w up to multiples of `window`."""
  b, h, w, d = x.shape
  ph, pw = -h % window, -w % window
  if ph or pw:
    x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
  hp, wp = h + ph, w + pw
  x = x.reshape(b, hp // window, window, wp // window, window, d).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, window, window, d), (hp, wp)


def window_unpartition(x: jax.Array, window: int, padded: tuple[int, int],
                       size: tuple[int, int]) -> jax.Array:
  """Inverse of `window_partition`: (B·nh·nw, window, window, D) → (B, h, w, D), padding cropped."""
  hp, wp = padded
  nh, nw = hp // window, wp // window
  d = x.shape[-1]
  x = x.reshape(-1, nh, nw, window, window, d).transpose(0, 1, 3, 2, 4, 5).reshape(-1, hp, wp, d)
  return x[:, : size[0], : size[1]]


class Block(nnx.Module):
  """Pre-LN ViT block: x + attn(norm1(x)) (windowed unless global), then x + mlp(norm2(x))."""

  def __init__(self, cfg: SamEncoderConfig, index: int, *, rngs: nnx.Rngs):
    self.window = 0 if index in cfg.global_blocks else cfg.window_size
    common = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, rngs=rngs)
    self.norm1 = LayerNorm(cfg.width, "embed", eps=cfg.layer_norm_eps, **common)
    self.attn = Attention(cfg, self.window or cfg.grid_size, rngs=rngs)
    self.norm2 = LayerNorm(cfg.width, "embed", eps=cfg.layer_norm_eps, **common)
    self.lin1 = Projection((cfg.width,), (cfg.mlp_dim,), ("embed",), ("mlp",), use_bias=True,
                           **common)
    self.lin2 = Projection((cfg.mlp_dim,), (cfg.width,), ("mlp",), ("embed",), use_bias=True,
                           **common)

  def __call__(self, x: jax.Array, per_layer: tp.Any = None) -> tuple[jax.Array, None]:
    """x: (B, h, w, D) → ((B, h, w, D), None) (the `LayerStack` layer protocol)."""
    del per_layer
    y = self.norm1(x)
    if self.window:
      windows, padded = window_partition(y, self.window)
      y = window_unpartition(self.attn(windows), self.window, padded, x.shape[1:3])
    else:
      y = self.attn(y)
    x = x + y
    h = jax.nn.gelu(self.lin1(self.norm2(x)).astype(jnp.float32), approximate=False)
    return x + self.lin2(h.astype(x.dtype)), None


class Neck(nnx.Module):
  """1×1 conv D→C (no bias) → LayerNorm2d → 3×3 conv C→C (no bias, pad 1) → LayerNorm2d; NHWC."""

  def __init__(self, cfg: SamEncoderConfig, *, rngs: nnx.Rngs):
    d, c = cfg.width, cfg.out_channels
    self.dtype = cfg.compute_dtype
    common = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, rngs=rngs)
    self.conv1 = make_param(rngs, normal(d ** -0.5), (1, 1, d, c), (None, None, "embed", "conv_out"),
                            cfg.weight_dtype)
    self.norm1 = LayerNorm(c, "conv_out", eps=cfg.layer_norm_eps, **common)
    self.conv2 = make_param(rngs, normal((9 * c) ** -0.5), (3, 3, c, c),
                            (None, None, "conv_in", "conv_out"), cfg.weight_dtype)
    self.norm2 = LayerNorm(c, "conv_out", eps=cfg.layer_norm_eps, **common)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.einsum("byxd,dc->byxc", x.astype(self.dtype), self.conv1[0, 0].astype(self.dtype),
                   preferred_element_type=jnp.float32).astype(self.dtype)
    x = self.norm1(x)
    x = jax.lax.conv_general_dilated(x, self.conv2[...].astype(self.dtype), (1, 1), ((1, 1), (1, 1)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     preferred_element_type=jnp.float32).astype(self.dtype)
    return self.norm2(x)


class SamImageEncoder(nnx.Module):
  """SAM ViT image encoder: pixels (B, H, W, 3) normalised, NHWC → (B, H/16, W/16, out_channels).

  Parameters: patch_embed_kernel (P, P, 3, D), patch_embed_bias (D,), pos_embed (1, g, g, D),
  blocks.layers.{i}.* (see `Block`), neck.* (see `Neck`).
  """

  def __init__(self, cfg: SamEncoderConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    p, d, g = cfg.patch_size, cfg.width, cfg.grid_size
    pd = cfg.weight_dtype
    self.patch_embed_kernel = make_param(rngs, normal((3 * p * p) ** -0.5), (p, p, 3, d),
                                         ("patch", "patch", "channels", "embed"), pd)
    self.patch_embed_bias = make_param(rngs, zeros, (d,), ("embed",), pd)
    self.pos_embed = make_param(rngs, normal(cfg.pos_embed_init), (1, g, g, d),
                                (None, "height", "width", "embed"), pd)
    self.blocks = LayerStack(lambda r, i: Block(cfg, i, rngs=r), cfg.depth, scan=False,
                             remat=cfg.remat, indexed=True, rngs=rngs)
    self.neck = Neck(cfg, rngs=rngs)

  def embed_patches(self, pixels: jax.Array) -> jax.Array:
    """(B, H, W, 3) → (B, H/P, W/P, D); like a stride-P conv, rows/columns past the last full patch
    are dropped."""
    p, dtype = self.cfg.patch_size, self.cfg.compute_dtype
    b, hh, ww, c = pixels.shape
    h, w = hh // p, ww // p
    x = pixels[:, : h * p, : w * p].astype(dtype).reshape(b, h, p, w, p, c)
    y = jnp.einsum("bypxqc,pqcd->byxd", x, self.patch_embed_kernel[...].astype(dtype),
                   preferred_element_type=jnp.float32)
    return (y + self.patch_embed_bias[...].astype(jnp.float32)).astype(dtype)

  def position_embedding(self, h: int, w: int) -> jax.Array:
    """(1, h, w, D): the learned g×g table, bicubic-resized (torch semantics) when (h, w) ≠ (g, g)."""
    return resize_bicubic(self.pos_embed[...], (h, w)).astype(self.cfg.compute_dtype)

  def __call__(self, pixels: jax.Array) -> jax.Array:
    """pixels (B, H, W, 3), normalised → image embeddings (B, H/16, W/16, out_channels), NHWC."""
    if pixels.ndim != 4 or pixels.shape[-1] != 3:
      raise ValueError(f"SamImageEncoder expects NHWC pixels (B, H, W, 3), got {pixels.shape}.")
    x = self.embed_patches(pixels)
    x = x + self.position_embedding(x.shape[1], x.shape[2])
    x, _ = self.blocks(x)
    return self.neck(x)


def num_params(cfg: SamEncoderConfig) -> int:
  """Parameter count (no allocation)."""
  return count_params(nnx.eval_shape(lambda: SamImageEncoder(cfg, rngs=nnx.Rngs(0))))
