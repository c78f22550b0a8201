"""SAM prompt encoder + mask decoder: float32 parity with transformers' `SamModel` at a small random
config (decoder width 32, 2 two-way layers, grid 8), loaded from HF safetensors through our loader and
fed the same image embeddings; point, box and mask prompts, multimask on and off."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
from flax import nnx  # noqa: E402

from pixelground.checkpoints.sam_decoder import load_sam_decoder  # noqa: E402
from pixelground.models import sam_decoder as dec_lib  # noqa: E402
from pixelground.parallel.sharding import variable_axes  # noqa: E402

DIM, GRID, IMAGE = 32, 8, 128
TOL = 1e-4


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  from transformers import SamConfig, SamModel
  cfg = SamConfig(
      vision_config=dict(hidden_size=32, num_attention_heads=4, image_size=IMAGE, patch_size=16,
                         output_channels=DIM, num_hidden_layers=1, global_attn_indexes=[0],
                         mlp_dim=None, num_pos_feats=DIM // 2),
      prompt_encoder_config=dict(hidden_size=DIM, image_size=IMAGE, patch_size=16,
                                 mask_input_channels=8),
      mask_decoder_config=dict(hidden_size=DIM, num_attention_heads=4, mlp_dim=64,
                               num_hidden_layers=2, iou_head_hidden_dim=24))
  torch.manual_seed(0)
  hf = SamModel(cfg).eval()
  with torch.no_grad():  # randomise everything (HF zero/one-initialises biases and norms)
    for name, p in hf.named_parameters():
      if name.startswith("vision_encoder"):
        continue
      if "norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      elif "positional_embedding" in name:
        p.copy_(torch.randn_like(p))
      else:
        p.copy_(0.3 * torch.randn_like(p))
  path = tmp_path_factory.mktemp("sam_dec")
  hf.save_pretrained(path)
  ours = load_sam_decoder(path, num_heads=4, image_size=IMAGE, grid_size=GRID)
  return hf, ours


def _embeddings(seed=0):
  return np.random.default_rng(seed).standard_normal((2, GRID, GRID, DIM)).astype(np.float32)


def _run_hf(hf, emb, multimask, **prompts):
  t = {k: torch.tensor(v) for k, v in prompts.items()}
  with torch.no_grad():
    out = hf(image_embeddings=torch.tensor(emb).permute(0, 3, 1, 2), multimask_output=multimask, **t)
  return out.pred_masks[:, 0].numpy(), out.iou_scores[:, 0].numpy()


def _check(ours_out, hf_out, what):
  (m, i), (hm, hi) = ours_out, hf_out
  assert m.shape == hm.shape and i.shape == hi.shape, (m.shape, hm.shape, i.shape, hi.shape)
  em, ei = float(np.max(np.abs(np.asarray(m) - hm))), float(np.max(np.abs(np.asarray(i) - hi)))
  print(f"{what}: masks max|err| {em:.2e} (scale {np.max(np.abs(hm)):.1f}), iou max|err| {ei:.2e}")
  assert em <= TOL and ei <= TOL, (what, em, ei)


POINTS = np.array([[[10.0, 20.0], [70.0, 33.0], [100.0, 120.0]],
                   [[5.0, 5.0], [64.0, 64.0], [0.0, 0.0]]], np.float32)
LABELS = np.array([[1, 0, 1], [1, 1, -1]], np.int64)
BOXES = np.array([[8.0, 12.0, 90.0, 100.0], [30.0, 2.0, 127.0, 60.0]], np.float32)


@pytest.mark.parametrize("multimask", [True, False])
def test_points(models, multimask):
  hf, ours = models
  emb = _embeddings()
  ref = _run_hf(hf, emb, multimask, input_points=POINTS[:, None], input_labels=LABELS[:, None])
  _check(ours(emb, points=POINTS, labels=LABELS, multimask_output=multimask), ref,
         f"points multimask={multimask}")


@pytest.mark.parametrize("multimask", [True, False])
def test_box(models, multimask):
  hf, ours = models
  emb = _embeddings(1)
  ref = _run_hf(hf, emb, multimask, input_boxes=BOXES[:, None])
  _check(ours(emb, boxes=BOXES, multimask_output=multimask), ref, f"box multimask={multimask}")


def test_points_box_and_mask(models):
  hf, ours = models
  emb = _embeddings(2)
  mask = np.random.default_rng(3).standard_normal((2, 4 * GRID, 4 * GRID)).astype(np.float32)
  ref = _run_hf(hf, emb, True, input_points=POINTS[:, None, :2], input_labels=LABELS[:, None, :2],
                input_boxes=BOXES[:, None], input_masks=mask[:, None])
  _check(ours(emb, points=POINTS[:, :2], labels=LABELS[:, :2], boxes=BOXES, masks=mask), ref,
         "points+box+mask")


def test_structure(models):
  _, ours = models
  # The Fourier matrix is a buffer, not a trainable parameter; every variable has logical axes.
  params = nnx.state(ours, nnx.Param)
  assert not any("gaussian" in str(p) for p, _ in nnx.to_flat_state(params))
  assert isinstance(ours.prompt_encoder.pe.gaussian, dec_lib.FixedGaussian)
  for path, v in nnx.to_flat_state(nnx.state(ours)):
    assert variable_axes(v) is not None and len(variable_axes(v)) == v.get_value().ndim, path
  # TwoWayTransformer stands alone at another width (PixelLLM's prompt extractor use).
  tw = dec_lib.TwoWayTransformer(2, 48, 8, 64, 2, rngs=nnx.Rngs(0))
  toks, keys = tw(jax.numpy.ones((2, 5, 48)), jax.numpy.ones((2, 3, 3, 48)),
                  jax.numpy.zeros((3, 3, 48)))
  assert toks.shape == (2, 5, 48) and keys.shape == (2, 9, 48)
