"""Training data from `config.tasks`: the TFDS builder of each dataset name, the task converters, the
per-task heads, and the grounded-shapes cache the runlocal configs build on first use."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import typing as tp

import jax
import numpy as np

from pixelground.config import schema
from pixelground.data import pipeline, tasks as task_lib
from pixelground.models import pixelllm as P
from tfds_builders import prepare

# TFDS builder of each dataset name used in `config.tasks[*].dataset` ("name/config"): the builders
# `python -m tfds_builders.prepare --builder=NAME` prepares.
DATASETS = prepare.BUILDERS


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


def data_tasks(config, tokenizer, *, train: bool = True, names: tp.Sequence[str] | None = None,
               split: str | None = None) -> list[pipeline.Task]:
  """One `pipeline.Task` per `config.tasks` entry (or the `names` subset): its builder's split (the
  task's `split` in training, `eval_split` otherwise, or `split` for all) and converter."""
  config = schema.parse(config)
  out = []
  root = data_dir(config)
  for name, t in config.tasks.items():
    if names is not None and name not in names:
      continue
    where = f"config.tasks.{name}"
    builder = open_builder(t.dataset, root, where)
    key = "split" if train else "eval_split"
    use = split or getattr(t, key)
    if use not in builder.info.splits:
      raise ValueError(f"{where}.{key}: split '{use}' not in {t.dataset} "
                       f"(has {sorted(builder.info.splits)}).")
    conv_name = config.converter(name)
    categories = builder.info.metadata.get("categories") if builder.info.metadata else None
    conv = task_lib.Converters(config.task_config(train=train, task=name), tokenizer,
                               categories=categories)
    if not hasattr(conv, conv_name):
      raise ValueError(f"{where}.converter: no converter '{conv_name}'.")
    info = builder.info.splits[use]
    lengths = tuple(int(n) for n in info.shard_lengths)
    source = pipeline.CheckedSource(builder.as_data_source(use), name, [str(f) for f in info.filepaths],
                                    lengths, skip=train and config.data.bad_records == "skip")
    out.append(pipeline.Task(name, source, getattr(conv, conv_name), t.weight,
                             schema=task_lib.task_schema(conv.cfg, conv_name)
                             if config.data.mixing == "batch" else None,
                             file_lengths=lengths))
  return out


def task_of_batch(batch: dict[str, np.ndarray], names: tp.Sequence[str]) -> str:
  ids = np.unique(batch["task_id"])
  if len(ids) != 1:
    raise ValueError("per-task steps need single-task batches (config.data.mixing='batch')")
  return names[int(ids[0])]


def heads_of(config, task: str | None) -> tuple[str, ...] | None:
  """The heads a batch of `task` trains (None for mixed-task batches: every head)."""
  return None if task is None else tuple(P.TASK_HEADS.get(schema.parse(config).converter(task), ()))


# Bumped whenever the set of datasets the grounded-shapes build writes changes (2: + image_text); a
# builder's own VERSION bump changes the cache key by itself (`_builder_versions`).
CACHE_VERSION = 2


def _builder_versions() -> str:
  """8 hex digits of the grounded-shapes builders' VERSIONs: a builder whose output changed (its
  VERSION bumped) gets a fresh cache instead of a stale one without its new version."""
  import hashlib
  from tfds_builders import build_grounded_shapes
  modules = build_grounded_shapes.BUILDERS + (("image_text", "ImageText"),)
  text = ";".join(f"{m}={getattr(importlib.import_module(f'tfds_builders.{m}'), c).VERSION}"
                  for m, c in modules)
  return hashlib.sha1(text.encode()).hexdigest()[:8]


def abstract_batch(config, setup, batch_size: int, task: str | None) -> dict:
  """ShapeDtypeStructs of one global training batch of `task` (None: the full mixed-task schema),
  batch-sharded over `setup.mesh` as `sharding.global_batch` places the real one."""
  from jax.sharding import NamedSharding

  from pixelground.parallel import sharding

  config = schema.parse(config)
  tcfg = config.task_config(train=True, task=task)
  spec = task_lib.schema(tcfg) if task is None else task_lib.task_schema(tcfg, config.converter(task))
  spec = dict(spec, task_id=((), "int32"))

  def one(shape, dtype):
    full = (batch_size,) + tuple(shape)
    place = sharding.batch_spec(len(full), setup.rules, setup.mesh)
    return jax.ShapeDtypeStruct(full, dtype, sharding=NamedSharding(setup.mesh, place))

  return {k: one(shape, dtype) for k, (shape, dtype) in spec.items()}


def abstract(tree) -> tp.Any:
  """Arrays → `jax.ShapeDtypeStruct`s with their shapes, dtypes, weak types and shardings."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding,
                                                     weak_type=getattr(x, "weak_type", False)), tree)


def cache_dir() -> str:
  return os.path.expanduser(os.environ.get("PIXELGROUND_CACHE", "~/.cache/pixelground"))


def _grounded_shapes_root(gs) -> str:
  """The cache directory of one `config.data.grounded_shapes` setting (keyed by its numbers)."""
  key = (f"grounded_shapes-v{CACHE_VERSION}-{_builder_versions()}-{gs.num_train}-{gs.num_validation}-"
         f"{gs.seed}-{gs.size}")
  if (gs.max_shapes, gs.scale) != (5, 1.0):
    key += f"-n{gs.max_shapes}-x{gs.scale:g}"
  if gs.colours != 8:
    key += f"-c{gs.colours}"
  return os.path.join(cache_dir(), key)


def data_dir(config) -> str:
  """Where the config's prepared TFDS datasets live: the grounded-shapes cache when
  `config.data.grounded_shapes` is set, else `config.data.tfds_dir` (~ expanded)."""
  config = schema.parse(config)
  gs = config.data.grounded_shapes
  if gs is not None:
    return os.path.join(_grounded_shapes_root(gs), "tfds")
  return os.path.expanduser(config.data.tfds_dir)


def prepare_data(config, *, background: bool = False) -> tp.Callable[[], None]:
  """With `config.data.grounded_shapes` set: generates and builds the synthetic datasets once into the
  cache (`data_dir(config)`). Process 0 builds; the others wait for it. Without it: nothing to do.

  Returns `wait()`: blocks until the data is ready (raises if the build failed). With `background`, the
  build runs in a child process and `wait` must be called before reading the data — the trainer sets
  up and compiles the model meanwhile on the core the (single-threaded) build leaves idle."""
  gs = schema.parse(config).data.grounded_shapes
  if gs is None:
    return lambda: None
  max_shapes, scale, colours = gs.max_shapes, gs.scale, gs.colours
  root = _grounded_shapes_root(gs)
  marker = os.path.join(root, "READY")
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
    env["TQDM_DISABLE"] = "1"  # TFDS's per-split bars; the build prints a line per dataset
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
    from pixelground.parallel import runtime
    runtime.barrier("grounded_shapes_ready")

  if not background:
    wait()
  return wait
