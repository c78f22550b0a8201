"""Visual Genome dense captioning (DenseCap / GRiT splits; SPEC.md section 5.6) as a TFDS builder.

Files under `manual_dir` (config `default`):

* `region_descriptions.json`: list of `{"id" (or "image_id"): int, "regions": [{"region_id", "x", "y",
  "width", "height", "phrase", "image_id"}]}`; x, y = top-left corner, width, height, all in pixels.
* `image_data.json`: list of `{"image_id" (or "id"), "width", "height", "url", ...}` (pixels).
* `densecap_splits.json`: `{"train": [image ids], "val": [...], "test": [...]}` (Johnson et al.'s split
  file; the TFDS splits are `train`, `validation`, `test`).
* `images/{image_id}.jpg`: the VG_100K and VG_100K_2 images in one folder.

One example per image:

* `image`: the image (uint8, (height, width, 3) when decoded).
* `id`: the Visual Genome image id (int64).
* `region_ids`: int64 (N,), the VG region ids, in file order.
* `boxes`: float32 (N, 4), pixel corners (x_min, y_min, x_max, y_max) of the stored image, clipped to
  [0, width] x [0, height] (x_max = x + width, y_max = y + height of the region).
* `bboxes`: the same boxes as a TFDS `BBoxFeature` sequence: (ymin, xmin, ymax, xmax) divided by the
  image height / width, in [0, 1].
* `phrases`: the N region descriptions (whitespace-stripped).

When `image_data.json` gives a size different from the image file's, the region coordinates (which are
in `image_data.json`'s frame) are scaled to the file's size.

Skipped and counted (`common.skipped_counts`): per image `missing_image`, `corrupt_image`, `no_regions`
(no entry in `region_descriptions.json`, or none of its regions is valid); per region (the region is
dropped, the image kept while regions remain) `nan_coordinate`, `zero_area_box` (zero or negative width
or height, also after clipping to the image), `empty_caption` (empty phrase) and `malformed_json`
(a region with missing or non-numeric fields).
"""

from __future__ import annotations

import json
import logging
import typing as tp

import numpy as np
import tensorflow_datasets as tfds

from tfds_builders import common

log = logging.getLogger("pixelground.tfds")

# TFDS split name -> key in densecap_splits.json
SPLITS = {"train": "train", "validation": "val", "test": "test"}


def _image_id(record: dict) -> tp.Any:
  return record.get("image_id", record.get("id"))


class VgDensecap(common.Builder):
  """Visual Genome region descriptions with the DenseCap train / val / test image splits."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(
      name="default", description="Visual Genome v1.2 region descriptions, DenseCap splits.")]
  DESCRIPTION = (
      "Visual Genome dense captions: every image with its region boxes and region descriptions, in "
      "the DenseCap splits (about 77k train / 5,000 val / 5,000 test images) that GRiT and "
      "PixelLLM evaluate dense captioning on.")
  HOMEPAGE = "https://homes.cs.washington.edu/~ranjay/visualgenome/"
  CITATION = """\
@article{krishna2017visualgenome,
  title   = {Visual Genome: Connecting Language and Vision Using Crowdsourced Dense Image Annotations},
  author  = {Krishna, Ranjay and Zhu, Yuke and Groth, Oliver and Johnson, Justin and Hata, Kenji and
             Kravitz, Joshua and Chen, Stephanie and Kalantidis, Yannis and Li, Li-Jia and Shamma,
             David A. and Bernstein, Michael S. and Fei-Fei, Li},
  journal = {International Journal of Computer Vision},
  volume  = {123},
  number  = {1},
  pages   = {32--73},
  year    = {2017}
}
@inproceedings{johnson2016densecap,
  title     = {{DenseCap}: Fully Convolutional Localization Networks for Dense Captioning},
  author    = {Johnson, Justin and Karpathy, Andrej and Fei-Fei, Li},
  booktitle = {Proceedings of the IEEE Conference on Computer Vision and Pattern Recognition (CVPR)},
  pages     = {4565--4574},
  year      = {2016}
}
"""
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Put in manual_dir (nothing is downloaded):
  region_descriptions.json  Visual Genome v1.2 region descriptions (region_descriptions.json.zip)
  image_data.json           Visual Genome image metadata (image_data.json.zip)
  densecap_splits.json      {"train": [ids], "val": [ids], "test": [ids]} from the DenseCap repository
                            (jcjohnson/densecap, info/densecap_splits.json)
  images/{image_id}.jpg     the images of images.zip and images2.zip (VG_100K, VG_100K_2) in one folder
from https://homes.cs.washington.edu/~ranjay/visualgenome/api.html."""

  def _features(self) -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)),
        "id": tfds.features.Scalar(np.int64),
        "region_ids": tfds.features.Tensor(shape=(None,), dtype=np.int64),
        "boxes": tfds.features.Tensor(shape=(None, 4), dtype=np.float32),
        "bboxes": tfds.features.Sequence(tfds.features.BBoxFeature()),
        "phrases": tfds.features.Sequence(tfds.features.Text()),
    })

  def _split_generators(self, dl_manager):
    regions_path = self.manual_file(dl_manager, "region_descriptions.json", "region descriptions")
    data_path = self.manual_file(dl_manager, "image_data.json", "image metadata")
    splits_path = self.manual_file(dl_manager, "densecap_splits.json", "DenseCap split file")
    images = self.manual_file(dl_manager, "images", "image folder")
    with splits_path.open() as f:
      split_ids = json.load(f)
    missing = [key for key in SPLITS.values() if key not in split_ids]
    if missing:
      raise ValueError(f"{self.name}: {splits_path} has no {missing} lists; it needs train, val, test")
    with data_path.open() as f:
      sizes = {int(_image_id(d)): (d.get("width"), d.get("height")) for d in json.load(f)}
    with regions_path.open() as f:
      regions = {int(_image_id(d)): d.get("regions") or [] for d in json.load(f)}
    return {split: self.counted(split, self._generate_examples(split, split_ids[key], regions, sizes,
                                                               images))
            for split, key in SPLITS.items()}

  def _regions(self, split: str, image_id: int, regions: list, scale: tuple[float, float],
               size: tuple[int, int]):
    """Valid regions of one image as (region ids, pixel xyxy boxes, normalised yxyx boxes, phrases)."""
    width, height = size
    ids, boxes, phrases = [], [], []
    for n, region in enumerate(regions):
      rid = region.get("region_id") if isinstance(region, dict) else None
      where = f"image {image_id} region " + (str(rid) if rid is not None else f"#{n} (no region_id)")
      try:
        x, y, w, h = (float(region[k]) for k in ("x", "y", "width", "height"))
        phrase = region["phrase"]
        region_id = int(region.get("region_id", -1))
      except (KeyError, TypeError, ValueError) as e:
        self.skip(split, "malformed_json", where, repr(e))
        continue
      if not isinstance(phrase, str):
        self.skip(split, "malformed_json", where, "phrase is not a string")
        continue
      bad = common.box_ok(x, y, w, h)
      if bad:
        self.skip(split, bad, where, f"xywh {(x, y, w, h)}")
        continue
      phrase = phrase.strip()
      if not phrase:
        self.skip(split, "empty_caption", where)
        continue
      sx, sy = scale
      x0, x1 = min(max(x * sx, 0.0), width), min(max((x + w) * sx, 0.0), width)
      y0, y1 = min(max(y * sy, 0.0), height), min(max((y + h) * sy, 0.0), height)
      if x1 <= x0 or y1 <= y0:
        self.skip(split, "zero_area_box", where, f"xywh {(x, y, w, h)} outside the {width}x{height} image")
        continue
      ids.append(region_id)
      boxes.append((x0, y0, x1, y1))
      phrases.append(phrase)
    return ids, boxes, phrases

  def _generate_examples(self, split: str, image_ids: list, regions: dict[int, list],
                         sizes: dict[int, tuple], images):
    for raw_id in image_ids:
      image_id = int(raw_id)
      where = f"image {image_id}"
      path = images / f"{image_id}.jpg"
      image, size, bad = common.image_from_file(path)
      if bad:
        self.skip(split, bad, where, str(path))
        continue
      if image_id not in regions:
        self.skip(split, "no_regions", where, "not in region_descriptions.json")
        continue
      width, height = size
      declared = sizes.get(image_id, (None, None))
      scale = (1.0, 1.0)
      if all(isinstance(v, (int, float)) and v > 0 for v in declared) and tuple(declared) != size:
        scale = (width / declared[0], height / declared[1])
        log.warning("%s: image %d is %dx%d, image_data.json says %sx%s: scaling its boxes", self.name,
                    image_id, width, height, *declared)
      ids, boxes, phrases = self._regions(split, image_id, regions[image_id], scale, size)
      if not boxes:
        self.skip(split, "no_regions", where, f"none of its {len(regions[image_id])} regions is valid")
        continue
      pixel = np.asarray(boxes, dtype=np.float64)
      normalised = [tfds.features.BBox(ymin=b[1] / height, xmin=b[0] / width, ymax=b[3] / height,
                                       xmax=b[2] / width) for b in pixel]
      yield image_id, {
          "image": image,
          "id": image_id,
          "region_ids": np.asarray(ids, dtype=np.int64),
          "boxes": pixel.astype(np.float32),
          "bboxes": normalised,
          "phrases": phrases,
      }
