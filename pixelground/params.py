r"""Parameter counts of a config's model, from `nnx.eval_shape` (nothing is allocated; ~10 s for XL).

    python -m pixelground.params --config=configs/ln_t5xl.py [--config.key=value ...]

Prints each top-level part with the published size where there is one, LoRA, the total and what the
config trains (its `trainable` patterns + LoRA when `train_lora`); the last line is JSON.
"""

from __future__ import annotations

import json
import typing as tp

from absl import app
from ml_collections import config_flags

# Published sizes of the parts (parameters).
REFERENCE_SIZES = {"sam_encoder": ("SAM ViT-H image encoder", 632e6),
                   "eva": ("EVA02-L/14", 304e6),
                   "t5": ("FLAN-T5-XL", 2.85e9)}


def count(config) -> dict[str, tp.Any]:
  """{"parts": {part: n}, "lora", "t5_base", "total", "trainable", "train_lora"} of a config."""
  from pixelground.config import schema
  from pixelground.models import pixelllm as P

  cfg = schema.parse(config)
  keep = P.trainable_filter(cfg.trainable, lora=cfg.train_lora)
  return {**P.param_counts(cfg.model, keep), "train_lora": cfg.train_lora}


def main(argv):
  del argv
  r = count(_CONFIG.value)
  print(f"{'part':16s} {'parameters':>15s}")
  for name, n in sorted(r["parts"].items(), key=lambda kv: -kv[1]):
    ref = REFERENCE_SIZES.get(name)
    note = f"   (published {ref[0]}: {ref[1] / 1e6:,.0f}M)" if ref else ""
    print(f"{name:16s} {n:15,d}{note}")
  print(f"{'  of which LoRA':16s} {r['lora']:15,d}")
  print(f"{'total':16s} {r['total']:15,d}")
  print(f"{'trainable':16s} {r['trainable']:15,d}   (the config's `trainable` patterns"
        f"{' + LoRA' if r['train_lora'] else ''})")
  print(json.dumps(r), flush=True)


if __name__ == "__main__":
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (get_config(arg)).",
                                            lock_config=False)
  app.run(main)
