"""Analytic model FLOPs of one PixelLLM step, for MFU (SPEC §8): MFU = step_flops(...)["total"] /
(step time in s × peak FLOP/s of all chips).

Units: FLOPs (one multiply-add = 2 FLOPs) for the whole global batch of one step.

What is counted (forward): every matmul-like contraction of the model —
  * weights: 2 · N · rows per weight matrix (N its number of weights, rows the tokens / patches / grid
    cells / output positions it is applied to; convolutions = kernel weights × output positions, the
    transposed 2×2 convs of SAM's mask decoder = kernel weights × input positions);
  * attention: QKᵀ and PV, 2 · Lq · Lk · H·K each per attention instance (causal attention counted in
    full, as it is computed; SAM's windowed blocks attend within the zero-padded windows, so their q/k/v
    and output projections run on the padded map);
  * SAM's decomposed relative-position terms (q against the height and width tables, 2 · 2 · s³ · D per
    s×s window or map) and the mask decoder's hypernetwork · upscaled-map product.
Not counted: elementwise ops, norms, softmax, rotary embeddings, gathers (token embeddings, T5 relative
position buckets), the prompt encoder's Fourier features, and the fixed interpolation matrices (SAM and
EVA02 position-embedding resizes, SAM → EVA grid bicubic resize, bilinear upsampling of masks to the
input size) — interpolation is work but not model FLOPs. Rematerialisation (`remat`) recompute is not
counted either: these are model FLOPs, not hardware FLOPs.

Backward, per contraction y = a · b: one more contraction of the same size for each operand that needs
a gradient — the weight when it is trained, the activation when anything trainable lies upstream of it.
So a trained weight fed by a gradient-carrying activation costs ×3, a frozen weight that gradients flow
through ×2, a frozen weight with nothing trainable upstream ×1 (SAM's frozen encoder), and a trained
weight reading the raw input ×2 (EVA02's patch embedding: no gradient w.r.t. pixels). Attention scores
and values follow the same rule per operand (×3 when q, k and v all carry gradients). Gradient flags are
propagated through the PixelLLM graph: image → {SAM encoder, EVA02} → fused map → extractor → T5
encoder → T5 decoder → {LM head, location head, LISA projection → mask decoder, refseg adapter → mask
decoder}, proposal head on the fused map; the mask decoder also reads SAM's embedding directly.

Which weights are trained comes from an NNX filter (default `pixelllm.trainable_filter()`) applied to
the model's parameter paths (built with `nnx.eval_shape`, nothing allocated), reduced to the units in
`UNITS`; a unit with any trained weight counts as trained throughout.
"""

from __future__ import annotations

import functools
import math
import typing as tp

from pixelground.models import pixelllm as P
from pixelground.models.heads.box_refiner import BoxRefiner

# Units whose trained/frozen state decides the multipliers. "t5.encoder" / "t5.decoder" are the T5
# base weights of each stack, "….lora" their LoRA factors.
UNITS = ("sam_encoder", "eva", "prompt_encoder", "extractor", "t5.token_embed", "t5.encoder",
         "t5.encoder.lora", "t5.decoder", "t5.decoder.lora", "t5.lm_head", "loc_head", "seg_proj",
         "mask_decoder", "mask_detail", "mask_adapter", "proposal_head", "box_refiner", "gella")


@functools.lru_cache(maxsize=4)
def _param_paths(cfg: P.PixelLLMConfig) -> tuple[tuple[tuple[tp.Any, ...], tp.Any], ...]:
  """(path, abstract nnx.Param) of every parameter of the model (`nnx.eval_shape`: nothing allocated;
  ~8 s for the full-size model, so cached per config)."""
  from flax import nnx

  model = nnx.eval_shape(lambda: P.PixelLLM(cfg, rngs=nnx.Rngs(0)))
  return tuple(nnx.to_flat_state(nnx.state(model, nnx.Param)))


def _unit_of(path: tuple[tp.Any, ...], is_lora: bool) -> str | None:
  head = str(path[0])
  if head != "t5":
    return head if head in UNITS else None
  sub = f"t5.{path[1]}"
  if sub in ("t5.encoder", "t5.decoder"):
    return sub + (".lora" if is_lora else "")
  return sub if sub in UNITS else None


def trained_units(cfg: P.PixelLLMConfig, trainable: tp.Any = None) -> frozenset[str]:
  """The `UNITS` with at least one parameter selected by the NNX filter `trainable` (default
  `pixelllm.trainable_filter()`). A set / frozenset of unit names is returned as is (checked)."""
  if isinstance(trainable, (set, frozenset)):
    bad = sorted(set(trainable) - set(UNITS))
    if bad:
      raise ValueError(f"trained_units: unknown units {bad}; valid: {UNITS}.")
    return frozenset(trainable)
  from flax import nnx

  keep = nnx.filterlib.to_predicate(trainable if trainable is not None else P.trainable_filter())
  out = set()
  for path, var in _param_paths(cfg):
    unit = _unit_of(path, isinstance(var, nnx.LoRAParam))
    if unit is not None and unit not in out and keep(path, var):
      out.add(unit)
  return frozenset(out)


class _Counter:
  """Accumulates forward and trained-step FLOPs per part. Every op returns whether its output carries
  a gradient (anything trainable upstream or in the op)."""

  def __init__(self):
    self.forward: dict[str, float] = {}
    self.total: dict[str, float] = {}
    self.part = ""

  def product(self, flops: float, *grads: bool) -> bool:
    """A contraction of `flops` forward FLOPs whose operands need gradients per `grads`."""
    self.forward[self.part] = self.forward.get(self.part, 0.0) + flops
    self.total[self.part] = self.total.get(self.part, 0.0) + flops * (1 + sum(map(bool, grads)))
    return any(grads)

  def dense(self, n_weights: float, rows: float, *, w: bool, x: bool) -> bool:
    """A weight matrix of `n_weights` (trained: w) applied to `rows` input rows (gradient: x)."""
    return self.product(2.0 * n_weights * rows, w, x)

  def proj(self, d_in: int, d_out: int, rows: float, *, w: bool, x: bool, rank: int = 0,
           lora: bool = False) -> bool:
    """`layers.Projection` d_in → d_out, with a rank-`rank` LoRA branch (factors trained: lora)."""
    g = self.dense(d_in * d_out, rows, w=w, x=x)
    if rank:
      h = self.dense(d_in * rank, rows, w=lora, x=x)
      g = self.dense(rank * d_out, rows, w=lora, x=h) or g
    return g

  def attention(self, n: float, lq: int, lk: int, dim: int, *, q: bool, k: bool, v: bool) -> bool:
    """`n` attention instances of `lq` queries × `lk` keys, total width `dim` = heads · head dim:
    scores QKᵀ and values PV."""
    f = 2.0 * n * lq * lk * dim
    self.product(f, q, k)
    return self.product(f, q or k, v) or q or k


# ----------------------------------------------------------------------------------------------------
# Parts. Each walker takes the gradient flag of its input(s) and returns that of its output.
# ----------------------------------------------------------------------------------------------------

def _sam(c: _Counter, cfg: P.PixelLLMConfig, b: int, w: bool) -> bool:
  """SAM ViT image encoder on b images; nothing upstream (pixels)."""
  sam = cfg.sam
  d, p, n_side = sam.width, sam.patch_size, cfg.image_size // sam.patch_size
  n = n_side * n_side
  g = c.dense(p * p * 3 * d, b * n, w=w, x=False) or w  # + trained position embedding
  for i in range(sam.depth):
    s = n_side if i in sam.global_blocks else sam.window_size
    side = -(-n_side // s) * s                            # padded map side
    inst = b * (side // s) ** 2                           # attention instances (windows)
    rows = b * side * side
    qkv = c.dense(d * 3 * d, rows, w=w, x=g)
    c.product(2.0 * 2 * inst * s ** 3 * d, qkv, w)        # rel-pos: q · height / width tables
    a = c.attention(inst, s * s, s * s, d, q=qkv, k=qkv, v=qkv)
    g = c.dense(d * d, rows, w=w, x=a) or g
    h = c.dense(d * sam.mlp_dim, b * n, w=w, x=g)
    g = c.dense(sam.mlp_dim * d, b * n, w=w, x=h) or g
  co = sam.out_channels
  g = c.dense(d * co, b * n, w=w, x=g)
  return c.dense(9 * co * co, b * n, w=w, x=g)


def _eva(c: _Counter, cfg: P.PixelLLMConfig, b: int, w: bool) -> bool:
  """EVA02 on b images (CLS + patches); nothing upstream (pixels)."""
  eva = cfg.eva
  d, p, m = eva.width, eva.patch_size, eva.mlp_dim
  n = (cfg.image_size // p) ** 2
  t = n + 1
  g = c.dense(p * p * 3 * d, b * n, w=w, x=False) or w  # + trained CLS / position embeddings
  for _ in range(eva.depth):
    q, k, v = (c.dense(d * d, b * t, w=w, x=g) for _ in range(3))
    a = c.attention(b, t, t, d, q=q, k=k, v=v)
    g = c.dense(d * d, b * t, w=w, x=a) or g
    h = [c.dense(d * m, b * t, w=w, x=g) for _ in range(2)]
    g = c.dense(m * d, b * t, w=w, x=any(h)) or g
  return g


def _two_way(c: _Counter, n: float, nt: int, nk: int, depth: int, dim: int, mlp: int, rate: int,
             heads: int, w: bool, gt: bool, gk: bool, gpe_k: bool = False) -> tuple[bool, bool]:
  """SAM's two-way transformer, `n` instances of `nt` tokens against `nk` image keys (token PE = the
  input tokens; image PE a constant or, with gpe_k, a gradient-carrying input) → (tokens, keys) flags.
  Cross-attentions between few tokens and many keys run folded (`sam_decoder.Attention`)."""
  inner = dim // rate
  gpe_t = gt

  def attend(lq, lk, din, gq, gkk, gv):
    kd = din // heads
    if lk < kd <= lq // 4:    # few keys: the query side is never projected
      k = c.dense(dim * din, n * lk, w=w, x=gkk)
      v = c.dense(dim * din, n * lk, w=w, x=gv)
      a = c.product(2.0 * n * lk * din * dim, w, k)           # Wq · k per head
      c.product(2.0 * n * lk * din, w, k)                     # bq · k
      s = c.product(2.0 * n * lq * heads * lk * dim, gq, a)   # scores
      vo = c.product(2.0 * n * lk * din * dim, v, w)          # v · Wo
      return c.product(2.0 * n * lq * heads * lk * dim, s, vo)
    if lq < kd <= lk // 4:    # few queries: the key side is never projected
      q = c.dense(dim * din, n * lq, w=w, x=gq)
      b = c.product(2.0 * n * lq * din * dim, w, q)           # Wk · q per head
      c.product(2.0 * n * lq * din, w, q)                     # bk · q
      s = c.product(2.0 * n * lk * heads * lq * dim, gkk, b)  # scores
      pooled = c.product(2.0 * n * heads * lq * lk * dim, s, gv)
      o = c.product(2.0 * n * lq * dim * din, pooled, w)      # pooled · Wv
      return c.dense(din * dim, n * lq, w=w, x=o)
    q = c.dense(dim * din, n * lq, w=w, x=gq)
    k = c.dense(dim * din, n * lk, w=w, x=gkk)
    v = c.dense(dim * din, n * lk, w=w, x=gv)
    a = c.attention(n, lq, lk, din, q=q, k=k, v=v)
    return c.dense(din * dim, n * lq, w=w, x=a)

  for _ in range(depth):
    gt = attend(nt, nt, dim, gt or gpe_t, gt or gpe_t, gt) or gt
    gt = attend(nt, nk, inner, gt or gpe_t, gk or gpe_k, gk) or gt
    h = c.dense(dim * mlp, n * nt, w=w, x=gt)
    gt = c.dense(mlp * dim, n * nt, w=w, x=h) or gt
    gk = attend(nk, nt, inner, gk or gpe_k, gt or gpe_t, gt) or gk
  gt = attend(nt, nk, inner, gt or gpe_t, gk or gpe_k, gk) or gt
  return gt, gk


def _extractor(c: _Counter, cfg: P.PixelLLMConfig, n: int, g_fused: bool, tr: frozenset[str]) -> bool:
  """PixelLLM's prompt feature extractor on n (image, box) pairs → visual tokens flag."""
  w, gp = "extractor" in tr, "prompt_encoder" in tr
  wd, p, q, hq = cfg.extractor_width, cfg.prompt.prompt_dim, cfg.num_queries, cfg.query_hidden
  ng = cfg.grid ** 2
  gk = c.dense(cfg.feature_dim * wd, n * ng, w=w, x=g_fused)
  gk = c.dense(p * wd, n * ng, w=w, x=gp) or gk           # dense prompt
  gpe = c.dense(p * wd, ng, w=w, x=False)                  # image PE: once, not per example
  gt = c.dense(p * wd, n * 2, w=w, x=gp) or w              # box corners + learned queries
  gt, gk = _two_way(c, n, q + 2, ng, cfg.extractor_depth, wd, cfg.extractor_mlp, 2, cfg.extractor_heads,
                    w, gt, gk, gpe)
  g = c.dense(q * wd * hq, n, w=w, x=gt)                   # per-query W → Hq
  g = c.dense(hq * cfg.t5.d_model, n * q, w=w, x=g)
  if cfg.spatial_tokens:                                   # pooled image tokens W → d_model
    k2 = cfg.spatial_tokens ** 2
    c.dense(2 * wd, k2, w=w, x=False)                      # cell-centre (x, y) embedding: once
    g = c.dense(wd * cfg.t5.d_model, n * k2, w=w, x=gk) or g
  return g


def _t5_mlp(c: _Counter, t5, rows: float, g: bool, w: bool, lora: bool, rank: int) -> bool:
  d, f = t5.d_model, t5.d_ff
  kw = dict(w=w, rank=rank, lora=lora)
  if t5.mlp_activation == "gated-gelu":
    h = c.proj(d, f, rows, x=g, **kw)
    h = c.proj(d, f, rows, x=g, **kw) or h
  else:
    h = c.proj(d, f, rows, x=g, **kw)
  return c.proj(f, d, rows, x=h, **kw) or g


def _rank(t5, target: str) -> int:
  return t5.lora_rank if target in t5.lora_targets else 0


def _t5_encoder(c: _Counter, t5, n: int, le: int, g: bool, tr: frozenset[str]) -> bool:
  """T5 encoder over n sequences of le tokens (input flag g) → output flag."""
  w, lw = "t5.encoder" in tr, "t5.encoder.lora" in tr
  d, hk, rows = t5.d_model, t5.num_heads * t5.head_dim, n * le
  g = g or w                                              # trained RMS norm scales
  for _ in range(t5.num_encoder_layers):
    q, k, v = (c.proj(d, hk, rows, w=w, x=g, rank=_rank(t5, f"encoder.attn.{x}"), lora=lw)
               for x in "qkv")
    a = c.attention(n, le, le, hk, q=q, k=k, v=v)
    g = c.proj(hk, d, rows, w=w, x=a, rank=_rank(t5, "encoder.attn.o"), lora=lw) or g
    g = _t5_mlp(c, t5, rows, g, w, lw, _rank(t5, "encoder.mlp"))
  return g


def _t5_decoder(c: _Counter, t5, n: int, lt: int, le: int, g_enc: bool, tr: frozenset[str]) -> bool:
  """T5 decoder, teacher-forced: n sequences of lt tokens against le encoder tokens → hidden flag."""
  w, lw = "t5.decoder" in tr, "t5.decoder.lora" in tr
  d, hk, rows = t5.d_model, t5.num_heads * t5.head_dim, n * lt
  g = "t5.token_embed" in tr or w                         # trained embeddings / RMS norm scales
  for _ in range(t5.num_decoder_layers):
    q, k, v = (c.proj(d, hk, rows, w=w, x=g, rank=_rank(t5, f"decoder.self_attn.{x}"), lora=lw)
               for x in "qkv")
    a = c.attention(n, lt, lt, hk, q=q, k=k, v=v)
    g = c.proj(hk, d, rows, w=w, x=a, rank=_rank(t5, "decoder.self_attn.o"), lora=lw) or g
    q = c.proj(d, hk, rows, w=w, x=g, rank=_rank(t5, "decoder.cross_attn.q"), lora=lw)
    k, v = (c.proj(d, hk, n * le, w=w, x=g_enc, rank=_rank(t5, f"decoder.cross_attn.{x}"), lora=lw)
            for x in "kv")
    a = c.attention(n, lt, le, hk, q=q, k=k, v=v)
    g = c.proj(hk, d, rows, w=w, x=a, rank=_rank(t5, "decoder.cross_attn.o"), lora=lw) or g
    g = _t5_mlp(c, t5, rows, g, w, lw, _rank(t5, "decoder.mlp"))
  return g


def _lm_head(c: _Counter, t5, rows: float, g: bool, tr: frozenset[str]) -> None:
  unit = "t5.token_embed" if t5.tie_embeddings else "t5.lm_head"
  c.dense(t5.d_model * t5.vocab_size, rows, w=unit in tr, x=g)


def _mask_decoder(c: _Counter, cfg: P.PixelLLMConfig, n: int, num_sparse: int, g_sparse: bool,
                  g_image: bool, w: bool, iou_loss: bool, *, images: int, w_detail: bool) -> None:
  """SAM's mask decoder, n runs with `num_sparse` prompt tokens over SAM's gs×gs embedding. Without
  `iou_loss` (LISA) the IoU head's output reaches no loss: it runs forward only. With `mask_detail`
  its branch runs once on each of the `images` inputs (trained: w_detail)."""
  pc = cfg.prompt
  p, m, ng = pc.prompt_dim, pc.num_mask_tokens, cfg.sam_grid ** 2
  cd, part = cfg.mask_detail, c.part
  g_detail = False
  if cd:
    c.part = "mask_detail"
    stride = cfg.image_size // (4 * cfg.sam_grid)
    g_detail = c.dense(27 * cd, images * cfg.image_size ** 2, w=w_detail, x=False)   # 3×3 conv
    g_detail = c.dense(stride * stride * cd * cd, images * 16 * ng, w=w_detail, x=g_detail)
    c.part = part
  gt, gk = _two_way(c, n, 1 + m + num_sparse, ng, pc.depth, p, pc.mlp_dim,
                    pc.attention_downsample_rate, pc.num_heads, w, w or g_sparse, g_image)
  up = c.dense(p * 4 * (p // 4), n * ng, w=w, x=gk)                 # transposed 2×2 convs
  up = c.dense((p // 4) * 4 * (p // 8), n * 4 * ng, w=w, x=up)
  hyper = False
  for _ in range(m):                                                # hypernetwork MLPs, one token each
    h = c.dense(p * p, n, w=w, x=gt)
    h = c.dense(p * p, n, w=w, x=h)
    hyper = c.dense(p * (p // 8 + cd), n, w=w, x=h) or hyper
  c.product(2.0 * n * m * 16 * ng * (p // 8), hyper, up)            # hyper · upscaled map
  if cd:
    c.product(2.0 * n * m * 16 * ng * cd, hyper, g_detail)          # hyper · detail map
  hid = pc.iou_head_hidden
  w_iou, g_iou = w and iou_loss, gt and iou_loss
  h = c.dense(p * hid, n, w=w_iou, x=g_iou)
  for _ in range(pc.iou_head_depth - 2):
    h = c.dense(hid * hid, n, w=w_iou, x=h)
  c.dense(hid * m, n, w=w_iou, x=h)


def _swin(c: _Counter, cfg, side: int, b: int, w: bool) -> bool:
  """Swin on b `side`×`side` colormaps; nothing upstream (painted pixels)."""
  p, s = cfg.patch_size, -(-side // cfg.patch_size)
  g = c.dense(p * p * cfg.in_channels * cfg.embed_dim, b * s * s, w=w, x=False)
  for i, depth in enumerate(cfg.depths):
    d = cfg.stage_dim(i)
    win = min(cfg.window_size, s) if not cfg.always_partition else cfg.window_size
    side_p = -(-s // win) * win
    rows, inst = b * side_p * side_p, b * (side_p // win) ** 2
    for _ in range(depth):
      qkv = c.dense(d * 3 * d, rows, w=w, x=g)
      a = c.attention(inst, win * win, win * win, d, q=qkv, k=qkv, v=qkv)
      g = c.dense(d * d, rows, w=w, x=a) or g
      h = c.dense(d * int(cfg.mlp_ratio * d), b * s * s, w=w, x=g)
      g = c.dense(int(cfg.mlp_ratio * d) * d, b * s * s, w=w, x=h) or g
    if i + 1 < len(cfg.depths):
      s = -(-s // 2)
      g = c.dense(4 * d * 2 * d, b * s * s, w=w, x=g)
  return g


def _gella(c: _Counter, cfg: P.PixelLLMConfig, b: int, num_entities: int, num_seg: int, g_fused: bool,
           g_hid: bool, w: bool) -> None:
  """GELLA's parts (`models.gella`): Swin on the colormap, ResoBlend on the g×g map, the entity
  decoder on E queries over the h×h pixel features, the association of K nouns with E entities."""
  gc = cfg.gella
  d, e, ng, mlp = gc.width, num_entities, cfg.grid ** 2, gc.mlp_dim
  _swin(c, gc.swin, gc.colormap_size, b, w)
  nh = gc.pixel_grid ** 2
  side = gc.pixel_grid
  for i in range(len(gc.swin.depths)):                                  # level convs (3×3)
    c.dense(9 * gc.swin.stage_dim(i) * d, b * (-(-side // 2 ** i)) ** 2, w=w, x=w)
  g = c.dense(cfg.feature_dim * d, b * ng, w=w, x=g_fused) or w          # in_proj
  for _ in range(2):                                                    # self, cross attention
    q = c.dense(d * d, b * ng, w=w, x=g)
    kv = c.dense(2 * d * d, b * ng, w=w, x=w)
    a = c.attention(b, ng, ng, d, q=q, k=kv, v=kv)
    g = c.dense(d * d, b * ng, w=w, x=a) or g
  h = c.dense(d * mlp, b * ng, w=w, x=g)
  g = c.dense(mlp * d, b * ng, w=w, x=h) or g
  c.dense(d * cfg.feature_dim, b * ng, w=w, x=g)                        # out_proj
  c.dense(gc.swin.embed_dim * d, b * nh, w=w, x=w)                      # pixel features
  c.dense(d * d, b * ng, w=w, x=g)
  c.product(2.0 * b * e * nh * d, w, w)                                 # pooled queries
  q = w
  for _ in range(gc.decoder_depth):
    qp = c.dense(3 * d * d, b * e, w=w, x=q)
    q = c.dense(d * d, b * e, w=w, x=c.attention(b, e, e, d, q=qp, k=qp, v=qp)) or q
    qq = c.dense(d * d, b * e, w=w, x=q)
    kv = c.dense(2 * d * d, b * ng, w=w, x=g)
    q = c.dense(d * d, b * e, w=w, x=c.attention(b, e, ng, d, q=qq, k=kv, v=kv)) or q
    h = c.dense(d * mlp, b * e, w=w, x=q)
    q = c.dense(mlp * d, b * e, w=w, x=h) or q
  m = c.dense(3 * d * d, b * e, w=w, x=q)
  c.product(2.0 * b * e * nh * d, m, w)                                 # mask logits
  a = gc.assoc_dim
  gn = c.dense(cfg.t5.d_model * a, b * num_seg, w=w, x=g_hid)
  ge = c.dense(d * a, b * e, w=w, x=q)
  c.product(2.0 * b * num_seg * e * a, gn, ge)


def _box_refiner(c: _Counter, cfg: P.PixelLLMConfig, n: float, w: bool) -> None:
  """`box_refine`: n runs of the refiner on an n_c×n_c crop (its inputs — pixels and a stopped
  decoder state — carry no gradient; the crop's bilinear sampling is a gather, not counted)."""
  nc, ch, hid = cfg.box_refine, BoxRefiner.CHANNELS, cfg.loc_hidden
  g = c.dense(27 * ch, n * nc * nc, w=w, x=False)                      # 3×3 conv, 3 → C
  g = c.dense(9 * ch * ch, n * nc * nc, w=w, x=g)                      # 3×3 conv, C → C
  g = c.dense(4 * ch * 2 * ch, n * (nc // 2) ** 2, w=w, x=g)           # 2×2 stride 2, C → 2C
  g = c.dense(4 * 4 * ch * ch, n * (nc // 4) ** 2, w=w, x=g)           # 2×2 stride 2, 2C → 2C
  g = c.dense((nc // 4) ** 2 * 2 * ch * hid, n, w=w, x=g)              # crop → hidden
  g = c.dense(cfg.t5.d_model * hid, n, w=w, x=w) or g                  # state (after its LN) → hidden
  c.dense(hid * 4, n, w=w, x=g)


def _caption(c: _Counter, cfg: P.PixelLLMConfig, n: int, le: int, length: int, g_fused: bool,
             tr: frozenset[str]) -> tuple[bool, bool]:
  """Prompt extractor → T5 encoder → decoder over `length` tokens → LM head, for `n` captions (the main
  caption per image, or one per dense-captioning region). → (gradient flows into the visual tokens,
  into the decoder states)."""
  t5 = cfg.t5
  c.part = "extractor"
  g_vis = _extractor(c, cfg, n, g_fused, tr)
  c.part = "t5_encoder"
  g_enc = _t5_encoder(c, t5, n, le, g_vis or "t5.token_embed" in tr, tr)
  c.part = "t5_decoder"
  g_hid = _t5_decoder(c, t5, n, length, le, g_enc, tr)
  c.part = "lm_head"
  _lm_head(c, t5, n * length, g_hid, tr)
  return g_vis, g_hid


def step_flops(cfg: P.PixelLLMConfig, *, batch_size: int, prompt_len: int, target_len: int,
               num_seg: int = 0, num_regions: int = 0, region_len: int = 0, num_entities: int = 0,
               trainable: tp.Callable | None = None, train: bool = True) -> dict:
  """→ {"total": float, "parts": {part_name: float}, "forward": float} FLOPs for one step over the
  global batch. train=False gives forward-only FLOPs (×1 everywhere, for eval / inference).

  Teacher-forced `PixelLLM.__call__` on `batch_size` examples with `prompt_len` prompt tokens and
  `target_len` target tokens (T5 encoder length = num_queries + prompt_len). `num_seg`: LISA `[SEG]`
  slots per example (TaskConfig.max_seg; the model decodes a mask for every slot); refseg decodes one
  mask per example; `num_regions` × `region_len`: dense-captioning regions per example (proposal head +
  extractor, T5 encoder and decoder again per region). target_len=0: no caption decode (and so no
  location / LISA / refseg heads). `trainable`: an NNX filter (default
  `pixelllm.trainable_filter()`) or a set of `UNITS`. "parts" (sums to "total") are: sam_encoder, eva,
  extractor, t5_encoder, t5_decoder (LoRA included), lm_head, loc_head, box_refiner, seg_proj,
  mask_decoder, mask_detail, mask_adapter, proposal_head, gella (with `num_entities` entity slots and
  `num_seg` nouns) — those the config has; "forward" is the
  forward-only total. A training step is `PixelLLM.__call__(batch, train=True)` (the refiner then also
  runs on the target boxes).
  """
  tr = trained_units(cfg, trainable) if train else frozenset()
  c, b, t5 = _Counter(), batch_size, cfg.t5
  le = cfg.num_visual_tokens + prompt_len

  g_sam = g_eva = False
  if cfg.sam is not None:
    c.part = "sam_encoder"
    g_sam = _sam(c, cfg, b, "sam_encoder" in tr)
  if cfg.eva is not None:
    c.part = "eva"
    g_eva = _eva(c, cfg, b, "eva" in tr)
  g_fused = g_sam or g_eva
  if cfg.gella is not None and num_entities and target_len:
    g_fused = g_fused or "gella" in tr                   # ResoBlend writes into the fused map

  g_vis, g_hid = _caption(c, cfg, b, le, target_len, g_fused, tr)

  c.part = "loc_head"
  w = "loc_head" in tr
  dims = [t5.d_model] + [cfg.loc_hidden] * (cfg.loc_layers - 1) + [4]
  g = g_hid or w                                           # its LayerNorm comes first
  if cfg.pointer_head and target_len:                      # attention to the k² grid tokens
    d, h, k2, rows = t5.d_model, cfg.loc_hidden, cfg.spatial_tokens ** 2, b * target_len
    gq = c.dense(d * h, rows, w=w, x=g)
    gg = g_vis or w                                        # grid tokens (after their own LayerNorm)
    gk = c.dense(d * h, b * k2, w=w, x=gg)
    gp = c.product(2.0 * rows * k2 * h, gq, gk)            # scores
    c.product(2.0 * rows * k2 * 2, gp)                     # attended cell centre
    gr = c.product(2.0 * rows * k2 * d, gp, gg)            # attended tokens
    g = c.dense(d * d, rows, w=w, x=gr) or g
  for a, o in zip(dims[:-1], dims[1:]):
    g = c.dense(a * o, b * target_len, w=w, x=g)

  if cfg.box_refine and target_len:
    # The object box at one token per example, from the head's box and (training) the target's too,
    # both trained by the refiner's L1; with `seg_box_prompt` the `[SEG]` mask prompts are refined
    # again, one per slot, forward only (a box prompt carries no gradient).
    c.part = "box_refiner"
    _box_refiner(c, cfg, b * (2 if train else 1), "box_refiner" in tr)
    if cfg.lisa and cfg.seg_box_prompt and num_seg:
      _box_refiner(c, cfg, b * num_seg, False)

  w_md, w_det = "mask_decoder" in tr, "mask_detail" in tr
  g_img = g_sam or "prompt_encoder" in tr                  # SAM embedding + "no mask" embedding
  if cfg.lisa and num_seg and target_len:                  # both heads read the decoder states
    c.part = "seg_proj"
    w = "seg_proj" in tr
    g = c.dense(t5.d_model * t5.d_model, b * num_seg, w=w, x=g_hid)
    g = c.dense(t5.d_model * cfg.prompt.prompt_dim, b * num_seg, w=w, x=g)
    c.part = "mask_decoder"
    _mask_decoder(c, cfg, b * num_seg, 3 if cfg.seg_box_prompt else 1, g, g_img, w_md, iou_loss=False,
                  images=b, w_detail=w_det)

  if cfg.refseg and target_len:
    c.part = "mask_adapter"
    w, p = "mask_adapter" in tr, cfg.prompt.prompt_dim
    nk = cfg.num_visual_tokens + target_len
    gk = c.dense(t5.d_model * p, b * nk, w=w, x=g_vis or g_hid)
    gt, _ = _two_way(c, b, 2, nk, cfg.adapter_depth, p, 2 * p, 2, cfg.adapter_heads, w, w, gk)
    g = c.dense(p * p, b * 2, w=w, x=gt)
    c.part = "mask_decoder"
    _mask_decoder(c, cfg, b, 2, g or "prompt_encoder" in tr, g_img, w_md, iou_loss=True, images=b,
                  w_detail=w_det)

  if cfg.gella is not None and num_entities and target_len:
    c.part = "gella"
    _gella(c, cfg, b, num_entities, num_seg, g_fused, g_hid, "gella" in tr)

  if cfg.proposals and num_regions:
    c.part = "proposal_head"
    w, wp, ng = "proposal_head" in tr, cfg.proposal_width, cfg.grid ** 2
    g = c.dense(9 * cfg.feature_dim * wp, b * ng, w=w, x=g_fused)
    g = c.dense(9 * wp * wp, b * ng, w=w, x=g)
    c.dense(wp * 5, b * ng, w=w, x=g)                         # heatmap + ltrb heads
    n = b * num_regions
    _caption(c, cfg, n, le, region_len, g_fused, tr)

  return {"total": sum(c.total.values()), "parts": dict(c.total), "forward": sum(c.forward.values())}


def mfu(flops_per_step: float, step_seconds: float, peak_flops: float) -> float:
  """Model FLOPs utilisation: FLOPs per step / (seconds per step × peak FLOP/s of all chips)."""
  return flops_per_step / (step_seconds * peak_flops) if step_seconds > 0 else math.nan


# ----------------------------------------------------------------------------------------------------
# Cross-check: contractions counted in a traced program
# ----------------------------------------------------------------------------------------------------

def _eqn_flops(eqn) -> float:
  name = eqn.primitive.name
  if name == "dot_general":
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    k = math.prod(eqn.invars[0].aval.shape[d] for d in lhs_contract)
    return 2.0 * math.prod(eqn.outvars[0].aval.shape) * k
  if name == "conv_general_dilated":
    rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out feature, in feature, *spatial)
    shape = eqn.invars[1].aval.shape
    window = math.prod(shape[d] for d in rhs_spec[1:])
    # A strided conv's input gradient is a conv over the input dilated with zeros (lhs_dilation): only
    # 1 / prod(dilation) of each window's taps are real (exactly, when the kernel is a multiple of the
    # stride).
    dilation = math.prod(eqn.params.get("lhs_dilation") or (1,))
    return 2.0 * math.prod(eqn.outvars[0].aval.shape) * window / dilation
  return 0.0


def _jaxpr_flops(jaxpr) -> float:
  total = 0.0
  for eqn in jaxpr.eqns:
    total += _eqn_flops(eqn)
    subs = {k: v for k, v in eqn.params.items()
            if hasattr(v, "eqns") or hasattr(getattr(v, "jaxpr", None), "eqns")
            or (isinstance(v, tuple) and v and hasattr(getattr(v[0], "jaxpr", v[0]), "eqns"))}
    inner = lambda j: _jaxpr_flops(getattr(j, "jaxpr", j))
    if eqn.primitive.name == "cond":
      total += max(inner(j) for j in subs["branches"])
    elif eqn.primitive.name == "while":
      total += inner(subs["body_jaxpr"])  # trip count unknown: one iteration
    else:
      n = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
      for v in subs.values():
        total += n * sum(inner(j) for j in (v if isinstance(v, tuple) else (v,)))
  return total


def traced_flops(fn: tp.Callable, *args, **kwargs) -> float:
  """FLOPs of every dot_general and convolution in the jaxpr of fn(*args) (scan bodies × their
  length; conv = 2 · output elements · kernel window · input features per group). A check of the
  analytic count: unlike XLA's `cost_analysis()`, it counts scanned layers once per layer (XLA counts a
  while-loop body once) and leaves out elementwise ops; it includes what `step_flops` deliberately
  leaves out (interpolation matrices, Fourier features) and any rematerialised recompute."""
  import jax

  return _jaxpr_flops(jax.make_jaxpr(fn)(*args, **kwargs).jaxpr)
