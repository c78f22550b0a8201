"""Process start-up shared by the command-line entry points (train, evaluate): the multi-host flags and
`jax.distributed` initialisation.

On TPU VMs `--multihost` lets `jax.distributed.initialize()` find everything itself; elsewhere pass
`--coordinator_address/--num_processes/--process_id` (or set PIXELGROUND_COORDINATOR /
PIXELGROUND_NUM_PROCESSES / PIXELGROUND_PROCESS_ID). CPU processes standing in for hosts talk over gloo.
"""

from __future__ import annotations

import os

from absl import flags

_COORD = flags.DEFINE_string("coordinator_address", os.environ.get("PIXELGROUND_COORDINATOR"),
                             "host:port of process 0 (multi-process runs off TPU VMs).")
_NPROC = flags.DEFINE_integer("num_processes", int(os.environ.get("PIXELGROUND_NUM_PROCESSES", "0") or 0),
                              "Number of processes (hosts).")
_PID = flags.DEFINE_integer("process_id", int(os.environ.get("PIXELGROUND_PROCESS_ID", "-1") or -1),
                            "This process's index.")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() with no arguments "
                               "(TPU VMs and clusters JAX detects).")


def init_distributed() -> None:
  import jax
  if _COORD.value and _NPROC.value > 1:
    # Only affects the CPU backend: CPU processes standing in for hosts talk over gloo.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(_COORD.value, num_processes=_NPROC.value, process_id=_PID.value)
  elif _MULTIHOST.value:
    jax.distributed.initialize()


def log_to_workdir(workdir: str, program: str) -> None:
  """Library log records (absl / Python logging: INFO and up) go to `workdir/<program>.INFO` (one file
  per process); the terminal keeps warnings and errors beside the CLI's own progress lines."""
  from absl import logging as absl_logging

  handler = absl_logging.get_absl_handler()
  handler.use_absl_log_file(program_name=program, log_dir=workdir)
  flags.FLAGS.stderrthreshold = "warning"
  absl_logging.set_verbosity(absl_logging.INFO)


def allgather(x):
  """`multihost_utils.process_allgather` of a host array → numpy (process, ...): an explicit
  collective, allowed under the loop's `jax.transfer_guard("disallow")`."""
  import jax
  import numpy as np
  from jax.experimental import multihost_utils
  with jax.transfer_guard("allow"):
    return np.asarray(multihost_utils.process_allgather(x))


def barrier(name: str) -> None:
  """Every process waits here (`multihost_utils.sync_global_devices`); a no-op with one process."""
  import jax
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils
  with jax.transfer_guard("allow"):
    multihost_utils.sync_global_devices(name)


class AheadOfTime:
  """A jitted function whose LAST positional argument is static, compiled ahead of its first call for
  each static value and input signature (shapes, dtypes, shardings of the other arguments — e.g. two
  tasks with the same heads but their own sequence lengths): `aot(*args, static)` lowers and
  compiles, then — with several processes — waits for every process before running. Gloo (the CPU
  stand-in for TPU hosts) gives up connecting after ~30 s, so a process that finished compiling a
  program long before another would otherwise time out inside the program's first collective.

  `precompile(pool, context, *args, static)` starts a compile on a thread pool from abstract
  arguments (`jax.ShapeDtypeStruct`s with shardings, or arrays), under `context()` (e.g. the mesh and
  rules the step is traced under): XLA releases the GIL while it compiles, so a multi-task run
  compiles its tasks' programs side by side, and beside the first steps, instead of one at a time at
  each task's first batch. The first call with a matching signature waits for that compile.
  `last_compile_seconds` is the compile time when the last call compiled or first used a precompiled
  program (else None); `last_precompiled` says which; `unused()` lists precompiled statics no call
  has used (a signature the real batches do not have: a schema bug)."""

  def __init__(self, jitted, name: str):
    self.jitted, self.name = jitted, name
    self.programs: dict = {}
    self.last_compile_seconds: float | None = None
    self.last_precompiled = False
    self._pending: dict = {}

  @staticmethod
  def _key(args) -> tuple:
    import jax
    *dynamic, static = args
    leaves, treedef = jax.tree.flatten(dynamic)
    return (static, treedef, tuple((tuple(x.shape), x.dtype, getattr(x, "sharding", None))
                                   for x in leaves))

  def _compile(self, args, context=None):
    import contextlib
    import time
    *dynamic, static = args
    t0 = time.perf_counter()
    with context() if context is not None else contextlib.nullcontext():
      program = self.jitted.lower(*dynamic, static).compile()
    return program, time.perf_counter() - t0

  def precompile(self, pool, context, *args) -> None:
    key = self._key(args)
    if key not in self.programs and key not in self._pending:
      self._pending[key] = pool.submit(self._compile, args, context)

  def unused(self) -> list:
    return [key[0] for key in self._pending]

  def __call__(self, *args):
    key = self._key(args)
    program = self.programs.get(key)
    self.last_compile_seconds, self.last_precompiled = None, False
    if program is None:
      future = self._pending.pop(key, None)
      self.last_precompiled = future is not None
      program, self.last_compile_seconds = (future.result() if future is not None
                                            else self._compile(args))
      self.programs[key] = program
      barrier(f"pixelground_{self.name}_{len(self.programs)}")
    return program(*args[:-1])
