"""Builds any of pixelground's TFDS datasets into a data_dir from the raw files in a manual_dir.

    python -m tfds_builders.prepare --builder=image_text --config=webdataset \
        --manual_dir=/data/raw/webli --data_dir=/data/tfds [--num_shards=4096] [--overwrite] \
        [--beam_runner=DirectRunner|DataflowRunner|FlinkRunner|SparkRunner|...] \
        [--beam_options="--flag=value --flag=value ..."]

Without `--beam_runner` / `--beam_options` the build runs in this process (`common.build`). With either,
builders that run on Apache Beam (`SUPPORTS_BEAM`: `image_text`) build on that runner; the options
string is split like a shell line and becomes Beam's `PipelineOptions` (so `--runner=...` there works
too). Distributed workers must import this package: pass `--setup_file=./setup.py` in `--beam_options`
(run from the repository root; Beam builds an sdist of it and installs it on every worker).
`tfds_builders/README.md`, "Preparing at scale", has the commands per runner.

Prints progress lines, then a one-line JSON summary as the last line: builder, config, runner,
data_dir, `examples` per split, `skipped` records per split and kind (the builder's own counts
in-process, Beam metrics counters on Beam; both stored in the dataset's metadata.json), `files` (the
array_record files written), `wall_s`, and `reused` (true when the dataset was already prepared there
and `--overwrite` was not given). A bad argument prints one line naming the flag and exits with 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import shlex
import sys
import time
import typing as tp

# Every builder by the name `config.tasks[*].dataset` uses ("name/config"): (module, class).
BUILDERS: dict[str, tuple[str, str]] = {
    "localized_narratives": ("tfds_builders.localized_narratives", "LocalizedNarratives"),
    "coco_captions": ("tfds_builders.coco_captions", "CocoCaptions"),
    "coco_panoptic": ("tfds_builders.coco_panoptic", "CocoPanoptic"),
    "panoptic_narrative_grounding": ("tfds_builders.panoptic_narrative_grounding",
                                     "PanopticNarrativeGrounding"),
    "refcoco": ("tfds_builders.refcoco", "RefCoco"),
    "reasonseg": ("tfds_builders.reasonseg", "ReasonSeg"),
    "vg_densecap": ("tfds_builders.vg_densecap", "VgDensecap"),
    "image_text": ("tfds_builders.image_text", "ImageText"),
}
RUNNER_EXAMPLES = "DirectRunner, DataflowRunner, FlinkRunner, SparkRunner, PrismRunner"


class UsageError(Exception):
  """A bad command-line argument: `flag` names it (None for argparse's own errors)."""

  def __init__(self, flag: str | None, message: str):
    super().__init__(f"{flag}: {message}" if flag else message)
    self.flag = flag


class _Parser(argparse.ArgumentParser):
  def error(self, message: str) -> tp.NoReturn:  # one line, no usage block
    raise UsageError(None, message)


def parse_args(argv: tp.Sequence[str] | None) -> argparse.Namespace:
  p = _Parser(prog="python -m tfds_builders.prepare", description=__doc__.split("\n")[0])
  p.add_argument("--builder", required=True, help=f"one of: {', '.join(BUILDERS)}")
  p.add_argument("--config", default=None, help="the builder's config (default: its first)")
  p.add_argument("--manual_dir", required=True, help="the raw files (tfds_builders/README.md)")
  p.add_argument("--data_dir", required=True, help="where the array_record dataset is written")
  p.add_argument("--num_shards", type=int, default=None,
                 help="array_record files per split (default: TFDS picks by size)")
  p.add_argument("--overwrite", action="store_true", help="rebuild a dataset already in data_dir")
  p.add_argument("--beam_runner", default=None,
                 help=f"build on Apache Beam with this runner ({RUNNER_EXAMPLES}, or a runner "
                      f"class's full name)")
  p.add_argument("--beam_options", default=None,
                 help='Beam pipeline options as one string, e.g. "--setup_file=./setup.py '
                      '--direct_num_workers=2"')
  return p.parse_args(argv)


def builder_class(args: argparse.Namespace):
  """The builder class and config name the flags ask for (UsageError naming the flag otherwise)."""
  if args.builder not in BUILDERS:
    raise UsageError("--builder", f"unknown builder {args.builder!r} (known: {', '.join(BUILDERS)})")
  module, cls = BUILDERS[args.builder]
  builder_cls = getattr(importlib.import_module(module), cls)
  configs = list(builder_cls.builder_configs)
  config = args.config if args.config is not None else (configs[0] if configs else None)
  if configs and config not in configs:
    raise UsageError("--config", f"builder {args.builder!r} has no config {config!r} "
                                 f"(has: {', '.join(configs)})")
  return builder_cls, config


def _beam_setup(args: argparse.Namespace, builder_cls) -> tuple[tp.Any, tp.Any, str]:
  """(runner, PipelineOptions, runner name) for a Beam build; (None, None, "in-process") without."""
  if args.beam_runner is None and args.beam_options is None:
    return None, None, "in-process"
  flag = "--beam_runner" if args.beam_runner is not None else "--beam_options"
  if not builder_cls.SUPPORTS_BEAM:
    raise UsageError(flag, f"builder {args.builder!r} builds in-process only (leave {flag} out; "
                           f"image_text builds on Beam)")
  try:
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
    from apache_beam.runners.runner import create_runner
  except ImportError:
    raise UsageError(flag, "apache_beam is not installed (pip install -e '.[beam]')") from None
  try:
    flags = shlex.split(args.beam_options or "")
  except ValueError as e:
    raise UsageError("--beam_options", f"cannot split {args.beam_options!r}: {e}") from None
  options = PipelineOptions(flags)
  beam_log = logging.getLogger("apache_beam.options.pipeline_options")
  level = beam_log.level
  beam_log.setLevel(logging.ERROR)  # its "Discarding unparseable args" warning: reported below
  try:
    known = options.get_all_options()
    unknown = sorted(set(options.get_all_options(retain_unknown_options=True)) - set(known))
  finally:
    beam_log.setLevel(level)
  if unknown:
    raise UsageError("--beam_options", "unknown Beam pipeline option(s): " +
                     ", ".join(f"--{u}" for u in unknown))
  in_options = options.view_as(StandardOptions).runner
  if args.beam_runner is not None and in_options and in_options != args.beam_runner:
    raise UsageError("--beam_runner", f"{args.beam_runner!r} differs from --runner={in_options} in "
                                      f"--beam_options")
  name = args.beam_runner or in_options or "DirectRunner"
  try:
    runner = create_runner(name)
  except ValueError:
    raise UsageError(flag if args.beam_runner is None else "--beam_runner",
                     f"unknown Beam runner {name!r} (e.g. {RUNNER_EXAMPLES})") from None
  except ImportError as e:
    raise UsageError("--beam_runner", f"runner {name!r} needs a Beam extra that is not installed "
                                      f"({e}; e.g. pip install 'apache-beam[gcp]')") from None
  # What `beam.Pipeline` checks (Dataflow: project, region, temp_location...), before any work.
  from apache_beam.options.pipeline_options_validator import PipelineOptionsValidator
  errors = PipelineOptionsValidator(options, runner).validate()
  if errors:
    raise UsageError("--beam_options", f"{name} needs: " + "; ".join(
        " ".join(e.split()) for e in errors))
  return runner, options, name


def prepare(args: argparse.Namespace, out: tp.TextIO = sys.stdout) -> dict:
  """Builds what the flags ask for; returns the summary (UsageError for bad flags)."""
  t0 = time.perf_counter()

  def progress(msg: str) -> None:
    print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", file=out, flush=True)

  if args.num_shards is not None and args.num_shards < 1:
    raise UsageError("--num_shards", f"must be at least 1 (got {args.num_shards})")
  if "://" not in args.manual_dir and not os.path.isdir(args.manual_dir):
    raise UsageError("--manual_dir", f"{args.manual_dir!r} is not a directory")
  builder_cls, config = builder_class(args)
  runner, options, runner_name = _beam_setup(args, builder_cls)
  from tfds_builders import common

  name = f"{args.builder}/{config}" if config else args.builder
  existing = builder_cls(data_dir=args.data_dir, config=config).data_path
  reused = existing.exists() and not args.overwrite
  if reused:
    progress(f"{name}: already prepared in {existing}: reusing it (--overwrite rebuilds it)")
  else:
    shown = f" (options: {args.beam_options})" if args.beam_options else ""
    progress(f"{name}: building from {args.manual_dir} into {args.data_dir} "
             f"{'in-process' if runner_name == 'in-process' else 'on Beam ' + runner_name}{shown}, "
             f"{args.num_shards or 'auto'} files per split")
  try:
    builder = common.build(builder_cls, args.data_dir, args.manual_dir, config=config,
                           beam_runner=runner, beam_options=options, num_shards=args.num_shards,
                           overwrite=args.overwrite)
  except common.ManualFileError as e:
    raise UsageError("--manual_dir", f"{str(e).splitlines()[0]} (layouts: tfds_builders/README.md)"
                     ) from None
  splits = builder.info.splits
  skipped = common.skipped_counts(builder)
  for split in splits:
    kinds = skipped.get(split, {})
    skips = (f"skipped {sum(kinds.values())} ("
             + ", ".join(f"{k}={v}" for k, v in sorted(kinds.items())) + ")") if kinds else "no skips"
    progress(f"{name}: {split}: {splits[split].num_examples} examples in {splits[split].num_shards} "
             f"files; {skips}")
  return {"builder": args.builder, "config": config, "runner": runner_name,
          "data_dir": str(builder.data_dir),
          "examples": {s: int(splits[s].num_examples) for s in splits},
          "skipped": skipped, "files": int(sum(splits[s].num_shards for s in splits)),
          "wall_s": round(time.perf_counter() - t0, 2), "reused": reused}


def main(argv: tp.Sequence[str] | None = None) -> int:
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  logging.getLogger("pixelground.tfds").setLevel(logging.INFO)
  try:
    summary = prepare(parse_args(argv))
  except UsageError as e:
    print(f"prepare: error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(summary), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
