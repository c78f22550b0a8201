"""Imports SAM prompt-encoder + mask-decoder weights into `pixelground.models.sam_decoder.SamDecoder`.

Supported layouts (any file/directory `open_source` reads; `.pth` without executing pickled code):

"hf" — Hugging Face `SamModel`, keys
`shared_image_embedding.positional_embedding`, `prompt_encoder.{point_embed.{0..3},not_a_point_embed,
no_mask_embed}.weight`, `prompt_encoder.mask_embed.{conv1,conv2,conv3,layer_norm1,layer_norm2}.*`,
`mask_decoder.{iou_token,mask_tokens}.weight`, `mask_decoder.transformer.layers.{i}.{self_attn,
cross_attn_token_to_image,cross_attn_image_to_token}.{q,k,v,out}_proj.*`, `...layer_norm{1..4}.*`,
`...mlp.lin{1,2}.*`, `mask_decoder.transformer.{final_attn_token_to_image,layer_norm_final_attn}.*`,
`mask_decoder.upscale_{conv1,conv2,layer_norm}.*`, `mask_decoder.output_hypernetworks_mlps.{i}.*`,
`mask_decoder.iou_prediction_head.*`. `prompt_encoder.shared_embedding.positional_embedding` (tied to
`shared_image_embedding`) and all `vision_encoder.*` keys are ignored.

"sam" — the original segment-anything state dicts `sam_vit_{b,l,h}_*.pth`, keys
`prompt_encoder.pe_layer.positional_encoding_gaussian_matrix`, `prompt_encoder.{point_embeddings.{0..3},
not_a_point_embed,no_mask_embed}.weight`, `prompt_encoder.mask_downscaling.{0,1,3,4,6}.*` (conv, LN2d,
conv, LN2d, 1×1 conv), `mask_decoder.transformer.layers.{i}.{self_attn,cross_attn_token_to_image,
cross_attn_image_to_token}.*`, `...norm{1..4}.*`, `...mlp.lin{1,2}.*`, `mask_decoder.transformer.
{final_attn_token_to_image,norm_final_attn}.*`, `mask_decoder.output_upscaling.{0,1,3}.*`,
`mask_decoder.output_hypernetworks_mlps.{i}.layers.{0,1,2}.*`, `mask_decoder.iou_prediction_head.
layers.{0..d-1}.*`; `image_encoder.*` keys are ignored. The two-way blocks' LayerNorm epsilon becomes
1e-5 (original SAM) instead of transformers' 1e-6.

Conversions: linear weights (out, in[, 1, 1]) → (in, out) reshaped to our (possibly head-split) kernel;
conv weights (out, in, kh, kw) → (kh, kw, in, out); transposed-conv weights (in, out, kh, kw) →
(in, kh, kw, out); embedding tables (1, D) → (D,); the 4 point-kind embeddings are stacked to (4, D).

Example:
    decoder = load_sam_decoder("/ckpt/sam-vit-huge")  # HF directory; config read off the shapes
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
from pixelground.models import sam_decoder as dec_lib

_PE_KEY = "shared_image_embedding.positional_embedding"
_TIED_PE_KEY = "prompt_encoder.shared_embedding.positional_embedding"

# Our module path pieces → HF module path pieces (applied in order, on the dotted path).
_RENAMES = (
    (r"^prompt_encoder\.mask_embed\.norm([12])\.", r"prompt_encoder.mask_embed.layer_norm\1."),
    (r"\.cross_token_to_image\.", ".cross_attn_token_to_image."),
    (r"\.cross_image_to_token\.", ".cross_attn_image_to_token."),
    (r"^(mask_decoder\.transformer\.layers\.\d+)\.norm(\d)\.", r"\1.layer_norm\2."),
    (r"^(mask_decoder\.transformer\.layers\.\d+)\.lin([12])\.", r"\1.mlp.lin\2."),
    (r"^mask_decoder\.transformer\.final_attn\.", "mask_decoder.transformer.final_attn_token_to_image."),
    (r"^mask_decoder\.transformer\.final_norm\.", "mask_decoder.transformer.layer_norm_final_attn."),
    (r"^mask_decoder\.upscale_norm\.", "mask_decoder.upscale_layer_norm."),
    (r"^mask_decoder\.hypernets\.", "mask_decoder.output_hypernetworks_mlps."),
    (r"^mask_decoder\.iou_head\.", "mask_decoder.iou_prediction_head."),
)


_SAM_PE_KEY = "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"

# Our module path pieces → original segment-anything module path pieces.
_SAM_RENAMES = (
    (r"\.cross_token_to_image\.", ".cross_attn_token_to_image."),
    (r"\.cross_image_to_token\.", ".cross_attn_image_to_token."),
    (r"^(mask_decoder\.transformer\.layers\.\d+)\.lin([12])\.", r"\1.mlp.lin\2."),
    (r"^mask_decoder\.transformer\.final_attn\.", "mask_decoder.transformer.final_attn_token_to_image."),
    (r"^mask_decoder\.transformer\.final_norm\.", "mask_decoder.transformer.norm_final_attn."),
    (r"^mask_decoder\.upscale_norm\.", "mask_decoder.output_upscaling.1."),
    (r"^prompt_encoder\.mask_embed\.norm1\.", "prompt_encoder.mask_downscaling.1."),
    (r"^prompt_encoder\.mask_embed\.norm2\.", "prompt_encoder.mask_downscaling.4."),
    (r"^prompt_encoder\.mask_embed\.conv3\.", "prompt_encoder.mask_downscaling.6."),
    (r"^mask_decoder\.hypernets\.", "mask_decoder.output_hypernetworks_mlps."),
    (r"^mask_decoder\.iou_head\.", "mask_decoder.iou_prediction_head."),
)


def _sam_mlp_layer(path: str, cfg: dec_lib.SamDecoderConfig) -> str:
  """Our MLP pieces `proj_in` / `layers.{k}` / `proj_out` → original `layers.{0 / k+1 / last}`."""
  m = re.match(r"^(mask_decoder\.(?:hypernets\.\d+|iou_head))\.(proj_in|proj_out|layers\.(\d+))\.$", path)
  if not m:
    return path
  depth = cfg.iou_head_depth if m.group(1).endswith("iou_head") else 3
  index = {"proj_in": 0, "proj_out": depth - 1}.get(m.group(2))
  if index is None:
    index = int(m.group(3)) + 1
  module = m.group(1).replace("hypernets", "output_hypernetworks_mlps").replace(
      "iou_head", "iou_prediction_head")
  return f"{module}.layers.{index}."


def _linear(shape):
  return lambda a: a.reshape(a.shape[0], -1).T.reshape(shape)


def _conv(a: np.ndarray) -> np.ndarray:
  return np.transpose(a, (2, 3, 1, 0))


def _tconv(a: np.ndarray) -> np.ndarray:
  return np.transpose(a, (0, 2, 3, 1))


def _sam_param_source(name: str, shape: tuple[int, ...],
                      cfg: dec_lib.SamDecoderConfig) -> loader.FromSource:
  """How to build our parameter `name` of `shape` from original segment-anything keys."""
  ident = lambda a: a
  fixed = {
      "prompt_encoder.pe.gaussian": (_SAM_PE_KEY, ident),
      "prompt_encoder.not_a_point_embed": ("prompt_encoder.not_a_point_embed.weight", lambda a: a[0]),
      "prompt_encoder.no_mask_embed": ("prompt_encoder.no_mask_embed.weight", lambda a: a[0]),
      "prompt_encoder.mask_embed.conv1": ("prompt_encoder.mask_downscaling.0.weight", _conv),
      "prompt_encoder.mask_embed.conv1_bias": ("prompt_encoder.mask_downscaling.0.bias", ident),
      "prompt_encoder.mask_embed.conv2": ("prompt_encoder.mask_downscaling.3.weight", _conv),
      "prompt_encoder.mask_embed.conv2_bias": ("prompt_encoder.mask_downscaling.3.bias", ident),
      "mask_decoder.iou_token": ("mask_decoder.iou_token.weight", lambda a: a[0]),
      "mask_decoder.mask_tokens": ("mask_decoder.mask_tokens.weight", ident),
      "mask_decoder.upscale1": ("mask_decoder.output_upscaling.0.weight", _tconv),
      "mask_decoder.upscale1_bias": ("mask_decoder.output_upscaling.0.bias", ident),
      "mask_decoder.upscale2": ("mask_decoder.output_upscaling.3.weight", _tconv),
      "mask_decoder.upscale2_bias": ("mask_decoder.output_upscaling.3.bias", ident),
  }
  if name == "prompt_encoder.point_embed":
    keys = tuple(f"prompt_encoder.point_embeddings.{i}.weight" for i in range(shape[0]))
    return loader.FromSource(keys, lambda arrays: np.concatenate(arrays, axis=0))
  if name in fixed:
    key, fn = fixed[name]
    return loader.FromSource((key,), loader.single(fn))
  module, _, leaf = name.rpartition(".")
  orig = module + "."
  for pattern, repl in _SAM_RENAMES:
    orig = re.sub(pattern, repl, orig)
  return _leaf_source(name, orig, leaf, shape)


def _leaf_source(name: str, module: str, leaf: str, shape: tuple[int, ...]) -> loader.FromSource:
  """`kernel` / `scale` / `bias` of a linear or norm module whose checkpoint prefix is `module`."""
  if leaf == "kernel":
    return loader.FromSource((module + "weight",), loader.single(_linear(shape)))
  if leaf == "scale":
    return loader.FromSource((module + "weight",), loader.single(lambda a: a))
  if leaf == "bias":
    return loader.FromSource((module + "bias",), loader.single(lambda a: a.reshape(shape)))
  raise loader.CheckpointError(f"SAM decoder parameter '{name}' has no checkpoint name.")


def param_source(name: str, shape: tuple[int, ...]) -> loader.FromSource:
  """How to build our parameter `name` (dotted path) of `shape` from HF `SamModel` keys."""
  ident = lambda a: a
  fixed = {
      "prompt_encoder.pe.gaussian": (_PE_KEY, ident),
      "prompt_encoder.not_a_point_embed": ("prompt_encoder.not_a_point_embed.weight", lambda a: a[0]),
      "prompt_encoder.no_mask_embed": ("prompt_encoder.no_mask_embed.weight", lambda a: a[0]),
      "prompt_encoder.mask_embed.conv1": ("prompt_encoder.mask_embed.conv1.weight", _conv),
      "prompt_encoder.mask_embed.conv1_bias": ("prompt_encoder.mask_embed.conv1.bias", ident),
      "prompt_encoder.mask_embed.conv2": ("prompt_encoder.mask_embed.conv2.weight", _conv),
      "prompt_encoder.mask_embed.conv2_bias": ("prompt_encoder.mask_embed.conv2.bias", ident),
      "mask_decoder.iou_token": ("mask_decoder.iou_token.weight", lambda a: a[0]),
      "mask_decoder.mask_tokens": ("mask_decoder.mask_tokens.weight", ident),
      "mask_decoder.upscale1": ("mask_decoder.upscale_conv1.weight", _tconv),
      "mask_decoder.upscale1_bias": ("mask_decoder.upscale_conv1.bias", ident),
      "mask_decoder.upscale2": ("mask_decoder.upscale_conv2.weight", _tconv),
      "mask_decoder.upscale2_bias": ("mask_decoder.upscale_conv2.bias", ident),
  }
  if name == "prompt_encoder.point_embed":
    keys = tuple(f"prompt_encoder.point_embed.{i}.weight" for i in range(shape[0]))
    return loader.FromSource(keys, lambda arrays: np.concatenate(arrays, axis=0))
  if name in fixed:
    key, fn = fixed[name]
    return loader.FromSource((key,), loader.single(fn))
  module, _, leaf = name.rpartition(".")
  hf = module + "."
  for pattern, repl in _RENAMES:
    hf = re.sub(pattern, repl, hf)
  return _leaf_source(name, hf, leaf, shape)


def make_mapping(fmt: str = "hf", cfg: dec_lib.SamDecoderConfig | None = None) -> loader.Mapping:
  """Parameter path → source keys for `fmt` "hf" or "sam" (the latter needs `cfg` for MLP depths)."""
  if fmt not in ("hf", "sam"):
    raise ValueError(f"unknown SAM checkpoint format {fmt!r}: expected 'hf' or 'sam'.")

  def mapping(path: loader.Path, var: nnx.Variable) -> loader.FromSource:
    name, shape = loader.path_str(path), tuple(var.shape)
    if fmt == "hf":
      return param_source(name, shape)
    module, _, leaf = name.rpartition(".")
    renamed = _sam_mlp_layer(module + ".", cfg)
    if renamed != module + ".":
      return _leaf_source(name, renamed, leaf, shape)
    return _sam_param_source(name, shape, cfg)

  return mapping


def detect_layout(source: TensorSource) -> str:
  keys = set(source.keys())
  if _SAM_PE_KEY in keys:
    return "sam"
  if _PE_KEY in keys:
    return "hf"
  raise loader.CheckpointError(
      f"{source.path}: no SAM prompt encoder found (looked for '{_PE_KEY}' and '{_SAM_PE_KEY}').")


def _ignored(key: str) -> bool:
  return not (key.startswith("prompt_encoder.") or key.startswith("mask_decoder.")
              or key == _PE_KEY) or key == _TIED_PE_KEY


def config_from_source(source: TensorSource, fmt: str = "hf", **overrides) -> dec_lib.SamDecoderConfig:
  """Hyper-parameters read off the tensor shapes. num_heads, image_size and grid_size cannot be read
  off shapes: they keep their defaults (8, 1024, 64) unless given in `overrides`."""
  keys = set(source.keys())
  d = source.shape("prompt_encoder.no_mask_embed.weight")[-1]
  layer_re = re.compile(r"^mask_decoder\.transformer\.layers\.(\d+)\.")
  depth = len({int(m.group(1)) for k in keys if (m := layer_re.match(k))})
  layer0 = "mask_decoder.transformer.layers.0."
  if fmt == "sam":
    iou_layers = [k for k in keys if re.match(r"^mask_decoder\.iou_prediction_head\.layers\.\d+\.weight$", k)]
    fields = dict(
        mask_in_chans=source.shape("prompt_encoder.mask_downscaling.6.weight")[1],
        iou_head_depth=len(iou_layers),
        iou_head_hidden=source.shape("mask_decoder.iou_prediction_head.layers.0.weight")[0],
        block_norm_eps=1e-5)
  else:
    iou_layers = [k for k in keys if k.startswith("mask_decoder.iou_prediction_head.layers.")
                  and k.endswith(".weight")]
    fields = dict(
        mask_in_chans=source.shape("prompt_encoder.mask_embed.conv3.weight")[1],
        iou_head_depth=len(iou_layers) + 2,
        iou_head_hidden=source.shape("mask_decoder.iou_prediction_head.proj_in.weight")[0])
  fields.update(
      prompt_dim=d,
      depth=depth,
      mlp_dim=source.shape(layer0 + "mlp.lin1.weight")[0],
      attention_downsample_rate=d // source.shape(
          layer0 + "cross_attn_token_to_image.q_proj.weight")[0],
      num_multimask_outputs=source.shape("mask_decoder.mask_tokens.weight")[0] - 1)
  return dec_lib.SamDecoderConfig(**{**fields, **overrides})


def load_sam_decoder(path: str | os.PathLike, cfg: dec_lib.SamDecoderConfig | None = None, *,
                     mesh: Mesh | None = None, rules: sharding_lib.Rules = sharding_lib.DEFAULT_RULES,
                     seed: int = 0, report: dict | None = None, **overrides) -> dec_lib.SamDecoder:
  """Loads `SamDecoder` (prompt encoder + mask decoder) from a HF `SamModel` or original SAM checkpoint.

  Args:
    path: checkpoint file or directory.
    cfg: decoder config; default: read off the shapes (+ `overrides`, e.g. num_heads, image_size,
      grid_size, dtype).
    mesh, rules: target placement (default: first device).
    seed: Rngs seed for the abstract build; every parameter comes from the checkpoint.
    report: filled with what was loaded / initialised / left unused (`loader.load_model`).
  """
  with open_source(path) as source:
    fmt = detect_layout(source)
    if cfg is None:
      cfg = config_from_source(source, fmt, **overrides)
    elif overrides:
      cfg = cfg.replace(**overrides)
    return loader.load_model(lambda: dec_lib.SamDecoder(cfg, rngs=nnx.Rngs(seed)), source,
                             make_mapping(fmt, cfg), mesh=mesh, rules=rules, ignore_unused=_ignored,
                             report=report)
