"""Input-pipeline throughput on Localized-Narratives-style examples, per core, with 0 and 2 workers.

Each example is a 640×480 JPEG (encoded bytes, textured so it does not compress to nothing) with a
~60-word narrative and ~25 timed utterances with trace boxes. Per example the pipeline does what
training does: JPEG decode → random-ratio resize + 384×384 crop/pad → normalisation for both encoders
(ImageNet for SAM, CLIP for EVA02) → tokenise the narrative word by word → align every token to its
utterance's trace box (`pixelground.data.tasks.Converters.ln`), then batches of 16 are assembled by the
Grain loader.

Measured: examples/s with `num_workers=0` (conversion in the main process: 1 core) and `num_workers=2`
(2 worker processes: 2 cores); per core = rate / cores. Warm-up batches are excluded.
Last line: JSON {"ln_examples_per_s_per_core": max of the two, ...} (target ≥ 100).

Run: .venv/bin/python bench/input_pipeline.py [--batches N]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from pixelground.data import pipeline, tasks  # noqa: E402
from pixelground.data.tokenizer import load_tokenizer  # noqa: E402

WORDS = ("in this image we can see a person standing on the ground near a small dog and there is a "
         "large tree behind them on the left side there are some buildings and the sky is blue with "
         "clouds at the top right corner we can see a red car parked on the road").split()


def make_examples(n: int, seed: int = 0) -> list[dict]:
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    base = rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)
    img = Image.fromarray(base).resize((640, 480), Image.BILINEAR)
    noise = rng.integers(-12, 12, (480, 640, 3))
    arr = np.clip(np.asarray(img, np.int16) + noise, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    words = [WORDS[j] for j in rng.integers(0, len(WORDS), 60)]
    caption = " ".join(words).capitalize() + "."
    cuts = np.sort(rng.choice(np.arange(1, 60), 24, replace=False))
    utts = [" ".join(words[a:b]) for a, b in zip(np.r_[0, cuts], np.r_[cuts, 60])]
    boxes = np.sort(rng.uniform(0, 1, (len(utts), 2, 2)), axis=1).reshape(-1, 4)[:, [0, 2, 1, 3]]
    out.append({"jpeg": buf.getvalue(), "caption": caption.encode(),
                "utterances": {"text": [u.encode() for u in utts], "box": boxes.astype(np.float32),
                               "supervised": np.ones(len(utts), bool)}})
  return out


# Host-side normalisation for both encoders, as the pipeline specifies (the default config ships
# uint8 and normalises on device, which is cheaper on the host).
CONFIG = tasks.TaskConfig(image_size=384, host_normalize=("sam", "clip"))


class Convert:
  """Picklable converter (for worker processes): decode, then the LN converter, then normalise."""

  def __init__(self):
    self.conv = None

  def __call__(self, ex, rng):
    if self.conv is None:
      self.conv = tasks.Converters(CONFIG, load_tokenizer("tiny"))
    image = Image.open(io.BytesIO(ex["jpeg"]))
    image.load()  # the JPEG decode
    return self.conv.ln({**ex, "image": image}, rng)


def run(examples, workers: int, batches: int, batch_size: int = 16) -> float:
  schema = tasks.schema(CONFIG)
  for k in ("seg_masks", "entity_masks", "entity_valid", "association", "ignore_mask", "seg_valid",
            "seg_positions"):
    schema.pop(k)
  loader = pipeline.Loader([pipeline.Task("ln", examples, Convert())], schema, batch_size=batch_size,
                           seed=0, num_workers=workers, worker_buffer_size=4)
  it = iter(loader)
  for _ in range(3):  # warm-up: worker start, tokenizer load
    next(it)
  t = time.perf_counter()
  for _ in range(batches):
    next(it)
  return batches * batch_size / (time.perf_counter() - t)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--batches", type=int, default=20)
  args = parser.parse_args()
  examples = make_examples(64)
  print(f"{len(examples)} examples, JPEG {len(examples[0]['jpeg']) / 1024:.0f} KiB each", flush=True)
  results = {}
  for workers in (0, 2):
    rate = run(examples, workers, args.batches)
    cores = max(1, workers)
    results[workers] = rate / cores
    print(f"num_workers={workers}: {rate:.1f} examples/s = {rate / cores:.1f} per core", flush=True)
  print(json.dumps({"ln_examples_per_s_per_core": round(max(results.values()), 1),
                    "per_core_0_workers": round(results[0], 1),
                    "per_core_2_workers": round(results[2], 1)}))


if __name__ == "__main__":
  main()
