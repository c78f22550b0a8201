"""Shared pieces of the PixelLLM configs (configs/*.py import these; nothing is copied between them).

    model_config(size)       → ConfigDict for the model: "xl" (SAM-H + EVA02-L + FLAN-T5-XL, LoRA r32,
                               384 px — SPEC §1) or "tiny" (same structure, CPU-sized)
    build_model_config(c)    → pixelground.models.pixelllm.PixelLLMConfig from that ConfigDict
    optimizer_config(...)    → AdamW + linear warm-up + cosine decay (SPEC §3)

Command line (the README's parameter-count check, nothing allocated — `nnx.eval_shape`):

    python -m pixelground.config.recipes count configs/ln_t5xl.py
"""

from __future__ import annotations

import sys
import typing as tp

import ml_collections

from pixelground.config.parse import from_config
from pixelground.models import eva02 as eva_lib
from pixelground.models import pixelllm as P
from pixelground.models import sam_decoder as dec_lib
from pixelground.models import sam_encoder as sam_lib
from pixelground.models import t5 as t5_lib
from pixelground.training import objective

# Published sizes of the parts (parameters), for the count check.
REFERENCE_SIZES = {"sam_encoder": ("SAM ViT-H image encoder", 632e6),
                   "eva": ("EVA02-L/14", 304e6),
                   "t5": ("FLAN-T5-XL", 2.85e9)}


def model_config(size: str = "xl", *, lisa: bool = False, image_size: int = 384,
                 vocab_size: int = 32128, seg_token_id: int = 32099) -> ml_collections.ConfigDict:
  """The model section of a config. Sub-model sections take any field of their dataclass; `preset`
  names the starting point (sam-vit-{b,l,h}, eva02-{b,l}-14, flan-t5-{small..xxl}, or "none")."""
  c = ml_collections.ConfigDict()
  c.size = size
  c.image_size = image_size
  c.lisa = lisa
  c.refseg = False
  c.proposals = False
  c.seg_token_id = seg_token_id if lisa else -1
  c.vocab_size = vocab_size
  if size == "tiny":
    return c
  c.sam = ml_collections.ConfigDict({"preset": "sam-vit-h", "dtype": "bfloat16",
                                     "param_dtype": "bfloat16"})
  c.eva = ml_collections.ConfigDict({"preset": "eva02-l-14", "dtype": "bfloat16",
                                     "param_dtype": "float32", "drop_path_rate": 0.1,
                                     "remat": "full"})
  c.t5 = ml_collections.ConfigDict({
      "preset": "flan-t5-xl", "dtype": "bfloat16", "param_dtype": "bfloat16", "scan_layers": True,
      "remat": "full", "lora_rank": 32, "lora_alpha": 64.0,
      "lora_targets": t5_lib.PIXELLLM_LORA_TARGETS})
  c.extractor = ml_collections.ConfigDict({"num_queries": 32, "extractor_width": 512,
                                           "extractor_depth": 6, "extractor_heads": 8,
                                           "extractor_mlp": 2048, "query_hidden": 1024})
  return c


def _sub(section: ml_collections.ConfigDict | None, presets: tp.Callable, cls, where: str):
  if section is None:
    return None
  d = dict(section.to_dict() if hasattr(section, "to_dict") else section)
  name = d.pop("preset", None)
  if name == "none":
    return None
  base = presets(name) if name else cls()
  return base.replace(**d) if d else base


def build_model_config(c: ml_collections.ConfigDict) -> P.PixelLLMConfig:
  """ConfigDict (see `model_config`) → PixelLLMConfig. Unknown fields raise, naming the key."""
  if c.size == "tiny":
    cfg = P.tiny_config(vocab_size=c.vocab_size, seg_token_id=c.seg_token_id, lisa=c.lisa,
                        image_size=c.image_size, refseg=c.get("refseg", False),
                        proposals=c.get("proposals", False))
    return _override(cfg, c.get("tiny", None), "config.model.tiny")
  for key, cls in (("sam", sam_lib.SamEncoderConfig), ("eva", eva_lib.Eva02Config),
                   ("t5", t5_lib.T5Config)):
    if key in c and c[key] is not None:  # validate field names (did-you-mean errors)
      fields = {k: v for k, v in c[key].to_dict().items() if k != "preset"}
      from_config(cls, ml_collections.ConfigDict(fields), where=f"config.model.{key}")
  sam = _sub(c.get("sam"), sam_lib.preset, sam_lib.SamEncoderConfig, "sam")
  eva = _sub(c.get("eva"), eva_lib.preset, eva_lib.Eva02Config, "eva")
  t5 = _sub(c.get("t5"), t5_lib.preset, t5_lib.T5Config, "t5").replace(vocab_size=c.vocab_size)
  grid = c.image_size // (eva.patch_size if eva else sam.patch_size)
  prompt = dec_lib.SamDecoderConfig(image_size=c.image_size, grid_size=grid)
  extra = c.extractor.to_dict() if "extractor" in c else {}
  return P.PixelLLMConfig(image_size=c.image_size, sam=sam, eva=eva, prompt=prompt, t5=t5,
                          lisa=c.lisa, refseg=c.get("refseg", False),
                          proposals=c.get("proposals", False), seg_token_id=c.seg_token_id, **extra)


def _override(cfg, section, where: str):
  """Applies `section` ({field: value, sub-config: {field: value}}) to a config dataclass; unknown
  fields raise naming the key."""
  import dataclasses

  if not section:
    return cfg
  fields = {f.name for f in dataclasses.fields(cfg)}
  top, subs = {}, {}
  for k, v in (section.to_dict() if hasattr(section, "to_dict") else dict(section)).items():
    if k not in fields:
      raise ValueError(f"{where}.{k}: not a field of {type(cfg).__name__} (fields: {sorted(fields)})")
    (subs if isinstance(v, dict) else top)[k] = tuple(v) if isinstance(v, list) else v
  sub_cfgs = {k: _override(getattr(cfg, k), v, f"{where}.{k}") for k, v in subs.items()}
  return cfg.replace(**top, **sub_cfgs)


def loss_config(c: ml_collections.ConfigDict) -> objective.LossConfig:
  """`config.loss` (any LossConfig field; unknown keys raise naming the key) + per-task text-loss
  weights from `config.tasks[name].loss_weight` (default 1), in task order = task_id order."""
  fields = dict(c.loss.to_dict()) if "loss" in c else {}
  if "tasks" in c:
    fields["task_weights"] = tuple(float(t.get("loss_weight", 1.0)) for t in c.tasks.values())
  return from_config(objective.LossConfig, ml_collections.ConfigDict(fields), where="config.loss")


def optimizer_config(*, lr: float, steps: int, warmup: int, weight_decay: float = 0.0,
                     batch_size: int, **extra) -> ml_collections.ConfigDict:
  """AdamW (default betas), no clipping, no weight decay on 1-D params, LR = base × linear warm-up ×
  cosine decay to 0 (SPEC §3)."""
  return ml_collections.ConfigDict(dict(name="adamw", learning_rate=lr, total_steps=steps,
                                        warmup_steps=warmup, weight_decay=weight_decay,
                                        batch_size=batch_size, b1=0.9, b2=0.999, **extra))


def count(config_path: str) -> dict[str, tp.Any]:
  """Parameter counts of the config's model from `nnx.eval_shape` (nothing is allocated)."""
  from pixelground.config.parse import load_config

  full = load_config(config_path)
  cfg = build_model_config(full.model)
  keep = P.trainable_filter(tuple(full.get("trainable", P.TRAINABLE)), lora=full.get("train_lora", True))
  return {**P.param_counts(cfg, keep), "train_lora": full.get("train_lora", True)}


def main(argv: list[str]) -> None:
  if len(argv) != 3 or argv[1] != "count":
    raise SystemExit("usage: python -m pixelground.config.recipes count CONFIG.py")
  r = count(argv[2])
  print(f"{'part':16s} {'parameters':>15s}")
  for name, n in sorted(r["parts"].items(), key=lambda kv: -kv[1]):
    ref = REFERENCE_SIZES.get(name)
    note = f"   (published {ref[0]}: {ref[1] / 1e6:,.0f}M)" if ref else ""
    print(f"{name:16s} {n:15,d}{note}")
  print(f"{'  of which LoRA':16s} {r['lora']:15,d}")
  print(f"{'total':16s} {r['total']:15,d}")
  print(f"{'trainable':16s} {r['trainable']:15,d}   (the config's `trainable` patterns"
        f"{' + LoRA' if r['train_lora'] else ''})")


if __name__ == "__main__":
  main(sys.argv)
