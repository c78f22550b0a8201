"""Every shipped config and variant parses strictly; every key of the schema is read by the code; the
runlocal variants keep their full-size recipe; unknown keys fail naming the key."""

from __future__ import annotations

import ast
import dataclasses
import glob
import json
import os

import ml_collections
import pytest

from pixelground.config import base, recipes, schema
from pixelground.config.parse import ConfigError, load_config
from pixelground.training.objective import LossConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FULL = ["ln_t5xl", "refcoco_t5xl", "refseg_t5xl", "densecap_t5xl", "joint_t5xl", "lisa_t5xl",
        "png_gella_t5xl", "panoptic_gella_t5xl", "webli_pretrain_t5xl"]


def _config_files():
  return sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py")))


def test_every_full_size_config_is_listed():
  assert set(_config_files()) == set(FULL) | {"demo"}


@pytest.mark.parametrize("name", _config_files())
@pytest.mark.parametrize("variant", ["", ":runlocal"])
def test_config_parses_and_round_trips(name, variant, tmp_path):
  if name == "demo" and variant:
    pytest.skip("the demo is CPU-sized already")
  path = os.path.join(ROOT, "configs", f"{name}.py{variant}")
  cfg = schema.parse(path)
  assert cfg.tasks and cfg.optimizer.total_steps > 0
  # The header states the command and what to expect.
  doc = open(os.path.join(ROOT, "configs", f"{name}.py")).read().split('"""')[1]
  assert f"--config=configs/{name}.py" in doc
  assert "RUNLOCAL_EXPECT" not in doc and "COMPILE_EXPECT" not in doc
  # The trainer writes config.json; evaluate / predict parse it back to the same config.
  (tmp_path / "config.json").write_text(cfg.to_json())
  again = schema.parse(str(tmp_path / "config.json"))
  assert again == cfg


def _attribute_reads() -> set[str]:
  """Every `x.name` attribute read in pixelground's code (config/base.py, which writes the keys, and
  the schema's own definitions excluded)."""
  names = set()
  for path in glob.glob(os.path.join(ROOT, "pixelground", "**", "*.py"), recursive=True):
    if path.endswith(os.path.join("config", "base.py")):
      continue
    for node in ast.walk(ast.parse(open(path).read())):
      if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
        names.add(node.attr)
  return names


def test_every_schema_key_is_read():
  reads = _attribute_reads()
  sections = [schema.Config, schema.TaskSpec, schema.GroundedShapesConfig, schema.DataConfig,
              schema.OptimizerConfig, schema.EvalConfig, schema.WeightsConfig, schema.InitFromConfig,
              schema.VisualizeConfig, schema.MeshConfig, LossConfig]
  unread = [f"{cls.__name__}.{f.name}" for cls in sections for f in dataclasses.fields(cls)
            if f.name not in reads and f.name != "source"]
  assert not unread, f"config keys nothing reads: {unread}"


def _demo():
  return load_config(os.path.join(ROOT, "configs", "demo.py"))


@pytest.mark.parametrize("edit, named", [
    (lambda c: setattr(c, "log_evry", 5), "config.log_evry"),
    (lambda c: setattr(c.data, "tfds_directory", "/x"), "config.data.tfds_directory"),
    (lambda c: setattr(c.data.grounded_shapes, "count", 3), "config.data.grounded_shapes.count"),
    (lambda c: setattr(c.tasks.ln, "wieght", 2.0), "config.tasks.ln.wieght"),
    (lambda c: setattr(c.optimizer, "lr", 1.0), "config.optimizer.lr"),
    (lambda c: setattr(c.loss, "pointweight", 1.0), "config.loss.pointweight"),
    (lambda c: setattr(c.init_from, "steps", 3), "config.init_from.steps"),
    (lambda c: setattr(c.model.tiny, "num_querys", 3), "config.model.tiny.num_querys"),
])
def test_unknown_key_is_named(edit, named):
  c = _demo()
  with c.unlocked():
    edit(c)
  with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
    schema.parse(c)


def test_did_you_mean_and_base_holds_every_key():
  c = _demo()
  c.eval_evry = 3
  with pytest.raises(ConfigError, match="Did you mean 'eval_every'"):
    schema.parse(c)
  # Every key can be set from the command line: the base holds them all (here: the data dir the
  # full-size configs leave at its default).
  full = load_config(os.path.join(ROOT, "configs", "ln_t5xl.py"))
  full.data.tfds_dir = "/data/tfds"
  full.init_from.step = 7
  assert schema.parse(full).data.tfds_dir == "/data/tfds"
  with pytest.raises(ConfigError, match="task_weights"):
    with full.unlocked():
      full.loss.task_weights = (1.0,)
    schema.parse(full)


def test_model_section_is_strict():
  c = recipes.model_config("xl")
  c.t5.lora_rnak = 4
  with pytest.raises(ConfigError, match="lora_rnak"):
    recipes.build_model_config(c)
  c = recipes.model_config("xl")
  c.num_querys = 4
  with pytest.raises(ConfigError, match="config.model.num_querys"):
    recipes.build_model_config(c)


@pytest.mark.parametrize("name", FULL)
def test_runlocal_keeps_the_recipe(name):
  full = schema.parse(os.path.join(ROOT, "configs", f"{name}.py"))
  local = schema.parse(os.path.join(ROOT, "configs", f"{name}.py:runlocal"))
  assert list(local.tasks) == list(full.tasks)
  for n in full.tasks:
    assert local.converter(n) == full.converter(n) and local.tasks[n].weight == full.tasks[n].weight
    assert local.tasks[n].dataset in recipes.LOCAL_DATASETS.values()
  assert (local.trainable, local.train_lora, local.loss) == (full.trainable, full.train_lora, full.loss)
  assert local.data.mixing == full.data.mixing and local.data.flip == full.data.flip
  fm, lm = full.model, local.model
  assert (lm.lisa, lm.refseg, lm.proposals) == (fm.lisa, fm.refseg, fm.proposals)
  assert (lm.gella is None) == (fm.gella is None)
  if fm.gella is not None:
    assert (lm.gella.dtype, lm.gella.param_dtype, lm.gella.swin.dtype) == (
        fm.gella.dtype, fm.gella.param_dtype, fm.gella.swin.dtype)
    assert len(lm.gella.swin.depths) == len(fm.gella.swin.depths)
    assert lm.gella.colormap_size / lm.image_size > 1 and fm.gella.colormap_size / fm.image_size > 1
  for part in ("sam", "eva", "t5"):
    f, l = getattr(fm, part), getattr(lm, part)
    assert (f is None) == (l is None)
    for key in ("dtype", "param_dtype", "remat", "scan_layers", "lora_targets", "drop_path_rate"):
      if hasattr(f, key):
        assert getattr(l, key) == getattr(f, key), (part, key)
  assert lm.t5.lora_alpha / lm.t5.lora_rank == fm.t5.lora_alpha / fm.t5.lora_rank
  assert lm.grid > lm.sam_grid  # SAM's map is resized to EVA02's grid, as at full size
  assert local.optimizer.lr_multipliers == full.optimizer.lr_multipliers
  assert local.data.grounded_shapes is not None and local.init_from.path == ""


def test_variant_names_are_checked():
  with pytest.raises(ConfigError, match="unknown config variant 'runlcoal'"):
    schema.parse(os.path.join(ROOT, "configs", "ln_t5xl.py:runlcoal"))


def test_task_helper_and_configdict_types():
  t = base.task("refcoco/refcoco_unc", converter="referring")
  assert set(t) == {f.name for f in dataclasses.fields(schema.TaskSpec)}
  with pytest.raises(ConfigError, match="wieght"):
    base.task("x/y", wieght=1.0)
  assert isinstance(base.grounded_shapes(size=32), ml_collections.ConfigDict)
  json.loads(schema.parse(_demo()).to_json())
