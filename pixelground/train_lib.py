"""The pieces `pixelground.train` is made of: data from `config.tasks`, the sharded train state, the
jitted train / eval steps, pretrained-weight import and Orbax checkpoints.

Train state (one pytree, donated to every step):
  {"step": () int32, "params": trainable nnx.State (float32), "frozen": everything else (nnx.State),
   "opt": optax state over "params" only}  — frozen weights carry no optimizer state.
Every leaf is placed by the config's logical-axis rules (`pixelground.sharding`).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import os
import shutil
import subprocess
import sys
import time
import typing as tp

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from pixelground import optim, recipes, sharding, train_metrics
from pixelground.data import pipeline, tasks as task_lib
from pixelground.models import pixelllm as P

# TFDS builder of each dataset name used in `config.tasks[*].dataset` ("name/config").
DATASETS = {
    "localized_narratives": ("tfds_builders.localized_narratives", "LocalizedNarratives"),
    "coco_captions": ("tfds_builders.coco_captions", "CocoCaptions"),
    "coco_panoptic": ("tfds_builders.coco_panoptic", "CocoPanoptic"),
    "panoptic_narrative_grounding": ("tfds_builders.panoptic_narrative_grounding",
                                     "PanopticNarrativeGrounding"),
    "refcoco": ("tfds_builders.refcoco", "RefCoco"),
    "reasonseg": ("tfds_builders.reasonseg", "ReasonSeg"),
    "vg_densecap": ("tfds_builders.vg_densecap", "VgDensecap"),
    "image_text": ("tfds_builders.image_text", "ImageText"),
}


# ----------------------------------------------------------------------------------------------------
# Config → parts
# ----------------------------------------------------------------------------------------------------

def rules_from_config(config) -> tuple[tuple[str, tp.Any], ...]:
  rules = config.get("sharding_rules", None) or sharding.DEFAULT_RULES
  return tuple((k, tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in rules)


def task_config(config, *, train: bool) -> task_lib.TaskConfig:
  """`config.data` → TaskConfig (unknown keys in config.data that are TaskConfig-like are rejected)."""
  d = config.data
  fields = {f.name for f in dataclasses.fields(task_lib.TaskConfig)}
  kw = {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in d.items() if k in fields}
  return task_lib.TaskConfig(train=train, **kw)


def open_builder(dataset: str, data_dir: str, where: str):
  """"name/config" → the TFDS builder (prepared data must exist under `data_dir`)."""
  name, _, cfg_name = dataset.partition("/")
  if name not in DATASETS:
    raise ValueError(f"{where}: unknown dataset '{name}' (known: {sorted(DATASETS)}).")
  module, cls = DATASETS[name]
  builder = getattr(importlib.import_module(module), cls)(data_dir=data_dir, config=cfg_name or None)
  if not os.path.isdir(builder.data_dir):
    raise FileNotFoundError(f"{where}: dataset '{dataset}' is not prepared under {data_dir} (expected "
                            f"{builder.data_dir}); build it first (see tfds_builders/README.md).")
  return builder


def make_converters(config, tokenizer, *, train: bool, categories=None) -> task_lib.Converters:
  return task_lib.Converters(task_config(config, train=train), tokenizer, categories=categories)


def data_tasks(config, tokenizer, *, split_key: str = "split", train: bool = True,
               names: tp.Sequence[str] | None = None) -> list[pipeline.Task]:
  """One pipeline.Task per `config.tasks` entry (or the `names` subset): builder split + converter."""
  out = []
  data_dir = config.data.tfds_dir
  for name, t in config.tasks.items():
    if names is not None and name not in names:
      continue
    where = f"config.tasks.{name}"
    builder = open_builder(t.dataset, data_dir, where)
    split = t.get(split_key, "train" if split_key == "split" else "validation")
    if split not in builder.info.splits:
      raise ValueError(f"{where}.{split_key}: split '{split}' not in {t.dataset} "
                       f"(has {sorted(builder.info.splits)}).")
    converter_name = t.get("converter", name)
    categories = builder.info.metadata.get("categories") if builder.info.metadata else None
    conv = make_converters(config, tokenizer, train=train, categories=categories)
    if not hasattr(conv, converter_name):
      raise ValueError(f"{where}.converter: no converter '{converter_name}'.")
    out.append(pipeline.Task(name, builder.as_data_source(split), getattr(conv, converter_name),
                             float(t.get("weight", 1.0)),
                             schema=task_lib.task_schema(conv.cfg, converter_name)
                             if config.data.get("mixing", "batch") == "batch" else None))
  return out


def task_of_batch(batch: dict[str, np.ndarray], names: tp.Sequence[str]) -> str:
  ids = np.unique(batch["task_id"])
  if len(ids) != 1:
    raise ValueError("per-task steps need single-task batches (config.data.mixing='batch')")
  return names[int(ids[0])]


def converter_name(config, task: str) -> str:
  return config.tasks[task].get("converter", task)


def heads_of(config, task: str | None) -> tuple[str, ...] | None:
  """The heads a batch of `task` trains (None for mixed-task batches: every head)."""
  return None if task is None else tuple(P.TASK_HEADS.get(converter_name(config, task), ()))


# ----------------------------------------------------------------------------------------------------
# Train state
# ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Setup:
  """Everything the loop needs besides data: model structure, optimizer, shardings, compiled steps."""
  cfg: P.PixelLLMConfig
  graphdef: tp.Any
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  keep: tp.Callable
  mesh: Mesh
  rules: tp.Any
  state_shardings: tp.Any
  abstract_state: tp.Any
  init_fn: tp.Callable[[], tp.Any]


def _vit_depths(cfg: P.PixelLLMConfig) -> dict[str, int]:
  out = {}
  if cfg.eva is not None:
    out["eva"] = cfg.eva.depth
  if cfg.sam is not None:
    out["sam_encoder"] = cfg.sam.depth
  return out


def build_setup(config, mesh: Mesh) -> Setup:
  """Model config, optimizer and the train state's abstract shapes + shardings (nothing allocated)."""
  cfg = recipes.build_model_config(config.model)
  keep = P.trainable_filter(tuple(config.get("trainable", P.TRAINABLE)), lora=config.get("train_lora", True))
  rules = rules_from_config(config)
  from pixelground.models import layers
  batch_rule = dict(rules).get("batch")
  layers.BATCH_AXES[0] = (batch_rule,) if isinstance(batch_rule, str) else tuple(batch_rule or ())
  abstract = nnx.eval_shape(lambda: P.PixelLLM(cfg, rngs=nnx.Rngs(config.seed)))
  graphdef, abs_params, _ = nnx.split(abstract, keep, ...)
  tx, schedule = optim.build(config.optimizer, abs_params, depths=_vit_depths(cfg))

  def init():
    model = P.PixelLLM(cfg, rngs=nnx.Rngs(config.seed))
    _, params, frozen = nnx.split(model, keep, ...)
    return {"step": jnp.zeros((), jnp.int32), "params": params, "frozen": frozen, "opt": tx.init(params)}

  abstract_state = jax.eval_shape(init)
  shardings = sharding.state_shardings(abstract_state, mesh, rules)
  return Setup(cfg, graphdef, tx, schedule, keep, mesh, rules, shardings, abstract_state, init)


def init_state(setup: Setup):
  """The train state, every leaf born sharded (jit with out_shardings: no device holds a full copy).
  On CPU the one-shot init program compiles without LLVM optimisation: half the compile time (~20 s of
  the demo's startup), values equal to the optimised program's within float rounding."""
  with jax.set_mesh(setup.mesh):
    lowered = jax.jit(setup.init_fn, out_shardings=setup.state_shardings).lower()
    cpu = all(d.platform == "cpu" for d in setup.mesh.devices.flat)
    return lowered.compile(compiler_options={"xla_backend_optimization_level": 0} if cpu else None)()


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


def find_checkpoint(path: str) -> tuple[str, int]:
  """A training workdir, its checkpoints/ directory, or one step directory (checkpoints/1200) →
  (checkpoints directory, step) — the newest step unless a step directory was given."""
  path = os.path.abspath(path.rstrip("/"))
  if not os.path.exists(path):
    raise FileNotFoundError(f"--checkpoint: {path} does not exist.")
  if os.path.basename(path).isdigit() and os.path.isdir(os.path.join(path, "state")):
    return os.path.dirname(path), int(os.path.basename(path))
  root = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
  steps = [int(d) for d in os.listdir(root) if d.isdigit() and os.path.isdir(os.path.join(root, d, "state"))]
  if not steps:
    raise FileNotFoundError(f"--checkpoint: no finished checkpoint under {root} (expected step "
                            "directories such as checkpoints/1200/state).")
  return root, max(steps)


def load_state(setup: Setup, path: str):
  """(state, step) restored from `path` (see `find_checkpoint`) onto `setup`'s mesh."""
  root, step = find_checkpoint(path)
  ckpt = Checkpointer(root, keep=1 << 30, async_save=False)
  try:
    return ckpt.restore_state(step, setup), step
  finally:
    ckpt.close()


def make_model(setup: Setup, state) -> P.PixelLLM:
  return nnx.merge(setup.graphdef, state["params"], state["frozen"])


# ----------------------------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------------------------

def make_train_step(setup: Setup, loss_cfg: P.LossConfig, *, accum_steps: int = 1, seed: int = 0,
                    drop_path: bool = True):
  """train_step(state, batch, heads) → (state, metrics). `heads` (static: a tuple from
  `heads_of(config, task)`) picks the heads to run (None: all — mixed-task batches); tasks with the
  same heads and batch fields share one compiled program. Gradients are averaged over `accum_steps` micro-batches (a scan)."""
  cfg, graphdef, tx = setup.cfg, setup.graphdef, setup.tx
  batch_spec = lambda x: NamedSharding(setup.mesh, sharding.batch_spec(x.ndim, setup.rules, setup.mesh))

  def loss_fn(params, frozen, batch, rng, heads):
    model = nnx.merge(graphdef, params, frozen)
    out = model(batch, rng=rng if drop_path else None, heads=heads, train=True)
    return P.compute_losses(cfg, loss_cfg, out, batch)

  def step(state, batch, heads):
    rng = jax.random.fold_in(jax.random.key(seed), state["step"])
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if accum_steps == 1:
      (_, terms), grads = grad_fn(state["params"], state["frozen"], batch, rng, heads)
    else:
      micro = jax.tree.map(lambda x: x.reshape((accum_steps, x.shape[0] // accum_steps) + x.shape[1:]),
                           batch)

      def body(carry, xs):
        i, mb = xs
        mb = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, batch_spec(x)), mb)
        (_, t), g = grad_fn(state["params"], state["frozen"], mb, jax.random.fold_in(rng, i), heads)
        return jax.tree.map(jnp.add, carry, (g, t)), None

      zeros = jax.eval_shape(lambda: grad_fn(state["params"], state["frozen"],
                                             jax.tree.map(lambda x: x[0], micro), rng, heads))
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (zeros[1], zeros[0][1]))
      (grads, terms), _ = jax.lax.scan(body, zeros, (jnp.arange(accum_steps), micro))
      grads, terms = jax.tree.map(lambda x: x / accum_steps, (grads, terms))
    updates, opt = tx.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = dict(terms, grad_norm=optax.global_norm(grads), lr=setup.schedule(state["step"]))
    return {"step": state["step"] + 1, "params": params, "frozen": state["frozen"], "opt": opt}, metrics

  return jax.jit(step, static_argnums=2, donate_argnums=0,
                 out_shardings=(setup.state_shardings, None))


def make_eval_step(setup: Setup):
  """eval_step(state, batch, task) → {metric: (sum, count)} (teacher-forced, see train_metrics)."""
  cfg, graphdef = setup.cfg, setup.graphdef

  def step(state, batch, task):
    model = nnx.merge(graphdef, state["params"], state["frozen"])
    out = model(batch, heads=P.TASK_HEADS.get(task, ()))
    return train_metrics.batch_metrics(cfg, task, out, batch)

  return jax.jit(step, static_argnums=2)


# ----------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------

class ShardStateHandler:
  """Orbax handler for the input-pipeline state, stored per *input shard* (`pipeline.ShardGroup`), not
  per process: each process writes its own shards' files, and a restore on another process count reads
  the shards it now owns. (Grain's handler keys files by process.)"""

  def save(self, directory, item=None, args=None):
    item = item or args.item
    for s, st in item.shard_states().items():
      (directory / f"shard_{s}-of-{item.num_shards}.json").write_text(json.dumps(st))

  def restore(self, directory, item=None, args=None):
    item = item or args.item
    states = {}
    for s in item.shards:
      f = directory / f"shard_{s}-of-{item.num_shards}.json"
      if not f.exists():
        raise FileNotFoundError(f"{f}: no input-pipeline state for shard {s} of {item.num_shards} "
                                f"(was config.data.num_shards changed?)")
      states[s] = json.loads(f.read_text())
    item.load_shard_states(states)
    item.start_prefetch()
    return item

  def structure(self, directory):
    return None

  def metadata(self, directory):
    return None

  def finalize(self, directory):
    pass

  def close(self):
    pass

  @classmethod
  def typestr(cls):
    return f"{cls.__module__}.{cls.__qualname__}"


@functools.lru_cache(maxsize=None)
def _shard_state_args():
  """The save/restore args classes of ShardStateHandler, registered once per process: Orbax resolves a
  handler's args class from a global registry that keeps the FIRST registration, so classes made anew
  for every Checkpointer would not match in a process that opens a second one."""
  import orbax.checkpoint as ocp

  @ocp.args.register_with_handler(ShardStateHandler, for_save=True)
  @dataclasses.dataclass
  class ShardStateSave(ocp.args.CheckpointArgs):
    item: tp.Any

  @ocp.args.register_with_handler(ShardStateHandler, for_restore=True)
  @dataclasses.dataclass
  class ShardStateRestore(ocp.args.CheckpointArgs):
    item: tp.Any

  return ShardStateSave, ShardStateRestore


class Checkpointer:
  """Orbax CheckpointManager over {state (sharded arrays), data (each process's Grain iterator state)}.

  Async saves (the loop decides when), keeps the newest `keep`. Restoring
  places every array by the *current* setup's shardings, so a run may resume on another mesh shape."""

  def __init__(self, directory: str, *, keep: int, async_save: bool = True):
    import orbax.checkpoint as ocp

    self.ocp = ocp
    opts = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                        create=True)
    handlers = {"state": ocp.StandardCheckpointHandler(),
                "data": ShardStateHandler()}
    self.save_args, self.restore_args = _shard_state_args()
    self.manager = ocp.CheckpointManager(os.path.abspath(directory), options=opts,
                                         item_handlers=handlers)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iter, *, force: bool = False) -> bool:
    args = self.ocp.args.Composite(state=self.ocp.args.StandardSave(state), data=self.save_args(data_iter))
    return self.manager.save(step, args=args, force=force)

  def restore(self, step: int, setup: Setup, data_iter):
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          setup.abstract_state, setup.state_shardings)
    args = self.ocp.args.Composite(state=self.ocp.args.StandardRestore(target),
                                   data=self.restore_args(data_iter))
    out = self.manager.restore(step, args=args)
    return out["state"], out["data"]

  def restore_state(self, step: int, setup: Setup):
    """The train state alone (evaluation, export): no input-pipeline state needed."""
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          setup.abstract_state, setup.state_shardings)
    out = self.manager.restore(step, args=self.ocp.args.Composite(state=self.ocp.args.StandardRestore(target)))
    return out["state"]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


__all__ = ["DATASETS", "Setup", "build_setup", "init_state", "import_weights", "make_train_step",
           "make_eval_step", "Checkpointer", "data_tasks", "task_of_batch", "rules_from_config"]



# ----------------------------------------------------------------------------------------------------
# Data preparation, evaluation, FLOPs
# ----------------------------------------------------------------------------------------------------

def cache_dir() -> str:
  return os.path.expanduser(os.environ.get("PIXELGROUND_CACHE", "~/.cache/pixelground"))


def prepare_data(config, *, background: bool = False) -> tp.Callable[[], None]:
  """`config.data.grounded_shapes` (num_train, num_validation, seed, size[, max_shapes, scale,
  colours]) → generates and builds the synthetic datasets once into the cache (keyed by those numbers)
  and points `config.data.tfds_dir` there. Process 0 builds; the others wait for it.

  Returns `wait()`: blocks until the data is ready (raises if the build failed). With `background`, the
  build runs in a child process and `wait` must be called before reading the data — the trainer sets
  up and compiles the model meanwhile on the core the (single-threaded) build leaves idle."""
  gs = config.data.get("grounded_shapes", None)
  if not gs:
    return lambda: None
  max_shapes, scale = int(gs.get("max_shapes", 5)), float(gs.get("scale", 1.0))
  colours = int(gs.get("colours", 8))
  key = f"grounded_shapes-{gs.num_train}-{gs.num_validation}-{gs.seed}-{gs.size}"
  if (max_shapes, scale) != (5, 1.0):
    key += f"-n{max_shapes}-x{scale:g}"
  if colours != 8:
    key += f"-c{colours}"
  root = os.path.join(cache_dir(), key)
  marker = os.path.join(root, "READY")
  with config.unlocked():
    config.data.tfds_dir = os.path.join(root, "tfds")
  child = None
  if jax.process_index() == 0 and not os.path.exists(marker):
    import tfds_builders

    shutil.rmtree(root, ignore_errors=True)  # a half-built cache from an interrupted run
    os.makedirs(root)
    print(f"Building the grounded-shapes datasets into {root} (first use only)", flush=True)
    report = os.path.join(root, "report.json")
    cmd = [sys.executable, "-m", "tfds_builders.build_grounded_shapes", "--raw_dir",
           os.path.join(root, "raw"), "--data_dir", os.path.join(root, "tfds"), "--report", report,
           f"--num_train={gs.num_train}", f"--num_validation={gs.num_validation}", "--num_test=0",
           f"--seed={gs.seed}", f"--size={gs.size}", f"--max_shapes={max_shapes}", f"--scale={scale}",
           f"--colours={colours}"]
    env = dict(os.environ)
    # The child imports tfds_builders from wherever this process did (a checkout or site-packages).
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(tfds_builders.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([pkg_root] + [p for p in [env.get("PYTHONPATH")] if p])
    sys.stdout.flush()
    child = subprocess.Popen(cmd, env=env)  # its progress lines go to our stdout / stderr

  def wait() -> None:
    nonlocal child
    if child is not None:
      rc, child = child.wait(), None
      if rc != 0:
        raise RuntimeError(f"building the grounded-shapes datasets into {root} failed (exit code {rc}; "
                           f"its output is above). Command: {' '.join(cmd)}")
      shutil.rmtree(os.path.join(root, "raw"), ignore_errors=True)
      os.replace(report, marker)  # the build report; its presence marks the cache complete
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("grounded_shapes_ready")

  if not background:
    wait()
  return wait


class StepFlops:
  """Analytic model FLOPs of one train step of each task (`pixelground.flops`), cached per task."""

  def __init__(self, config, setup: Setup, batch_size: int):
    self.config, self.setup, self.batch_size = config, setup, batch_size
    self.cache: dict[tp.Any, float] = {}

  def __call__(self, task: str | None) -> float:
    if task not in self.cache:
      self.cache[task] = self._compute(task)
    return self.cache[task]

  def _compute(self, task: str | None) -> float:
    from pixelground import flops as flops_lib

    cfg, d = self.setup.cfg, self.config.data
    conv = converter_name(self.config, task) if task else None
    heads = set(P.TASK_HEADS.get(conv, ())) if conv else {"lisa", "refseg", "proposals", "refbox"}
    cfg = dataclasses.replace(cfg, lisa=cfg.lisa and "lisa" in heads,
                              refseg=cfg.refseg and "refseg" in heads,
                              proposals=cfg.proposals and "proposals" in heads,
                              box_refine=cfg.box_refine if "refbox" in heads else 0)
    dense = conv == "dense_caption"
    return float(flops_lib.step_flops(
        cfg, batch_size=self.batch_size, prompt_len=int(d.get("max_prompt_len", 32)),
        target_len=0 if dense else int(d.get("max_target_len", 128)),
        num_seg=int(d.get("max_seg", 4)) if cfg.lisa else 0,
        num_regions=int(d.get("max_regions", 16)) if cfg.proposals else 0,
        region_len=int(d.get("max_region_len", 16)) if cfg.proposals else 0,
        trainable=self.setup.keep)["total"])
