"""Imports timm EVA02 checkpoints (`eva02_{base,large}_patch14_*`) into `pixelground.models.eva02.Eva02`.

Key layout (timm `Eva`, any file `open_source` reads: safetensors, `.bin`/`.pth` without executing
pickled code): `cls_token` (1, 1, D), `pos_embed` (1, 1 + g², D), `patch_embed.proj.{weight,bias}`,
`blocks.{i}.norm{1,2}.{weight,bias}`, `blocks.{i}.attn.{q_proj,k_proj,v_proj,proj}.*` (k has no bias) —
or the fused form `blocks.{i}.attn.qkv.weight` (3D, D) with `attn.q_bias`, `attn.v_bias` —,
`blocks.{i}.mlp.{fc1_g,fc1_x,norm,fc2}.*` (SwiGLU with sub-LN), `norm.{weight,bias}` (absent in the
avg-pool variants, whose `fc_norm`/`head` classifier keys are ignored, as are `rope.*` buffers and a
MIM `mask_token`). A `model.`/`module.` wrapper prefix is stripped.

Conversions: linear (out, in) → (in, out) reshaped to our head-split kernels; conv (out, in, kh, kw) →
(kh, kw, in, out); `pos_embed` → its CLS row and the (1, g, g, D) patch table; per-block tensors are
stacked on a leading layer axis when the model is scanned.

Without a config, width/depth/heads/patch/image size/MLP width/final norm are read off the shapes;
the head count cannot be (it does not change any shape): give `num_heads` unless the width is one of
the presets' (768 → 12, 1024 → 16) — for any other width it is width // 64. Nor can the rotary
reference grid: `rope_ref_grid` keeps its default 16 (timm's `ref_feat_shape` for every EVA02/14
checkpoint, the 448-px ones included).

Example:
    vit = load_eva02("/ckpt/eva02_large_patch14_224.safetensors", mesh=mesh, dtype="bfloat16")
"""

from __future__ import annotations

import os
import re

import numpy as np
from flax import nnx
from jax.sharding import Mesh

from pixelground.parallel import sharding as sharding_lib
from pixelground.checkpoints import loader
from pixelground.checkpoints.sources import TensorSource, open_source
from pixelground.models import eva02 as eva_lib

_IGNORED = re.compile(r"^(head\.|fc_norm\.|rope\.|mask_token$|lm_head\.)")
_WRAPPERS = ("model.", "module.", "")


def _linear(shape):
  return lambda a: a.T.reshape(shape)


def _conv(a: np.ndarray) -> np.ndarray:
  return np.transpose(a, (2, 3, 1, 0))


def _block_plan(local: str, shape: tuple[int, ...], keys: set[str], block: str, cfg: eva_lib.Eva02Config):
  """(key, converter) of one block-local parameter (our dotted name without `blocks.layers[.i].`)."""
  d = cfg.width
  fused = block + "attn.qkv.weight" in keys
  m = re.match(r"^attn\.([qkv])\.(kernel|bias)$", local)
  if m and fused:
    which, leaf = m.groups()
    idx = "qkv".index(which)
    if leaf == "kernel":
      return block + "attn.qkv.weight", lambda a: a[idx * d:(idx + 1) * d].T.reshape(shape)
    return block + f"attn.{which}_bias", lambda a: a.reshape(shape)
  names = {"attn.q": "attn.q_proj", "attn.k": "attn.k_proj", "attn.v": "attn.v_proj",
           "attn.proj": "attn.proj", "norm1": "norm1", "norm2": "norm2", "fc1_g": "mlp.fc1_g",
           "fc1_x": "mlp.fc1_x", "mlp_norm": "mlp.norm", "fc2": "mlp.fc2"}
  module, _, leaf = local.rpartition(".")
  if module not in names:
    raise loader.CheckpointError(f"EVA02 block parameter '{local}' has no timm name.")
  base = block + names[module] + "."
  if leaf == "kernel":
    return base + "weight", _linear(shape)
  if leaf == "scale":
    return base + "weight", lambda a: a
  return base + "bias", lambda a: a.reshape(shape)


def make_mapping(cfg: eva_lib.Eva02Config, keys: set[str], prefix: str) -> loader.Mapping:
  g = cfg.grid_size
  fixed = {
      "patch_embed_kernel": ("patch_embed.proj.weight", _conv),
      "patch_embed_bias": ("patch_embed.proj.bias", lambda a: a),
      "cls_token": ("cls_token", lambda a: a.reshape(-1)),
      "cls_pos_embed": ("pos_embed", lambda a: a[0, 0]),
      "pos_embed": ("pos_embed", lambda a: a[0, 1:].reshape(1, g, g, -1)),
      "norm.scale": ("norm.weight", lambda a: a),
      "norm.bias": ("norm.bias", lambda a: a),
  }

  def mapping(path: loader.Path, var: nnx.Variable) -> loader.FromSource:
    name = loader.path_str(path)
    if name in fixed:
      key, fn = fixed[name]
      return loader.FromSource((prefix + key,), loader.single(fn))
    if cfg.scan_layers:
      m = re.match(r"^blocks\.layers\.(.+)$", name)
      shape = tuple(var.shape[1:])
      plans = [_block_plan(m.group(1), shape, keys, f"{prefix}blocks.{i}.", cfg)
               for i in range(cfg.depth)]
      fn = plans[0][1]
      return loader.FromSource(tuple(k for k, _ in plans), loader.stacked(fn))
    m = re.match(r"^blocks\.layers\.(\d+)\.(.+)$", name)
    if not m:
      raise loader.CheckpointError(f"EVA02 parameter '{name}' has no timm name.")
    key, fn = _block_plan(m.group(2), tuple(var.shape), keys, f"{prefix}blocks.{m.group(1)}.", cfg)
    return loader.FromSource((key,), loader.single(fn))

  return mapping


def detect_prefix(source: TensorSource) -> str:
  keys = set(source.keys())
  for prefix in _WRAPPERS:
    if prefix + "patch_embed.proj.weight" in keys and prefix + "pos_embed" in keys:
      return prefix
  raise loader.CheckpointError(f"{source.path}: no timm EVA02 found (looked for 'patch_embed.proj.weight' "
                               "and 'pos_embed').")


def config_from_source(source: TensorSource, prefix: str, **overrides) -> eva_lib.Eva02Config:
  """Hyper-parameters read off the tensor shapes (no data is read)."""
  keys = set(source.keys())
  width, _, patch, _ = source.shape(prefix + "patch_embed.proj.weight")
  num_pos = source.shape(prefix + "pos_embed")[1] - 1
  grid = int(round(num_pos ** 0.5))
  if grid * grid != num_pos:
    raise loader.CheckpointError(f"{source.path}: pos_embed has {num_pos} patch entries, not a square grid.")
  block_re = re.compile(re.escape(prefix) + r"blocks\.(\d+)\.")
  depth = len({int(m.group(1)) for k in keys if (m := block_re.match(k))})
  mlp_key = prefix + "blocks.0.mlp.fc1_g.weight"
  if mlp_key not in keys:
    raise loader.CheckpointError(
        f"{source.path}: '{mlp_key}' not found — only the SwiGLU-with-sub-LN EVA02 MLP (B/L models) "
        "is supported.")
  heads = {768: 12, 1024: 16}.get(width, width // 64)
  fields = dict(image_size=grid * patch, patch_size=patch, width=width, depth=depth,
                num_heads=heads, mlp_dim=source.shape(mlp_key)[0],
                final_norm=prefix + "norm.weight" in keys)
  return eva_lib.Eva02Config(**{**fields, **overrides})


def load_eva02(path: str | os.PathLike, cfg: eva_lib.Eva02Config | None = None, *,
               mesh: Mesh | None = None, rules: sharding_lib.Rules = sharding_lib.DEFAULT_RULES,
               seed: int = 0, report: dict | None = None, **overrides) -> eva_lib.Eva02:
  """Loads a timm EVA02 checkpoint, streaming tensors into their shardings.

  Args:
    path: checkpoint file or directory.
    cfg: model config; default: read off the shapes (+ `overrides`: num_heads, dtype, scan_layers,
      remat, drop_path_rate, ...).
    mesh, rules: target placement (default: first device).
    seed: Rngs seed for the abstract build; every parameter comes from the checkpoint.
    report: filled with what was loaded / initialised / left unused (`loader.load_model`).
  """
  with open_source(path) as source:
    prefix = detect_prefix(source)
    if cfg is None:
      cfg = config_from_source(source, prefix, **overrides)
    elif overrides:
      cfg = cfg.replace(**overrides)
    keys = set(source.keys())
    ignore = lambda key: (not key.startswith(prefix)) or bool(_IGNORED.match(key[len(prefix):]))
    return loader.load_model(lambda: eva_lib.Eva02(cfg, rngs=nnx.Rngs(seed)), source,
                             make_mapping(cfg, keys, prefix), mesh=mesh, rules=rules,
                             ignore_unused=ignore, report=report)
