r"""PixelLLM referring segmentation, full size (SPEC §3 row 3): from SAM-H + the referring stage; the
predicted box prompts SAM's mask decoder, whose 2 box tokens get the gated mask adapter's update.
Batch 64, 60k steps, AdamW 5e-5 (adapter ×10), warm-up 500; trains the mask adapter and the point head.
Loss: CE + 0.1·point L1 + 20·focal + dice + IoU MSE.

    python -m pixelground.config.recipes count configs/refseg_t5xl.py
"""

import ml_collections

from pixelground.config import recipes


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = recipes.model_config("xl")
  c.model.refseg = True
  c.weights = ml_collections.ConfigDict({"init": "", "sam": "", "eva": "", "t5": ""})  # init: referring
  c.tokenizer = "spiece.model"
  c.optimizer = recipes.optimizer_config(lr=5e-5, steps=60_000, warmup=500, batch_size=64,
                                         lr_multipliers={"mask_adapter": 10.0})
  c.trainable = (r"^mask_adapter\.", r"^loc_head\.")
  c.train_lora = False
  c.tasks = ml_collections.ConfigDict({
      "referring_seg": {"dataset": "refcoco/refcoco_unc", "weight": 1.0}})
  c.data = ml_collections.ConfigDict({"image_size": 384, "scale_range": (0.75, 1.25),
                                      "max_target_len": 40, "mixing": "batch", "num_workers": 8})
  c.loss = ml_collections.ConfigDict({"ref_focal_weight": 20.0, "ref_dice_weight": 1.0,
                                      "ref_iou_weight": 1.0})
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 8, "tensor": 1})
  return c
