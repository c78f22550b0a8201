"""Where a fresh train state's weights come from besides its initialisers.

* `import_weights` — `config.weights.{sam,eva,t5}`: pretrained files in their original formats (SAM
  `.pth` / HF, timm EVA02, HF / T5X T5). Strict: after the import every non-LoRA parameter of an
  imported part holds its file tensor — a parameter the file does not provide is an error listing
  them; file tensors the model does not use are listed in the report.
* `init_from` — `config.init_from`: staged initialisation from another run's checkpoint (SPEC §3: the
  referring stage starts from the trace stage, ...). The parameters both models share (same path, any
  of trainable / frozen) are loaded, straight into this run's shardings; the rest keep their fresh or
  imported values; a shared parameter whose shape differs is an error naming it.

The trainer applies them in that order (the checkpoint wins where both provide a parameter) and prints
each report (`format_report`): what was loaded, what is new, what was ignored.
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing as tp

import jax
from flax import nnx

from pixelground.training.train_state import Setup

Path = tuple[tp.Any, ...]


class WeightsError(ValueError):
  """A pretrained file or checkpoint does not fit the model (the parameters are named)."""


@dataclasses.dataclass
class Report:
  """What one weight source did to the state: dotted parameter paths, by outcome."""
  source: str
  loaded: list[str] = dataclasses.field(default_factory=list)   # from the source
  new: list[str] = dataclasses.field(default_factory=list)      # kept their init (fresh or imported)
  ignored: list[str] = dataclasses.field(default_factory=list)  # in the source, not used (why in text)


def _dotted(path: Path) -> str:
  return ".".join(str(p) for p in path)


def _flat(state) -> dict[Path, nnx.Variable]:
  return dict(nnx.to_flat_state(state))


def _set(var: nnx.Variable, value) -> None:
  old = var.get_value()
  var.set_value(jax.device_put(value.astype(old.dtype), old.sharding))


# ----------------------------------------------------------------------------------------------------
# Pretrained files (config.weights)
# ----------------------------------------------------------------------------------------------------

def _load_parts(setup: Setup, key: str, path: str) -> list[tuple[str, nnx.Module, dict]]:
  """(PixelLLM part name, loaded module, loader report) for one `config.weights` entry."""
  from pixelground.checkpoints import eva02 as eva_ckpt, sam as sam_ckpt, sam_decoder as dec_ckpt
  from pixelground.checkpoints import t5 as t5_ckpt

  cfg, mesh, rules = setup.cfg, setup.mesh, setup.rules
  if key == "sam":
    if cfg.sam is None:
      raise WeightsError("config.weights.sam is set but the model has no SAM encoder.")
    enc_report, dec_report = {}, {}
    enc = sam_ckpt.load_sam_image_encoder(path, cfg.sam, mesh=mesh, rules=rules, report=enc_report)
    dec = dec_ckpt.load_sam_decoder(path, cfg.prompt, mesh=mesh, rules=rules, report=dec_report)
    parts = [("sam_encoder", enc, enc_report), ("prompt_encoder", dec.prompt_encoder,
                                                  _sub_report(dec_report, "prompt_encoder"))]
    if cfg.lisa or cfg.refseg:
      parts.append(("mask_decoder", dec.mask_decoder, _sub_report(dec_report, "mask_decoder")))
    return parts
  if key == "eva":
    if cfg.eva is None:
      raise WeightsError("config.weights.eva is set but the model has no EVA02 encoder.")
    report = {}
    return [("eva", eva_ckpt.load_eva02(path, cfg.eva, mesh=mesh, rules=rules, report=report), report)]
  report = {}
  return [("t5", t5_ckpt.load_t5(path, cfg.t5, mesh=mesh, rules=rules, seed=0, report=report), report)]


def _sub_report(report: dict, prefix: str) -> dict:
  """A `SamDecoder` load report restricted to one of its sub-modules (paths without the prefix)."""
  cut = len(prefix) + 1
  return dict(report, loaded={p[cut:]: k for p, k in report["loaded"].items() if p.startswith(prefix + ".")},
              initialised=[p[cut:] for p in report["initialised"] if p.startswith(prefix + ".")])


def import_weights(setup: Setup, state, weights) -> tuple[tp.Any, list[Report]]:
  """Copies the parts named in `weights` (`config.weights`: sam → SAM image encoder + prompt encoder
  (+ mask decoder with LISA / refseg heads), eva → EVA02, t5 → T5) into `state`. LoRA factors keep
  their init (files have none). Raises `WeightsError` listing every non-LoRA parameter of an imported
  part that the file did not provide, FileNotFoundError naming the config key of a missing file."""
  reports = []
  for key in ("sam", "eva", "t5"):
    path = getattr(weights, key, "") if weights is not None else ""
    if not path:
      continue
    if not os.path.exists(path):
      raise FileNotFoundError(f"config.weights.{key}: {path} does not exist.")
    rep = Report(f"config.weights.{key} = {path}")
    consumed: set[str] = set()
    file_keys: set[str] = set()
    missing: list[str] = []
    mismatched: list[str] = []
    for part, module, info in _load_parts(setup, key, path):
      file_keys.update(info["keys"])
      loaded = _flat(nnx.state(module))
      from_file = set(info["loaded"])
      used = set()
      for group in ("params", "frozen"):
        flat = _flat(state[group])
        hit = False
        for p, var in flat.items():
          if p[0] != part:
            continue
          if isinstance(var, nnx.LoRAParam):
            rep.new.append(_dotted(p))
            continue
          sub = _dotted(p[1:])
          if p[1:] not in loaded or sub not in from_file:
            missing.append(_dotted(p))
            continue
          value = loaded[p[1:]].get_value()
          if value.shape != var.get_value().shape:
            mismatched.append(f"{_dotted(p)} {tuple(value.shape)} in the file, {var.get_value().shape} "
                              "in the model")
            continue
          _set(var, value)
          used.add(sub)
          rep.loaded.append(_dotted(p))
          hit = True
        if hit:
          state[group] = nnx.from_flat_state(flat)
      for sub in used:
        consumed.update(info["loaded"][sub])
    if missing or mismatched:
      lines = [f"config.weights.{key}: {path} does not fit the model's imported part(s)."]
      if missing:
        lines.append(f"  {len(missing)} parameter(s) not in the file: {', '.join(missing)}")
      if mismatched:
        lines.append(f"  {len(mismatched)} with another shape: {'; '.join(mismatched)}")
      raise WeightsError("\n".join(lines))
    rep.ignored = sorted(file_keys - consumed)
    reports.append(rep)
  return state, reports


# ----------------------------------------------------------------------------------------------------
# Staged initialisation (config.init_from)
# ----------------------------------------------------------------------------------------------------

def _matches(name: str, patterns: tp.Sequence[str]) -> bool:
  return any(re.search(p, name) for p in patterns)


def init_from(setup: Setup, state, spec) -> tuple[tp.Any, Report]:
  """Loads into `state` every parameter it shares with the checkpoint `spec.path` (`config.init_from`:
  path, step, include, exclude): same dotted path in the saved model (trainable or frozen there), not
  excluded. Optimizer state and step are not taken (a new stage starts its own schedule)."""
  import orbax.checkpoint as ocp

  from pixelground.training import checkpointing

  root, step = checkpointing.find_checkpoint(spec.path, where="config.init_from.path")
  if spec.step >= 0:
    if not os.path.isdir(os.path.join(root, str(spec.step), "state")):
      raise FileNotFoundError(f"config.init_from.step={spec.step}: no checkpoint {root}/{spec.step}.")
    step = spec.step
  rep = Report(f"config.init_from = {root}/{step}")
  manager = ocp.CheckpointManager(root, item_handlers={"state": ocp.PyTreeCheckpointHandler()})
  try:
    meta = manager.item_metadata(step)["state"]
    meta = getattr(meta, "tree", meta)
    saved: dict[str, tuple[str, tuple[int, ...]]] = {}  # dotted path → (group, shape)
    for p, m in jax.tree_util.tree_flatten_with_path(meta)[0]:
      keys = [getattr(k, "key", getattr(k, "idx", None)) for k in p]
      if keys[0] in ("params", "frozen") and keys[-1] == "value":
        saved[_dotted(keys[1:-1])] = (keys[0], tuple(m.shape))
    item, targets = {}, []
    for group in ("params", "frozen"):
      for p, var in _flat(state[group]).items():
        name = _dotted(p)
        if name not in saved or (spec.include and not _matches(name, spec.include)) or \
            _matches(name, spec.exclude):
          rep.new.append(name)
          continue
        src_group, shape = saved.pop(name)
        value = var.get_value()
        if shape != tuple(value.shape):
          raise WeightsError(f"config.init_from: parameter {name} has shape {shape} in {root}/{step}, "
                             f"this model's is {tuple(value.shape)}.")
        node = item.setdefault(src_group, {})
        for k in p:
          node = node.setdefault(str(k), {})
        node["value"] = jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=value.sharding)
        targets.append((group, p, src_group, name))
    rep.ignored = sorted(saved)
    if targets:
      restore_args = jax.tree.map(
          lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding, global_shape=s.shape, dtype=s.dtype), item)
      out = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          item=item, restore_args=restore_args, partial_restore=True)))["state"]
  finally:
    manager.close()
  flats = {g: _flat(state[g]) for g in ("params", "frozen")}
  for group, p, src_group, name in targets:
    node = out[src_group]
    for k in p:
      node = node[str(k)]
    flats[group][p].set_value(node["value"])
    rep.loaded.append(name)
  for g in ("params", "frozen"):
    state[g] = nnx.from_flat_state(flats[g])
  return state, rep


def format_report(rep: Report, *, width: int = 100) -> str:
  """A table of loaded / new / ignored parameters, grouped by their first two path components."""
  def groups(names: list[str]) -> list[tuple[str, int]]:
    out: dict[str, int] = {}
    for n in names:
      key = ".".join(n.split(".")[:2])
      out[key] = out.get(key, 0) + 1
    return sorted(out.items())

  lines = [f"{rep.source}: {len(rep.loaded)} loaded, {len(rep.new)} new, {len(rep.ignored)} ignored"]
  for label, names in (("loaded", rep.loaded), ("new", rep.new), ("ignored", rep.ignored)):
    for prefix, n in groups(names):
      lines.append(f"  {label:8s} {n:6d}  {prefix}"[:width])
  return "\n".join(lines)

