r"""The main job: trains PixelLLM (+ LISA) from an ml_collections config, sharded, multi-host, resumable.

    python -m pixelground.train --config=configs/demo.py --workdir=workdir/demo
    python -m pixelground.train --config=configs/ln_t5xl.py:runlocal --workdir=/tmp/ln_t5xl
    python -m pixelground.train --config=configs/ln_t5xl.py --workdir=/ckpt/ln_t5xl \
        --config.weights.sam=/w/sam_vit_h.pth --config.optimizer.total_steps=20000

Any config key can be set with `--config.key=value` (`pixelground.config.schema` lists them; an unknown
one stops the run naming it). A fresh run initialises the state, imports `config.weights` and loads the
parameters shared with `config.init_from` (printing a table of each). Running the same command again
resumes from the newest checkpoint in `WORKDIR/checkpoints` (model, optimizer, step and input-pipeline
state), on any mesh shape. SIGTERM (TPU preemption) → every host saves at the next step boundary and exits 0.

Multi-host: on TPU VMs `jax.distributed.initialize()` finds everything itself (`--multihost`); elsewhere
pass `--coordinator_address=host:port --num_processes=N --process_id=i` (or the env variables
PIXELGROUND_COORDINATOR / _NUM_PROCESSES / _PROCESS_ID). Each process reads a disjoint shard of every
dataset and feeds its slice of the global batch.

Writes in WORKDIR: config.json (the full config), checkpoints/, tensorboard/ (event files, no
TensorFlow needed), metrics.jsonl (every logged step and every evaluation), train.INFO (library logs),
eval_<step>.json + predictions_<step>.jsonl (the final evaluation, `pixelground.inference.eval_lib`: the
files `pixelground.evaluate` writes for that checkpoint) and, for configs with `config.visualize`,
demo.png. The last printed line is the final evaluation as JSON.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

from pixelground.parallel import runtime

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "Training config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, logs and outputs go here.", required=True)
_BATCH_LOG = flags.DEFINE_bool("batch_log", False, "Write a digest of every step's input batch to "
                                "WORKDIR/batches.p<process>.jsonl (each process its own slice) — to "
                                "check that a resumed or re-sharded run reads the same data.")
_MAX_STEPS = flags.DEFINE_integer("stop_after", 0, "Stop (with a checkpoint) after this many steps of "
                                  "this run — for tests and debugging; 0 = run to the end.")


class _Preemption:
  """SIGTERM → a flag; `requested()` agrees across hosts (any host's flag stops every host)."""

  def __init__(self):
    self.flag = False
    signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM: saving at the next step boundary")
    self.flag = True

  def requested(self) -> bool:
    import jax
    if jax.process_count() == 1:
      return self.flag
    import numpy as np
    return bool(np.any(runtime.allgather(np.int32(self.flag))))


def _digest(batch, row: int | None = None) -> str:
  """SHA-1 of a host batch's arrays (field names, shapes, dtypes and bytes, in name order), or of one
  row of it."""
  import hashlib
  import numpy as np
  h = hashlib.sha1()
  for k in sorted(batch):
    x = np.ascontiguousarray(batch[k] if row is None else batch[k][row])
    h.update(f"{k}{x.shape}{x.dtype}".encode())
    h.update(x.tobytes())
  return h.hexdigest()


def _newest(ckpt) -> str:
  good = ckpt.good_step()
  return f"step {good} ({ckpt.step_dir(good)})" if good is not None else "none"


def _precompile(config, setup, train_step, evaluator, state, guard, names, batch_size):
  """Starts compiling every task's train step (single-task batches; the most weighted tasks first),
  then the evaluation programs, on `config.compile_workers` threads → the thread pool, or None."""
  import concurrent.futures
  if config.compile_workers == 0:
    return None
  from pixelground.parallel import sharding
  from pixelground.training import datasets
  workers = config.compile_workers
  if workers < 0:
    workers = min(len(names), os.cpu_count() or 1, 8)
  pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="compile")
  context = lambda: sharding.use(setup.mesh, setup.rules)
  abstract_state, abstract_guard = datasets.abstract(state), datasets.abstract(guard)
  for task in (sorted(names, key=lambda n: -config.tasks[n].weight) if config.data.mixing == "batch"
               else [None]):
    train_step.precompile(pool, context, abstract_state, abstract_guard,
                          datasets.abstract_batch(config, setup, batch_size, task),
                          datasets.heads_of(config, task))
  evaluator.precompile(pool, state)
  return pool


def _stop(message: str, ckpt, data_iter, writers, code: int = 0, pool=None) -> None:
  """Ends the run early: finishes the checkpoint in flight, closes the input workers and writers,
  drops the compiles not started yet."""
  from pixelground.training import checkpointing
  if pool is not None:
    pool.shutdown(wait=False, cancel_futures=True)
  try:
    ckpt.close()
  except checkpointing.CheckpointSaveError as e:
    message = f"{message}\nError: {e}"
    code = 1
  data_iter.close()
  writers.close()
  if code:
    logging.info(message)
    raise SystemExit(message)
  print(message, flush=True)


def main(argv):
  del argv
  workdir = _WORKDIR.value
  os.makedirs(workdir, exist_ok=True)
  runtime.log_to_workdir(workdir, "train")
  runtime.init_distributed()
  import jax

  from pixelground.config import schema
  from pixelground.data import drops as data_filter, pipeline, tasks as task_lib, tokenizer as tok_lib
  from pixelground.inference import eval_lib
  from pixelground.parallel import sharding
  from pixelground.perf.chips import chip_peak
  from pixelground.training import checkpointing, datasets, guard as guard_lib, steps, train_state, weights
  from pixelground.training import writers as metric_writers

  config = schema.parse(_CONFIG.value)  # unknown / missing keys fail here, named
  pid, nproc = jax.process_index(), jax.process_count()
  # Compiled steps are cached across runs (a restart or a second demo run skips XLA compilation).
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", os.path.join(datasets.cache_dir(), "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  if pid == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json())

  # The grounded-shapes datasets build (first use only) in a child process while the model is set up
  # and its initialisation compiles here.
  data_ready = datasets.prepare_data(config, background=True)
  tokenizer = tok_lib.load_tokenizer(config.tokenizer)
  mesh = sharding.make_mesh(config.mesh.axes())
  setup = train_state.build_setup(config, mesh)
  batch_size = config.optimizer.batch_size
  if batch_size % nproc:
    raise ValueError(f"config.optimizer.batch_size={batch_size} must divide by the {nproc} processes.")
  num_shards = config.data.num_shards or nproc
  if batch_size % num_shards:
    raise ValueError(f"config.optimizer.batch_size={batch_size} must divide by config.data.num_shards="
                     f"{num_shards}.")
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.checkpoint_keep,
                                    async_save=config.async_checkpoint)
  latest = ckpt.latest_step()
  if latest is None:  # initialise, import pretrained files, then the earlier stage's shared parameters
    state = train_state.init_state(setup)
    state, reports = weights.import_weights(setup, state, config.weights)
    if config.init_from.path:
      state, rep = weights.init_from(setup, state, config.init_from)
      reports.append(rep)
    for rep in reports if pid == 0 else ():
      print(weights.format_report(rep), flush=True)
  elif config.init_from.path and pid == 0:
    print(f"Resuming: config.init_from ({config.init_from.path}) is not used.", flush=True)

  # Data: per-process shards of every task.
  data_ready()
  mixing = config.data.mixing
  tasks = datasets.data_tasks(config, tokenizer)
  names = [t.name for t in tasks]
  # Records dropped by a task's filters or skipped unreadable (data.bad_records="skip") are counted.
  filtered = (any(config.converter(n) in schema.FILTER_CONVERTERS for n in names)
              or config.data.bad_records == "skip")
  drops = data_filter.DropCounter(names, task_lib.DROP_REASONS) if filtered else None
  batch_schema = task_lib.schema(config.task_config(train=True))
  data_iter = pipeline.ShardGroup(
      lambda shard, count: pipeline.Loader(tasks, batch_schema, batch_size=batch_size // count,
                                           seed=config.seed, mixing=mixing, shard_index=shard,
                                           shard_count=count, num_workers=config.data.num_workers,
                                           drop_reasons=task_lib.DROP_REASONS if filtered else (),
                                           shard_by=config.data.shard_by),
      num_shards=num_shards, process_index=pid, process_count=nproc)
  if latest is not None:  # resume: model, optimizer, step and input-pipeline state
    (state, data_iter), latest = ckpt.restore_latest(lambda s: ckpt.restore(s, setup, data_iter))
    logging.info("resumed from step %d (%s)", latest, ckpt.directory)
    print(f"Resumed from the checkpoint at step {latest}", flush=True)
  n_train = sum(x.size for x in jax.tree.leaves(state["params"]))
  n_all = n_train + sum(x.size for x in jax.tree.leaves(state["frozen"]))

  train_step = runtime.AheadOfTime(steps.make_train_step(setup, config.loss, seed=config.seed,
                                                         accum_steps=config.optimizer.grad_accum_steps),
                                  "train_step")
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  guard = jax.device_put(steps.init_guard(), replicated)
  watch = guard_lib.NonFiniteWatch(config.max_nonfinite_steps, echo=pid == 0)
  figure = config.visualize.enabled
  evaluator = eval_lib.Evaluator(config, setup, tokenizer,
                                 keep_examples=config.visualize.num_images if figure else 0)
  compiler = _precompile(config, setup, train_step, evaluator, state, guard, names, batch_size)
  writers = metric_writers.create_writers(workdir, enabled=True)
  preempt = _Preemption()
  total = config.optimizer.total_steps
  step = int(jax.device_get(state["step"]))
  peak = chip_peak(jax.devices()[0])  # FLOP/s of one chip; None on CPU (no MFU then)
  step_flops = steps.StepFlops(config, setup, batch_size)
  log_every = config.log_every
  print(f"Training {n_train / 1e6:.2f}M of {n_all / 1e6:.2f}M parameters for {total} steps "
        f"(from step {step}) on mesh {dict(mesh.shape)}, {nproc} process(es); tasks {names}", flush=True)

  batch_log = open(os.path.join(workdir, f"batches.p{pid}.jsonl"), "a") if _BATCH_LOG.value else None
  t_start = time.perf_counter()
  window = {"t": time.perf_counter(), "data": 0.0, "steps": 0, "flops": 0.0}
  run_steps = 0
  # Every host↔device copy in the loop is explicit (device_put / device_get); an implicit one is a bug.
  with sharding.use(mesh, setup.rules), jax.transfer_guard("disallow"):
    while step < total:
      t0 = time.perf_counter()
      local = next(data_iter)
      if drops is not None:
        drops.add(local.pop(pipeline.DROPPED), len(local["task_id"]))
      task = datasets.task_of_batch(local, names) if mixing == "batch" else None
      if batch_log is not None:
        batch_log.write(json.dumps({"step": step + 1, "task": task, "digest": _digest(local),
                                    "rows": [_digest(local, row=i)[:12]
                                             for i in range(len(local["task_id"]))]}) + "\n")
        batch_log.flush()
      batch = sharding.global_batch(local, mesh, setup.rules)
      window["data"] += time.perf_counter() - t0
      state, guard, metrics = train_step(state, guard, batch, datasets.heads_of(config, task))
      if train_step.last_compile_seconds is not None:
        where = "in the background" if train_step.last_precompiled else "at its first batch"
        print(f"compiled the train step of [{task or 'mixed'}] in "
              f"{train_step.last_compile_seconds:.1f} s ({where})", flush=True)
      step += 1
      run_steps += 1
      window["steps"] += 1
      window["flops"] += step_flops(task)
      stop = preempt.requested() or (_MAX_STEPS.value and run_steps >= _MAX_STEPS.value)
      saving = step % config.checkpoint_every == 0 or step == total or stop
      try:
        watch.push(step, task, guard, metrics)
        if step % log_every == 0 or saving:
          watch.flush()
      except guard_lib.NonFiniteStop as e:
        return _stop(f"Stopped at step {step}: {e} Newest checkpoint: {_newest(ckpt)}.", ckpt, data_iter,
                     writers, code=1, pool=compiler)
      if step % log_every == 0 or step == total:
        m = {k: float(v) for k, v in jax.device_get(metrics).items() if k != "nonfinite"}
        dt = time.perf_counter() - window["t"]
        per_dev = window["flops"] / dt / jax.device_count()
        m.update({"steps_per_s": window["steps"] / dt, "examples_per_s": window["steps"] * batch_size / dt,
                  "data_wait": window["data"] / dt, "tflops_per_device": per_dev / 1e12,
                  "skipped_nonfinite": watch.skipped})
        if peak:
          m["mfu"] = per_dev / peak
        writers.write_scalars(step, {f"train/{k}": v for k, v in m.items()} | ({"train/task": names.index(task)}
                                                                                  if task else {}))
        terms = "  ".join(f"{k} {m[k]:.4f}" for k in sorted(metrics) if k not in ("lr", "nonfinite"))
        mfu = f"  MFU {m['mfu'] * 100:.1f}%" if "mfu" in m else ""
        print(f"step {step:6d}/{total} [{task or 'mixed'}] {terms}  lr {m['lr']:.2e}  "
              f"{m['steps_per_s']:.2f} steps/s  {m['examples_per_s']:.1f} ex/s  "
              f"{m['tflops_per_device']:.3f} TFLOP/s/dev{mfu}  data {m['data_wait'] * 100:.0f}%"
              f"{watch.line()}", flush=True)
        if drops is not None:
          counts, kept = drops.totals()
          writers.write_scalars(step, drops.scalars(counts, kept))
          print(drops.line(counts, kept), flush=True)
        window = {"t": time.perf_counter(), "data": 0.0, "steps": 0, "flops": 0.0}
      if saving and watch.streak:  # the state is the last good one, but a streak is not saved
        print(f"Not saving step {step}: {watch.streak} non-finite step(s) in a row.", flush=True)
      elif saving:
        try:
          ckpt.save(step, state, data_iter, force=True)
        except checkpointing.CheckpointSaveError as e:
          return _stop(f"Error: {e}", ckpt, data_iter, writers, code=1, pool=compiler)
      if config.eval_every and step % config.eval_every == 0 and step < total and not stop:
        result = evaluator.run(state)
        writers.write_scalars(step, {f"eval/{k}": v for k, v in result.items()})
        print(f"eval @ {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in result.items()
                                              if not k.endswith("/count")), flush=True)
      if stop:
        return _stop(f"Stopped at step {step} ({'SIGTERM' if preempt.flag else '--stop_after'}); "
                     f"checkpoint saved.", ckpt, data_iter, writers, pool=compiler)
    # The final checkpoint finishes writing in the background during the evaluation.
    result = evaluator.run(state)
    if evaluator.unused_programs():
      logging.warning("precompiled evaluation programs never used (their abstract batches differ "
                      "from the real ones): %s", evaluator.unused_programs())
    result.update(step=step, train_seconds=round(time.perf_counter() - t_start, 1),
                  trainable_params=int(n_train), params=int(n_all))
    writers.write_scalars(step, {f"eval/{k}": v for k, v in result.items() if isinstance(v, float)})
    if pid == 0:  # the same files `pixelground.evaluate` writes for this checkpoint
      evaluator.write(workdir, str(step), result)
    if figure:
      path = os.path.join(workdir, "demo.png")
      if nproc == 1:
        from pixelground.inference import visualize
        with jax.transfer_guard("allow"):  # the figure's Predictor puts its own inputs on device
          visualize.demo_figure(config, train_state.make_model(setup, state), tokenizer, path,
                                kept=evaluator.kept)
        print(f"Wrote {path}", flush=True)
        result["figure"] = path
      else:
        logging.info("demo figure skipped: multi-process run")
  _stop(json.dumps(result), ckpt, data_iter, writers, pool=compiler)
  sys.stdout.flush()


if __name__ == "__main__":
  app.run(main)
