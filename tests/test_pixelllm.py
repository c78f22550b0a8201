"""PixelLLM (tiny config, CPU): overfitting 4 grounded-shapes examples per task, frozen weights untouched.

The data comes from the real pipeline: grounded-shapes raw files → the real TFDS builders → the task
converters (eval geometry, so the 4 examples are fixed). Text CE runs without label smoothing here: with
smoothing its floor is the smoothed target's entropy, which would hide how far the fit goes.
"""

import numpy as np
import optax
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from pixelground.data import tasks
from pixelground.data.tokenizer import load_tokenizer
from pixelground.models import pixelllm as P
from pixelground.models import extractor
from pixelground.models.heads import box_refiner, location
from pixelground.training import objective
from tfds_builders import build_grounded_shapes
from tfds_builders.localized_narratives import LocalizedNarratives
from tfds_builders.reasonseg import ReasonSeg
from tfds_builders.coco_panoptic import CocoPanoptic
from tfds_builders.refcoco import RefCoco

S = 64


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("gs")
  build_grounded_shapes.build_all(str(root / "raw"), str(root / "tfds"), num_train=4, num_validation=0,
                                  num_test=0, seed=1)
  tok = load_tokenizer("tiny")
  tcfg = tasks.TaskConfig(image_size=S, train=False, max_target_len=48, max_prompt_len=8, max_seg=2,
                          max_entities=2, max_regions=4, max_region_len=6)
  conv = tasks.Converters(tcfg, tok)
  ln = LocalizedNarratives(data_dir=str(root / "tfds"), config="grounded_shapes").as_data_source("train")
  rs = ReasonSeg(data_dir=str(root / "tfds"), config="grounded_shapes").as_data_source("train")
  ref = RefCoco(data_dir=str(root / "tfds"), config="grounded_shapes").as_data_source("train")
  from tfds_builders.coco_captions import CocoCaptions
  caps = CocoCaptions(data_dir=str(root / "tfds"), config="grounded_shapes").as_data_source("train")
  pan = CocoPanoptic(data_dir=str(root / "tfds"), config="grounded_shapes")
  names = {i: c["name"] for i, c in enumerate(pan.info.metadata["categories"])}
  pan_src = pan.as_data_source("train")

  def dense_example(ex):  # VG-style regions from the panoptic segments: box + category name
    xywh = np.asarray(ex["segments"]["bbox_xywh"])
    boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    return {"image": ex["image"], "boxes": boxes,
            "phrases": [names[int(c)].encode() for c in ex["segments"]["category"]]}

  stack = lambda rows: {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}
  return {"tok": tok,
          "ln": stack([conv.ln(ln[i], np.random.default_rng(i)) for i in range(4)]),
          "lisa": stack([conv.reason_seg(rs[i], np.random.default_rng(i)) for i in range(4)]),
          "refseg": stack([conv.referring(ref[i], np.random.default_rng(i)) for i in range(4)]),
          "caption": stack([conv.caption(caps[i], np.random.default_rng(i)) for i in range(4)]),
          "region_caption": stack([conv.region_caption(ref[i], np.random.default_rng(i))
                                   for i in range(4)]),
          "dense": stack([conv.dense_caption(dense_example(pan_src[i]), np.random.default_rng(i))
                          for i in range(4)])}


def _train(cfg, batch, steps, lr=3e-3, **loss):
  model = P.PixelLLM(cfg, rngs=nnx.Rngs(0))
  opt = nnx.Optimizer(model, optax.adam(lr), wrt=P.trainable_filter())
  loss_cfg = objective.LossConfig(label_smoothing=0.0, **loss)

  @nnx.jit
  def step(model, opt, batch):
    def loss_fn(m):
      return objective.compute_losses(cfg, loss_cfg, m(batch), batch)
    (_, terms), grads = nnx.value_and_grad(loss_fn, has_aux=True,
                                           argnums=nnx.DiffState(0, P.trainable_filter()))(model)
    opt.update(model, grads)
    return terms

  history = [step(model, opt, batch) for _ in range(steps)]
  return model, [{k: float(v) for k, v in t.items()} for t in history]


def _overfit(name, cfg, batch, steps, **loss):
  """Trains, prints, and checks what every task must show: finite terms, total loss down ≥ 80%.
  Returns (first, last) loss terms for the task's own checks."""
  model, hist = _train(cfg, batch, steps, **loss)
  first, last = hist[0], hist[-1]
  print(name, "first", first, "last", last)
  assert all(np.isfinite(v) for h in hist for v in h.values())
  assert last["total"] <= 0.2 * first["total"], (first, last)
  return model, first, last


def test_ln_caption_and_points_overfit(setup):
  tok = setup["tok"]
  cfg = P.tiny_config(vocab_size=tok.vocab_size)
  _, first, last = _overfit("LN", cfg, setup["ln"], 120)
  assert last["point_l1"] < 0.3 * first["point_l1"]
  assert last["token_accuracy"] > 0.9


def test_lisa_seg_overfit(setup):
  tok = setup["tok"]
  cfg = P.tiny_config(vocab_size=tok.vocab_size, seg_token_id=tok.token_id("[SEG]"), lisa=True)
  _, first, last = _overfit("LISA", cfg, setup["lisa"], 60)
  assert last["mask_dice"] < 0.7 * first["mask_dice"] and last["mask_bce"] < 0.2 * first["mask_bce"]


def test_referring_box_and_mask_overfit(setup):
  tok = setup["tok"]
  cfg = P.tiny_config(vocab_size=tok.vocab_size, refseg=True)
  batch = setup["refseg"]
  assert bool(batch["seg_valid"][:, 0].all()) and bool(batch["token_box_valid"].any(axis=1).all())
  _, first, last = _overfit("refseg", cfg, batch, 80)
  assert last["point_l1"] < 0.3 * first["point_l1"] and last["ref_focal"] < 0.5 * first["ref_focal"]


@pytest.mark.parametrize("pointer", [pytest.param(False, marks=pytest.mark.slow), True])
def test_spatial_tokens_with_attention_grounding_overfit(setup, pointer):
  """The demo's aids: k×k pooled image tokens after the queries, and the loss that makes an attention
  look inside the target box — head 0 of T5's last cross-attention, or with `pointer_head` the location
  head's own attention; both the box L1 and that loss must fall."""
  tok = setup["tok"]
  cfg = P.tiny_config(vocab_size=tok.vocab_size).replace(spatial_tokens=2, pointer_head=pointer)
  batch = setup["refseg"]
  model, first, last = _overfit("spatial", cfg, batch, 40, attention_grounding_weight=1.0)
  assert last["attention_grounding"] < 0.5 * first["attention_grounding"]
  assert last["point_l1"] < 0.3 * first["point_l1"]
  visual, attn = nnx.jit(lambda m, b: (
      m.visual_tokens(m.image_features(b["image"], b["image_mask"])[0], b["prompt_box"]),
      m(b)["spatial_attn"]))(model, batch)  # jitted: the eager forward alone takes ~a minute here
  assert visual.shape == (4, cfg.num_queries + 4, cfg.t5.d_model)
  assert attn.shape == (4, batch["target_ids"].shape[1], 4)
  with pytest.raises(ValueError, match="spatial_tokens 3 must divide the feature grid 4"):
    cfg.replace(spatial_tokens=3)


def test_refseg_train_box_target_prompts_with_the_ground_truth_box_in_training_only(setup):
  tok = setup["tok"]
  cfg = P.tiny_config(vocab_size=tok.vocab_size, refseg=True).replace(refseg_train_box="target")
  model = P.PixelLLM(cfg, rngs=nnx.Rngs(2))
  batch = setup["refseg"]
  enc, _, sam_emb, visual, _ = model.encode(batch)
  trained, evaluated = model(batch, train=True), model(batch)
  eos = np.asarray(batch["target_mask"]).sum(-1) - 1
  rows = np.arange(eos.shape[0])
  target = np.asarray(batch["token_boxes"])[rows, eos] * cfg.image_size
  predicted = np.asarray(evaluated["points"])[rows, eos]
  for out, box in ((trained, target), (evaluated, predicted)):
    want, _ = model.box_mask(jnp.asarray(box), visual, out["hidden"], sam_emb)
    np.testing.assert_allclose(np.asarray(out["ref_logits"]), np.asarray(want), atol=1e-4)
  assert not np.allclose(np.asarray(trained["ref_logits"]), np.asarray(evaluated["ref_logits"]))
  with pytest.raises(ValueError, match="refseg_train_box 'gt' must be"):
    cfg.replace(refseg_train_box="gt")


def test_train_box_noise_moves_the_target_prompt_only_with_an_rng(setup):
  """`train_box_noise`: the "target" box prompt moves by N(0, (noise × side)²) per coordinate when
  the trainer passes an rng; without one (and at evaluation) the box is exact."""
  tok = setup["tok"]
  cfg = P.tiny_config(vocab_size=tok.vocab_size, refseg=True).replace(refseg_train_box="target",
                                                                      train_box_noise=0.2)
  model = P.PixelLLM(cfg, rngs=nnx.Rngs(2))
  batch = setup["refseg"]
  _, _, sam, visual, _ = model.encode(batch)
  eos = np.asarray(batch["target_mask"]).sum(-1) - 1
  target = np.asarray(batch["token_boxes"])[np.arange(4), eos] * cfg.image_size
  rng = jax.random.key(7)
  exact, noisy = model(batch, train=True), model(batch, train=True, rng=rng)
  moved = P.jitter_boxes(jax.random.fold_in(rng, 1), jnp.asarray(np.asarray(batch["token_boxes"])
                                                                  * cfg.image_size), 0.2, S)
  moved = np.asarray(moved)[np.arange(4), eos]
  assert np.abs(moved - target).max() > 0.5
  for out, box in ((exact, target), (noisy, moved)):
    want, _ = model.box_mask(jnp.asarray(box), visual, out["hidden"], sam)
    np.testing.assert_allclose(np.asarray(out["ref_logits"]), np.asarray(want), atol=1e-4)
  # The noise: zero mean, std = noise × that axis's side, clipped to the image.
  box = jnp.asarray([[10.0, 20.0, 30.0, 60.0]])
  draws = np.asarray(P.jitter_boxes(jax.random.key(0), jnp.tile(box, (20000, 1)), 0.1, S))
  np.testing.assert_allclose(draws[:, :3].mean(0), [10, 20, 30], atol=0.1)
  np.testing.assert_allclose(draws[:, :3].std(0), [2.0, 4.0, 2.0], rtol=0.03)
  assert draws.min() >= 0 and draws.max() <= S and draws[:, 3].std() < 4.0  # y1 clipped at 64
  with pytest.raises(ValueError, match="train_box_noise 1.5 must be in"):
    cfg.replace(train_box_noise=1.5)


@pytest.mark.slow  # a demo-only from-scratch aid; ~60 s of training on 2 cores
def test_mask_detail_branch_reaches_the_masks_and_trains(setup):
  """`mask_detail`: a conv branch on the image at the mask decoder's output grid (4 × SAM's), read by
  the hypernetworks beside the upscaled embedding — it changes the masks, the mask losses reach its
  weights, and a decoder built for it refuses to run without it."""
  tok = setup["tok"]
  cfg = P.tiny_config(vocab_size=tok.vocab_size, refseg=True).replace(mask_detail=4)
  model = P.PixelLLM(cfg, rngs=nnx.Rngs(4))
  batch = setup["refseg"]
  assert model.mask_decoder.hypernets[0].proj_out.kernel.shape[-1] == cfg.prompt.prompt_dim // 8 + 4
  eos = jnp.asarray(np.asarray(batch["target_mask"]).sum(-1) - 1)

  @nnx.jit  # jitted: the eager forward alone takes ~a minute here
  def forward(m, b):
    _, _, sam, visual, _ = m.encode(b)
    out = m(b)
    box = jnp.take_along_axis(out["points"], eos[:, None, None], axis=1)[:, 0]
    blank = P.MaskFeatures(sam.emb, jnp.zeros_like(sam.pixels))  # a constant detail map
    return m.mask_detail(sam.pixels), out["ref_logits"], m.box_mask(box, visual, out["hidden"], blank)[0]

  detail, ref, flat = forward(model, batch)
  assert detail.shape == (4, 4 * cfg.sam_grid, 4 * cfg.sam_grid, 4)
  assert np.abs(np.asarray(flat) - np.asarray(ref)).max() > 1e-3

  def loss(m):
    return objective.compute_losses(cfg, objective.LossConfig(), m(batch, train=True), batch)[0]

  grads = nnx.jit(nnx.grad(loss, argnums=nnx.DiffState(0, P.trainable_filter())))(model)
  g = jax.tree.leaves(grads["mask_detail"])
  assert len(g) == 4 and all(float(jnp.abs(v).max()) > 0 for v in g)
  emb = jnp.zeros((4, cfg.sam_grid, cfg.sam_grid, cfg.prompt.prompt_dim))
  with pytest.raises(ValueError, match="detail map must be"):
    model.mask_decoder(emb, model.prompt_encoder.pe.dense_pe(emb.shape[1:3]),
                       jnp.zeros((4, 2, cfg.prompt.prompt_dim)), jnp.zeros_like(emb))
  with pytest.raises(ValueError, match="mask_detail 4 needs the SAM encoder"):
    P.tiny_config(vocab_size=tok.vocab_size, use_sam=False).replace(mask_detail=4)


def test_bilinear_sample_and_the_box_refiner_crop():
  """`bilinear_sample` equals a direct numpy bilinear interpolation (pixel centres at i + 0.5, zero
  off the image); the refiner's crop samples the box grown `GROW`× (each side ≥ `MIN_SIDE`)."""
  rng = np.random.default_rng(0)
  img = rng.normal(size=(2, 7, 9, 3)).astype(np.float32)
  x, y = rng.uniform(-2, 11, (2, 50)).astype(np.float32), rng.uniform(-2, 9, (2, 50)).astype(np.float32)
  pad = np.pad(img, ((0, 0), (1, 1), (1, 1), (0, 0)))  # index + 1: one zero pixel all round

  def ref(b, px, py):
    fx, fy = px - 0.5 + 1, py - 0.5 + 1
    x0, y0 = int(np.floor(fx)), int(np.floor(fy))
    out = np.zeros(3)
    for yy in (y0, y0 + 1):
      for xx in (x0, x0 + 1):
        if 0 <= yy < pad.shape[1] and 0 <= xx < pad.shape[2]:
          out += pad[b, yy, xx] * (1 - abs(fx - xx)) * (1 - abs(fy - yy))
    return out

  want = np.asarray([[ref(b, x[b, i], y[b, i]) for i in range(50)] for b in range(2)])
  np.testing.assert_allclose(np.asarray(box_refiner.bilinear_sample(jnp.asarray(img), x, y)), want, atol=1e-5)
  # A crop of the image whose pixels hold their own centre coordinates reads back the sampling grid.
  tok = load_tokenizer("tiny")
  cfg = P.tiny_config(vocab_size=tok.vocab_size).replace(box_refine=8)
  refiner = box_refiner.BoxRefiner(cfg, rngs=nnx.Rngs(0))
  c = np.arange(S, dtype=np.float32) + 0.5
  coords = np.stack([*np.meshgrid(c, c, indexing="xy"), np.zeros((S, S), np.float32)], -1)[None]
  box = jnp.asarray([[30.0, 20.0, 20.0, 40.0], [10.0, 10.0, 11.0, 12.0]])  # flipped x; tiny
  crop, half = refiner.crop(box, jnp.asarray(np.repeat(coords, 2, 0)))
  np.testing.assert_allclose(np.asarray(half), [[8.0, 16.0], [2.0, 2.0]])  # 1.6 × 10 / 2; MIN_SIDE
  u = (np.arange(8) + 0.5) / 8 * 2 - 1
  np.testing.assert_allclose(np.asarray(crop[0, 3, :, 0]), 25 + 8 * u, atol=1e-4)
  np.testing.assert_allclose(np.asarray(crop[0, :, 5, 1]), 30 + 16 * u, atol=1e-4)
  np.testing.assert_allclose(np.asarray(crop[1, 0, :, 0]), 10.5 + 2 * u, atol=1e-4)
  with pytest.raises(ValueError, match="box_refine 6 must be 0 or a multiple of 4"):
    cfg.replace(box_refine=6)


@pytest.mark.slow  # a demo-only from-scratch aid; ~60 s of training on 2 cores
def test_box_refiner_learns_and_prompts_both_masks(setup):
  """`box_refine`: the referring box (and the `[SEG]` box) is the refiner's output — the identity of
  the (ordered) head box at initialisation; trained alone on the head's boxes it lands far closer to
  the target than they are; the referring mask is prompted with the refined box (in "target" training:
  with the refined jittered ground truth)."""
  tok = setup["tok"]
  cfg = P.tiny_config(vocab_size=tok.vocab_size, refseg=True).replace(
      box_refine=16, refseg_train_box="target")
  model = P.PixelLLM(cfg, rngs=nnx.Rngs(5))
  batch = setup["refseg"]
  eos = np.asarray(batch["target_mask"]).sum(-1) - 1
  target = np.asarray(batch["token_boxes"])[np.arange(4), eos] * cfg.image_size
  forward = nnx.jit(lambda m, b: m(b, heads=P.TASK_HEADS["referring"]))
  out = forward(model, batch)
  head = np.asarray(out["points"])[np.arange(4), eos]
  ordered = np.concatenate([np.minimum(head[:, :2], head[:, 2:]), np.maximum(head[:, :2], head[:, 2:])], -1)
  np.testing.assert_allclose(np.asarray(P.referring_box(out, batch)), ordered, atol=1e-4)

  keep = P.trainable_filter((r"^box_refiner\.",), lora=False)
  opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=keep)
  loss_cfg = objective.LossConfig(box_refine_weight=1.0)

  @nnx.jit
  def step(m, opt):
    def loss_fn(m):
      o = m(batch, heads=P.TASK_HEADS["referring"])  # eval mode: the refiner sees the head's boxes
      return objective.compute_losses(cfg, loss_cfg, o, batch)[1]["box_refine_l1"]
    l, g = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, keep))(m)
    opt.update(m, g)
    return l

  losses = [float(step(model, opt)) for _ in range(60)]
  out = forward(model, batch)
  refined = np.asarray(out["object_box"])
  head_l1, refined_l1 = np.abs(ordered - target).sum(-1).mean(), np.abs(refined - target).sum(-1).mean()
  print("head L1", head_l1, "refined L1", refined_l1, "loss", losses[0], losses[-1])
  assert refined_l1 < 0.3 * head_l1 and losses[-1] < 0.3 * losses[0]
  np.testing.assert_allclose(np.asarray(out["points"])[np.arange(4), eos], head, atol=1e-4)  # head untouched

  @nnx.jit
  def masks(m, b):
    trained = m(b, train=True, heads=P.TASK_HEADS["referring"])
    evaluated = m(b, heads=P.TASK_HEADS["referring"])
    _, _, sam, visual, _ = m.encode(b)
    return (trained["ref_logits"], m.box_mask(trained["object_box_from_target"], visual, trained["hidden"], sam)[0],
            m.box_mask(m.box_refiner(jnp.asarray(target), jax.lax.stop_gradient(
                trained["hidden"][jnp.arange(4), eos]), sam.pixels), visual, trained["hidden"], sam)[0],
            evaluated["ref_logits"], m.box_mask(evaluated["object_box"], visual, evaluated["hidden"], sam)[0])

  t_logits, t_want, t_manual, e_logits, e_want = masks(model, batch)
  np.testing.assert_allclose(np.asarray(t_logits), np.asarray(t_want), atol=1e-4)
  np.testing.assert_allclose(np.asarray(t_want), np.asarray(t_manual), atol=1e-4)
  np.testing.assert_allclose(np.asarray(e_logits), np.asarray(e_want), atol=1e-4)


def test_seg_box_prompt_adds_the_box_at_the_seg_token(setup):
  """`seg_box_prompt`: each `[SEG]` mask is also prompted with a box — in training ("target") the
  ground-truth box where the row has one, otherwise (and always at evaluation) the location head's box
  at that `[SEG]` step."""
  tok = setup["tok"]
  cfg = P.tiny_config(vocab_size=tok.vocab_size, lisa=True, seg_token_id=tok.token_id("[SEG]")
                      ).replace(seg_box_prompt="target")
  model = P.PixelLLM(cfg, rngs=nnx.Rngs(3))
  batch = dict(setup["lisa"])
  pos = np.asarray(batch["seg_positions"])
  lt = batch["target_ids"].shape[1]
  boxes, valid = np.zeros((4, lt, 4), np.float32), np.zeros((4, lt), bool)
  for i in range(2):  # rows 0-1 carry their first [SEG]'s box, rows 2-3 none
    boxes[i, pos[i, 0]], valid[i, pos[i, 0]] = [0.1, 0.2, 0.5, 0.6], True
  batch |= {"token_boxes": jnp.asarray(boxes), "token_box_valid": jnp.asarray(valid)}
  _, _, sam_emb, _, _ = model.encode(batch)
  trained, evaluated = model(batch, train=True), model(batch)
  mixed = np.where(valid[..., None], boxes * cfg.image_size, np.asarray(evaluated["points"]))
  for out, want_boxes in ((trained, mixed), (evaluated, np.asarray(evaluated["points"]))):
    want, _ = model.seg_masks(out["hidden"], batch["seg_positions"], sam_emb,
                              boxes=jnp.asarray(want_boxes))
    np.testing.assert_allclose(np.asarray(out["seg_logits"]), np.asarray(want), atol=1e-4)
  t, e = np.asarray(trained["seg_logits"]), np.asarray(evaluated["seg_logits"])
  assert not np.allclose(t[:2, 0], e[:2, 0]) and np.allclose(t[2:], e[2:], atol=1e-5)
  with pytest.raises(ValueError, match="needs the per-token boxes"):
    model.seg_masks(evaluated["hidden"], batch["seg_positions"], sam_emb)
  with pytest.raises(ValueError, match="seg_box_prompt 'gt' must be"):
    cfg.replace(seg_box_prompt="gt")


def test_pointer_head_places_points_around_the_attended_centre(setup):
  """`pointer_head`: a token's 2 points are the attention-weighted cell centre (pixels of the S×S input)
  plus the MLP's output × half the unpadded size; the grounding loss reads that same attention."""
  tok = setup["tok"]
  cfg = P.tiny_config(vocab_size=tok.vocab_size).replace(spatial_tokens=2, pointer_head=True)
  model = P.PixelLLM(cfg, rngs=nnx.Rngs(3))
  batch = dict(setup["refseg"])
  s = cfg.image_size
  mask = np.zeros((4, s, s), bool)
  mask[:, :48, :40] = True  # unpadded 40 wide × 48 high
  batch["image_mask"] = jnp.asarray(mask)
  last = model.loc_head.layers[-1]
  last.kernel.set_value(jnp.zeros_like(last.kernel.get_value()))
  last.bias.set_value(jnp.asarray([0.5, 0.0, -0.25, 1.0], jnp.float32))
  out = model(batch)
  probs = np.asarray(out["spatial_attn"], np.float64)  # (B, T, 4) over the 2×2 grid
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
  centres = np.array([[-0.5, -0.5], [0.5, -0.5], [-0.5, 0.5], [0.5, 0.5]])  # (x, y), row-major
  c = (probs @ centres + 1) / 2 * s  # (B, T, 2) pixels
  want = np.concatenate([c, c], -1) + np.array([0.5 * 20, 0.0, -0.25 * 20, 1.0 * 24])
  np.testing.assert_allclose(np.asarray(out["points"]), want, rtol=1e-4, atol=1e-3)
  with pytest.raises(ValueError, match="pointer_head needs the visual tokens"):
    model.points(out["hidden"], batch["image_mask"])
  with pytest.raises(ValueError, match="pointer_head=True needs spatial_tokens"):
    cfg.replace(spatial_tokens=0)


def test_pointer_window_points_at_the_strongest_cells(setup):
  """`pointer_window` r: an object box at evaluation (here the referring box at the EOS) takes the
  pointer's centre from its attention within the (2r + 1)² cells around the argmax (renormalised);
  per-token (trace) points, training and the grounding loss keep the full attention."""
  p = np.zeros((1, 16), np.float32)
  p[0, [0, 1, 4, 15]] = [0.3, 0.1, 0.2, 0.4]  # a 4×4 grid: a spread object top-left, a peak at (3, 3)
  np.testing.assert_allclose(np.asarray(location.local_window(jnp.asarray(p), 4, 1))[0, 15], 1.0)
  p[0, 15] = 0.25
  want = np.zeros(16)
  want[[0, 1, 4]] = np.array([0.3, 0.1, 0.2]) / 0.6  # the argmax (0, 0) at the corner: a 2×2 window
  np.testing.assert_allclose(np.asarray(location.local_window(jnp.asarray(p), 4, 1))[0], want, rtol=1e-6)
  tok = setup["tok"]
  cfg = P.tiny_config(vocab_size=tok.vocab_size).replace(spatial_tokens=4, pointer_head=True,
                                                         pointer_window=1)
  model = P.PixelLLM(cfg, rngs=nnx.Rngs(3))
  last = model.loc_head.layers[-1]
  last.kernel.set_value(jnp.zeros_like(last.kernel.get_value()))
  last.bias.set_value(jnp.zeros_like(last.bias.get_value()))
  batch = setup["refseg"]
  heads = P.TASK_HEADS["referring"]
  out, trained = nnx.jit(lambda m, b: (m(b, heads=heads), m(b, heads=heads, train=True)))(model, batch)
  probs = np.asarray(out["spatial_attn"], np.float64)  # (B, T, 16), the full attention
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
  full = (probs @ extractor.cell_centres(4) + 1) / 2 * S
  np.testing.assert_allclose(np.asarray(out["points"]), np.concatenate([full, full], -1), atol=1e-3)
  eos = np.asarray(batch["target_mask"]).sum(-1) - 1
  local = np.asarray(location.local_window(jnp.asarray(probs[np.arange(4), eos]), 4, 1))
  c = (local @ extractor.cell_centres(4) + 1) / 2 * S
  np.testing.assert_allclose(np.asarray(out["object_box"]), np.concatenate([c, c], -1), atol=1e-3)
  np.testing.assert_allclose(np.asarray(P.referring_box(out, batch)), np.asarray(out["object_box"]))
  assert np.abs(full[np.arange(4), eos] - c).max() > 0.5  # not the global centre
  f = full[np.arange(4), eos]
  np.testing.assert_allclose(np.asarray(trained["object_box"]), np.concatenate([f, f], -1), atol=1e-3)
  with pytest.raises(ValueError, match="pointer_window 1 needs pointer_head"):
    cfg.replace(pointer_head=False)


def test_dense_caption_proposals_overfit(setup):
  tok = setup["tok"]
  cfg = P.tiny_config(vocab_size=tok.vocab_size, proposals=True)
  batch = {k: v for k, v in setup["dense"].items() if k not in ("target_ids", "target_mask")}
  batch["target_ids"] = jnp.zeros((4, 4), jnp.int32)  # no main-text target for this task
  batch["target_mask"] = jnp.zeros((4, 4), bool)
  assert int(batch["region_valid"].sum()) >= 8
  model, first, last = _overfit("dense", cfg, batch, 80)
  from pixelground.models.heads import proposals
  fused, _ = model.image_features(batch["image"], batch["image_mask"])
  heat, ltrb = model.proposal_head(fused)
  boxes, scores = proposals.top_proposals(heat, ltrb, 4)
  assert boxes.shape == (4, 4, 4) and scores.shape == (4, 4)
  assert np.all(np.diff(np.asarray(scores), axis=1) <= 0)


@pytest.mark.slow
@pytest.mark.parametrize("task", ["caption", "region_caption"])
def test_caption_tasks_overfit(setup, task):
  tok = setup["tok"]
  cfg = P.tiny_config(vocab_size=tok.vocab_size)
  _overfit(task, cfg, setup[task], 60)


def test_frozen_weights_bit_identical_after_10_steps(setup):
  tok = setup["tok"]
  cfg = P.tiny_config(vocab_size=tok.vocab_size)
  model = P.PixelLLM(cfg, rngs=nnx.Rngs(0))
  keep = P.trainable_filter()
  before = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=keep)
  # Frozen weights carry no optimizer state.
  opt_leaves = jax.tree.leaves(nnx.state(opt.opt_state))
  n_trainable = sum(v.get_value().size for _, v in nnx.to_flat_state(nnx.state(model, keep)))
  assert sum(x.size for x in opt_leaves if hasattr(x, "size") and x.ndim > 0) == 2 * n_trainable

  @nnx.jit
  def step(model, opt, batch):
    grads = nnx.grad(lambda m: objective.compute_losses(cfg, objective.LossConfig(), m(batch), batch)[0],
                     argnums=nnx.DiffState(0, keep))(model)
    opt.update(model, grads)

  for _ in range(10):
    step(model, opt, setup["ln"])
  trained = {p for p, _ in nnx.to_flat_state(nnx.state(model, keep))}
  changed = 0
  for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    now = np.asarray(v.get_value())
    if p in trained:
      changed += int(not np.array_equal(now, before[p]))
    else:
      assert np.array_equal(now, before[p]), p  # frozen: bit-identical
  assert changed > 0
  frozen_names = {".".join(map(str, p))[:12] for p in before if p not in trained}
  assert any(n.startswith("sam_encoder") for n in frozen_names)
  assert any(n.startswith("t5") for n in frozen_names)


def test_config_errors():
  with pytest.raises(ValueError, match="at least one image encoder"):
    P.tiny_config(vocab_size=128, use_sam=False, use_eva=False)
  with pytest.raises(ValueError, match="lisa=True needs the SAM encoder"):
    P.tiny_config(vocab_size=128, use_sam=False, lisa=True, seg_token_id=3)
  cfg = P.tiny_config(vocab_size=128, use_sam=False)  # EVA02-only variant
  model = P.PixelLLM(cfg, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"expects images \(B, 64, 64, 3\)"):
    model.image_features(jnp.zeros((1, 32, 32, 3)), jnp.ones((1, 32, 32), bool))


@pytest.mark.slow  # ~30 s each on 2 cores; the default run stays under 15 min
@pytest.mark.parametrize("encoders", [dict(use_eva=False), dict(use_sam=False)])
def test_single_encoder_variants(encoders):
  """SAM-only (fused = SAM map, grid S/16) and EVA02-only (grid S//14) models run end to end."""
  cfg = P.tiny_config(vocab_size=128, **encoders)
  model = P.PixelLLM(cfg, rngs=nnx.Rngs(0))
  batch = {"image": jnp.zeros((1, S, S, 3), jnp.uint8), "image_mask": jnp.ones((1, S, S), bool),
           "prompt_box": jnp.asarray([[0.0, 0.0, 1.0, 1.0]]), "prompt_ids": jnp.ones((1, 4), jnp.int32),
           "target_ids": jnp.ones((1, 5), jnp.int32)}
  out = model(batch)
  assert out["logits"].shape == (1, 5, 128) and out["points"].shape == (1, 5, 4)
  assert cfg.feature_dim == 32 and np.isfinite(np.asarray(out["points"])).all()
