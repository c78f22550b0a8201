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
Library logs go to --log_dir/serve.INFO (default: a temporary directory, printed). Compiled programs
are cached on disk as the trainer's are ($PIXELGROUND_CACHE/xla): a restart warms up much faster.
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


def main(argv):
  del argv
  from pixelground.serving import engine as engine_lib
  from pixelground.serving import launch

  if not _CHECKPOINT.value:
    print("error: --checkpoint is required", file=sys.stderr)
    return 2
  import jax

  from pixelground.training import datasets

  # Compiled programs are cached across runs, as the trainer's: a restart skips most of the warm-up.
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", os.path.join(datasets.cache_dir(), "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  log_dir = flags.FLAGS.log_dir or tempfile.mkdtemp(prefix="pixelground_serve_")  # absl's flag
  os.makedirs(log_dir, exist_ok=True)
  try:
    sizes = tuple(sorted({int(b) for b in _BATCH_SIZES.value}))
    options = engine_lib.ServeOptions(batch_sizes=sizes, max_wait_s=_MAX_WAIT_MS.value / 1e3,
                                      chunk=_CHUNK.value, chat_prompt_len=_CHAT_PROMPT_LEN.value,
                                      max_len=_MAX_LEN.value)
    examples = launch.example_images(_EXAMPLES.value, os.path.join(log_dir, "examples"))
    print(f"logs: {os.path.join(log_dir, 'serve.INFO')}")
    _, _, url = launch.start(_CHECKPOINT.value, config=_CONFIG.value, sam=_SAM.value,
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
