"""Panoptic Narrative Grounding (González et al., ICCV 2021) as a TensorFlow-free TFDS builder.

Raw files (SPEC.md 5.5): `png_coco_{train,val}2017.json` — a list of `{image_id, caption, segments:
[{utterance, noun, plural, segment_ids}]}` — joined with the COCO panoptic files of the same images
(`coco_panoptic` layout). Configs `2017` and `grounded_shapes` (`annotations/png_{split}.json` + the
grounded-shapes panoptic files); layout in `tfds_builders/README.md`.

One example per (image, narrative): everything `coco_panoptic` stores for the image (image, panoptic
PNG, segments), the `caption`, and per phrase `utterance`, `noun` (groundable), `plural`, `isthing`
(all its segments are things; False for stuff or mixed) and its segment ids. Variable-length lists
inside a sequence need TensorFlow, so the ids are one flat array with offsets: phrase i owns
`phrase_segment_ids[phrase_offsets[i]:phrase_offsets[i + 1]]` (`phrase_offsets` has P + 1 entries);
`phrase_segment_index` holds the same entries as indexes into `segments`. `phrase_masks()` turns an
example into the per-phrase union masks (P, H, W) bool. Non-noun phrases have no ids.

Bad records are skipped and counted: a phrase id absent from the image's panoptic segments or PNG
(`missing_segment`), an image without panoptic annotation (`missing_annotation`), malformed JSON
records, and everything `coco_panoptic` checks for the image itself.
"""

from __future__ import annotations

import json
import os
import typing as tp

import numpy as np
import tensorflow_datasets as tfds

from tfds_builders import coco_panoptic, common

_CITATION = r"""
@inproceedings{gonzalez2021panoptic,
  title     = {Panoptic Narrative Grounding},
  author    = {Gonz{\'a}lez, Cristina and Ayobi, Nicol{\'a}s and Hern{\'a}ndez, Isabela and
               Hern{\'a}ndez, Jos{\'e} and Pont-Tuset, Jordi and Arbel{\'a}ez, Pablo},
  booktitle = {ICCV},
  year      = {2021}
}
"""


def png_json(config: str, split: str) -> str:
  if config == "grounded_shapes":
    return f"annotations/png_{split}.json"
  return f"annotations/png_coco_{ {'train': 'train', 'validation': 'val'}[split] }2017.json"


def phrase_masks(example: dict[str, tp.Any]) -> np.ndarray:
  """(P, H, W) bool union mask of each phrase's segments, from a decoded example."""
  ids = coco_panoptic.segment_ids(np.asarray(example["panoptic"]))
  offsets = np.asarray(example["phrase_offsets"])
  flat = np.asarray(example["phrase_segment_ids"])
  return np.stack([np.isin(ids, flat[offsets[i]:offsets[i + 1]]) for i in range(len(offsets) - 1)]
                  ) if len(offsets) > 1 else np.zeros((0,) + ids.shape, bool)


class PanopticNarrativeGroundingConfig(tfds.core.BuilderConfig):
  pass


class PanopticNarrativeGrounding(common.Builder):
  """Panoptic Narrative Grounding: narratives whose noun phrases point at panoptic segments."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Narrative-level examples; phrase ids as flat array + offsets."}
  BUILDER_CONFIGS = [
      PanopticNarrativeGroundingConfig(name="2017", description="PNG on COCO panoptic 2017"),
      PanopticNarrativeGroundingConfig(name="grounded_shapes", description="grounded-shapes PNG")]
  DESCRIPTION = __doc__
  CITATION = _CITATION
  HOMEPAGE = "https://bcv-uniandes.github.io/panoptic-narrative-grounding/"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "manual_dir/annotations/png_coco_{train,val}2017.json plus the COCO panoptic files "
      "(coco_panoptic layout); grounded shapes: annotations/png_{split}.json. See "
      "tfds_builders/README.md.")

  def _features(self):
    return tfds.features.FeaturesDict({
        **coco_panoptic.panoptic_features(),
        "caption": tfds.features.Text(),
        "phrases": tfds.features.Sequence({
            "utterance": tfds.features.Text(),
            "noun": tfds.features.Scalar(np.bool_),
            "plural": tfds.features.Scalar(np.bool_),
            "isthing": tfds.features.Scalar(np.bool_),
        }),
        "phrase_offsets": tfds.features.Tensor(shape=(None,), dtype=np.int32),
        "phrase_segment_ids": tfds.features.Tensor(shape=(None,), dtype=np.int64),
        "phrase_segment_index": tfds.features.Tensor(shape=(None,), dtype=np.int32),
    })

  def _split_generators(self, dl_manager):
    config = self.builder_config.name
    root = self.manual_root(dl_manager)
    out = {}
    for split in coco_panoptic.SPLITS[config]:
      if not (root / png_json(config, split)).exists():
        continue
      narratives = self.manual_file(dl_manager, png_json(config, split), f"PNG JSON for '{split}'")
      index = coco_panoptic.open_panoptic(self, dl_manager, config, split)
      self.info.metadata["categories"] = index.category_metadata()
      out[split] = self.counted(split, self._generate_examples(split, str(narratives), index))
    if not out:
      wanted = ", ".join(str(root / png_json(config, s)) for s in coco_panoptic.SPLITS[config])
      raise common.ManualFileError(f"{self.name}/{config}: no narrative-grounding JSON found; expected "
                                   f"at least one of {wanted}\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    return out

  def _generate_examples(self, split: str, json_path: str, index: coco_panoptic.PanopticIndex):
    with open(json_path, encoding="utf-8") as f:
      records = json.load(f)
    name = os.path.basename(json_path)
    panoptic_cache: dict[int, tuple] = {}  # several narratives per image: validate it once
    for n, record in enumerate(records):
      where = f"{name}[{n}]"
      try:
        image_id = int(record["image_id"])
        caption = record["caption"]
        raw_phrases = [(str(p["utterance"]), bool(p["noun"]), bool(p.get("plural", False)),
                        [int(i) for i in (p.get("segment_ids") or [])]) for p in record["segments"]]
        if not isinstance(caption, str):
          raise TypeError("caption is not a string")
      except (KeyError, TypeError, ValueError) as e:
        self.skip(split, "malformed_json", where, f"{type(e).__name__}: {e}")
        continue
      if not caption.strip():
        self.skip(split, "empty_caption", where)
        continue
      if image_id not in index.annotations:
        self.skip(split, "missing_annotation", where, f"image {image_id} has no panoptic annotation")
        continue
      if image_id not in panoptic_cache:
        panoptic_cache[image_id] = index.example(image_id)
      example, kind, detail = panoptic_cache[image_id]
      if example is None:
        self.skip(split, kind, where, detail)
        continue
      seg_pos = {s["id"]: i for i, s in enumerate(example["segments"])}
      phrases, offsets, flat, flat_index = [], [0], [], []
      missing = None
      for utterance, noun, plural, ids in raw_phrases:
        ids = ids if noun else []
        bad = [i for i in ids if i not in seg_pos]
        if bad:
          missing = f"phrase {utterance!r}: segment ids {bad} not in image {image_id}"
          break
        things = [example["segments"][seg_pos[i]]["isthing"] for i in ids]
        phrases.append({"utterance": utterance, "noun": noun, "plural": plural,
                        "isthing": bool(things) and all(things)})
        flat.extend(ids)
        flat_index.extend(seg_pos[i] for i in ids)
        offsets.append(len(flat))
      if missing:
        self.skip(split, "missing_segment", where, missing)
        continue
      yield where, {
          **example,
          "caption": caption,
          "phrases": phrases,
          "phrase_offsets": np.asarray(offsets, np.int32),
          "phrase_segment_ids": np.asarray(flat, np.int64),
          "phrase_segment_index": np.asarray(flat_index, np.int32),
      }
