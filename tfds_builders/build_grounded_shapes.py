"""Generates the grounded-shapes raw files and builds every TFDS dataset that reads them.

    python -m tfds_builders.build_grounded_shapes --raw_dir /tmp/gs_raw --data_dir /tmp/gs_tfds \
        [--num_train 2000 --num_validation 200 --num_test 200 --seed 0 --size 256 --max_shapes 5 \
         --scale 1.0 --colours 8 --report report.json]

Step 1 writes the raw files (`tfds_builders.grounded_shapes.generate`), step 2 runs the real builders'
`grounded_shapes` configs on them (localized_narratives, coco_captions, coco_panoptic,
panoptic_narrative_grounding, refcoco, reasonseg), then writes web-style tar shards of the train images
(`web_shapes`) and builds `image_text`'s `webdataset` config on them — the same code paths as the real
datasets. Prints a
progress line per dataset with its time and example counts, then a JSON summary as the last line.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import time

# (module, class) of every builder with a grounded_shapes config.
BUILDERS = (
    ("localized_narratives", "LocalizedNarratives"),
    ("coco_captions", "CocoCaptions"),
    ("coco_panoptic", "CocoPanoptic"),
    ("panoptic_narrative_grounding", "PanopticNarrativeGrounding"),
    ("refcoco", "RefCoco"),
    ("reasonseg", "ReasonSeg"),
)


def build_all(raw_dir: str, data_dir: str, *, num_train: int, num_validation: int, num_test: int,
              seed: int = 0, size: int = 256, max_shapes: int = 5, scale: float = 1.0,
              colours: int = 8) -> dict:
  """Generates and builds; returns {"generate_s", "build_s": {name: s}, "examples": {name: {split: n}},
  "skipped": {name: {...}}, "total_s"}."""
  from tfds_builders import common, grounded_shapes

  t0 = time.perf_counter()
  counts = grounded_shapes.generate(raw_dir, num_train=num_train, num_validation=num_validation,
                                    num_test=num_test, seed=seed, size=size,
                                    max_shapes=max_shapes, scale=scale, colours=colours)
  report = {"generate_s": round(time.perf_counter() - t0, 2), "generated": counts, "build_s": {},
            "examples": {}, "skipped": {}}
  print(f"[{time.perf_counter() - t0:6.1f}s] generated raw files in {raw_dir}: {counts}", flush=True)
  for module, cls in BUILDERS:
    builder_cls = getattr(importlib.import_module(f"tfds_builders.{module}"), cls)
    t = time.perf_counter()
    builder = common.build(builder_cls, data_dir, raw_dir, config="grounded_shapes")
    report["build_s"][module] = round(time.perf_counter() - t, 2)
    report["examples"][module] = {s: builder.info.splits[s].num_examples for s in builder.info.splits}
    report["skipped"][module] = common.skipped_counts(builder)
    print(f"[{time.perf_counter() - t0:6.1f}s] built {module}: {report['examples'][module]} "
          f"({report['build_s'][module]} s)", flush=True)
  # Web-style tar shards of the train images (the pretraining configs' :runlocal data) → image_text.
  from tfds_builders import image_text, web_shapes
  t = time.perf_counter()
  web_dir = os.path.join(raw_dir, "web")
  files = max(1, min(4, num_train))  # 4 array_record files (file-level input shards), fewer for tiny builds
  if num_train:
    report["web_shards"] = web_shapes.write_shards(raw_dir, web_dir, num_shards=files)
    builder = common.build(image_text.ImageText, data_dir, web_dir, config="webdataset", num_shards=files)
    report["build_s"]["image_text"] = round(time.perf_counter() - t, 2)
    report["examples"]["image_text"] = {s: builder.info.splits[s].num_examples for s in builder.info.splits}
    report["skipped"]["image_text"] = common.skipped_counts(builder)
    print(f"[{time.perf_counter() - t0:6.1f}s] built image_text: {report['examples']['image_text']} "
          f"({report['build_s']['image_text']} s)", flush=True)
  report["total_s"] = round(time.perf_counter() - t0, 2)
  return report


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--raw_dir", required=True)
  parser.add_argument("--data_dir", required=True)
  parser.add_argument("--num_train", type=int, default=2000)
  parser.add_argument("--num_validation", type=int, default=200)
  parser.add_argument("--num_test", type=int, default=200)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--size", type=int, default=256, help="image side, pixels")
  parser.add_argument("--max_shapes", type=int, default=5)
  parser.add_argument("--scale", type=float, default=1.0, help="multiplies the shapes' radii")
  parser.add_argument("--colours", type=int, default=8)
  parser.add_argument("--report", default="", help="also write the JSON summary to this file")
  args = parser.parse_args()
  logging.basicConfig(level=logging.WARNING)
  report = build_all(args.raw_dir, args.data_dir, num_train=args.num_train,
                     num_validation=args.num_validation, num_test=args.num_test, seed=args.seed,
                     size=args.size, max_shapes=args.max_shapes, scale=args.scale, colours=args.colours)
  if args.report:
    with open(args.report, "w") as f:
      json.dump(report, f)
  print(json.dumps(report))


if __name__ == "__main__":
  main()
