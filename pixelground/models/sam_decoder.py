"""SAM prompt encoder, two-way transformer and mask decoder in Flax NNX (SPEC.md sections 1.4, 1.8).

Everything is NHWC / channels-last. Shapes: B batch, N prompt tokens, D prompt dim (256), h×w image-grid
(64×64 for SAM at 1024 px), M masks returned (3 with multimask output, else 1), H heads, K head dim.

  PositionEmbeddingRandom: random-Fourier features of (x, y): [sin, cos](2π · (2·p - 1) · G), G (2, D/2)
    fixed Gaussian. `G` is a `FixedGaussian` variable — a subclass of `nnx.Variable`, NOT of `nnx.Param`,
    so `nnx.Param` filters (optimizers, trainable-parameter counts) never see it; it is still part of
    `nnx.state(model)` and therefore loaded from checkpoints.
  PromptEncoder: points (B, N, 2) in input-image pixels with labels (B, N) (-1 "not a point" padding,
    0 negative, 1 positive), boxes (B, 4) xyxy pixels (2 corner tokens, kinds 2 and 3), masks
    (B, 4h, 4w) logits (conv net 2×2/2 → LN2d → GELU → 2×2/2 → LN2d → GELU → 1×1) or the learned
    "no mask" embedding broadcast to the grid. → sparse (B, N', D), dense (B, h, w, D).
  TwoWayTransformer: `depth` blocks of [token self-attn (first block: no query PE) → LN, token→image
    cross-attn → LN, ReLU MLP → LN, image→token cross-attn → LN], then final token→image attn → LN.
  MaskDecoder: [IoU token, M+1 mask tokens, sparse] → transformer → upscale 4× (2 transposed 2×2/2 convs
    with LN2d + GELU) → per-mask-token 3-layer hypernetwork MLP dot product → masks (B, M, 4h, 4w); IoU
    head (3-layer MLP) on the IoU token → (B, M).

Layer-norm epsilons: LayerNorm2d 1e-6 and the final norm 1e-5 everywhere; inside the two-way blocks
transformers' `SamModel` uses 1e-6 and the original segment-anything code 1e-5 (`block_norm_eps`; the
importer sets it from the checkpoint's layout).
Logical axes: "embed" (D), "heads", "kv", "mlp", "conv_in"/"conv_out" (conv channels), "masks",
"pos_feats" (Fourier features). GELU is the exact (erf) form, as torch's default.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from pixelground.config.parse import ModelConfig
from pixelground.models.layers import LayerNorm, Projection, make_param, normal, zeros


@dataclasses.dataclass(frozen=True)
class SamDecoderConfig(ModelConfig):
  """SAM prompt encoder + mask decoder hyper-parameters (defaults: SAM at 1024 px)."""
  prompt_dim: int = 256
  grid_size: int = 64          # image-embedding grid (image_size / 16)
  image_size: int = 1024       # input image size; point / box pixel coordinates refer to it
  mask_in_chans: int = 16
  depth: int = 2
  num_heads: int = 8
  mlp_dim: int = 2048
  attention_downsample_rate: int = 2
  num_multimask_outputs: int = 3
  iou_head_depth: int = 3
  iou_head_hidden: int = 256
  layer_norm_eps: float = 1e-6        # LayerNorm2d (mask prompt conv net, upscaling)
  block_norm_eps: float = 1e-6        # two-way blocks: 1e-6 in HF `SamModel`, 1e-5 in original SAM
  final_norm_eps: float = 1e-5        # norm after the final token→image attention
  dtype: str = "float32"
  param_dtype: str = "float32"

  def __post_init__(self):
    inner = self.prompt_dim // self.attention_downsample_rate
    if self.prompt_dim % self.num_heads or inner % self.num_heads:
      raise ValueError(f"SamDecoderConfig: num_heads {self.num_heads} must divide prompt_dim "
                       f"{self.prompt_dim} and prompt_dim/downsample {inner}.")
    if self.prompt_dim % 8 or self.mask_in_chans % 4:
      raise ValueError("SamDecoderConfig: prompt_dim must be a multiple of 8, mask_in_chans of 4.")

  @property
  def num_mask_tokens(self) -> int:
    return self.num_multimask_outputs + 1


def gelu(x: jax.Array) -> jax.Array:
  return jax.nn.gelu(x, approximate=False)


class FixedGaussian(nnx.Variable):
  """A non-trainable buffer (not an `nnx.Param`): the random-Fourier matrix of the position encoding."""


class PositionEmbeddingRandom(nnx.Module):
  """Random-Fourier positional encoding of 2-D coordinates; output dim = 2 · num_feats."""

  def __init__(self, num_feats: int, *, scale: float = 1.0, rngs: nnx.Rngs):
    self.gaussian = make_param(rngs, normal(scale), (2, num_feats), (None, "pos_feats"), jnp.float32,
                               FixedGaussian)

  def _encode(self, coords: jax.Array) -> jax.Array:
    """coords in [0, 1]² (..., 2) as (x, y) → (..., 2·F), float32."""
    c = 2.0 * coords.astype(jnp.float32) - 1.0
    c = jnp.dot(c, self.gaussian[...].astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    c = 2.0 * math.pi * c
    return jnp.concatenate([jnp.sin(c), jnp.cos(c)], axis=-1)

  def encode_points(self, coords: jax.Array, image_size: int | tuple[int, int]) -> jax.Array:
    """coords (..., 2) as (x, y) in pixels of an image of `image_size` (H, W) → (..., 2·F).

    No half-pixel shift here: `PromptEncoder` adds it (pixel centres), as the reference does."""
    hh, ww = (image_size, image_size) if isinstance(image_size, int) else image_size
    coords = coords.astype(jnp.float32) / jnp.asarray([ww, hh], jnp.float32)
    return self._encode(coords)

  def dense_pe(self, grid: int | tuple[int, int]) -> jax.Array:
    """(h, w, 2·F) encoding of the grid cell centres ((j + 0.5) / w, (i + 0.5) / h)."""
    h, w = (grid, grid) if isinstance(grid, int) else grid
    ys = (jnp.arange(h, dtype=jnp.float32) + 0.5) / h
    xs = (jnp.arange(w, dtype=jnp.float32) + 0.5) / w
    xy = jnp.stack([jnp.broadcast_to(xs[None, :], (h, w)), jnp.broadcast_to(ys[:, None], (h, w))], -1)
    return self._encode(xy)


def patch_conv(x: jax.Array, kernel: jax.Array, bias: jax.Array, dtype) -> jax.Array:
  """Non-overlapping k×k conv, stride k (NHWC); kernel (k, k, C, O). Trailing rows/cols dropped."""
  k = kernel.shape[0]
  b, hh, ww, c = x.shape
  hh, ww = hh // k, ww // k
  x = x[:, : hh * k, : ww * k].reshape(b, hh, k, ww, k, c).astype(dtype)
  y = jnp.einsum("byixjc,ijco->byxo", x, kernel.astype(dtype), preferred_element_type=jnp.float32)
  return (y + bias.astype(jnp.float32)).astype(dtype)


def _transposed_conv2(x: jax.Array, kernel: jax.Array, bias: jax.Array, dtype) -> jax.Array:
  """Transposed 2×2 conv with stride 2 (NHWC): (B, h, w, C) → (B, 2h, 2w, O); kernel (C, 2, 2, O)."""
  b, hh, ww, _ = x.shape
  y = jnp.einsum("byxc,cijo->byixjo", x.astype(dtype), kernel.astype(dtype),
                 preferred_element_type=jnp.float32)
  y = y.reshape(b, 2 * hh, 2 * ww, -1)
  return (y + bias.astype(jnp.float32)).astype(dtype)


class MaskEmbedding(nnx.Module):
  """Dense mask prompt (B, 4h, 4w, 1) → (B, h, w, D)."""

  def __init__(self, cfg: SamDecoderConfig, *, rngs: nnx.Rngs):
    c, d, pd = cfg.mask_in_chans, cfg.prompt_dim, cfg.weight_dtype
    c4 = c // 4
    self.dtype = cfg.compute_dtype
    common = dict(dtype=self.dtype, param_dtype=pd, rngs=rngs)
    self.conv1 = make_param(rngs, normal(0.5), (2, 2, 1, c4), (None, None, None, "conv_out"), pd)
    self.conv1_bias = make_param(rngs, zeros, (c4,), ("conv_out",), pd)
    self.norm1 = LayerNorm(c4, "conv_out", eps=cfg.layer_norm_eps, **common)
    self.conv2 = make_param(rngs, normal((4 * c4) ** -0.5), (2, 2, c4, c),
                            (None, None, "conv_in", "conv_out"), pd)
    self.conv2_bias = make_param(rngs, zeros, (c,), ("conv_out",), pd)
    self.norm2 = LayerNorm(c, "conv_out", eps=cfg.layer_norm_eps, **common)
    self.conv3 = Projection((c,), (d,), ("conv_in",), ("embed",), use_bias=True, **common)

  def __call__(self, masks: jax.Array) -> jax.Array:
    x = gelu(self.norm1(patch_conv(masks, self.conv1[...], self.conv1_bias[...], self.dtype)))
    x = gelu(self.norm2(patch_conv(x, self.conv2[...], self.conv2_bias[...], self.dtype)))
    return self.conv3(x)


class PromptEncoder(nnx.Module):
  """Points / boxes → sparse tokens; mask prompt or "no mask" → dense map. Holds the shared
  `PositionEmbeddingRandom` (`pe`), also used for the image positional encoding."""

  def __init__(self, cfg: SamDecoderConfig, *, rngs: nnx.Rngs):
    d, pd = cfg.prompt_dim, cfg.weight_dtype
    self.cfg, self.dtype = cfg, cfg.compute_dtype
    self.pe = PositionEmbeddingRandom(d // 2, rngs=rngs)
    # Kinds: 0 negative point, 1 positive point, 2 box top-left, 3 box bottom-right.
    self.point_embed = make_param(rngs, normal(1.0), (4, d), (None, "embed"), pd)
    self.not_a_point_embed = make_param(rngs, normal(1.0), (d,), ("embed",), pd)
    self.no_mask_embed = make_param(rngs, normal(1.0), (d,), ("embed",), pd)
    self.mask_embed = MaskEmbedding(cfg, rngs=rngs)

  def image_pe(self) -> jax.Array:
    """(h, w, D) positional encoding of the image-embedding grid."""
    return self.pe.dense_pe(self.cfg.grid_size).astype(self.dtype)

  def embed_points(self, points: jax.Array, labels: jax.Array, pad: bool) -> jax.Array:
    """points (B, N, 2) xy pixels, labels (B, N) → (B, N [+1], D); `pad` appends a padding point."""
    points = points.astype(jnp.float32) + 0.5
    labels = labels.astype(jnp.int32)
    if pad:
      b = points.shape[0]
      points = jnp.concatenate([points, jnp.zeros((b, 1, 2), jnp.float32)], axis=1)
      labels = jnp.concatenate([labels, -jnp.ones((b, 1), jnp.int32)], axis=1)
    emb = self.pe.encode_points(points, self.cfg.image_size)
    lab = labels[..., None]
    table = self.point_embed[...].astype(jnp.float32)
    emb = jnp.where(lab == -1, self.not_a_point_embed[...].astype(jnp.float32), emb)
    emb = emb + jnp.where(lab == 0, table[0], 0.0) + jnp.where(lab == 1, table[1], 0.0)
    return emb

  def embed_boxes(self, boxes: jax.Array) -> jax.Array:
    """boxes (B, 4) xyxy pixels → (B, 2, D) corner tokens."""
    corners = boxes.astype(jnp.float32).reshape(boxes.shape[0], 2, 2) + 0.5
    emb = self.pe.encode_points(corners, self.cfg.image_size)
    return emb + self.point_embed[...].astype(jnp.float32)[2:4]

  def __call__(self, points: jax.Array | None = None, labels: jax.Array | None = None,
               boxes: jax.Array | None = None, masks: jax.Array | None = None,
               batch_size: int | None = None, grid: tuple[int, int] | None = None
               ) -> tuple[jax.Array, jax.Array]:
    """→ sparse (B, N, D) (N may be 0), dense (B, h, w, D).

    points (B, N, 2) with labels (B, N); boxes (B, 4); masks (B, 4h, 4w) or (B, 4h, 4w, 1) logits.
    As the reference, a padding point is appended to the points when no box is given. `grid` (h, w) of
    the no-mask dense map defaults to (grid_size, grid_size).
    """
    d = self.cfg.prompt_dim
    gh, gw = grid or (self.cfg.grid_size, self.cfg.grid_size)
    parts = []
    if points is not None:
      if labels is None:
        raise ValueError("PromptEncoder: points need labels.")
      parts.append(self.embed_points(points, labels, pad=boxes is None))
    if boxes is not None:
      parts.append(self.embed_boxes(boxes))
    b = next((x.shape[0] for x in (points, boxes, masks) if x is not None), batch_size or 1)
    sparse = (jnp.concatenate(parts, axis=1) if parts else jnp.zeros((b, 0, d), jnp.float32))
    if masks is not None:
      if masks.ndim == 3:
        masks = masks[..., None]
      dense = self.mask_embed(masks)
    else:
      dense = jnp.broadcast_to(self.no_mask_embed[...].astype(self.dtype), (b, gh, gw, d))
    return sparse.astype(self.dtype), dense.astype(self.dtype)


class Attention(nnx.Module):
  """SAM attention: q/k/v project D → D/rate (split into H heads), softmax attention, back to D."""

  def __init__(self, dim: int, num_heads: int, downsample_rate: int = 1, *, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    inner = dim // downsample_rate
    h, k = num_heads, inner // num_heads
    self.dtype = dtype
    common = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q_proj = Projection((dim,), (h, k), ("embed",), ("heads", "kv"), **common)
    self.k_proj = Projection((dim,), (h, k), ("embed",), ("heads", "kv"), **common)
    self.v_proj = Projection((dim,), (h, k), ("embed",), ("heads", "kv"), **common)
    self.out_proj = Projection((h, k), (dim,), ("heads", "kv"), ("embed",), **common)

  def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """q (B, Nq, D), k/v (B, Nk, D) → (B, Nq, D).

    Between a few tokens and a large image (fewer tokens than the head dim K, at least 4K positions)
    the image side is never projected: the token side's projections are folded into the image-side
    weights (`_few_keys` / `_few_queries`), the same function with about half the multiply-adds of
    the decoder's cross-attentions."""
    nq, nk, kd = q.shape[1], k.shape[1], self.q_proj.out_shape[-1]
    plain = not any(p.lora_rank for p in (self.q_proj, self.k_proj, self.v_proj, self.out_proj))
    if plain and nk < kd <= nq // 4:
      return self._few_keys(q, k, v)
    if plain and nq < kd <= nk // 4:
      return self._few_queries(q, k, v)
    q, k, v = self.q_proj(q), self.k_proj(k), self.v_proj(v)  # (B, N, H, K)
    logits = jnp.einsum("bqhk,bshk->bhqs", q, k, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits * q.shape[-1] ** -0.5, axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqs,bshk->bqhk", probs, v, preferred_element_type=jnp.float32)
    return self.out_proj(out.astype(self.dtype))


  def _weights(self, proj: Projection) -> tuple[jax.Array, jax.Array]:
    return proj.kernel[...].astype(self.dtype), proj.bias[...].astype(jnp.float32)

  def _few_keys(self, xq: jax.Array, xk: jax.Array, xv: jax.Array) -> jax.Array:
    """Nk ≪ Nq: logits = xq·(Wq kᵀ) + bq·kᵀ per head, output = probs·(v Wo) + bo."""
    f32, dt = jnp.float32, self.dtype
    k, v = self.k_proj(xk), self.v_proj(xv)                                    # (B, Nk, H, K)
    wq, bq = self._weights(self.q_proj)
    wo, bo = self._weights(self.out_proj)
    a = jnp.einsum("dhk,bjhk->bhjd", wq, k, preferred_element_type=f32).astype(dt)
    c = jnp.einsum("hk,bjhk->bhj", bq, k.astype(f32))
    logits = jnp.einsum("bid,bhjd->bhij", xq.astype(dt), a, preferred_element_type=f32) + c[:, :, None]
    probs = jax.nn.softmax(logits * k.shape[-1] ** -0.5, axis=-1).astype(dt)
    vo = jnp.einsum("bjhk,hkd->bhjd", v, wo, preferred_element_type=f32).astype(dt)
    out = jnp.einsum("bhij,bhjd->bid", probs, vo, preferred_element_type=f32)
    return (out + bo).astype(dt)

  def _few_queries(self, xq: jax.Array, xk: jax.Array, xv: jax.Array) -> jax.Array:
    """Nq ≪ Nk: logits = xk·(Wk q) + bk·q per head, output = ((probs·xv) Wv + bv) then out_proj."""
    f32, dt = jnp.float32, self.dtype
    q = self.q_proj(xq)                                                        # (B, Nq, H, K)
    wk, bk = self._weights(self.k_proj)
    wv, bv = self._weights(self.v_proj)
    b = jnp.einsum("dhk,bihk->bhid", wk, q, preferred_element_type=f32).astype(dt)
    c = jnp.einsum("hk,bihk->bhi", bk, q.astype(f32))
    logits = jnp.einsum("bjd,bhid->bhij", xk.astype(dt), b, preferred_element_type=f32) + c[..., None]
    probs = jax.nn.softmax(logits * q.shape[-1] ** -0.5, axis=-1).astype(dt)
    pooled = jnp.einsum("bhij,bjd->bhid", probs, xv.astype(dt), preferred_element_type=f32).astype(dt)
    out = jnp.einsum("bhid,dhk->bihk", pooled, wv, preferred_element_type=f32) + bv
    return self.out_proj(out.astype(dt))


class MLP(nnx.Module):
  """`num_layers` linear layers with ReLU between them (SAM's MLP / hypernetwork / IoU head)."""

  def __init__(self, in_dim: int, hidden: int, out_dim: int, num_layers: int, *, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    common = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.proj_in = Projection((in_dim,), (hidden,), ("embed",), ("mlp",), **common)
    self.layers = nnx.List([Projection((hidden,), (hidden,), ("mlp",), ("mlp",), **common)
                            for _ in range(num_layers - 2)])
    self.proj_out = Projection((hidden,), (out_dim,), ("mlp",), (None,), **common)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = jax.nn.relu(self.proj_in(x))
    for layer in self.layers:
      x = jax.nn.relu(layer(x))
    return self.proj_out(x)


class TwoWayBlock(nnx.Module):
  def __init__(self, dim: int, num_heads: int, mlp_dim: int, downsample_rate: int, skip_first_pe: bool,
               *, eps: float, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.skip_first_pe = skip_first_pe
    self.self_attn = Attention(dim, num_heads, 1, **common)
    self.norm1 = LayerNorm(dim, "embed", eps=eps, **common)
    self.cross_token_to_image = Attention(dim, num_heads, downsample_rate, **common)
    self.norm2 = LayerNorm(dim, "embed", eps=eps, **common)
    self.lin1 = Projection((dim,), (mlp_dim,), ("embed",), ("mlp",), use_bias=True, **common)
    self.lin2 = Projection((mlp_dim,), (dim,), ("mlp",), ("embed",), use_bias=True, **common)
    self.norm3 = LayerNorm(dim, "embed", eps=eps, **common)
    self.cross_image_to_token = Attention(dim, num_heads, downsample_rate, **common)
    self.norm4 = LayerNorm(dim, "embed", eps=eps, **common)

  def __call__(self, queries, keys, query_pe, key_pe):
    if self.skip_first_pe:
      queries = self.self_attn(queries, queries, queries)
    else:
      q = queries + query_pe
      queries = queries + self.self_attn(q, q, queries)
    queries = self.norm1(queries)
    k = keys + key_pe
    queries = self.norm2(queries + self.cross_token_to_image(queries + query_pe, k, keys))
    queries = self.norm3(queries + self.lin2(jax.nn.relu(self.lin1(queries))))
    keys = self.norm4(keys + self.cross_image_to_token(k, queries + query_pe, queries))
    return queries, keys


class TwoWayTransformer(nnx.Module):
  """SAM's two-way transformer between tokens (B, N, D) and an image (B, h, w, D) or (B, L, D)."""

  def __init__(self, depth: int, dim: int, num_heads: int, mlp_dim: int, downsample_rate: int = 2, *,
               eps: float = 1e-6, final_eps: float = 1e-5, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.dtype = dtype
    self.layers = nnx.List([TwoWayBlock(dim, num_heads, mlp_dim, downsample_rate, i == 0, eps=eps,
                                        **common) for i in range(depth)])
    self.final_attn = Attention(dim, num_heads, downsample_rate, **common)
    self.final_norm = LayerNorm(dim, "embed", eps=final_eps, **common)

  def __call__(self, tokens: jax.Array, image: jax.Array, image_pe: jax.Array,
               token_pe: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """tokens (B, N, D); image (B, h, w, D) or (B, L, D); image_pe broadcastable to image (e.g. (h, w, D));
    token_pe: the tokens' positional part (default: the input tokens, as SAM).
    → (tokens (B, N, D), image keys (B, L, D))."""
    b, d = image.shape[0], image.shape[-1]
    keys = image.reshape(b, -1, d).astype(self.dtype)
    key_pe = jnp.broadcast_to(image_pe, image.shape).reshape(b, -1, d).astype(self.dtype)
    tokens = tokens.astype(self.dtype)
    query_pe = tokens if token_pe is None else token_pe.astype(self.dtype)
    queries = tokens
    for layer in self.layers:
      queries, keys = layer(queries, keys, query_pe, key_pe)
    attn = self.final_attn(queries + query_pe, keys + key_pe, keys)
    return self.final_norm(queries + attn), keys


class MaskDecoder(nnx.Module):
  """Tokens + image embeddings → low-res mask logits (B, M, 4h, 4w) and IoU predictions (B, M)."""

  def __init__(self, cfg: SamDecoderConfig, *, detail_channels: int = 0, rngs: nnx.Rngs):
    """`detail_channels` > 0: `__call__` also takes a (B, 4h, 4w, detail_channels) map that the
    hypernetworks weight beside the upscaled embedding (they emit D/8 + detail_channels weights); 0 is
    SAM."""
    d, pd = cfg.prompt_dim, cfg.weight_dtype
    self.cfg, self.dtype, self.detail_channels = cfg, cfg.compute_dtype, detail_channels
    common = dict(dtype=self.dtype, param_dtype=pd, rngs=rngs)
    m = cfg.num_mask_tokens
    self.iou_token = make_param(rngs, normal(1.0), (d,), ("embed",), pd)
    self.mask_tokens = make_param(rngs, normal(1.0), (m, d), ("masks", "embed"), pd)
    self.transformer = TwoWayTransformer(cfg.depth, d, cfg.num_heads, cfg.mlp_dim,
                                         cfg.attention_downsample_rate, eps=cfg.block_norm_eps,
                                         final_eps=cfg.final_norm_eps, **common)
    self.upscale1 = make_param(rngs, normal(d ** -0.5), (d, 2, 2, d // 4),
                               ("conv_in", None, None, "conv_out"), pd)
    self.upscale1_bias = make_param(rngs, zeros, (d // 4,), ("conv_out",), pd)
    self.upscale_norm = LayerNorm(d // 4, "conv_out", eps=cfg.layer_norm_eps, **common)
    self.upscale2 = make_param(rngs, normal((d // 4) ** -0.5), (d // 4, 2, 2, d // 8),
                               ("conv_in", None, None, "conv_out"), pd)
    self.upscale2_bias = make_param(rngs, zeros, (d // 8,), ("conv_out",), pd)
    self.hypernets = nnx.List([MLP(d, d, d // 8 + detail_channels, 3, **common) for _ in range(m)])
    self.iou_head = MLP(d, cfg.iou_head_hidden, m, cfg.iou_head_depth, **common)

  def __call__(self, image_embeddings: jax.Array, image_pe: jax.Array, sparse: jax.Array,
               dense: jax.Array, multimask_output: bool = True, detail: jax.Array | None = None
               ) -> tuple[jax.Array, jax.Array]:
    """image_embeddings (B, h, w, D); image_pe (h, w, D) or (B, h, w, D); sparse (B, N, D);
    dense (B, h, w, D); detail (B, 4h, 4w, detail_channels), exactly when built with detail_channels
    → masks (B, M, 4h, 4w), iou (B, M), M = num_multimask_outputs or 1."""
    b, h, w, d = image_embeddings.shape
    want = (b, 4 * h, 4 * w, self.detail_channels)
    if (detail is None) != (not self.detail_channels) or (detail is not None and detail.shape != want):
      raise ValueError(f"MaskDecoder: detail map must be {want if self.detail_channels else None} "
                       f"(detail_channels={self.detail_channels}), got "
                       f"{None if detail is None else detail.shape}.")
    dt = self.dtype
    out_tokens = jnp.concatenate([self.iou_token[...][None], self.mask_tokens[...]], 0).astype(dt)
    tokens = jnp.concatenate([jnp.broadcast_to(out_tokens[None], (b,) + out_tokens.shape),
                              sparse.astype(dt)], axis=1)
    image = image_embeddings.astype(dt) + dense.astype(dt)
    pe = jnp.broadcast_to(image_pe.astype(dt), image.shape)
    tokens, keys = self.transformer(tokens, image, pe)
    m = self.cfg.num_mask_tokens
    iou_out, mask_out = tokens[:, 0], tokens[:, 1: 1 + m]

    x = keys.reshape(b, h, w, d)
    x = gelu(self.upscale_norm(_transposed_conv2(x, self.upscale1[...], self.upscale1_bias[...], dt)))
    x = gelu(_transposed_conv2(x, self.upscale2[...], self.upscale2_bias[...], dt))  # (B, 4h, 4w, D/8)
    hyper = jnp.stack([mlp(mask_out[:, i]) for i, mlp in enumerate(self.hypernets)], axis=1)
    c = x.shape[-1]
    masks = jnp.einsum("bmc,byxc->bmyx", hyper[..., :c], x, preferred_element_type=jnp.float32)
    if detail is not None:  # a second product, not a concatenation: no gradient into a frozen branch
      masks = masks + jnp.einsum("bmc,byxc->bmyx", hyper[..., c:], detail.astype(dt),
                                 preferred_element_type=jnp.float32)
    masks = masks.astype(dt)
    iou = self.iou_head(iou_out)
    sl = slice(1, None) if multimask_output else slice(0, 1)
    return masks[:, sl], iou[:, sl]


class SamDecoder(nnx.Module):
  """Prompt encoder + mask decoder: image embeddings and prompts → masks and IoU predictions."""

  def __init__(self, cfg: SamDecoderConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.prompt_encoder = PromptEncoder(cfg, rngs=rngs)
    self.mask_decoder = MaskDecoder(cfg, rngs=rngs)

  def __call__(self, image_embeddings: jax.Array, points: jax.Array | None = None,
               labels: jax.Array | None = None, boxes: jax.Array | None = None,
               masks: jax.Array | None = None, multimask_output: bool = True
               ) -> tuple[jax.Array, jax.Array]:
    """image_embeddings (B, h, w, D) NHWC; prompts as `PromptEncoder`. → (B, M, 4h, 4w), (B, M)."""
    b, h, w, _ = image_embeddings.shape
    sparse, dense = self.prompt_encoder(points, labels, boxes, masks, batch_size=b, grid=(h, w))
    image_pe = self.prompt_encoder.pe.dense_pe((h, w)).astype(self.prompt_encoder.dtype)
    return self.mask_decoder(image_embeddings, image_pe, sparse, dense, multimask_output)
