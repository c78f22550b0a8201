r"""Deviceless TPU compile of the full train step: does a config fit, and how many FLOPs does it run?

    python -m pixelground.compile_check --config=configs/ln_t5xl.py --topology=v5e:4x4
    python -m pixelground.compile_check --config=configs/ln_t5xl.py --topology=v5p:2x2x2 \
        [--batch=256] [--mesh=data:1,fsdp:8,tensor:1] [--task=ln|mixed] [--top=8] [--hlo_out=FILE]
        [--config.key=value ...]

Needs libtpu (`pip install -e .[tpu]`, i.e. `jax[tpu]`), not a TPU: the topology's devices come from
`jax.experimental.topologies.get_topology_desc`, the mesh is built from `config.mesh` (or `--mesh`;
-1 = the rest of the chips) over them, and the *same* jitted step the trainer runs
(`train_lib.make_train_step`, with the config's optimizer, remat, dtypes and `grad_accum_steps`) is
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
  * analytic model FLOPs per chip (`pixelground.flops.step_flops`, the trainer's MFU numerator) / chips,
    the ratio compiled / analytic, and the analytic count plus the forward recompute of the parts
    under `remat="full"` (which model FLOPs leave out by definition) — the ratio expected from remat;
  * the most expensive contractions (`--top`), where to look when the ratio is off;
  * the chip's peak bf16 FLOP/s (`PEAK_TFLOPS`) and the step time that 100% / 50% MFU would mean.

`chip_peak(device_kind)` (FLOP/s) is what the trainer divides by for MFU.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import sys
import time
import typing as tp

# Peak dense bf16 TFLOP/s per chip and HBM per chip (GiB), SPEC §8.
PEAK_TFLOPS: dict[str, float] = {"v4": 275, "v5e": 197, "v5p": 459, "v6e": 918, "h100": 989}
HBM_GIB: dict[str, float] = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32, "h100": 74.5}  # H100: 80 GB

GIB = 1024 ** 3


def chip_family(device_kind: tp.Any) -> str | None:
  """A `jax.Device.device_kind` ("TPU v5 lite", "TPU v5p", "TPU v4", "TPU v6 lite", "NVIDIA H100 80GB
  HBM3", ...) → a key of `PEAK_TFLOPS` ("v5e", ...), or None (CPU, unknown chips). A device object is
  accepted too."""
  kind = getattr(device_kind, "device_kind", device_kind)
  k = str(kind).lower()
  if "h100" in k:
    return "h100"
  if "tpu" not in k:
    return None
  if re.search(r"v6", k):
    return "v6e"
  if re.search(r"v5", k):
    return "v5e" if ("lite" in k or "v5e" in k) else "v5p"   # v5p reports "TPU v5" or "TPU v5p"
  if re.search(r"v4", k):
    return None if "lite" in k else "v4"                     # v4i ("TPU v4 lite") is another chip
  return None


def chip_peak(device_kind: tp.Any) -> float | None:
  """Peak bf16 FLOP/s of one chip (not TFLOP/s), None when unknown (CPU): MFU's denominator."""
  fam = chip_family(device_kind)
  return None if fam is None else PEAK_TFLOPS[fam] * 1e12


def chip_hbm_bytes(device_kind: tp.Any) -> int | None:
  fam = chip_family(device_kind)
  return None if fam is None else int(HBM_GIB[fam] * GIB)


# ----------------------------------------------------------------------------------------------------
# FLOPs of an optimized HLO module, loops counted × their trip counts
# ----------------------------------------------------------------------------------------------------

_COMP_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_ARRAY = re.compile(r"^([a-z]\w*)\[([^\]]*)\]")


def _split_shape(rest: str) -> tuple[str, str]:
  """'bf16[2,3]{1,0} dot(...)...' → ('bf16[2,3]{1,0}', 'dot(...)...'); tuple shapes are bracketed."""
  if rest.startswith("("):
    depth = 0
    for i, ch in enumerate(rest):
      depth += ch == "("
      depth -= ch == ")"
      if depth == 0:
        return rest[:i + 1], rest[i + 1:].lstrip()
  shape, _, tail = rest.partition(" ")
  return shape, tail


def _dims(shape: str) -> list[int] | None:
  m = _ARRAY.match(shape)
  if not m:
    return None
  body = m.group(2).strip()
  return [int(d.lstrip("<=")) for d in body.split(",")] if body else []


def _matching(text: str, start: int) -> int:
  """Index of the ')' closing the '(' at `start`."""
  depth = 0
  for i in range(start, len(text)):
    depth += text[i] == "("
    depth -= text[i] == ")"
    if depth == 0:
      return i
  return len(text) - 1


@dataclasses.dataclass
class _Instr:
  name: str
  shape: str
  op: str
  operands: list[str]       # names (without '%'), shapes where the printer inlines them
  operand_shapes: list[str | None]
  attrs: str
  root: bool


def _parse_instr(line: str) -> _Instr | None:
  m = _INSTR.match(line)
  if not m:
    return None
  root, name, rest = bool(m.group(1)), m.group(2), m.group(3)
  shape, tail = _split_shape(rest)
  p = tail.find("(")
  if p < 0:
    return None
  op = tail[:p].strip()
  q = _matching(tail, p)
  names, shapes = [], []
  for tok in _split_top(tail[p + 1:q]):
    tok = tok.strip()
    if not tok:
      continue
    parts = tok.rsplit(" ", 1)
    names.append(parts[-1].lstrip("%"))
    shapes.append(parts[0] if len(parts) == 2 else None)
  return _Instr(name, shape, op, names, shapes, tail[q + 1:], root)


def _split_top(text: str) -> list[str]:
  out, depth, cur = [], 0, []
  for ch in text:
    if ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    if ch == "," and depth == 0:
      out.append("".join(cur))
      cur = []
    else:
      cur.append(ch)
  out.append("".join(cur))
  return out


def parse_hlo(text: str) -> tuple[dict[str, list[_Instr]], str | None]:
  """HLO module text → ({computation: [instructions]}, entry computation name)."""
  comps: dict[str, list[_Instr]] = {}
  entry, current = None, None
  for line in text.splitlines():
    if current is None:
      m = _COMP_HEADER.match(line)
      if m:
        current = m.group(2)
        comps[current] = []
        if m.group(1):
          entry = current
      continue
    if line.strip() == "}":
      current = None
      continue
    ins = _parse_instr(line)
    if ins is not None:
      comps[current].append(ins)
  return comps, entry


def _attr(attrs: str, key: str) -> str | None:
  m = re.search(rf"\b{key}=([^,\s]+(?:\{{[^}}]*\}})?)", attrs)
  return m.group(1) if m else None


def _int_list(text: str | None) -> list[int]:
  if not text:
    return []
  return [int(x) for x in re.findall(r"\d+", text)]


def _instr_flops(ins: _Instr, shapes: dict[str, str]) -> float:
  """Matmul FLOPs (2 per multiply-add) of a dot or convolution instruction, else 0."""
  if ins.op not in ("dot", "convolution"):
    return 0.0
  out = _dims(ins.shape)
  if out is None or len(ins.operands) < 2:
    return 0.0
  lhs = _dims(ins.operand_shapes[0] or shapes.get(ins.operands[0], ""))
  rhs = _dims(ins.operand_shapes[1] or shapes.get(ins.operands[1], ""))
  if ins.op == "dot":
    if lhs is None:
      return 0.0
    contracting = _int_list(re.search(r"lhs_contracting_dims=\{([^}]*)\}", ins.attrs).group(1)
                            if "lhs_contracting_dims" in ins.attrs else "")
    return 2.0 * math.prod(out) * math.prod(lhs[d] for d in contracting)
  # convolution: each output element sums, over the window taps that land on a real input element
  # (not padding, not a hole of lhs dilation), the input features of its group (rhs "i" dimension).
  # Batched matmuls are often written as convolutions whose batch dims are spatial dims with a window
  # as wide as the dim, lhs_dilate = window size and stride = size − 1: one real tap per output.
  m = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", ins.attrs)
  if lhs is None or rhs is None or not m:
    return 0.0
  lhs_l, rhs_l, out_l = m.groups()
  spatial = sorted(c for c in rhs_l if c.isdigit())
  win = _window(ins.attrs, len(spatial))
  macs = math.prod(out[out_l.index(c)] for c in "bf") * rhs[rhs_l.index("i")]
  for j, c in enumerate(spatial):
    macs *= _taps(lhs[lhs_l.index(c)], out[out_l.index(c)], rhs[rhs_l.index(c)], *win[j])
  return 2.0 * macs


def _window(attrs: str, n: int) -> list[tuple[int, int, int, int]]:
  """Per spatial dim of a convolution's `window={...}`: (stride, pad_low, lhs_dilate, rhs_dilate)."""
  m = re.search(r"window=\{([^}]*)\}", attrs)
  fields = dict(kv.split("=", 1) for kv in m.group(1).split()) if m else {}

  def per_dim(key, default):
    return [int(v) for v in fields[key].split("x")] if key in fields else [default] * n

  pads = [int(p.split("_")[0]) for p in fields["pad"].split("x")] if "pad" in fields else [0] * n
  return list(zip(per_dim("stride", 1), pads, per_dim("lhs_dilate", 1), per_dim("rhs_dilate", 1)))


@functools.lru_cache(maxsize=4096)
def _taps(n_in: int, n_out: int, size: int, stride: int, pad_lo: int, lhs_dil: int, rhs_dil: int) -> int:
  """(output position, window tap) pairs of one spatial dim that read a real input element."""
  import numpy as np
  pos = np.arange(n_out)[:, None] * stride + np.arange(size)[None, :] * rhs_dil - pad_lo
  return int(((pos >= 0) & (pos <= (n_in - 1) * lhs_dil) & (pos % lhs_dil == 0)).sum())


def _const_value(ins: _Instr | None) -> int | None:
  """The value of an integer scalar `constant(N)` instruction, else None."""
  if ins is None or ins.op != "constant" or len(ins.operands) != 1:
    return None
  try:
    return int(ins.operands[0])
  except ValueError:
    return None


def _trip_count(ins: _Instr, comps: dict[str, list[_Instr]], caller: dict[str, _Instr]
                ) -> int | None:
  """Trip count of a `while`: XLA's known_trip_count annotation, else read from the loop itself —
  the condition `counter <cmp> bound`, the counter's initial value (the while's init tuple) and its
  increment (the body's `counter + step`). Constants may sit in the loop or be passed in through the
  init tuple (loop-invariant tuple elements)."""
  m = re.search(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"', ins.attrs)
  if m:
    return int(m.group(1))
  cond = comps.get((_attr(ins.attrs, "condition") or "").lstrip("%"))
  body = comps.get((_attr(ins.attrs, "body") or "").lstrip("%"))
  if not cond or not body:
    return None
  tup = caller.get(ins.operands[0]) if ins.operands else None
  init_ops = tup.operands if tup is not None and tup.op == "tuple" else []

  def resolve(local, name):
    i = local.get(name)
    while i is not None and i.op in ("copy", "convert", "bitcast") and i.operands:
      i = local.get(i.operands[0])
    return i

  def tuple_index(local, name):
    i = resolve(local, name)
    return int(_attr(i.attrs, "index") or 0) if i is not None and i.op == "get-tuple-element" else None

  def value(local, name):
    i = resolve(local, name)
    v = _const_value(i)
    if v is None and i is not None and i.op == "get-tuple-element" and local is not caller:
      j = int(_attr(i.attrs, "index") or 0)       # a loop-invariant value passed in the init tuple
      if j < len(init_ops):
        v = _const_value(resolve(caller, init_ops[j]))
    return v

  c_local = {i.name: i for i in cond}
  root = next((i for i in cond if i.root), None)
  if root is None or root.op != "compare" or len(root.operands) != 2:
    return None
  direction = _attr(root.attrs, "direction")
  a, b = root.operands
  idx, bound = tuple_index(c_local, a), value(c_local, b)
  if idx is None or bound is None:                    # bound <cmp> counter: flip the direction
    idx, bound = tuple_index(c_local, b), value(c_local, a)
    direction = {"GT": "LT", "GE": "LE", "LT": "GT", "LE": "GE"}.get(direction, direction)
  if idx is None or bound is None or direction not in ("LT", "LE", "NE"):
    return None
  init = _const_value(resolve(caller, init_ops[idx])) if idx < len(init_ops) else None
  init = 0 if init is None else init
  step = 1
  b_local = {i.name: i for i in body}
  b_root = next((i for i in body if i.root), None)
  if b_root is not None and b_root.op == "tuple" and idx < len(b_root.operands):
    upd = resolve(b_local, b_root.operands[idx])
    if upd is not None and upd.op == "add" and len(upd.operands) == 2:
      x, y = upd.operands
      step = value(b_local, y) if tuple_index(b_local, x) == idx else value(b_local, x)
      if step is None or step <= 0:
        return None
  span = bound - init + (1 if direction == "LE" else 0)
  return max(-(-span // step), 0)


def hlo_flops(text: str, top: int = 0) -> dict[str, tp.Any]:
  """Matmul + convolution FLOPs of an (optimized, per-device) HLO module's entry computation, each
  computation counted as often as it runs: fusions / calls once per call, `while` bodies × trip count,
  every branch of a conditional once (an upper bound; train steps rarely have them).

  → {"flops", "loops": [trip count of every while], "unknown_loops": n (trip count unreadable: counted
  once), "top": the `top` most expensive contractions [{"flops" (× runs), "runs", "op", "shape",
  "op_name"}]}."""
  comps, entry = parse_hlo(text)
  if entry is None:
    raise ValueError("hlo_flops: no ENTRY computation in the HLO text")
  loops: list[int] = []
  unknown = 0
  edges: dict[str, list[tuple[str, int]]] = {}
  for name, instrs in comps.items():
    by_name = {i.name: i for i in instrs}
    out = edges.setdefault(name, [])
    for ins in instrs:
      if ins.op == "while":
        n = _trip_count(ins, comps, by_name)
        if n is None:
          unknown += 1
          n = 1
        loops.append(n)
        out.append(((_attr(ins.attrs, "body") or "").lstrip("%"), n))
        continue
      branches = re.search(r"branch_computations=\{([^}]*)\}", ins.attrs)
      if branches:
        out.extend((b.strip().lstrip("%"), 1) for b in branches.group(1).split(","))
      for key in ("calls", "true_computation", "false_computation"):
        callee = _attr(ins.attrs, key)
        if callee:
          out.extend((c, 1) for c in re.findall(r"%?([\w.\-]+)", callee))
  # Runs of each computation reachable from the entry: callers before callees (the call graph is a DAG).
  order, seen = [], set()

  def visit(name):
    seen.add(name)
    for callee, _ in edges.get(name, ()):
      if callee in comps and callee not in seen:
        visit(callee)
    order.append(name)

  visit(entry)
  runs = {name: 0 for name in order}
  runs[entry] = 1
  for name in reversed(order):
    for callee, n in edges.get(name, ()):
      if callee in runs:
        runs[callee] += runs[name] * n
  flops, rows = 0.0, []
  for name in order:
    shapes = {i.name: i.shape for i in comps[name]}
    for ins in comps[name]:
      f = _instr_flops(ins, shapes)
      if f and runs[name]:
        flops += f * runs[name]
        if top:
          meta = re.search(r'op_name="([^"]*)"', ins.attrs)
          rows.append({"flops": f * runs[name], "runs": runs[name], "op": ins.op,
                       "shape": ins.shape.split("{")[0], "op_name": meta.group(1) if meta else ""})
  rows.sort(key=lambda r: -r["flops"])
  # Loop trip counts as listed per while instruction (a loop in a computation called twice is listed once).
  return {"flops": flops, "loops": loops, "unknown_loops": unknown, "top": rows[:top]}


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
  if config.data.get("mixing", "batch") != "batch" or not config.get("tasks"):
    return None
  names = list(config.tasks.keys())
  return max(names, key=lambda n: (float(config.tasks[n].get("weight", 1.0)), -names.index(n)))


def abstract_batch(config, setup, batch_size: int, task: str | None) -> dict:
  """ShapeDtypeStructs of one global batch of `task` (None: the full mixed-task schema), batch-sharded."""
  import jax
  from jax.sharding import NamedSharding

  from pixelground import sharding, train_lib
  from pixelground.data import tasks as task_lib

  tcfg = train_lib.task_config(config, train=True)
  if task is None:
    schema = task_lib.schema(tcfg)
  else:
    schema = task_lib.task_schema(tcfg, train_lib.converter_name(config, task))
  schema = dict(schema, task_id=((), "int32"))

  def one(shape, dtype):
    full = (batch_size,) + tuple(shape)
    spec = sharding.batch_spec(len(full), setup.rules, setup.mesh)
    return jax.ShapeDtypeStruct(full, dtype, sharding=NamedSharding(setup.mesh, spec))

  return {k: one(shape, dtype) for k, (shape, dtype) in schema.items()}


def analytic_flops(config, setup, batch_size: int, task: str | None) -> dict[str, tp.Any]:
  """Model FLOPs of one step (global batch), as the trainer counts them for MFU
  (`train_lib.StepFlops`), with the per-part split and the forward-only split (train=False), and
  `with_remat` = total + the forward of every part that `remat="full"` recomputes."""
  from pixelground import flops as flops_lib, train_lib
  from pixelground.models import pixelllm as P

  cfg, d = setup.cfg, config.data
  conv = train_lib.converter_name(config, task) if task else None
  heads = set(P.TASK_HEADS.get(conv, ())) if conv else {"lisa", "refseg", "proposals"}
  cfg = dataclasses.replace(cfg, lisa=cfg.lisa and "lisa" in heads,
                            refseg=cfg.refseg and "refseg" in heads,
                            proposals=cfg.proposals and "proposals" in heads)
  kw = dict(batch_size=batch_size, prompt_len=int(d.get("max_prompt_len", 32)),
            target_len=0 if conv == "dense_caption" else int(d.get("max_target_len", 128)),
            num_seg=int(d.get("max_seg", 4)) if cfg.lisa else 0,
            num_regions=int(d.get("max_regions", 16)) if cfg.proposals else 0,
            region_len=int(d.get("max_region_len", 16)) if cfg.proposals else 0,
            trainable=setup.keep)
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

  from pixelground import sharding, train_lib
  from pixelground.recipes import loss_config

  if task == "":
    task = _default_task(config)
  elif task == "mixed":
    task = None
  if task is not None and task not in config.tasks:
    raise ValueError(f"--task: '{task}' is not in config.tasks ({sorted(config.tasks)})")
  batch_size = int(batch_size or config.optimizer.batch_size)
  accum = int(config.optimizer.get("grad_accum_steps", 1) or 1)
  axes = dict(mesh_axes) if mesh_axes else dict(config.mesh)

  devices = topology_devices(topology)
  kind = devices[0].device_kind
  mesh = sharding.make_mesh(axes, devices=devices)
  setup = train_lib.build_setup(config, mesh)
  batch_axes = sharding.batch_spec(1, setup.rules, mesh)[0]
  batch_axes = () if batch_axes is None else (batch_axes,) if isinstance(batch_axes, str) else batch_axes
  shards = math.prod(mesh.shape[a] for a in batch_axes)
  if batch_size % (accum * shards):
    raise ValueError(f"batch {batch_size} must divide by grad_accum_steps ({accum}) × the batch "
                     f"shards ({shards}: mesh axes {batch_axes}).")

  state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                       setup.abstract_state, setup.state_shardings)
  batch = abstract_batch(config, setup, batch_size, task)
  heads = train_lib.heads_of(config, task)
  step = train_lib.make_train_step(setup, loss_config(config), accum_steps=accum, seed=config.seed)
  n = len(devices)
  report: dict[str, tp.Any] = {
      "topology": topology, "chip": chip_family(kind), "device_kind": kind, "chips": n,
      "mesh": {k: int(v) for k, v in mesh.shape.items()}, "batch": batch_size,
      "per_chip_batch": batch_size / shards, "grad_accum_steps": accum, "task": task or "mixed",
      "heads": list(heads) if heads is not None else None,
      "state_params": int(sum(math.prod(x.shape) for x in jax.tree.leaves(setup.abstract_state))),
  }

  t0 = time.perf_counter()
  with jax.set_mesh(mesh):
    lowered = step.lower(state, batch, heads)
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
  lines.append(f"  analytic      {_tf(r['analytic_flops'])}   (model FLOPs, pixelground.flops; parts: " +
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
