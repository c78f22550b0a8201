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

With `--task web`: the pretraining task instead (`Converters.web_caption` with the filters and the
uint8 images of `configs/webli_pretrain_t5xl.py`): 640×480 JPEGs with ~12-word alt-texts, a fifth of them
failing a filter (dropped and counted by the loader), JPEG decode → resize + 384 crop/pad → tokenise.
It also prints what the v5e:16x16 run needs: the config's analytic FLOPs per step (batch 4096 on 256
chips), the step time at 50 % MFU, the examples/s per host that demands (4 chips per host) and the
cores per host at the measured rate. Last line: JSON {"web_examples_per_s_per_core", ...}.

Run: .venv/bin/python bench/input_pipeline.py [--batches N] [--task ln|web]
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


# The pretraining task's settings (configs/webli_pretrain_t5xl.py): uint8 images, its filters.
WEB_CONFIG = tasks.TaskConfig(image_size=384, max_target_len=64, scale_range=(1.0, 1.0),
                              min_caption_tokens=3, max_caption_tokens=64, languages=("en",),
                              min_score=0.3, min_image_side=64)


def make_web_examples(n: int, seed: int = 0) -> list[dict]:
  """Like `make_examples`' images, with a 12-word alt-text, a language and a score; every 5th fails."""
  rng = np.random.default_rng(seed)
  out = []
  for i, ex in enumerate(make_examples(n, seed)):
    words = [WORDS[j] for j in rng.integers(0, len(WORDS), 12)]
    out.append({"jpeg": ex["jpeg"], "text": " ".join(words).encode(),
                "language": b"de" if i % 5 == 4 else b"en", "score": np.float32(rng.uniform(0.3, 1))})
  return out


class Convert:
  """Picklable converter (for worker processes): decode, then the task's converter (LN: normalised for
  both encoders on the host; web: uint8)."""

  def __init__(self, task: str = "ln"):
    self.task, self.conv = task, None

  def __call__(self, ex, rng):
    if self.conv is None:
      self.conv = tasks.Converters(CONFIG if self.task == "ln" else WEB_CONFIG, load_tokenizer("tiny"))
    image = Image.open(io.BytesIO(ex["jpeg"]))
    image.load()  # the JPEG decode
    if self.task == "web":
      return self.conv.web_caption({**ex, "image": np.asarray(image)}, rng)
    return self.conv.ln({**ex, "image": image}, rng)


def run(examples, workers: int, batches: int, batch_size: int = 16, task: str = "ln") -> float:
  """Examples/s (kept rows) of `batches` batches after 3 warm-up ones."""
  schema = tasks.task_schema(CONFIG if task == "ln" else WEB_CONFIG,
                             "ln" if task == "ln" else "web_caption")
  loader = pipeline.Loader([pipeline.Task(task, examples, Convert(task))], schema, batch_size=batch_size,
                           seed=0, num_workers=workers, worker_buffer_size=4,
                           drop_reasons=tasks.DROP_REASONS if task == "web" else ())
  it = iter(loader)
  for _ in range(3):  # warm-up: worker start, tokenizer load
    next(it)
  t = time.perf_counter()
  for _ in range(batches):
    next(it)
  return batches * batch_size / (time.perf_counter() - t)


def web_demand(chips: int = 256, chips_per_host: int = 4, peak: float = 197e12) -> dict:
  """What configs/webli_pretrain_t5xl.py needs per host on v5e:16x16 at 50 % MFU (analytic FLOPs)."""
  import jax

  from pixelground.config import schema
  from pixelground.parallel import sharding
  from pixelground.training import steps, train_state
  config = schema.parse(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs",
                                     "webli_pretrain_t5xl.py"))
  setup = train_state.build_setup(config, sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1},
                                                             devices=jax.devices()[:1]))
  batch = config.optimizer.batch_size
  flops = steps.StepFlops(config, setup, batch)("web")
  step_s = flops / chips / (0.5 * peak)
  return {"step_pflop": round(flops / 1e15, 2), "step_s_at_50pct_mfu": round(step_s, 3),
          "needed_examples_per_s_per_host": round(batch / step_s / (chips // chips_per_host), 1)}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--batches", type=int, default=20)
  parser.add_argument("--task", choices=("ln", "web"), default="ln")
  args = parser.parse_args()
  if args.task == "web":
    return main_web(args.batches)
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


def main_web(batches: int) -> None:
  examples = make_web_examples(64)
  print(f"{len(examples)} web examples (a fifth fail the language filter), JPEG "
        f"{len(examples[0]['jpeg']) / 1024:.0f} KiB each", flush=True)
  results = {}
  for workers in (0, 2):
    rate = run(examples, workers, batches, task="web")
    results[workers] = rate / max(1, workers)
    print(f"num_workers={workers}: {rate:.1f} kept examples/s = {results[workers]:.1f} per core", flush=True)
  per_core = max(results.values())
  need = web_demand()
  cores = need["needed_examples_per_s_per_host"] / per_core
  print(f"webli_pretrain_t5xl on v5e:16x16: {need['step_pflop']} PFLOP per step → "
        f"{need['step_s_at_50pct_mfu']} s at 50 % MFU → {need['needed_examples_per_s_per_host']} "
        f"examples/s per host (4 chips) → {cores:.1f} cores per host at {per_core:.0f}/core "
        f"(the config runs 16 Grain workers)", flush=True)
  print(json.dumps({"web_examples_per_s_per_core": round(per_core, 1), **need,
                    "cores_needed_per_host": round(cores, 1)}))


if __name__ == "__main__":
  main()
