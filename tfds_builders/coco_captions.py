"""COCO captions (SPEC.md section 5.2) as a TensorFlow-free TFDS builder.

One example per image, with all its captions:

  image            the image (uint8, (height, width, 3)), stored as the original JPEG bytes
  image/id         the COCO image id
  image/filename   `file_name` from the annotation file
  captions         the captions (text, leading/trailing whitespace stripped), in caption-id order
  caption_ids      the annotation ids of `captions`, same order

Configs: `2017` (splits `train`, `val`: `annotations/captions_{train,val}2017.json`, images
`{train,val}2017/{file_name}`) and `grounded_shapes` (splits `train`, `validation`, `test`:
`annotations/captions_{split}.json`, images `images/{split}/{file_name}`). Keys are the image ids.

Bad records are skipped and counted (`common.skipped_counts`): an `images` or `annotations` entry
without the fields it needs ("malformed_json"), a caption for an image id the file does not list
("unknown_image"), an empty or whitespace-only caption ("empty_caption", one per caption), an image
left with no caption ("no_captions"), a duplicated image id ("duplicate_id"), and a missing or
undecodable image file ("missing_image" / "corrupt_image"). A file that is not JSON, or lacks the
`images` / `annotations` lists altogether, stops the build with an error naming it.
"""

from __future__ import annotations

import collections
import dataclasses
import os

import numpy as np
import tensorflow_datasets as tfds

from tfds_builders import common


@dataclasses.dataclass(eq=False)
class CaptionsConfig(tfds.core.BuilderConfig):
  """`splits`: (split name, annotation file, image folder), paths relative to manual_dir."""
  splits: tuple[tuple[str, str, str], ...] = ()


_CONFIGS = [
    CaptionsConfig(
        name="2017", description="COCO 2017 captions (train 118,287 / val 5,000 images).",
        splits=tuple((s, f"annotations/captions_{s}2017.json", f"{s}2017") for s in ("train", "val"))),
    CaptionsConfig(
        name="grounded_shapes", description="Grounded-shapes captions in the COCO captions format.",
        splits=tuple((s, f"annotations/captions_{s}.json", f"images/{s}")
                     for s in ("train", "validation", "test"))),
]


class CocoCaptions(common.Builder):
  """COCO captions, one example per image (see the module docstring)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = _CONFIGS
  HOMEPAGE = "https://cocodataset.org/#captions-2015"
  DESCRIPTION = ("COCO captions: about five human-written captions per image for the COCO images "
                 "(Chen et al., 2015). One example per image with all its captions.")
  CITATION = common.COCO_CITATION + r"""
@article{chen2015microsoft,
  title={Microsoft {COCO} Captions: Data Collection and Evaluation Server},
  author={Chen, Xinlei and Fang, Hao and Lin, Tsung-Yi and Vedantam, Ramakrishna and Gupta, Saurabh and
          Doll{\'a}r, Piotr and Zitnick, C. Lawrence},
  journal={arXiv preprint arXiv:1504.00325},
  year={2015}
}"""
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Nothing is downloaded. Put the official files under manual_dir:
  config 2017:  annotations/captions_train2017.json, annotations/captions_val2017.json (from
                annotations_trainval2017.zip) and the images train2017/{file_name}, val2017/{file_name}
                (train2017.zip, val2017.zip), all from https://cocodataset.org/#download
  config grounded_shapes: annotations/captions_{train,validation,test}.json and
                images/{train,validation,test}/{file_name}, as `python -m tfds_builders.grounded_shapes
                --out DIR` writes them (manual_dir=DIR).
"""

  def _features(self) -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({
        "image": tfds.features.Image(encoding_format="jpeg"),
        "image/id": np.int64,
        "image/filename": tfds.features.Text(),
        "captions": tfds.features.Sequence(tfds.features.Text()),
        "caption_ids": tfds.features.Sequence(np.int64),
    })

  def _split_generators(self, dl_manager):
    gens = {}
    present = self.present_splits(dl_manager, {s: a for s, a, _ in self.builder_config.splits},
                                  "captions file")
    for split, ann_rel, img_rel in self.builder_config.splits:
      if split not in present:
        continue
      ann_path = self.manual_file(dl_manager, ann_rel, f"{split} captions file")
      img_dir = self.manual_file(dl_manager, img_rel, f"{split} image folder")
      gens[split] = self.counted(split, self._generate_examples(split, ann_path, img_dir))
    return gens

  def _generate_examples(self, split: str, ann_path, img_dir):
    data = common.load_json(ann_path, "captions file")
    if not (isinstance(data, dict) and isinstance(data.get("images"), list)
            and isinstance(data.get("annotations"), list)):
      raise ValueError(f"captions file {ann_path}: expected a JSON object with 'images' and "
                       "'annotations' lists")
    name = os.path.basename(str(ann_path))

    images: dict[int, str] = {}
    for i, im in enumerate(data["images"]):
      if not (isinstance(im, dict) and isinstance(im.get("id"), int)
              and isinstance(im.get("file_name"), str) and im["file_name"]):
        self.skip(split, "malformed_json", f"{name} images[{i}]", "needs an integer id and a file_name")
      elif im["id"] in images:
        self.skip(split, "duplicate_id", f"{name} images[{i}]", f"image id {im['id']} listed twice")
      else:
        images[im["id"]] = im["file_name"]

    captions: dict[int, list[tuple[int, str]]] = collections.defaultdict(list)
    for i, ann in enumerate(data["annotations"]):
      if not (isinstance(ann, dict) and isinstance(ann.get("id"), int)
              and isinstance(ann.get("image_id"), int) and isinstance(ann.get("caption"), str)):
        self.skip(split, "malformed_json", f"{name} annotations[{i}]",
                  "needs integer id and image_id and a string caption")
      elif ann["image_id"] not in images:
        self.skip(split, "unknown_image", f"{name} annotation {ann['id']}",
                  f"image id {ann['image_id']} is not in 'images'")
      elif not ann["caption"].strip():
        self.skip(split, "empty_caption", f"{name} annotation {ann['id']}")
      else:
        captions[ann["image_id"]].append((ann["id"], ann["caption"].strip()))

    for image_id in sorted(images):
      file_name = images[image_id]
      if not captions.get(image_id):
        self.skip(split, "no_captions", f"{name} image {image_id}")
        continue
      image, _, kind = common.image_from_file(os.path.join(str(img_dir), file_name))
      if kind is not None:
        self.skip(split, kind, f"image {image_id}", os.path.join(str(img_dir), file_name))
        continue
      caps = sorted(captions[image_id])
      yield image_id, {
          "image": image,
          "image/id": image_id,
          "image/filename": file_name,
          "captions": [c for _, c in caps],
          "caption_ids": [i for i, _ in caps],
      }
