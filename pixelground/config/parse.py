"""Config helpers: strict conversion of ml_collections configs into typed dataclasses.

Every config section that feeds code is turned into a frozen dataclass here, so a misspelt or unknown key
fails at start-up with an error that names the key (and the closest valid name), instead of being ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing as tp

import jax.numpy as jnp
import ml_collections

T = tp.TypeVar("T")


class ConfigError(ValueError):
  """A config key is unknown, misspelt, missing or has the wrong type."""


def to_dict(cfg: tp.Any) -> dict[str, tp.Any]:
  if isinstance(cfg, ml_collections.ConfigDict):
    return cfg.to_dict()
  if dataclasses.is_dataclass(cfg):
    return dataclasses.asdict(cfg)
  return dict(cfg)


def unknown_key(key: str, known: tp.Iterable[str], where: str, what: str) -> ConfigError:
  """The error for `where.key`, not among `known` (a key of `what`), with the closest valid name."""
  close = difflib.get_close_matches(key, list(known), n=1)
  hint = f" Did you mean '{close[0]}'?" if close else ""
  return ConfigError(f"Unknown config key '{where}.{key}' ({what}).{hint} Valid keys: {sorted(known)}.")


def section(cls: type, values: tp.Any, where: str):
  """A dataclass section from a mapping: unknown keys raise naming the key; nested dataclass fields
  (e.g. `data.grounded_shapes`) are parsed the same way; lists become tuples."""
  values = to_dict(values) if values is not None else {}
  hints = tp.get_type_hints(cls)
  fields = {f.name: f for f in dataclasses.fields(cls)}
  kwargs = {}
  for key, value in values.items():
    if key not in fields:
      raise unknown_key(key, fields, where, cls.__name__)
    sub = _dataclass_in(hints[key])
    if sub is not None and value is not None:
      value = section(sub, value, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
      value = freeze(value)
    elif isinstance(value, dict) and hints[key] is not tp.Any:
      value = dict(value)
    kwargs[key] = value
  missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
             and f.default_factory is dataclasses.MISSING]
  if missing:
    raise ConfigError(f"Missing config keys at '{where}': {missing} ({cls.__name__}).")
  return cls(**kwargs)


def freeze(value):
  """Lists (JSON, ConfigDict) → tuples, recursively: config dataclasses hold hashable tuples."""
  return tuple(freeze(v) for v in value) if isinstance(value, (list, tuple)) else value


def _dataclass_in(hint) -> type | None:
  """The dataclass in a field's type (`X` or `X | None`), else None."""
  for t in (hint, *tp.get_args(hint)):
    if dataclasses.is_dataclass(t):
      return t
  return None



class ModelConfig:
  """Mixin for frozen model-config dataclasses with `dtype` (compute) and `param_dtype` (storage)."""

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def weight_dtype(self):
    return jnp.dtype(self.param_dtype)

  def replace(self, **kw):
    return dataclasses.replace(self, **kw)


def preset_config(cls: type[T], presets: dict[str, dict[str, tp.Any]], name: str, kind: str,
                  **overrides) -> T:
  """`cls(**presets[name], **overrides)`; an unknown name is an error listing the known ones."""
  if name not in presets:
    raise ValueError(f"Unknown {kind} preset {name!r}; known: {sorted(presets)}.")
  return cls(**{**presets[name], **overrides})


def load_config(config):
  """A ConfigDict, a config file (.py with get_config(), optionally "file.py:arg") or the config.json a
  training run wrote → ConfigDict."""
  import json

  import ml_collections

  if isinstance(config, ml_collections.ConfigDict):
    return config
  path = str(config)
  if path.endswith(".json"):
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path} not found: pass the training config with --config (or config=).")
    with open(path) as f:
      return ml_collections.ConfigDict(json.load(f))
  import importlib.util

  file, _, arg = path.partition(":")
  if not os.path.exists(file):
    raise FileNotFoundError(f"config file {file} not found")
  spec = importlib.util.spec_from_file_location("_pixelground_config", file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()
