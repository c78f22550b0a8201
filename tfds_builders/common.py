"""Shared pieces of pixelground's TFDS builders (TensorFlow-free: SPEC.md section 9).

* `Builder`: a `GeneratorBasedBuilder` base that writes `array_record`, builds `DatasetInfo` without the
  package-directory metadata files TFDS looks for, reads manual files from `manual_dir` with clear
  errors, and counts skipped bad records per split and kind. The counts are logged at the end of each
  split and stored with the dataset (`info.metadata["skipped"]`, in `metadata.json` next to the data).
* `SkipCounter`: the counting itself (also usable by Beam pipelines, which report through metrics).
* `check_image`: opens an image file and verifies it decodes, returning (width, height) or a reason.
* `build`: builds a dataset into `data_dir` from the raw files in `manual_dir` (what tests, the
  grounded-shapes script and users call; there is no `tfds` CLI without TensorFlow).

Bad records are skipped, never silently: every skip names its kind (one of `SKIP_KINDS` or a
builder-specific string), the file and the record, and the first few of each kind are logged in full.
"""

from __future__ import annotations

import collections
import io
import json
import logging
import math
import os
import typing as tp

import tensorflow_datasets as tfds
from etils import epath

log = logging.getLogger("pixelground.tfds")

# Common kinds of bad record (builders may add their own).
SKIP_KINDS = (
    "missing_image",      # the image file does not exist
    "corrupt_image",      # the image file does not decode
    "malformed_json",     # a JSONL line / JSON record that does not parse or lacks a required field
    "empty_caption",      # empty or whitespace-only text
    "nan_coordinate",     # NaN / inf in a box, point or trace
    "zero_area_box",      # a box with zero (or negative) width or height
    "missing_segment",    # a segment id listed in the JSON but absent from the panoptic PNG
)
_LOG_FIRST = 5

# Every builder over COCO images cites COCO itself.
COCO_CITATION = r"""@inproceedings{lin2014microsoft,
  title={Microsoft {COCO}: Common Objects in Context},
  author={Lin, Tsung-Yi and Maire, Michael and Belongie, Serge and Hays, James and Perona, Pietro and
          Ramanan, Deva and Doll{\'a}r, Piotr and Zitnick, C. Lawrence},
  booktitle={European Conference on Computer Vision (ECCV)},
  pages={740--755},
  year={2014}
}"""  # full log lines per kind; the rest are only counted


class ManualFileError(FileNotFoundError):
  """A raw file the builder needs is not in `manual_dir`."""


class SkipCounter:
  """Counts skipped records by kind, logging the first few of each kind in full."""

  def __init__(self, name: str):
    self.name = name
    self.counts: collections.Counter[str] = collections.Counter()

  def skip(self, kind: str, where: str, detail: str = "") -> None:
    self.counts[kind] += 1
    if self.counts[kind] <= _LOG_FIRST:
      log.warning("%s: skipped (%s) %s%s", self.name, kind, where, f": {detail}" if detail else "")
    elif self.counts[kind] == _LOG_FIRST + 1:
      log.warning("%s: further '%s' skips are counted, not logged", self.name, kind)

  def as_dict(self) -> dict[str, int]:
    return dict(sorted(self.counts.items()))

  def summary(self) -> str:
    total = sum(self.counts.values())
    if not total:
      return f"{self.name}: no records skipped"
    return f"{self.name}: skipped {total} records: " + ", ".join(
        f"{k}={v}" for k, v in sorted(self.counts.items()))


def check_image(path: str | os.PathLike) -> tuple[tuple[int, int] | None, str | None]:
  """((width, height), None) when `path` holds a decodable image, else (None, skip kind)."""
  from PIL import Image, UnidentifiedImageError

  if not os.path.isfile(path):
    return None, "missing_image"
  try:
    with Image.open(path) as im:
      im.load()  # a full decode: truncated files fail here, not at training time
      return im.size, None
  except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
    return None, "corrupt_image"


def finite(*values: tp.Any) -> bool:
  """True when every number in `values` (scalars or nested, possibly ragged, sequences) is finite."""
  def flat(v):
    if isinstance(v, (list, tuple)):
      for item in v:
        yield from flat(item)
    else:
      yield float(v)
  return all(math.isfinite(x) for x in flat(list(values)))


def load_json(path, what: str) -> tp.Any:
  """The parsed JSON file; a `ValueError` naming the file when it does not parse."""
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{what} {path} is not valid JSON: {e}") from None



def box_ok(x: float, y: float, w: float, h: float) -> str | None:
  """Skip kind for a bad xywh box, or None."""
  if not all(math.isfinite(float(v)) for v in (x, y, w, h)):
    return "nan_coordinate"
  if w <= 0 or h <= 0:
    return "zero_area_box"
  return None


class Builder(tfds.core.GeneratorBasedBuilder):
  """Base of pixelground's builders. Subclasses define VERSION, DESCRIPTION, CITATION,
  MANUAL_DOWNLOAD_INSTRUCTIONS, `_features()`, `_split_generators` and `_generate_examples`, and call
  `self.skip(...)` for bad records and `self.manual_file(...)` for raw files."""

  DESCRIPTION: str = ""
  CITATION: str = ""
  HOMEPAGE: str = ""
  SUPERVISED_KEYS = None
  SUPPORTS_BEAM = False  # True: `build(..., beam_runner=...)` prepares it on Apache Beam

  def __init__(self, *args, **kwargs):
    kwargs.setdefault("file_format", "array_record")
    super().__init__(*args, **kwargs)
    self._skips: dict[str, SkipCounter] = {}

  def _features(self) -> tfds.features.FeaturesDict:
    raise NotImplementedError

  def _info(self) -> tfds.core.DatasetInfo:
    # DatasetInfo directly: `dataset_info_from_configs` looks for README/CITATIONS files in a package
    # directory layout this project does not use.
    return tfds.core.DatasetInfo(
        builder=self, description=self.DESCRIPTION, citation=self.CITATION,
        homepage=self.HOMEPAGE or None, features=self._features(),
        supervised_keys=self.SUPERVISED_KEYS, metadata=tfds.core.MetadataDict())

  # -- manual files ----------------------------------------------------------------------------------
  def manual_root(self, dl_manager) -> epath.Path:
    try:
      root = dl_manager.manual_dir
    except AssertionError as e:  # TFDS asserts when the directory is missing or empty
      raise ManualFileError(f"{self.name}: {e}") from None
    if root is None or not os.path.isdir(str(root)):
      raise ManualFileError(
          f"{self.name}: manual_dir {str(root)!r} does not exist. Put the raw files there (or pass "
          f"manual_dir=...):\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    return epath.Path(root)

  def manual_file(self, dl_manager, relpath: str, what: str) -> epath.Path:
    """Path of a required raw file/folder under manual_dir; a clear error when it is missing."""
    path = self.manual_root(dl_manager) / relpath
    if not path.exists():
      raise ManualFileError(
          f"{self.name}: missing {what}: expected at {path}\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    return path

  def present_splits(self, dl_manager, wanted: dict[str, str], what: str) -> list[str]:
    """The splits whose file/folder (relative to manual_dir) exists — users often have only some
    splits; none at all → ManualFileError listing every expected path."""
    root = self.manual_root(dl_manager)
    present = [split for split, rel in wanted.items() if (root / rel).exists()]
    if not present:
      expected = ", ".join(str(root / rel) for rel in wanted.values())
      raise ManualFileError(f"{self.name}: no {what} found; expected at least one of: {expected}\n"
                            f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    return present

  # -- skipped records -------------------------------------------------------------------------------
  def skip(self, split: str, kind: str, where: str, detail: str = "") -> None:
    self._skips.setdefault(split, SkipCounter(f"{self.name}/{split}")).skip(kind, where, detail)

  def counted(self, split: str, examples: tp.Iterable[tuple[tp.Any, dict]]):
    """Wraps a split's example generator: at its end, logs the skip summary and stores the counts in
    the dataset metadata (`info.metadata["skipped"][split]`)."""
    counter = self._skips.setdefault(split, SkipCounter(f"{self.name}/{split}"))
    n = 0
    for key, example in examples:
      n += 1
      yield key, example
    log.info("%s (%d examples kept)", counter.summary(), n)
    skipped = dict(self.info.metadata.get("skipped", {}))
    skipped[split] = counter.as_dict()
    self.info.metadata["skipped"] = skipped


def skipped_counts(builder: tfds.core.DatasetBuilder) -> dict[str, dict[str, int]]:
  """The stored skip counts of a built dataset: {split: {kind: count}}."""
  return dict(builder.info.metadata.get("skipped", {})) if builder.info.metadata else {}


def build(builder_cls: type[tfds.core.DatasetBuilder], data_dir: str | os.PathLike,
          manual_dir: str | os.PathLike | None = None, *, config: str | None = None,
          beam_runner: tp.Any = None, beam_options: tp.Any = None, num_shards: int | None = None,
          overwrite: bool = False, **builder_kwargs) -> tfds.core.DatasetBuilder:
  """Builds `builder_cls` (optionally a named config) into `data_dir`; returns the prepared builder.
  `num_shards`: the number of array_record files per split (default: TFDS picks by size).
  `beam_runner` / `beam_options`: a Beam runner (instance or name) and `PipelineOptions`, for builders
  that run on Apache Beam (`SUPPORTS_BEAM`; the CLI is `python -m tfds_builders.prepare`).
  `overwrite`: rebuild a dataset already prepared in `data_dir` (by default it is reused as it is).

  Read it back with `builder.as_data_source(split=...)` (random access, for Grain).
  """
  kwargs = dict(data_dir=str(data_dir), **builder_kwargs)
  if config is not None:
    kwargs["config"] = config
  builder = builder_cls(**kwargs)
  mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if overwrite
          else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
  dl_config = tfds.download.DownloadConfig(
      manual_dir=None if manual_dir is None else str(manual_dir), beam_runner=beam_runner,
      beam_options=beam_options, num_shards=num_shards, download_mode=mode)
  builder.download_and_prepare(download_config=dl_config,
                               download_dir=os.path.join(str(data_dir), "downloads"))
  if overwrite:  # a builder made before the rebuild read the old dataset_info: read the new one
    builder = builder_cls(**kwargs)
  return builder


# -- images ------------------------------------------------------------------------------------------

_KEEP_FORMATS = ("JPEG", "MPO", "PNG")  # MPO: multi-picture JPEG from cameras; decodes as its first frame
_KEEP_MODES = ("RGB", "L")


def _store_bytes(im, raw: bytes | None, exif_transpose: bool) -> tuple[bytes, tuple[int, int]]:
  """(bytes to store, (width, height) in pixels) for the opened, loaded PIL image `im` encoded as `raw`."""
  from PIL import ImageOps

  rotate = exif_transpose and im.getexif().get(0x0112, 1) not in (0, 1)  # 0x0112: EXIF orientation
  if raw is not None and not rotate and im.format in _KEEP_FORMATS and im.mode in _KEEP_MODES:
    return raw, im.size
  if rotate:
    im = ImageOps.exif_transpose(im)
  if im.mode not in _KEEP_MODES:
    im = im.convert("RGB")
  buf = io.BytesIO()
  im.save(buf, format="PNG")
  return buf.getvalue(), im.size


def image_from_bytes(data: bytes, exif_transpose: bool = False
                     ) -> tuple[bytes | None, tuple[int, int] | None, str | None]:
  """Checks encoded image bytes for an `Image(shape=(None, None, 3))` feature.

  Returns (bytes to store, (width, height) in pixels, None), or (None, None, "corrupt_image") when the
  bytes do not fully decode. JPEG/PNG in RGB or greyscale are returned as given; anything else comes back
  as an RGB PNG. With `exif_transpose`, an image with an EXIF orientation other than "normal" is rotated
  upright (as image viewers and cv2.imread show it) and stored as PNG; the size is then the upright size.
  """
  from PIL import Image, UnidentifiedImageError

  try:
    with Image.open(io.BytesIO(data)) as im:
      im.load()  # a full decode: truncated data fails here
      out, size = _store_bytes(im, data, exif_transpose)
    return out, size, None
  except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
    return None, None, "corrupt_image"


def image_from_file(path: str | os.PathLike, exif_transpose: bool = False
                    ) -> tuple[bytes | str | None, tuple[int, int] | None, str | None]:
  """Like `image_from_bytes` for a file: (the path or re-encoded bytes, (width, height), None), or
  (None, None, "missing_image" / "corrupt_image"). The file is decoded once (`common.check_image`);
  it is only re-read when it has to be converted."""
  from PIL import Image

  size, kind = check_image(path)
  if kind is not None:
    return None, None, kind
  with Image.open(path) as im:  # header only: format, mode and EXIF
    ok = im.format in _KEEP_FORMATS and im.mode in _KEEP_MODES
    if ok and exif_transpose:
      ok = im.getexif().get(0x0112, 1) in (0, 1)
  if ok:
    return os.fspath(path), size, None
  return image_from_bytes(epath.Path(path).read_bytes(), exif_transpose)
