r"""PixelLLM joint training, full size (SPEC §3 row 5): every task at once from the web pretraining,
batch 128, 240k steps, AdamW 1e-4, wd 0.05, warm-up 2k; single-task batches sampled by weight.

    python -m pixelground.config.recipes count configs/joint_t5xl.py
"""

import ml_collections

from pixelground.config import recipes


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = recipes.model_config("xl")
  c.model.refseg = True
  c.model.proposals = True
  c.weights = ml_collections.ConfigDict({"init": "", "sam": "", "eva": "", "t5": ""})
  c.tokenizer = "spiece.model"
  c.optimizer = recipes.optimizer_config(lr=1e-4, steps=240_000, warmup=2_000, weight_decay=0.05,
                                         batch_size=128)
  c.tasks = ml_collections.ConfigDict({
      "ln": {"dataset": "localized_narratives/coco", "weight": 2.0},
      "caption": {"dataset": "coco_captions/2017", "weight": 1.0},
      "referring": {"dataset": "refcoco/refcoco_unc", "weight": 1.0},
      "region_caption": {"dataset": "refcoco/refcocog_umd", "weight": 1.0},
      "dense_caption": {"dataset": "vg_densecap", "weight": 1.0}})
  c.data = ml_collections.ConfigDict({"image_size": 384, "scale_range": (0.75, 1.25),
                                      "max_target_len": 128, "mixing": "batch", "num_workers": 8})
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 8, "tensor": 1})
  return c
