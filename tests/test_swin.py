"""Swin parity against transformers' `SwinModel` (PyTorch CPU, float32) through `load_swin`."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from pixelground.checkpoints import loader, open_source
from pixelground.checkpoints.swin import load_swin
from pixelground.models import swin as swin_lib

# Window 4 with maps of 32/16/8/4 (128² input): shifted windows + masks in stages 1-3, and stage 4's map
# equals the window (the reference clips: window = map, no shift). Heads 1-2-4-8, head dim 16.
HF_CONFIG = dict(image_size=128, patch_size=4, num_channels=3, embed_dim=16, depths=[2, 2, 2, 2],
                 num_heads=[1, 2, 4, 8], window_size=4, mlp_ratio=2.0)
TOL = 1e-4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  torch.manual_seed(0)
  model = transformers.SwinModel(transformers.SwinConfig(**HF_CONFIG)).eval()
  # Random (not the zero-initialised) tables and LayerNorm affines so every parameter matters.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "relative_position_bias_table" in name or "norm" in name:
        p.add_(0.3 * torch.randn_like(p))
  path = tmp_path_factory.mktemp("swin")
  model.save_pretrained(path)
  return path, model


def hf_stages(model, pixels: np.ndarray, **kw) -> tuple[list[np.ndarray], np.ndarray]:
  # A fresh copy per call: SwinLayer stores its clipped window/shift on itself, so a model run once on
  # a small input would keep the clipped values for later, larger inputs.
  model = copy.deepcopy(model)
  with torch.no_grad():
    out = model(torch.from_numpy(pixels).permute(0, 3, 1, 2), output_hidden_states=True,
                output_hidden_states_before_downsampling=True, **kw)
  maps = [t.permute(0, 2, 3, 1).numpy() for t in out.reshaped_hidden_states[1:]]
  return maps, out.last_hidden_state.numpy().reshape(maps[-1].shape)  # (B, h·w, C) → NHWC


def compare(ours, theirs) -> list[float]:
  assert len(ours) == len(theirs) == 4
  errs = []
  for i, (a, b) in enumerate(zip(ours, theirs)):
    assert a.shape == b.shape, (i, a.shape, b.shape)
    errs.append(float(np.max(np.abs(np.asarray(a) - b))))
  assert max(errs) <= TOL, errs
  return errs


# Measured max abs errors per stage (float32, highest matmul precision, this machine):
#   square 128×128 (B=2):               [1.4e-6, 3.0e-7, 3.9e-7, 8.3e-7]; final-normed last map 2.4e-6
#   non-square, not divisible 118×150:  [1.2e-6, 2.4e-7, 4.2e-7, 6.6e-7]; final-normed last map 3.6e-6
#   always_partition 62×78 (stage-4 map 2×3 < window): [9.5e-7, 1.8e-7, 3.0e-7, 8.3e-7]
@pytest.mark.parametrize("size", [(128, 128), (118, 150)])
def test_parity(checkpoint, size):
  # 118×150 → patch grid 30×38 (input padded to 120×152) → 15×19 (odd: merge and window padding)
  # → 8×10 → 4×5 (clipped window 4, padded to 4×8).
  path, hf = checkpoint
  model = load_swin(path)
  assert model.cfg.window_size == 4 and model.cfg.depths == (2, 2, 2, 2)
  pixels = np.random.default_rng(1).normal(size=(2, *size, 3)).astype(np.float32)
  theirs, last = hf_stages(hf, pixels)
  # One compile: the stage maps and the final-normed last map (= `final_norm=True`'s last entry).
  def run(m, x):
    outs = m(x)
    return outs, m.final_norm(outs[-1])
  ours, normed = nnx.jit(run)(model, jnp.asarray(pixels))
  errs = compare(ours, theirs)
  print(size, errs)
  compare(ours[:3] + [normed], theirs[:3] + [last])


def test_parity_always_partition(checkpoint):
  # Never clipping: stage-4 map 2×3 is padded to one 4×4 window and the odd block shifts by 2.
  path, hf = checkpoint
  model = load_swin(path, always_partition=True)
  pixels = np.random.default_rng(2).normal(size=(1, 62, 78, 3)).astype(np.float32)
  theirs, _ = hf_stages(hf, pixels, always_partition=True)
  ours = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(pixels))
  print(compare(ours, theirs))


def test_small_map_clips_window(checkpoint):
  # Maps smaller than the window (stage 4: 2×2 < 4): transformers fails here; we clip the window and
  # read the bias of each offset from the full table. Equal to running with a 2-wide window whose table
  # is the centre of the full one.
  path, _ = checkpoint
  model = load_swin(path)
  pixels = jnp.asarray(np.random.default_rng(3).normal(size=(1, 64, 64, 3)), jnp.float32)
  outs = nnx.jit(lambda m, x: m(x))(model, pixels)
  assert [o.shape for o in outs] == [(1, 16, 16, 16), (1, 8, 8, 32), (1, 4, 4, 64), (1, 2, 2, 128)]
  index = swin_lib.relative_position_index(2, 4)
  full = swin_lib.relative_position_index(4, 4)
  # Offsets of a 2-window are the centre 3×3 of the 7×7 offset grid.
  assert set(index.ravel()) == {r * 7 + c for r in range(2, 5) for c in range(2, 5)}
  assert index.max() <= full.max()
  assert all(bool(jnp.all(jnp.isfinite(o))) for o in outs)


def test_shift_mask_and_windows():
  mask = swin_lib.shift_mask(8, 8, 4, 2)
  assert mask.shape == (4, 16, 16)
  assert not mask[0].any()  # the top-left window lies in one region
  assert (mask[3] != 0).sum() == 16 * 16 - 4 * 16  # bottom-right: 4 regions of 4 tokens each
  x = jnp.arange(2 * 8 * 12 * 3, dtype=jnp.float32).reshape(2, 8, 12, 3)
  np.testing.assert_array_equal(swin_lib.from_windows(swin_lib.to_windows(x, 4), 4, 8, 12), x)


def test_axes_and_preset():
  cfg = swin_lib.preset("swin-tiny")
  assert (cfg.patch_size, cfg.window_size, cfg.depths, cfg.embed_dim) == (4, 7, (2, 2, 6, 2), 96)
  abstract = nnx.eval_shape(lambda: swin_lib.Swin(cfg, rngs=nnx.Rngs(0)))
  flat, _ = loader.flatten_state(nnx.state(abstract))
  for path, var in flat:
    axes = var.get_metadata().get("axes")
    assert axes is not None and len(axes) == len(var.shape), loader.path_str(path)
  n = sum(int(np.prod(v.shape)) for _, v in flat)
  assert 27.5e6 < n < 28.5e6, n  # Swin-Tiny ≈ 28M (backbone without classifier)
  graphdef, state = nnx.split(abstract)
  out = jax.eval_shape(lambda st, x: nnx.merge(graphdef, st)(x), state,
                       jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
  assert [o.shape for o in out] == [(1, 56, 56, 96), (1, 28, 28, 192), (1, 14, 14, 384), (1, 7, 7, 768)]


def test_checkpoint_keys_all_used(checkpoint):
  path, hf = checkpoint
  with open_source(path) as source:
    keys = set(source.keys())
  # Every saved tensor is a parameter we load (strict mode would have raised otherwise).
  assert len(keys) == sum(1 for _ in hf.state_dict() if "relative_position_index" not in _)


def test_sharded_load_matches(checkpoint):
  from pixelground.parallel import sharding  # pylint: disable=import-outside-toplevel
  path, _ = checkpoint
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  sharded, plain = load_swin(path, mesh=mesh), load_swin(path)
  kernel = sharded.stages[1].blocks[0].attn.q.kernel[...]  # (32, 2, 16): embed→fsdp, heads→tensor
  assert len(kernel.addressable_shards) == 8 and kernel.addressable_shards[0].data.shape == (16, 1, 16)
  pixels = jnp.asarray(np.random.default_rng(4).normal(size=(2, 64, 64, 3)), jnp.float32)
  run = nnx.jit(lambda m, x: m(x))
  for a, b in zip(run(sharded, pixels), run(plain, pixels)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
