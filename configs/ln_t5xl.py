r"""PixelLLM Localized-Narratives trace stage, full size (SPEC §3 row 1).

SAM-H (frozen) + EVA02-L + FLAN-T5-XL with LoRA r32 on q/v of encoder self-, decoder self- and cross-
attention; 384 px; batch 256; 10k steps; AdamW 5e-5, warm-up 250, cosine; COCO captions 1 : LN 2.
Trains EVA02, the prompt extractor + projection, LoRA and the point head.

    python -m pixelground.train --config=configs/ln_t5xl.py --workdir=/ckpt/ln_t5xl \
        --config.weights.sam=/w/sam_vit_h_4b8939.pth --config.weights.eva=/w/eva02_L.safetensors \
        --config.weights.t5=/w/flan-t5-xl
    python -m pixelground.config.recipes count configs/ln_t5xl.py     # parameter counts, nothing allocated
"""

import ml_collections

from pixelground.config import recipes


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = recipes.model_config("xl")
  c.weights = ml_collections.ConfigDict({"sam": "", "eva": "", "t5": "", "tokenizer": ""})
  c.tokenizer = "spiece.model"  # the T5 vocabulary (cc_all.32000.100extra) path
  c.optimizer = recipes.optimizer_config(lr=5e-5, steps=10_000, warmup=250, batch_size=256)
  c.tasks = ml_collections.ConfigDict({
      "ln": {"dataset": "localized_narratives/coco", "weight": 2.0},
      "caption": {"dataset": "coco_captions/2017", "weight": 1.0}})
  c.data = ml_collections.ConfigDict({"image_size": 384, "scale_range": (1.0, 1.0),
                                      "max_target_len": 128, "mixing": "batch", "num_workers": 8})
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 8, "tensor": 1})
  return c
