"""LoRA utilities for any pixelground model built from `layers.Projection`.

LoRA factors are `nnx.LoRAParam` variables (a subclass of `nnx.Param`), so:
  * `nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)` trains only them (frozen base weights carry no
    optimizer state);
  * `trainable_filter(...)` composes LoRA with other trainable parts by path regex;
  * `merge_lora(model)` folds W += (alpha/r)·A·B into the base kernels for export, and `base_state`
    returns the state without the LoRA factors (what HF/T5X exporters write).
"""

from __future__ import annotations

import re
import typing as tp

from flax import nnx

from pixelground.models.layers import Projection


def merge_lora(model: nnx.Module) -> int:
  """Merges every LoRA branch into its kernel in place (B is zeroed). Returns how many were merged."""
  count = 0
  for _, module in nnx.iter_modules(model):
    if isinstance(module, Projection) and module.lora_rank:
      module.merge_lora()
      count += 1
  return count


def base_state(model: nnx.Module) -> nnx.State:
  """The model's state without LoRA factors."""
  return nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))


def trainable_filter(lora: bool = True, patterns: tp.Sequence[str] = ()) -> nnx.filterlib.Filter:
  """Filter for trainable parameters: LoRA factors (if `lora`) plus params whose '.'-joined path matches
  any regex in `patterns` (e.g. r"^location_head\\.")."""
  compiled = [re.compile(p) for p in patterns]

  def by_path(path, value) -> bool:
    name = ".".join(str(p) for p in path)
    return isinstance(value, nnx.Param) and any(c.search(name) for c in compiled)

  filters = ([nnx.LoRAParam] if lora else []) + ([by_path] if compiled else [])
  if not filters:
    raise ValueError("trainable_filter: nothing would train (lora=False and no patterns).")
  return nnx.Any(*filters)

