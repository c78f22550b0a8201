"""FLOPs of an optimized HLO module, every loop counted × its trip count.

XLA's `cost_analysis()` counts a `while` body once, so its "flops" is far too low for scanned models
(layers, gradient-accumulation micro-batches). `hlo_flops(text)` parses the HLO text of a compiled
program and counts matmul / convolution FLOPs of each computation as often as it runs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import typing as tp


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


def _runs(comps: dict[str, list[_Instr]], entry: str) -> tuple[list[str], dict[str, int], list[int], int]:
  """How often each computation reachable from `entry` runs per call of the entry: fusions / calls
  once per call, `while` bodies × trip count, every branch of a conditional once. → (computations,
  callers before callees; {computation: runs}; trip count of every while; whiles whose trip count is
  unreadable, counted once)."""
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
  # Callers before callees (the call graph is a DAG).
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
  return order, runs, loops, unknown


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
  order, runs, loops, unknown = _runs(comps, entry)
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


# Collectives: kind → HLO ops (synchronous and the async "-start" halves; "-done" carries no data).
COLLECTIVES = {"all-gather": ("all-gather", "all-gather-start"),
               "reduce-scatter": ("reduce-scatter",),
               "all-reduce": ("all-reduce", "all-reduce-start"),
               "all-to-all": ("all-to-all",),
               "collective-permute": ("collective-permute", "collective-permute-start")}
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
          "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1}


def _array_bytes(shape: str) -> list[int]:
  """Bytes of every array in an HLO shape ('bf16[8,4]{1,0}' or a tuple of them)."""
  return [math.prod(int(d.lstrip("<=")) for d in dims.split(",") if d.strip()) * _BYTES.get(t, 4)
          for t, dims in re.findall(r"\b([a-z]\w*)\[([^\]]*)\]", shape)]


def hlo_collectives(text: str) -> dict[str, dict[str, float]]:
  """Per-device collective traffic of one run of an (optimized, per-device) HLO module, each
  computation counted as often as it runs (`while` bodies × trip count).

  → {kind: {"count": ops executed, "bytes": bytes}} for the kinds of `COLLECTIVES`. An op's bytes are
  its largest buffer per device: the gathered result of an all-gather, the full operand of a
  reduce-scatter, the operand (= result) of an all-reduce / all-to-all / collective-permute — the
  size of what it moves, independent of the algorithm the interconnect uses."""
  comps, entry = parse_hlo(text)
  if entry is None:
    raise ValueError("hlo_collectives: no ENTRY computation in the HLO text")
  order, runs, _, _ = _runs(comps, entry)
  kind_of = {op: kind for kind, ops in COLLECTIVES.items() for op in ops}
  out = {kind: {"count": 0, "bytes": 0.0} for kind in COLLECTIVES}
  for name in order:
    shapes = {i.name: i.shape for i in comps[name]}
    for ins in comps[name]:
      kind = kind_of.get(ins.op)
      if kind is None or not runs[name]:
        continue
      sizes = _array_bytes(ins.shape)
      for op, inline in zip(ins.operands, ins.operand_shapes):
        sizes += _array_bytes(inline or shapes.get(op, ""))
      out[kind]["count"] += runs[name]
      out[kind]["bytes"] += runs[name] * max(sizes, default=0)
  return out

