"""The shared config sections: full-size parameter counts from nnx.eval_shape (nothing allocated), the
tiny model section, per-task loss weights."""

import os

import pytest

from pixelground.config import base, recipes
from pixelground.models import eva02, pixelllm, sam_encoder
from pixelground.training import objective

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs")


def test_ln_t5xl_counts():
  from pixelground import params
  r = params.count(os.path.join(CONFIGS, "ln_t5xl.py"))
  parts = r["parts"]
  # Each part equals its standalone model; the sum is within 2% of the published sizes + our heads.
  assert parts["sam_encoder"] == sam_encoder.num_params(sam_encoder.preset("sam-vit-h"))
  assert parts["eva"] == eva02.num_params(eva02.preset("eva02-l-14"))
  assert r["t5_base"] == 2_849_757_184  # FLAN-T5-XL exactly
  assert r["lora"] == 18_874_368        # r32 on q/v of enc self, dec self, dec cross (SPEC 1.6)
  published = 632e6 + 304e6 + 2.85e9 + parts["extractor"] + parts["loc_head"] + r["lora"]
  assert abs(r["total"] - published) / published < 0.02, (r["total"], published)
  assert r["trainable"] == parts["eva"] + parts["extractor"] + parts["loc_head"] + r["lora"]
  print(r)


def test_tiny_model_section_builds():
  c = recipes.model_config("tiny", lisa=True, image_size=64, vocab_size=896, seg_token_id=3)
  cfg = recipes.build_model_config(c)
  assert isinstance(cfg, pixelllm.PixelLLMConfig) and cfg.lisa and cfg.image_size == 64
  c.tiny = {"num_querys": 4}
  with pytest.raises(Exception, match="num_querys"):
    recipes.build_model_config(c)


def test_loss_config_and_task_weights():
  import jax.numpy as jnp
  import numpy as np

  from pixelground.config import schema
  from pixelground.config.parse import load_config

  c = load_config(os.path.join(CONFIGS, "demo.py"))
  c.loss.point_weight = 0.5
  c.tasks = {"a": base.task("x/y"), "b": base.task("x/z", loss_weight=3.0)}
  c.eval.tasks = ()
  lc = schema.parse(c).loss
  assert lc.point_weight == 0.5 and lc.task_weights == (1.0, 3.0)
  # compute_losses: per-example text CE weighted by the row's task (task 1 counts 3×).
  cfg = pixelllm.tiny_config(vocab_size=8)
  logits = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 8)), jnp.float32)
  batch = {"target_ids": jnp.asarray([[1, 2, 0], [3, 1, 0]]), "target_mask": jnp.asarray([[1, 1, 0], [1, 1, 0]], bool),
           "task_id": jnp.asarray([0, 1])}
  plain, _ = objective.compute_losses(cfg, objective.LossConfig(label_smoothing=0.0), {"logits": logits}, batch)
  weighted, terms = objective.compute_losses(cfg, objective.LossConfig(label_smoothing=0.0,
                                                                     task_weights=(1.0, 3.0)),
                                            {"logits": logits}, batch)
  lp = np.asarray(jax_log_softmax(logits))
  ce = [-(lp[b, 0, batch["target_ids"][b, 0]] + lp[b, 1, batch["target_ids"][b, 1]]) / 2 for b in range(2)]
  np.testing.assert_allclose(float(plain), (ce[0] + ce[1]) / 2, rtol=1e-5)
  np.testing.assert_allclose(float(weighted), (ce[0] + 3 * ce[1]) / 2, rtol=1e-5)
  assert set(terms) >= {"text_ce", "token_accuracy", "total"}


def jax_log_softmax(x):
  import jax
  return jax.nn.log_softmax(x, axis=-1)
