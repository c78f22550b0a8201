r"""PixelLLM referring localisation, full size (SPEC §3 row 2): from the trace stage, batch 64, 120k
steps, AdamW 5e-5, warm-up 1k. Encoder text "where is {expression}"; the box is read at the
EOS-predicting position.

    python -m pixelground.config.recipes count configs/refcoco_t5xl.py
"""

import ml_collections

from pixelground.config import recipes


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = recipes.model_config("xl")
  c.weights = ml_collections.ConfigDict({"init": "", "sam": "", "eva": "", "t5": ""})  # init: trace ckpt
  c.tokenizer = "spiece.model"
  c.optimizer = recipes.optimizer_config(lr=5e-5, steps=120_000, warmup=1_000, batch_size=64)
  c.tasks = ml_collections.ConfigDict({
      "referring": {"dataset": "refcoco/refcoco_unc", "weight": 1.0},
      "referring_plus": {"dataset": "refcoco/refcocoplus_unc", "weight": 1.0},
      "referring_g": {"dataset": "refcoco/refcocog_umd", "weight": 1.0}})
  c.data = ml_collections.ConfigDict({"image_size": 384, "scale_range": (0.75, 1.25),
                                      "max_target_len": 40, "mixing": "batch", "num_workers": 8})
  c.decode = ml_collections.ConfigDict({"num_beams": 3, "length_penalty": 0.6, "max_len": 40})
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 8, "tensor": 1})
  return c
