"""Per-task inference on the tiny PixelLLM: cached greedy decoding of a model overfit on one narrative
reproduces it exactly, with the same per-token points as the teacher-forced head; output structures;
errors for bad calls."""

import numpy as np
import optax
import pytest

import jax.numpy as jnp
from flax import nnx

from pixelground.inference import predictor as inference
from pixelground.data import tasks
from pixelground.data import transforms as T
from pixelground.data.tokenizer import load_tokenizer
from pixelground.models import pixelllm as P
from pixelground.training import objective
from tfds_builders import build_grounded_shapes
from tfds_builders.localized_narratives import LocalizedNarratives

S, PROMPT_LEN = 64, 8


@pytest.fixture(scope="module")
def overfit(tmp_path_factory):
  root = tmp_path_factory.mktemp("gs")
  build_grounded_shapes.build_all(str(root / "raw"), str(root / "tfds"), num_train=1, num_validation=0,
                                  num_test=0, seed=4)
  tok = load_tokenizer("tiny")
  ex = LocalizedNarratives(data_dir=str(root / "tfds"), config="grounded_shapes").as_data_source("train")[0]
  conv = tasks.Converters(tasks.TaskConfig(image_size=S, train=False, max_target_len=40,
                                           max_prompt_len=PROMPT_LEN), tok)
  row = conv.ln(ex, np.random.default_rng(0))
  batch = {k: jnp.asarray(v[None]) for k, v in row.items()}
  cfg = P.tiny_config(vocab_size=tok.vocab_size)
  model = P.PixelLLM(cfg, rngs=nnx.Rngs(1))
  opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=P.trainable_filter())
  loss_cfg = objective.LossConfig(label_smoothing=0.0)

  @nnx.jit
  def step(model, opt, batch):
    (_, terms), grads = nnx.value_and_grad(
        lambda m: objective.compute_losses(cfg, loss_cfg, m(batch), batch), has_aux=True,
        argnums=nnx.DiffState(0, P.trainable_filter()))(model)
    opt.update(model, grads)
    return terms

  for i in range(400):
    terms = step(model, opt, batch)
    if i >= 60 and i % 20 == 0 and float(terms["token_accuracy"]) == 1.0:
      break
  assert float(terms["token_accuracy"]) == 1.0, terms
  return model, tok, ex, batch


def test_greedy_reproduces_target_with_teacher_forced_points(overfit):
  model, tok, ex, batch = overfit
  pred = inference.Predictor(model, tok, max_prompt_len=PROMPT_LEN)
  cap = pred.caption(ex["image"], max_len=40)
  target = [int(t) for t in np.asarray(batch["target_ids"][0]) if t != 0]
  assert target[-1] == tok.eos_id
  assert cap.pieces == [tok.id_to_piece(t) for t in target[:-1]]  # exactly the target, token by token
  assert cap.text == tok.decode(target)
  # Per-token points: the cached decode's location head equals the teacher-forced one.
  tf = inference.teacher_forced_points(model, batch)[0, : len(target) - 1]
  geom = T.resize_pad(ex["image"].shape[0], ex["image"].shape[1], S)
  want = geom.inverse_boxes(tf)
  np.testing.assert_allclose(cap.boxes, want, atol=1e-3)
  assert cap.points.shape == (len(target) - 1, 2, 2)
  assert np.all(cap.boxes[:, 2] >= cap.boxes[:, 0]) and np.all(cap.boxes[:, 3] >= cap.boxes[:, 1])


def test_output_structures_and_bad_calls(overfit):
  model, tok, ex, _ = overfit
  pred = inference.Predictor(model, tok, max_prompt_len=PROMPT_LEN)
  image = ex["image"]
  h, w = image.shape[:2]
  ref = pred.referring(image, "the red circle", max_len=8)
  assert isinstance(ref.text, str) and ref.box.shape == (4,)
  assert 0 <= ref.box[0] <= ref.box[2] <= w and 0 <= ref.box[1] <= ref.box[3] <= h
  assert isinstance(pred.region_caption(image, [2, 3, 30, 40], max_len=6), str)
  grey = np.asarray(image).mean(-1).astype(np.uint8)  # (H, W) grey image is converted
  assert isinstance(pred.caption(grey, max_len=4).text, str)
  with pytest.raises(ValueError, match="inside the"):
    pred.region_caption(image, [0, 0, w + 10, 10])
  with pytest.raises(ValueError, match="4 finite numbers"):
    pred.region_caption(image, [0, 0, 10])
  with pytest.raises(ValueError, match="expression must be a non-empty string"):
    pred.referring(image, "   ")
  with pytest.raises(ValueError, match=r"image.* must be \(H, W\)"):
    pred.caption(np.zeros((2, 3, 4, 5), np.uint8))
  with pytest.raises(ValueError, match="lisa=True"):
    pred.segment(image, "the red one")


def test_referring_mask_structure():
  tok = load_tokenizer("tiny")
  model = P.PixelLLM(P.tiny_config(vocab_size=tok.vocab_size, refseg=True), rngs=nnx.Rngs(0))
  pred = inference.Predictor(model, tok, max_prompt_len=PROMPT_LEN)
  image = np.random.default_rng(1).integers(0, 255, (40, 90, 3), dtype=np.uint8)
  out = pred.referring(image, "the blue square", max_len=5)
  assert out.box.shape == (4,) and out.mask.shape == (40, 90) and out.mask.dtype == bool
  assert isinstance(out.mask_score, float)


def test_dense_captions_structure():
  tok = load_tokenizer("tiny")
  model = P.PixelLLM(P.tiny_config(vocab_size=tok.vocab_size, proposals=True), rngs=nnx.Rngs(0))
  pred = inference.Predictor(model, tok, max_prompt_len=PROMPT_LEN)
  image = np.random.default_rng(2).integers(0, 255, (48, 80, 3), dtype=np.uint8)
  out = pred.dense_captions(image, k=3, max_len=5)
  assert len(out) == 3 and all(isinstance(d.text, str) for d in out)
  assert all(d.box.shape == (4,) and 0 <= d.box[0] <= d.box[2] <= 80 and 0 <= d.box[1] <= d.box[3] <= 48
             for d in out)
  assert [d.score for d in out] == sorted([d.score for d in out], reverse=True)
  with pytest.raises(ValueError, match="k must be"):
    pred.dense_captions(image, k=0)


def test_lisa_segment_structure():
  tok = load_tokenizer("tiny")
  cfg = P.tiny_config(vocab_size=tok.vocab_size, seg_token_id=tok.token_id("[SEG]"), lisa=True)
  model = P.PixelLLM(cfg, rngs=nnx.Rngs(0))
  pred = inference.Predictor(model, tok, max_prompt_len=PROMPT_LEN)
  image = np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)
  out = pred.segment(image, "which shape has the most corners?", max_len=6)
  assert isinstance(out.text, str)
  k = out.text.count("[SEG]")
  assert out.masks.shape == (k, 50, 70) and out.masks.dtype == bool and out.mask_scores.shape == (k,)
  # Force a [SEG]: masks come back at the original resolution, one per [SEG].
  seg = tok.token_id("[SEG]")
  image_mask = jnp.ones((1, S, S), bool)
  fused, sam_emb = model.image_features(jnp.zeros((1, S, S, 3)), image_mask)
  visual = model.visual_tokens(fused, jnp.asarray([[0.0, 0.0, 1.0, 1.0]]))
  logits, iou = inference._masks(model, jnp.zeros((1, 5, cfg.t5.d_model)), jnp.asarray([[2, 4]]), sam_emb,
                                 visual, image_mask)
  assert logits.shape == (1, 2, S, S) and iou.shape == (1, 2) and seg >= 0


def test_mask_overlay_tints_and_outlines():
  """The figures' masks: tinted inside, a white outline on the mask's edge pixels (4-neighbourhood,
  image border included), the rest of the panel untouched; panels scale the mask with the image."""
  from pixelground.inference import visualize as V

  m = np.zeros((6, 6), bool)
  m[1:5, 1:5] = True
  m[0, 5] = True  # a corner pixel: its own edge
  edge = V._edge(m)
  want = m.copy()
  want[2:4, 2:4] = False
  np.testing.assert_array_equal(edge, want)
  base = np.full((6, 6, 3), 40, np.uint8)
  img = np.asarray(V._overlay(V._canvas(base, 2), m, (230, 25, 75), alpha=0.5))
  assert img.shape == (12, 12, 3)
  assert (img[4:8, 4:8] != 40).all() and (img[4:8, 4:8] != 255).all()  # interior: tinted
  assert (img[2:4, 2:10] == 255).all() and (img[0:2, 10:12] == 255).all()  # outline
  assert (img[10:12, 0:12] == 40).all()  # outside: untouched
