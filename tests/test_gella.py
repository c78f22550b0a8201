"""GELLA parts (pixelground.models.gella inside PixelLLM): colormap encoding, the association loss,
gradients through both branches, 8-device sharding against one device, and an 8-example overfit."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from pixelground.models import gella as G
from pixelground.models import pixelllm as P
from pixelground.parallel import sharding
from pixelground.training import losses as L
from pixelground.training import objective

S, SEG, VOCAB = 64, 99, 100


def _label_map(rng, n, size=S):
  """A (size, size) label map of n disjoint rectangles (labels 1..n, 0 = background) → (n, size, size)."""
  lab = np.zeros((size, size), int)
  for i in range(1, n + 1):
    x0, y0 = rng.integers(0, size - 12, 2)
    w, h = rng.integers(6, 20, 2)
    lab[y0:y0 + h, x0:x0 + w] = i
  masks = np.stack([lab == i for i in range(1, n + 1)])
  return masks[masks.any(axis=(1, 2))]


def test_palette_distinct_and_black_free():
  pal = G.palette(6)
  assert pal.shape == (215, 3) and len({tuple(c) for c in pal}) == 215 and not np.any(np.all(pal == 0, 1))


@pytest.mark.parametrize("size", [S, 2 * S])
def test_colormap_regions_recoverable(size):
  rng = np.random.default_rng(0)
  masks = np.zeros((2, 7, S, S), bool)
  counts = []
  for b in range(2):
    m = _label_map(rng, 7)
    masks[b, : len(m)] = m
    counts.append(len(m))
  valid = np.arange(7)[None] < np.asarray(counts)[:, None]
  cfg = G.tiny_gella(S).replace(colormap_size=size)
  cmap, idx = G.colormap(jnp.asarray(masks), jnp.asarray(valid), cfg, jax.random.key(3))
  cmap, idx = np.asarray(cmap), np.asarray(idx)
  assert cmap.shape == (2, size, size, 3)
  pal = G.palette(cfg.palette_levels)
  rep = size // S
  for b in range(2):
    assert len(set(idx[b].tolist())) == 7  # distinct colours in every example
    for e in range(counts[b]):
      region = np.all(cmap[b] == pal[idx[b, e]], axis=-1)
      want = np.repeat(np.repeat(masks[b, e], rep, 0), rep, 1)
      np.testing.assert_array_equal(region, want)
    background = ~np.repeat(np.repeat(masks[b].any(0), rep, 0), rep, 1)
    assert np.all(cmap[b][background] == 0)
  # Colours are random per example and per key, fixed for a fixed key.
  assert not np.array_equal(idx[0], idx[1])
  _, again = G.colormap(jnp.asarray(masks), jnp.asarray(valid), cfg, jax.random.key(3))
  _, other = G.colormap(jnp.asarray(masks), jnp.asarray(valid), cfg, jax.random.key(4))
  assert np.array_equal(np.asarray(again), idx) and not np.array_equal(np.asarray(other), idx)


def test_colormap_smaller_entity_on_top():
  masks = np.zeros((1, 2, S, S), bool)
  masks[0, 0, 10:50, 10:50] = True   # big
  masks[0, 1, 20:30, 20:30] = True   # small, inside it
  cfg = G.tiny_gella(S).replace(colormap_size=S)
  cmap, idx = G.colormap(jnp.asarray(masks), jnp.ones((1, 2), bool), cfg, jax.random.key(0))
  pal = G.palette(cfg.palette_levels)
  cmap = np.asarray(cmap)[0]
  assert np.all(cmap[25, 25] == pal[int(idx[0, 1])]) and np.all(cmap[12, 12] == pal[int(idx[0, 0])])


def test_too_many_entities_is_a_clear_error():
  with pytest.raises(ValueError, match="exceed the 215 distinct colormap colours"):
    G.entity_colours(jax.random.key(0), 1, 500, 6)


def test_phrase_states_average_each_phrase():
  # Target "a b [SEG] c d e [SEG]" (decoder input at step t = target[t - 1], BOS at 0): the [SEG]s sit
  # at 2 and 6; phrase 0 = the steps reading a, b (1, 2), phrase 1 = those reading c, d, e (4..6; step 3
  # reads the first [SEG]); a padded slot (position 0 after a real one) is zeros.
  hidden = jnp.arange(8, dtype=jnp.float32)[None, :, None] * jnp.ones((1, 1, 3))
  got = G.phrase_states(hidden, jnp.asarray([[2, 6, 0]]))
  np.testing.assert_allclose(got[0, :, 0], [1.5, 5.0, 0.0])


def test_mask_stem_tells_shapes_and_sizes_apart():
  cfg = dataclasses.replace(G.tiny_gella(32), mask_stem=8)
  dec = G.EntityDecoder(cfg, 4, rngs=nnx.Rngs(0))
  h = cfg.pixel_grid
  y, x = np.mgrid[:h, :h]
  square = (abs(y - 8) <= 4) & (abs(x - 8) <= 4)
  disk = (y - 20) ** 2 + (x - 20) ** 2 <= 4.5 ** 2
  big = (abs(y - 16) <= 8) & (abs(x - 16) <= 8)
  w = jnp.asarray(np.stack([square, disk, big])[None].astype(np.float32))
  f = np.asarray(dec._mask_stem(w))[0]
  assert f.shape == (3, cfg.width)
  assert min(np.abs(f[0] - f[1]).max(), np.abs(f[0] - f[2]).max()) > 1e-3


def test_shape_crops_keep_the_outline_whatever_the_size():
  # A small and a large square crop alike, a disk does not; an empty slot crops to zeros.
  y, x = np.mgrid[:64, :64] + 0.5
  small = (abs(y - 10) <= 5) & (abs(x - 12) <= 5)
  large = (abs(y - 40) <= 14) & (abs(x - 40) <= 14)
  disk = (y - 30) ** 2 + (x - 20) ** 2 <= 9 ** 2
  masks = jnp.asarray(np.stack([small, large, disk, np.zeros_like(disk)])[None])
  crops = np.asarray(G.shape_crops(masks, 8))[0]
  assert crops.shape == (4, 8, 8)
  assert np.abs(crops[0] - crops[1]).max() < 0.02
  assert np.abs(crops[0] - crops[2]).max() > 0.5
  np.testing.assert_allclose(crops[0, 1:-1, 1:-1], 1.0, atol=1e-5)  # the inside is the mask
  assert crops[3].max() == 0.0
  # The codes: (B, E, D), zero for an invalid slot; painted codes sum back to ≈ area × code (the
  # antialiased resize renormalises its filter at the border).
  cfg = dataclasses.replace(G.tiny_gella(64), shape_stem=8, shape_blend=True)
  gella = G.Gella(cfg, 16, 24, 4, rngs=nnx.Rngs(0))
  valid = jnp.asarray([[True, True, True, False]])
  codes = gella.shape_codes(masks, valid)
  assert codes.shape == (1, 4, cfg.width) and float(jnp.abs(codes[0, 3]).max()) == 0.0
  assert float(jnp.abs(codes[0, 0] - codes[0, 2]).max()) > 1e-3
  painted = gella.paint(codes, masks, (8, 8))
  area = np.asarray(masks, np.float32).sum((2, 3))[0] / 64.0  # in 8×8-cell units
  np.testing.assert_allclose(np.asarray(painted[0].sum((0, 1))), np.asarray(area @ codes[0]),
                             rtol=0.03, atol=0.05)
  fused = jnp.ones((1, 8, 8, 16))  # the blend's Linear starts at zero: the fused map is unchanged
  np.testing.assert_allclose(np.asarray(gella.blend_shapes(fused, codes, masks)), 1.0)


def test_association_loss_equals_the_formula():
  nouns = np.asarray([[[1.0, 0.5], [-1.0, 2.0]]], np.float32)                 # (1, K=2, A=2)
  ents = np.asarray([[[0.5, 1.0], [2.0, -1.0], [0.0, 0.0]]], np.float32)       # (1, E=3, A=2)
  gt = np.asarray([[[1, 1, 0], [0, 0, 1]]], bool)
  noun_valid = np.asarray([[True, True]])
  entity_valid = np.asarray([[True, True, False]])                            # entity 2 is padding
  logits = [[1.0, 1.5, 0.0], [1.5, -4.0, 0.0]]                                # noun · entity by hand
  terms = []
  for k in range(2):
    for e in range(2):
      x, t = logits[k][e], float(gt[0, k, e])
      p = 1 / (1 + math.exp(-x))
      terms.append(-(t * math.log(p) + (1 - t) * math.log(1 - p)))
  want = sum(terms) / len(terms)
  got = L.association_bce(nouns, ents, gt, noun_valid, entity_valid)
  assert abs(float(got) - want) < 1e-6
  np.testing.assert_allclose(np.asarray(G.association_logits(jnp.asarray(nouns), jnp.asarray(ents)))[0, :, :2],
                             np.asarray(logits)[:, :2], atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------

def _batch(rng, b=2, k=4, e=6, entities=None, assoc=None):
  """A narrative-grounding batch: images with coloured rectangles (the entities), K noun slots each
  followed by `[SEG]`, noun j owning `assoc[j]`."""
  t = 16
  masks = np.zeros((b, e, S, S), bool)
  valid = np.zeros((b, e), bool)
  images = np.zeros((b, S, S, 3), np.uint8)
  for i in range(b):
    m = entities[i] if entities is not None else _label_map(rng, e)
    masks[i, : len(m)], valid[i, : len(m)] = m, True
    for j, mj in enumerate(m):
      images[i][mj] = (np.asarray([40 + 30 * j, 200 - 25 * j, 80 + 20 * (j % 3)])).astype(np.uint8)
  if assoc is None:
    assoc = np.zeros((b, k, e), bool)
    for i in range(b):
      n = int(valid[i].sum())
      for j in range(k):
        assoc[i, j, j % n] = True
        if j + k < n:
          assoc[i, j, j + k] = True  # one noun, two entities
  target = np.zeros((b, t), np.int32)
  pos = np.zeros((b, k), np.int32)
  for i in range(b):
    ids = []
    for j in range(k):
      ids.append(10 + j + 4 * i)
      pos[i, j] = len(ids)
      ids.append(SEG)
    ids.append(1)
    target[i, : len(ids)] = ids
  return dict(image=jnp.asarray(images), image_mask=jnp.ones((b, S, S), bool),
              prompt_box=jnp.tile(jnp.asarray([0, 0, 1, 1.0]), (b, 1)),
              prompt_ids=jnp.asarray(rng.integers(4, VOCAB - 1, (b, 6)), jnp.int32),
              target_ids=jnp.asarray(target), target_mask=jnp.asarray(target != 0),
              seg_positions=jnp.asarray(pos), seg_valid=jnp.ones((b, k), bool),
              seg_masks=jnp.zeros((b, k, S, S), bool), entity_masks=jnp.asarray(masks),
              entity_valid=jnp.asarray(valid), association=jnp.asarray(assoc))


def _model(seed=0):
  cfg = P.tiny_config(vocab_size=VOCAB, seg_token_id=SEG, gella=True)
  return cfg, P.PixelLLM(cfg, rngs=nnx.Rngs(seed))


def _loss(model, batch, rng=None):
  out = model(batch, heads=P.TASK_HEADS["narrative_grounding"], train=True, rng=rng)
  return objective.compute_losses(model.cfg, objective.LossConfig(), out, batch)


def test_gradients_reach_both_branches():
  cfg, model = _model()
  batch = _batch(np.random.default_rng(0))
  # Jitted: eager autodiff through the whole model takes minutes on 2 cores.
  grads = nnx.jit(nnx.grad(lambda m: _loss(m, batch, jax.random.key(0))[0],
                           argnums=nnx.DiffState(0, nnx.Param)))(model)
  flat = {".".join(map(str, k)): float(jnp.sum(jnp.abs(v[...]))) for k, v in nnx.to_flat_state(grads)}
  norm = lambda prefix: sum(v for k, v in flat.items() if k.startswith(prefix))
  assert norm("gella.colormap_encoder.") > 0   # colormap branch
  assert norm("eva.") > 0 and norm("extractor.") > 0  # image branch
  assert norm("gella.association.noun_fc.") > 0 and norm("gella.association.entity_fc.") > 0
  assert norm("gella.entity_decoder.") > 0 and norm("gella.resoblend.") > 0
  assert norm("sam_encoder.") > 0
  # The association term alone reaches T5 (its `[SEG]` states) and the entity decoder.
  def assoc_only(m):
    out = m(batch, heads=("gella",), train=True)
    return L.association_bce(out["noun_proj"], out["entity_proj"], batch["association"],
                             batch["seg_valid"], batch["entity_valid"])
  g2 = nnx.jit(nnx.grad(assoc_only, argnums=nnx.DiffState(0, nnx.LoRAParam)))(model)
  assert sum(float(jnp.sum(jnp.abs(v[...]))) for _, v in nnx.to_flat_state(g2)) > 0


@pytest.mark.slow
def test_detach_sam_keeps_gella_out_of_sam():
  # `detach_sam`: the same forward pass, but SAM's encoder gets nothing from GELLA's losses.
  cfg, model = _model()
  batch = _batch(np.random.default_rng(0))
  dcfg = dataclasses.replace(cfg, gella=dataclasses.replace(cfg.gella, detach_sam=True))
  detached = P.PixelLLM(dcfg, rngs=nnx.Rngs(0))
  loss_fn = lambda m: _loss(m, batch, jax.random.key(0))[0]
  value, grads = nnx.jit(nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.Param)))(detached)
  np.testing.assert_allclose(float(value), float(nnx.jit(loss_fn)(model)), rtol=1e-6)
  flat = {".".join(map(str, k)): float(jnp.sum(jnp.abs(v[...]))) for k, v in nnx.to_flat_state(grads)}
  assert sum(v for k, v in flat.items() if k.startswith("sam_encoder.")) == 0
  assert sum(v for k, v in flat.items() if k.startswith("eva.")) > 0


def _entity_tokens_model():
  base = P.tiny_config(vocab_size=VOCAB, seg_token_id=SEG, gella=True)
  cfg = dataclasses.replace(base, gella=dataclasses.replace(base.gella, entity_tokens=True))
  return cfg, P.PixelLLM(cfg, rngs=nnx.Rngs(0)), _batch(np.random.default_rng(0), e=6)


def test_entity_tokens_join_the_encoder():
  # `entity_tokens`: one T5 prefix token per entity slot after the visual tokens, masked where the slot
  # is empty (the next test: the caption loss alone then trains the entity decoder through them).
  cfg, model, batch = _entity_tokens_model()
  batch["entity_valid"] = batch["entity_valid"].at[1, 4:].set(False)
  fused, _, entities = model.features(batch)
  visual, prefix, mask = model.prefix(fused, batch["prompt_box"], entities)
  q = visual.shape[1]
  assert prefix.shape == (2, q + 6, cfg.t5.d_model) and mask.shape == (2, q + 6)
  assert bool(jnp.all(mask[:, :q])) and np.array_equal(np.asarray(mask[:, q:]),
                                                       np.asarray(batch["entity_valid"]))
  emb, _ = model.entity_outputs(entities)  # the decoded entities are reused, not decoded twice
  np.testing.assert_allclose(np.asarray(emb), np.asarray(entities.decoded[0]))
  # Without the switch the prefix is the visual tokens alone.
  _, plain_model = _model()
  fused, _, entities = plain_model.features(batch)
  visual, prefix, mask = plain_model.prefix(fused, batch["prompt_box"], entities)
  assert mask is None and prefix is visual


@pytest.mark.slow  # a demo-only aid; compiling the gradient program takes ~60 s on 2 cores
def test_entity_tokens_train_the_entity_decoder_through_the_text():
  cfg, model, batch = _entity_tokens_model()
  def text_only(m):
    out = m(batch, heads=(), train=True)
    return optax.softmax_cross_entropy_with_integer_labels(
        out["logits"], batch["target_ids"]).mean()
  g = nnx.jit(nnx.grad(text_only, argnums=nnx.DiffState(0, nnx.Param)))(model)
  flat = {".".join(map(str, k)): float(jnp.sum(jnp.abs(v[...]))) for k, v in nnx.to_flat_state(g)}
  assert sum(v for k, v in flat.items() if k.startswith("gella.token_proj.")) > 0
  assert sum(v for k, v in flat.items() if k.startswith("gella.entity_decoder.layers.")) > 0


def test_sharded_matches_single_device():
  if jax.device_count() < 8:
    pytest.skip("needs the 8-device CPU mesh (tests/conftest.py)")
  cfg = P.tiny_config(vocab_size=VOCAB, seg_token_id=SEG, gella=True)
  make = lambda: P.PixelLLM(cfg, rngs=nnx.Rngs(0))
  plain = make()
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  rules = sharding.DEFAULT_RULES
  sharded = sharding.create_sharded(make, mesh, rules)
  batch = _batch(np.random.default_rng(1), b=4)
  run = nnx.jit(lambda m, b: {k: v for k, v in m(b, heads=("gella",)).items()
                              if k in ("entity_logits", "assoc_logits", "hidden")})
  want = run(plain, batch)
  with sharding.use(mesh, rules):
    got = run(sharded, sharding.global_batch({k: np.asarray(v) for k, v in batch.items()}, mesh, rules))
  spread = sum(len(v.sharding.device_set) > 1 for v in jax.tree.leaves(nnx.state(sharded.gella)))
  assert spread > 0  # GELLA's weights really are spread over the mesh
  for k in want:
    np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_overfit_eight_examples():
  """8 fixed examples (4 per batch, 2 batches): association accuracy 1.0, entity mask IoU ≥ 0.9."""
  rng = np.random.default_rng(5)
  batches = [_batch(rng, b=4) for _ in range(2)]
  cfg, model = _model(1)
  opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt, batch):
    loss, grads = nnx.value_and_grad(lambda m: _loss(m, batch)[0])(model)
    opt.update(model, grads)
    return loss

  for i in range(300):
    step(model, opt, batches[i % 2])
  correct = total = 0
  ious = []
  for batch in batches:
    out = nnx.jit(lambda m, b: m(b, heads=("gella",)))(model, batch)
    pairs = np.asarray(batch["seg_valid"])[:, :, None] & np.asarray(batch["entity_valid"])[:, None, :]
    pred = np.asarray(out["assoc_logits"]) > 0
    correct += int(np.sum((pred == np.asarray(batch["association"])) & pairs))
    total += int(pairs.sum())
    m, gt = np.asarray(out["entity_logits"]) > 0, np.asarray(batch["entity_masks"])
    for i, e in zip(*np.nonzero(np.asarray(batch["entity_valid"]))):
      ious.append((m[i, e] & gt[i, e]).sum() / (m[i, e] | gt[i, e]).sum())
  print(f"association accuracy {correct / total:.3f}, entity IoU min {min(ious):.3f} mean {np.mean(ious):.3f}")
  assert correct == total
  assert np.mean(ious) >= 0.9 and min(ious) >= 0.8
