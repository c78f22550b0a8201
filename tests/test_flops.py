"""Analytic step FLOPs (pixelground.perf.flops) against the compiled and the traced program.

Three references: XLA's `cost_analysis()["flops"]` of the compiled forward (counts elementwise ops too,
so it sits a few % above the matmul count); `flops.traced_flops`, the dot/conv FLOPs of the jaxpr
(exact for matmuls: forward, and the gradient program for the multiplier logic); and, at full size, the
published parameter counts.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pixelground.perf import flops as F
from pixelground.config import recipes
from pixelground.data import tasks
from pixelground.models import eva02 as eva_lib
from pixelground.models import pixelllm as P
from pixelground.training import objective
from pixelground.models import sam_decoder as dec_lib
from pixelground.models import sam_encoder as sam_lib
from pixelground.models import t5 as t5_lib

S, LE, LT, K, R, LR = 96, 8, 16, 2, 2, 6


def small_config(*, lisa=False, refseg=False, proposals=False, scan=False,
                 spatial=0, pointer=False, seg_box="", detail=0, refine=0) -> P.PixelLLMConfig:
  """PixelLLM with the real structure and widths big enough (128–256) for matmuls to dominate XLA's
  count. SAM grid 6 with window 4: the windowed block attends over the map zero-padded to 8×8."""
  sam = sam_lib.SamEncoderConfig(image_size=S, width=128, depth=3, num_heads=4, window_size=4,
                                 global_blocks=(1,), out_channels=64)
  eva = eva_lib.Eva02Config(image_size=84, width=128, depth=2, num_heads=4, mlp_dim=256, rope_ref_grid=6,
                            scan_layers=scan)
  prompt = dec_lib.SamDecoderConfig(prompt_dim=64, grid_size=6, image_size=S, mask_in_chans=8, depth=2,
                                    num_heads=4, mlp_dim=128, iou_head_hidden=64)
  t5 = t5_lib.T5Config(vocab_size=256, d_model=256, num_heads=4, head_dim=64, d_ff=512,
                       num_encoder_layers=2, num_decoder_layers=2, lora_rank=8, lora_alpha=16.0,
                       lora_targets=t5_lib.PIXELLLM_LORA_TARGETS, scan_layers=scan)
  return P.PixelLLMConfig(image_size=S, sam=sam, eva=eva, prompt=prompt, t5=t5, num_queries=8,
                          extractor_width=128, extractor_depth=2, extractor_heads=4, extractor_mlp=256,
                          query_hidden=128, loc_hidden=64, lisa=lisa, seg_token_id=5 if lisa else -1,
                          refseg=refseg, adapter_heads=4, proposals=proposals, proposal_width=64,
                          spatial_tokens=spatial, pointer_head=pointer, seg_box_prompt=seg_box,
                          mask_detail=detail, box_refine=refine)


def make_batch(cfg: P.PixelLLMConfig, b: int = 2) -> dict[str, jax.Array]:
  """A training batch with every `tasks.schema` field (zeros, then plausible ids / boxes / masks)."""
  tcfg = tasks.TaskConfig(image_size=S, max_prompt_len=LE, max_target_len=LT, max_seg=K, max_entities=2,
                          max_regions=R, max_region_len=LR)
  rng = np.random.default_rng(0)
  out = {k: np.zeros((b,) + shape, dtype) for k, (shape, dtype) in tasks.schema(tcfg).items()}
  v = cfg.t5.vocab_size
  out.update(image=rng.integers(0, 255, (b, S, S, 3)).astype(np.uint8),
             image_mask=np.ones((b, S, S), bool),
             prompt_box=np.tile(np.float32([0, 0, 1, 1]), (b, 1)),
             prompt_ids=rng.integers(2, v, (b, LE)).astype(np.int32),
             target_ids=rng.integers(2, v, (b, LT)).astype(np.int32),
             target_mask=np.ones((b, LT), bool),
             token_boxes=np.tile(np.float32([0.1, 0.2, 0.6, 0.7]), (b, LT, 1)),
             token_box_valid=np.ones((b, LT), bool),
             seg_positions=np.tile(np.int32([3, 7]), (b, 1)),
             seg_masks=rng.random((b, K, S, S)) > 0.5, seg_valid=np.ones((b, K), bool),
             region_boxes=np.tile(np.float32([[0.1, 0.1, 0.5, 0.5], [0.4, 0.3, 0.9, 0.8]]), (b, 1, 1)),
             region_ids=rng.integers(2, v, (b, R, LR)).astype(np.int32),
             region_valid=np.ones((b, R), bool))
  return {k: jnp.asarray(x) for k, x in out.items()}


def analytic(cfg, b=2, **kw):
  return F.step_flops(cfg, batch_size=b, prompt_len=LE, target_len=LT, num_seg=K if cfg.lisa else 0,
                      num_regions=R if cfg.proposals else 0, region_len=LR, **kw)


def xla_flops(fn, *args) -> float:
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


@functools.lru_cache(maxsize=None)
def _model(cfg):
  """(graphdef, abstract state): shapes are all that tracing and compiling need (eager init of the
  model would take ~40 s on 2 cores)."""
  return nnx.split(nnx.eval_shape(lambda: P.PixelLLM(cfg, rngs=nnx.Rngs(0))))


def extra_traced(cfg, b=2, train=False) -> float:
  """Contractions the analytic count leaves out on purpose (see flops.py): the prompt encoder's
  Fourier features (image PE per extractor / mask decoder call, 2 box corners per prompt; constants, no
  gradient) and the bilinear upsampling of masks to S×S (measured on the same op traced alone; ×2 in
  training: the gradient flows back through it to the mask decoder)."""
  f, g = cfg.prompt.prompt_dim // 2, cfg.grid
  pe = lambda cells: 2.0 * cells * 2 * f
  total = pe(g * g) + pe(2 * b)
  if cfg.proposals:
    total += pe(g * g) + pe(2 * b * R)
  m = 4 * cfg.sam_grid
  up = lambda n: (1 + train) * F.traced_flops(lambda x: jax.image.resize(x, (n, S, S), "bilinear"),
                                             jnp.zeros((n, m, m), jnp.float32))
  if cfg.lisa:
    total += pe(cfg.sam_grid ** 2) + up(b * K) + (pe(2 * b * K) if cfg.seg_box_prompt else 0)
  if cfg.refseg:
    total += pe(cfg.sam_grid ** 2) + pe(2 * b) + up(b)
  return total


# ----------------------------------------------------------------------------------------------------
# 1. Forward: analytic vs XLA and vs the traced program
# ----------------------------------------------------------------------------------------------------

def test_forward_matches_xla_cost_analysis():
  """Whole forward and each part: XLA's count (matmuls + elementwise) vs the analytic matmul count."""
  cfg = small_config()
  gd, st = _model(cfg)
  batch = make_batch(cfg)
  ana = analytic(cfg, train=False)
  xla = xla_flops(lambda s, x: nnx.merge(gd, s)(x), st, batch)
  print(f"\nforward, batch 2: XLA {xla:.4g}  analytic {ana['forward']:.4g}  "
        f"XLA/analytic {xla / ana['forward']:.3f}")
  assert abs(xla / ana["forward"] - 1) < 0.15

  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  img, box, ids, tgt = f32(2, S, S, 3), batch["prompt_box"], batch["prompt_ids"], batch["target_ids"]
  fused, vis = f32(2, cfg.grid, cfg.grid, cfg.feature_dim), f32(2, cfg.num_queries, cfg.t5.d_model)
  enc, mask = f32(2, cfg.num_queries + LE, cfg.t5.d_model), jnp.ones((2, cfg.num_queries + LE), bool)
  m = lambda s: nnx.merge(gd, s)
  parts = ana["parts"]
  checks = {
      "sam_encoder": (lambda s, x: m(s).sam_encoder(x), (img,), parts["sam_encoder"]),
      "eva": (lambda s, x: m(s).eva(x), (img,), parts["eva"]),
      "extractor": (lambda s, f: m(s).visual_tokens(f, box), (fused,), parts["extractor"]),
      "t5_encoder": (lambda s, v: m(s).t5.encode(ids, ids != 0, prefix_embeds=v)[0], (vis,),
                     parts["t5_encoder"]),
      "t5_decoder+lm_head": (lambda s, e: m(s).t5.decode(tgt, e, mask)[0], (enc,),
                             parts["t5_decoder"] + parts["lm_head"]),
  }
  for name, (fn, args, want) in checks.items():
    got = xla_flops(fn, st, *args)
    print(f"  {name:20s} XLA {got:.4g}  analytic {want:.4g}  XLA/analytic {got / want:.3f}")
    assert 1.0 <= got / want < 1.2, name  # never below: XLA adds elementwise work on top


def test_forward_matches_traced_program():
  """Matmul FLOPs of the traced forward equal the analytic count (plus the interpolation / Fourier
  terms it leaves out on purpose), for every optional path."""
  for kw in (dict(), dict(lisa=True, refseg=True, proposals=True),
             dict(refseg=True, proposals=True, spatial=3),
             dict(lisa=True, refseg=True, proposals=True, spatial=3, pointer=True, seg_box="predicted",
                  detail=8, refine=8)):
    cfg = small_config(**kw)
    gd, st = _model(cfg)
    batch = make_batch(cfg)
    traced = F.traced_flops(lambda s, x: nnx.merge(gd, s)(x), st, batch)
    ana = analytic(cfg, train=False)["forward"]
    extra = extra_traced(cfg)
    print(f"\n{kw or 'base'}: traced {traced:.6g}  analytic {ana:.6g} + left out {extra:.4g}")
    np.testing.assert_allclose(traced, ana + extra, rtol=1e-6)


def test_xla_counts_a_scanned_stack_once():
  """XLA's cost analysis counts a while-loop body once: scanned layers (EVA02, T5 with
  `scan_layers`) are undercounted by their depth — why the analytic count (or `traced_flops`),
  not `cost_analysis()`, gives MFU for the full-size configs."""
  cfg = small_config(scan=True)
  gd, st = nnx.split(nnx.eval_shape(lambda: eva_lib.Eva02(cfg.eva, rngs=nnx.Rngs(0))))
  img = jnp.zeros((2, S, S, 3), jnp.float32)
  fn = lambda s: nnx.merge(gd, s)(img)
  ana = analytic(cfg, train=False)["parts"]["eva"]
  traced, xla = F.traced_flops(fn, st), xla_flops(fn, st)
  print(f"\nscanned EVA02 (2 layers): XLA {xla:.4g}  traced {traced:.4g}  analytic {ana:.4g}")
  np.testing.assert_allclose(traced, ana, rtol=1e-9)
  assert xla < 0.8 * ana


# ----------------------------------------------------------------------------------------------------
# 2. Training multipliers: analytic total vs the traced gradient program
# ----------------------------------------------------------------------------------------------------

def _train_traced(cfg, keep) -> float:
  """Dot/conv FLOPs of value_and_grad of the real losses w.r.t. the parameters `keep` selects."""
  gd, state = _model(cfg)
  batch = make_batch(cfg)
  gd, trained, rest = nnx.split(nnx.merge(gd, state), keep, ...)

  def loss(t, r):
    m = nnx.merge(gd, t, r)
    return objective.compute_losses(cfg, objective.LossConfig(), m(batch, train=True), batch)[0]  # as the trainer

  return F.traced_flops(jax.value_and_grad(loss), trained, rest)


def test_train_step_matches_traced_gradient_program():
  """For several trainable sets, forward + backward matmul FLOPs of the real gradient program equal
  the analytic total: exactly the contractions backprop needs (no dW for frozen weights, no dx where
  nothing upstream trains)."""
  only = lambda *names: P.trainable_filter(tuple(rf"^{n}\." for n in names), lora=False)
  cases = {
      "default": (small_config(lisa=True, refseg=True, proposals=True), P.trainable_filter()),
      "eva frozen": (small_config(), P.trainable_filter(tuple(p for p in P.TRAINABLE if "eva" not in p))),
      "only loc_head": (small_config(), only("loc_head")),
      "only lora": (small_config(), nnx.LoRAParam),
      "all params": (small_config(lisa=True, refseg=True, proposals=True), nnx.Param),
      "pointer, [SEG] box": (small_config(lisa=True, spatial=3, pointer=True, seg_box="predicted"),
                             P.trainable_filter()),
      "pointer, loc_head": (small_config(spatial=3, pointer=True), only("loc_head")),
      "mask detail": (small_config(lisa=True, refseg=True, detail=8), P.trainable_filter()),
      "detail frozen": (small_config(lisa=True, refseg=True, detail=8), only("mask_decoder")),
      "box refine": (small_config(lisa=True, refseg=True, spatial=3, pointer=True, seg_box="predicted",
                                  refine=8), P.trainable_filter()),
      "refiner only": (small_config(refine=8), only("box_refiner")),
  }
  for name, (cfg, keep) in cases.items():
    ana = analytic(cfg, trainable=keep)
    traced = _train_traced(cfg, keep)
    extra = extra_traced(cfg, train=True)
    print(f"\n{name:14s} traced {traced:.6g}  analytic {ana['total']:.6g} + {extra:.3g}  "
          f"total/forward {ana['total'] / ana['forward']:.3f}")
    np.testing.assert_allclose(traced, ana["total"] + extra, rtol=1e-6, err_msg=name)


def test_multipliers():
  cfg = small_config(lisa=True, refseg=True, proposals=True)
  fwd = analytic(cfg, train=False)
  r = lambda res: {k: v / fwd["parts"][k] for k, v in res["parts"].items()}

  default = analytic(cfg)
  assert 1.0 < default["total"] / default["forward"] < 3.0
  assert default["forward"] == fwd["total"]
  d = r(default)
  assert d["sam_encoder"] == 1.0                     # frozen, fed by the image only
  eva = cfg.eva
  patch = 2.0 * eva.patch_size ** 2 * 3 * eva.width * 2 * cfg.eva_grid ** 2
  assert d["eva"] == 3.0 - patch / fwd["parts"]["eva"]  # trained; patch embedding ×2 (no pixel grad)
  assert 2.0 < d["t5_encoder"] < 2.2                 # frozen ×2 + LoRA ×3
  assert 1.9 < d["t5_decoder"] < 2.2                 # layer 0 self-attn kernels ×1 (token embeddings)
  assert d["lm_head"] == 2.0
  assert d["mask_decoder"] < 3.0 and d["mask_decoder"] > 2.5  # reads the frozen SAM map: some ×2
  assert d["seg_proj"] == 3.0

  loc = r(analytic(cfg, trainable={"loc_head"}))
  assert all(loc[p] == 1.0 for p in ("sam_encoder", "eva", "extractor", "t5_encoder", "t5_decoder",
                                     "lm_head", "seg_proj", "mask_decoder"))
  assert loc["loc_head"] == 3.0                      # its trained LayerNorm feeds even the first layer

  frozen = analytic(cfg, trainable=frozenset())
  assert frozen["total"] == frozen["forward"]
  every = r(analytic(cfg, trainable=nnx.Param))
  sam_patch = 2.0 * cfg.sam.patch_size ** 2 * 3 * cfg.sam.width * 2 * cfg.sam_grid ** 2
  assert every["sam_encoder"] == 3.0 - sam_patch / fwd["parts"]["sam_encoder"]
  assert every["eva"] == d["eva"] and all(every[p] == 3.0 for p in ("t5_encoder", "t5_decoder", "lm_head"))
  # EVA02 frozen too: nothing trainable upstream of the extractor, so its fused-map projection (on the
  # image and on each region) loses its input-gradient matmul; the rest is unchanged.
  no_eva = analytic(cfg, trainable={"extractor", "t5.encoder.lora", "t5.decoder.lora"})
  feat = 2.0 * cfg.feature_dim * cfg.extractor_width * cfg.grid ** 2 * 2 * (1 + R)
  assert r(no_eva)["eva"] == 1.0
  assert default["parts"]["extractor"] - no_eva["parts"]["extractor"] == feat

  # The filter is resolved to units from the real parameter paths.
  assert F.trained_units(cfg) == {"eva", "extractor", "loc_head", "seg_proj", "mask_decoder",
                                  "mask_adapter", "proposal_head", "t5.encoder.lora", "t5.decoder.lora"}
  # LISA masks scale with the [SEG] slots; SAM-only / EVA-only configs work.
  md = [F.step_flops(cfg, batch_size=2, prompt_len=LE, target_len=LT, num_seg=k,
                     train=False)["parts"]["mask_decoder"] for k in (0, 1, 2)]  # refseg: 1 run always
  assert md[2] - md[1] == md[1] - md[0] > 0 and md[0] > 0
  for c in (dataclasses.replace(small_config(), sam=None),
            dataclasses.replace(small_config(), eva=None)):
    res = analytic(c, trainable={"eva", "extractor", "t5.encoder.lora", "t5.decoder.lora"})
    assert res["total"] > res["forward"] > 0 and ("sam_encoder" in res["parts"]) == (c.sam is not None)


# ----------------------------------------------------------------------------------------------------
# 3. Full size
# ----------------------------------------------------------------------------------------------------

def test_full_size_sanity():
  cfg = recipes.build_model_config(recipes.model_config("xl"))
  kw = dict(prompt_len=16, target_len=128)
  fwd = F.step_flops(cfg, batch_size=1, train=False, **kw)
  big_f = F.step_flops(cfg, batch_size=256, train=False, **kw)
  # The default filter's units (resolving the filter on the xl paths takes ~8 s; test_multipliers
  # checks the resolution on the small config).
  big = F.step_flops(cfg, batch_size=256, trainable={"eva", "extractor", "loc_head", "t5.encoder.lora",
                                                     "t5.decoder.lora"}, **kw)
  print("\nxl, batch 256, prompt 16, target 128 (TFLOPs per step):")
  print(f"  {'part':12s} {'forward':>10s} {'train':>10s} {'×':>6s}")
  for k, v in big["parts"].items():
    print(f"  {k:12s} {big_f['parts'][k] / 1e12:10.2f} {v / 1e12:10.2f} {v / big_f['parts'][k]:6.3f}")
  print(f"  {'total':12s} {big['forward'] / 1e12:10.2f} {big['total'] / 1e12:10.2f} "
        f"{big['total'] / big['forward']:6.3f}")
  assert abs(big["forward"] / (256 * fwd["total"]) - 1) < 1e-3  # image PE projection: once per step

  # T5-XL ≈ 2 · weights · tokens from the real parameter paths: encoder matrices × 48 encoder tokens,
  # decoder matrices × 128 (cross-attention k/v × 48), LM head × 128; attention adds ~1%.
  le, lt = cfg.num_queries + 16, 128
  weights = 0.0
  t5 = nnx.eval_shape(lambda: t5_lib.T5(cfg.t5, rngs=nnx.Rngs(0)))
  for path, var in nnx.to_flat_state(nnx.state(t5, nnx.Param)):
    if path[0] == "token_embed" or "relpos" in path:  # gathers
      continue
    enc_side = path[0] == "encoder" or ("cross_attn" in path
                                        and path[path.index("cross_attn") + 1] in ("k", "v"))
    weights += 2.0 * int(np.prod(var.shape)) * (le if enc_side else lt) * (len(var.shape) > 1)
  t5 = fwd["parts"]["t5_encoder"] + fwd["parts"]["t5_decoder"] + fwd["parts"]["lm_head"]
  crude = 2 * 2.85e9 * (le + lt) / 2  # each token passes through about half of the 2.85B
  print(f"  T5-XL forward {t5:.4g}  2·weights·tokens {weights:.4g}  2·2.85e9·(Le+Lt)/2 {crude:.4g}")
  assert 1.0 < t5 / weights < 1.05
  assert 0.85 < t5 / crude < 1.15

  # SAM-H at 384 px: 576 patches; 28 windowed blocks run q/k/v/proj over the 28×28 padded map.
  sam = fwd["parts"]["sam_encoder"]
  print(f"  SAM-H forward {sam:.4g}  2·632e6·576 {2 * 632e6 * 576:.4g}")
  assert 1.05 < sam / (2 * 632e6 * 576) < 1.3
  eva = fwd["parts"]["eva"]
  assert 1.0 < eva / (2 * 304e6 * 730) < 1.2          # 27² patches + CLS, plus attention


def test_gella_forward_matches_traced_program():
  """GELLA's parts (Swin on the colormap, ResoBlend, entity decoder): traced matmul FLOPs of
  `features` + `entity_outputs` minus the image encoders' against the analytic "gella" part, which
  leaves out the bilinear resizes and Fourier PEs (a few %)."""
  from pixelground.models import gella as G
  from pixelground.models import swin as swin_lib

  e = 4
  gc = G.GellaConfig(colormap_size=2 * S, width=128, num_heads=4, mlp_dim=256, decoder_depth=2,
                     assoc_dim=128, swin=swin_lib.SwinConfig(embed_dim=64, depths=(2, 2, 2, 2),
                                                             num_heads=(2, 4, 4, 8), window_size=6))
  cfg = dataclasses.replace(small_config(), gella=gc, seg_token_id=5)
  gd, st = _model(cfg)
  batch = make_batch(cfg)
  batch["entity_masks"] = jnp.asarray(np.random.default_rng(0).random((2, e, S, S)) > 0.5)
  batch["entity_valid"] = jnp.ones((2, e), bool)

  def gella(s, x):
    m = nnx.merge(gd, s)
    return m.entity_outputs(m.features(x)[2])

  images = lambda s, x: nnx.merge(gd, s).image_features(x["image"], x["image_mask"])
  traced = F.traced_flops(gella, st, batch) - F.traced_flops(images, st, batch)
  ana = F.step_flops(cfg, batch_size=2, prompt_len=LE, target_len=LT, num_seg=K, num_entities=e,
                     train=False)["parts"]["gella"]
  assoc = 2.0 * 2 * (K * cfg.t5.d_model * 128 + e * 128 * 128 + K * e * 128)  # not traced here
  print(f"\ngella forward: traced {traced:.4g}  analytic {ana - assoc:.4g}  "
        f"ratio {traced / (ana - assoc):.3f}")
  assert 1.0 <= traced / (ana - assoc) < 1.06
