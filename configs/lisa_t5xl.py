r"""LISA-style reasoning / referring segmentation on the PixelLLM backbone, full size: `[SEG]` in the
vocabulary (the top T5 sentinel, id 32099), its decoder state → Linear → ReLU → Linear → SAM's mask
decoder prompt. Loss CE + 2·BCE + 0.5·DICE; trains the mask decoder, the projection, LoRA, EVA02 and
the extractor.

    python -m pixelground.config.recipes count configs/lisa_t5xl.py
"""

import ml_collections

from pixelground.config import recipes


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = recipes.model_config("xl", lisa=True, seg_token_id=32099)
  c.weights = ml_collections.ConfigDict({"init": "", "sam": "", "eva": "", "t5": ""})
  c.tokenizer = "spiece.model"
  c.optimizer = recipes.optimizer_config(lr=5e-5, steps=20_000, warmup=500, batch_size=64)
  c.tasks = ml_collections.ConfigDict({
      "reason_seg": {"dataset": "reasonseg/default", "weight": 1.0},
      "referring_seg": {"dataset": "refcoco/refcoco_unc", "weight": 3.0}})
  c.data = ml_collections.ConfigDict({"image_size": 384, "scale_range": (0.75, 1.25),
                                      "max_target_len": 40, "max_seg": 4, "mixing": "example",
                                      "num_workers": 8})
  c.loss = ml_collections.ConfigDict({"mask_bce_weight": 2.0, "mask_dice_weight": 0.5})
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 8, "tensor": 1})
  return c
