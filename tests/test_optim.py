"""The optimizer built from config: decay mask, layer-wise LR decay (scanned = unrolled), LR multipliers,
clipping, schedule, config errors — checked against hand-computed AdamW updates."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from pixelground.config import recipes
from pixelground.training import optim
from pixelground.models import eva02 as eva_lib


def _eva(scan: bool):
  cfg = eva_lib.Eva02Config(image_size=28, width=16, depth=3, num_heads=2, mlp_dim=32, rope_ref_grid=2,
                            scan_layers=scan)
  return eva_lib.Eva02(cfg, rngs=nnx.Rngs(0))


class Wrap(nnx.Module):
  def __init__(self, scan: bool):
    self.eva = _eva(scan)
    self.head = nnx.Linear(4, 4, rngs=nnx.Rngs(1))


def _opt_cfg(**kw):
  return recipes.optimizer_config(lr=1e-2, steps=100, warmup=10, batch_size=8, **kw)


def _flat(state):
  return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


def _abstract(make):
  return nnx.state(nnx.eval_shape(make), nnx.Param)  # shapes + axes metadata only: fast


def test_decay_mask_matrices_only():
  params = _abstract(lambda: _eva(True))
  mask = {k: bool(v) for k, v in _flat(optim.decay_mask(params)).items()}
  assert mask["blocks.layers.attn.q.kernel"]            # (L, D, H, K): a matrix per layer
  assert not mask["blocks.layers.attn.q.bias"]          # (L, H, K) stacked bias: 2-D per layer
  assert not mask["blocks.layers.norm1.scale"]          # (L, D): a vector per layer
  assert not mask["cls_token"] and not mask["pos_embed"] and mask["patch_embed_kernel"]


@pytest.mark.parametrize("scan", [True, False])
def test_layer_decay_scales(scan):
  rate, depth = 0.8, 3
  params = _abstract(lambda: Wrap(scan))
  scales = _flat(optim.lr_scales(params, _opt_cfg(layer_decay={"eva": rate}), {"eva": depth}))
  assert float(scales["eva.patch_embed_kernel"]) == pytest.approx(rate ** 4)   # layer 0
  assert float(scales["eva.norm.scale"]) == pytest.approx(1.0)                 # after the blocks
  assert float(scales["head.kernel"]) == 1.0                                   # not in the ViT
  for i in range(depth):
    want = rate ** (depth - i)  # block i is layer i + 1 → rate ** (L + 1 − (i + 1))
    got = scales["eva.blocks.layers.attn.q.kernel"][i] if scan else \
        scales[f"eva.blocks.layers.{i}.attn.q.kernel"]
    assert np.allclose(got, want), (i, got, want)


def test_lr_multipliers_and_errors():
  params = _abstract(lambda: Wrap(True))
  # A plain key is a top-level part; a key with regex characters is searched in the dotted path.
  cfg = _opt_cfg(lr_multipliers={"head": 10.0, r"q_?kernel$|q\b": 0.5})
  s = _flat(optim.lr_scales(params, cfg, {"eva": 3}))
  assert float(s["head.kernel"]) == 10.0 and float(s["eva.blocks.layers.attn.q.kernel"]) == 0.5
  assert float(s["eva.blocks.layers.attn.k.kernel"]) == 1.0
  with pytest.raises(ValueError, match="no trainable parameter matches"):
    optim.lr_scales(params, _opt_cfg(lr_multipliers={"adapter": 2.0}), {})
  with pytest.raises(ValueError, match="not a ViT of this model"):
    optim.lr_scales(params, _opt_cfg(layer_decay={"sam": 0.9}), {"eva": 3})
  with pytest.raises(ValueError, match="lr_multiplier"):
    _opt_cfg(lr_multiplier={"head": 2.0})
  bad = _opt_cfg()
  bad.lr_multiplier = {"head": 2.0}
  with pytest.raises(ValueError, match="Unknown config key 'config.optimizer.lr_multiplier'"):
    optim.build(bad, params)


def test_update_matches_hand_computed_adamw():
  """One step: clip → Adam → decoupled decay (matrices only) → × per-param scale → × LR(step 0 → 1)."""
  params = nnx.state(Wrap(False), nnx.Param)
  cfg = _opt_cfg(weight_decay=0.1, grad_clip_norm=0.5, layer_decay={"eva": 0.5},
                 lr_multipliers={"head": 3.0})
  tx, sched = optim.build(cfg, params, depths={"eva": 3})
  grads = jax.tree.map(lambda x: jnp.ones_like(x), params)
  st = tx.init(params)
  st = tx.update(grads, st, params)[1]           # step 0 has LR 0 (warm-up from 0)
  updates, _ = tx.update(grads, st, params)
  gnorm = np.sqrt(sum(x.size for x in jax.tree.leaves(params)))
  g = min(1.0, 0.5 / gnorm)                       # clipped gradient, every entry
  lr = float(sched(1))
  assert lr == pytest.approx(1e-2 / 10)
  # (rtol 2e-3: Adam's float32 bias correction 1 − 0.999² loses ~1e-4; a missing factor is ≥ 3%.)
  # Adam after 2 identical gradients: m̂ = g, v̂ = g² → update g / (|g| + eps) ≈ 1.
  adam = g / (g + 1e-8)
  flat_u, flat_p = _flat(updates), _flat(params)
  k = flat_p["head.kernel"]
  np.testing.assert_allclose(flat_u["head.kernel"], -lr * 3.0 * (adam + 0.1 * k), rtol=2e-3)
  np.testing.assert_allclose(flat_u["head.bias"], -lr * 3.0 * adam * np.ones_like(flat_p["head.bias"]),
                             rtol=2e-3)
  q0 = flat_p["eva.blocks.layers.0.attn.q.kernel"]
  np.testing.assert_allclose(flat_u["eva.blocks.layers.0.attn.q.kernel"],
                             -lr * 0.5 ** 3 * (adam + 0.1 * q0), rtol=2e-3)


def test_schedule_warmup_cosine():
  sched = optim.schedule(_opt_cfg())
  assert float(sched(0)) == 0.0 and float(sched(10)) == pytest.approx(1e-2)
  assert float(sched(55)) == pytest.approx(1e-2 * 0.5, rel=1e-3)   # half-way through the cosine
  assert float(sched(100)) == pytest.approx(0.0, abs=1e-9)
