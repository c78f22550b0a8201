"""Full-size configs: parameter counts from nnx.eval_shape (nothing allocated) and the tiny config."""

import os

import pytest

from pixelground import recipes
from pixelground.models import eva02, pixelllm, sam_encoder

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs")


def test_ln_t5xl_counts():
  r = recipes.count(os.path.join(CONFIGS, "ln_t5xl.py"))
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


def test_tiny_config_builds():
  import importlib.util
  spec = importlib.util.spec_from_file_location("tiny", os.path.join(CONFIGS, "tiny.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = recipes.build_model_config(module.get_config().model)
  assert isinstance(cfg, pixelllm.PixelLLMConfig) and cfg.lisa and cfg.image_size == 64


def test_unknown_model_key_is_named():
  c = recipes.model_config("xl")
  c.t5.lora_rnak = 4
  with pytest.raises(Exception, match="lora_rnak"):
    recipes.build_model_config(c)
