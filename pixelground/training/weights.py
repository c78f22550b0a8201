"""Pretrained weights into a fresh train state (`config.weights`: SAM, EVA02, T5 files)."""

from __future__ import annotations

import os
import typing as tp

import jax
from flax import nnx

from pixelground.training.train_state import Setup

def import_weights(setup: Setup, state, weights) -> tuple[tp.Any, list[str]]:
  """Replaces parts of a fresh state with pretrained weights named in `config.weights`:
  sam (SAM .pth / HF: image encoder, and prompt encoder + mask decoder when the model has them),
  eva (timm EVA02), t5 (HF / T5X; LoRA factors keep their init). Missing files → FileNotFoundError
  naming the config key. Returns (state, list of what was imported)."""
  from pixelground.checkpoints import eva02 as eva_ckpt, sam as sam_ckpt, sam_decoder as dec_ckpt
  from pixelground.checkpoints import t5 as t5_ckpt

  cfg, mesh, rules = setup.cfg, setup.mesh, setup.rules
  done = []
  parts: dict[str, nnx.Module] = {}
  for key in ("sam", "eva", "t5"):
    path = weights.get(key, "") if weights is not None else ""
    if not path:
      continue
    if not os.path.exists(path):
      raise FileNotFoundError(f"config.weights.{key}: {path} does not exist.")
    if key == "sam":
      if cfg.sam is None:
        raise ValueError("config.weights.sam is set but the model has no SAM encoder.")
      parts["sam_encoder"] = sam_ckpt.load_sam_image_encoder(path, cfg.sam, mesh=mesh, rules=rules)
      dec = dec_ckpt.load_sam_decoder(path, cfg.prompt, mesh=mesh, rules=rules)
      parts["prompt_encoder"] = dec.prompt_encoder
      if cfg.lisa or cfg.refseg:
        parts["mask_decoder"] = dec.mask_decoder
    elif key == "eva":
      if cfg.eva is None:
        raise ValueError("config.weights.eva is set but the model has no EVA02 encoder.")
      parts["eva"] = eva_ckpt.load_eva02(path, cfg.eva, mesh=mesh, rules=rules)
    else:
      parts["t5"] = t5_ckpt.load_t5(path, cfg.t5, mesh=mesh, rules=rules, seed=0)
  for part, module in parts.items():
    loaded = dict(nnx.to_flat_state(nnx.state(module)))
    for group in ("params", "frozen"):
      flat = dict(nnx.to_flat_state(state[group]))
      hit = 0
      for path, var in flat.items():
        if path[0] == part and path[1:] in loaded:
          if isinstance(var, nnx.LoRAParam):
            continue  # absent from pretrained files: keep the init
          new = loaded[path[1:]].get_value()
          if new.shape != var.get_value().shape:
            raise ValueError(f"config.weights: {part}.{'.'.join(map(str, path[1:]))} has shape "
                             f"{new.shape} in the file, the model expects {var.get_value().shape}.")
          var.set_value(jax.device_put(new.astype(var.get_value().dtype), var.get_value().sharding))
          hit += 1
      if hit:
        state[group] = nnx.from_flat_state(flat)
    done.append(part)
  return state, done
