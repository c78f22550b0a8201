"""The base every config file builds on: a ConfigDict holding every key of `pixelground.config.schema` at
its default, so any key can be set from the command line (`--config.data.tfds_dir=...`).

    from pixelground.config import base, recipes

    def get_config(arg=None):
      c = base.config(model=recipes.model_config("xl"), tokenizer="spiece.model",
                      optimizer=recipes.optimizer_config(lr=5e-5, steps=10_000, warmup=250, batch_size=256))
      c.tasks = base.tasks(ln=base.task("localized_narratives/coco", weight=2.0))
      c.data.image_size = 384
      return c
"""

from __future__ import annotations

import dataclasses
import typing as tp

import ml_collections

from pixelground.config import schema


def _defaults(cls) -> dict[str, tp.Any]:
  out = {}
  for f in dataclasses.fields(cls):
    if f.default is not dataclasses.MISSING:
      value = f.default
    elif f.default_factory is not dataclasses.MISSING:
      value = f.default_factory()
    else:
      continue
    out[f.name] = _defaults(value) if dataclasses.is_dataclass(value) else value
  return out


def config(*, model: ml_collections.ConfigDict, tokenizer: str, optimizer: ml_collections.ConfigDict
           ) -> ml_collections.ConfigDict:
  """Every key at its default; `model`, `tokenizer` and `optimizer` have none. `tasks` starts empty."""
  from pixelground.training.objective import LossConfig

  values = _defaults(schema.Config)
  values.pop("source")
  c = ml_collections.ConfigDict(values)
  c.model = model
  c.tokenizer = tokenizer
  c.optimizer = optimizer
  c.tasks = ml_collections.ConfigDict()
  loss = _defaults(LossConfig)
  loss.pop("task_weights")  # set per task: config.tasks.<name>.loss_weight
  c.loss = ml_collections.ConfigDict(loss)
  c.data.grounded_shapes = None
  return c


def task(dataset: str, **kw) -> ml_collections.ConfigDict:
  """`config.tasks.<name>`: every `TaskSpec` key (so each can be overridden), `kw` applied."""
  values = _defaults(schema.TaskSpec) | {"dataset": dataset}
  for k, v in kw.items():
    if k not in values:
      raise schema.ConfigError(f"task(): unknown TaskSpec key '{k}' (keys: {sorted(values)}).")
    values[k] = v
  return ml_collections.ConfigDict(values)


def tasks(**named: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(named)


def grounded_shapes(**kw) -> ml_collections.ConfigDict:
  """`config.data.grounded_shapes`: every key, `kw` applied (the synthetic data of the runlocal configs
  and the demo)."""
  values = _defaults(schema.GroundedShapesConfig)
  for k, v in kw.items():
    if k not in values:
      raise schema.ConfigError(f"grounded_shapes(): unknown key '{k}' (keys: {sorted(values)}).")
    values[k] = v
  return ml_collections.ConfigDict(values)
