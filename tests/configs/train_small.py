r"""The demo config cut down for the trainer's tests: two text tasks that share one compiled step (LN
traces + captions), a 64-image grounded-shapes cache, batch 8, two input shards (so 1 and 2 processes see
the same global batches), every step logged."""

import os

from pixelground.config.parse import load_config

_DEMO = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "demo.py")


def get_config():
  c = load_config(_DEMO)
  for name in list(c.tasks.keys()):
    if name not in ("ln", "caption"):
      del c.tasks[name]
  c.optimizer.batch_size = 8
  c.optimizer.total_steps = 40
  c.optimizer.warmup_steps = 5
  c.data.num_shards = 2
  c.data.num_workers = 0  # conversion in-process (test_pipeline checks workers give the same batches)
  c.data.grounded_shapes.num_train = 48
  c.data.grounded_shapes.num_validation = 8
  c.data.grounded_shapes.size = 64
  c.eval.tasks = ("ln",)
  c.eval.batch_size = 8
  c.eval.max_examples = 8
  c.eval_every = 0
  c.log_every = 1
  c.checkpoint_every = 10
  c.visualize.enabled = False
  # The demo's from-scratch aids (tested in test_pixelllm / test_losses / test_tasks) add 64 encoder
  # tokens: off here, so the trainer / evaluator tests stay fast.
  c.model.tiny.spatial_tokens = 0
  c.model.tiny.pointer_head = False
  c.model.tiny.pointer_window = 0
  c.model.tiny.refseg_train_box = "predicted"
  c.model.tiny.seg_box_prompt = ""
  c.loss.attention_grounding_weight = 0.0
  c.data.seg_boxes = False
  return c
