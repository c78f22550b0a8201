"""Imports Hugging Face `SwinModel` weights into `pixelground.models.swin.Swin`.

Input: a directory with `config.json` + `model.safetensors` (or anything `open_source` reads), as written
by `SwinModel.save_pretrained` / found on the Hub (e.g. microsoft/swin-tiny-patch4-window7-224).
Accepted key layouts (auto-detected):
  * on-disk names: `encoder.layers.{s}.blocks.{b}.attention.self.{query,key,value}.{weight,bias}`,
    `...attention.self.relative_position_bias_table`, `...attention.output.dense.*`,
    `...intermediate.dense.*`, `...output.dense.*`, `...layernorm_{before,after}.*`;
  * transformers ≥ 5 in-memory names (a raw `state_dict()`): `...attention.{q,k,v,o}_proj.*`,
    `...attention.relative_position_bias.relative_position_bias_table`, `...mlp.fc{1,2}.*`;
  * either under a `swin.` prefix (SwinForImageClassification / SwinForMaskedImageModeling).
Global keys: `embeddings.patch_embeddings.projection.*`, `embeddings.norm.*`,
`encoder.layers.{s}.downsample.{norm,reduction}.*`, `layernorm.*` (our `final_norm`).

q, k and v stay separate parameters (as in the checkpoint), reshaped to (D, heads, head_dim).
Conversions: linear (out, in) → (in, out); conv (out, in, kh, kw) → (kh, kw, in, out).
Ignored source keys (`ignore_unused`): `relative_position_index` buffers (older checkpoints store them;
they are fixed by the window size and recomputed by the model), heads of task models (`classifier.*`,
`decoder.*`, `pooler.*`), `embeddings.mask_token`.
"""

from __future__ import annotations

import os
import re

from flax import nnx
from jax.sharding import Mesh

from pixelground.parallel import sharding as sharding_lib
from pixelground.checkpoints import loader
from pixelground.checkpoints.sources import TensorSource, open_source
from pixelground.models import swin as swin_lib

# Our name inside a block → (on-disk name, in-memory transformers-5 name) under
# `encoder.layers.{s}.blocks.{b}.`.
_BLOCK = {
    "norm1.scale": ("layernorm_before.weight",) * 2,
    "norm1.bias": ("layernorm_before.bias",) * 2,
    "norm2.scale": ("layernorm_after.weight",) * 2,
    "norm2.bias": ("layernorm_after.bias",) * 2,
    "attn.q.kernel": ("attention.self.query.weight", "attention.q_proj.weight"),
    "attn.q.bias": ("attention.self.query.bias", "attention.q_proj.bias"),
    "attn.k.kernel": ("attention.self.key.weight", "attention.k_proj.weight"),
    "attn.k.bias": ("attention.self.key.bias", "attention.k_proj.bias"),
    "attn.v.kernel": ("attention.self.value.weight", "attention.v_proj.weight"),
    "attn.v.bias": ("attention.self.value.bias", "attention.v_proj.bias"),
    "attn.proj.kernel": ("attention.output.dense.weight", "attention.o_proj.weight"),
    "attn.proj.bias": ("attention.output.dense.bias", "attention.o_proj.bias"),
    "attn.relpos_table": ("attention.self.relative_position_bias_table",
                          "attention.relative_position_bias.relative_position_bias_table"),
    "fc1.kernel": ("intermediate.dense.weight", "mlp.fc1.weight"),
    "fc1.bias": ("intermediate.dense.bias", "mlp.fc1.bias"),
    "fc2.kernel": ("output.dense.weight", "mlp.fc2.weight"),
    "fc2.bias": ("output.dense.bias", "mlp.fc2.bias"),
}
_GLOBAL = {
    "patch_embed.kernel": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.bias": "embeddings.patch_embeddings.projection.bias",
    "embed_norm.scale": "embeddings.norm.weight",
    "embed_norm.bias": "embeddings.norm.bias",
    "final_norm.scale": "layernorm.weight",
    "final_norm.bias": "layernorm.bias",
}
_MERGE = {
    "norm.scale": "downsample.norm.weight",
    "norm.bias": "downsample.norm.bias",
    "reduction.kernel": "downsample.reduction.weight",
}

_BLOCK_PATH = re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.(.+)$")
_MERGE_PATH = re.compile(r"^stages\.(\d+)\.downsample\.(.+)$")
_IGNORED = re.compile(r"(relative_position_index$|^classifier\.|^decoder\.|^pooler\.|mask_token$)")


def _transform(cfg: swin_lib.SwinConfig, name: str, stage: int | None):
  if name == "patch_embed.kernel":
    return lambda a: a.transpose(2, 3, 1, 0)  # (out, in, kh, kw) → (kh, kw, in, out)
  if stage is not None and name.startswith("attn."):
    h = cfg.num_heads[stage]
    d = cfg.stage_dim(stage)
    if re.fullmatch(r"attn\.[qkv]\.kernel", name):
      return lambda a: a.T.reshape(d, h, d // h)  # (H·K, D) → (D, H, K)
    if re.fullmatch(r"attn\.[qkv]\.bias", name):
      return lambda a: a.reshape(h, d // h)
    if name == "attn.proj.kernel":
      return lambda a: a.T.reshape(h, d // h, d)  # (D, H·K) → (H, K, D)
  if name.endswith(".kernel"):
    return lambda a: a.T  # linear (out, in) → (in, out)
  return lambda a: a


def detect_layout(source: TensorSource) -> tuple[str, int]:
  """(prefix, layout) with prefix "" or "swin." and layout 0 (on-disk names) or 1 (in-memory names)."""
  keys = set(source.keys())
  prefix = "swin." if "swin.embeddings.norm.weight" in keys else ""
  layout = 1 if f"{prefix}encoder.layers.0.blocks.0.attention.q_proj.weight" in keys else 0
  return prefix, layout


def make_mapping(cfg: swin_lib.SwinConfig, prefix: str = "", layout: int = 0) -> loader.Mapping:
  """Parameter path → transformers key(s) and conversion."""

  def mapping(path: loader.Path, var: nnx.Variable) -> loader.FromSource | None:
    del var
    name = loader.path_str(path)
    if name in _GLOBAL:
      return loader.FromSource((prefix + _GLOBAL[name],), loader.single(_transform(cfg, name, None)))
    m = _BLOCK_PATH.match(name)
    if m and m.group(3) in _BLOCK:
      s, b, local = int(m.group(1)), int(m.group(2)), m.group(3)
      key = f"{prefix}encoder.layers.{s}.blocks.{b}.{_BLOCK[local][layout]}"
      return loader.FromSource((key,), loader.single(_transform(cfg, local, s)))
    m = _MERGE_PATH.match(name)
    if m and m.group(2) in _MERGE:
      key = f"{prefix}encoder.layers.{m.group(1)}.{_MERGE[m.group(2)]}"
      return loader.FromSource((key,), loader.single(_transform(cfg, m.group(2), None)))
    raise loader.CheckpointError(f"Swin parameter '{name}' has no transformers checkpoint name.")

  return mapping


def load_swin(path: str | os.PathLike, cfg: swin_lib.SwinConfig | None = None, *,
              mesh: Mesh | None = None, rules: sharding_lib.Rules = sharding_lib.DEFAULT_RULES,
              seed: int = 0, strict: bool = True, **overrides) -> swin_lib.Swin:
  """Loads a transformers Swin checkpoint into a new `Swin`, streaming tensors into their shardings.

  Args:
    path: checkpoint file or directory.
    cfg: model config; default: from `config.json` next to the weights.
    mesh, rules: target placement (default: first device).
    seed: Rngs seed for the abstract model build (every parameter is in the checkpoint).
    strict: raise on checkpoint keys nothing consumed (beyond the ignored ones, see module doc).
    **overrides: `SwinConfig` fields to change (dtype, param_dtype, always_partition, ...).
  """
  if cfg is None:
    cfg = swin_lib.config_from_hf(loader.read_hf_config(path, "SwinConfig"), **overrides)
  elif overrides:
    cfg = cfg.replace(**overrides)
  with open_source(path) as source:
    prefix, layout = detect_layout(source)
    return loader.load_model(lambda: swin_lib.Swin(cfg, rngs=nnx.Rngs(seed)), source,
                             make_mapping(cfg, prefix, layout), mesh=mesh, rules=rules,
                             ignore_unused=lambda k: bool(_IGNORED.search(k.removeprefix(prefix))),
                             strict=strict)
