"""Batched inference for `Predictor`: lists of images and texts in one compiled call, padded into a few
shape buckets so that a long-running caller (`pixelground.serve`) compiles each program once.

A call with N examples runs in chunks of at most `Buckets.batch_sizes[-1]`; each chunk is padded to the
smallest batch bucket ≥ its size (the padding rows repeat the first example and are dropped), and its
prompts to the smallest prompt bucket ≥ its longest prompt, capped at the call's `max_prompt_len`
(longer prompts are cut there; the result's `truncated` says so). Padding never changes a row's result:
prompt padding is masked in attention and rows never interact, so a batched call gives each example the
result of a call with that example alone (up to float rounding of a differently shaped program).

Everything after the device (mask resizing to the original image, box mapping) runs on the host with
numpy, so images of any new size reuse the compiled programs.

    buckets = Buckets(batch_sizes=(1, 2, 4, 8), prompt_lens=(8, 16, 32, 64))
    batch = prepare(predictor, images, prompts, boxes, max_prompt_len=32, buckets=buckets)
    batch.arrays   # the model batch: image (Bb, S, S, 3), image_mask, prompt_box (Bb, 4), prompt_ids
    batch.geoms    # the N real rows' geometries; batch.truncated (N,) bool
"""

from __future__ import annotations

import dataclasses
import functools
import typing as tp

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pixelground.data import transforms as T
from pixelground.inference import decoding
from pixelground.models import pixelllm

MASK_SLOTS = 2  # `[SEG]` masks per row per mask call: calls repeat for more (one compiled shape)


@dataclasses.dataclass(frozen=True)
class Buckets:
  """Padded shapes: batch sizes (ascending; the largest is the most rows per compiled call) and prompt
  lengths in tokens (ascending; a call's `max_prompt_len` is always a bucket too)."""
  batch_sizes: tuple[int, ...] = (1, 2, 4, 8)
  prompt_lens: tuple[int, ...] = (8, 16, 32, 64, 128)

  def __post_init__(self):
    for name in ("batch_sizes", "prompt_lens"):
      v = tuple(int(x) for x in getattr(self, name))
      if not v or any(x < 1 for x in v) or list(v) != sorted(set(v)):
        raise ValueError(f"Buckets.{name} must be distinct positive sizes in ascending order; got {v}")
      object.__setattr__(self, name, v)

  def batch(self, n: int) -> int:
    """Rows of the compiled call for `n` ≤ batch_sizes[-1] examples."""
    return next(b for b in self.batch_sizes if b >= n)

  def prompt(self, n: int, cap: int) -> int:
    """Prompt length of the compiled call for a longest prompt of `n` tokens, at most `cap`."""
    return min([p for p in self.prompt_lens if p >= n] + [cap])


@dataclasses.dataclass
class Batch:
  arrays: dict[str, jax.Array]  # the padded model batch (Bb rows)
  geoms: list[T.Geometry]       # one per real row
  sizes: list[tuple[int, int]]  # (H, W) of each real row's original image
  truncated: list[bool]         # each real row's prompt was cut to the prompt length
  prompt_ids: list[list[int]]   # each real row's prompt tokens as fed

  @property
  def n(self) -> int:
    return len(self.geoms)


def prompt_lens(buckets: Buckets, max_prompt_len: int) -> list[int]:
  """Every prompt length a call with `max_prompt_len` can be padded to."""
  return sorted({buckets.prompt(p, max_prompt_len) for p in buckets.prompt_lens} | {max_prompt_len})


def chunks(n: int, buckets: Buckets) -> list[slice]:
  """Row slices of an N-example call: each at most the largest batch bucket."""
  step = buckets.batch_sizes[-1]
  return [slice(i, min(n, i + step)) for i in range(0, n, step)]


def pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
  """(n, ...) → (rows, ...) repeating row 0 (a valid input: no NaN from an empty padding row)."""
  if x.shape[0] == rows:
    return x
  return np.concatenate([x, np.repeat(x[:1], rows - x.shape[0], axis=0)])


def prepare(pred, images: tp.Sequence[np.ndarray], prompts: tp.Sequence[str],
            boxes: tp.Sequence[np.ndarray | None] | None, *, max_prompt_len: int,
            buckets: Buckets) -> Batch:
  """Checked (H, W, 3) uint8 images, prompts (strings or token-id lists) and optional xyxy boxes (image
  pixels; None: the whole image) → the padded model batch; ≤ batch_sizes[-1] examples."""
  n = len(images)
  size = pred.size
  rows = buckets.batch(n)
  boxes = list(boxes) if boxes is not None else [None] * n
  ids = [pred.tok.encode(p) if isinstance(p, str) else [int(t) for t in p] for p in prompts]
  plen = buckets.prompt(max(len(i) for i in ids), max_prompt_len)
  out = {"image": np.zeros((n, size, size, 3), np.uint8), "image_mask": np.zeros((n, size, size), bool),
         "prompt_box": np.zeros((n, 4), np.float32), "prompt_ids": np.zeros((n, plen), np.int32)}
  geoms = []
  for r, (image, box) in enumerate(zip(images, boxes)):
    geom = T.resize_pad(image.shape[0], image.shape[1], size)
    out["image"][r], out["image_mask"][r] = T.apply_image(image, geom)
    vh, vw = geom.valid
    out["prompt_box"][r] = ([0, 0, vw / size, vh / size] if box is None
                            else geom.boxes(np.asarray(box)[None])[0] / size)
    kept = ids[r][:plen]
    out["prompt_ids"][r, : len(kept)] = kept
    geoms.append(geom)
  # device_put, not jnp.asarray: that one runs a small compiled program per new shape and dtype
  arrays = {k: jax.device_put(pad_rows(v, rows)) for k, v in out.items()}
  return Batch(arrays, geoms, [im.shape[:2] for im in images], [len(i) > plen for i in ids],
               [i[:plen] for i in ids])


# ----------------------------------------------------------------------------------------------------
# Compiled programs (one per distinct static argument set and input shape)
# ----------------------------------------------------------------------------------------------------

class Programs:
  """The compiled inference programs of one model: `jax.jit` functions of its weights, its module
  graph split once here. (`nnx.jit` walks the module graph on every call — ~50 ms for the demo model,
  paid once per chunk by a streamed answer.) The weights are those of the model when this was built;
  `Predictor.programs` rebuilds it for another model. Each attribute is a jitted function whose cache
  (`_cache_size()`) holds one executable per input shape and static arguments."""

  def __init__(self, model):
    self.model = model
    self.graphdef, state = nnx.split(model)
    self.leaves, self.treedef = jax.tree.flatten(state)
    static = ("max_len", "num_beams", "no_repeat_previous", "vocab_limit")
    self.generate = self._jit(_generate, static)
    self.dense = self._jit(_dense, ("k", "max_len", "vocab_limit"))
    self.refer = self._jit(_refer, ())
    self.seg_masks = self._jit(_seg_masks, ())
    self.start = self._jit(_start, ("max_len",))
    self.advance = self._jit(_advance, ("chunk", "vocab_limit"), donate=("dstate",))

  def _jit(self, fn, static, donate=()):
    graphdef, treedef = self.graphdef, self.treedef

    def merged(leaves, *args, **kwargs):
      return fn(nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves)), *args, **kwargs)

    jitted = jax.jit(merged, static_argnames=static, donate_argnames=donate)
    call = functools.wraps(fn)(lambda *args, **kwargs: jitted(self.leaves, *args, **kwargs))
    call._cache_size = jitted._cache_size  # compiled executables so far
    return call

  def cache_sizes(self) -> dict[str, int]:
    return {k: getattr(self, k)._cache_size() for k in
            ("generate", "dense", "refer", "seg_masks", "start", "advance")}


def _generate(model, batch, *, max_len: int, num_beams: int, no_repeat_previous: bool,
              vocab_limit: int | None = None):
  """Visual tokens → cached greedy/beam decode → per-token points (model-input pixels)."""
  fused, sam = model.image_features(batch["image"], batch["image_mask"])
  visual = model.visual_tokens(fused, batch["prompt_box"])
  ids = batch["prompt_ids"]
  res = decoding.generate(model.t5, ids, ids != model.cfg.t5.pad_id, max_len=max_len,
                          num_beams=num_beams, length_penalty=0.6 if num_beams > 1 else 1.0,
                          no_repeat_previous=no_repeat_previous, prefix_embeds=visual,
                          vocab_limit=vocab_limit)
  return res, model.points(res.hidden, batch["image_mask"], visual), (sam, visual)


def _dense(model, batch, *, k: int, max_len: int, vocab_limit: int | None = None):
  """Proposals (top-k heatmap peaks) → one caption per proposal, decoded as a batch of B·k."""
  from pixelground.models.heads import proposals as prop_lib

  fused, _ = model.image_features(batch["image"], batch["image_mask"])
  heat, ltrb = model.proposal_head(fused)
  boxes, scores = prop_lib.top_proposals(heat, ltrb, k)  # (B, k, 4) normalised, (B, k)
  b, kk = scores.shape
  visual = model.visual_tokens(jnp.repeat(fused, kk, axis=0), boxes.reshape(b * kk, 4))
  ids = jnp.repeat(batch["prompt_ids"], kk, axis=0)
  res = decoding.generate(model.t5, ids, ids != model.cfg.t5.pad_id, max_len=max_len,
                          prefix_embeds=visual, vocab_limit=vocab_limit)
  return boxes, scores, res.tokens.reshape(b, kk, -1), res.lengths.reshape(b, kk)


def _refer(model, batch):
  """Teacher-forced referring: (box (B, 4) model-input pixels at the EOS, log-likelihood (B,), mask
  logits (B, S, S) and IoU (B,) with a refseg model, else None)."""
  out = model(batch, heads=pixelllm.TASK_HEADS["referring"])
  box = pixelllm.referring_box(out, batch)
  logp = jax.nn.log_softmax(out["logits"], -1)
  logp = jnp.take_along_axis(logp, batch["target_ids"][..., None], -1)[..., 0]
  score = jnp.sum(jnp.where(batch["target_mask"], logp, 0.0), axis=-1)
  return box, score, out.get("ref_logits"), out.get("ref_iou")


def _seg_masks(model, hidden, positions, sam, visual, image_mask):
  """LISA masks of decoded sequences: hidden (B, L, d), positions (B, K) → logits (B, K, S, S), IoU."""
  return model.decoded_seg_masks(hidden, positions, sam, visual, image_mask)


def _start(model, batch, *, max_len: int):
  """Encodes the batch → (greedy decode state at position 0, SAM features, visual tokens)."""
  fused, sam = model.image_features(batch["image"], batch["image_mask"])
  visual = model.visual_tokens(fused, batch["prompt_box"])
  ids = batch["prompt_ids"]
  t5, cfg = model.t5, model.t5.cfg
  enc, mask = t5.encode(ids, ids != cfg.pad_id, prefix_embeds=visual)
  state = decoding.greedy_init(t5.init_decode(enc, mask, max_len), batch_size=ids.shape[0],
                               max_len=max_len, hidden_dim=cfg.d_model, start_id=cfg.decoder_start_id,
                               pad_id=cfg.pad_id, hidden_dtype=cfg.compute_dtype)
  return state, sam, visual


def _advance(model, dstate, *, chunk: int, vocab_limit: int | None):
  """Up to `chunk` more greedy positions of the decode state (stops early when every row is done);
  the state is donated (updated in place)."""
  cfg = model.t5.cfg
  step = decoding.limit_vocab(model.t5.decode_step, vocab_limit, cfg.vocab_size)
  return decoding.greedy_steps(step, dstate, until=dstate["i"] + chunk, eos_id=cfg.eos_id,
                               pad_id=cfg.pad_id)


def row_masks(programs: Programs, hidden, positions: list[list[int]], sam, visual, image_mask,
              batch: Batch) -> list[tuple[np.ndarray, np.ndarray]]:
  """Masks of the given `[SEG]`-predicting positions of each real row, in calls of MASK_SLOTS per row
  (one compiled shape) → per row (masks (K, H, W) bool of its original image, IoU (K,))."""
  rows = hidden.shape[0]
  out = [([], []) for _ in positions]
  for g in range(0, max([len(p) for p in positions] + [0]), MASK_SLOTS):
    pos = np.zeros((rows, MASK_SLOTS), np.int32)
    for r, p in enumerate(positions):
      pos[r, : len(p[g: g + MASK_SLOTS])] = p[g: g + MASK_SLOTS]
    logits, iou = programs.seg_masks(hidden, jax.device_put(pos), sam, visual, image_mask)
    logits, iou = np.asarray(logits), np.asarray(iou)
    for r, p in enumerate(positions):
      k = len(p[g: g + MASK_SLOTS])
      if k:
        out[r][0].append(mask_to_image(logits[r, :k], batch.geoms[r], batch.sizes[r]))
        out[r][1].append(iou[r, :k])
  h_w = [batch.sizes[r] for r in range(len(positions))]
  return [(np.concatenate(m) if m else np.zeros((0,) + tuple(hw), bool),
           np.concatenate(s).astype(np.float32) if s else np.zeros(0, np.float32))
          for (m, s), hw in zip(out, h_w)]


# ----------------------------------------------------------------------------------------------------
# Host side: masks back to the original image
# ----------------------------------------------------------------------------------------------------

def _bilinear_weights(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) float32 weights of `jax.image.resize(..., "bilinear")` along one axis (half-pixel
  centres; the triangle kernel widened by the scale when shrinking, i.e. antialiased)."""
  inv = np.float32(n_in / n_out)
  kernel_scale = max(inv, np.float32(1.0))
  sample = (np.arange(n_out, dtype=np.float32) + 0.5) * inv - 0.5
  w = np.maximum(0.0, 1.0 - np.abs(sample[:, None] - np.arange(n_in, dtype=np.float32)[None]) /
                 kernel_scale).astype(np.float32)
  total = w.sum(axis=1, keepdims=True)
  w = np.where(np.abs(total) > 1000 * np.finfo(np.float32).eps, w / np.where(total != 0, total, 1), 0)
  inside = (sample >= -0.5) & (sample <= n_in - 0.5)
  return np.where(inside[:, None], w, 0).astype(np.float32)


def mask_to_image(logits: np.ndarray, geom: T.Geometry, hw: tuple[int, int],
                  rows_per_block: int = 512) -> np.ndarray:
  """(K, S, S) model-input mask logits → (K, H, W) bool masks of the original image: the padding is
  dropped and the rest resized bilinearly as `jax.image.resize` does, thresholded at 0; on the host
  (no program compiled per image size) in blocks of rows (bounded memory for huge images)."""
  vh, vw = geom.valid
  h, w = int(hw[0]), int(hw[1])
  crop = np.asarray(logits, np.float32)[:, :vh, :vw]
  wy = _bilinear_weights(vh, h) if vh != h else None
  wx = _bilinear_weights(vw, w) if vw != w else None
  cols = crop if wx is None else crop @ wx.T  # (K, vh, W)
  out = np.empty((crop.shape[0], h, w), bool)
  for y0 in range(0, h, rows_per_block):
    y1 = min(h, y0 + rows_per_block)
    block = cols[:, y0:y1] if wy is None else wy[y0:y1] @ cols  # (K, rows, W)
    out[:, y0:y1] = block > 0
  return out


def text_of(tok, ids: list[int]) -> tuple[str, list[int]]:
  """Generated ids (EOS included) → (decoded text without EOS, the ids without it)."""
  body = ids[:-1] if ids and ids[-1] == tok.eos_id else ids
  return tok.decode(body), body
