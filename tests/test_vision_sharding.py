"""Vision parts on the 8-device fake mesh (data=2, fsdp=2, tensor=2): created sharded, and a jitted sharded
forward equals the single-device forward within 1e-5."""

import jax
import numpy as np
import pytest
from flax import nnx

from pixelground.parallel import sharding
from pixelground.models import eva02, sam_decoder, sam_encoder, swin

MESH_AXES = {"data": 2, "fsdp": 2, "tensor": 2}


def _sharded_equals_single(make, inputs, apply):
  """Builds `make()` on one device and sharded on the mesh; compares `apply(model, *inputs)`."""
  single = make()
  want = jax.jit(apply)(single, *inputs)
  mesh = sharding.make_mesh(MESH_AXES)
  model = sharding.create_sharded(make, mesh, sharding.DEFAULT_RULES)
  specs = {str(v.get_value().sharding.spec) for _, v in nnx.to_flat_state(nnx.state(model))}
  assert any("fsdp" in s or "tensor" in s for s in specs), specs  # really sharded, not replicated
  global_inputs = sharding.global_batch(inputs, mesh, sharding.DEFAULT_RULES)
  with jax.set_mesh(mesh):
    got = jax.jit(apply)(model, *global_inputs)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)


def test_sam_image_encoder_sharded_forward():
  cfg = sam_encoder.SamEncoderConfig(image_size=64, width=32, depth=3, num_heads=4, window_size=2,
                                     global_blocks=(1,), out_channels=16)
  pixels = np.random.default_rng(0).normal(size=(4, 64, 64, 3)).astype(np.float32)
  _sharded_equals_single(lambda: sam_encoder.SamImageEncoder(cfg, rngs=nnx.Rngs(0)), (pixels,),
                         lambda m, x: m(x))


def test_swin_sharded_forward():
  # Two stages: (shifted) windows and a patch merging are all the sharding rules meet.
  cfg = swin.SwinConfig(embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4)
  pixels = np.random.default_rng(1).normal(size=(4, 64, 64, 3)).astype(np.float32)
  _sharded_equals_single(lambda: swin.Swin(cfg, rngs=nnx.Rngs(0)), (pixels,), lambda m, x: m(x))


@pytest.mark.parametrize("scan", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_eva02_sharded_forward(scan):
  cfg = eva02.Eva02Config(image_size=56, width=32, depth=2, num_heads=4, mlp_dim=86, rope_ref_grid=4,
                          scan_layers=scan)
  pixels = np.random.default_rng(3).normal(size=(4, 84, 84, 3)).astype(np.float32)  # resized grid 6
  _sharded_equals_single(lambda: eva02.Eva02(cfg, rngs=nnx.Rngs(0)), (pixels,), lambda m, x: m(x))


@pytest.mark.parametrize("multimask", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_sam_decoder_sharded_forward(multimask):
  cfg = sam_decoder.SamDecoderConfig(prompt_dim=32, grid_size=8, image_size=128, depth=2, num_heads=4,
                                     mlp_dim=64, iou_head_hidden=24)
  rng = np.random.default_rng(2)
  emb = rng.normal(size=(4, 8, 8, 32)).astype(np.float32)
  boxes = np.sort(rng.uniform(0, 128, size=(4, 2, 2)), axis=1).reshape(4, 4).astype(np.float32)
  points = rng.uniform(0, 128, size=(4, 3, 2)).astype(np.float32)
  labels = np.array([[1, 0, -1]] * 4, np.int32)
  _sharded_equals_single(lambda: sam_decoder.SamDecoder(cfg, rngs=nnx.Rngs(0)), (emb, points, labels, boxes),
                         lambda m, e, p, l, b: m(e, p, l, b, multimask_output=multimask))
