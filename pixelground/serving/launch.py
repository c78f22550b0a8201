"""Starting the web demo: load a checkpoint, warm up, launch the Gradio app (`start`); example images.
`pixelground.serve` is the command line around it (its flags live there only: `pixelground.predict`
defines some of the same names); tests and benchmarks call `start` in-process."""

from __future__ import annotations

import os
import time

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported anywhere


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
