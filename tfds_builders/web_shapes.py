"""Web-style image–text shards from the grounded-shapes raw files: the `:runlocal` stand-in for WebLI.

Writes webdataset tar shards (the `image_text` builder's `webdataset` layout: `KEY.jpg` + `KEY.json`
with `caption`, `language`, `score`) of the generated train images with one of their COCO-style
captions each, spread over `num_shards` shards. Like real web data, a fixed share of the records
fails the pretraining filters (`Converters.web_caption`), so a run exercises and counts them: every
10th record is in German ("de"), every 10th (offset 3) has a low score (0.05), every 10th (offset 6)
has a one-word caption; the others are English with scores in [0.4, 1).

    write_shards(raw_dir, out_dir, num_shards=4)   # raw_dir: `grounded_shapes.generate`'s output
"""

from __future__ import annotations

import io
import json
import os
import tarfile

GERMAN = {"a": "ein", "the": "das", "red": "rotes", "green": "grünes", "blue": "blaues", "circle": "Kreis",
          "square": "Quadrat", "triangle": "Dreieck", "on": "auf", "and": "und", "of": "von"}


def _records(raw_dir: str, split: str):
  with open(os.path.join(raw_dir, "annotations", f"captions_{split}.json")) as f:
    data = json.load(f)
  first = {}
  for ann in data["annotations"]:
    first.setdefault(ann["image_id"], ann["caption"])
  for img in sorted(data["images"], key=lambda im: im["id"]):
    yield img, first[img["id"]]


def write_shards(raw_dir: str, out_dir: str, *, num_shards: int = 4, split: str = "train") -> dict:
  """Writes `out_dir/web-{k:05d}-of-{n:05d}.tar`; returns {"records", "shards", "planted": {reason: n}}."""
  os.makedirs(out_dir, exist_ok=True)
  records = list(_records(raw_dir, split))
  planted = {"language": 0, "low_score": 0, "caption_too_short": 0}
  tars = [tarfile.open(os.path.join(out_dir, f"web-{k:05d}-of-{num_shards:05d}.tar"), "w")
          for k in range(num_shards)]
  try:
    for i, (img, caption) in enumerate(records):
      meta = {"caption": caption, "language": "en", "score": round(0.4 + 0.6 * ((i * 37) % 100) / 100, 3)}
      if i % 10 == 0:
        meta.update(language="de", caption=" ".join(GERMAN.get(w, w) for w in caption.split()))
        planted["language"] += 1
      elif i % 10 == 3:
        meta["score"] = 0.05
        planted["low_score"] += 1
      elif i % 10 == 6:
        meta["caption"] = caption.split()[-1]
        planted["caption_too_short"] += 1
      key = f"{img['id']:09d}"
      with open(os.path.join(raw_dir, "images", split, img["file_name"]), "rb") as f:
        image = f.read()
      ext = os.path.splitext(img["file_name"])[1].lstrip(".").lower()
      tar = tars[i % num_shards]
      for name, data in ((f"{key}.{ext}", image), (f"{key}.json", json.dumps(meta).encode())):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
  finally:
    for t in tars:
      t.close()
  return {"records": len(records), "shards": num_shards, "planted": planted}
