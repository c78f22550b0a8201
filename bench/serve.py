"""The web demo under load: 20 concurrent requests over loopback HTTP (the Gradio protocol, as a browser
sends them), batched vs one at a time, in the same run on the same warmed-up server.

The server (`pixelground.serve`, in this process) runs a checkpoint (default: configs/demo.py with
random weights, `tests/workdirs.random_workdir`; the compute is a trained one's, the answers are not)
with batch buckets 1, 2, 4, 8. The requests mix captions, referring expressions and LISA chat questions
(streamed to the end) on real photos (the COCO panoptic sample when present, else generated shapes),
sent by a separate client process (`gradio_client`, one thread per request). Modes, `--requests` each:

* batched: all at once; the batcher groups those of one task (up to 8, waiting at most 20 ms);
* unbatched: all at once, but every model call takes one request (max batch 1, no wait): what a
  one-request-at-a-time server does with the same queue;
* sequential: one request after another (max batch 1, no wait): one user at a time.

The same mix is also sent straight into the engine (`engine_*`: no HTTP, no drawing) to show what
batching does to the model calls alone. Per mode (best of `--rounds`): wall time, throughput
(requests/s), p50 / p95 latency, mean batch size and `model_s` (the batcher's time in model calls).

    .venv/bin/python bench/serve.py [--checkpoint=workdir/demo] [--requests=20] [--rounds=2]

Last line: JSON with `speedup` = batched / unbatched throughput over HTTP, `speedup_vs_sequential`,
`engine_speedup` (the same without HTTP), `model_time_ratio` (unbatched / batched model time over HTTP)
and `compiles_after_warm_up` (must be 0).
"""

from __future__ import annotations

import argparse
from concurrent.futures import ThreadPoolExecutor
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
PHOTOS = os.path.join(ROOT, "..", "shared", "data", "coco_panoptic_sample", "input_images")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _round(url: str, photos: list[str], n: int, together: bool) -> dict:
  """One round of `n` requests over HTTP (run in a client process: `--client`)."""
  from gradio_client import Client, handle_file

  clients = [Client(url, verbose=False, analytics_enabled=False, download_files=False)
             for _ in range(min(n, 8) if together else 1)]

  def one(i):
    c, photo, t = clients[i % len(clients)], handle_file(photos[i % len(photos)]), time.perf_counter()
    if i % 3 == 0:
      out = c.predict(photo, api_name="/caption")
    elif i % 3 == 1:
      out = c.predict(photo, f"the object number {i}", api_name="/refer")
    else:
      out = c.predict(photo, f"which object is number {i}?", api_name="/chat")[1:]
    if "total" not in out[2]:
      raise RuntimeError(f"request {i} was not answered: {out}")
    return time.perf_counter() - t

  return _timed(one, n, together)


def _engine_round(engine, image, n: int, together: bool) -> dict:
  """The same mix straight into the engine (no HTTP, no drawing): the batcher and the model alone."""

  def one(i):
    t = time.perf_counter()
    if i % 3 == 0:
      engine.caption(image)
    elif i % 3 == 1:
      engine.refer(image, f"the object number {i}")
    else:
      for _ in engine.chat(image, f"which object is number {i}?"):
        pass
    return time.perf_counter() - t

  return _timed(one, n, together)


def _timed(one, n: int, together: bool) -> dict:
  t = time.perf_counter()
  if together:
    with ThreadPoolExecutor(n) as pool:
      lat = list(pool.map(one, range(n)))
  else:
    lat = [one(i) for i in range(n)]
  wall = time.perf_counter() - t
  lat.sort()
  return {"wall_s": wall, "throughput": n / wall, "p50_s": statistics.median(lat),
          "p95_s": lat[max(0, int(round(0.95 * n)) - 1)]}


def _client(url: str, photos: list[str], n: int, together: bool) -> dict:
  """A round in a separate client process (its threads do not share the server's GIL)."""
  cmd = [sys.executable, os.path.abspath(__file__), f"--client={url}", f"--requests={n}",
         f"--together={int(together)}", f"--photos={','.join(photos)}"]
  out = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=1200)
  if out.returncode:
    raise RuntimeError(f"client failed: {out.stderr[-2000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--checkpoint", default=None, help="a training workdir (default: random demo)")
  ap.add_argument("--requests", type=int, default=20)
  ap.add_argument("--rounds", type=int, default=2, help="each mode's best round is reported")
  ap.add_argument("--client", default=None, help=argparse.SUPPRESS)  # a client process: URL
  ap.add_argument("--together", type=int, default=1, help=argparse.SUPPRESS)
  ap.add_argument("--photos", default="", help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.client:
    print(json.dumps(_round(args.client, args.photos.split(","), args.requests, bool(args.together))))
    return

  from pixelground.serving import launch
  from pixelground.serving import engine as engine_lib

  checkpoint = args.checkpoint
  if checkpoint is None:
    from workdirs import random_workdir
    checkpoint = random_workdir(os.path.join(ROOT, "configs", "demo.py"), tempfile.mkdtemp(), 1)
  photos = (sorted(os.path.join(PHOTOS, p) for p in os.listdir(PHOTOS)) if os.path.isdir(PHOTOS)
            else launch.example_images([], tempfile.mkdtemp()))
  options = engine_lib.ServeOptions(batch_sizes=(1, 2, 4, 8), max_wait_s=0.02)
  t = time.perf_counter()
  demo, engine, url = launch.start(checkpoint, options=options, port=_free_port(), block=False,
                                  say=lambda m: print(m, flush=True))
  print(f"server up in {time.perf_counter() - t:.1f} s: {url}")
  image = engine_lib.read_image(photos[0], max_side=options.max_side, max_pixels=options.max_pixels)[0]
  batcher = engine.batcher
  batched_limits = dict(batcher.max_batch)
  modes = {"batched": (batched_limits, options.max_wait_s, True),
           "unbatched": ({k: 1 for k in batched_limits}, 0.0, True),
           "sequential": ({k: 1 for k in batched_limits}, 0.0, False)}
  best: dict[str, dict] = {}
  for r in range(args.rounds):
    for via in ("http", "engine"):
      for mode, (limits, wait, together) in modes.items():
        if via == "engine" and mode == "sequential":
          continue
        batcher.max_batch, batcher.max_wait_s = dict(limits), wait
        start = len(batcher.batches)
        res = (_client(url, photos, args.requests, together) if via == "http"
               else _engine_round(engine, image, args.requests, together))
        ran = batcher.batches[start:]
        res["mean_batch"] = sum(b.size for b in ran) / len(ran)
        res["model_s"] = sum(b.run_s for b in ran)  # the worker's time in model calls
        key = f"{via}_{mode}"
        print(f"round {r} {key:>16}: {res['wall_s']:6.2f} s  {res['throughput']:5.2f} req/s  "
              f"p50 {res['p50_s']:.3f} s  p95 {res['p95_s']:.3f} s  mean batch "
              f"{res['mean_batch']:.2f}  model {res['model_s']:.2f} s", flush=True)
        if key not in best or res["throughput"] > best[key]["throughput"]:
          best[key] = res
  new = engine_lib.compiled_since(engine.compiles_after_warm_up)
  demo.close()
  engine.close()
  ratio = lambda a, b, k="throughput": round(best[a][k] / best[b][k], 2)
  summary = {"requests": args.requests,
             **{f"{m}_{k}": round(v, 3) for m, res in best.items() for k, v in res.items()},
             "speedup": ratio("http_batched", "http_unbatched"),
             "speedup_vs_sequential": ratio("http_batched", "http_sequential"),
             "engine_speedup": ratio("engine_batched", "engine_unbatched"),
             "model_time_ratio": ratio("http_unbatched", "http_batched", "model_s"),
             "compiles_after_warm_up": len(new)}
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
