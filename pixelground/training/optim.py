"""The optimizer from `config.optimizer`: AdamW, warm-up + cosine, decay mask, layer-wise LR decay,
per-group LR multipliers, optional global-norm clipping.

    tx, schedule = optim.build(config.optimizer, trainable_state)

Config keys (`recipes.optimizer_config` writes them):
  learning_rate, total_steps, warmup_steps     peak LR; linear 0 → peak over warm-up, cosine → end_lr
  end_lr_fraction (0.0)                        final LR as a fraction of the peak
  weight_decay, b1, b2, eps                    AdamW (decoupled decay, scaled by the LR like torch)
  grad_clip_norm (0 = off)                     clip by global norm before Adam
  lr_multipliers {regex or part: m}            e.g. {"mask_adapter": 10.0}: LR × m for matching params
  layer_decay {part: rate}                     e.g. {"eva": 0.8}: ViT layer-wise LR decay (below)
Gradient accumulation is not an optimizer wrapper: the train step splits its batch into
`optimizer.grad_accum_steps` micro-batches and averages their gradients (`pixelground.training.steps`).

Weight decay applies to weight matrices only: ≥ 2 dims per layer (the stacked `layers` axis of a scanned
stack removed) and not a bias (some are stored head-split, e.g. (heads, head_dim)), norm scale, position
embedding or learned token. The usual "no decay on 1-D params", made robust to those layouts.

Layer-wise decay (BEiT/EVA recipe) for a ViT with L blocks: embeddings (patch/pos/cls) are layer 0, block
i is layer i + 1, anything after the blocks (final norm) is layer L + 1; the LR scale is
rate ** (L + 1 − layer). Scanned blocks hold all layers in one array, so the scale is a per-slice vector
broadcast along that array's leading `layers` axis.
"""

from __future__ import annotations

import re
import typing as tp

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from pixelground.config.parse import section
from pixelground.config.schema import OptimizerConfig
from pixelground.parallel.sharding import variable_axes

def _path_name(path) -> str:
  return ".".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)


def _flat(state) -> list[tuple[str, nnx.Variable]]:
  return [(".".join(map(str, p)), v) for p, v in nnx.to_flat_state(state)]


def _stacked(var: nnx.Variable) -> bool:
  axes = variable_axes(var)
  return bool(axes) and axes[0] == "layers"


_NO_DECAY = re.compile(r"(^|\.)(bias|scale|[a-z_]*pos_embed|[a-z_]*token[s]?|queries)$")


def decay_mask(state) -> tp.Any:
  """Same tree as `state`, True where weight decay applies (see module docstring)."""
  def one(path, v):
    matrix = (len(v.shape) - (1 if _stacked(v) else 0)) >= 2
    return v.replace(matrix and not _NO_DECAY.search(_path_name(path)))

  return jax.tree_util.tree_map_with_path(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _vit_layer(name: str, part: str, depth: int) -> int | None:
  """Layer index of a parameter of the ViT `part` (None: not in the ViT, or a stacked block)."""
  rest = name[len(part) + 1:]
  m = re.match(r"blocks\.layers\.(\d+)\.", rest)
  if m:
    return int(m.group(1)) + 1
  if rest.startswith("blocks."):
    return None  # scanned: per-slice scales
  if re.match(r"(patch_embed|pos_embed|cls_token|cls_pos_embed)", rest):
    return 0
  return depth + 1


def lr_scales(state, opt_cfg, depths: tp.Mapping[str, int]) -> tp.Any:
  """Per-parameter LR scale (a float, or a (L, 1, ...) array for scanned stacks), same tree as `state`.

  `depths`: {part: number of blocks} of the ViTs named in `opt_cfg.layer_decay`."""
  opt_cfg = as_optimizer_config(opt_cfg)
  multipliers = dict(opt_cfg.lr_multipliers)
  layer_decay = dict(opt_cfg.layer_decay)
  for part in layer_decay:
    if part not in depths:
      raise ValueError(f"config.optimizer.layer_decay names '{part}', which is not a ViT of this model "
                       f"(known: {sorted(depths)}).")
  patterns = [(re.compile(k if any(c in k for c in "^$.*[\\") else rf"^{re.escape(k)}\."), float(m))
              for k, m in multipliers.items()]
  matched = {k: 0 for k in multipliers}

  def one(path, var):
    name = _path_name(path)
    scale: tp.Any = 1.0
    for (reg, m), key in zip(patterns, multipliers):
      if reg.search(name):
        scale *= m
        matched[key] += 1
    for part, rate in layer_decay.items():
      if not name.startswith(part + "."):
        continue
      depth = depths[part]
      layer = _vit_layer(name, part, depth)
      if layer is None:  # scanned blocks: one scale per slice of the leading layers axis
        per = np.asarray([rate ** (depth - i) for i in range(depth)], np.float32)
        scale = scale * per.reshape((depth,) + (1,) * (len(var.shape) - 1))
      else:
        scale *= rate ** (depth + 1 - layer)
    return var.replace(scale)

  out = jax.tree_util.tree_map_with_path(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  unused = [k for k, n in matched.items() if n == 0]
  if unused:
    raise ValueError(f"config.optimizer.lr_multipliers {unused}: no trainable parameter matches.")
  return out


def _scale_by_tree(scales) -> optax.GradientTransformation:
  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, s: u * jnp.asarray(s, u.dtype), updates, scales), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def as_optimizer_config(opt_cfg) -> OptimizerConfig:
  """`config.optimizer` (ConfigDict or dict) → `OptimizerConfig`; unknown keys raise naming the key."""
  if isinstance(opt_cfg, OptimizerConfig):
    return opt_cfg
  return section(OptimizerConfig, opt_cfg, "config.optimizer")


def schedule(opt_cfg) -> optax.Schedule:
  opt_cfg = as_optimizer_config(opt_cfg)
  peak, total, warmup = float(opt_cfg.learning_rate), int(opt_cfg.total_steps), int(opt_cfg.warmup_steps)
  end = peak * float(opt_cfg.end_lr_fraction)
  return optax.warmup_cosine_decay_schedule(0.0, peak, max(warmup, 1), max(total, warmup + 1), end)


def build(opt_cfg, trainable_state, *, depths: tp.Mapping[str, int] | None = None
          ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(optax transformation over `trainable_state`, LR schedule) from `config.optimizer`."""
  opt_cfg = as_optimizer_config(opt_cfg)
  lr = schedule(opt_cfg)
  parts = []
  if opt_cfg.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(float(opt_cfg.grad_clip_norm)))
  parts.append(optax.scale_by_adam(b1=float(opt_cfg.b1), b2=float(opt_cfg.b2), eps=float(opt_cfg.eps)))
  if opt_cfg.weight_decay > 0:
    parts.append(optax.add_decayed_weights(float(opt_cfg.weight_decay), mask=decay_mask(trainable_state)))
  scales = lr_scales(trainable_state, opt_cfg, depths or {})
  if any(not (isinstance(s, float) and s == 1.0) for s in jax.tree.leaves(scales)):
    parts.append(_scale_by_tree(scales))
  parts.append(optax.scale_by_learning_rate(lr))
  return optax.chain(*parts), lr
