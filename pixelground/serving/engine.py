"""The model side of the server: checked inputs → batched `Predictor` calls on the batcher's worker.

Every task is one batcher queue. caption and region caption share one (the same compiled program: the
region is the prompt box, the prompt "an object of"); refer, dense and chat are batched too; GELLA's
ground / panoptic and SAM's automatic masks run one request at a time. The predictor's shape buckets are
set here: batch sizes `ServeOptions.batch_sizes`, prompts padded to the model's prompt length (chat: to
`chat_prompt_len`, the history needs more), so `warm_up` compiles every program a request can need and
a running server never compiles again (`compiles()` counts XLA compilations in this process).

Uploads are read here (`read_image`): anything PIL cannot read, an empty file or more than
`max_pixels` pixels is an `InputError` with a message for the page; images with a side over `max_side`
are reduced (the model sees `image_size` pixels anyway) and the caller gets a note saying so.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
import typing as tp

import numpy as np

from pixelground.inference import batching, streaming
from pixelground.serving.batcher import Batcher, Request

log = logging.getLogger(__name__)
TASKS = ("caption", "refer", "chat", "region", "dense", "ground", "panoptic", "masks")


class InputError(ValueError):
  """A problem with what the user sent: shown in the page as is."""


@dataclasses.dataclass(frozen=True)
class ServeOptions:
  batch_sizes: tuple[int, ...] = (1, 2, 4, 8)  # batch buckets; the largest is the most per call
  max_wait_s: float = 0.02      # how long a request waits for others to join its batch
  max_len: int = 0              # caption / region / refer / dense tokens (0: the config's target length)
  chat_max_len: int = 0         # LISA answer tokens (0: as max_len)
  chat_prompt_len: int = 48     # chat prompt tokens (history + question), oldest turns dropped first
  chunk: int = 4                # decoder positions per streamed chunk
  dense_k: int = 5              # dense captioning regions
  max_side: int = 2048          # uploads with a longer side are reduced to it
  max_pixels: int = 100_000_000  # larger uploads are refused
  point_box: float = 0.2        # a clicked point → a box this fraction of the short side wide
  amg_points: int = 16          # automatic masks: points per side of the prompt grid


@dataclasses.dataclass
class Timing:
  queued_s: float
  batch: int
  model_s: float
  total_s: float = 0.0

  @classmethod
  def of(cls, req: Request) -> "Timing":
    end = req.finished or time.perf_counter()
    return cls(req.queued_s, req.batch_size, end - (req.started or end), end - req.arrived)


# ----------------------------------------------------------------------------------------------------
# Compilation counter
# ----------------------------------------------------------------------------------------------------

_COMPILED: list[str] = []  # the function name of every XLA compilation, in order


def _on_event(event: str, duration: float, **kwargs) -> None:
  if event == "/jax/core/compile/backend_compile_duration":
    _COMPILED.append(str(kwargs.get("fun_name", "?")))


@functools.cache
def _listen() -> None:
  import jax
  jax.monitoring.register_event_duration_secs_listener(_on_event)


def compiles() -> int:
  """XLA backend compilations in this process since the first call (JAX's compile events)."""
  _listen()
  return len(_COMPILED)


def compiled_since(n: int) -> list[str]:
  """The names of the functions compiled after the first `n` compilations."""
  return _COMPILED[n:]


# ----------------------------------------------------------------------------------------------------
# Uploads
# ----------------------------------------------------------------------------------------------------

def read_image(path: str | None, *, max_side: int, max_pixels: int, what: str = "image"
               ) -> tuple[np.ndarray, float, str | None]:
  """An uploaded file → ((H, W, 3) uint8 RGB, its pixels per uploaded pixel (< 1 when reduced), None
  or a note that it was reduced); InputError when it is missing, empty, not an image or too large.
  EXIF orientation is applied (the image as a browser shows it)."""
  from PIL import Image, ImageOps, UnidentifiedImageError

  from pixelground.data import transforms as T

  if not path:
    raise InputError(f"no {what}: upload one or pick an example")
  if not os.path.isfile(path) or os.path.getsize(path) == 0:
    raise InputError(f"the {what} upload is empty or gone; upload it again")
  name = os.path.basename(path)
  Image.MAX_IMAGE_PIXELS = None  # our own limit below, with a clear message
  try:
    with Image.open(path) as img:
      w, h = img.size
      if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF orientation: shown rotated by 90°
        w, h = h, w
      if w * h > max_pixels:
        raise InputError(f"{name} is {w}×{h} = {w * h / 1e6:.0f} Mpx; at most {max_pixels / 1e6:.0f} "
                         f"Mpx are accepted")
      side = max(w, h)
      if side > max_side and img.format == "JPEG":
        img.draft("RGB", (img.size[0] * max_side // side, img.size[1] * max_side // side))  # 1/2..1/8
      img = ImageOps.exif_transpose(img)
      img.load()
      note = None
      if max(img.size) > max_side:
        f = max_side / max(img.size)
        img = img.resize((max(1, round(img.size[0] * f)), max(1, round(img.size[1] * f))),
                         Image.BILINEAR)
      if (img.size[0], img.size[1]) != (w, h):
        note = (f"{name} is {w}×{h}; it was reduced to {img.size[0]}×{img.size[1]} (the model sees "
                f"a small copy anyway)")
      return T.to_rgb_uint8(img), img.size[0] / w, note
  except InputError:
    raise
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise InputError(f"{name} is not an image this server can read ({type(e).__name__}: {e})") from None


def parse_box(text: str | None, hw: tuple[int, int], scale: float = 1.0, point_box: float = 0.2
              ) -> np.ndarray | None:
  """"x0,y0,x1,y1" (pixels of the uploaded image; "x,y": a point) → an xyxy box of the image as the
  model gets it (`scale` = its pixels per uploaded pixel), or None for an empty text; InputError when
  malformed or outside the image. A point becomes a box `point_box` × the short side wide."""
  if text is None or not text.strip():
    return None
  try:
    vals = [float(v) for v in text.replace(" ", "").strip("()[]").split(",") if v != ""]
  except ValueError:
    raise InputError(f"box: expected x0,y0,x1,y1 (or a point x,y) in pixels, got {text!r}") from None
  if len(vals) not in (2, 4) or not np.all(np.isfinite(vals)):
    raise InputError(f"box: expected 4 numbers x0,y0,x1,y1 (or a point x,y), got {text!r}")
  h, w = hw[0] / scale, hw[1] / scale  # the uploaded image's size
  if len(vals) == 2:
    x, y = vals
    if not (0 <= x <= w and 0 <= y <= h):
      raise InputError(f"point ({x:g}, {y:g}) is outside the {w:.0f}×{h:.0f} image")
    r = point_box * min(w, h) / 2
    vals = [max(0.0, x - r), max(0.0, y - r), min(w, x + r), min(h, y + r)]
  x0, y0, x1, y1 = vals
  if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
    raise InputError(f"box {x0:g},{y0:g},{x1:g},{y1:g} is not a non-empty box inside the "
                     f"{w:.0f}×{h:.0f} image (x0 < x1 ≤ width, y0 < y1 ≤ height)")
  return np.asarray(vals, np.float32) * scale


# ----------------------------------------------------------------------------------------------------
# Engine
# ----------------------------------------------------------------------------------------------------

class Engine:
  """A `Predictor` behind a `Batcher`. `available[task]` is None for the tasks this checkpoint can run,
  else the reason it cannot; `categories`: the panoptic category list (default the checkpoint's)."""

  def __init__(self, predictor, options: ServeOptions = ServeOptions(), *, categories=None):
    self.pred, self.options = predictor, options
    config = getattr(predictor, "config", None)
    target_len = int(config.data.max_target_len) if config is not None else 40
    self.max_len = options.max_len or target_len
    self.chat_max_len = options.chat_max_len or self.max_len
    sizes = tuple(options.batch_sizes)
    predictor.buckets = batching.Buckets(sizes, (predictor.max_prompt_len,))
    self.chat_buckets = batching.Buckets(sizes, (options.chat_prompt_len,))
    if categories is not None:
      predictor.categories = list(categories)
    self.available = self._availability()
    batched = {"caption": sizes[-1], "refer": sizes[-1], "dense": sizes[-1], "chat": sizes[-1]}
    handlers = {"caption": self._captions, "refer": self._refer, "dense": self._dense,
                "chat": self._chat, "ground": self._ground, "panoptic": self._panoptic,
                "masks": self._masks}
    self.batcher = Batcher(handlers, max_batch={t: batched.get(t, 1) for t in handlers},
                           max_wait_s=options.max_wait_s)
    self.compiles_after_warm_up: int | None = None

  def _availability(self) -> dict[str, str | None]:
    cfg = self.pred.model.cfg
    gella = None if getattr(cfg, "gella", None) else "needs a GELLA checkpoint (configs/demo.py:gella)"
    out = {t: None for t in TASKS}
    out["chat"] = None if cfg.lisa else "needs a LISA checkpoint (lisa=True)"
    out["dense"] = None if cfg.proposals else "needs a checkpoint with the proposal head"
    out["ground"] = gella
    out["panoptic"] = gella or (None if self.pred.panoptic_categories() else
                                "the checkpoint's panoptic categories are not available here "
                                "(serve --categories=FILE)")
    try:
      self.pred.mask_generator()
      out["masks"] = None
    except ValueError as e:
      out["masks"] = str(e).split(": give")[0] + " (serve --sam=FILE)"
    return out

  def close(self) -> None:
    self.batcher.close()

  # -- warm-up ---------------------------------------------------------------------------------------
  def warm_up(self, say: tp.Callable[[str], None] = log.info, workers: int = 2) -> float:
    """Compiles every program a request can need — each batched task at every batch bucket, GELLA's
    for one image — on `workers` threads (XLA compiles outside the GIL) → seconds."""
    from concurrent.futures import ThreadPoolExecutor

    p, t0 = self.pred, time.perf_counter()
    image = np.full((p.size, p.size, 3), 127, np.uint8)
    p.programs  # noqa: B018 — built once, before the threads share it
    jobs = []
    if self.available["ground"] is None:  # the longest job first (nnx.jit: one thread)
      jobs.append(("GELLA ground / panoptic", self._warm_up_gella))
    for b in p.buckets.batch_sizes:
      jobs.append((f"caption + region, batch {b}", functools.partial(
          p.caption_batch, [image] * b, max_len=self.max_len)))
      jobs.append((f"refer, batch {b}", functools.partial(
          p.referring_batch, [image] * b, ["a"] * b, max_len=self.max_len)))
      if self.available["dense"] is None:
        jobs.append((f"dense, batch {b}", functools.partial(
            p.dense_captions_batch, [image] * b, k=self.options.dense_k, max_len=self.max_len)))
      if self.available["chat"] is None:
        jobs.append((f"chat, batch {b}", functools.partial(
            streaming.warm_up, p, max_len=self.chat_max_len, chunk=self.options.chunk,
            max_prompt_len=self.options.chat_prompt_len,
            buckets=batching.Buckets((b,), self.chat_buckets.prompt_lens))))

    def run(job):
      t = time.perf_counter()
      job[1]()
      say(f"compiled {job[0]} in {time.perf_counter() - t:.1f} s")

    with ThreadPoolExecutor(max(1, workers)) as pool:
      list(pool.map(run, jobs))
    self.compiles_after_warm_up = compiles()
    return time.perf_counter() - t0

  def _warm_up_gella(self) -> None:
    p = self.pred
    image = np.full((p.size, p.size, 3), 127, np.uint8)
    ids = np.zeros(image.shape[:2], np.int64)
    ids[: p.size // 2] = 1
    p.ground(image, "a shape", ids, max_len=self.max_len)
    p.ground(image, "a shape", ids, phrases=["a shape"], max_len=self.max_len)
    if self.available["panoptic"] is None:
      p.panoptic(image, ids, max_len=self.max_len)

  # -- calls (from request threads) ------------------------------------------------------------------
  def _require(self, task: str) -> None:
    if self.available.get(task) is not None:
      raise InputError(f"{task}: not available for this checkpoint — {self.available[task]}")

  def caption(self, image: np.ndarray, box: np.ndarray | None = None):
    """→ (Caption, Timing): the whole image, or the region `box` (xyxy pixels of `image`)."""
    from pixelground.data import tasks as task_lib
    self._require("region" if box is not None else "caption")
    prompt = task_lib.LN_TEMPLATES[0] if box is None else task_lib.REGION_CAPTION
    req = self.batcher.submit("caption", (image, prompt, box))
    return req.result(), Timing.of(req)

  def refer(self, image: np.ndarray, expression: str):
    self._require("refer")
    req = self.batcher.submit("refer", (image, expression))
    return req.result(), Timing.of(req)

  def dense(self, image: np.ndarray):
    self._require("dense")
    req = self.batcher.submit("dense", image)
    return req.result(), Timing.of(req)

  def chat(self, image: np.ndarray, prompt: str) -> tp.Iterator[tuple[streaming.RowState, Timing]]:
    """The answer to `prompt` (history + question) streamed: (row so far, timing) per chunk."""
    self._require("chat")
    req = self.batcher.submit("chat", (image, prompt))
    for _, row in req.events():
      yield row, Timing.of(req)

  def ground(self, image, caption: str, entities, phrases):
    self._require("ground")
    req = self.batcher.submit("ground", (image, caption, entities, phrases))
    return req.result(), Timing.of(req)

  def panoptic(self, image, entities):
    self._require("panoptic")
    req = self.batcher.submit("panoptic", (image, entities))
    return req.result(), Timing.of(req)

  def masks(self, image):
    self._require("masks")
    req = self.batcher.submit("masks", image)
    return req.result(), Timing.of(req)

  def chat_prompt(self, history: list[tuple[str, str]], question: str) -> tuple[str, int]:
    """The LISA prompt of a conversation: earlier turns ("question answer") then the question, the
    oldest turns dropped until it fits `chat_prompt_len` tokens → (prompt, turns kept)."""
    tok, limit = self.pred.tok, self.options.chat_prompt_len
    for start in range(len(history) + 1):
      turns = [f"{q} {a}" for q, a in history[start:]] + [question]
      prompt = " ".join(turns)
      if len(tok.encode(prompt)) <= limit:
        return prompt, len(history) - start
    return question, 0

  # -- handlers (the batcher's worker) ---------------------------------------------------------------
  @staticmethod
  def _batched(reqs: list[Request], run: tp.Callable[[list], list]) -> None:
    """`run` over the payloads in one call; if that fails with several requests, each runs alone so
    that a bad one fails only itself (inputs are checked before they are queued: this is a backstop)."""
    try:
      outs = run([r.payload for r in reqs])
    except ValueError:
      if len(reqs) == 1:
        raise
      for r in reqs:
        try:
          r.finish(run([r.payload])[0])
        except ValueError as e:
          r.fail(e)
      return
    for r, out in zip(reqs, outs):
      r.finish(out)

  def _captions(self, reqs: list[Request]) -> None:
    self._batched(reqs, lambda ps: self.pred.caption_batch(
        [p[0] for p in ps], [p[1] for p in ps], [p[2] for p in ps], max_len=self.max_len))

  def _refer(self, reqs: list[Request]) -> None:
    self._batched(reqs, lambda ps: self.pred.referring_batch(
        [p[0] for p in ps], [p[1] for p in ps], max_len=self.max_len))

  def _dense(self, reqs: list[Request]) -> None:
    self._batched(reqs, lambda ps: self.pred.dense_captions_batch(ps, k=self.options.dense_k,
                                                                   max_len=self.max_len))

  def _chat(self, reqs: list[Request]) -> None:
    images, prompts = zip(*(r.payload for r in reqs))
    stream = streaming.segment_stream(
        self.pred, list(images), list(prompts), max_len=self.chat_max_len, chunk=self.options.chunk,
        max_prompt_len=self.options.chat_prompt_len, buckets=self.chat_buckets)
    for update in stream:
      for r, row in zip(reqs, update.rows):
        (r.finish if row.done else r.emit)(row)

  def _ground(self, reqs: list[Request]) -> None:
    for r in reqs:
      image, caption, entities, phrases = r.payload
      found = self.pred.ground(image, caption, entities, phrases=phrases, max_len=self.max_len)
      r.finish((found, self.pred.generated))

  def _panoptic(self, reqs: list[Request]) -> None:
    for r in reqs:
      image, entities = r.payload
      id_map, segments = self.pred.panoptic(image, entities, max_len=self.max_len)
      r.finish((id_map, segments, self.pred.generated))

  def _masks(self, reqs: list[Request]) -> None:
    for r in reqs:
      r.finish(self.pred.auto_masks(r.payload, points_per_side=self.options.amg_points))
