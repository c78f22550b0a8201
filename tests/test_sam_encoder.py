"""SAM image encoder: float32 parity with transformers' `SamModel.vision_encoder` at small random configs,
loaded from HF safetensors and from an original-segment-anything-style `.pth`, plus resized inputs."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from flax import nnx  # noqa: E402

from pixelground.checkpoints.sam import load_sam_image_encoder  # noqa: E402
from pixelground.models import sam_encoder as sam_lib  # noqa: E402
from pixelground.parallel.sharding import variable_axes  # noqa: E402

# (a) windowed blocks with padding (grid 4, window 3 → padded to 6) and one global block;
# (b) global attention only.
CONFIGS = {
    "windowed": dict(num_hidden_layers=3, window_size=3, global_attn_indexes=[1]),
    "global": dict(num_hidden_layers=2, window_size=3, global_attn_indexes=[0, 1]),
}


def _hf_model(kind: str, seed: int = 0):
  from transformers import SamConfig, SamModel
  vision = dict(hidden_size=32, num_attention_heads=4, image_size=64, patch_size=16, output_channels=16,
                mlp_dim=None, **CONFIGS[kind])
  torch.manual_seed(seed)
  model = SamModel(SamConfig(vision_config=vision)).eval()
  with torch.no_grad():  # HF initialises pos_embed / rel-pos to zeros: randomise everything
    for name, p in model.vision_encoder.named_parameters():
      if "norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      else:
        p.copy_(0.2 * torch.randn_like(p))
  return model


def _pixels(size: int, seed: int = 1) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal((2, size, size, 3)).astype(np.float32)


def _hf_embeddings(model, pixels: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    out = model.vision_encoder(torch.tensor(pixels).permute(0, 3, 1, 2)).last_hidden_state
  return out.permute(0, 2, 3, 1).numpy()  # NCHW → NHWC


def _hf_embeddings_any_size(model, pixels: np.ndarray) -> np.ndarray:
  """HF's encoder refuses other input sizes; run its pieces with the pos-embed bicubic-resized by
  torch's own `F.interpolate` (its rel-pos code already interpolates linearly to any size)."""
  enc = model.vision_encoder
  with torch.no_grad():
    x = enc.patch_embed.projection(torch.tensor(pixels).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    pos = F.interpolate(enc.pos_embed.permute(0, 3, 1, 2), size=x.shape[1:3], mode="bicubic",
                        align_corners=False).permute(0, 2, 3, 1)
    x = x + pos
    for layer in enc.layers:
      x = layer(x)
      x = x[0] if isinstance(x, tuple) else x
    return enc.neck(x).permute(0, 2, 3, 1).numpy()


def _run(encoder, pixels: np.ndarray) -> np.ndarray:
  return np.asarray(jax.jit(lambda m, p: m(p))(encoder, jnp.asarray(pixels)))


def _save_hf(model, tmp_path) -> str:
  path = tmp_path / "hf"
  model.save_pretrained(path)  # safetensors
  return str(path)


def _save_sam_pth(model, tmp_path) -> str:
  """The HF tensors under the original segment-anything key names, as a plain torch state dict."""
  renames = [  # HF (inside vision_encoder.) → segment-anything (inside image_encoder.); in order
      ("neck.conv1.", "neck.0."),
      ("neck.layer_norm1.", "neck.1."),
      ("neck.conv2.", "neck.2."),
      ("neck.layer_norm2.", "neck.3."),
      ("patch_embed.projection.", "patch_embed.proj."),
      ("layers.", "blocks."),
      (".layer_norm1.", ".norm1."),
      (".layer_norm2.", ".norm2."),
  ]
  state = {}
  for key, value in model.state_dict().items():
    if not key.startswith("vision_encoder."):
      continue
    key = key[len("vision_encoder."):]
    for old, new in renames:
      key = key.replace(old, new)
    state["image_encoder." + key] = value.clone()
  # Other SAM parts must be ignored by the image-encoder loader.
  state["prompt_encoder.point_embeddings.0.weight"] = torch.zeros(1, 16)
  state["mask_decoder.iou_token.weight"] = torch.zeros(1, 16)
  path = tmp_path / "sam_vit_tiny.pth"
  torch.save(state, path)
  return str(path)


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_parity_with_transformers_safetensors(kind, tmp_path):
  model = _hf_model(kind)
  encoder = load_sam_image_encoder(_save_hf(model, tmp_path))
  cfg = encoder.cfg  # inferred from tensor shapes
  depth = CONFIGS[kind]["num_hidden_layers"]
  assert (cfg.image_size, cfg.width, cfg.depth, cfg.num_heads, cfg.out_channels) == (64, 32, depth, 4, 16)
  assert cfg.global_blocks == tuple(CONFIGS[kind]["global_attn_indexes"])
  pixels = _pixels(64)
  ours, ref = _run(encoder, pixels), _hf_embeddings(model, pixels)
  assert ours.shape == (2, 4, 4, 16)
  # Measured max abs err (CPU, float32): 3.1e-6 (windowed), 2.7e-6 (global); outputs are O(3).
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_parity_from_original_pth_layout(tmp_path):
  model = _hf_model("windowed", seed=3)
  path = _save_sam_pth(model, tmp_path)
  encoder = load_sam_image_encoder(path)
  assert encoder.cfg.window_size == 3 and encoder.cfg.global_blocks == (1,)
  pixels = _pixels(64, seed=4)
  # Measured max abs err (CPU, float32): 2.2e-6.
  np.testing.assert_allclose(_run(encoder, pixels), _hf_embeddings(model, pixels), atol=1e-4, rtol=0)


@pytest.mark.parametrize("chunk", [None, 64])
@pytest.mark.parametrize("size", [96, 112])
def test_resized_input(size, chunk, tmp_path):
  """Built for 64 px (grid 4), run at 96 (grid 6) / 112 (grid 7, windows padded 7 → 9): pos-embed
  resized bicubically, global rel-pos tables (7 rows) interpolated to 2·grid-1 rows. chunk=64 forces
  query-blocked attention (one map row of queries per block) everywhere."""
  model = _hf_model("windowed", seed=5)
  overrides = {} if chunk is None else dict(attention_chunk=chunk)
  encoder = load_sam_image_encoder(_save_hf(model, tmp_path), **overrides)
  pixels = _pixels(size, seed=6)
  ours = _run(encoder, pixels)
  grid = size // 16
  assert ours.shape == (2, grid, grid, 16) and np.isfinite(ours).all()
  # Measured max abs err (CPU, float32): 4.1e-6 (96 px), 2.4e-6 (112 px).
  np.testing.assert_allclose(ours, _hf_embeddings_any_size(model, pixels), atol=1e-4, rtol=0)


def test_bicubic_matches_torch():
  x = np.random.default_rng(0).standard_normal((1, 64, 64, 4)).astype(np.float32)
  for size in [(24, 24), (27, 80)]:
    ref = F.interpolate(torch.tensor(x).permute(0, 3, 1, 2), size=size, mode="bicubic",
                        align_corners=False).permute(0, 2, 3, 1).numpy()
    # Measured max abs err: ~1.5e-5 (float32 rounding; the weights agree to 1e-14 in float64).
    np.testing.assert_allclose(np.asarray(sam_lib.resize_bicubic(jnp.asarray(x), size)), ref,
                               atol=1e-4, rtol=0)


def test_presets_and_axes():
  assert round(sam_lib.num_params(sam_lib.preset("sam-vit-h")) / 1e6) == 637
  assert sam_lib.preset("sam-vit-b").global_blocks == (2, 5, 8, 11)
  cfg = sam_lib.SamEncoderConfig(image_size=64, width=32, depth=2, num_heads=4, window_size=3,
                                 global_blocks=(1,), out_channels=16)
  model = nnx.eval_shape(lambda: sam_lib.SamImageEncoder(cfg, rngs=nnx.Rngs(0)))
  leaves = jax.tree_util.tree_leaves(nnx.state(model), is_leaf=lambda v: isinstance(v, nnx.Variable))
  for var in leaves:  # every parameter names its logical axes
    assert len(variable_axes(var)) == len(var.shape)


@pytest.mark.slow  # ~30 s; the sharded forward is also checked in test_vision_sharding
def test_sharded_load_bf16_and_remat(tmp_path):
  """Loads onto an 8-device fsdp mesh with remat and bfloat16 compute; gradients flow."""
  from pixelground.parallel.sharding import make_mesh
  model = _hf_model("windowed", seed=7)
  path = _save_hf(model, tmp_path)
  mesh = make_mesh({"fsdp": -1})
  encoder = load_sam_image_encoder(path, mesh=mesh, remat="full")
  kernel = encoder.blocks.layers[0].lin1.kernel[...]
  assert kernel.sharding.spec[0] == "fsdp"  # "embed" → fsdp under the default rules
  pixels = _pixels(64, seed=8)
  ref = _hf_embeddings(model, pixels)
  np.testing.assert_allclose(_run(encoder, pixels), ref, atol=1e-4, rtol=0)
  grad = jax.grad(lambda m: jnp.sum(m(jnp.asarray(pixels)) ** 2))(encoder)
  assert np.isfinite(np.asarray(grad.pos_embed[...])).all()
  bf16 = load_sam_image_encoder(path, dtype="bfloat16")
  out = _run(bf16, pixels)
  assert out.dtype == jnp.bfloat16
  # Measured max abs err 0.027 (bf16 compute, float32 weights) on O(3) outputs.
  assert np.abs(out.astype(np.float32) - ref).max() < 0.15
