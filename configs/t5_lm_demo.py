r"""Tiny T5 learning to reverse token sequences: the interim main job (runs in ~1-2 min on 2 CPU cores).

    python -m pixelground.lm_demo --config=configs/t5_lm_demo.py --workdir=/tmp/lm_demo \
        [--config.steps=600] [--config.mesh.data=-1]

Exercises the language-model core end to end: ml_collections config → mesh → sharded init → jitted
AdamW steps → cached greedy and beam-search decoding → exact-match accuracy on held-out sequences.
Expected: held-out greedy exact match ≥ 0.9 after the default 500 steps.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.steps = 500
  c.batch_size = 64
  c.learning_rate = 3e-3
  c.warmup_steps = 50
  c.log_every = 50
  c.eval_examples = 256
  c.min_len, c.max_len = 3, 10  # source sequence lengths (tokens before EOS)

  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  c.sharding_rules = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"),
                      ("heads", "tensor"), ("vocab", "tensor"))

  # Any pixelground.models.t5.T5Config field; misspelt keys are an error naming the key.
  c.t5 = ml_collections.ConfigDict(dict(
      vocab_size=32, d_model=64, num_heads=4, head_dim=16, d_ff=128, num_encoder_layers=2,
      num_decoder_layers=2, relpos_buckets=16, relpos_max_distance=32, dtype="float32",
      scan_layers=True, remat="none"))
  c.decode = ml_collections.ConfigDict(dict(num_beams=3, length_penalty=0.6))
  c.lock()
  return c
