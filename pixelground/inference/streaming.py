"""Streaming LISA: the answer decoded a chunk of positions at a time, each `[SEG]`'s mask computed as soon
as the chunk that generated it returns — before the answer ends.

The greedy decode is the one `decoding.greedy` runs in one `while_loop`, split at chunk boundaries:
`Programs.start` encodes the batch and returns the decode state (KV cache, tokens, decoder states, done
flags) on the device; `Programs.advance` runs up to `chunk` more positions of the same loop body (its
state donated: updated in place). Between chunks the host reads the new tokens, decodes the text so
far and asks the mask program (`batching.row_masks`) for the masks of the new `[SEG]`s of every row.
Two programs per (batch bucket, prompt bucket) whatever the chunk or answer length, plus one mask
program per batch bucket — and greedy tokens equal the one-shot decode's.

    for update in segment_stream(predictor, images, questions, chunk=4):
      update.rows[r].text, .masks (K, H, W), .mask_scores (K,), .done; update.step, update.seconds
"""

from __future__ import annotations

import dataclasses
import time
import typing as tp

import jax
import numpy as np

from pixelground.inference import batching


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
  rows: list[RowState]   # one per example of the call: a snapshot, not changed by later chunks
  step: int              # decoder positions run so far
  seconds: float         # since the call started
  new_masks: bool        # this update added at least one mask


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
  programs, tok, seg_id = pred.programs, pred.tok, pred.model.cfg.seg_token_id
  state, sam, visual = programs.start(batch.arrays, max_len=max_len)
  rows = [RowState(masks=np.zeros((0,) + tuple(hw), bool), mask_scores=np.zeros(0, np.float32),
                   truncated=t) for hw, t in zip(batch.sizes, batch.truncated)]
  while True:
    state = programs.advance(state, chunk=chunk, vocab_limit=tok.num_ids)
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
      masks = batching.row_masks(programs, state["hidden"], new_pos, sam, visual,
                                 batch.arrays["image_mask"], batch)
      for row, (m, s) in zip(rows, masks):
        row.masks = np.concatenate([row.masks, m])
        row.mask_scores = np.concatenate([row.mask_scores, s])
    done = all(r.done for r in rows)
    snapshot = [dataclasses.replace(r, tokens=list(r.tokens), seg_steps=list(r.seg_steps)) for r in rows]
    yield StreamUpdate(snapshot, step, time.perf_counter() - t0, any(new_pos))  # later chunks don't
    # change what was yielded: masks arrays are replaced, never written in place
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
      programs = pred.programs
      state, sam, visual = programs.start(batch.arrays, max_len=max_len)
      for _ in range(2):  # the first chunk's state comes from `start`, the later ones' from `advance`:
        # equal shapes, but differently spelled shardings (P() vs P(None)) — two cache entries
        state = programs.advance(state, chunk=chunk, vocab_limit=pred.tok.num_ids)
        pos = jax.device_put(np.zeros((b, batching.MASK_SLOTS), np.int32))  # as `row_masks` does
        programs.seg_masks(state["hidden"], pos, sam, visual, batch.arrays["image_mask"])
