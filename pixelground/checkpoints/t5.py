"""Imports T5 / FLAN-T5 weights from Hugging Face and T5X checkpoints into `pixelground.models.t5.T5`.

Supported inputs (auto-detected by `open_source`):
  * Hugging Face: a directory with `config.json` and `model.safetensors`, sharded
    `model-0000X-of-0000Y.safetensors` + `model.safetensors.index.json`, or `pytorch_model.bin`
    (loaded without executing pickled code). PyTorch linear weights are (out, in) and are transposed.
  * T5X (see `pixelground.checkpoints.t5x` for the two on-disk layouts): parameters under `target/` with
    the names of T5X's `examples/t5` model (per-layer `layers_{i}`, unscanned). Attention kernels may be 2-D
    (D, H·K) or 3-D (D, H, K); relative position tables are (H, buckets).

Example:
    model = load_t5("/ckpt/flan-t5-xl", mesh=mesh, rules=rules, lora_rank=32, lora_alpha=64,
                    lora_targets=PIXELLLM_LORA_TARGETS)
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
from pixelground.checkpoints.sources import TensorSource, open_source
from pixelground.models import t5 as t5_lib

# Our per-layer parameter name → HF name inside a block (format with {i}); None-able by activation.
_HF_ENCODER = {
    "attn_norm.scale": "encoder.block.{i}.layer.0.layer_norm.weight",
    "attn.{p}.kernel": "encoder.block.{i}.layer.0.SelfAttention.{p}.weight",
    "mlp_norm.scale": "encoder.block.{i}.layer.1.layer_norm.weight",
    "mlp.{w}.kernel": "encoder.block.{i}.layer.1.DenseReluDense.{w}.weight",
}
_HF_DECODER = {
    "self_attn_norm.scale": "decoder.block.{i}.layer.0.layer_norm.weight",
    "self_attn.{p}.kernel": "decoder.block.{i}.layer.0.SelfAttention.{p}.weight",
    "cross_attn_norm.scale": "decoder.block.{i}.layer.1.layer_norm.weight",
    "cross_attn.{p}.kernel": "decoder.block.{i}.layer.1.EncDecAttention.{p}.weight",
    "mlp_norm.scale": "decoder.block.{i}.layer.2.layer_norm.weight",
    "mlp.{w}.kernel": "decoder.block.{i}.layer.2.DenseReluDense.{w}.weight",
}
_HF_GLOBAL = {
    "token_embed": "shared.weight",
    "lm_head": "lm_head.weight",
    "encoder.relpos.embedding": "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
    "decoder.relpos.embedding": "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
    "encoder.final_norm.scale": "encoder.final_layer_norm.weight",
    "decoder.final_norm.scale": "decoder.final_layer_norm.weight",
}

_T5X_ATTN = {"q": "query", "k": "key", "v": "value", "o": "out"}
_T5X_ENCODER = {
    "attn_norm.scale": "target/encoder/layers_{i}/pre_attention_layer_norm/scale",
    "attn.{p}.kernel": "target/encoder/layers_{i}/attention/{t5x_p}/kernel",
    "mlp_norm.scale": "target/encoder/layers_{i}/pre_mlp_layer_norm/scale",
    "mlp.{w}.kernel": "target/encoder/layers_{i}/mlp/{w}/kernel",
}
_T5X_DECODER = {
    "self_attn_norm.scale": "target/decoder/layers_{i}/pre_self_attention_layer_norm/scale",
    "self_attn.{p}.kernel": "target/decoder/layers_{i}/self_attention/{t5x_p}/kernel",
    "cross_attn_norm.scale": "target/decoder/layers_{i}/pre_cross_attention_layer_norm/scale",
    "cross_attn.{p}.kernel": "target/decoder/layers_{i}/encoder_decoder_attention/{t5x_p}/kernel",
    "mlp_norm.scale": "target/decoder/layers_{i}/pre_mlp_layer_norm/scale",
    "mlp.{w}.kernel": "target/decoder/layers_{i}/mlp/{w}/kernel",
}
_T5X_GLOBAL = {
    "token_embed": "target/token_embedder/embedding",
    "lm_head": "target/decoder/logits_dense/kernel",
    "encoder.relpos.embedding": "target/encoder/relpos_bias/rel_embedding",
    "decoder.relpos.embedding": "target/decoder/relpos_bias/rel_embedding",
    "encoder.final_norm.scale": "target/encoder/encoder_norm/scale",
    "decoder.final_norm.scale": "target/decoder/decoder_norm/scale",
}

_LAYER_PATH = re.compile(r"^(encoder|decoder)\.layers\.layers\.(?:(\d+)\.)?(.+)$")


def _split_layer_name(name: str) -> tuple[str, str]:
  """'self_attn.q.kernel' → ('self_attn.{p}.kernel', 'q'); 'mlp.wi_0.kernel' → ('mlp.{w}.kernel', 'wi_0');
  other names → (name, '')."""
  m = re.match(r"^(attn|self_attn|cross_attn)\.(q|k|v|o)\.kernel$", name)
  if m:
    return f"{m.group(1)}.{{p}}.kernel", m.group(2)
  m = re.match(r"^mlp\.(wi_0|wi_1|wi|wo)\.kernel$", name)
  if m:
    return "mlp.{w}.kernel", m.group(1)
  return name, ""


def _hf_transform(cfg: t5_lib.T5Config, name: str) -> tp.Callable[[np.ndarray], np.ndarray]:
  h, k, d = cfg.num_heads, cfg.head_dim, cfg.d_model
  if re.search(r"attn\.(q|k|v)\.kernel$", name):
    return lambda a: a.T.reshape(d, h, k)  # (H·K, D) → (D, H, K)
  if re.search(r"attn\.o\.kernel$", name):
    return lambda a: a.T.reshape(h, k, d)  # (D, H·K) → (H, K, D)
  if name.endswith(".kernel") or name == "lm_head":
    return lambda a: a.T  # (out, in) → (in, out)
  return lambda a: a


def _t5x_transform(cfg: t5_lib.T5Config, name: str) -> tp.Callable[[np.ndarray], np.ndarray]:
  h, k, d = cfg.num_heads, cfg.head_dim, cfg.d_model
  if re.search(r"attn\.(q|k|v)\.kernel$", name):
    return lambda a: a.reshape(d, h, k)
  if re.search(r"attn\.o\.kernel$", name):
    return lambda a: a.reshape(h, k, d)
  if name.endswith("relpos.embedding"):
    return lambda a: a.T  # T5X stores (H, buckets)
  return lambda a: a


def make_mapping(cfg: t5_lib.T5Config, fmt: str) -> loader.Mapping:
  """Parameter path → source keys for `fmt` in {"hf", "t5x"}. LoRA factors are not in checkpoints."""
  tables = {"hf": (_HF_ENCODER, _HF_DECODER, _HF_GLOBAL, _hf_transform),
            "t5x": (_T5X_ENCODER, _T5X_DECODER, _T5X_GLOBAL, _t5x_transform)}
  if fmt not in tables:
    raise ValueError(f"unknown T5 checkpoint format {fmt!r}")
  enc_table, dec_table, glob_table, transform = tables[fmt]

  def mapping(path: loader.Path, var: nnx.Variable) -> loader.FromSource | None:
    if isinstance(var, nnx.LoRAParam):
      return None
    name = loader.path_str(path)
    if name in glob_table:
      return loader.FromSource((glob_table[name],), loader.single(transform(cfg, name)))
    m = _LAYER_PATH.match(name)
    if not m:
      raise loader.CheckpointError(f"T5 parameter '{name}' has no {fmt} checkpoint name.")
    stack, index, local = m.group(1), m.group(2), m.group(3)
    template, part = _split_layer_name(local)
    table = enc_table if stack == "encoder" else dec_table
    if template not in table:
      raise loader.CheckpointError(f"T5 parameter '{name}' has no {fmt} checkpoint name.")
    n_layers = cfg.num_encoder_layers if stack == "encoder" else cfg.num_decoder_layers
    fill = dict(p=part, w=part, t5x_p=_T5X_ATTN.get(part, part))
    fn = transform(cfg, local)
    if index is not None:  # unrolled layers
      return loader.FromSource((table[template].format(i=int(index), **fill),), loader.single(fn))
    keys = tuple(table[template].format(i=i, **fill) for i in range(n_layers))
    return loader.FromSource(keys, loader.stacked(fn))

  return mapping


def _hf_ignorable(cfg: t5_lib.T5Config) -> tp.Callable[[str], bool]:
  # HF aliases the shared embedding as encoder/decoder.embed_tokens; tied models may also store lm_head.
  aliases = {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}
  if cfg.tie_embeddings:
    aliases.add("lm_head.weight")
  return lambda key: key in aliases


def _t5x_ignorable(key: str) -> bool:
  return not key.startswith("target/")


def detect_format(source: TensorSource) -> str:
  return "t5x" if any(k.startswith("target/") for k in source.keys()) else "hf"


def load_t5(path: str | os.PathLike, cfg: t5_lib.T5Config | None = None, *, mesh: Mesh | None = None,
            rules: sharding_lib.Rules = sharding_lib.DEFAULT_RULES, seed: int = 0, strict: bool = True,
            report: dict | None = None, **overrides) -> t5_lib.T5:
  """Loads a T5 checkpoint (HF or T5X) into a new `T5`, streaming tensors into their shardings.

  Args:
    path: checkpoint file or directory.
    cfg: model config; default: from the HF `config.json` (T5X checkpoints need `cfg`).
    mesh, rules: target placement (default: first device).
    seed: for parameters absent from checkpoints (LoRA A).
    report: filled with what was loaded / initialised / left unused (`loader.load_model`).
    **overrides: `T5Config` fields to change (dtype, param_dtype, scan_layers, lora_*, ...).
  """
  with open_source(path) as source:
    fmt = detect_format(source)
    if cfg is None:
      if fmt == "t5x":
        raise ValueError(f"{path}: T5X checkpoints carry no model config; pass cfg=t5.preset(...).")
      cfg = t5_lib.config_from_hf(loader.read_hf_config(path, "T5Config"), **overrides)
      if fmt == "hf" and "tie_embeddings" not in overrides:
        cfg = cfg.replace(tie_embeddings="lm_head.weight" not in source)
    elif overrides:
      cfg = cfg.replace(**overrides)
    ignore = _hf_ignorable(cfg) if fmt == "hf" else _t5x_ignorable
    return loader.load_model(lambda: t5_lib.T5(cfg, rngs=nnx.Rngs(seed)), source,
                             make_mapping(cfg, fmt), mesh=mesh, rules=rules, ignore_unused=ignore,
                             strict=strict, report=report)


def export_t5x_target(model: t5_lib.T5) -> dict[str, np.ndarray]:
  """The model's base weights under T5X names (without `target/`), e.g. to write with
  `pixelground.checkpoints.t5x.save_t5x_checkpoint`. Merge LoRA first to include it."""
  cfg = model.cfg
  mapping = make_mapping(cfg, "t5x")
  out: dict[str, np.ndarray] = {}
  flat, _ = loader.flatten_state(nnx.state(model))
  for path, var in flat:
    plan = mapping(path, var)
    if plan is None:
      continue
    value = np.asarray(var.get_value())
    name = loader.path_str(path)
    values = list(value) if len(plan.keys) > 1 else [value]
    for key, v in zip(plan.keys, values):
      if name.endswith("relpos.embedding"):
        v = v.T  # T5X stores (H, buckets)
      elif re.search(r"attn\.(q|k|v)\.kernel$", name):
        v = v.reshape(cfg.d_model, -1)
      elif re.search(r"attn\.o\.kernel$", name):
        v = v.reshape(-1, cfg.d_model)
      out[key[len("target/"):]] = v
  return out
