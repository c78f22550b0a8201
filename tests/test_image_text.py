"""tfds_builders/image_text.py: webdataset and parquet layouts, in-process and Apache Beam builds give
identical datasets; bad records are skipped and counted by kind on both paths."""

import io
import json
import math
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tfds_builders import common
from tfds_builders.image_text import ImageText

apache_beam = pytest.importorskip("apache_beam")


def _pixels(seed: int, w: int, h: int, channels: int = 3) -> np.ndarray:
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:h, 0:w]
  base = np.stack([(xx * 7 + seed * 13) % 256, (yy * 5 + seed * 29) % 256, (xx + yy) % 256] +
                  [np.full((h, w), 200)] * (channels - 3), -1)
  return (base + rng.integers(0, 20, base.shape)).clip(0, 255).astype(np.uint8)


def _encode(arr: np.ndarray, fmt: str, **kw) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format=fmt, **kw)
  return buf.getvalue()


def _decoded(data: bytes) -> np.ndarray:
  """Independent expectation: the pixels PIL decodes, as 8-bit RGB."""
  with Image.open(io.BytesIO(data)) as im:
    return np.asarray(im.convert("RGB"))


CORRUPT = b"\xff\xd8\xff\xe0 definitely not a jpeg" + bytes(range(64))


def _write_tar(path, members):
  with tarfile.open(path, "w") as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


def _webdataset_fixture(root):
  """3 shards of 6 good pairs each plus bad records; returns ({key: expected}, expected skip counts)."""
  expected = {}
  shards = {f"{i:06d}": [] for i in range(3)}
  for s, (shard, members) in enumerate(shards.items()):
    for j in range(6):
      key = f"{s * 100 + j:06d}"
      arr = _pixels(s * 10 + j, 24 + 4 * j, 16 + 2 * s)
      text, language, score = f"caption {s}-{j}  ", "", -1.0
      if s == 0:  # .jpg + .txt
        img = _encode(arr, "JPEG", quality=90)
        members += [(f"{key}.jpg", img), (f"{key}.txt", text.encode())]
      elif s == 1:  # .json with caption, language, score; one RGBA PNG and one lossless WebP
        if j == 0:
          img = _encode(_pixels(77, 20, 18, channels=4), "PNG")
          name = f"{key}.png"
        elif j == 1:
          img = _encode(arr, "WEBP", lossless=True)
          name = f"{key}.webp"
        else:
          img = _encode(arr, "JPEG", quality=85)
          name = f"{key}.jpg"
        language, score = ["en", "de", "fr"][j % 3], 0.25 + j / 10
        members += [(name, img), (f"{key}.json", json.dumps(
            {"caption": text, "language": language, "score": score}).encode())]
      else:  # .txt + .json (language only), a json "text" field, a NaN score
        img = _encode(arr, "JPEG", quality=95)
        members.append((f"{key}.jpg", img))
        if j % 2:
          language = "ja"
          members += [(f"{key}.txt", text.encode()), (f"{key}.json", b'{"language": "ja"}')]
        else:
          members.append((f"{key}.json", b'{"text": "%s", "score": NaN}' % text.encode()))
      expected[f"{shard}/{key}"] = (text.strip(), language, score, _decoded(img))
  good = _encode(_pixels(99, 16, 16), "JPEG")
  shards["000000"] += [("bad1.jpg", CORRUPT), ("bad1.txt", b"corrupt image"),
                       ("bad2.jpg", good), ("bad2.txt", b"  \n")]
  shards["000001"] += [("bad3.jpg", good), ("bad3.json", b'{"caption": "unterminated'),
                       ("bad4.jpg", good), ("bad4.cls", b"3")]
  shards["000002"] += [("bad5.txt", b"text without an image")]
  for shard, members in shards.items():
    _write_tar(root / f"{shard}.tar", members)
  skips = {"corrupt_image": 1, "empty_caption": 1, "malformed_json": 1, "missing_text": 1,
           "missing_image": 1}
  return expected, skips


def _parquet_fixture(root):
  expected = {}
  images, texts, langs, scores = [], [], [], []
  for j in range(6):
    img = _encode(_pixels(200 + j, 20 + j, 12), "JPEG")
    text, lang, score = f"parquet caption {j}", ["en", None, "es"][j % 3], [0.5, None, float("nan")][j % 3]
    images.append(img), texts.append(text), langs.append(lang), scores.append(score)
    expected[f"part-00000/{j:09d}"] = (text, lang or "", 0.5 if j % 3 == 0 else -1.0, _decoded(img))
  images += [CORRUPT, _encode(_pixels(1, 8, 8), "PNG"), None]  # rows 6, 7, 8: bad
  texts += ["corrupt", "   ", "no image"]
  langs += [None] * 3
  scores += [None] * 3
  pq.write_table(pa.table({"image": pa.array(images, pa.binary()), "text": texts, "language": langs,
                           "score": pa.array(scores, pa.float64())}),
                 root / "part-00000.parquet", row_group_size=4)
  structs = []
  for j in range(3):  # Hugging Face `datasets` Image struct; a grey PNG
    img = _encode(_pixels(300 + j, 10, 10)[..., 0], "PNG")
    structs.append({"bytes": img, "path": f"{j}.png"})
    expected[f"part-00001/{j:09d}"] = (f"struct {j}", "", -1.0, _decoded(img))
  structs.append({"bytes": structs[0]["bytes"], "path": "3.png"})  # row 3: null text
  pq.write_table(pa.table({"image": structs, "text": [f"struct {j}" for j in range(3)] + [None]}),
                 root / "part-00001.parquet")
  skips = {"corrupt_image": 1, "empty_caption": 1, "missing_image": 1, "missing_text": 1}
  return expected, skips


def _read_all(builder):
  source = builder.as_data_source(split="train")
  return {ex["key"].decode(): ex for ex in (source[i] for i in range(len(source)))}


def _check(examples, expected):
  assert sorted(examples) == sorted(expected)
  for key, (text, language, score, pixels) in expected.items():
    ex = examples[key]
    assert ex["text"].decode() == text
    assert ex["language"].decode() == language
    assert ex["score"] == pytest.approx(score)
    assert ex["image"].dtype == np.uint8 and ex["image"].shape == pixels.shape
    np.testing.assert_array_equal(ex["image"], pixels)


def _assert_same(a, b):
  assert sorted(a) == sorted(b)
  for key in a:
    assert a[key].keys() == b[key].keys()
    for name in a[key]:
      np.testing.assert_array_equal(a[key][name], b[key][name], err_msg=f"{key}:{name}")


@pytest.mark.parametrize("config", ["webdataset", "parquet"])
def test_in_process_and_beam_builds_match(tmp_path, config):
  manual = tmp_path / "raw"
  manual.mkdir()
  expected, skips = (_webdataset_fixture if config == "webdataset" else _parquet_fixture)(manual)

  local = common.build(ImageText, tmp_path / "local", manual, config=config)
  beam = common.build(ImageText, tmp_path / "beam", manual, config=config,
                      beam_runner=apache_beam.runners.direct.DirectRunner())

  local_examples, beam_examples = _read_all(local), _read_all(beam)
  _check(local_examples, expected)
  _assert_same(local_examples, beam_examples)
  assert common.skipped_counts(local) == {"train": skips}
  assert common.skipped_counts(beam) == {"train": skips}
  # The counts are stored with the data: a fresh builder reads them back from metadata.json.
  reloaded = ImageText(data_dir=str(tmp_path / "beam"), config=config)
  assert common.skipped_counts(reloaded) == {"train": skips}


def test_use_beam_false_ignores_runner_and_missing_shards_error(tmp_path):
  manual = tmp_path / "raw"
  manual.mkdir()
  _parquet_fixture(manual)
  with pytest.raises(common.ManualFileError, match=r"\*\.tar"):
    common.build(ImageText, tmp_path / "out", manual, config="webdataset")
  built = common.build(ImageText, tmp_path / "out", manual, config="parquet", use_beam=False,
                       beam_runner=apache_beam.runners.direct.DirectRunner())
  assert built.info.splits["train"].num_examples == 9
  assert sum(common.skipped_counts(built)["train"].values()) == 4


def test_score_and_member_helpers():
  from tfds_builders import image_text

  assert image_text._score(None) == -1.0 and image_text._score(math.nan) == -1.0
  assert image_text._score("0.3") == pytest.approx(0.3)
  assert image_text._split_member("a/b/0001.jpg") == ("a/b/0001", "jpg")
  assert image_text._split_member("0001.seg.PNG") == ("0001", "seg.png")


def test_tar_reader_truncated_shard_and_duplicate_keys(tmp_path):
  from tfds_builders import image_text

  jpg = _encode(_pixels(5, 8, 8), "JPEG")
  members = [("a.jpg", jpg), ("a.txt", b"first"), ("b.jpg", jpg), ("b.txt", b"second"),
             ("a.txt", b"a again, not next to its image")]
  _write_tar(tmp_path / "s.tar", members)
  skips = []
  keys = [k for k, _ in image_text.read_tar_shard(str(tmp_path / "s.tar"),
                                                  lambda *a: skips.append(a[0]))]
  assert keys == ["s/a", "s/b"] and skips == ["duplicate_key"]

  data = (tmp_path / "s.tar").read_bytes()
  with tarfile.open(tmp_path / "s.tar") as tar:
    offsets = {m.name: (m.offset, m.offset_data) for m in tar.getmembers() if m.name.startswith("b")}
  # Cut inside b.jpg's data, inside b.txt's header, or garble b.txt's header: record a survives.
  damaged = [data[:offsets["b.jpg"][1] + 10], data[:offsets["b.txt"][0] + 100],
             data[:offsets["b.txt"][0]] + b"garbage" * 100 + data[offsets["b.txt"][0] + 700:]]
  for i, blob in enumerate(damaged):
    (tmp_path / f"t{i}.tar").write_bytes(blob)
    skips = []
    got = [k for k, _ in image_text.read_tar_shard(str(tmp_path / f"t{i}.tar"),
                                                   lambda *a: skips.append(a[0]))]
    assert got == ["t%d/a" % i] and skips == ["corrupt_shard"], i
