"""Imports SAM image-encoder weights into `pixelground.models.sam_encoder.SamImageEncoder`.

Supported inputs (any file/directory `open_source` reads: `.pth`/`.bin` without executing pickled code,
`.safetensors`, sharded indexes, HF directories):
  * the original segment-anything state dicts `sam_vit_{b,l,h}_*.pth` ("sam" layout): keys
    `image_encoder.patch_embed.proj.*`, `image_encoder.pos_embed`, `image_encoder.blocks.{i}.norm1.*`,
    `...attn.qkv.*`, `...attn.proj.*`, `...attn.rel_pos_{h,w}`, `...norm2.*`, `...mlp.lin{1,2}.*`,
    `image_encoder.neck.{0,1,2,3}.*`;
  * Hugging Face `SamModel` / `SamVisionModel` ("hf" layout): `vision_encoder.patch_embed.projection.*`,
    `vision_encoder.pos_embed`, `vision_encoder.layers.{i}.layer_norm{1,2}.*`, `...attn.*`,
    `...mlp.lin{1,2}.*`, `vision_encoder.neck.{conv1,layer_norm1,conv2,layer_norm2}.*`.
The prefix (`image_encoder.`, `vision_encoder.` or none, for a bare encoder state dict) and the layout
are detected from the patch-embedding key. Keys outside the prefix (prompt encoder, mask decoder,
`shared_image_embedding`) are ignored; keys inside it must all be used (strict).

PyTorch conv weights (out, in, kh, kw) become (kh, kw, in, out); linear weights (out, in) become
(in, out); the fused qkv weight (3·D, D) becomes (D, 3, H, K) (torch's output order is (3, H, K)).

Without a config the encoder's hyper-parameters are read off the tensor shapes (width, depth, heads
from the rel-pos tables' head dim, window and global blocks from the rel-pos table lengths, patch
size, image size, out channels).

Example:
    encoder = load_sam_image_encoder("/ckpt/sam_vit_h_4b8939.pth", dtype="bfloat16", mesh=mesh)
"""

from __future__ import annotations

import os
import re
import typing as tp

import numpy as np
from flax import nnx
from jax.sharding import Mesh

from pixelground.parallel import sharding as sharding_lib
from pixelground.checkpoints import loader
from pixelground.checkpoints.sam_decoder import load_sam_decoder
from pixelground.checkpoints.sources import TensorSource, open_source
from pixelground.models import sam_encoder as sam_lib

# Our parameter name → checkpoint name (without prefix); block entries are formatted with {i}.
_NAMES = {
    "hf": {
        "patch_embed_kernel": "patch_embed.projection.weight",
        "patch_embed_bias": "patch_embed.projection.bias",
        "pos_embed": "pos_embed",
        "block": "layers.{i}.",
        "norm1": "layer_norm1", "norm2": "layer_norm2",
        "neck.conv1": "neck.conv1.weight", "neck.norm1": "neck.layer_norm1",
        "neck.conv2": "neck.conv2.weight", "neck.norm2": "neck.layer_norm2",
    },
    "sam": {
        "patch_embed_kernel": "patch_embed.proj.weight",
        "patch_embed_bias": "patch_embed.proj.bias",
        "pos_embed": "pos_embed",
        "block": "blocks.{i}.",
        "norm1": "norm1", "norm2": "norm2",
        "neck.conv1": "neck.0.weight", "neck.norm1": "neck.1",
        "neck.conv2": "neck.2.weight", "neck.norm2": "neck.3",
    },
}
_PREFIXES = ("image_encoder.", "vision_encoder.", "")
_BLOCK_PATH = re.compile(r"^blocks\.layers\.(\d+)\.(.+)$")


def _conv(a: np.ndarray) -> np.ndarray:
  return np.transpose(a, (2, 3, 1, 0))  # (out, in, kh, kw) → (kh, kw, in, out)


def _param_source(cfg: sam_lib.SamEncoderConfig, fmt: str, name: str
                  ) -> tuple[str, tp.Callable[[np.ndarray], np.ndarray]]:
  """Checkpoint key (without prefix) and converter for our parameter `name`."""
  t = _NAMES[fmt]
  d, h, k = cfg.width, cfg.num_heads, cfg.head_dim
  ident = lambda a: a
  norm_field = {"scale": "weight", "bias": "bias"}
  if name == "patch_embed_kernel":
    return t[name], _conv
  if name in ("patch_embed_bias", "pos_embed"):
    return t[name], ident
  if name in ("neck.conv1", "neck.conv2"):
    return t[name], _conv
  m = re.match(r"^(neck\.norm[12])\.(scale|bias)$", name)
  if m:
    return f"{t[m.group(1)]}.{norm_field[m.group(2)]}", ident
  m = _BLOCK_PATH.match(name)
  if not m:
    raise loader.CheckpointError(f"SAM encoder parameter '{name}' has no {fmt} checkpoint name.")
  block, local = t["block"].format(i=int(m.group(1))), m.group(2)
  table = {
      "attn.qkv_kernel": ("attn.qkv.weight", lambda a: a.T.reshape(d, 3, h, k)),
      "attn.qkv_bias": ("attn.qkv.bias", lambda a: a.reshape(3, h, k)),
      "attn.proj_kernel": ("attn.proj.weight", lambda a: a.T.reshape(h, k, d)),
      "attn.proj_bias": ("attn.proj.bias", ident),
      "attn.rel_pos_h": ("attn.rel_pos_h", ident),
      "attn.rel_pos_w": ("attn.rel_pos_w", ident),
      "lin1.kernel": ("mlp.lin1.weight", lambda a: a.T),
      "lin1.bias": ("mlp.lin1.bias", ident),
      "lin2.kernel": ("mlp.lin2.weight", lambda a: a.T),
      "lin2.bias": ("mlp.lin2.bias", ident),
  }
  m2 = re.match(r"^(norm[12])\.(scale|bias)$", local)
  if m2:
    return f"{block}{t[m2.group(1)]}.{norm_field[m2.group(2)]}", ident
  if local not in table:
    raise loader.CheckpointError(f"SAM encoder parameter '{name}' has no {fmt} checkpoint name.")
  key, fn = table[local]
  return block + key, fn


def make_mapping(cfg: sam_lib.SamEncoderConfig, fmt: str, prefix: str) -> loader.Mapping:
  """Parameter path → source key for `fmt` in {"hf", "sam"}, keys starting with `prefix`."""
  if fmt not in _NAMES:
    raise ValueError(f"unknown SAM checkpoint format {fmt!r}: expected 'hf' or 'sam'.")

  def mapping(path: loader.Path, var: nnx.Variable) -> loader.FromSource:
    del var
    key, fn = _param_source(cfg, fmt, loader.path_str(path))
    return loader.FromSource((prefix + key,), loader.single(fn))

  return mapping


def detect_layout(source: TensorSource) -> tuple[str, str]:
  """(format, prefix): "sam" or "hf", and "image_encoder." / "vision_encoder." / ""."""
  keys = set(source.keys())
  for prefix in _PREFIXES:
    for fmt, names in _NAMES.items():
      if prefix + names["patch_embed_kernel"] in keys:
        return fmt, prefix
  raise loader.CheckpointError(
      f"{source.path}: no SAM image encoder found (looked for "
      f"'{{image_encoder.,vision_encoder.,}}patch_embed.{{proj,projection}}.weight').")


def config_from_source(source: TensorSource, fmt: str, prefix: str, **overrides
                       ) -> sam_lib.SamEncoderConfig:
  """Encoder hyper-parameters read off the checkpoint's tensor shapes (no data is read)."""
  t = _NAMES[fmt]
  width, _, patch, _ = source.shape(prefix + t["patch_embed_kernel"])
  grid = source.shape(prefix + "pos_embed")[1]
  block_re = re.compile(re.escape(prefix) + t["block"].replace(".", r"\.").format(i=r"(\d+)")
                        + r"attn\.rel_pos_h$")
  tables = {}
  for key in source.keys():
    m = block_re.match(key)
    if m:
      tables[int(m.group(1))] = source.shape(key)
  depth = len(tables)
  head_dim = tables[0][1]
  global_blocks = tuple(i for i in range(depth) if tables[i][0] == 2 * grid - 1)
  windowed = {tables[i][0] for i in range(depth) if i not in global_blocks}
  window = (next(iter(windowed)) + 1) // 2 if windowed else sam_lib.SamEncoderConfig.window_size
  out_channels = source.shape(prefix + t["neck.conv1"])[0]
  mlp_dim = source.shape(prefix + t["block"].format(i=0) + "mlp.lin1.weight")[0]
  fields = dict(image_size=grid * patch, patch_size=patch, width=width, depth=depth,
                num_heads=width // head_dim, mlp_ratio=mlp_dim / width, window_size=window,
                global_blocks=global_blocks, out_channels=out_channels)
  return sam_lib.SamEncoderConfig(**{**fields, **overrides})


def load_sam_image_encoder(path: str | os.PathLike, cfg: sam_lib.SamEncoderConfig | None = None, *,
                           mesh: Mesh | None = None,
                           rules: sharding_lib.Rules = sharding_lib.DEFAULT_RULES,
                           prefix: str | None = None, seed: int = 0, report: dict | None = None,
                           **overrides) -> sam_lib.SamImageEncoder:
  """Loads a SAM image encoder (original `.pth` or HF `SamModel`), streaming tensors into shardings.

  Args:
    path: checkpoint file or directory.
    cfg: encoder config; default: inferred from the tensor shapes.
    mesh, rules: target placement (default: first device).
    prefix: key prefix of the encoder; default: auto-detected ("image_encoder.", "vision_encoder.", "").
    seed: Rngs seed for building the (abstract) model; every parameter comes from the checkpoint.
    report: filled with what was loaded / initialised / left unused (`loader.load_model`).
    **overrides: `SamEncoderConfig` fields to change (dtype, param_dtype, remat, ...).

  Keys that do not start with the prefix (prompt encoder, mask decoder, shared embeddings) are ignored.
  """
  with open_source(path) as source:
    fmt, found = detect_layout(source)
    prefix = found if prefix is None else prefix
    if cfg is None:
      cfg = config_from_source(source, fmt, prefix, **overrides)
    elif overrides:
      cfg = cfg.replace(**overrides)
    ignore = (lambda key: not key.startswith(prefix)) if prefix else (lambda key: False)
    return loader.load_model(lambda: sam_lib.SamImageEncoder(cfg, rngs=nnx.Rngs(seed)), source,
                             make_mapping(cfg, fmt, prefix), mesh=mesh, rules=rules,
                             ignore_unused=ignore, report=report)


def load_sam(path: str | os.PathLike, *, mesh: Mesh | None = None,
             rules: sharding_lib.Rules = sharding_lib.DEFAULT_RULES, encoder_overrides=None,
             decoder_overrides=None):
  """Loads a whole SAM checkpoint (original `.pth` or HF `SamModel`): image encoder and decoder.

  The decoder's image size and embedding grid are taken from the encoder (1024 px → 64×64 for the
  released models); its head count stays 8 (SAM's) unless `decoder_overrides` says otherwise.

  Returns:
    (SamImageEncoder, SamDecoder), both placed on `mesh` by `rules`.
  """
  encoder = load_sam_image_encoder(path, mesh=mesh, rules=rules, **(encoder_overrides or {}))
  dec_kw = dict(image_size=encoder.cfg.image_size, grid_size=encoder.cfg.grid_size)
  dec_kw.update(decoder_overrides or {})
  return encoder, load_sam_decoder(path, mesh=mesh, rules=rules, **dec_kw)
