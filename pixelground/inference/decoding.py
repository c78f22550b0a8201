"""Autoregressive decoding compiled as one `jax.lax.while_loop` (no Python loop per token).

Generic over a step function, so every encoder-decoder in pixelground (T5, PixelLLM) shares it:

    step_fn(cache, tokens (N,), index ()) -> (logits (N, V) float32, hidden (N, D), cache)

where `index` is the decoder position being fed (0 = the start token). `hidden` is the final decoder state
(after the final norm) that produced `logits`; results keep it for every generated position, so
`hidden[:, t]` is the state that predicted `tokens[:, t]` (what PixelLLM's location head reads).

* `greedy`: argmax, optional "never repeat the previous token" (GRiT-style), stops per row at EOS;
  `greedy_init` + `greedy_steps` run the same loop a chunk of positions at a time (streaming).
* `beam_search`: Hugging Face `generate(num_beams=K)` semantics (top-2K candidates, finished
  hypotheses scored sum_logprob / n_generated**length_penalty, the default early-stopping heuristic,
  finalisation at max length), so tokens match transformers' beam search at the same settings.
* `generate`: encoder + cache set-up + either search for any model with the T5 decoding protocol
  (`encode`, `init_decode`, `decode_step`, `reorder_cache`), with or without the KV cache.
"""

from __future__ import annotations

import typing as tp

import jax
import jax.numpy as jnp

NEG = -1.0e9
StepFn = tp.Callable[[tp.Any, jax.Array, jax.Array], tuple[jax.Array, jax.Array, tp.Any]]


class DecodeResult(tp.NamedTuple):
  tokens: jax.Array   # (B, L) int32 generated ids, no start token; pad after EOS
  scores: jax.Array   # (B,) float32: greedy sum of log-probs; beam: length-normalised beam score
  hidden: jax.Array   # (B, L, D) final decoder state per generated position (zeros after EOS)
  lengths: jax.Array  # (B,) int32 generated tokens including EOS


def greedy_init(cache: tp.Any, *, batch_size: int, max_len: int, hidden_dim: int, start_id: int = 0,
                pad_id: int = 0, hidden_dtype=jnp.float32) -> dict[str, tp.Any]:
  """The state of a greedy decode before its first step (`greedy_steps` advances it): "i" () the next
  position, "cache", "last" (B,) the last token fed, "tokens" (B, L), "hidden" (B, L, D), "scores" (B,),
  "lengths" (B,), "done" (B,) bool."""
  b = batch_size
  return {
      "i": jnp.int32(0), "cache": cache, "last": jnp.full((b,), start_id, jnp.int32),
      "tokens": jnp.full((b, max_len), pad_id, jnp.int32),
      "hidden": jnp.zeros((b, max_len, hidden_dim), hidden_dtype),
      "scores": jnp.zeros((b,), jnp.float32), "lengths": jnp.zeros((b,), jnp.int32),
      "done": jnp.zeros((b,), bool),
  }


def greedy_steps(step_fn: StepFn, state: dict[str, tp.Any], *, until: jax.Array | int, eos_id: int,
                 pad_id: int = 0, no_repeat_previous: bool = False) -> dict[str, tp.Any]:
  """Greedy steps from `state` (`greedy_init`) while position < `until` (≤ the buffers' length) and
  some row is not done: the whole decode (`until` = max_len) or a chunk of it (streaming)."""
  max_len = state["tokens"].shape[1]
  until = jnp.minimum(until, max_len)

  def cond(s):
    return (s["i"] < until) & ~jnp.all(s["done"])

  def body(s):
    i = s["i"]
    logits, hidden, cache = step_fn(s["cache"], s["last"], i)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    if no_repeat_previous:
      repeat = (jnp.arange(logp.shape[-1])[None, :] == s["last"][:, None]) & (i > 0)
      logp = jnp.where(repeat, -jnp.inf, logp)
    tok = jnp.argmax(logp, axis=-1).astype(jnp.int32)
    live = ~s["done"]
    tok = jnp.where(live, tok, pad_id)
    gained = jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0]
    return {
        "i": i + 1, "cache": cache, "last": tok,
        "tokens": s["tokens"].at[:, i].set(tok),
        "hidden": s["hidden"].at[:, i].set(jnp.where(live[:, None], hidden, 0).astype(s["hidden"].dtype)),
        "scores": s["scores"] + jnp.where(live, gained, 0.0),
        "lengths": s["lengths"] + live.astype(jnp.int32),
        "done": s["done"] | (tok == eos_id),
    }

  return jax.lax.while_loop(cond, body, state)


def greedy(step_fn: StepFn, cache: tp.Any, *, batch_size: int, max_len: int, hidden_dim: int,
           eos_id: int, start_id: int = 0, pad_id: int = 0, no_repeat_previous: bool = False,
           hidden_dtype=jnp.float32) -> DecodeResult:
  """Greedy decoding of up to `max_len` tokens for `batch_size` rows."""
  s = greedy_init(cache, batch_size=batch_size, max_len=max_len, hidden_dim=hidden_dim,
                  start_id=start_id, pad_id=pad_id, hidden_dtype=hidden_dtype)
  s = greedy_steps(step_fn, s, until=max_len, eos_id=eos_id, pad_id=pad_id,
                   no_repeat_previous=no_repeat_previous)
  return DecodeResult(s["tokens"], s["scores"], s["hidden"], s["lengths"])


def _gather(x: jax.Array, idx: jax.Array) -> jax.Array:
  """x: (B, M, ...), idx: (B, N) → (B, N, ...)."""
  idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, idx, axis=1)


def beam_search(step_fn: StepFn, cache: tp.Any,
                reorder_cache: tp.Callable[[tp.Any, jax.Array], tp.Any], *, batch_size: int,
                num_beams: int, max_len: int, hidden_dim: int, eos_id: int, start_id: int = 0,
                pad_id: int = 0, length_penalty: float = 1.0, early_stopping: bool = False,
                hidden_dtype=jnp.float32) -> DecodeResult:
  """Beam search returning the best finished hypothesis per row.

  `cache` must already hold `batch_size * num_beams` rows (row b*K + k is beam k of example b), and
  `reorder_cache(cache, rows)` must return the cache with new row r taken from old row rows[r].
  """
  b, k = batch_size, num_beams
  k2 = 2 * k  # top candidates kept per step: enough that K stay alive after EOS hits

  def cond(s):
    return (s["i"] < max_len) & s["go"]

  def body(s):
    i = s["i"]
    last = jnp.where(i == 0, start_id, s["run_tok"][:, :, jnp.maximum(i - 1, 0)]).reshape(b * k)
    logits, hidden, cache = step_fn(s["cache"], last, i)
    vocab = logits.shape[-1]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1).reshape(b, k, vocab)
    logp = (logp + s["run_scores"][:, :, None]).reshape(b, k * vocab)
    cand_scores, flat_idx = jax.lax.top_k(logp, k2)
    cand_beam, cand_tok = flat_idx // vocab, (flat_idx % vocab).astype(jnp.int32)
    hits = (cand_tok == eos_id) | (i + 1 >= max_len)
    hidden = hidden.reshape(b, k, -1).astype(hidden_dtype)

    def materialise(which):  # token/hidden buffers of candidates `which` (B, N) with step i written
      beam = _gather(cand_beam, which)
      tok = _gather(s["run_tok"], beam).at[:, :, i].set(_gather(cand_tok, which))
      hid = _gather(s["run_hid"], beam).at[:, :, i].set(_gather(hidden, beam))
      return beam, tok, hid

    # Running beams: best K candidates that did not stop.
    alive_scores = cand_scores + hits.astype(jnp.float32) * NEG
    run_scores, next_idx = jax.lax.top_k(alive_scores, k)
    run_beam, run_tok, run_hid = materialise(next_idx)

    # Finished: the top-K candidates that stopped, normalised, merged with earlier finished ones.
    top_k = jnp.arange(k)[None, :].repeat(b, 0)
    fin_new = cand_scores[:, :k] / ((i + 1).astype(jnp.float32) ** length_penalty)
    fin_new = fin_new + (~s["heur"])[:, None].astype(jnp.float32) * NEG
    fin_new = fin_new + (~hits[:, :k]).astype(jnp.float32) * NEG
    if early_stopping:
      fin_new = fin_new + jnp.all(s["fin_flag"], axis=1, keepdims=True).astype(jnp.float32) * NEG
    _, new_tok, new_hid = materialise(top_k)
    merged_scores = jnp.concatenate([s["fin_scores"], fin_new], axis=1)
    fin_scores, pick = jax.lax.top_k(merged_scores, k)
    fin_tok = _gather(jnp.concatenate([s["fin_tok"], new_tok], axis=1), pick)
    fin_hid = _gather(jnp.concatenate([s["fin_hid"], new_hid], axis=1), pick)
    fin_flag = _gather(jnp.concatenate([s["fin_flag"], hits[:, :k]], axis=1), pick)
    fin_len = _gather(jnp.concatenate([s["fin_len"], jnp.full((b, k), i + 1, jnp.int32)], axis=1), pick)

    rows = (run_beam + jnp.arange(b)[:, None] * k).reshape(b * k)
    cache = reorder_cache(cache, rows)

    best_possible = run_scores[:, 0] / ((i + 1).astype(jnp.float32) ** length_penalty)
    worst_finished = jnp.where(fin_flag, jnp.min(fin_scores, axis=1, keepdims=True), NEG)
    heur = s["heur"] & jnp.any(best_possible[:, None] > worst_finished, axis=1)
    go = jnp.any(heur) & ~jnp.all(hits)
    if early_stopping:
      go = go & ~jnp.all(fin_flag)
    return {"i": i + 1, "cache": cache, "run_tok": run_tok, "run_hid": run_hid,
            "run_scores": run_scores, "fin_tok": fin_tok, "fin_hid": fin_hid,
            "fin_scores": fin_scores, "fin_flag": fin_flag, "fin_len": fin_len, "heur": heur,
            "go": go}

  init = {
      "i": jnp.int32(0), "cache": cache,
      "run_tok": jnp.full((b, k, max_len), pad_id, jnp.int32),
      "run_hid": jnp.zeros((b, k, max_len, hidden_dim), hidden_dtype),
      "run_scores": jnp.zeros((b, k), jnp.float32).at[:, 1:].set(NEG),
      "fin_tok": jnp.full((b, k, max_len), pad_id, jnp.int32),
      "fin_hid": jnp.zeros((b, k, max_len, hidden_dim), hidden_dtype),
      "fin_scores": jnp.full((b, k), NEG, jnp.float32),
      "fin_flag": jnp.zeros((b, k), bool), "fin_len": jnp.zeros((b, k), jnp.int32),
      "heur": jnp.ones((b,), bool), "go": jnp.array(True),
  }
  s = jax.lax.while_loop(cond, body, init)
  return DecodeResult(s["fin_tok"][:, 0], s["fin_scores"][:, 0], s["fin_hid"][:, 0], s["fin_len"][:, 0])


def recompute_step_fn(model) -> StepFn:
  """A step function without any cache, as the reference PixelLLM decodes: every step re-runs the whole
  model (encoder and decoder) on the inputs and the fixed-length token buffer. Its "cache" holds only
  the inputs and the buffer: {"tokens": (N, L), "inputs": (input_ids, mask, prefix, prefix_mask)}."""

  def step(cache, tokens, index):
    buf = jax.lax.dynamic_update_slice(cache["tokens"], tokens[:, None].astype(jnp.int32), (0, index))
    ids, mask, prefix, prefix_mask = cache["inputs"]
    enc, enc_mask = model.encode(ids, mask, prefix_embeds=prefix, prefix_mask=prefix_mask)
    logits, hidden = model.decode(buf, enc, enc_mask)
    logits = jax.lax.dynamic_index_in_dim(logits, index, axis=1, keepdims=False)
    hidden = jax.lax.dynamic_index_in_dim(hidden, index, axis=1, keepdims=False)
    return logits, hidden, {**cache, "tokens": buf}

  return step


def limit_vocab(step: StepFn, vocab_limit: int | None, vocab_size: int) -> StepFn:
  """`step` whose logits at ids ≥ `vocab_limit` are the dtype's minimum (never generated)."""
  if vocab_limit is None or vocab_limit >= vocab_size:
    return step

  def limited(cache, tokens, index):
    logits, hidden, cache = step(cache, tokens, index)
    keep = jnp.arange(logits.shape[-1]) < vocab_limit
    return jnp.where(keep, logits, jnp.finfo(logits.dtype).min), hidden, cache

  return limited


def generate(model, input_ids: jax.Array | None, attention_mask: jax.Array | None = None, *,
             max_len: int, num_beams: int = 1, length_penalty: float = 1.0,
             no_repeat_previous: bool = False, early_stopping: bool = False, use_cache: bool = True,
             prefix_embeds: jax.Array | None = None, prefix_mask: jax.Array | None = None,
             vocab_limit: int | None = None) -> DecodeResult:
  """Encodes the inputs and decodes up to `max_len` tokens (greedy if num_beams == 1, else beam search).
  `vocab_limit`: ids ≥ it are never generated (the embedding table's padding rows beyond the tokenizer's
  last id).

  Call it inside `jax.jit` (see `pixelground.models.t5` docs); shapes: input_ids (B,S_text),
  prefix_embeds (B,P,D).
  """
  cfg = model.cfg
  b = (input_ids if input_ids is not None else prefix_embeds).shape[0]
  common = dict(max_len=max_len, hidden_dim=cfg.d_model, eos_id=cfg.eos_id,
                start_id=cfg.decoder_start_id, pad_id=cfg.pad_id, hidden_dtype=cfg.compute_dtype)
  beams = lambda x: x if x is None or num_beams == 1 else jnp.repeat(x, num_beams, axis=0)
  if use_cache:
    enc, mask = model.encode(input_ids, attention_mask, prefix_embeds=prefix_embeds,
                             prefix_mask=prefix_mask)
    cache = model.init_decode(beams(enc), beams(mask), max_len)
    step, reorder = model.decode_step, model.reorder_cache
  else:
    inputs = tuple(beams(x) for x in (input_ids, attention_mask, prefix_embeds, prefix_mask))
    cache = {"tokens": jnp.full((b * num_beams, max_len), cfg.pad_id, jnp.int32), "inputs": inputs}
    step = recompute_step_fn(model)
    reorder = lambda c, rows: {**c, "tokens": jnp.take(c["tokens"], rows, axis=0)}
  step = limit_vocab(step, vocab_limit, cfg.vocab_size)
  if num_beams > 1:
    return beam_search(step, cache, reorder, batch_size=b, num_beams=num_beams,
                       length_penalty=length_penalty, early_stopping=early_stopping, **common)
  return greedy(step, cache, batch_size=b, no_repeat_previous=no_repeat_previous, **common)
