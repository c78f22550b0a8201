"""ReasonSeg (LISA's reasoning segmentation benchmark; SPEC.md section 5.7) as a TFDS builder.

Files under `manual_dir`:

* config `default` (LISA's `ReasonSeg` folder): `{train,val,test}/{name}.jpg` + `{name}.json`; TFDS
  splits `train`, `validation`, `test`.
* config `grounded_shapes`: `reasonseg/{train,validation,test}/{name}.jpg` + `{name}.json`.

Each JSON (labelme-style) holds `text` (list of queries), `is_sentence` (true: a long reasoning query,
false: a short phrase) and `shapes`: `[{"label": "target" | "ignore", "points": [[x, y], ...],
"shape_type": "polygon"}]`, vertices in pixels of the upright image (origin top-left).

One example per image:

* `image`: the image, upright (uint8, (height, width, 3) when decoded). An image with an EXIF orientation
  is rotated as LISA's `cv2.imread` and labelme show it, and stored as PNG.
* `name`: the file stem.
* `queries`: the non-empty queries, whitespace-stripped.
* `is_sentence`: bool.
* `target_mask`, `ignore_mask`: uint8 (height, width, 1) masks, 1 inside / 0 outside, PNG-encoded.

Rasterisation follows LISA's `get_mask_from_json`: shapes labelled "flag" are dropped; a label
containing "ignore" (case-insensitive) marks an ignore region, any other label a target; vertices are
truncated to integer pixels and each polygon is filled including its boundary pixels (PIL
`ImageDraw.polygon` with fill and outline, as cv2 `fillPoly` + `polylines` do); polygons are painted
in the order of `np.argsort(areas)[::-1]` (area = its own rasterised pixel count): largest first, so
a smaller polygon overrides the larger one it lies in, and polygons of equal area in reverse file
order, so the one earlier in the file wins where they overlap (a target and an ignore polygon of the
same area: the first listed decides). LISA's `np.argsort` is numpy's default (unstable) sort, which
keeps equal keys in order at the polygon counts ReasonSeg files hold; here the stable sort is used so
that this holds for any count. The two masks are therefore disjoint: `ignore_mask` is LISA's 255
label (excluded from scoring), `target_mask` its 1 label. `shape_type` "rectangle" (two opposite
corners) is filled as the box; a record with any other shape type is skipped (`unsupported_shape`).

Skipped and counted (`common.skipped_counts`): `missing_image`, `corrupt_image`, `missing_json` (an
image without its JSON), `malformed_json` (does not parse, or lacks / mistypes `text`, `is_sentence`,
`shapes` or a shape's `points`), `nan_coordinate` (a non-finite vertex), `empty_caption` (no non-empty
query), `unsupported_shape` (see above), `size_mismatch` (labelme's `imageWidth` / `imageHeight` differ
from the upright image) and `no_target` (no target polygon, or its pixels are all outside the image or
under ignore polygons).
"""

from __future__ import annotations

import io
import json
import typing as tp

import numpy as np
import tensorflow_datasets as tfds

from tfds_builders import common

# config -> (folder under manual_dir holding the split folders, {TFDS split: folder})
LAYOUTS = {
    "default": ("", {"train": "train", "validation": "val", "test": "test"}),
    "grounded_shapes": ("reasonseg", {"train": "train", "validation": "validation", "test": "test"}),
}
TARGET, IGNORE = 1, 2  # values of the combined label map


class _Bad(Exception):
  """A record to skip: args = (kind, detail)."""


def _parse(anno: tp.Any) -> tuple[list[str], bool, list[tuple[int, list[tuple[float, float]]]]]:
  """(queries, is_sentence, [(TARGET or IGNORE, vertices in pixels)]) of one JSON; raises _Bad."""
  if not isinstance(anno, dict):
    raise _Bad("malformed_json", "not a JSON object")
  text, is_sentence, shapes = anno.get("text"), anno.get("is_sentence"), anno.get("shapes")
  if isinstance(text, str):
    text = [text]
  if not isinstance(text, list) or not all(isinstance(q, str) for q in text):
    raise _Bad("malformed_json", "'text' is not a list of strings")
  if not (isinstance(is_sentence, (bool, int)) and is_sentence in (0, 1)):
    raise _Bad("malformed_json", "'is_sentence' is not a bool")
  if not isinstance(shapes, list):
    raise _Bad("malformed_json", "'shapes' is not a list")
  polygons = []
  for n, shape in enumerate(shapes):
    if not isinstance(shape, dict) or not isinstance(shape.get("label"), str):
      raise _Bad("malformed_json", f"shape {n} has no string 'label'")
    label = shape["label"].lower()
    if label == "flag":  # deprecated annotations, dropped by LISA too
      continue
    points = shape.get("points")
    try:
      vertices = [(float(p[0]), float(p[1])) for p in points]
      if not vertices or any(len(p) != 2 for p in points):
        raise ValueError("needs [[x, y], ...]")
    except (TypeError, ValueError, IndexError) as e:
      raise _Bad("malformed_json", f"shape {n} points: {e}") from None
    if not common.finite(vertices):
      raise _Bad("nan_coordinate", f"shape {n}")
    shape_type = shape.get("shape_type") or "polygon"
    if shape_type == "rectangle" and len(vertices) == 2:
      (x0, y0), (x1, y1) = vertices
      vertices = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    elif shape_type != "polygon":
      raise _Bad("unsupported_shape", f"shape {n} has shape_type {shape_type!r}")
    polygons.append((IGNORE if "ignore" in label else TARGET, vertices))
  queries = [q.strip() for q in text if q.strip()]
  if not queries:
    raise _Bad("empty_caption", "no non-empty query in 'text'")
  if not any(value == TARGET for value, _ in polygons):
    raise _Bad("no_target", "no target polygon")
  return queries, bool(is_sentence), polygons


def rasterise(polygons: list[tuple[int, list[tuple[float, float]]]], width: int, height: int
              ) -> np.ndarray:
  """uint8 (height, width) label map: 0 background, TARGET / IGNORE where the polygons (pixel vertices)
  are, painted largest first and equal areas in reverse file order (LISA's rule; module docstring)."""
  from PIL import Image, ImageDraw

  def draw(canvas, vertices, value):
    xy = [(int(x), int(y)) for x, y in vertices]  # truncation toward zero, as np.int32(...) does
    d = ImageDraw.Draw(canvas)
    if len(xy) >= 3:
      d.polygon(xy, fill=value, outline=value)
    else:
      d.line(xy + xy[:1], fill=value)

  areas = []
  for _, vertices in polygons:
    alone = Image.new("L", (width, height), 0)
    draw(alone, vertices, 1)
    areas.append(int(np.count_nonzero(np.asarray(alone))))
  # LISA: np.argsort(area_list)[::-1] — ascending stable, reversed: equal areas in reverse file order.
  order = np.argsort(np.asarray(areas, np.int64), kind="stable")[::-1].tolist()
  canvas = Image.new("L", (width, height), 0)
  for i in order:
    draw(canvas, polygons[i][1], polygons[i][0])
  return np.asarray(canvas)


def _png(mask: np.ndarray) -> bytes:
  """A bool / 0-1 (height, width) mask as single-channel PNG bytes (values 0 and 1)."""
  from PIL import Image

  buf = io.BytesIO()
  Image.fromarray(mask.astype(np.uint8)).save(buf, format="PNG")
  return buf.getvalue()


class ReasonSeg(common.Builder):
  """LISA's ReasonSeg: images, implicit (reasoning) queries and target / ignore masks."""

  name = "reasonseg"
  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "First release.",
                   "1.1.0": "Polygons of equal area are painted in reverse file order, as LISA's "
                            "get_mask_from_json (the first listed wins); was file order."}
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name="default", description="LISA's ReasonSeg release "
                              "(train 239 / val 200 / test 779 images)."),
      tfds.core.BuilderConfig(name="grounded_shapes", description="ReasonSeg-format files written by "
                              "python -m tfds_builders.grounded_shapes."),
  ]
  DESCRIPTION = (
      "ReasonSeg (LISA): reasoning segmentation. Each image comes with implicit queries (long "
      "sentences or short phrases) whose answer is a region of the image, given as a target mask, plus "
      "an ignore mask of regions excluded from scoring.")
  HOMEPAGE = "https://github.com/dvlab-research/LISA"
  CITATION = """\
@inproceedings{lai2024lisa,
  title     = {{LISA}: Reasoning Segmentation via Large Language Model},
  author    = {Lai, Xin and Tian, Zhuotao and Chen, Yukang and Li, Yanwei and Yuan, Yuhui and Liu, Shu and
               Jia, Jiaya},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  pages     = {9579--9589},
  year      = {2024}
}
"""
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Put in manual_dir (nothing is downloaded):
  default config: the ReasonSeg release of LISA (https://github.com/dvlab-research/LISA, "ReasonSeg"
    link), unpacked so that manual_dir/{train,val,test}/ each hold {name}.jpg + {name}.json.
  grounded_shapes config: the output of python -m tfds_builders.grounded_shapes --out DIR, i.e.
    manual_dir/reasonseg/{train,validation,test}/ with {name}.jpg + {name}.json."""

  def _features(self) -> tfds.features.FeaturesDict:
    mask = lambda: tfds.features.Image(shape=(None, None, 1), encoding_format="png")  # noqa: E731
    return tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)),
        "name": tfds.features.Text(),
        "queries": tfds.features.Sequence(tfds.features.Text()),
        "is_sentence": tfds.features.Scalar(np.bool_),
        "target_mask": mask(),
        "ignore_mask": mask(),
    })

  def _split_generators(self, dl_manager):
    top, folders = LAYOUTS[self.builder_config.name]
    gens = {}
    rels = {split: (f"{top}/{folder}" if top else folder) for split, folder in folders.items()}
    present = self.present_splits(dl_manager, rels, "split folder")
    root = self.manual_root(dl_manager)
    present = [s for s in present if any((root / rels[s]).glob("*.json"))] or present
    for split, folder in folders.items():
      if split not in present:
        continue
      rel = rels[split]
      path = self.manual_file(dl_manager, rel, f"{split} folder ({{name}}.jpg + {{name}}.json files)")
      gens[split] = self.counted(split, self._generate_examples(split, path))
    return gens

  def _generate_examples(self, split: str, folder):
    stems = sorted({p.stem for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".json")})
    for name in stems:
      where = f"{folder.name}/{name}"
      image_path, json_path = folder / f"{name}.jpg", folder / f"{name}.json"
      if not json_path.exists():
        self.skip(split, "missing_json", where)
        continue
      try:
        try:
          anno = json.loads(json_path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
          raise _Bad("malformed_json", str(e)) from None
        queries, is_sentence, polygons = _parse(anno)
        image, size, bad = common.image_from_file(image_path, exif_transpose=True)
        if bad:
          raise _Bad(bad, str(image_path))
        width, height = size
        declared = (anno.get("imageWidth"), anno.get("imageHeight"))
        if all(isinstance(v, int) for v in declared) and declared != size:
          raise _Bad("size_mismatch", f"JSON says {declared[0]}x{declared[1]}, image is {width}x{height}")
        labels = rasterise(polygons, width, height)
        target = labels == TARGET
        if not target.any():
          raise _Bad("no_target", "the target polygons cover no pixel of the image")
      except _Bad as e:
        self.skip(split, e.args[0], where, e.args[1])
        continue
      yield name, {
          "image": image,
          "name": name,
          "queries": queries,
          "is_sentence": is_sentence,
          "target_mask": _png(target),
          "ignore_mask": _png(labels == IGNORE),
      }
