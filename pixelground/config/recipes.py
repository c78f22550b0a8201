"""The shared sections of the configs (configs/*.py import these; nothing is copied between them).

    model_config(size)       → `config.model`: "xl" (SAM-H + EVA02-L + FLAN-T5-XL, LoRA r32, 384 px,
                               SPEC §1) or "tiny" (`PixelLLMConfig` of `pixelllm.tiny_config`)
    build_model_config(c)    → `pixelground.models.pixelllm.PixelLLMConfig` from that section
    optimizer_config(...)    → `config.optimizer`: AdamW + linear warm-up + cosine decay (SPEC §3)
    runlocal(c)              → the same recipe shrunk to CPU size on the grounded-shapes data (the
                               `:runlocal` variant of every full-size config)
"""

from __future__ import annotations

import dataclasses
import typing as tp

import ml_collections

from pixelground.config import base, schema
from pixelground.config.parse import ConfigError, section, to_dict, unknown_key
from pixelground.models import eva02 as eva_lib
from pixelground.models import gella as gella_lib
from pixelground.models import pixelllm as P
from pixelground.models import sam_decoder as dec_lib
from pixelground.models import sam_encoder as sam_lib
from pixelground.models import swin as swin_lib
from pixelground.models import t5 as t5_lib

# `config.model` keys besides any PixelLLMConfig scalar field (num_queries, loc_hidden, ...).
_MODEL_KEYS = ("size", "image_size", "lisa", "refseg", "proposals", "seg_token_id", "vocab_size", "sam",
               "eva", "t5", "prompt", "tiny", "gella")


def model_config(size: str = "xl", *, lisa: bool = False, gella: bool = False, image_size: int = 384,
                 vocab_size: int = 32128, seg_token_id: int = 32099) -> ml_collections.ConfigDict:
  """The model section of a config. `sam` / `eva` / `t5` take any field of their dataclass and
  `preset` (sam-vit-{b,l,h}, eva02-{b,l}-14, flan-t5-{small..xxl}, or "none" to drop the part);
  `prompt` any SamDecoderConfig field; `gella` any GellaConfig field, its `swin` a Swin tower
  (preset swin-{tiny,small,base}); other keys any PixelLLMConfig field (extractor sizes, heads)."""
  c = ml_collections.ConfigDict()
  c.size = size
  c.image_size = image_size
  c.lisa = lisa
  c.refseg = False
  c.proposals = False
  c.seg_token_id = seg_token_id if (lisa or gella) else -1
  c.vocab_size = vocab_size
  if size == "tiny":
    c.gella = gella
    return c
  if gella:
    c.gella = ml_collections.ConfigDict({
        "colormap_size": 448, "width": 256, "num_heads": 8, "mlp_dim": 1024, "decoder_depth": 3,
        "assoc_dim": 256, "dtype": "bfloat16", "param_dtype": "float32",
        "swin": {"preset": "swin-tiny", "dtype": "bfloat16", "param_dtype": "float32"}})
  if size != "xl":
    raise ConfigError(f"config.model.size={size!r}: 'xl' or 'tiny'.")
  c.sam = ml_collections.ConfigDict({"preset": "sam-vit-h", "dtype": "bfloat16",
                                     "param_dtype": "bfloat16"})
  c.eva = ml_collections.ConfigDict({"preset": "eva02-l-14", "dtype": "bfloat16",
                                     "param_dtype": "float32", "drop_path_rate": 0.1,
                                     "remat": "full"})
  c.t5 = ml_collections.ConfigDict({
      "preset": "flan-t5-xl", "dtype": "bfloat16", "param_dtype": "bfloat16", "scan_layers": True,
      "remat": "full", "lora_rank": 32, "lora_alpha": 64.0,
      "lora_targets": t5_lib.PIXELLLM_LORA_TARGETS})
  c.prompt = ml_collections.ConfigDict()
  c.num_queries = 32
  c.extractor_width = 512
  c.extractor_depth = 6
  c.extractor_heads = 8
  c.extractor_mlp = 2048
  c.query_hidden = 1024
  return c


def _tower(values, presets: tp.Callable, cls, where: str):
  """A sub-model section ({preset?, field: value}) → its config dataclass, or None for preset "none"."""
  if values is None:
    return None
  d = to_dict(values)
  name = d.pop("preset", None)
  if name == "none":
    return None
  section(cls, d, where)  # unknown fields: did-you-mean errors
  d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
  return (presets(name) if name else cls()).replace(**d)


def build_model_config(c: ml_collections.ConfigDict) -> P.PixelLLMConfig:
  """`config.model` (see `model_config`) → PixelLLMConfig. Unknown keys raise, naming the key."""
  values = to_dict(c)
  if values.get("size") == "tiny":
    cfg = P.tiny_config(vocab_size=c.vocab_size, seg_token_id=c.seg_token_id, lisa=c.lisa,
                        image_size=c.image_size, refseg=c.get("refseg", False),
                        proposals=c.get("proposals", False), gella=bool(c.get("gella", False)))
    unknown = set(values) - {"size", "image_size", "lisa", "refseg", "proposals", "seg_token_id",
                             "vocab_size", "tiny", "gella"}
    if unknown:
      raise ConfigError(f"config.model.{sorted(unknown)[0]}: not a key of a tiny model section "
                        "(its overrides go under config.model.tiny).")
    return _override(cfg, c.get("tiny", None), "config.model.tiny")
  scalars = {f.name for f in dataclasses.fields(P.PixelLLMConfig)} - {"sam", "eva", "t5", "prompt",
                                                                     "gella"}
  extra = {}
  for key, value in values.items():
    if key in _MODEL_KEYS:
      continue
    if key not in scalars:
      raise unknown_key(key, set(_MODEL_KEYS) | scalars, "config.model", "the model section")
    extra[key] = tuple(value) if isinstance(value, list) else value
  sam = _tower(c.get("sam"), sam_lib.preset, sam_lib.SamEncoderConfig, "config.model.sam")
  eva = _tower(c.get("eva"), eva_lib.preset, eva_lib.Eva02Config, "config.model.eva")
  t5 = _tower(c.get("t5"), t5_lib.preset, t5_lib.T5Config, "config.model.t5").replace(
      vocab_size=c.vocab_size)
  grid = c.image_size // (eva.patch_size if eva else sam.patch_size)
  prompt = section(dec_lib.SamDecoderConfig, c.get("prompt", None), "config.model.prompt")
  prompt = prompt.replace(image_size=c.image_size, grid_size=grid)
  gella = None
  if c.get("gella") is not None:
    g = to_dict(c.gella)
    swin = _tower(g.pop("swin", None), swin_lib.preset, swin_lib.SwinConfig, "config.model.gella.swin")
    gella = section(gella_lib.GellaConfig, g, "config.model.gella")
    if swin is not None:
      gella = gella.replace(swin=swin)
  return P.PixelLLMConfig(image_size=c.image_size, sam=sam, eva=eva, prompt=prompt, t5=t5, gella=gella,
                          lisa=c.lisa, refseg=c.get("refseg", False),
                          proposals=c.get("proposals", False), seg_token_id=c.seg_token_id, **extra)


def _override(cfg, values, where: str):
  """Applies `values` ({field: value, sub-config: {field: value}}) to a config dataclass; unknown
  fields raise naming the key."""
  if not values:
    return cfg
  fields = {f.name for f in dataclasses.fields(cfg)}
  top, subs = {}, {}
  for k, v in to_dict(values).items():
    if k not in fields:
      raise ConfigError(f"{where}.{k}: not a field of {type(cfg).__name__} (fields: {sorted(fields)})")
    (subs if isinstance(v, dict) else top)[k] = tuple(v) if isinstance(v, list) else v
  sub_cfgs = {k: _override(getattr(cfg, k), v, f"{where}.{k}") for k, v in subs.items()}
  return cfg.replace(**top, **sub_cfgs)


def optimizer_config(*, lr: float, steps: int, warmup: int, batch_size: int, **kw
                     ) -> ml_collections.ConfigDict:
  """`config.optimizer` with every key (`schema.OptimizerConfig`): AdamW (default betas), no clipping,
  LR = base × linear warm-up × cosine decay to 0 (SPEC §3); `kw` sets any other key."""
  values = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
            for f in dataclasses.fields(schema.OptimizerConfig)
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}
  values.update(learning_rate=lr, total_steps=steps, warmup_steps=warmup, batch_size=batch_size)
  for k, v in kw.items():
    if k not in values:
      raise ConfigError(f"optimizer_config(): unknown key '{k}' (keys: {sorted(values)}).")
    values[k] = v
  return ml_collections.ConfigDict(values)


# ----------------------------------------------------------------------------------------------------
# runlocal: the same recipe at CPU size
# ----------------------------------------------------------------------------------------------------

# Full-size dataset → the grounded-shapes dataset in the same raw format (read by the same builder
# and converter; dense captioning reads the panoptic segments' captions, grounded shapes have no VG).
LOCAL_DATASETS = {"localized_narratives": "localized_narratives/grounded_shapes",
                  "coco_captions": "coco_captions/grounded_shapes",
                  "refcoco": "refcoco/grounded_shapes",
                  "reasonseg": "reasonseg/grounded_shapes",
                  "vg_densecap": "coco_panoptic/grounded_shapes",
                  "coco_panoptic": "coco_panoptic/grounded_shapes",
                  "panoptic_narrative_grounding": "panoptic_narrative_grounding/grounded_shapes",
                  "image_text": "image_text/webdataset"}  # tar shards of the grounded-shapes images

LOCAL_IMAGE_SIZE = 64
LOCAL_VOCAB, LOCAL_SEG_ID = 896, 3  # the committed tiny SentencePiece model; `[SEG]` = 3 in it


def runlocal(c: ml_collections.ConfigDict, *, steps: int = 30, batch_size: int = 8
             ) -> ml_collections.ConfigDict:
  """The `:runlocal` variant of a full-size config: the same tasks, converters, heads, LoRA targets,
  frozen towers, dtypes, remat / scan and mixing, with every width shrunk (SAM 32 wide, 2 blocks; EVA02
  32 wide, 2 blocks; T5 d_model 64, 2 + 2 layers, LoRA rank 8 at the same scale), 64-px images, the
  committed tiny vocabulary and the grounded-shapes datasets (built on first use). No pretrained files
  (`config.weights` may still point at small ones). `steps` of batch `batch_size`, a checkpoint every
  10 steps, evaluation of 16 held-out examples per task at the end."""
  m = c.model
  s = LOCAL_IMAGE_SIZE
  m.image_size = s
  m.vocab_size = LOCAL_VOCAB
  if m.lisa or "gella" in m:
    m.seg_token_id = LOCAL_SEG_ID
  if "gella" in m:
    # Colormap at 2× the image (as 448 over 384), Swin 16 wide with windows 4 over its 32/16/8/4 maps.
    m.gella.update(colormap_size=2 * s, width=32, num_heads=2, mlp_dim=64, decoder_depth=2, assoc_dim=32)
    m.gella.swin.update(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), window_size=4)
  # SAM: patch 16 → a 4×4 map resized to EVA02's 8×8 grid, as 24×24 → 27×27 at full size; its
  # position table is native at 128 px and resized, as SAM's 1024-px table is at 384.
  m.sam.update(image_size=128, width=32, depth=2, num_heads=2, window_size=2, global_blocks=(1,),
               out_channels=32)
  m.eva.update(image_size=32, patch_size=8, width=32, depth=2, num_heads=2, mlp_dim=85, rope_ref_grid=4)
  m.t5.update(d_model=64, num_heads=2, head_dim=32, d_ff=128, num_encoder_layers=2, num_decoder_layers=2,
              lora_rank=8, lora_alpha=16.0)
  m.prompt.update(prompt_dim=32, depth=2, num_heads=2, mlp_dim=64, iou_head_hidden=32, mask_in_chans=8)
  m.update(num_queries=8, extractor_width=32, extractor_depth=2, extractor_heads=2, extractor_mlp=64,
           query_hidden=48)
  if "loc_hidden" not in m:
    m.loc_hidden = 32
  if "adapter_heads" not in m:
    m.adapter_heads = 2
  if "proposal_width" not in m:
    m.proposal_width = 32
  c.tokenizer = "tiny"
  for name, t in c.tasks.items():
    builder = t.dataset.partition("/")[0]
    if builder not in LOCAL_DATASETS:
      raise ConfigError(f"runlocal: config.tasks.{name}.dataset {t.dataset!r} has no grounded-shapes "
                        f"equivalent (known: {sorted(LOCAL_DATASETS)}).")
    t.dataset = LOCAL_DATASETS[builder]
    t.split, t.eval_split = "train", "validation"
  # An earlier stage's runlocal run is named on the command line (--config.init_from.path=...).
  c.init_from.path = ""
  c.data.image_size = s
  c.data.max_prompt_len = 16
  c.data.max_target_len = min(c.data.max_target_len, 48)
  c.data.max_region_len = min(c.data.max_region_len, 8)
  c.data.max_regions = min(c.data.max_regions, 4)
  c.data.num_workers = 0
  c.data.num_shards = 0
  c.data.grounded_shapes = base.grounded_shapes(num_train=256, num_validation=32, size=s, max_shapes=3)
  c.optimizer.update(learning_rate=1e-3, total_steps=steps, warmup_steps=max(steps // 10, 1),
                     batch_size=batch_size)
  c.eval.update(batch_size=8, max_examples=16, max_decode_len=16, dense_k=4)
  c.log_every = 5
  c.eval_every = 0
  c.checkpoint_every = 10
  c.mesh.update(data=-1, fsdp=1, tensor=1)
  return c


def variant(get_full: tp.Callable[[], ml_collections.ConfigDict], arg: str | None
            ) -> ml_collections.ConfigDict:
  """`get_config(arg)` of a full-size config file: `arg` None / "" → the full size, "runlocal" → the
  CPU variant."""
  c = get_full()
  if arg in (None, ""):
    return c
  if arg == "runlocal":
    return runlocal(c)
  raise ConfigError(f"unknown config variant {arg!r}: use no argument (full size) or ':runlocal'.")
