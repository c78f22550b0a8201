r"""PixelLLM dense captioning, full size (SPEC §3 row 4): from the trace stage + the class-agnostic
proposal head (CenterNet-style heatmap + ltrb boxes on the fused map, `pixelground.models.heads.proposals`);
GT regions are captioned through the extractor with the prompt "an object of". Batch 64, 40k steps,
AdamW 1e-4, wd 0.05, warm-up 1k, EVA layer decay 0.8; VG with scale jitter 0.1–2.0 and flips.

    python -m pixelground.config.recipes count configs/densecap_t5xl.py
"""

import ml_collections

from pixelground.config import recipes


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = recipes.model_config("xl")
  c.model.proposals = True
  c.weights = ml_collections.ConfigDict({"init": "", "sam": "", "eva": "", "t5": ""})  # init: trace
  c.tokenizer = "spiece.model"
  c.optimizer = recipes.optimizer_config(lr=1e-4, steps=40_000, warmup=1_000, weight_decay=0.05,
                                         batch_size=64, layer_decay={"eva": 0.8})
  c.tasks = ml_collections.ConfigDict({"dense_caption": {"dataset": "vg_densecap", "weight": 1.0}})
  c.data = ml_collections.ConfigDict({"image_size": 384, "scale_range": (0.1, 2.0), "flip": True,
                                      "max_regions": 16, "max_region_len": 40, "mixing": "batch",
                                      "num_workers": 8})
  c.decode = ml_collections.ConfigDict({"num_proposals": 100, "max_len": 40})
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 8, "tensor": 1})
  return c
