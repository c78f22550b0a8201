r"""The GELLA demo cut down for tests/test_evaluate_export.py: the three tasks whose
`python -m pixelground.evaluate --format=coco` writes results files (dense captioning → COCO detections,
captions → COCO captions, panoptic → COCO panoptic PNG + JSON), a 48-image grounded-shapes cache
(the notebook test's), batch 8 and a short run — enough for the panoptic decoder to write
"name [SEG]" lists, so that the exported PNGs hold segments. The trainer's own final evaluation is
one caption example; the test evaluates the three tasks with the CLI."""

import os

from pixelground.config.parse import load_config

_DEMO = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "demo.py") + ":gella"


def get_config():
  c = load_config(_DEMO)
  for name in list(c.tasks.keys()):
    if name not in ("dense_caption", "caption", "panoptic"):
      del c.tasks[name]
  c.tasks.panoptic.weight = 4.0
  c.tasks.dense_caption.weight = 1.0
  c.tasks.caption.weight = 1.0
  c.optimizer.batch_size = 8
  c.optimizer.total_steps = 60
  c.optimizer.warmup_steps = 5
  c.data.num_workers = 0
  c.data.grounded_shapes.num_train = 48
  c.data.grounded_shapes.num_validation = 8
  c.data.grounded_shapes.size = 64
  c.eval.tasks = ("caption",)
  c.eval.batch_size = 4
  c.eval.max_examples = 1
  c.eval.max_decode_len = 24
  c.eval.dense_k = 3
  c.eval_every = 0
  c.log_every = 10
  c.checkpoint_every = 60
  c.visualize.enabled = False
  return c
