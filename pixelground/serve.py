r"""A web demo of a checkpoint: a Gradio app over `Predictor`, batched and streaming.

    python -m pixelground.serve --checkpoint=workdir/demo [--port=7860] [--host=127.0.0.1]
    make serve                                  # the demo checkpoint (trained first if missing)

Upload an image (or pick an example) and run a task: caption with a per-word trace, referring box +
mask, LISA chat with `[SEG]` masks (multi-turn: the history is part of the prompt), a region caption
from a clicked point or two clicked corners, dense captions; with a GELLA checkpoint narrative grounding
and panoptic segmentation (entities from an uploaded id map, else SAM's automatic masks), and automatic
masks where the checkpoint (or --sam) has SAM's decoder. Pictures are drawn as `pixelground.predict`
draws them; each grounded word is written in the colour of its mask; every answer shows its timings.

Serving: each browser session has its own state (chat history, clicks). Concurrent requests of the same
task are batched into one compiled call (up to the largest of --batch_sizes, waiting at most
--max_wait_ms for others); the batch is padded to the smallest batch bucket and every prompt to the
model's prompt length (chat: --chat_prompt_len), so the programs compiled at start-up ("warm-up", printed)
serve every later request without compiling again. Chat answers stream: the decoder runs --chunk
positions at a time and each `[SEG]`'s mask is shown as soon as the chunk that generated it returns.

Nothing is fetched from the internet (Gradio's analytics are off, no share link, fonts are local).
Library logs go to --log_dir/serve.INFO (default: a temporary directory, printed).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported anywhere

from absl import app, flags  # noqa: E402

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Workdir, checkpoints/ dir or checkpoints/<step>.")
_CONFIG = flags.DEFINE_string("config", None, "Training config (.py or config.json); default: the "
                              "workdir's config.json.")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0: every interface).")
_PORT = flags.DEFINE_integer("port", 7860, "Port to listen on.")
_SAM = flags.DEFINE_string("sam", None, "SAM checkpoint for automatic masks (default: the checkpoint's "
                           "SAM when it has SAM's own mask decoder).")
_CATEGORIES = flags.DEFINE_string("categories", None, "Panoptic categories JSON (default: the "
                                  "checkpoint's panoptic dataset).")
_EXAMPLES = flags.DEFINE_list("examples", [], "Example images: files or directories (default: three "
                              "generated grounded-shapes scenes, the demo's domain).")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "2", "4", "8"], "Batch buckets; the largest is "
                                 "the most requests per compiled call.")
_MAX_WAIT_MS = flags.DEFINE_float("max_wait_ms", 20.0, "How long a request waits for others to join "
                                  "its batch.")
_CHUNK = flags.DEFINE_integer("chunk", 4, "Chat: decoder positions per streamed chunk.")
_CHAT_PROMPT_LEN = flags.DEFINE_integer("chat_prompt_len", 48, "Chat: prompt tokens (history + "
                                        "question); older turns are dropped first.")
_MAX_LEN = flags.DEFINE_integer("max_len", 0, "Generated tokens per answer (0: the config's target "
                                "length).")
_WARM_UP = flags.DEFINE_bool("warm_up", True, "Compile every program before serving.")


def example_images(paths, out_dir: str, num: int = 3) -> list[str]:
  """Image files of `paths` (files or directories), or `num` generated grounded-shapes scenes."""
  out = []
  for p in paths:
    if os.path.isdir(p):
      out += sorted(os.path.join(p, f) for f in os.listdir(p)
                    if f.lower().endswith((".jpg", ".jpeg", ".png", ".webp", ".bmp")))
    elif os.path.isfile(p):
      out.append(p)
    else:
      raise FileNotFoundError(f"--examples: {p} does not exist")
  if out or paths:
    return out
  import numpy as np
  from PIL import Image

  from tfds_builders import grounded_shapes as gs
  rng = np.random.default_rng(0)
  os.makedirs(out_dir, exist_ok=True)
  for i in range(num):
    scene = gs.make_scene(rng, 256, max_shapes=3, scale=2.0, colours=4)
    path = os.path.join(out_dir, f"shapes_{i}.png")
    Image.fromarray(scene.image).save(path)
    out.append(path)
  return out


def header(checkpoint: str, step: int, engine) -> str:
  cfg = engine.pred.model.cfg
  ok = [t for t, why in engine.available.items() if why is None]
  return (f"Checkpoint `{checkpoint}` (step {step}), {cfg.image_size}-px model input · tasks: "
          f"{', '.join(ok)} · batches of up to {engine.pred.buckets.batch_sizes[-1]} "
          f"(buckets {', '.join(map(str, engine.pred.buckets.batch_sizes))}), chat streamed every "
          f"{engine.options.chunk} tokens.")


def start(checkpoint: str, *, config: str | None = None, sam: str | None = None,
          categories: str | None = None, options=None, examples=(), host: str = "127.0.0.1",
          port: int = 7860, warm_up: bool = True, say=print, block: bool = True,
          log_dir: str | None = None):
  """Loads the checkpoint, warms up and launches the app → (Gradio Blocks, engine, URL). With
  `block=False` (tests, benchmarks) the server runs in this process's threads. `log_dir`: library logs
  go to log_dir/serve.INFO."""
  import logging

  from pixelground.parallel import runtime
  from pixelground.inference.predictor import Predictor
  from pixelground.serving import app as app_lib
  from pixelground.serving import engine as engine_lib
  from pixelground.training import checkpointing

  engine_lib.compiles()  # start counting
  if log_dir:
    runtime.log_to_workdir(log_dir, "serve")
  t = time.perf_counter()
  pred = Predictor.from_checkpoint(checkpoint, config, sam_checkpoint=sam)
  _, step = checkpointing.find_checkpoint(checkpoint)
  cats = None
  if categories:
    import json

    from pixelground.inference import grounded
    with open(categories, encoding="utf-8") as f:
      cats = grounded.check_categories(json.load(f))
  engine = engine_lib.Engine(pred, options or engine_lib.ServeOptions(), categories=cats)
  say(f"loaded {checkpoint} (step {step}) in {time.perf_counter() - t:.1f} s")
  for task, why in engine.available.items():
    if why is not None:
      say(f"  {task}: not available — {why}")
  if warm_up:
    say("warming up (compiling every program once; later requests never compile)")
    secs = engine.warm_up(say=lambda m: say("  " + m))
    say(f"warm-up done in {secs:.1f} s ({engine_lib.compiles()} compilations)")
  demo = app_lib.build(engine, title="pixelground", examples=list(examples),
                       header=header(checkpoint, step, engine))
  demo.queue(default_concurrency_limit=None, max_size=256)
  allowed = sorted({os.path.dirname(os.path.abspath(e)) for e in examples})
  logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own start-up requests
  demo.launch(server_name=host, server_port=port, share=False, ssr_mode=False, show_error=True,
              quiet=True, prevent_thread_lock=not block, allowed_paths=allowed, css=app_lib.CSS,
              enable_monitoring=False)
  if log_dir:  # uvicorn's logging set-up closed the log file's handler: open it again
    runtime.log_to_workdir(log_dir, "serve")
  return demo, engine, f"http://{host}:{port}/"


def main(argv):
  del argv
  from pixelground.serving import engine as engine_lib

  if not _CHECKPOINT.value:
    print("error: --checkpoint is required", file=sys.stderr)
    return 2
  log_dir = flags.FLAGS.log_dir or tempfile.mkdtemp(prefix="pixelground_serve_")  # absl's flag
  os.makedirs(log_dir, exist_ok=True)
  try:
    sizes = tuple(sorted({int(b) for b in _BATCH_SIZES.value}))
    options = engine_lib.ServeOptions(batch_sizes=sizes, max_wait_s=_MAX_WAIT_MS.value / 1e3,
                                      chunk=_CHUNK.value, chat_prompt_len=_CHAT_PROMPT_LEN.value,
                                      max_len=_MAX_LEN.value)
    examples = example_images(_EXAMPLES.value, os.path.join(log_dir, "examples"))
    print(f"logs: {os.path.join(log_dir, 'serve.INFO')}")
    _, _, url = start(_CHECKPOINT.value, config=_CONFIG.value, sam=_SAM.value,
                      categories=_CATEGORIES.value, options=options, examples=examples,
                      host=_HOST.value, port=_PORT.value, warm_up=_WARM_UP.value,
                      say=lambda m: print(m, flush=True), block=False, log_dir=log_dir)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"serving on {url} (Ctrl-C stops)", flush=True)
  try:
    while True:
      time.sleep(3600)
  except KeyboardInterrupt:
    return 0


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
