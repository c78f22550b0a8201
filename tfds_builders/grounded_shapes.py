"""Synthetic "grounded shapes" data, written in the raw formats of the real datasets (SPEC.md section 5).

Scenes are 2-5 flat shapes (circle, triangle, square, hexagon, star; named colours; small / medium / large)
over a textured background made of 1-2 "stuff" regions (sky above ground, wall above floor, or a single
wall) split by a slightly tilted horizon. Later shapes occlude earlier ones; every visible mask is what
the panoptic map shows. Everything is a pure function of (seed, split, index): the same seed gives the
same bytes, whatever the number of worker processes.

Layout under `--out DIR` (the `grounded_shapes` configs of the builders read it; see README.md):

  images/{split}/{id:012d}.jpg                         RGB JPEG, size x size pixels
  grounded_shapes_{split}_localized_narratives.jsonl   Localized Narratives (SPEC 5.1), one annotator
  annotations/panoptic_{split}.json + panoptic_{split}/{id:012d}.png   COCO panoptic (SPEC 5.3)
  annotations/png_{split}.json                         Panoptic Narrative Grounding (SPEC 5.5)
  annotations/captions_{split}.json                    COCO captions, 3 per image (SPEC 5.2)
  grounded_shapes/instances.json, grounded_shapes/refs(unc).p   refer format, all splits (SPEC 5.4)
  reasonseg/{split}/{id:012d}.jpg + .json              LISA ReasonSeg (SPEC 5.7), images with a query

Splits are train / validation / test ("val" inside the refs). Image ids are integers, unique across
splits: split code (1, 2, 3) * 10^7 + index + 1. Units: LN trace x / y are normalised by the image
width / height (origin top-left; rarely slightly outside [0, 1], as in the real data) and times are
seconds; every other coordinate is in pixels. Boxes are COCO [x, y, w, h] of the VISIBLE mask (w, h
count pixels: x_max - x_min + 1). COCO polygons are flat [x1, y1, x2, y2, ...] outlines of the whole,
unoccluded shape; ReasonSeg targets are always unoccluded shapes, so their polygon is their mask.

During an LN utterance that names objects ("a small red circle", "two triangles", "the sky") the trace
loops inside the named objects' visible masks; between them it travels from one object to the next.

  python -m tfds_builders.grounded_shapes --out DIR [--num_train 2000 --num_validation 200
      --num_test 200 --seed 0 --size 256 --workers 2] [--max_shapes 5 --scale 1.0 --colours 8]
      [--preview PNG_PATH]

Easier scenes for small models (the CPU demo: 3 shapes, radii × 2, 4 colours): `max_shapes` 2-5,
`scale` 0.5-2.0 (shape radii × SIZES), `colours` 2-8 (the first names of PALETTE).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import pickle
import re
import shutil
import time

import numpy as np
from PIL import Image, ImageDraw

from tfds_builders.grounded_shapes_scene import (  # noqa: F401  (shape_polygon: re-exported)
    KINDS, PALETTE, REF_SPLIT, SIZES, SPLITS, STUFF, _SPLIT_CODE, image_id, make_scene, polygon_area,
    shape_polygon)

NUMBERS = ("zero", "one", "two", "three", "four", "five")
# Implicit (ReasonSeg) queries: kind / colour -> (short phrase, sentence)
KIND_QUERIES = {
    "circle": ("the shape that could roll like a wheel", "Which shape has the outline of a coin?"),
    "triangle": ("the shape of a slice of pizza", "Which shape has the outline of a warning road sign?"),
    "square": ("the shape with four equal sides", "Which shape looks like a chessboard tile?"),
    "hexagon": ("the shape of a honeycomb cell", "Which shape has the outline of a cell in a beehive?"),
    "star": ("the shape that twinkles in the night sky", "Which shape would you draw for a twinkle at night?")}
COLOUR_QUERIES = {
    "red": ("the shape in the colour of a stop sign", "Which shape has the colour of a stop sign?"),
    "green": ("the shape as green as fresh grass", "Which shape has the colour of fresh grass?"),
    "blue": ("the shape in the colour of the ocean", "Which shape has the colour of a clear summer sky?"),
    "yellow": ("the shape in the colour of a ripe banana", "Which shape has the colour of a ripe banana?"),
    "purple": ("the shape in the colour of grapes", "Which shape has the colour of an aubergine?"),
    "orange": ("the shape in the colour of a tangerine", "Which shape has the colour of a pumpkin?"),
    "pink": ("the shape in the colour of a flamingo", "Which shape has the colour of a flamingo?"),
    "black": ("the shape in the colour of coal", "Which shape has the colour of a moonless night?")}




def _where(s, size: int) -> str:
  h = "left" if s.cx < size / 3 else "right" if s.cx > 2 * size / 3 else ""
  v = "top" if s.cy < size / 3 else "bottom" if s.cy > 2 * size / 3 else ""
  return f"at the {v} {h}" if v and h else f"at the {v}" if v else f"on the {h}" if h else "in the middle"


def _words(text: str) -> list:
  return [(w, None, False) for w in text.split()]


def _narrative(rng: np.random.Generator, scene, size: int) -> list[list[tuple]]:
  """Sentences of units (text, target segment indices or None, plural). Every sentence ends with a
  plain word carrying the full stop, so noun-phrase units never hold punctuation."""
  segs, n = scene.segs, scene.n_shapes
  groups: dict[str, list[int]] = {}
  for i in sorted(range(n), key=lambda i: segs[i].cx):
    groups.setdefault(segs[i].kind, []).append(i)
  sents = []
  for kind, idx in groups.items():
    if len(idx) == 1:
      s = segs[idx[0]]
      np_, pos = (f"a {s.size} {s.colour} {kind}", idx, False), _words(_where(s, size))
      t = rng.integers(5 if sents else 4)
      lead = ("In this image there is", "I can see", "We can see", "There is also")[t - 1]
      sent = [np_, ("is", None, False)] + pos if t == 0 else _words(lead) + [np_] + pos
    else:
      pl = (f"{NUMBERS[len(idx)]} {kind}s", idx, True)
      sent = (_words("There are") + [pl] + _words("in this image:") if rng.random() < 0.5
              else [pl] + _words("are also visible:"))
      for k, i in enumerate(idx):
        s = segs[i]
        pos = _words(_where(s, size) + ("," if k < len(idx) - 2 else ""))
        one = (f"a {s.size} {s.colour} one", [i], False)
        sent += (_words("and") if k == len(idx) - 1 else []) + [one] + pos
    sents.append(sent)
  st = [(f"the {segs[n + j].kind}", [n + j], False) for j in range(len(segs) - n)]
  if len(st) == 2:
    sent = (_words("In the background we can see") + [st[0]] + _words("and") + [st[1]]
            + _words("behind the shapes") if rng.random() < 0.5
            else [st[0]] + _words("is above") + [st[1]] + _words("in the background"))
  else:
    sent = _words("The shapes are in front of") + [st[0]] + _words("in the background")
  sents.insert(0 if rng.random() < 0.3 else len(sents), sent)
  for sent in sents:
    sent[0] = (sent[0][0][0].upper() + sent[0][0][1:],) + sent[0][1:]
    sent[-1] = (sent[-1][0] + ".",) + sent[-1][1:]
  return sents


def _loop(ts: np.ndarray, a: float, b: float, deep: tuple, prm: np.ndarray, size: int) -> np.ndarray:
  """(len(ts), 2) pixel positions of a scribble loop inside the L1 ball `deep` = (x, y, clearance)."""
  u = (ts - a) / max(b - a, 1e-6)
  th = prm[0] + prm[1] * 2 * math.pi * prm[2] * u
  rad = min(0.5 * deep[2], 0.08 * size)
  return np.stack([deep[0] + rad * prm[3] * np.cos(th), deep[1] + rad * prm[4] * np.sin(th)], -1)


def _localized_narrative(rng: np.random.Generator, sents, scene, split: str, iid: int, size: int) -> dict:
  """One LN record (SPEC 5.1): utterance timing and a mouse trace that scribbles over named objects."""
  windows, pauses, t = [], [], float(rng.uniform(0.0, 0.6))
  for sent in sents:
    i = 0
    while i < len(sent):
      text, tg, pl = sent[i]
      if tg is None and i + 1 < len(sent) and sent[i + 1][1] is None and rng.random() < 0.25:
        i += 1
        text += " " + sent[i][0]
      dur = (0.15 + 0.05 * len(text) + rng.uniform(0, 0.15) if tg is None else  # seconds
             0.75 * len(tg) + 0.4 + rng.uniform(0, 0.3) if pl else
             0.9 + 0.15 * len(text.split()) + rng.uniform(0, 0.4))
      windows.append((re.sub(r"[.,:]", "", text), t, t + dur, tg))
      t += dur
      i += 1
    pauses.append((t, t + rng.uniform(0.15, 0.5)))
    t = pauses[-1][1]
  t_end = windows[-1][2] + rng.uniform(0.3, 1.0)
  ts = rng.uniform(0.0, 0.04) + np.cumsum(rng.uniform(0.045, 0.055, int(t_end / 0.045) + 2))
  ts = ts[ts <= t_end]
  pos = np.zeros((len(ts), 2))

  def edge_point(outside: bool) -> np.ndarray:
    p = rng.uniform(0.1, 0.9, 2) * size
    if outside:
      ax = rng.integers(2)
      p[ax] = -rng.uniform(0.005, 0.05) * size if rng.random() < 0.5 else size * (1 + rng.uniform(0.005, 0.05))
    return p

  keys = [(0.0, edge_point(rng.random() < 0.5))]  # (time, position) at the ends of each travel
  for text, a, b, tg in windows:
    if tg is None:
      continue
    k = len(tg)
    for j, g in enumerate(tg):
      aj, bj = a + j * (b - a) / k, a + (j + 1) * (b - a) / k
      prm = np.array([rng.uniform(0, 2 * math.pi), rng.choice([-1, 1]), rng.uniform(1.0, 2.2),
                      rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0)])
      sel = (ts >= aj) & (ts < bj)
      pos[sel] = _loop(ts[sel], aj, bj, scene.segs[g].deep, prm, size)
      if j == 0:
        keys.append((a, _loop(np.array([aj]), aj, bj, scene.segs[g].deep, prm, size)[0]))
    keys.append((b, _loop(np.array([bj]), aj, bj, scene.segs[g].deep, prm, size)[0]))
  keys.append((max(keys[-1][0] + 0.3, t_end - rng.uniform(0.0, 0.5)), edge_point(rng.random() < 0.6)))
  for (ga, pa), (gb, pb) in zip(keys[::2], keys[1::2]):  # travel between objects
    sel = (ts >= ga) & (ts < gb)
    s = np.clip((ts[sel] - ga) / max(gb - ga, 1e-6), 0, 1)
    s = s * s * (3 - 2 * s)
    d = pb - pa
    bow = rng.uniform(-0.2, 0.2) * np.sin(math.pi * s)
    pos[sel] = pa + s[:, None] * d + bow[:, None] * np.array([-d[1], d[0]])
  pos[ts >= keys[-1][0]] = keys[-1][1]  # the pointer rests (often just off the image) at the end
  pos += rng.normal(0, 0.3, pos.shape)
  seg_no = np.zeros(len(ts), int)
  keep = np.ones(len(ts), bool)
  for pa, pb in pauses[:-1]:
    if rng.random() < 0.4:  # the annotator lifted the pointer between sentences: a new trace segment
      keep &= ~((ts > pa + 0.03) & (ts < pb - 0.03))
      seg_no += ts >= pb
  traces = []
  for k in np.unique(seg_no[keep]):
    sel = keep & (seg_no == k)
    traces.append([{"x": round(float(x) / size, 4), "y": round(float(y) / size, 4), "t": round(float(tt), 3)}
                   for (x, y), tt in zip(pos[sel], ts[sel])])
  annotator = int(rng.integers(0, 60))
  return {"dataset_id": f"grounded_shapes_{split}", "image_id": str(iid), "annotator_id": annotator,
          "caption": " ".join(u[0] for sent in sents for u in sent),
          "timed_caption": [{"utterance": w, "start_time": round(a, 3), "end_time": round(b, 3)}
                            for w, a, b, _ in windows],
          "traces": traces,
          "voice_recording": f"grounded_shapes_{split}/grounded_shapes_{split}_{iid}_{annotator}.ogg"}


def _png_record(sents, scene, iid: int) -> dict:
  """Panoptic Narrative Grounding record: consecutive plain words merged, noun phrases grounded."""
  segments: list[dict] = []
  for unit in (u for sent in sents for u in sent):
    text, tg, pl = unit
    if tg is None and segments and not segments[-1]["noun"]:
      segments[-1]["utterance"] += " " + text
    else:
      segments.append({"utterance": text, "noun": tg is not None, "plural": bool(pl),
                       "segment_ids": [scene.segs[g].sid for g in tg or []]})
  return {"image_id": iid, "caption": " ".join(s["utterance"] for s in segments), "segments": segments}


def _expressions(rng: np.random.Generator, shapes: list, t: int, size: int) -> list[str]:
  """Up to 3 referring expressions, each picking out exactly shape `t` among `shapes`."""
  s, m = shapes[t], 0.1 * size
  out: list[tuple[str, int]] = []  # (expression, weight: spatial ones are preferred)
  bases = {f"{s.size} {s.colour} {s.kind}": lambda o: (o.size, o.colour, o.kind) == (s.size, s.colour, s.kind),
           f"{s.colour} {s.kind}": lambda o: (o.colour, o.kind) == (s.colour, s.kind),
           f"{s.size} {s.kind}": lambda o: (o.size, o.kind) == (s.size, s.kind),
           s.kind: lambda o: o.kind == s.kind, f"{s.colour} shape": lambda o: o.colour == s.colour,
           "shape": lambda o: True}
  dirs = {"on the left": lambda o: o.cx, "on the right": lambda o: -o.cx, "at the top": lambda o: o.cy,
          "at the bottom": lambda o: -o.cy}
  rels = {"left of": lambda o, a: a.cx - o.cx, "right of": lambda o, a: o.cx - a.cx,
          "above": lambda o, a: a.cy - o.cy, "below": lambda o, a: o.cy - a.cy}
  kinds = [o.kind for o in shapes]
  for base, match in bases.items():
    group = [o for o in shapes if match(o)]
    if len(group) == 1:
      if base != "shape":
        out.append((f"the {base}", 1))
      continue
    others = [o for o in group if o is not s]
    for word, key in dirs.items():
      if all(key(o) - key(s) >= m for o in others):
        out.append((f"the {base} {word}" if base != "shape" else f"the shape {word}", 2))
    for a in shapes:
      if a is s or kinds.count(a.kind) != 1 or any(a is o for o in group):
        continue
      for word, rel in rels.items():
        if rel(s, a) >= m and all(rel(o, a) <= -m for o in others):
          out.append((f"the {base} {word} the {a.kind}", 2))
  area = [polygon_area(o.poly) for o in shapes]
  if all(area[t] >= 1.5 * a for i, a in enumerate(area) if i != t):
    out.append(("the largest shape", 2))
  if all(area[t] * 1.5 <= a for i, a in enumerate(area) if i != t):
    out.append(("the smallest shape", 2))
  if not out:
    return []
  w = np.array([x[1] for x in out], float)
  pick = rng.choice(len(out), min(3, len(out)), replace=False, p=w / w.sum())
  return [out[i][0] for i in sorted(pick)]


def _reasonseg(rng: np.random.Generator, shapes: list, size: int) -> dict | None:
  """A LISA record whose unique answer is an unoccluded shape, or None when no query fits."""
  cands = []  # (target index, short phrase, sentence)
  corners = [KINDS[o.kind][1] for o in shapes]
  area = [polygon_area(o.poly) for o in shapes]
  for t, s in enumerate(shapes):
    rest = [i for i in range(len(shapes)) if i != t]
    if all(corners[t] > corners[i] for i in rest):
      cands.append((t, "the shape with the most corners", "Which shape in this image has the most corners?"))
    if all(corners[t] < corners[i] for i in rest):
      cands.append((t, "the shape with the fewest corners", "Which shape has the smallest number of corners?"))
    if all(shapes[i].kind != s.kind for i in rest):
      cands.append((t,) + KIND_QUERIES[s.kind])
    if all(shapes[i].colour != s.colour for i in rest):
      cands.append((t,) + COLOUR_QUERIES[s.colour])
    if all(area[t] >= 1.5 * area[i] for i in rest):
      cands.append((t, "the shape that takes up the most space", "Which shape would need the most paint?"))
  cands = [c for c in cands if not shapes[c[0]].occluded]
  if not cands:
    return None
  t, short, sentence = cands[rng.integers(len(cands))]
  is_sentence = bool(rng.random() < 0.5)
  pts = [[round(float(x), 2), round(float(y), 2)] for x, y in np.clip(shapes[t].poly, 0, size)]
  return {"text": [sentence if is_sentence else short], "is_sentence": is_sentence,
          "shapes": [{"label": "target", "points": pts, "group_id": None, "shape_type": "polygon",
                      "flags": {}}],
          "target_index": t}


def _captions(rng: np.random.Generator, scene, size: int) -> list[str]:
  """Three COCO-style captions."""
  shapes = scene.segs[:scene.n_shapes]
  groups: dict[str, list] = {}
  for s in shapes:
    groups.setdefault(s.kind, []).append(s)
  parts = [f"a {g[0].size} {g[0].colour} {k}" if len(g) == 1 else f"{NUMBERS[len(g)]} {k}s"
           for k, g in groups.items()]
  listing = ", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0]
  bg = {"sky": "under a pale sky", "wall": "in front of a wall" if len(scene.layout) == 1 else "in a room"}
  big = max(shapes, key=lambda s: s.r)
  adj = ("colourful", "simple", "flat")[rng.integers(3)]
  rest = len(shapes) - 1
  return [f"{NUMBERS[len(shapes)].capitalize()} {adj} shapes {bg[scene.layout[0]]}.",
          listing[0].upper() + listing[1:] + ".",
          f"A {big.size} {big.colour} {big.kind} {_where(big, size)} with {NUMBERS[rest]} other "
          f"shape{'s' if rest > 1 else ''} nearby."]


def _example(args: tuple) -> dict:
  """Generates and writes the files of one image; returns its JSON records."""
  out_dir, split, index, seed, size, max_shapes, scale, colours = args
  rng = np.random.default_rng([seed, _SPLIT_CODE[split], index])
  iid = image_id(split, index)
  scene = make_scene(rng, size, max_shapes, scale, colours)
  shapes = scene.segs[:scene.n_shapes]
  name = f"{iid:012d}"
  jpg = os.path.join(out_dir, "images", split, name + ".jpg")
  Image.fromarray(scene.image).save(jpg, quality=92)
  pan = scene.panoptic
  rgb = np.stack([pan & 255, (pan >> 8) & 255, (pan >> 16) & 255], -1).astype(np.uint8)
  Image.fromarray(rgb).save(os.path.join(out_dir, "annotations", f"panoptic_{split}", name + ".png"),
                            compress_level=3)
  sents = _narrative(rng, scene, size)
  ln = _localized_narrative(rng, sents, scene, split, iid, size)
  instances, refs = [], []
  for i, s in enumerate(shapes):
    ann_id = iid * 10 + i
    instances.append({"id": ann_id, "image_id": iid, "category_id": s.cat, "bbox": s.bbox, "area": s.area,
                      "iscrowd": 0, "segmentation": [[round(float(v), 2) for v in s.poly.reshape(-1)]]})
    exprs = _expressions(rng, shapes, i, size)
    if exprs:
      sents_ = [{"tokens": e.split(), "raw": e, "sent": e, "sent_id": ann_id * 10 + j}
                for j, e in enumerate(exprs)]
      refs.append({"ref_id": ann_id, "ann_id": ann_id, "image_id": iid, "split": REF_SPLIT[split],
                   "sentences": sents_, "sent_ids": [x["sent_id"] for x in sents_], "category_id": s.cat,
                   "file_name": f"{name}_{i}.jpg"})
  rs = _reasonseg(rng, shapes, size)
  if rs is not None:
    rs.pop("target_index")
    base = os.path.join(out_dir, "reasonseg", split, name)
    if os.path.exists(base + ".jpg"):
      os.remove(base + ".jpg")
    try:
      os.link(jpg, base + ".jpg")
    except OSError:
      shutil.copyfile(jpg, base + ".jpg")
    with open(base + ".json", "w") as f:
      json.dump(rs, f)
  return {"image": {"id": iid, "file_name": name + ".jpg", "width": size, "height": size}, "ln": ln,
          "panoptic": {"image_id": iid, "file_name": name + ".png", "segments_info": [
              {"id": s.sid, "category_id": s.cat, "area": s.area, "bbox": s.bbox, "iscrowd": 0}
              for s in scene.segs]},
          "png": _png_record(sents, scene, iid),
          "captions": [{"image_id": iid, "id": iid * 10 + j, "caption": c}
                       for j, c in enumerate(_captions(rng, scene, size))],
          "instances": instances, "refs": refs, "reasonseg": rs is not None}


def _dump(obj, path: str) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, separators=(",", ":"))


def generate(out_dir: str, num_train: int = 2000, num_validation: int = 200, num_test: int = 200,
             seed: int = 0, size: int = 256, workers: int | None = None, max_shapes: int = 5,
             scale: float = 1.0, colours: int = len(PALETTE)) -> dict:
  """Writes the whole dataset under `out_dir` (layout: module docstring); returns counts per split:
  {split: {"images", "refs", "reasonseg"}}. `max_shapes` (2-5), `scale` (shape radii × SIZES, 0.5-2.0)
  and `colours` (2-8: the first names of PALETTE) make easier scenes: fewer, bigger shapes in fewer
  colours. `workers` processes (default: min(2, CPUs)); the output does not depend on it."""
  counts = dict(zip(SPLITS, (num_train, num_validation, num_test)))
  for sub in ("grounded_shapes", *(f"{d}/{s}" for s in SPLITS for d in ("images", "reasonseg")),
              *(f"annotations/panoptic_{s}" for s in SPLITS)):
    os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    for name in os.listdir(os.path.join(out_dir, sub)):  # files of an earlier run (only our own names)
      if re.fullmatch(r"\d{12}\.(jpg|json|png)", name):
        os.remove(os.path.join(out_dir, sub, name))
  if not 2 <= max_shapes <= 5 or not 0.5 <= scale <= 2.0:
    raise ValueError(f"grounded_shapes: max_shapes must be in 2..5 (got {max_shapes}) and scale in "
                     f"[0.5, 2.0] (got {scale}): more or bigger shapes do not fit the scene.")
  if not 2 <= colours <= len(PALETTE):
    raise ValueError(f"grounded_shapes: colours must be in 2..{len(PALETTE)} (got {colours})")
  jobs = [(out_dir, split, i, seed, size, max_shapes, scale, colours) for split in SPLITS
          for i in range(counts[split])]
  workers = min(2, os.cpu_count() or 1) if workers is None else workers
  from tqdm import tqdm

  bar = dict(total=len(jobs), desc="grounded_shapes: drawing scenes", unit="img", mininterval=2.0)
  if workers > 1 and len(jobs) >= 64:
    with multiprocessing.get_context("spawn").Pool(workers) as pool:  # spawn: safe next to threaded JAX
      records = list(tqdm(pool.imap(_example, jobs, chunksize=16), **bar))
  else:
    records = [_example(j) for j in tqdm(jobs, **bar)]
  things = [{"id": c, "name": k, "supercategory": "shape", "isthing": 1, "color": list(col)}
            for k, (c, _, col) in KINDS.items()]
  stuff = [{"id": c, "name": k, "supercategory": "background", "isthing": 0, "color": list(col)}
           for k, (c, col) in STUFF.items()]
  ann = os.path.join(out_dir, "annotations")
  result, all_refs, instances = {}, [], {"images": [], "annotations": [], "categories": things}
  for split in SPLITS:
    recs = [r for r in records if r["ln"]["dataset_id"] == f"grounded_shapes_{split}"]
    if not recs:  # no files for an empty split: builders treat absent splits as not requested
      result[split] = {"images": 0, "refs": 0, "reasonseg": 0}
      continue
    images = [r["image"] for r in recs]
    with open(os.path.join(out_dir, f"grounded_shapes_{split}_localized_narratives.jsonl"), "w") as f:
      f.writelines(json.dumps(r["ln"], separators=(",", ":")) + "\n" for r in recs)
    _dump({"images": images, "annotations": [r["panoptic"] for r in recs], "categories": things + stuff},
          os.path.join(ann, f"panoptic_{split}.json"))
    _dump([r["png"] for r in recs], os.path.join(ann, f"png_{split}.json"))
    _dump({"images": images, "annotations": [c for r in recs for c in r["captions"]]},
          os.path.join(ann, f"captions_{split}.json"))
    instances["images"] += images
    instances["annotations"] += [a for r in recs for a in r["instances"]]
    refs = [x for r in recs for x in r["refs"]]
    all_refs += refs
    result[split] = {"images": len(recs), "refs": len(refs), "reasonseg": sum(r["reasonseg"] for r in recs)}
  _dump(instances, os.path.join(out_dir, "grounded_shapes", "instances.json"))
  with open(os.path.join(out_dir, "grounded_shapes", "refs(unc).p"), "wb") as f:
    # Via JSON: fresh objects, so the pickle's memo (hence its bytes) does not depend on the worker count.
    pickle.dump(json.loads(json.dumps(all_refs)), f, protocol=2)
  return result


def preview(out_dir: str, path: str, num: int = 6, scale: int = 2) -> str:
  """Saves a grid with one row per image (the first `num` of the validation split, else train) and
  writes it to `path`: (a) the LN trace, a colour per utterance (object-naming utterances thick, bright
  and labelled, other words thin and muted), (b) the referring boxes (visible-mask xywh) with their
  first expression, (c) the panoptic PNG (a colour per segment) with category names; the caption below.
  Reads only the written files, so it also checks that they fit together."""
  from PIL import ImageFont
  import textwrap

  split = next(s for s in ("validation", "train", "test") if os.listdir(os.path.join(out_dir, "images", s)))
  with open(os.path.join(out_dir, f"grounded_shapes_{split}_localized_narratives.jsonl")) as f:
    lns = [json.loads(line) for line in f][:num]
  with open(os.path.join(out_dir, "annotations", f"png_{split}.json")) as f:
    pngs = {r["image_id"]: r for r in json.load(f)}
  with open(os.path.join(out_dir, "annotations", f"panoptic_{split}.json")) as f:
    pan = json.load(f)
  cats = {c["id"]: c["name"] for c in pan["categories"]}
  pans = {a["image_id"]: a for a in pan["annotations"]}
  with open(os.path.join(out_dir, "grounded_shapes", "instances.json")) as f:
    anns = {a["id"]: a for a in json.load(f)["annotations"]}
  with open(os.path.join(out_dir, "grounded_shapes", "refs(unc).p"), "rb") as f:
    refs = pickle.load(f, encoding="latin1")
  font = ImageFont.load_default(size=7 * scale)
  bright = [(255, 0, 0), (0, 230, 255), (255, 0, 255), (255, 255, 0), (0, 255, 0), (255, 140, 0)]
  rows = []
  for ln in lns:
    iid = int(ln["image_id"])
    im = Image.open(os.path.join(out_dir, "images", split, f"{iid:012d}.jpg")).convert("RGB")
    w = im.width * scale
    im = im.resize((w, im.height * scale), Image.NEAREST)
    a, b = im.copy(), im.copy()
    c = np.asarray(Image.open(os.path.join(out_dir, "annotations", f"panoptic_{split}", f"{iid:012d}.png")))
    c = c.astype(np.int64) @ np.array([1, 256, 65536])
    seg_rgb = np.zeros(c.shape + (3,), np.uint8)  # black = void
    for j, s in enumerate(pans[iid]["segments_info"]):
      seg_rgb[c == s["id"]] = np.random.default_rng(s["id"]).integers(40, 256, 3)
    c = Image.fromarray(seg_rgb).resize(im.size, Image.NEAREST)
    pts = sorted((p for seg in ln["traces"] for p in seg), key=lambda p: p["t"])
    xy = np.array([[p["x"] * im.width, p["y"] * im.height] for p in pts])
    t = np.array([p["t"] for p in pts])
    nouns = [s["utterance"] for s in pngs[iid]["segments"] if s["noun"]]
    da, k = ImageDraw.Draw(a), 0
    for j, u in enumerate(ln["timed_caption"]):
      sel = xy[(t >= u["start_time"]) & (t <= u["end_time"])]
      if len(sel) < 2:
        continue
      if k < len(nouns) and u["utterance"] == nouns[k]:
        col = bright[k % len(bright)]
        da.line([tuple(p) for p in sel], fill=col, width=scale + 1)
        da.text(tuple(sel.mean(0) + [4, -4]), u["utterance"], fill=col, font=font, stroke_width=1,
                stroke_fill=0)
        k += 1
      else:
        da.line([tuple(p) for p in sel], fill=(90 + 40 * (j % 4), 90, 150 - 20 * (j % 4)), width=1)
    db = ImageDraw.Draw(b)
    for j, ref in enumerate(r for r in refs if r["image_id"] == iid):
      x, y, bw, bh = (v * scale for v in anns[ref["ann_id"]]["bbox"])
      col = bright[j % len(bright)]
      db.rectangle([x, y, x + bw - 1, y + bh - 1], outline=col, width=2)
      db.text((x + 2, y + 2), ref["sentences"][0]["sent"], fill=col, font=font, stroke_width=1, stroke_fill=0)
    dc = ImageDraw.Draw(c)
    for s in pans[iid]["segments_info"]:
      x, y, bw, bh = (v * scale for v in s["bbox"])
      dc.text((x + bw / 2, y + bh / 2), cats[s["category_id"]], fill=(255, 255, 255), font=font, anchor="mm",
              stroke_width=1, stroke_fill=0)
    lines = textwrap.wrap(ln["caption"], width=int(3 * w / (3.6 * scale)))
    row = Image.new("RGB", (3 * w, im.height + (len(lines) * 9 + 6) * scale), (255, 255, 255))
    for j, panel in enumerate((a, b, c)):
      row.paste(panel, (j * w, 0))
    ImageDraw.Draw(row).multiline_text((4, im.height + 3 * scale), "\n".join(lines), fill=0, font=font)
    rows.append(row)
  grid = Image.new("RGB", (rows[0].width, sum(r.height for r in rows)), (255, 255, 255))
  y = 0
  for r in rows:
    grid.paste(r, (0, y))
    y += r.height
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  grid.save(path)
  return path


def main(argv: list[str] | None = None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", required=True, help="output directory (the builders' manual_dir)")
  ap.add_argument("--num_train", type=int, default=2000)
  ap.add_argument("--num_validation", type=int, default=200)
  ap.add_argument("--num_test", type=int, default=200)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--size", type=int, default=256, help="image side in pixels")
  ap.add_argument("--max_shapes", type=int, default=5, help="2-5 shapes per scene")
  ap.add_argument("--scale", type=float, default=1.0, help="shape radii x this (0.5-2.0)")
  ap.add_argument("--colours", type=int, default=len(PALETTE), help="colours used (first of PALETTE)")
  ap.add_argument("--workers", type=int, default=None, help="processes (default min(2, CPUs))")
  ap.add_argument("--preview", default=None, help="also save a preview grid PNG here")
  args = ap.parse_args(argv)
  start = time.perf_counter()
  counts = generate(args.out, args.num_train, args.num_validation, args.num_test, seed=args.seed,
                    size=args.size, workers=args.workers, max_shapes=args.max_shapes,
                    scale=args.scale, colours=args.colours)
  print(json.dumps(counts), f"({time.perf_counter() - start:.1f} s)")
  if args.preview:
    print("preview:", preview(args.out, args.preview))
  return counts


if __name__ == "__main__":
  main()
