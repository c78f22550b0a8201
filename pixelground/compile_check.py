r"""Deviceless TPU compile of the full train step: does a config fit, and how many FLOPs does it run?

    python -m pixelground.compile_check --config=configs/ln_t5xl.py --topology=v5e:4x4
    python -m pixelground.compile_check --config=configs/ln_t5xl.py --topology=v5p:2x2x2 \
        [--batch=256] [--mesh=data:1,fsdp:8,tensor:1] [--task=ln|mixed] [--top=8] [--hlo_out=FILE]
        [--config.key=value ...]

Needs libtpu (`pip install -e .[tpu]`, i.e. `jax[tpu]`), not a TPU: the topology's devices come from
`jax.experimental.topologies.get_topology_desc`, the mesh is built from `config.mesh` (or `--mesh`;
-1 = the rest of the chips) over them, and the *same* jitted step the trainer runs
(`steps.make_train_step`, with the config's optimizer, remat, dtypes and `grad_accum_steps`) is
lowered on `jax.ShapeDtypeStruct`s — the train state with `setup.state_shardings`, the batch with the
task's schema, batch-sharded — and compiled by the TPU compiler on this machine's CPU (SPEC §8).

The report (stdout; the last line is one JSON object with every number):
  * per-chip memory from `compiled.memory_analysis()`: arguments (the train state + the batch),
    outputs, of which aliased to the (donated) arguments, temporaries (activations, gradients, ...),
    generated code; "total" = arguments + outputs − aliased + temporaries + code is what must fit in
    the chip's HBM (`HBM_GIB`) → FITS / DOES NOT FIT. A program over the compiler's HBM limit fails
    to compile (RESOURCE_EXHAUSTED, e.g. "the total memory required for HLO temporaries (387.63G)
    exceeds available HBM (15.75G)"): that is reported as DOES NOT FIT with the compiler's numbers.
  * compiled FLOPs per chip: the matmul / convolution FLOPs of the optimized per-chip HLO, every
    `while` body (scanned layers, gradient-accumulation micro-batches) counted × its trip count —
    XLA's `cost_analysis()` counts a loop body once, so its "flops" (also printed) is far too low for
    scanned models;
  * analytic model FLOPs per chip (`pixelground.perf.flops.step_flops`, the trainer's MFU numerator) / chips,
    the ratio compiled / analytic, and the analytic count plus the forward recompute of the parts
    under `remat="full"` (which model FLOPs leave out by definition) — the ratio expected from remat;
  * the most expensive contractions (`--top`), where to look when the ratio is off;
  * the chip's peak bf16 FLOP/s (`PEAK_TFLOPS`) and the step time that 100% / 50% MFU would mean.

`chip_peak(device_kind)` (FLOP/s) is what the trainer divides by for MFU.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
import typing as tp

from pixelground.perf.chips import GIB, chip_family, chip_hbm_bytes, chip_peak
from pixelground.perf.hlo import hlo_collectives, hlo_flops


# ----------------------------------------------------------------------------------------------------
# The check
# ----------------------------------------------------------------------------------------------------

class TopologyUnavailable(RuntimeError):
  """libtpu is missing or cannot describe the topology."""


def parse_mesh(text: str) -> dict[str, int]:
  """'data:2,fsdp:8,tensor:1' → {'data': 2, 'fsdp': 8, 'tensor': 1} (order kept)."""
  out = {}
  for part in filter(None, (p.strip() for p in text.split(","))):
    name, sep, size = part.partition(":")
    if not sep:
      raise ValueError(f"--mesh: '{part}' is not name:size")
    out[name.strip()] = int(size)
  return out


def topology_devices(topology: str) -> list:
  """The compile-only devices of a TPU topology ("v5e:4x4", "v5p:2x2x2", "v4:2x2x1", "v6e:2x2")."""
  # Several processes may load libtpu on a machine without TPUs (a trainer on CPU holds its lock).
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies
  try:
    return list(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)
  except Exception as e:  # noqa: BLE001 — RuntimeError (no libtpu) or JaxRuntimeError (bad name)
    raise TopologyUnavailable(f"cannot describe TPU topology '{topology}': {e}") from e


def _default_task(config) -> str | None:
  """The most weighted task (ties: the first) for single-task batches, None for mixed batches."""
  if config.data.mixing != "batch":
    return None
  names = list(config.tasks)
  return max(names, key=lambda n: (config.tasks[n].weight, -names.index(n)))


def analytic_flops(config, setup, batch_size: int, task: str | None) -> dict[str, tp.Any]:
  """Model FLOPs of one step (global batch), as the trainer counts them for MFU
  (`steps.StepFlops`), with the per-part split and the forward-only split (train=False), and
  `with_remat` = total + the forward of every part that `remat="full"` recomputes."""
  from pixelground.perf import flops as flops_lib
  from pixelground.training import steps

  cfg, kw = steps.flops_inputs(config, setup, batch_size, task)
  train = flops_lib.step_flops(cfg, **kw)
  fwd = flops_lib.step_flops(cfg, train=False, **kw)
  remat_parts = {"eva": cfg.eva.remat if cfg.eva is not None else "none",
                 "sam_encoder": cfg.sam.remat if cfg.sam is not None else "none",
                 "t5_encoder": cfg.t5.remat, "t5_decoder": cfg.t5.remat}
  recompute = {p: fwd["parts"].get(p, 0.0) for p, policy in remat_parts.items()
               if policy == "full" and train["parts"].get(p, 0.0) > fwd["parts"].get(p, 0.0)}
  return {"total": train["total"], "parts": train["parts"], "forward_parts": fwd["parts"],
          "remat_recompute": recompute, "with_remat": train["total"] + sum(recompute.values())}


def _memory(compiled) -> dict[str, int]:
  m = compiled.memory_analysis()
  if isinstance(m, (list, tuple)):
    m = m[0]
  get = lambda k: int(getattr(m, k, 0) or 0)
  out = {"argument_bytes": get("argument_size_in_bytes"), "output_bytes": get("output_size_in_bytes"),
         "alias_bytes": get("alias_size_in_bytes"), "temp_bytes": get("temp_size_in_bytes"),
         "generated_code_bytes": get("generated_code_size_in_bytes")}
  out["total_bytes"] = (out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
                        + out["temp_bytes"] + out["generated_code_bytes"])
  return out


def _xla_cost_flops(compiled) -> float | None:
  try:
    ca = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 — not every backend implements it
    return None
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else None
  return None if not ca or "flops" not in ca else float(ca["flops"])


# The TPU compiler's out-of-memory messages: "... Used 20.25G of 15.75G hbm ..." (everything) or
# "... the total memory required for HLO temporaries (387.63G) exceeds available HBM (15.75G)".
_OOM = (("total_bytes", re.compile(r"Used\s+([\d.]+)([KMGT]?)\s+of\s+([\d.]+)([KMGT]?)\s+hbm", re.I)),
        ("temp_bytes", re.compile(r"temporaries\s*\(([\d.]+)([KMGT]?)\)\s*exceeds available HBM\s*"
                                  r"\(([\d.]+)([KMGT]?)\)", re.I)))


def _oom_bytes(message: str) -> dict[str, int]:
  """→ {"total_bytes" or "temp_bytes": what the compiler needed, "compiler_hbm_limit_bytes"}, or {}."""
  unit = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}
  for key, pattern in _OOM:
    m = pattern.search(message)
    if m:
      return {key: int(float(m.group(1)) * unit[m.group(2).upper()]),
              "compiler_hbm_limit_bytes": int(float(m.group(3)) * unit[m.group(4).upper()])}
  return {}


def compile_check(config, *, topology: str, batch_size: int | None = None,
                  mesh_axes: tp.Mapping[str, int] | None = None, task: str | None = "",
                  hlo_out: str | None = None, top: int = 8) -> dict[str, tp.Any]:
  """Compiles the config's train step for `topology` (no TPU needed) → the report dict (see module
  docstring). `task`: "" = the config's most weighted task when batches are single-task
  (config.data.mixing="batch"), else the mixed-task batch; "mixed" forces the latter. `top`: list
  that many of the most expensive contractions of the compiled program."""
  import jax

  from pixelground.config import schema
  from pixelground.parallel import sharding
  from pixelground.training import datasets, steps, train_state

  config = schema.parse(config)
  if task == "":
    task = _default_task(config)
  elif task == "mixed":
    task = None
  if task is not None and task not in config.tasks:
    raise ValueError(f"--task: '{task}' is not in config.tasks ({sorted(config.tasks)})")
  batch_size = int(batch_size or config.optimizer.batch_size)
  accum = config.optimizer.grad_accum_steps
  axes = dict(mesh_axes) if mesh_axes else config.mesh.axes()

  devices = topology_devices(topology)
  kind = devices[0].device_kind
  mesh = sharding.make_mesh(axes, devices=devices)
  setup = train_state.build_setup(config, mesh)
  batch_axes = sharding.batch_spec(1, setup.rules, mesh)[0]
  batch_axes = () if batch_axes is None else (batch_axes,) if isinstance(batch_axes, str) else batch_axes
  shards = math.prod(mesh.shape[a] for a in batch_axes)
  if batch_size % (accum * shards):
    raise ValueError(f"batch {batch_size} must divide by grad_accum_steps ({accum}) × the batch "
                     f"shards ({shards}: mesh axes {batch_axes}).")

  state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                       setup.abstract_state, setup.state_shardings)
  batch = datasets.abstract_batch(config, setup, batch_size, task)
  heads = datasets.heads_of(config, task)
  step = steps.make_train_step(setup, config.loss, accum_steps=accum, seed=config.seed)
  n = len(devices)
  report: dict[str, tp.Any] = {
      "topology": topology, "chip": chip_family(kind), "device_kind": kind, "chips": n,
      "mesh": {k: int(v) for k, v in mesh.shape.items()}, "batch": batch_size,
      "per_chip_batch": batch_size / shards, "grad_accum_steps": accum, "task": task or "mixed",
      "heads": list(heads) if heads is not None else None,
      "state_params": int(sum(math.prod(x.shape) for x in jax.tree.leaves(setup.abstract_state))),
  }

  t0 = time.perf_counter()
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  guard = jax.tree.map(lambda g: jax.ShapeDtypeStruct(g.shape, g.dtype, sharding=replicated),
                       steps.init_guard())
  with sharding.use(mesh, setup.rules):
    lowered = step.lower(state, guard, batch, heads)
  report["lower_seconds"] = round(time.perf_counter() - t0, 1)
  t0 = time.perf_counter()
  hbm = chip_hbm_bytes(kind)
  report["hbm_bytes"] = hbm
  try:
    compiled = lowered.compile()
  except Exception as e:  # noqa: BLE001 — the TPU compiler reports HBM overflow as an error
    msg = str(e)
    report["compile_seconds"] = round(time.perf_counter() - t0, 1)
    needed = _oom_bytes(msg)
    if not needed and "RESOURCE_EXHAUSTED" not in msg:
      raise
    report.update(fits=False, compile_error=msg.strip().splitlines()[0][:500], memory=needed,
                  _error_detail=msg.strip().splitlines()[1:25])
    _add_flops(report, analytic_flops(config, setup, batch_size, task), None, n, kind)
    return report
  report["compile_seconds"] = round(time.perf_counter() - t0, 1)

  mem = _memory(compiled)
  report["memory"] = mem
  report["fits"] = None if hbm is None else mem["total_bytes"] <= hbm
  text = compiled.as_text()
  if hlo_out:
    with open(hlo_out, "w") as f:
      f.write(text)
  counted = hlo_flops(text, top=top)
  report["xla_cost_analysis_flops"] = _xla_cost_flops(compiled)
  report["hlo_loops"] = {str(t): counted["loops"].count(t) for t in sorted(set(counted["loops"]))}
  report["hlo_unknown_loops"] = counted["unknown_loops"]
  report["top_contractions"] = counted["top"]
  report["collectives"] = hlo_collectives(text)
  _add_flops(report, analytic_flops(config, setup, batch_size, task), counted["flops"], n, kind)
  return report


def _add_flops(report: dict, analytic: dict, compiled_flops: float | None, n: int, kind) -> None:
  per_chip = analytic["total"] / n
  report["analytic_flops"] = per_chip
  report["analytic_parts"] = {k: v / n for k, v in analytic["parts"].items()}
  report["analytic_with_remat_flops"] = analytic["with_remat"] / n
  report["remat_recompute_parts"] = {k: v / n for k, v in analytic["remat_recompute"].items()}
  report["compiled_flops"] = compiled_flops
  report["flops_ratio"] = None if compiled_flops is None else compiled_flops / per_chip
  report["expected_ratio_with_remat"] = analytic["with_remat"] / analytic["total"]
  peak = chip_peak(kind)
  report["peak_tflops"] = None if peak is None else peak / 1e12
  report["step_seconds_at_100_mfu"] = None if peak is None else per_chip / peak
  report["step_seconds_at_50_mfu"] = None if peak is None else 2 * per_chip / peak


def _gib(x: float | None) -> str:
  return "?" if x is None else f"{x / GIB:.2f} GiB"


def _tf(x: float | None) -> str:
  if x is None:
    return "?"
  return f"{x / 1e12:.2f} TFLOP" if x >= 1e11 else f"{x / 1e9:.3f} GFLOP"


def format_report(r: dict[str, tp.Any]) -> str:
  """The human-readable part of the report (without the JSON line)."""
  m = r.get("memory", {})
  lines = [
      f"Topology      {r['topology']}: {r['chips']} × {r['device_kind']} ({r['chip']}), "
      f"HBM {_gib(r['hbm_bytes'])} per chip, peak {r['peak_tflops']} TFLOP/s per chip",
      f"Mesh          {r['mesh']}   batch {r['batch']} ({r['per_chip_batch']:g} per batch shard, "
      f"grad_accum_steps {r['grad_accum_steps']})   task {r['task']} (heads {r['heads']})",
      f"Compile       lower {r['lower_seconds']} s, compile {r['compile_seconds']} s (this machine's CPU)",
  ]
  if "compile_error" in r:
    what = "everything" if "total_bytes" in m else "temporaries alone"
    lines += [f"Memory        DOES NOT FIT: the compiler ran out of HBM: {r['compile_error']}",
              f"              needed ({what}) {_gib(m.get('total_bytes', m.get('temp_bytes')))} per chip, "
              f"the compiler's HBM limit {_gib(m.get('compiler_hbm_limit_bytes'))}"]
    lines += ["              " + line for line in r.get("_error_detail", [])]
  else:
    verdict = {True: "FITS", False: "DOES NOT FIT", None: "(unknown chip HBM)"}[r["fits"]]
    frac = f" ({100 * m['total_bytes'] / r['hbm_bytes']:.0f}% of HBM)" if r["hbm_bytes"] else ""
    lines += [
        "Memory per chip (compiled.memory_analysis()):",
        f"  arguments     {_gib(m['argument_bytes']):>12}   (train state shards + batch shard)",
        f"  outputs       {_gib(m['output_bytes']):>12}",
        f"  aliased       {_gib(m['alias_bytes']):>12}   (outputs written into the donated state)",
        f"  temporaries   {_gib(m['temp_bytes']):>12}   (activations, gradients, optimizer temporaries)",
        f"  code          {_gib(m['generated_code_bytes']):>12}",
        f"  total         {_gib(m['total_bytes']):>12}   vs HBM {_gib(r['hbm_bytes'])}: {verdict}{frac}",
    ]
  lines.append("FLOPs per chip per step:")
  if r.get("compiled_flops") is not None:
    lines.append(f"  compiled      {_tf(r['compiled_flops'])}   (matmuls/convs of the optimized HLO, loops × "
                 f"trip count; XLA cost_analysis, loop bodies once: {_tf(r['xla_cost_analysis_flops'])})")
  if r.get("hlo_loops"):
    lines.append(f"                (while loops, trip count: number of loops: {r['hlo_loops']}; "
                 f"unreadable trip counts: {r['hlo_unknown_loops']})")
  lines.append(f"  analytic      {_tf(r['analytic_flops'])}   (model FLOPs, pixelground.perf.flops; parts: " +
               ", ".join(f"{k} {_tf(v)}" for k, v in r["analytic_parts"].items()) + ")")
  lines.append(f"  + remat       {_tf(r['analytic_with_remat_flops'])}   (analytic + forward recompute of "
               f"{', '.join(r['remat_recompute_parts']) or 'nothing'}: ratio "
               f"{r['expected_ratio_with_remat']:.3f} expected)")
  if r.get("flops_ratio") is not None:
    lines.append(f"  ratio         {r['flops_ratio']:.3f}   compiled / analytic")
  if r.get("top_contractions"):
    lines.append("Most expensive contractions per chip (FLOPs × runs, shape, op):")
    for t in r["top_contractions"]:
      lines.append(f"  {_tf(t['flops']):>16}  ×{t['runs']:<4d} {t['shape']:<24s} {t['op_name'][-80:]}")
  if r.get("collectives"):
    lines.append("Collectives per chip per step (ops × runs; bytes = each op's largest buffer per chip):")
    for kind, c in r["collectives"].items():
      if c["count"]:
        lines.append(f"  {kind:<20s} {c['count']:6d} ops   {_gib(c['bytes']):>12}")
  if r["peak_tflops"]:
    lines.append(f"Step time     {r['step_seconds_at_100_mfu']:.4g} s at 100% MFU, "
                 f"{r['step_seconds_at_50_mfu']:.4g} s at 50% MFU ({r['peak_tflops']} TFLOP/s peak)")
  return "\n".join(lines)


def main(argv):
  del argv
  # Compile-only: the host backend is the CPU; libtpu is loaded for the topology alone.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  import jax
  if not os.environ.get("JAX_PLATFORMS"):
    jax.config.update("jax_platforms", "cpu")
  config = _CONFIG.value
  try:
    report = compile_check(config, topology=_TOPOLOGY.value, batch_size=_BATCH.value or None,
                           mesh_axes=parse_mesh(_MESH.value) if _MESH.value else None,
                           task=_TASK.value, hlo_out=_HLO_OUT.value or None, top=_TOP.value)
  except TopologyUnavailable as e:
    print(f"compile_check: {e}", file=sys.stderr, flush=True)
    sys.exit(3)
  print(format_report(report), flush=True)
  print(json.dumps({k: v for k, v in report.items() if not k.startswith("_")}), flush=True)


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags

  _CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=False)
  _TOPOLOGY = flags.DEFINE_string("topology", "v5e:4x4", "TPU topology, e.g. v5e:4x4, v5p:2x2x2, v4:2x2x2.")
  _BATCH = flags.DEFINE_integer("batch", 0, "Global batch (default: config.optimizer.batch_size).")
  _MESH = flags.DEFINE_string("mesh", "", "Mesh axes name:size,... (default: config.mesh; -1 = the rest).")
  _TASK = flags.DEFINE_string("task", "", "Task whose batch to compile for (default: the config's first "
                              "task for single-task batches; 'mixed': the full schema, every head).")
  _HLO_OUT = flags.DEFINE_string("hlo_out", "", "Write the optimized per-chip HLO text here.")
  _TOP = flags.DEFINE_integer("top", 8, "List this many of the most expensive contractions.")
  flags.mark_flag_as_required("config")
  app.run(main)
