"""Localized Narratives (Pont-Tuset et al., ECCV 2020) as a TensorFlow-free TFDS builder.

Reads the official JSONL files (SPEC.md 5.1) plus the image folders from `manual_dir` (layout in
`tfds_builders/README.md`). Configs: `coco`, `open_images`, `flickr30k`, `ade20k`, `grounded_shapes`.

**One example = one narrative** (one image × one annotator, i.e. one JSONL line). An image with several
narratives appears in several examples that share `image/id`; training samples narratives, and the
caption evaluation groups references by `image/id`. (One example per image would need nested
variable-length sequences — utterances × narratives — which TFDS cannot store without TensorFlow.)

Per narrative: the image, `image/id`, `dataset_id`, `annotator_id`, `caption`, the whole mouse trace
(`trace`: (P, 3) float32 rows [x, y, t] — all segments joined and sorted by t, x/y normalised to the
image with origin top-left, NOT clipped, t in seconds), and per utterance of `timed_caption`
(SPEC 4.1):
  * `text`, `start_time`, `end_time` (seconds, the recording's clock);
  * `samples` (16, 2) [x, y]: the trace interpolated (piecewise linear in t over the whole sorted
    trace, clamped at its ends) at 16 times evenly spaced over [start_time, end_time], after clipping
    every trace point to [0, 1];
  * `box` (4,) [xmin, ymin, xmax, ymax] and `center` (2,) [x, y]: min/max and mean of the 16 samples,
    normalised to the image;
  * `supervised`: True when at least one trace point has start_time ≤ t ≤ end_time. Utterances spoken
    while the mouse recorded nothing are unsupervised: samples, box and centre are zeros;
  * `clipped`: True when a trace point inside the window lay outside [0, 1] and was clipped.
`num_clipped_points` counts clipped trace points over the whole narrative.

Bad records are skipped and counted by kind (stored in `metadata.json`): a line that is not JSON or lacks
a field (`malformed_json`), an empty caption (`empty_caption`), a NaN/inf trace or time value
(`nan_coordinate`), a missing or undecodable image (`missing_image` / `corrupt_image`).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import typing as tp

import numpy as np
import tensorflow_datasets as tfds

from tfds_builders import common

NUM_SAMPLES = 16

_CITATION = r"""
@inproceedings{PontTuset_eccv2020,
  author    = {Jordi Pont-Tuset and Jasper Uijlings and Soravit Changpinyo and Radu Soricut and
               Vittorio Ferrari},
  title     = {Connecting Vision and Language with Localized Narratives},
  booktitle = {ECCV},
  year      = {2020}
}
"""


@dataclasses.dataclass(frozen=True)
class _Source:
  """Where one config's files are: split → (JSONL glob patterns, image folder); image file name rule."""
  splits: dict[str, tuple[tuple[str, ...], str]]
  image_file: tp.Callable[[str], str]


_SOURCES = {
    "coco": _Source(
        {"train": (("coco_train_localized_narratives*.jsonl",), "train2017"),
         "validation": (("coco_val_localized_narratives*.jsonl",), "val2017")},
        lambda image_id: f"{int(image_id):012d}.jpg"),
    "open_images": _Source(
        {"train": (("open_images_train_v6_localized_narratives*.jsonl",
                    "open_images_train_localized_narratives*.jsonl"), "train"),
         "validation": (("open_images_validation_localized_narratives*.jsonl",), "validation"),
         "test": (("open_images_test_localized_narratives*.jsonl",), "test")},
        lambda image_id: f"{image_id}.jpg"),
    "flickr30k": _Source(
        {"train": (("flickr30k_train_localized_narratives*.jsonl",), "flickr30k-images"),
         "validation": (("flickr30k_val_localized_narratives*.jsonl",), "flickr30k-images"),
         "test": (("flickr30k_test_localized_narratives*.jsonl",), "flickr30k-images")},
        lambda image_id: f"{image_id}.jpg"),
    "ade20k": _Source(
        {"train": (("ade20k_train_localized_narratives*.jsonl",), "training"),
         "validation": (("ade20k_validation_localized_narratives*.jsonl",), "validation")},
        lambda image_id: f"{image_id}.jpg"),
    "grounded_shapes": _Source(
        {split: ((f"grounded_shapes_{split}_localized_narratives*.jsonl",), split)
         for split in ("train", "validation", "test")},
        lambda image_id: f"{int(image_id):012d}.jpg"),
}


class MalformedRecord(ValueError):
  """A narrative whose JSON lacks a field or has a wrongly typed one."""


def sorted_trace(traces: list) -> np.ndarray:
  """(P, 3) float64 [x, y, t]: all trace segments joined and sorted by t (stable)."""
  rows = [(float(p["x"]), float(p["y"]), float(p["t"])) for segment in traces for p in segment]
  if not rows:
    return np.zeros((0, 3), np.float64)
  pts = np.asarray(rows, np.float64)
  return pts[np.argsort(pts[:, 2], kind="stable")]


def utterance_targets(trace: np.ndarray, start: float, end: float) -> dict[str, np.ndarray | bool]:
  """SPEC 4.1 per-utterance targets from a sorted (P, 3) trace [x, y, t] (normalised, unclipped).

  Returns samples (16, 2), box (4,) [xmin, ymin, xmax, ymax], center (2,) [x, y] (all normalised and
  within [0, 1]), supervised, clipped. Unsupervised → zeros.
  """
  inside = (trace[:, 2] >= start) & (trace[:, 2] <= end) if len(trace) else np.zeros(0, bool)
  if not inside.any():
    return dict(samples=np.zeros((NUM_SAMPLES, 2), np.float32), box=np.zeros(4, np.float32),
                center=np.zeros(2, np.float32), supervised=False, clipped=False)
  xy = np.clip(trace[:, :2], 0.0, 1.0)
  clipped = bool(np.any(xy[inside] != trace[inside, :2]))
  times = np.linspace(start, end, NUM_SAMPLES)
  t = trace[:, 2]
  samples = np.stack([np.interp(times, t, xy[:, 0]), np.interp(times, t, xy[:, 1])], axis=-1)
  box = np.concatenate([samples.min(axis=0), samples.max(axis=0)])
  return dict(samples=samples.astype(np.float32), box=box.astype(np.float32),
              center=samples.mean(axis=0).astype(np.float32), supervised=True, clipped=clipped)


def parse_narrative(record: dict) -> dict[str, tp.Any]:
  """Validates one JSONL record and computes the per-utterance targets (no image access).

  Raises MalformedRecord (missing/wrongly typed field) or ValueError("nan") for NaN/inf values.
  """
  try:
    image_id = str(record["image_id"])
    dataset_id = str(record.get("dataset_id", ""))
    annotator_id = int(record.get("annotator_id", -1))
    caption = record["caption"]
    timed = record["timed_caption"]
    traces = record.get("traces") or []
    if not isinstance(caption, str) or not isinstance(timed, list) or not isinstance(traces, list):
      raise MalformedRecord("caption / timed_caption / traces have the wrong type")
    trace = sorted_trace(traces)
    utterances = [(str(u["utterance"]), float(u["start_time"]), float(u["end_time"])) for u in timed]
  except (KeyError, TypeError, AttributeError) as e:
    raise MalformedRecord(f"{type(e).__name__}: {e}") from None
  if not np.all(np.isfinite(trace)) or not all(math.isfinite(s) and math.isfinite(e)
                                                for _, s, e in utterances):
    raise ValueError("nan")
  utts = []
  for text, start, end in utterances:
    utts.append(dict(text=text, start_time=np.float32(start), end_time=np.float32(end),
                     **utterance_targets(trace, start, end)))
  n_clipped = int(np.sum(np.any((trace[:, :2] < 0) | (trace[:, :2] > 1), axis=-1))) if len(trace) else 0
  return dict(image_id=image_id, dataset_id=dataset_id, annotator_id=annotator_id, caption=caption,
              trace=trace.astype(np.float32).reshape(-1, 3), utterances=utts,
              num_clipped_points=n_clipped)


class LocalizedNarrativesConfig(tfds.core.BuilderConfig):
  pass


class LocalizedNarratives(common.Builder):
  """Localized Narratives: captions with a synchronised mouse trace per utterance."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Narrative-level examples with SPEC 4.1 per-utterance trace targets."}
  BUILDER_CONFIGS = [LocalizedNarrativesConfig(name=name, description=f"{name} narratives")
                     for name in _SOURCES]
  DESCRIPTION = __doc__
  CITATION = _CITATION
  HOMEPAGE = "https://google.github.io/localized-narratives/"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Put the official Localized Narratives JSONL files at the top of manual_dir and the images under "
      "manual_dir/images/<folder>/ (see tfds_builders/README.md: e.g. COCO images/train2017/"
      "000000000009.jpg; grounded shapes: python -m tfds_builders.grounded_shapes --out DIR).")

  def _features(self) -> tfds.features.FeaturesDict:
    f32 = np.float32
    return tfds.features.FeaturesDict({
        "image": tfds.features.Image(encoding_format="jpeg"),
        "image/id": tfds.features.Text(),
        "image/filename": tfds.features.Text(),
        "dataset_id": tfds.features.Text(),
        "annotator_id": tfds.features.Scalar(np.int64),
        "caption": tfds.features.Text(),
        "trace": tfds.features.Tensor(shape=(None, 3), dtype=f32),
        "num_clipped_points": tfds.features.Scalar(np.int32),
        "utterances": tfds.features.Sequence({
            "text": tfds.features.Text(),
            "start_time": tfds.features.Scalar(f32),
            "end_time": tfds.features.Scalar(f32),
            "samples": tfds.features.Tensor(shape=(NUM_SAMPLES, 2), dtype=f32),
            "box": tfds.features.Tensor(shape=(4,), dtype=f32),
            "center": tfds.features.Tensor(shape=(2,), dtype=f32),
            "supervised": tfds.features.Scalar(np.bool_),
            "clipped": tfds.features.Scalar(np.bool_),
        }),
    })

  def _split_generators(self, dl_manager):
    source = _SOURCES[self.builder_config.name]
    root = self.manual_root(dl_manager)
    generators = {}
    for split, (patterns, folder) in source.splits.items():
      files = sorted({f for p in patterns for f in glob.glob(os.path.join(str(root), p))})
      if not files:
        continue
      images = self.manual_file(dl_manager, os.path.join("images", folder),
                                f"image folder for split '{split}'")
      generators[split] = self.counted(split, self._generate_examples(split, files, str(images),
                                                                     source.image_file))
    if not generators:
      wanted = ", ".join(p for pats, _ in source.splits.values() for p in pats)
      raise common.ManualFileError(
          f"{self.name}/{self.builder_config.name}: no narrative JSONL files in {root} (looked for "
          f"{wanted}).\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    return generators

  def _generate_examples(self, split: str, files: list[str], image_dir: str,
                         image_file: tp.Callable[[str], str]):
    images: dict[str, tuple] = {}  # many narratives share an image: decode-check it once
    for path in files:
      with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
          where = f"{os.path.basename(path)}:{line_no}"
          if not line.strip():
            continue
          try:
            record = json.loads(line)
            if not isinstance(record, dict):
              raise MalformedRecord("not a JSON object")
            narrative = parse_narrative(record)
          except (json.JSONDecodeError, MalformedRecord) as e:
            self.skip(split, "malformed_json", where, str(e)[:200])
            continue
          except ValueError:
            self.skip(split, "nan_coordinate", where, "NaN/inf in trace or utterance times")
            continue
          if not narrative["caption"].strip():
            self.skip(split, "empty_caption", where)
            continue
          try:
            filename = image_file(narrative["image_id"])
          except ValueError:
            self.skip(split, "malformed_json", where, f"bad image_id {narrative['image_id']!r}")
            continue
          image_path = os.path.join(image_dir, filename)
          if image_path not in images:
            images[image_path] = common.image_from_file(image_path)
          image, _, bad = images[image_path]
          if bad is not None:
            self.skip(split, bad, where, image_path)
            continue
          yield where, {
              "image": image,
              "image/id": narrative["image_id"],
              "image/filename": filename,
              "dataset_id": narrative["dataset_id"],
              "annotator_id": narrative["annotator_id"],
              "caption": narrative["caption"],
              "trace": narrative["trace"],
              "num_clipped_points": narrative["num_clipped_points"],
              "utterances": narrative["utterances"],
          }
