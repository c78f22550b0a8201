"""Streaming LISA: the answer decoded a chunk of positions at a time, each `[SEG]`'s mask computed as soon
as the chunk that generated it returns — before the answer ends.

The greedy decode is the one `decoding.greedy` runs in one `while_loop`, split at chunk boundaries:
`start` encodes the batch and returns the decode state (KV cache, tokens, decoder states, done flags)
on the device; `advance` runs up to `chunk` more positions of the same loop body (its state donated:
updated in place). Between chunks the host reads the new tokens, decodes the text so far and asks the
mask program (`batching.row_masks`) for the masks of the new `[SEG]`s of every row. Two programs per
(batch bucket, prompt bucket) whatever the chunk or answer length, plus one mask program per batch
bucket — and greedy tokens equal the one-shot decode's.

    for update in segment_stream(predictor, images, questions, chunk=4):
      update.rows[r].text, .masks (K, H, W), .mask_scores (K,), .done; update.step, update.seconds
"""

from __future__ import annotations

import dataclasses
import functools
import time
import typing as tp

import jax.numpy as jnp
import numpy as np
from flax import nnx

from pixelground.inference import batching, decoding


@dataclasses.dataclass
class RowState:
  """One example's answer so far."""
  text: str = ""
  tokens: list[int] = dataclasses.field(default_factory=list)   # generated ids so far (EOS included)
  masks: np.ndarray | None = None                               # (K, H, W) bool, one per `[SEG]` so far
  mask_scores: np.ndarray | None = None                         # (K,) float32
  seg_steps: list[int] = dataclasses.field(default_factory=list)  # the positions of its `[SEG]`s
  done: bool = False
  truncated: bool = False                                       # the prompt was cut


@dataclasses.dataclass
class StreamUpdate:
  rows: list[RowState]   # one per example of the call
  step: int              # decoder positions run so far
  seconds: float         # since the call started
  new_masks: bool        # this update added at least one mask


@functools.partial(nnx.jit, static_argnames=("max_len",))
def start(model, batch, *, max_len: int):
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


@functools.partial(nnx.jit, static_argnames=("chunk", "vocab_limit"), donate_argnames=("state",))
def advance(model, state, *, chunk: int, vocab_limit: int | None):
  """Up to `chunk` more greedy positions of `state` (stops early when every row is done)."""
  cfg = model.t5.cfg
  step = decoding.limit_vocab(model.t5.decode_step, vocab_limit, cfg.vocab_size)
  return decoding.greedy_steps(step, state, until=state["i"] + chunk, eos_id=cfg.eos_id,
                               pad_id=cfg.pad_id)


def segment_stream(pred, images: tp.Sequence[np.ndarray], questions: tp.Sequence[str], *,
                   max_len: int = 40, chunk: int = 4, max_prompt_len: int | None = None,
                   buckets: batching.Buckets | None = None) -> tp.Iterator[StreamUpdate]:
  """LISA answers of checked images and questions (≤ the largest batch bucket), one `StreamUpdate`
  per chunk of `chunk` decoder positions; the last has every row done (EOS or `max_len`). Masks are
  those `Predictor.segment` returns, each computed right after the chunk that generated its `[SEG]`."""
  if chunk < 1:
    raise ValueError(f"chunk must be ≥ 1 decoder positions, got {chunk}")
  t0 = time.perf_counter()
  buckets = buckets or pred.buckets
  batch = batching.prepare(pred, images, questions, None,
                           max_prompt_len=max_prompt_len or pred.max_prompt_len, buckets=buckets)
  model, tok, seg_id = pred.model, pred.tok, pred.model.cfg.seg_token_id
  state, sam, visual = start(model, batch.arrays, max_len=max_len)
  rows = [RowState(masks=np.zeros((0,) + tuple(hw), bool), mask_scores=np.zeros(0, np.float32),
                   truncated=t) for hw, t in zip(batch.sizes, batch.truncated)]
  while True:
    state = advance(model, state, chunk=chunk, vocab_limit=tok.num_ids)
    step = int(state["i"])
    tokens, lengths = np.asarray(state["tokens"]), np.asarray(state["lengths"])
    new_pos = []
    for r, row in enumerate(rows):
      ids = [int(t) for t in tokens[r, : int(lengths[r])]]
      new_pos.append([t for t in range(len(row.tokens), len(ids)) if ids[t] == seg_id])
      row.tokens, row.seg_steps = ids, row.seg_steps + new_pos[-1]
      row.text = batching.text_of(tok, ids)[0]
      row.done = bool(ids and ids[-1] == tok.eos_id) or step >= max_len
    if any(new_pos):
      masks = batching.row_masks(model, state["hidden"], new_pos, sam, visual,
                                 batch.arrays["image_mask"], batch)
      for row, (m, s) in zip(rows, masks):
        row.masks = np.concatenate([row.masks, m])
        row.mask_scores = np.concatenate([row.mask_scores, s])
    done = all(r.done for r in rows)
    yield StreamUpdate(rows, step, time.perf_counter() - t0, any(new_pos))
    if done:
      return


def warm_up(pred, *, max_len: int, chunk: int, max_prompt_len: int,
            buckets: batching.Buckets | None = None) -> None:
  """Compiles `start` / `advance` / the mask program for every batch bucket and prompt bucket up to
  `max_prompt_len` tokens (what `segment_stream` calls with these arguments can meet)."""
  buckets = buckets or pred.buckets
  image = np.zeros((pred.size, pred.size, 3), np.uint8)
  for b in buckets.batch_sizes:
    for n in batching.prompt_lens(buckets, max_prompt_len):
      batch = batching.prepare(pred, [image] * b, [[1] * n] * b, None, max_prompt_len=max_prompt_len,
                               buckets=buckets)
      state, sam, visual = start(pred.model, batch.arrays, max_len=max_len)
      state = advance(pred.model, state, chunk=chunk, vocab_limit=pred.tok.num_ids)
      pos = jnp.zeros((b, batching.MASK_SLOTS), jnp.int32)
      batching.seg_masks(pred.model, state["hidden"], pos, sam, visual, batch.arrays["image_mask"])
