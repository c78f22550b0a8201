"""Every key of a pixelground config: its section, default and meaning, and the strict parser.

A config file's `get_config(arg)` starts from `pixelground.config.base.config()` (a ConfigDict holding
every key below at its default, so `--config.key=value` can set any of them) and `parse` turns it into a
frozen `Config`: an unknown key is an error naming it (with the closest valid name), and every key here
is read by the trainer, the evaluator or the data code (tests/test_configs.py checks both).

    seed                    int      one seed for initialisation, data order and dropout
    model                   section  `pixelground.config.recipes.model_config` → PixelLLMConfig
    trainable               regexes  parameters trained (besides LoRA factors); the rest is frozen and
                                     carries no optimizer state
    train_lora              bool     train every `nnx.LoRAParam`
    weights.{sam,eva,t5}    paths    pretrained files imported at initialisation (`training.weights`)
    init_from.*             section  staged initialisation from another run (`InitFromConfig`)
    tokenizer               str      "tiny" or a SentencePiece model path
    optimizer.*             section  `OptimizerConfig`
    loss.*                  section  `pixelground.training.objective.LossConfig`
    tasks.<name>.*          section  `TaskSpec` per task (`pixelground.config.base.task(...)` builds one)
    data.*                  section  `DataConfig`
    eval.*                  section  `EvalConfig`
    log_every, eval_every, checkpoint_every, checkpoint_keep, async_checkpoint   the loop's cadence
    max_nonfinite_steps     int      steps with a non-finite loss / gradient are not applied; this many
                                     in a row stop the run (docs/faults.md)
    compile_workers         int      threads compiling the tasks' train steps side by side before their
                                     first batches (single-task batches); -1: one per task up to the
                                     CPU count (at most 8), 0: each at its task's first batch
    visualize.*             section  `VisualizeConfig` (the demo figure)
    mesh.{data,fsdp,tensor} ints     mesh axis sizes (-1: the rest of the devices)
    sharding_rules          pairs    logical axis → mesh axes (`pixelground.parallel.sharding`)
"""

from __future__ import annotations

import dataclasses
import typing as tp


from pixelground.config.parse import ConfigError, freeze, load_config, section, to_dict, unknown_key


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """`config.tasks.<name>`: one task of the mixture and its held-out split."""
  dataset: str                   # "builder/config" (`pixelground.training.datasets.DATASETS`)
  weight: float = 1.0            # sampling weight (a batch's task with mixing "batch", a row's otherwise)
  converter: str = ""            # `pixelground.data.tasks.Converters` method; "" = the task's name
  split: str = "train"
  eval_split: str = "validation"
  loss_weight: float = 1.0       # scales this task's text loss
  # This task's example lengths instead of `config.data`'s (0 = the data section's); only with mixing
  # "batch", where every task has its own batch shapes.
  max_prompt_len: int = 0
  max_target_len: int = 0
  max_seg: int = 0
  # Record filters of web image–text data (converter "web_caption"; the defaults keep everything). A
  # dropped record is counted by reason (`pixelground.data.tasks.DROP_REASONS`) and logged.
  min_caption_tokens: int = 0    # drop captions of fewer tokens
  max_caption_tokens: int = 0    # drop captions of more tokens (0: no limit; longer targets are cut)
  languages: tuple[str, ...] = ()  # keep only these `language` codes ("" = unknown); () = any
  min_score: float = -1.0        # drop records whose `score` is below (absent scores are -1)
  min_image_side: int = 0        # drop images whose shorter side is smaller, pixels


_FILTER_DEFAULTS = {"min_caption_tokens": 0, "max_caption_tokens": 0, "languages": (), "min_score": -1.0,
                    "min_image_side": 0}
FILTER_CONVERTERS = ("web_caption",)


@dataclasses.dataclass(frozen=True)
class GroundedShapesConfig:
  """`config.data.grounded_shapes`: the synthetic datasets built on first use into the cache
  (`pixelground.training.datasets.prepare_data`); set, it replaces `data.tfds_dir`."""
  num_train: int = 2000
  num_validation: int = 200
  seed: int = 0
  size: int = 64                 # image side, pixels
  max_shapes: int = 5
  scale: float = 1.0             # shape radii × this
  colours: int = 8


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """`config.data`: example geometry and lengths (`pixelground.data.tasks.TaskConfig`) and loading."""
  image_size: int = 384          # model input side S, pixels
  scale_range: tuple[float, float] = (0.5, 1.5)  # training resize: long side S·r, r uniform in range
  flip: bool = False             # horizontal flips (refused for text that names left / right)
  max_prompt_len: int = 32       # encoder text tokens
  max_target_len: int = 128      # decoder tokens incl. EOS
  max_seg: int = 4               # `[SEG]` slots per example
  max_entities: int = 16         # entity masks per example (narrative grounding, panoptic)
  max_regions: int = 16          # dense-captioning regions per image
  max_region_len: int = 16       # tokens per region caption incl. EOS
  split_sentences: bool = False  # LN: one sentence per target instead of the whole narrative
  # How input shards split a task's records: "record" (shard k of n reads records k, k + n, ...: every
  # shard touches every file) or "file" (whole array_record files, files k, k + n, ... of the split:
  # disjoint files per host, for web-scale data in thousands of files).
  shard_by: str = "record"
  seg_boxes: bool = False        # `[SEG]` rows also carry their mask's box (a from-scratch aid)
  shuffle_categories: bool = True  # panoptic prompts list the categories in a random order (training)
  mixing: str = "batch"          # "batch": one task per batch (per-task programs); "example": mixed rows
  num_workers: int = 0           # Grain worker processes converting examples (0: in-process)
  num_shards: int = 0            # input shards (0: one per process); fixed shards resume on any count
  # A prepared record that cannot be read (damaged or missing array_record file): "error" stops the run
  # naming the file; "skip" drops it, counted in the log as "unreadable" (training only).
  bad_records: str = "error"
  tfds_dir: str = "~/tensorflow_datasets"  # where the prepared TFDS datasets live (TFDS's default)
  grounded_shapes: GroundedShapesConfig | None = None

  def __post_init__(self):
    if self.mixing not in ("batch", "example"):
      raise ConfigError(f"config.data.mixing={self.mixing!r}: must be 'batch' or 'example'.")
    if self.shard_by not in ("record", "file"):
      raise ConfigError(f"config.data.shard_by={self.shard_by!r}: must be 'record' or 'file'.")
    if self.bad_records not in ("error", "skip"):
      raise ConfigError(f"config.data.bad_records={self.bad_records!r}: must be 'error' or 'skip'.")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """`config.optimizer`: AdamW, linear warm-up then cosine decay (SPEC §3); `pixelground.training.optim`."""
  learning_rate: float
  total_steps: int
  warmup_steps: int
  batch_size: int                # global batch (examples per step, all processes)
  name: str = "adamw"
  weight_decay: float = 0.0      # decoupled, on weight matrices only
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  end_lr_fraction: float = 0.0   # final LR as a fraction of the peak
  grad_clip_norm: float = 0.0    # 0: no clipping
  grad_accum_steps: int = 1      # micro-batches per step (gradients averaged)
  lr_multipliers: dict[str, float] = dataclasses.field(default_factory=dict)  # {regex or part: m}
  layer_decay: dict[str, float] = dataclasses.field(default_factory=dict)     # {ViT part: rate}

  def __post_init__(self):
    if self.name != "adamw":
      raise ConfigError(f"config.optimizer.name={self.name!r}: only 'adamw' is implemented.")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """`config.eval`: the held-out evaluation (`pixelground.inference.eval_lib`)."""
  tasks: tuple[str, ...] = ()    # names of config.tasks; () = every task that has an evaluation
  batch_size: int = 32           # global batch
  max_examples: int = 0          # per task; 0 = the whole split
  max_decode_len: int = 40       # generated tokens (captions, answers)
  dense_k: int = 10              # proposals per image (dense captioning)
  java_fallback: bool = False    # caption metrics without Java: no METEOR, Python tokenizer
  # PNG: score phrase masks after the benchmark's 256 × 256 round trip (`metrics/png.py`)
  png_round_trip: bool = False
  # GELLA tasks' entities: "oracle" (ground-truth segments) or "sam" (SAM's automatic masks of the
  # image, `inference/eval_entities.py`), from `sam_checkpoint` or the model's own SAM parts.
  entities: str = "oracle"
  sam_checkpoint: str = ""

  def __post_init__(self):
    if self.entities not in ("oracle", "sam"):
      raise ConfigError(f"config.eval.entities={self.entities!r}: expected 'oracle' or 'sam'.")


@dataclasses.dataclass(frozen=True)
class WeightsConfig:
  """`config.weights`: pretrained files imported into a fresh state (`pixelground.training.weights`)."""
  sam: str = ""                  # original `sam_vit_*.pth` or an HF SamModel directory
  eva: str = ""                  # timm EVA02 checkpoint (.safetensors / .bin / .pth)
  t5: str = ""                   # HF T5 directory or a T5X checkpoint


@dataclasses.dataclass(frozen=True)
class InitFromConfig:
  """`config.init_from`: staged initialisation — the parameters this model shares with another run's
  checkpoint are loaded, the rest initialised as new (`pixelground.training.weights.init_from`). A
  resumed run ignores it."""
  path: str = ""                 # a training workdir, its checkpoints/ directory or a step directory
  step: int = -1                 # -1: the newest step (or the step directory's)
  include: tuple[str, ...] = ()  # regexes on dotted parameter paths; () = every shared parameter
  exclude: tuple[str, ...] = ()  # regexes; matching parameters stay freshly initialised


@dataclasses.dataclass(frozen=True)
class VisualizeConfig:
  """`config.visualize`: the figure drawn after training (WORKDIR/demo.png)."""
  enabled: bool = False
  num_images: int = 3


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """`config.mesh`: device mesh axis sizes, in this order; one may be -1 (the rest)."""
  data: int = -1
  fsdp: int = 1
  tensor: int = 1

  def axes(self) -> dict[str, int]:
    return {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}


def _default_rules():
  from pixelground.parallel.sharding import DEFAULT_RULES
  return DEFAULT_RULES


def _default_trainable():
  from pixelground.models.pixelllm import TRAINABLE
  return TRAINABLE


@dataclasses.dataclass(frozen=True)
class Config:
  """A parsed config (see the module docstring); `model` is the built PixelLLMConfig."""
  model: tp.Any
  tokenizer: str
  optimizer: OptimizerConfig
  tasks: dict[str, TaskSpec]
  seed: int = 0
  trainable: tuple[str, ...] = dataclasses.field(default_factory=_default_trainable)
  train_lora: bool = True
  weights: WeightsConfig = dataclasses.field(default_factory=WeightsConfig)
  init_from: InitFromConfig = dataclasses.field(default_factory=InitFromConfig)
  loss: tp.Any = None            # pixelground.training.objective.LossConfig
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
  log_every: int = 50
  eval_every: int = 0            # 0: evaluate at the end only
  checkpoint_every: int = 1000
  checkpoint_keep: int = 3
  async_checkpoint: bool = True
  max_nonfinite_steps: int = 5   # consecutive non-finite steps (skipped, not applied) before the run stops
  compile_workers: int = -1      # background compile threads for the tasks' train steps (-1 auto, 0 off)
  visualize: VisualizeConfig = dataclasses.field(default_factory=VisualizeConfig)
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
  sharding_rules: tuple[tuple[str, tp.Any], ...] = dataclasses.field(default_factory=_default_rules)
  source: tp.Any = dataclasses.field(default=None, compare=False, repr=False)  # the ConfigDict parsed

  def converter(self, task: str) -> str:
    """The converter of `config.tasks[task]` (its name unless `converter` is set)."""
    return self.tasks[task].converter or task

  def task_config(self, *, train: bool, task: str | None = None):
    """`config.data` (with task `task`'s own lengths, `TaskSpec.max_*`) → `pixelground.data.tasks.
    TaskConfig` for training or evaluation examples."""
    from pixelground.data.tasks import TaskConfig

    names = {f.name for f in dataclasses.fields(TaskConfig)} - {"train"}
    kw = {k: getattr(self.data, k) for k in names if hasattr(self.data, k)}
    if task is not None:
      spec = self.tasks[task]
      kw.update({k: getattr(spec, k) for k in _TASK_LENGTHS if getattr(spec, k)})
      kw.update({k: getattr(spec, k) for k in _FILTER_DEFAULTS})
    return TaskConfig(train=train, **kw)

  def to_json(self) -> str:
    """The ConfigDict this was parsed from, as JSON (WORKDIR/config.json: `parse` reads it back)."""
    return self.source.to_json_best_effort(indent=1)


_TASK_LENGTHS = ("max_prompt_len", "max_target_len", "max_seg")

# Sections parsed here (the rest of the top level are plain values).
_SECTIONS = {"optimizer": OptimizerConfig, "data": DataConfig, "eval": EvalConfig, "weights": WeightsConfig,
             "init_from": InitFromConfig, "visualize": VisualizeConfig, "mesh": MeshConfig}


def parse(config: tp.Any) -> Config:
  """A ConfigDict, a config file ("file.py[:arg]"), a run's config.json or an already parsed Config →
  `Config`. Raises `ConfigError` naming the first unknown or missing key."""
  if isinstance(config, Config):
    return config
  from pixelground.config import recipes
  from pixelground.training.objective import LossConfig

  cd = load_config(config)
  values = to_dict(cd)
  top = {f.name for f in dataclasses.fields(Config)} - {"source"}
  for key in values:
    if key not in top:
      raise unknown_key(key, top, "config", "the top level")
  for key in ("model", "tokenizer", "optimizer", "tasks"):
    if key not in values:
      raise ConfigError(f"Missing config key 'config.{key}'.")
  kwargs: dict[str, tp.Any] = {"source": cd}
  for key, value in values.items():
    if key in _SECTIONS:
      kwargs[key] = section(_SECTIONS[key], value, f"config.{key}")
    elif key == "model":
      kwargs[key] = recipes.build_model_config(cd.model)
    elif key == "loss":
      if value and "task_weights" in value:
        raise ConfigError("config.loss.task_weights: set each task's config.tasks.<name>.loss_weight.")
      kwargs[key] = section(LossConfig, value, "config.loss")
    elif key == "tasks":
      if not value:
        raise ConfigError("config.tasks is empty: a run needs at least one task.")
      kwargs[key] = {name: section(TaskSpec, t, f"config.tasks.{name}") for name, t in value.items()}
    else:
      kwargs[key] = freeze(value)
  loss = kwargs.get("loss") or LossConfig()
  # Per-task text-loss weights, in task order = the batches' task_id.
  kwargs["loss"] = dataclasses.replace(loss, task_weights=tuple(t.loss_weight for t in kwargs["tasks"].values()))
  cfg = Config(**kwargs)
  _check(cfg)
  return cfg


def _check(cfg: Config) -> None:
  for name, t in cfg.tasks.items():
    if not t.dataset:
      raise ConfigError(f"config.tasks.{name}.dataset is empty.")
    filters = [k for k, v in _FILTER_DEFAULTS.items() if getattr(t, k) != v]
    if filters and cfg.converter(name) not in FILTER_CONVERTERS:
      raise ConfigError(f"config.tasks.{name}.{filters[0]}: record filters apply to the converters "
                        f"{FILTER_CONVERTERS}, not '{cfg.converter(name)}'.")
    if t.max_caption_tokens and t.max_caption_tokens < t.min_caption_tokens:
      raise ConfigError(f"config.tasks.{name}.max_caption_tokens={t.max_caption_tokens} is below "
                        f"min_caption_tokens={t.min_caption_tokens}.")
    own = [k for k in _TASK_LENGTHS if getattr(t, k)]
    if own and cfg.data.mixing != "batch":
      raise ConfigError(f"config.tasks.{name}.{own[0]}: per-task lengths need "
                        f"config.data.mixing='batch' (mixed rows share one shape).")
  for key in ("log_every", "checkpoint_every", "checkpoint_keep", "max_nonfinite_steps"):
    if getattr(cfg, key) < 1:
      raise ConfigError(f"config.{key}={getattr(cfg, key)}: must be ≥ 1.")
  if cfg.eval_every < 0:
    raise ConfigError(f"config.eval_every={cfg.eval_every}: must be ≥ 0 (0: at the end only).")
  if cfg.compile_workers < -1:
    raise ConfigError(f"config.compile_workers={cfg.compile_workers}: must be ≥ -1 (-1: auto, 0: off).")
  for n in cfg.eval.tasks:
    if n not in cfg.tasks:
      raise ConfigError(f"config.eval.tasks: unknown task '{n}' (config.tasks has {list(cfg.tasks)}).")
  if cfg.optimizer.batch_size % cfg.optimizer.grad_accum_steps:
    raise ConfigError(f"config.optimizer.batch_size={cfg.optimizer.batch_size} must divide by "
                      f"grad_accum_steps={cfg.optimizer.grad_accum_steps}.")
