"""EVA02 parity against timm's `Eva` (PyTorch CPU, float32) through `load_eva02`.

timm imports torchvision at module import time (a few names: `FrozenBatchNorm2d`, `InterpolationMode`,
transforms, datasets, feature-extraction helpers), but the EVA forward pass uses none of it. torchvision
cannot be installed here without pulling a CUDA build of torch (SPEC.md section 9), so timm is installed
with `--no-deps` (see the Makefile) and this test registers a stand-in `torchvision` package *inside the
test process only*: every `torchvision.*` module resolves, and every name in it is a placeholder class
whose instantiation raises — so if timm's EVA code ever really used torchvision, the test would fail
loudly instead of computing with a fake. The stand-in is removed again after the module's tests.
"""

import importlib
import importlib.abc
import importlib.machinery
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import save_file

from pixelground.checkpoints.eva02 import load_eva02
from pixelground.models import eva02 as eva_lib
from pixelground.models import resize

TOL = 1e-4


class _Placeholder(type):
  def __getattr__(cls, name):
    if name.startswith("__"):
      raise AttributeError(name)
    return f"{cls.__name__}.{name}"  # enum-like class attributes (InterpolationMode.BICUBIC, ...)


def _placeholder(module: str, name: str):
  def fail(self, *args, **kwargs):
    raise RuntimeError(f"torchvision stand-in: {module}.{name} was used; the test must not need it.")

  return _Placeholder(name, (), {"__init__": fail})


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
  def find_spec(self, fullname, path, target=None):
    if fullname == "torchvision" or fullname.startswith("torchvision."):
      return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
    return None

  def create_module(self, spec):
    module = types.ModuleType(spec.name)
    module.__path__ = []

    def getattr_(name, module_name=spec.name):
      if name.startswith("__"):
        raise AttributeError(name)
      return _placeholder(module_name, name)

    module.__getattr__ = getattr_
    return module

  def exec_module(self, module):
    pass


@pytest.fixture(scope="module")
def timm_eva():
  try:
    importlib.import_module("torchvision")  # a real install is fine too
    finder = None
  except ImportError:
    finder = _StandInFinder()
    sys.meta_path.insert(0, finder)
  try:
    from timm.models.eva import Eva
    yield Eva
  finally:
    if finder is not None:
      sys.meta_path.remove(finder)
      for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]


# Native 56 px / patch 14 → 4×4 grid; rope reference grid 4 (as 224/14 = 16 for the real models).
SMALL = dict(img_size=56, patch_size=14, embed_dim=64, depth=3, num_heads=4, mlp_ratio=4 * 2 / 3,
             swiglu_mlp=True, scale_mlp=True, use_rot_pos_emb=True, ref_feat_shape=(4, 4),
             num_classes=0, dynamic_img_size=True)


def _build(Eva, seed: int, **kw):
  torch.manual_seed(seed)
  model = Eva(**{**SMALL, **kw}).eval()
  with torch.no_grad():  # every parameter random (timm zero-inits biases, ones-inits norms)
    for p in model.parameters():
      p.copy_(0.5 * torch.randn_like(p) / max(1.0, p.shape[-1] ** 0.5) + (p if p.ndim == 1 else 0))
  return model


def _save(model, path) -> str:
  file = str(path / "eva02.safetensors")
  save_file({k: v.contiguous() for k, v in model.state_dict().items()}, file)
  return file


def _pixels(size: int, seed: int, batch: int = 2) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal((batch, size, size, 3)).astype(np.float32)


def _timm_patches(model, pixels: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    tokens = model.forward_features(torch.from_numpy(pixels).permute(0, 3, 1, 2)).numpy()
  g = pixels.shape[1] // model.patch_embed.patch_size[0]
  return tokens[:, 1:].reshape(tokens.shape[0], g, g, -1), tokens[:, 0]


# Measured max abs errors (float32, highest matmul precision, this machine):
#   token pool (final norm) + separate q/k/v: 56 px 3.0e-6, 84 px 2.7e-6 (CLS 2.9e-6);
#   avg pool (no final norm, |features| up to 11.6) + fused qkv: 56 px 1.2e-5, 84 px 1.4e-5.
@pytest.mark.parametrize("variant", ["token_separate_qkv", "avg_fused_qkv"])
@pytest.mark.parametrize("scan", [True, False])
def test_parity_with_timm(timm_eva, variant, scan, tmp_path):
  kw = (dict(global_pool="token", qkv_fused=False) if variant == "token_separate_qkv"
        else dict(global_pool="avg", qkv_fused=True))
  model = _build(timm_eva, seed=0, **kw)
  vit = load_eva02(_save(model, tmp_path), num_heads=4, rope_ref_grid=4, scan_layers=scan)
  assert vit.cfg.final_norm == (variant == "token_separate_qkv")
  assert (vit.cfg.image_size, vit.cfg.width, vit.cfg.depth, vit.cfg.mlp_dim) == (56, 64, 3, 170)
  forward = nnx.jit(lambda m, x: m(x, return_cls=True))
  # 56: native grid; 84: grid 6, pos-embed resized (antialiased bicubic) and rope rescaled to ref 4.
  for size in (56, 84):
    pixels = _pixels(size, seed=size)
    feats, cls = forward(vit, jnp.asarray(pixels))
    ref_feats, ref_cls = _timm_patches(model, pixels)
    assert feats.shape == ref_feats.shape == (2, size // 14, size // 14, 64)
    np.testing.assert_allclose(np.asarray(feats), ref_feats, atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(cls), ref_cls, atol=TOL, rtol=0)
  # 90 px is not a multiple of 14 (timm refuses it without padding); like a stride-14 conv we drop
  # the last 6 rows/columns, so it equals the 84-px crop.
  big = _pixels(90, seed=90)
  np.testing.assert_array_equal(np.asarray(forward(vit, jnp.asarray(big))[0]),
                                np.asarray(forward(vit, jnp.asarray(big[:, :84, :84]))[0]))


def test_antialiased_bicubic_matches_torch():
  x = np.random.default_rng(0).standard_normal((1, 16, 16, 5)).astype(np.float32)
  for size in (27, 24, 9, 16):
    ref = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(size, size),
                                          mode="bicubic", align_corners=False, antialias=True)
    ours = resize.resize_bicubic(jnp.asarray(x), (size, size), antialias=True)
    np.testing.assert_allclose(np.asarray(ours), ref.permute(0, 2, 3, 1).numpy(), atol=1e-5, rtol=0)


def test_rope_matches_timm(timm_eva):
  """The angle table against timm's RotaryEmbeddingCat sin/cos (interleaved pairs) at a resized grid."""
  model = timm_eva(**SMALL)
  emb = model.rope.get_embed(shape=(6, 6)).numpy()  # (N, 2K): [sin (K), cos (K)], pairs repeated
  k = SMALL["embed_dim"] // SMALL["num_heads"]
  ang = eva_lib.rope_angles(eva_lib.Eva02Config(image_size=56, width=64, depth=1, num_heads=4,
                                                mlp_dim=170, rope_ref_grid=4), 6, 6)
  np.testing.assert_allclose(np.repeat(np.sin(ang), 2, -1), emb[:, :k], atol=1e-6)
  np.testing.assert_allclose(np.repeat(np.cos(ang), 2, -1), emb[:, k:], atol=1e-6)


def test_drop_path_training_forward():
  cfg = eva_lib.Eva02Config(image_size=28, width=32, depth=4, num_heads=2, mlp_dim=64,
                            rope_ref_grid=2, drop_path_rate=0.5)
  vit = eva_lib.Eva02(cfg, rngs=nnx.Rngs(0))
  x = jnp.asarray(_pixels(28, seed=1, batch=8))
  det = vit(x)
  np.testing.assert_array_equal(np.asarray(det), np.asarray(vit(x, rng=None)))
  a, b = vit(x, rng=jax.random.key(1)), vit(x, rng=jax.random.key(1))
  c = vit(x, rng=jax.random.key(2))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # same key → same branches dropped
  assert not np.allclose(np.asarray(a), np.asarray(det))
  assert not np.allclose(np.asarray(a), np.asarray(c))
  # Zero drop rate with a key is the deterministic forward.
  vit0 = eva_lib.Eva02(cfg.replace(drop_path_rate=0.0), rngs=nnx.Rngs(0))
  np.testing.assert_allclose(np.asarray(vit0(x, rng=jax.random.key(1))), np.asarray(det), atol=1e-6)
  grads = nnx.grad(lambda m: jnp.mean(m(x, rng=jax.random.key(3)) ** 2))(vit)
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_presets_at_384():
  """SPEC 1.2: EVA02-L/14 at 384 px → 27×27×1024 (CLS dropped); parameter count ≈ 0.3B."""
  cfg = eva_lib.preset("eva02-l-14")
  out = jax.eval_shape(lambda x: eva_lib.Eva02(cfg, rngs=nnx.Rngs(0))(x),
                       jax.ShapeDtypeStruct((2, 384, 384, 3), jnp.float32))
  assert out.shape == (2, 27, 27, 1024)
  assert 300e6 < eva_lib.num_params(cfg) < 310e6, eva_lib.num_params(cfg)
  base = jax.eval_shape(lambda x: eva_lib.Eva02(eva_lib.preset("eva02-b-14"), rngs=nnx.Rngs(0))(x),
                        jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
  assert base.shape == (1, 16, 16, 768)


def test_axes_on_every_param():
  vit = nnx.eval_shape(lambda: eva_lib.Eva02(eva_lib.preset("eva02-b-14"), rngs=nnx.Rngs(0)))
  for path, var in nnx.to_flat_state(nnx.state(vit, nnx.Param)):
    axes = var.get_metadata().get("axes")
    assert axes is not None and len(axes) == len(var.shape), (path, axes, var.shape)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_same_gradients(remat):
  """Remat over scanned blocks keeps Python-valued block arguments (num_prefix) static: it traces, and
  gives the same gradients as no remat."""
  cfg = eva_lib.Eva02Config(image_size=28, width=16, depth=2, num_heads=2, mlp_dim=32, rope_ref_grid=2)
  x = jax.random.normal(jax.random.key(0), (1, 28, 28, 3))

  def grads(c):
    model = eva_lib.Eva02(c, rngs=nnx.Rngs(0))
    return nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)

  for a, b in zip(jax.tree.leaves(grads(cfg)), jax.tree.leaves(grads(cfg.replace(remat=remat)))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
