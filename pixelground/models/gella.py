"""GELLA's entity-grounding parts (SPEC.md section 1.10), composed into `PixelLLM` when
`PixelLLMConfig.gella` is set; the image encoders, prompt machinery and T5 are PixelLLM's own.

    entity masks (B, E, S, S) bool (ground-truth segments, SAM automatic masks or a user's id map)
      → colormap (B, R, R, 3): entity e painted with a distinct palette colour (random per example in
        training, from a fixed seed at evaluation), smaller entities on top, background black
      → colormap encoder: Swin (Tiny at full size) → pyramid (B, R/4·2^-i, R/4·2^-i, C_i), i = 0..3
    ResoBlend: each pyramid level → 3×3 conv (C_i → D) → bilinear to the image grid g, summed: M (B, g, g, D);
      image features Zv (B, g, g, C) → Linear + LN → Z; Z' = LN(Z + SelfAttn(Z + pe));
      Z'' = LN(Z' + CrossAttn(q = Z' + pe, k = M + pe, v = M)); Z''' = LN(Z'' + MLP(Z''))
      → the blended map B (B, g, g, D); the fused map the prompt extractor and T5 read becomes
        Zv + Linear(B) (the linear starts at zero, so a pretrained PixelLLM is unchanged at step 0).
    Entity decoder: pixel features P (B, h, h, D), h = R/4: 1×1 conv of pyramid level 0 + B upsampled
      + a projected Fourier PE; one query per entity = the mean of P over its mask (+ a learned
      embedding); `decoder_depth` post-LN layers (self-attention among the valid entities,
      cross-attention to B + pe, MLP) → entity embeddings Evc (B, E, D); mask logits
      MLP(Evc) · P (B, E, h, h) (BCE + Dice against the input masks, the "identity" task of the paper).
    Association: logits (B, K, E) = FC(Evl) · FC(Evc)ᵀ with Evl the T5 decoder states at the K
      `[SEG]`-predicting steps (one per noun); BCE against the noun × entity ground truth.

Shapes: S model input size, R `colormap_size`, g the fused grid, D `width`, K `[SEG]` slots,
E entity slots. Masks are in model-input pixels (content top-left, zero padding).
"""

from __future__ import annotations

import dataclasses
import typing as tp

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pixelground.config.parse import ModelConfig
from pixelground.models import sam_decoder as dec_lib
from pixelground.models import swin as swin_lib
from pixelground.models.layers import LayerNorm, Projection, make_param, normal, zeros


@dataclasses.dataclass(frozen=True)
class GellaConfig(ModelConfig):
  """GELLA sizes (the paper gives the structure only; ours are justified in the configs' headers)."""
  colormap_size: int = 448       # R: Swin-T's windows of 7 tile its 112/56/28/14 maps exactly
  swin: swin_lib.SwinConfig = dataclasses.field(default_factory=lambda: swin_lib.preset("swin-tiny"))
  width: int = 256               # D: ResoBlend / entity decoder width
  num_heads: int = 8
  mlp_dim: int = 1024
  decoder_depth: int = 3
  assoc_dim: int = 256           # the association FCs' output width
  palette_levels: int = 6        # colours = levels³ − 1 (black is the background)
  # image_stem = C (from-scratch aid, 0 = off as in the paper): two 3×3 convs (3 → C → C, GELU) on the
  # normalised image, area-resized to the pixel grid and added to the pixel features, so an entity's
  # query sees its own pixels (a tiny encoder's coarse grid blurs a small shape into its surroundings).
  image_stem: int = 0
  # mask_stem = C (from-scratch aid, 0 = off as in the paper): two 3×3 convs (1 → C → C, GELU) on each
  # entity's own mask at the pixel grid, summed over the grid per unit of mask area, → Linear → added
  # to its query, so the entity embedding knows its shape and size (the mean of the pixel features over
  # a mask keeps its colour but neither).
  mask_stem: int = 0
  # noun_pool (from-scratch aid, False = off as in the paper): a noun's embedding is the mean of the
  # decoder states over its phrase's steps (after the previous `[SEG]` up to the `[SEG]`-predicting one)
  # instead of that last state alone, whose input is the phrase's last word only: a tiny T5 trained by
  # the text loss to predict `[SEG]` there keeps the phrase's colour / size words faint in it.
  noun_pool: bool = False
  # shape_stem = G (from-scratch aid, 0 = off as in the paper): each entity's mask cropped to a square
  # around its bounding box (`shape_crops`: 10 % margin, antialiased at the input resolution S) and
  # resampled to G×G → 2-layer MLP → a shape code (B, E, D) added to its query and, past the decoder
  # layers (whose attention averages the entities), to its embedding: the outline at one scale whatever
  # the entity's size, so the association can tell a square from a circle (the mask_stem's convs at the
  # pixel grid see a small shape a few cells wide: its size, not its kind).
  shape_stem: int = 0
  # shape_blend (from-scratch aid, needs shape_stem): the shape codes also painted over each entity's
  # area at the image grid and added to the fused map through a zero-initialised Linear (D → C), so the
  # visual tokens T5 reads know which kind of shape covers each cell (the panoptic names).
  shape_blend: bool = False
  # entity_tokens (from-scratch aid, False = off as in the paper): each entity's embedding → Linear → one
  # more T5 encoder token after the visual tokens (masked for empty slots), so the decoder reads which
  # entities, and with shape_stem which kinds, the image holds when it writes the names (the fused
  # map's few visual tokens blur them: a tiny T5 then writes the same names for every image).
  entity_tokens: bool = False
  # detach_sam (from-scratch aid, False = off): GELLA batches read SAM's features in the fused map
  # through a stop-gradient (the paper's SAM is frozen); EVA02 still trains for them. Trained from
  # scratch, the entity tasks otherwise pull SAM's features away from what its mask decoder needs.
  detach_sam: bool = False
  dtype: str = "float32"
  param_dtype: str = "float32"

  def __post_init__(self):
    if self.width % self.num_heads:
      raise ValueError(f"GellaConfig: width {self.width} not divisible by {self.num_heads} heads.")
    if self.colormap_size % (self.swin.patch_size * 2 ** (len(self.swin.depths) - 1)):
      raise ValueError(f"GellaConfig: colormap_size {self.colormap_size} must divide by the Swin "
                       f"stride {self.swin.patch_size * 2 ** (len(self.swin.depths) - 1)}.")
    if self.palette_levels < 2:
      raise ValueError(f"GellaConfig: palette_levels {self.palette_levels} must be ≥ 2.")
    if self.shape_stem < 0 or (self.shape_blend and not self.shape_stem):
      raise ValueError(f"GellaConfig: shape_stem {self.shape_stem} must be ≥ 0, and shape_blend needs "
                       "shape_stem.")

  @property
  def max_colours(self) -> int:
    """Entities one colormap can tell apart (distinct non-black palette colours)."""
    return self.palette_levels ** 3 - 1

  @property
  def pixel_grid(self) -> int:
    """h: the entity decoder's pixel-feature grid (Swin's first level, stride 4 of the colormap)."""
    return -(-self.colormap_size // self.swin.patch_size)


def detach_leading(x: jax.Array, channels: int, rows: jax.Array) -> jax.Array:
  """x (B, g, g, C) with its first `channels` channels behind a stop-gradient where `rows`
  (B, 1, 1, 1) bool is True (`GellaConfig.detach_sam`: SAM's part of the fused map on GELLA rows)."""
  head = x[..., :channels]
  head = jnp.where(rows, jax.lax.stop_gradient(head), head)
  return jnp.concatenate([head, x[..., channels:]], axis=-1)


def tiny_gella(image_size: int = 64) -> GellaConfig:
  """A CPU-sized GELLA (tests, demo, `:runlocal`): the same structure, every width tiny."""
  swin = swin_lib.SwinConfig(image_size=2 * image_size, embed_dim=16, depths=(1, 1, 1, 1),
                             num_heads=(1, 2, 2, 4), window_size=4)
  return GellaConfig(colormap_size=2 * image_size, swin=swin, width=32, num_heads=2, mlp_dim=64,
                     decoder_depth=2, assoc_dim=32)


class EntityState(tp.NamedTuple):
  """GELLA's per-image state after ResoBlend: `blended` (B, g, g, D), `level0` the colormap's first Swin
  map (B, h, h, C0), the entity `masks` (B, E, S, S) bool and `valid` (B, E) they came from, and with
  `image_stem` the ImageNet-normalised image `pixels` (B, S, S, 3) (else None), with `shape_stem` the
  entities' shape codes `shapes` (B, E, D) (else None), with `entity_tokens` the entity decoder's
  output `decoded` = (Evc (B, E, D), mask logits (B, E, h, h)) (else None: decoded where used)."""
  blended: jax.Array
  level0: jax.Array
  masks: jax.Array
  valid: jax.Array
  pixels: jax.Array | None = None
  shapes: jax.Array | None = None
  decoded: tuple[jax.Array, jax.Array] | None = None



# ----------------------------------------------------------------------------------------------------
# Colormap encoding
# ----------------------------------------------------------------------------------------------------

def palette(levels: int) -> np.ndarray:
  """(levels³ − 1, 3) float32 colours in [0, 1]: the RGB cube sampled at `levels` values per channel,
  black (the background) left out."""
  v = np.linspace(0.0, 1.0, levels, dtype=np.float32)
  cube = np.stack(np.meshgrid(v, v, v, indexing="ij"), axis=-1).reshape(-1, 3)
  return cube[1:]


def entity_colours(key: jax.Array, batch: int, num: int, levels: int) -> jax.Array:
  """(B, E) distinct palette indices per example: a random draw without replacement from `key`
  (different for every example of the batch)."""
  n = len(palette(levels))
  if num > n:
    raise ValueError(f"{num} entity slots exceed the {n} distinct colormap colours "
                     f"(GellaConfig.palette_levels={levels}).")
  keys = jax.random.split(key, batch)
  return jax.vmap(lambda k: jax.random.permutation(k, n)[:num])(keys)


def paint_colormap(masks: jax.Array, valid: jax.Array, colours: jax.Array, size: int) -> jax.Array:
  """masks (B, E, S, S) bool, valid (B, E) bool, colours (B, E, 3) in [0, 1] → (B, R, R, 3) float32,
  R = `size` (nearest-neighbour resampling of the masks). Where entities overlap the smaller one (by
  area at S) is painted on top; uncovered pixels are black."""
  s = masks.shape[-1]
  idx = jnp.asarray(np.minimum(((np.arange(size) + 0.5) * s / size).astype(np.int32), s - 1))
  m = masks[:, :, idx][:, :, :, idx] & valid[:, :, None, None]                  # (B, E, R, R)
  area = jnp.sum(masks, axis=(2, 3)).astype(jnp.float32)                         # (B, E)
  key = jnp.where(m, area[:, :, None, None], jnp.inf)
  top = jnp.argmin(key, axis=1)                                                  # (B, R, R)
  covered = jnp.any(m, axis=1)
  picked = jnp.take_along_axis(colours, top.reshape(top.shape[0], -1)[..., None], axis=1)
  picked = picked.reshape(top.shape + (3,))
  return jnp.where(covered[..., None], picked, 0.0).astype(jnp.float32)


def colormap(masks: jax.Array, valid: jax.Array, cfg: GellaConfig, key: jax.Array
             ) -> tuple[jax.Array, jax.Array]:
  """Entity masks → (colormap (B, R, R, 3) in [0, 1], palette indices (B, E)) with colours drawn
  from `key` (`entity_colours`)."""
  b, e = masks.shape[:2]
  idx = entity_colours(key, b, e, cfg.palette_levels)
  colours = jnp.asarray(palette(cfg.palette_levels))[idx]
  return paint_colormap(masks, valid, colours, cfg.colormap_size), idx


def shape_crops(masks: jax.Array, size: int, margin: float = 0.1) -> jax.Array:
  """masks (B, E, S, S) bool → (B, E, G, G) float32, G = `size`: each mask resampled inside the square
  centred on its bounding box, side = (1 + 2·`margin`) × the box's longer side, with a tent filter as
  wide as a crop cell (antialiased when the crop shrinks, bilinear when it enlarges). Outside the image
  is background; an empty mask gives zeros."""
  s = masks.shape[-1]
  m = masks.astype(jnp.float32)
  idx = jnp.arange(s, dtype=jnp.float32)

  def extent(occupied):  # (B, E, S) bool → first and one-past-last occupied index
    lo = jnp.argmax(occupied, axis=-1).astype(jnp.float32)
    hi = s - jnp.argmax(occupied[..., ::-1], axis=-1).astype(jnp.float32)
    return lo, hi

  y0, y1 = extent(jnp.any(masks, axis=3))
  x0, x1 = extent(jnp.any(masks, axis=2))
  side = jnp.maximum(y1 - y0, x1 - x0) * (1.0 + 2.0 * margin)                    # (B, E)
  step = side / size
  offsets = (jnp.arange(size, dtype=jnp.float32) + 0.5 - size / 2)              # (G,)

  def weights(lo, hi):  # (B, E, G, S) sampling weights along one axis (pixel j's centre is j + ½)
    at = (lo + hi)[..., None] / 2 + offsets * step[..., None] - 0.5              # (B, E, G)
    width = jnp.maximum(step, 1.0)[..., None, None]
    return jnp.maximum(0.0, 1.0 - jnp.abs(at[..., None] - idx) / width) / width

  return jnp.einsum("begy,beyx,behx->begh", weights(y0, y1), m, weights(x0, x1),
                    precision=jax.lax.Precision.HIGHEST)


# ----------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------

def _conv(x: jax.Array, w: jax.Array, b: jax.Array, dtype) -> jax.Array:
  y = jax.lax.conv_general_dilated(x.astype(dtype), w.astype(dtype), (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                   preferred_element_type=jnp.float32)
  return (y + b.astype(jnp.float32)).astype(dtype)


def _resize(x: jax.Array, hw: tuple[int, int]) -> jax.Array:
  """(B, h, w, C) → (B, *hw, C) bilinear (area-averaging when shrinking), in float32."""
  return jax.image.resize(x.astype(jnp.float32), (x.shape[0],) + tuple(hw) + (x.shape[-1],),
                          "linear", antialias=True)


class MaskedAttention(dec_lib.Attention):
  """SAM's attention with an optional key mask (B, Nk) bool (False keys get no weight)."""

  def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array | None = None
               ) -> jax.Array:
    q, k, v = self.q_proj(q), self.k_proj(k), self.v_proj(v)
    logits = jnp.einsum("bqhk,bshk->bhqs", q, k, preferred_element_type=jnp.float32)
    logits = logits * q.shape[-1] ** -0.5
    if key_mask is not None:
      logits = jnp.where(key_mask[:, None, None, :], logits, -1e9)
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqs,bshk->bqhk", probs, v, preferred_element_type=jnp.float32)
    return self.out_proj(out.astype(self.dtype))


def _norm(d: int, cfg: GellaConfig, rngs) -> LayerNorm:
  return LayerNorm(d, "embed", eps=1e-5, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype,
                   rngs=rngs)


class ResoBlend(nnx.Module):
  """Fuses the low-resolution image map with the colormap pyramid (module docstring)."""

  def __init__(self, cfg: GellaConfig, feature_dim: int, *, rngs: nnx.Rngs):
    d, dt, pd = cfg.width, cfg.compute_dtype, cfg.weight_dtype
    self.dtype = dt
    common = dict(dtype=dt, param_dtype=pd, rngs=rngs)
    dims = [cfg.swin.stage_dim(i) for i in range(len(cfg.swin.depths))]
    self.level_convs = nnx.List([make_param(rngs, normal((9 * c) ** -0.5), (3, 3, c, d),
                                            (None, None, "conv_in", "embed"), pd) for c in dims])
    self.level_biases = nnx.List([make_param(rngs, zeros, (d,), ("embed",), pd) for _ in dims])
    self.in_proj = Projection((feature_dim,), (d,), ("channels",), ("embed",), use_bias=True, **common)
    self.in_norm = _norm(d, cfg, rngs)
    self.block = AttentionBlock(cfg, rngs=rngs)
    self.out_proj = Projection((d,), (feature_dim,), ("embed",), ("channels",), init_std=0.0,
                               use_bias=True, **common)

  def mask_features(self, pyramid: list[jax.Array], grid: tuple[int, int]) -> jax.Array:
    """Colormap pyramid → M (B, g, g, D): per level 3×3 conv then bilinear to `grid`, summed."""
    out = 0.0
    for x, w, b in zip(pyramid, self.level_convs, self.level_biases):
      out = out + _resize(_conv(x, w[...], b[...], self.dtype), grid)
    return out.astype(self.dtype)

  def __call__(self, fused: jax.Array, pyramid: list[jax.Array], pe: jax.Array
               ) -> tuple[jax.Array, jax.Array]:
    """fused (B, g, g, C), pyramid (Swin levels), pe (g, g, D) → (fused' (B, g, g, C) = fused +
    Linear(blended), blended (B, g, g, D))."""
    b, gh, gw, c = fused.shape
    m = self.mask_features(pyramid, (gh, gw)).reshape(b, gh * gw, -1)
    pe = pe.reshape(1, gh * gw, -1).astype(self.dtype)
    z = self.in_norm(self.in_proj(fused.reshape(b, gh * gw, c)))
    z = self.block(z, pe, None, m, pe)
    blended = z.reshape(b, gh, gw, -1)
    out = fused.astype(jnp.float32) + self.out_proj(z).reshape(b, gh, gw, c).astype(jnp.float32)
    return out.astype(fused.dtype), blended


class AttentionBlock(nnx.Module):
  """Post-LN block: self-attention (among the `valid` queries), cross-attention to a memory, MLP —
  ResoBlend's (image ← colormap) and each entity-decoder layer's (entities ← blended map)."""

  def __init__(self, cfg: GellaConfig, *, rngs: nnx.Rngs):
    d = cfg.width
    common = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, rngs=rngs)
    self.self_attn = MaskedAttention(d, cfg.num_heads, **common)
    self.norm1 = _norm(d, cfg, rngs)
    self.cross_attn = MaskedAttention(d, cfg.num_heads, **common)
    self.norm2 = _norm(d, cfg, rngs)
    self.mlp = dec_lib.MLP(d, cfg.mlp_dim, d, 2, **common)
    self.norm3 = _norm(d, cfg, rngs)

  def __call__(self, q, qpe, valid, mem, mem_pe):
    """q (B, Nq, D) + its PE qpe, valid (B, Nq) bool or None, mem (B, Nk, D) + mem_pe → (B, Nq, D)."""
    q = self.norm1(q + self.self_attn(q + qpe, q + qpe, q, valid))
    q = self.norm2(q + self.cross_attn(q + qpe, mem + mem_pe, mem))
    return self.norm3(q + self.mlp(q))


class EntityDecoder(nnx.Module):
  """One query per entity → entity embeddings (B, E, D) and mask logits (B, E, h, h)."""

  def __init__(self, cfg: GellaConfig, pe_dim: int, *, rngs: nnx.Rngs):
    d, dt, pd = cfg.width, cfg.compute_dtype, cfg.weight_dtype
    self.dtype = dt
    common = dict(dtype=dt, param_dtype=pd, rngs=rngs)
    self.level0 = Projection((cfg.swin.embed_dim,), (d,), ("conv_in",), ("embed",), use_bias=True,
                             **common)
    self.blend_proj = Projection((d,), (d,), ("embed",), ("mlp",), use_bias=True, **common)
    self.pe_proj = Projection((pe_dim,), (d,), (None,), ("embed",), use_bias=True, **common)
    self.query_embed = make_param(rngs, normal(0.02), (d,), ("embed",), pd)
    self.query_norm = _norm(d, cfg, rngs)
    self.layers = nnx.List([AttentionBlock(cfg, rngs=rngs) for _ in range(cfg.decoder_depth)])
    self.out_norm = _norm(d, cfg, rngs)
    self.mask_mlp = dec_lib.MLP(d, d, d, 3, **common)
    c = cfg.image_stem
    if c:
      self.stem1 = make_param(rngs, normal(27 ** -0.5), (3, 3, 3, c), (None, None, "channels", "conv_out"),
                              pd)
      self.stem1_bias = make_param(rngs, zeros, (c,), ("conv_out",), pd)
      self.stem2 = make_param(rngs, normal((9 * c) ** -0.5), (3, 3, c, c), (None, None, "conv_in",
                                                                          "conv_out"), pd)
      self.stem2_bias = make_param(rngs, zeros, (c,), ("conv_out",), pd)
      self.stem_proj = Projection((c,), (d,), ("conv_in",), ("embed",), use_bias=True, **common)
    else:
      self.stem1 = None
    c = cfg.mask_stem
    if c:
      self.mask_stem1 = make_param(rngs, normal(9 ** -0.5), (3, 3, 1, c), (None, None, None, "conv_out"),
                                   pd)
      self.mask_stem1_bias = make_param(rngs, zeros, (c,), ("conv_out",), pd)
      self.mask_stem2 = make_param(rngs, normal((9 * c) ** -0.5), (3, 3, c, c), (None, None, "conv_in",
                                                                               "conv_out"), pd)
      self.mask_stem2_bias = make_param(rngs, zeros, (c,), ("conv_out",), pd)
      self.mask_stem_proj = Projection((c,), (d,), ("conv_in",), ("embed",), use_bias=True, **common)
    else:
      self.mask_stem1 = None

  def _stem(self, pixels: jax.Array, hw: tuple[int, int]) -> jax.Array:
    x = jax.nn.gelu(_conv(pixels, self.stem1[...], self.stem1_bias[...], self.dtype), approximate=False)
    x = jax.nn.gelu(_conv(x, self.stem2[...], self.stem2_bias[...], self.dtype), approximate=False)
    return _resize(self.stem_proj(x), hw)

  def _mask_stem(self, weights: jax.Array) -> jax.Array:
    """weights (B, E, h, w) the entities' area fractions at the pixel grid → (B, E, D) float32: the
    convs' features summed over the grid (edges just outside the mask included) per unit of area."""
    b, e, h, w = weights.shape
    x = weights.reshape(b * e, h, w, 1)
    x = jax.nn.gelu(_conv(x, self.mask_stem1[...], self.mask_stem1_bias[...], self.dtype),
                    approximate=False)
    x = jax.nn.gelu(_conv(x, self.mask_stem2[...], self.mask_stem2_bias[...], self.dtype),
                    approximate=False)
    area = jnp.maximum(jnp.sum(weights, axis=(2, 3)), 1e-6).reshape(b * e, 1)
    pooled = jnp.sum(x.astype(jnp.float32), axis=(1, 2)) / area
    return self.mask_stem_proj(pooled.astype(self.dtype)).astype(jnp.float32).reshape(b, e, -1)

  def __call__(self, level0: jax.Array, blended: jax.Array, masks: jax.Array, valid: jax.Array,
               pixel_pe: jax.Array, grid_pe: jax.Array, pixels: jax.Array | None = None,
               shapes: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """level0 (B, h, h, C0) Swin's first map, blended (B, g, g, D), masks (B, E, S, S) bool, valid
    (B, E), pixel_pe (h, h, Pd), grid_pe (g, g, Pd), with `image_stem` pixels (B, S, S, 3) the
    normalised image, with `shape_stem` shapes (B, E, D) the entities' shape codes (added to their
    queries and embeddings) → (Evc (B, E, D), mask logits (B, E, h, h) f32)."""
    b, h, w, _ = level0.shape
    pix = (self.level0(level0).astype(jnp.float32) + _resize(self.blend_proj(blended), (h, w))
           + self.pe_proj(pixel_pe)[None].astype(jnp.float32))                 # (B, h, w, D)
    if self.stem1 is not None:
      if pixels is None:
        raise ValueError("EntityDecoder: image_stem needs the normalised image (`pixels`).")
      pix = pix + self._stem(pixels, (h, w))
    weights = jax.image.resize(masks.astype(jnp.float32), masks.shape[:2] + (h, w), "linear",
                               antialias=True)                                  # area fractions
    weights = weights * valid[:, :, None, None]
    pooled = jnp.einsum("behw,bhwd->bed", weights, pix) / jnp.maximum(
        jnp.sum(weights, axis=(2, 3))[..., None], 1e-6)
    if self.mask_stem1 is not None:
      pooled = pooled + self._mask_stem(weights)
    if shapes is not None:
      pooled = pooled + shapes.astype(jnp.float32)
    q = self.query_norm((pooled + self.query_embed[...].astype(jnp.float32)).astype(self.dtype))
    gh, gw = blended.shape[1:3]
    mem = blended.reshape(b, gh * gw, -1)
    mem_pe = self.pe_proj(grid_pe).reshape(1, gh * gw, -1).astype(self.dtype)
    qpe = jnp.zeros_like(q)
    for layer in self.layers:
      q = layer(q, qpe, valid, mem, mem_pe)
    emb = self.out_norm(q)
    if shapes is not None:  # past the layers too: their attention averages the entities' queries
      emb = (emb.astype(jnp.float32) + shapes.astype(jnp.float32)).astype(emb.dtype)
    logits = jnp.einsum("bed,bhwd->behw", self.mask_mlp(emb).astype(jnp.float32), pix)
    return emb, logits


class Association(nnx.Module):
  """FC(nouns) · FC(entities)ᵀ: the two projections (logits via `association_logits`)."""

  def __init__(self, cfg: GellaConfig, d_model: int, *, rngs: nnx.Rngs):
    a = cfg.assoc_dim
    # Each side's output std ≈ a^-1/4, so a product of the two sums to O(1) logits at init.
    common = dict(use_bias=True, dtype=jnp.float32, param_dtype=cfg.weight_dtype, rngs=rngs)
    self.noun_fc = Projection((d_model,), (a,), ("embed",), ("mlp",),
                              init_std=d_model ** -0.5 * a ** -0.25, **common)
    self.entity_fc = Projection((cfg.width,), (a,), ("embed",), ("mlp",),
                                init_std=cfg.width ** -0.5 * a ** -0.25, **common)

  def __call__(self, nouns: jax.Array, entities: jax.Array) -> tuple[jax.Array, jax.Array]:
    """nouns (B, K, d_model), entities (B, E, D) → projected (B, K, A), (B, E, A) float32."""
    return (self.noun_fc(nouns.astype(jnp.float32)).astype(jnp.float32),
            self.entity_fc(entities.astype(jnp.float32)).astype(jnp.float32))


def phrase_states(hidden: jax.Array, positions: jax.Array) -> jax.Array:
  """hidden (B, T, d) decoder states, positions (B, K) ascending `[SEG]`-predicting steps → (B, K, d)
  float32: per slot the mean of the states from the step after the previous `[SEG]` is read (the one
  whose input is the phrase's first token) through its own step (its input the phrase's last token);
  a slot with no such step (padding) gets zeros."""
  t = jnp.arange(hidden.shape[1])
  start = jnp.concatenate([jnp.full_like(positions[:, :1], -1), positions[:, :-1]], axis=1) + 2
  inside = ((t >= start[..., None]) & (t <= positions[..., None])).astype(jnp.float32)  # (B, K, T)
  total = jnp.einsum("bkt,btd->bkd", inside, hidden.astype(jnp.float32))
  return total / jnp.maximum(jnp.sum(inside, axis=-1, keepdims=True), 1.0)


def association_logits(nouns: jax.Array, entities: jax.Array) -> jax.Array:
  """Projected nouns (B, K, A) · entities (B, E, A) → (B, K, E) float32 logits."""
  return jnp.einsum("bka,bea->bke", nouns, entities, precision=jax.lax.Precision.HIGHEST)


class Gella(nnx.Module):
  """The GELLA parts PixelLLM owns with `cfg.gella`: colormap encoder, ResoBlend, entity decoder,
  association (see the module docstring)."""

  def __init__(self, cfg: GellaConfig, feature_dim: int, d_model: int, pe_dim: int, *,
               rngs: nnx.Rngs):
    self.cfg = cfg
    self.colormap_encoder = swin_lib.Swin(cfg.swin, rngs=rngs)
    self.resoblend = ResoBlend(cfg, feature_dim, rngs=rngs)
    self.entity_decoder = EntityDecoder(cfg, pe_dim, rngs=rngs)
    self.association = Association(cfg, d_model, rngs=rngs)
    self.blend_pe = Projection((pe_dim,), (cfg.width,), (None,), ("embed",), use_bias=False,
                               dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, rngs=rngs)
    g = cfg.shape_stem
    self.shape_mlp = (dec_lib.MLP(g * g, cfg.width, cfg.width, 2, dtype=cfg.compute_dtype,
                                  param_dtype=cfg.weight_dtype, rngs=rngs) if g else None)
    self.shape_out = (Projection((cfg.width,), (feature_dim,), ("embed",), ("channels",), init_std=0.0,
                                 use_bias=True, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype,
                                 rngs=rngs) if cfg.shape_blend else None)
    self.token_proj = (Projection((cfg.width,), (d_model,), ("mlp",), ("embed",), use_bias=True,
                                  dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, rngs=rngs)
                       if cfg.entity_tokens else None)

  def shape_codes(self, masks: jax.Array, valid: jax.Array) -> jax.Array:
    """masks (B, E, S, S) bool, valid (B, E) → (B, E, D) float32 shape codes (`shape_stem`): the
    MLP of each entity's `shape_crops` (zeros for invalid slots)."""
    b, e = masks.shape[:2]
    crops = shape_crops(masks, self.cfg.shape_stem).reshape(b, e, -1)
    codes = self.shape_mlp(crops.astype(self.cfg.compute_dtype)).astype(jnp.float32)
    return codes * valid[..., None]

  def paint(self, codes: jax.Array, masks: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """codes (B, E, D), masks (B, E, S, S) bool → (B, *grid, D) float32: each grid cell the sum of the
    codes weighted by the entities' area fractions in it (`shape_blend`)."""
    frac = jax.image.resize(masks.astype(jnp.float32), masks.shape[:2] + tuple(grid), "linear",
                            antialias=True)
    return jnp.einsum("behw,bed->bhwd", frac, codes)

  def blend_shapes(self, fused: jax.Array, codes: jax.Array, masks: jax.Array) -> jax.Array:
    """fused (B, g, g, C), codes (B, E, D), masks (B, E, S, S) → fused + Linear(`paint`ed codes)
    (`shape_blend`), in fused's dtype."""
    painted = self.paint(codes, masks, fused.shape[1:3])
    out = fused.astype(jnp.float32) + self.shape_out(painted.astype(self.cfg.compute_dtype)).astype(
        jnp.float32)
    return out.astype(fused.dtype)

  def encode_colormap(self, masks: jax.Array, valid: jax.Array, key: jax.Array) -> list[jax.Array]:
    """Entity masks (B, E, S, S), valid (B, E) → Swin pyramid of the colormap (colours from `key`),
    the colormap mapped to [−1, 1]."""
    cmap, _ = colormap(masks, valid, self.cfg, key)
    return self.colormap_encoder(cmap * 2.0 - 1.0)
