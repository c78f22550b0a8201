r"""Evaluates a checkpoint on every task of its config (the benchmarks' metrics; `pixelground.inference.eval_lib`).

    python -m pixelground.evaluate --config=configs/demo.py --checkpoint=workdir/demo \
        [--tasks=referring,reason_seg] [--split=validation] [--workdir=OUT] [--max_examples=N] \
        [--format=coco]

`--checkpoint` is a training workdir, its checkpoints/ directory or one step directory (checkpoints/1200);
the newest step is used unless a step is named. Decoding runs sharded over the mesh of `config.mesh`
and over hosts (the trainer's multi-host flags work here too). Writes, into `--workdir` (default: the
checkpoint's workdir):

  eval_[<split>_]<step>.json             the metrics {"<task>/<metric>": value}
  predictions_[<split>_]<step>.jsonl     one line per example: {"task", "index", ...prediction, ground truth}

and prints the metrics; the last line is the metrics as JSON. Panoptic tasks also get their COCO
panoptic results (PNG + JSON). `--format=coco` adds the official results formats of the other
benchmarks (COCO detection results for dense captioning, COCO caption results, each with its ground
truth in COCO format: `pixelground.inference.export`) for the official tools. `--config.eval.*`
overrides work as in training (batch_size, max_decode_len, dense_k, java_fallback, png_round_trip).
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from pixelground.parallel import runtime

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (get_config()).", lock_config=False)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Workdir, checkpoints/ dir or checkpoints/<step>.")
_TASKS = flags.DEFINE_list("tasks", None, "Task names of config.tasks (default: config.eval.tasks or all).")
_SPLIT = flags.DEFINE_string("split", None, "Split to evaluate (default: each task's eval_split, "
                             "else 'validation').")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (default: the checkpoint's workdir).")
_MAX = flags.DEFINE_integer("max_examples", None, "At most this many examples per task (0 = all).")
_BATCH = flags.DEFINE_integer("batch_size", None, "Global eval batch (default config.eval.batch_size).")
_FORMAT = flags.DEFINE_enum("format", "jsonl", ["jsonl", "coco"], "jsonl: metrics + predictions JSONL; "
                            "coco: also the official results files (pixelground.inference.export).")
flags.mark_flags_as_required(["config", "checkpoint"])


def output_dir(checkpoint: str) -> str:
  path = os.path.abspath(checkpoint.rstrip("/"))
  if os.path.basename(path).isdigit():
    path = os.path.dirname(path)
  return os.path.dirname(path) if os.path.basename(path) == "checkpoints" else path


def main(argv):
  del argv
  import jax

  from pixelground.config import schema
  from pixelground.data import tokenizer as tok_lib
  from pixelground.inference import eval_lib
  from pixelground.parallel import sharding
  from pixelground.training import checkpointing, datasets, train_state

  out = _WORKDIR.value or output_dir(_CHECKPOINT.value)
  os.makedirs(out, exist_ok=True)
  runtime.log_to_workdir(out, "evaluate")
  runtime.init_distributed()
  config = schema.parse(_CONFIG.value)
  datasets.prepare_data(config)
  tokenizer = tok_lib.load_tokenizer(config.tokenizer)
  mesh = sharding.make_mesh(config.mesh.axes())
  setup = train_state.build_setup(config, mesh)
  state, step = checkpointing.load_state(setup, _CHECKPOINT.value)
  opts = eval_lib.eval_options(config, tasks=_TASKS.value, max_examples=_MAX.value,
                               batch_size=_BATCH.value)
  evaluator = eval_lib.Evaluator(config, setup, tokenizer, options=opts, split=_SPLIT.value)
  split = _SPLIT.value or "eval_split"
  print(f"Evaluating step {step} on {evaluator.names} ({split}), mesh {dict(mesh.shape)}, "
        f"{jax.process_count()} process(es)", flush=True)
  metrics = evaluator.run(state, progress=True)
  if jax.process_index() == 0:
    tag = f"{_SPLIT.value}_{step}" if _SPLIT.value else str(step)
    evaluator.write(out, tag, {"step": step, **metrics})
    for k, v in metrics.items():
      print(f"  {k:32s} {v:.4f}" if isinstance(v, float) else f"  {k:32s} {v}")
    print(f"Wrote {out}/eval_{tag}.json and predictions_{tag}.jsonl", flush=True)
    if _FORMAT.value == "coco":
      from pixelground.inference import export
      for path in export.write_coco(out, tag, evaluator.records, evaluator.conv):
        print(f"Wrote {path}", flush=True)
    print(json.dumps({"step": step, **metrics}), flush=True)


if __name__ == "__main__":
  sys.exit(app.run(main))
