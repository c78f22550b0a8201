r"""The demo config cut down for the notebooks' test (tests/test_notebooks.py): the LN, caption,
referring and ReasonSeg heads of the demo and its GELLA narrative grounding (`png`), a 48-image grounded-shapes cache, batch 8, 20 steps and one
checkpoint at the end — enough for every notebook to run its evaluation and draw its figures."""

import os

from pixelground.config.parse import load_config

_DEMO = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "demo.py") + ":gella"


def get_config():
  c = load_config(_DEMO)
  for name in list(c.tasks.keys()):
    if name not in ("ln", "caption", "referring", "reason_seg", "png"):
      del c.tasks[name]
  c.optimizer.batch_size = 8
  c.optimizer.total_steps = 20
  c.optimizer.warmup_steps = 5
  c.data.grounded_shapes.num_train = 48
  c.data.grounded_shapes.num_validation = 8
  c.data.grounded_shapes.size = 64
  c.eval.tasks = ("ln", "referring", "reason_seg")
  c.eval.batch_size = 8
  c.eval.max_examples = 8
  c.eval_every = 0
  c.log_every = 5
  c.checkpoint_every = 20
  c.visualize.enabled = False
  return c
