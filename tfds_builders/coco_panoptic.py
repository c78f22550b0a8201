"""COCO panoptic segmentation (Kirillov et al., CVPR 2019) as a TensorFlow-free TFDS builder.

Raw files (SPEC.md 5.3; layout in `tfds_builders/README.md`): `panoptic_{split}2017.json` with
`images`, `categories` (133: 80 things, 53 stuff) and `annotations` `{image_id, file_name, segments_info:
[{id, category_id, area, bbox [x, y, w, h] pixels, iscrowd}]}`, one PNG per image whose RGB pixels encode
the segment id as R + 256·G + 256²·B (0 = void), and the images. Configs `2017` and `grounded_shapes`.

One example per image: the image, `image/id`, the panoptic PNG stored losslessly as it is (`panoptic`,
(H, W, 3) uint8 — decode ids with `segment_ids()`), and per segment its id, `category_id` (COCO id),
`category` (index into the sorted category list, stored in `info.metadata["categories"]`), `isthing`,
`area` (pixels), `bbox_xywh` (pixels, float32 [x, y, w, h]), `bbox` (normalised, TFDS yxyx), `iscrowd`.

Every example is checked at build time: the PNG is decoded and each JSON segment id must occur in it.
Bad records are skipped and counted by kind: missing/corrupt image or PNG (`missing_image`,
`corrupt_image`, `missing_panoptic`), a JSON segment id absent from the PNG (`missing_segment`), NaN or
zero-area boxes (`nan_coordinate`, `zero_area_box`), a segment with an unknown category or an annotation
without its image entry (`malformed_json`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing as tp

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from tfds_builders import common

_CITATION = r"""
@inproceedings{kirillov2019panoptic,
  title     = {Panoptic Segmentation},
  author    = {Kirillov, Alexander and He, Kaiming and Girshick, Ross and Rother, Carsten and
               Doll{\'a}r, Piotr},
  booktitle = {CVPR},
  year      = {2019}
}
""" + common.COCO_CITATION


@dataclasses.dataclass(frozen=True)
class PanopticFiles:
  """Paths (relative to manual_dir) of one split's panoptic JSON, PNG folder and image folder."""
  json: str
  png_dir: str
  image_dir: str


def panoptic_files(config: str, split: str) -> PanopticFiles:
  """The manual-dir layout of `config` ("2017" or "grounded_shapes") for `split`."""
  if config == "grounded_shapes":
    return PanopticFiles(f"annotations/panoptic_{split}.json", f"annotations/panoptic_{split}",
                         f"images/{split}")
  short = {"train": "train", "validation": "val"}[split]
  return PanopticFiles(f"annotations/panoptic_{short}2017.json",
                       f"annotations/panoptic_{short}2017", f"{short}2017")


SPLITS = {"2017": ("train", "validation"), "grounded_shapes": ("train", "validation", "test")}


def segment_ids(panoptic: np.ndarray) -> np.ndarray:
  """(H, W, 3) uint8 panoptic PNG → (H, W) int64 segment ids (R + 256·G + 256²·B; 0 = void)."""
  p = panoptic.astype(np.int64)
  return p[..., 0] + 256 * p[..., 1] + 65536 * p[..., 2]


def segment_features() -> tfds.features.Sequence:
  return tfds.features.Sequence({
      "id": tfds.features.Scalar(np.int64),
      "category_id": tfds.features.Scalar(np.int64),
      "category": tfds.features.Scalar(np.int64),
      "isthing": tfds.features.Scalar(np.bool_),
      "area": tfds.features.Scalar(np.int64),
      "bbox_xywh": tfds.features.Tensor(shape=(4,), dtype=np.float32),
      "bbox": tfds.features.BBoxFeature(),
      "iscrowd": tfds.features.Scalar(np.bool_),
  })


class PanopticIndex:
  """One split's panoptic annotations, indexed by image id, with per-record validation."""

  def __init__(self, json_path: str, png_dir: str, image_dir: str):
    with open(json_path, encoding="utf-8") as f:
      data = json.load(f)
    self.json_path, self.png_dir, self.image_dir = json_path, png_dir, image_dir
    self.categories = sorted(data.get("categories", []), key=lambda c: c["id"])
    self.category_index = {c["id"]: i for i, c in enumerate(self.categories)}
    self.images = {im["id"]: im for im in data.get("images", [])}
    self.annotations = {a["image_id"]: a for a in data.get("annotations", [])}

  def category_metadata(self) -> list[dict[str, tp.Any]]:
    return [{k: c.get(k) for k in ("id", "name", "supercategory", "isthing")} for c in self.categories]

  def example(self, image_id: int) -> tuple[dict[str, tp.Any] | None, str | None, str]:
    """(example, None, where) or (None, skip kind, detail) for one image's panoptic record."""
    ann = self.annotations.get(image_id)
    image = self.images.get(image_id)
    if ann is None or image is None:
      return None, "malformed_json", f"image {image_id}: no {'annotation' if ann is None else 'image entry'}"
    image_path = os.path.join(self.image_dir, image["file_name"])
    image_value, size, bad = common.image_from_file(image_path)
    if bad:
      return None, bad, image_path
    png_path = os.path.join(self.png_dir, ann["file_name"])
    if not os.path.isfile(png_path):
      return None, "missing_panoptic", png_path
    try:
      with Image.open(png_path) as im:
        panoptic = np.asarray(im.convert("RGB"))
    except OSError:
      return None, "corrupt_image", png_path
    if panoptic.shape[:2] != (size[1], size[0]):
      return None, "corrupt_image", f"{png_path}: PNG {panoptic.shape[:2]} vs image {size[::-1]}"
    present = set(np.unique(segment_ids(panoptic)).tolist())
    width, height = size
    segments = []
    for seg in ann.get("segments_info", []):
      try:
        sid, cat = int(seg["id"]), int(seg["category_id"])
        x, y, w, h = (float(v) for v in seg["bbox"])
      except (KeyError, TypeError, ValueError) as e:
        return None, "malformed_json", f"image {image_id}: segment {seg}: {e}"
      kind = common.box_ok(x, y, w, h)
      if kind:
        return None, kind, f"image {image_id} segment {sid}: bbox {seg['bbox']}"
      if sid not in present:
        return None, "missing_segment", f"image {image_id}: segment {sid} not in {png_path}"
      if cat not in self.category_index:
        return None, "malformed_json", f"image {image_id}: unknown category {cat}"
      segments.append({
          "id": sid, "category_id": cat, "category": self.category_index[cat],
          "isthing": bool(self.categories[self.category_index[cat]].get("isthing", 0)),
          "area": int(seg.get("area", 0)),
          "bbox_xywh": np.asarray([x, y, w, h], np.float32),
          "bbox": tfds.features.BBox(ymin=max(0.0, y / height), xmin=max(0.0, x / width),
                                     ymax=min(1.0, (y + h) / height), xmax=min(1.0, (x + w) / width)),
          "iscrowd": bool(seg.get("iscrowd", 0)),
      })
    return {
        "image": image_value,
        "image/id": int(image_id),
        "image/filename": image["file_name"],
        "panoptic": png_path,
        "panoptic/filename": ann["file_name"],
        "segments": segments,
    }, None, ""


def panoptic_features() -> dict[str, tp.Any]:
  return {
      "image": tfds.features.Image(encoding_format="jpeg"),
      "image/id": tfds.features.Scalar(np.int64),
      "image/filename": tfds.features.Text(),
      "panoptic": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
      "panoptic/filename": tfds.features.Text(),
      "segments": segment_features(),
  }


def available_splits(builder: common.Builder, dl_manager, config: str) -> list[str]:
  """Splits whose panoptic JSON is present (any subset is fine); none → ManualFileError."""
  root = builder.manual_root(dl_manager)
  splits = [s for s in SPLITS[config] if (root / panoptic_files(config, s).json).exists()]
  if not splits:
    wanted = ", ".join(str(root / panoptic_files(config, s).json) for s in SPLITS[config])
    raise common.ManualFileError(f"{builder.name}/{config}: no panoptic JSON found; expected at "
                                 f"least one of {wanted}\n{builder.MANUAL_DOWNLOAD_INSTRUCTIONS}")
  return splits


def open_panoptic(builder: common.Builder, dl_manager, config: str, split: str) -> PanopticIndex:
  files = panoptic_files(config, split)
  return PanopticIndex(
      str(builder.manual_file(dl_manager, files.json, f"panoptic JSON for split '{split}'")),
      str(builder.manual_file(dl_manager, files.png_dir, f"panoptic PNG folder for split '{split}'")),
      str(builder.manual_file(dl_manager, files.image_dir, f"image folder for split '{split}'")))


class CocoPanopticConfig(tfds.core.BuilderConfig):
  pass


class CocoPanoptic(common.Builder):
  """COCO panoptic: images, panoptic segment-id PNGs and segment metadata."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Image-level examples; PNG stored losslessly; build-time id checks."}
  BUILDER_CONFIGS = [CocoPanopticConfig(name="2017", description="COCO panoptic 2017 (train/val)"),
                     CocoPanopticConfig(name="grounded_shapes",
                                        description="grounded-shapes panoptic files")]
  DESCRIPTION = __doc__
  CITATION = _CITATION
  HOMEPAGE = "https://cocodataset.org/#panoptic-2018"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "manual_dir/annotations/panoptic_{train,val}2017.json, the PNG folders "
      "manual_dir/annotations/panoptic_{train,val}2017/ and the images manual_dir/{train,val}2017/ "
      "(grounded shapes: annotations/panoptic_{split}.json, annotations/panoptic_{split}/, "
      "images/{split}/). See tfds_builders/README.md.")

  def _features(self):
    return tfds.features.FeaturesDict(panoptic_features())

  def _split_generators(self, dl_manager):
    config = self.builder_config.name
    out = {}
    for split in available_splits(self, dl_manager, config):
      index = open_panoptic(self, dl_manager, config, split)
      self.info.metadata["categories"] = index.category_metadata()
      out[split] = self.counted(split, self._generate_examples(split, index))
    return out

  def _generate_examples(self, split: str, index: PanopticIndex):
    for image_id in sorted(index.annotations):
      example, kind, detail = index.example(image_id)
      if example is None:
        self.skip(split, kind, f"{os.path.basename(index.json_path)} image {image_id}", detail)
        continue
      yield int(image_id), example
