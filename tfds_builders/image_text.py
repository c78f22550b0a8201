"""Web-scale image-text pairs (WebLI-like; SPEC.md section 5.8) as a TFDS builder.

Two raw layouts, one config each (files at the top of `manual_dir`):

* `webdataset`: `*.tar` shards. Members sharing a key (the member path up to the first dot of its file
  name, the webdataset rule) form one record: an image `KEY.jpg` / `.jpeg` / `.png` / `.webp` plus the
  text, either `KEY.txt` (UTF-8) or `KEY.json` with a `caption` (or `text`) field. A JSON member may
  also give `language` (or `lang`) and `score` (or `similarity`); with both `.txt` and `.json` the text
  comes from the `.txt`. Members of a record must be consecutive in the tar (as webdataset writes them).
* `parquet`: `*.parquet` tables with an `image` column (encoded image bytes, or a struct with a `bytes`
  field as Hugging Face `datasets` writes it) and a `text` column; optional `language`, `score`.

One split, `train`. Features: `image` (the encoded image), `text`, `key` (`"{shard}/{member key}"` for
tar shards, `"{table}/{row:09d}"` for parquet tables, the file name without its extension; unique),
`language` ("" when absent) and `score` (float32; -1 when absent or not finite).

Images are stored as given when they are JPEG or PNG in RGB or greyscale; anything else (WebP, palette,
RGBA, CMYK, 16-bit...) is decoded, converted to 8-bit RGB (alpha dropped) and stored as a lossless PNG,
so that every stored image decodes to uint8 (height, width, 3) pixels with or without TensorFlow.

Preparation runs in-process for small inputs and on Apache Beam for large ones (billions of pairs): the
constructor option `use_beam` (default: Beam exactly when the `DownloadConfig` names a `beam_runner` or
`beam_options`). With Beam, each shard / table is one element of a `PCollection` (redistributed with a
`Reshuffle`), read by a `FlatMap` that yields `(key, example)`; both paths share the same reading code
and produce identical datasets.

Skipped records: `missing_image` (no image member / null image), `corrupt_image` (does not decode),
`missing_text` (no text member / null text), `malformed_json` (JSON member that does not parse or has no
caption), `malformed_text` (text that is not UTF-8), `empty_caption`, `duplicate_key` (a key seen
earlier in the same shard), `corrupt_shard` (a tar or parquet file that fails to read; the records read
before the failure are kept) and `malformed_table` (a parquet file without `image` / `text` columns).
Without Beam they are counted through `common.Builder.skip`; with Beam through Beam metrics counters
(namespace `image_text`, counter name = skip kind), which `_process_pipeline_result` reads back from the
finished pipeline (committed values, attempted where the runner has none). Either way the counts end up
in `info.metadata["skipped"]["train"]` (stored in `metadata.json`; `common.skipped_counts(builder)`).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import tarfile
import typing as tp

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from tfds_builders import common

log = logging.getLogger("pixelground.tfds")

NAMESPACE = "image_text"  # Beam metrics namespace of the skip counters
SPLIT = "train"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
PARQUET_BATCH_ROWS = 256  # rows decoded at a time from a parquet table (bounds memory per worker)

# A callback taking (skip kind, where, detail).
SkipFn = tp.Callable[..., None]
KeyExample = tuple[str, dict[str, tp.Any]]

# -- reading one shard (shared by the in-process and the Beam paths) -----------------------------------

def _split_member(name: str) -> tuple[str, str]:
  """webdataset rule: key = directory + file name up to its first dot; extension = the rest, lowercased."""
  head, base = os.path.split(name)
  stem, _, ext = base.partition(".")
  return (f"{head}/{stem}" if head else stem), ext.lower()


def _score(value: tp.Any) -> float:
  """A finite float score, or -1 when absent / not a number / not finite."""
  try:
    v = float(value)
  except (TypeError, ValueError):
    return -1.0
  return v if math.isfinite(v) else -1.0


def _language(value: tp.Any) -> str:
  return value.strip() if isinstance(value, str) else ""


def _example(image: bytes, text: str, key: str, language: str, score: float) -> KeyExample:
  return key, {"image": image, "text": text, "key": key, "language": language,
               "score": np.float32(score)}


def _tar_record(shard: str, key: str, members: dict[str, bytes], skip: SkipFn
                ) -> KeyExample | None:
  """The example of one webdataset record (members by extension), or None after counting a skip."""
  where = f"{shard}:{key}"
  image = next((members[e] for e in IMAGE_EXTS if e in members), None)
  if image is None:
    skip("missing_image", where, f"members {sorted(members)}")
    return None
  meta: dict[str, tp.Any] = {}
  if "json" in members:
    try:
      meta = json.loads(members["json"].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      skip("malformed_json", where, str(e))
      return None
    if not isinstance(meta, dict):
      skip("malformed_json", where, "not a JSON object")
      return None
  if "txt" in members:
    try:
      text = members["txt"].decode("utf-8")
    except UnicodeDecodeError as e:
      skip("malformed_text", where, str(e))
      return None
  elif "json" in members:
    text = meta.get("caption", meta.get("text"))
    if not isinstance(text, str):
      skip("malformed_json", where, "no string 'caption' or 'text' field")
      return None
  else:
    skip("missing_text", where, f"members {sorted(members)}")
    return None
  text = text.strip()
  if not text:
    skip("empty_caption", where)
    return None
  stored, _, bad = common.image_from_bytes(image)
  if bad:
    skip(bad, where)
    return None
  return _example(stored, text, f"{shard}/{key}", _language(meta.get("language", meta.get("lang"))),
                  _score(meta.get("score", meta.get("similarity"))))


def _clean_end(path: str, offset: int) -> bool:
  """Whether the tar block at byte `offset` (where tarfile stopped reading) is the zero block that ends
  an archive. tarfile ends iteration silently at a truncated or garbled header; this tells them apart."""
  with epath.Path(path).open("rb") as f:
    f.seek(offset)
    block = f.read(tarfile.BLOCKSIZE)
  return len(block) == tarfile.BLOCKSIZE and not any(block)


def read_tar_shard(path: str, skip: SkipFn) -> tp.Iterator[KeyExample]:
  """Streams one webdataset tar shard: yields (key, example) per good record, calls `skip` per bad one.

  The shard (an uncompressed tar, local or any `epath` file system) is read sequentially, holding one
  record's members in memory. A shard that turns out truncated or garbled counts one `corrupt_shard`;
  the records completed before the damage are kept, the one being read is dropped.
  """
  shard = os.path.basename(path).rsplit(".", 1)[0]
  seen: set[str] = set()

  def record(key: str | None, members: dict[str, bytes]) -> KeyExample | None:
    if key is None:
      return None
    if key in seen:
      skip("duplicate_key", f"{shard}:{key}", "members of a record must be consecutive")
      return None
    seen.add(key)
    return _tar_record(shard, key, members, skip)

  current: str | None = None
  members: dict[str, bytes] = {}
  try:
    with epath.Path(path).open("rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
      for member in tar:
        if not member.isfile():
          continue
        key, ext = _split_member(member.name)
        if key != current:
          out = record(current, members)
          if out is not None:
            yield out
          current, members = key, {}
        if ext in IMAGE_EXTS or ext in ("txt", "json"):
          fobj = tar.extractfile(member)
          members[ext] = fobj.read() if fobj is not None else b""
      end = tar.offset
    if not _clean_end(path, end):
      raise tarfile.ReadError(f"no end-of-archive block at byte {end} (truncated or garbled header)")
  except (tarfile.TarError, OSError, EOFError) as e:
    skip("corrupt_shard", shard, f"{type(e).__name__}: {e}")
    return
  out = record(current, members)
  if out is not None:
    yield out


def _cell_bytes(value: tp.Any) -> bytes | None:
  """Image bytes from a parquet cell: bytes, or a struct (dict) with a `bytes` field."""
  if isinstance(value, dict):
    value = value.get("bytes")
  if isinstance(value, (bytes, bytearray, memoryview)):
    return bytes(value) or None
  return None


def read_parquet_table(path: str, skip: SkipFn) -> tp.Iterator[KeyExample]:
  """Reads one parquet table (local or any `epath` file system) in batches of `PARQUET_BATCH_ROWS` rows:
  yields (key, example) per good row, calls `skip` per bad one. Keys are `{table}/{row index:09d}` (row
  index from 0 over the file)."""
  table = os.path.basename(path).rsplit(".", 1)[0]
  with epath.Path(path).open("rb") as f:
    yield from _parquet_rows(f, table, skip)


def _parquet_rows(f, table: str, skip: SkipFn) -> tp.Iterator[KeyExample]:
  import pyarrow.parquet as pq

  try:
    pf = pq.ParquetFile(f)
    names = set(pf.schema_arrow.names)
  except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a broken file
    skip("corrupt_shard", table, f"{type(e).__name__}: {e}")
    return
  if not {"image", "text"} <= names:
    skip("malformed_table", table, f"needs 'image' and 'text' columns, has {sorted(names)}")
    return
  columns = ["image", "text"] + [c for c in ("language", "score") if c in names]
  row = 0
  try:
    for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns):
      cols = {c: batch.column(c).to_pylist() for c in columns}
      for i in range(batch.num_rows):
        where = f"{table}:row {row}"
        key = f"{table}/{row:09d}"
        row += 1
        image = _cell_bytes(cols["image"][i])
        if image is None:
          skip("missing_image", where)
          continue
        text = cols["text"][i]
        if isinstance(text, bytes):
          try:
            text = text.decode("utf-8")
          except UnicodeDecodeError as e:
            skip("malformed_text", where, str(e))
            continue
        if text is None:
          skip("missing_text", where)
          continue
        text = str(text).strip()
        if not text:
          skip("empty_caption", where)
          continue
        stored, _, bad = common.image_from_bytes(image)
        if bad:
          skip(bad, where)
          continue
        language = cols["language"][i] if "language" in cols else None
        score = cols["score"][i] if "score" in cols else None
        yield _example(stored, text, key, _language(language), _score(score))
  except Exception as e:  # a corrupt page / row group: keep what was read
    skip("corrupt_shard", table, f"{type(e).__name__} at row {row}: {e}")


READERS: dict[str, tp.Callable[[str, SkipFn], tp.Iterator[KeyExample]]] = {
    "webdataset": read_tar_shard,
    "parquet": read_parquet_table,
}
PATTERNS = {"webdataset": "*.tar", "parquet": "*.parquet"}

# -- Beam ---------------------------------------------------------------------------------------------

_beam_log = common.SkipCounter(f"{NAMESPACE}/{SPLIT} (beam worker)")  # logs the first skips per worker


def _beam_skip(kind: str, where: str, detail: str = "") -> None:
  import apache_beam as beam

  beam.metrics.Metrics.counter(NAMESPACE, kind).inc()
  _beam_log.skip(kind, where, detail)


def _beam_read(path: str, layout: str) -> tp.Iterator[KeyExample]:
  """FlatMap body: all (key, example) pairs of one shard / table (module level: pickled by reference)."""
  yield from READERS[layout](path, _beam_skip)


def beam_skip_counts(pipeline_result) -> dict[str, int]:
  """{kind: count} of the `image_text` skip counters of a finished Beam pipeline (committed values;
  attempted ones on runners that do not commit metrics)."""
  from apache_beam.metrics.metric import MetricsFilter

  counts: dict[str, int] = {}
  query = pipeline_result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))
  for c in query["counters"]:
    try:
      value = c.committed
    except Exception:  # some runners raise for committed metrics
      value = None
    if value is None:
      value = c.attempted
    counts[c.key.metric.name] = counts.get(c.key.metric.name, 0) + int(value or 0)
  return dict(sorted((k, v) for k, v in counts.items() if v))


# -- builder ------------------------------------------------------------------------------------------

class ImageText(common.Builder):
  """Image-text pairs from webdataset tar shards or parquet tables; in-process or on Apache Beam."""

  VERSION = tfds.core.Version("1.0.0")
  SUPPORTS_BEAM = True
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name="webdataset", description="webdataset *.tar shards (KEY.jpg + "
                              "KEY.txt or KEY.json)."),
      tfds.core.BuilderConfig(name="parquet", description="*.parquet tables with image bytes and "
                              "text columns."),
  ]
  DESCRIPTION = (
      "Web-scale image-text pairs in the layouts public WebLI-like corpora (LAION, COYO, DataComp...) "
      "ship in: webdataset tar shards or parquet tables of image bytes plus caption, with optional "
      "language and similarity score. One `train` split; `key` names the shard and record.")
  CITATION = """\
@inproceedings{schuhmann2022laion5b,
  title     = {{LAION-5B}: An open large-scale dataset for training next generation image-text models},
  author    = {Schuhmann, Christoph and Beaumont, Romain and Vencu, Richard and Gordon, Cade and
               Wightman, Ross and Cherti, Mehdi and Coombes, Theo and Katta, Aarush and Mullis, Clayton
               and Wortsman, Mitchell and Schramowski, Patrick and Kundurthy, Srivatsa and Crowson,
               Katherine and Schmidt, Ludwig and Kaczmarczyk, Robert and Jitsev, Jenia},
  booktitle = {Advances in Neural Information Processing Systems (NeurIPS), Datasets and Benchmarks
               Track},
  year      = {2022}
}
@inproceedings{chen2023pali,
  title     = {{PaLI}: A Jointly-Scaled Multilingual Language-Image Model},
  author    = {Chen, Xi and Wang, Xiao and Changpinyo, Soravit and Piergiovanni, AJ and Padlewski,
               Piotr and Salz, Daniel and Goodman, Sebastian and Grycner, Adam and Mustafa, Basil and
               Beyer, Lucas and Kolesnikov, Alexander and Puigcerver, Joan and Ding, Nan and Rong, Keran
               and Akbari, Hassan and Mishra, Gaurav and Xue, Linting and Thapliyal, Ashish and
               Bradbury, James and Kuo, Weicheng and Seyedhosseini, Mojtaba and Jia, Chao and Ayan,
               Burcu Karagol and Riquelme, Carlos and Steiner, Andreas and Angelova, Anelia and Zhai,
               Xiaohua and Houlsby, Neil and Soricut, Radu},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2023}
}
"""
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Put the shards at the top of manual_dir (nothing is downloaded):
  webdataset config: *.tar shards; each record = KEY.jpg (or .jpeg/.png/.webp) + KEY.txt, or KEY.json
    with "caption" (or "text") and optional "language", "score" (e.g. img2dataset --output_format
    webdataset).
  parquet config: *.parquet tables with columns image (bytes, or struct with a 'bytes' field), text,
    and optional language (string), score (float).
For billions of pairs build on Apache Beam: python -m tfds_builders.prepare --builder=image_text
--config=... --beam_runner=... --beam_options="..." (tfds_builders/README.md, "Preparing at scale")."""

  def __init__(self, *, use_beam: bool | None = None, **kwargs):
    """`use_beam`: True / False force the Beam / in-process path; None (default) uses Beam exactly when
    the DownloadConfig given to `download_and_prepare` has a `beam_runner` or `beam_options`."""
    super().__init__(**kwargs)
    self.use_beam = use_beam
    self._download_config: tfds.download.DownloadConfig | None = None

  def _features(self) -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)),
        "text": tfds.features.Text(),
        "key": tfds.features.Text(),
        "language": tfds.features.Text(),
        "score": tfds.features.Scalar(np.float32),
    })

  def _download_and_prepare(self, dl_manager, download_config):
    self._download_config = download_config  # read by `_beam_enabled`
    return super()._download_and_prepare(dl_manager, download_config)

  def _beam_enabled(self) -> bool:
    if self.use_beam is not None:
      return bool(self.use_beam)
    dc = self._download_config
    return dc is not None and (dc.beam_runner is not None or dc.beam_options is not None)

  def shard_paths(self, dl_manager) -> list[str]:
    """Sorted paths of the config's shards under manual_dir (ManualFileError when there are none)."""
    root = self.manual_root(dl_manager)
    pattern = PATTERNS[self.builder_config.name]
    paths = sorted(str(p) for p in root.glob(pattern))
    if not paths:
      raise common.ManualFileError(
          f"{self.name}: missing shards: no {pattern} files in {root}\n"
          f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    return paths

  def _split_generators(self, dl_manager):
    paths = self.shard_paths(dl_manager)
    layout = self.builder_config.name
    if self._beam_enabled():
      import apache_beam as beam

      log.info("%s/%s: reading %d shards on Apache Beam", self.name, layout, len(paths))
      return {SPLIT: (beam.Create(paths)
                      | "Redistribute" >> beam.Reshuffle()
                      | "ReadShards" >> beam.FlatMap(_beam_read, layout=layout))}
    return {SPLIT: self.counted(SPLIT, self._generate_examples(paths, layout))}

  def _generate_examples(self, paths: list[str], layout: str):
    skip = functools.partial(self.skip, SPLIT)
    for path in paths:
      yield from READERS[layout](path, skip)

  def _process_pipeline_result(self, pipeline_result) -> None:
    """After a Beam build: stores the skip counters as `info.metadata["skipped"]["train"]`."""
    if pipeline_result is None:
      return
    counts = beam_skip_counts(pipeline_result)
    skipped = dict(self.info.metadata.get("skipped", {}))
    skipped[SPLIT] = counts
    self.info.metadata["skipped"] = skipped
    total = sum(counts.values())
    log.info("%s/%s (beam): %s", self.name, SPLIT,
             f"skipped {total} records: " + ", ".join(f"{k}={v}" for k, v in counts.items())
             if total else "no records skipped")
