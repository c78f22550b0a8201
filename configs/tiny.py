r"""Tiny PixelLLM (+ LISA head) on the grounded-shapes data: CPU tests and the demo.

Same structure as the full configs, every width tiny, 64-px inputs, the committed tiny vocabulary.
"""

import ml_collections

from pixelground.config import recipes


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  # [SEG] = 3 in the tiny vocabulary (reserved at training time); 896 rows.
  c.model = recipes.model_config("tiny", lisa=True, image_size=64, vocab_size=896, seg_token_id=3)
  c.weights = ml_collections.ConfigDict({"init": "", "sam": "", "eva": "", "t5": ""})
  c.tokenizer = "tiny"
  c.optimizer = recipes.optimizer_config(lr=3e-3, steps=300, warmup=20, batch_size=8)
  c.tasks = ml_collections.ConfigDict({
      "ln": {"dataset": "localized_narratives/grounded_shapes", "weight": 2.0},
      "caption": {"dataset": "coco_captions/grounded_shapes", "weight": 1.0},
      "referring": {"dataset": "refcoco/grounded_shapes", "weight": 1.0},
      "reason_seg": {"dataset": "reasonseg/grounded_shapes", "weight": 1.0}})
  c.data = ml_collections.ConfigDict({"image_size": 64, "scale_range": (0.75, 1.25),
                                      "max_target_len": 48, "max_prompt_len": 8, "max_seg": 2,
                                      "mixing": "example", "num_workers": 0})
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  return c
