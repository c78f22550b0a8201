"""Exact word ↔ trace alignment for Localized Narratives targets (SPEC.md 4.1).

The reference implementation assigns decoder tokens to utterances by their relative position in the
sequence. Here every target token knows its utterance exactly:

1. The caption is split into words on whitespace and tokenised word by word
   (`Tokenizer.encode_words`: the same ids as tokenising the caption at once — SentencePiece never
   merges pieces across whitespace — plus, per token, the word it came from).
2. Caption words are matched to the utterances' words (case and punctuation folded; the timed
   utterances usually carry no punctuation while the caption does) by a longest-matching-blocks
   alignment. A matched caption word takes its utterance; a word that is only punctuation ("-", "...")
   joins the previous word's utterance.
3. Caption words with no counterpart (the caption and the transcription disagree) fall back to the
   positional rule — the utterance at the same relative position — and are counted (`num_fallback`).

Truncation keeps at most `max_len` target tokens including the final EOS (which has no utterance).
With `split_sentences=True` the narrative becomes one target per sentence (split after words ending in
".", "!" or "?"), each with its own tokens, utterance indexes and truncation, as the PixelLLM paper
describes for long narratives.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing as tp

import numpy as np

_FOLD = re.compile(r"[^\w]+", re.UNICODE)
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*$")


def fold(word: str) -> str:
  """Lower-case with punctuation removed ("Dog." → "dog", "it's" → "its", "-" → "")."""
  return _FOLD.sub("", word.lower())


@dataclasses.dataclass
class AlignedTarget:
  """One decoder target. ids (T,) int32 ending in EOS; utterance (T,) int32 — the utterance index of
  each token, -1 for EOS / tokens of no utterance; num_fallback: caption words aligned by position."""
  ids: np.ndarray
  utterance: np.ndarray
  num_words: int
  num_fallback: int
  truncated: bool


def word_utterances(caption_words: tp.Sequence[str], utterances: tp.Sequence[str]
                    ) -> tuple[np.ndarray, np.ndarray]:
  """(per caption word its utterance index (N,) int32, per word whether it was aligned by position
  (N,) bool)."""
  cap = [fold(w) for w in caption_words]
  utt_words, utt_of = [], []
  for i, u in enumerate(utterances):
    for w in u.split():
      if fold(w):
        utt_words.append(fold(w))
        utt_of.append(i)
  n = len(cap)
  out = np.full(n, -1, np.int32)
  if utt_words:
    matcher = difflib.SequenceMatcher(None, cap, utt_words, autojunk=False)
    for block in matcher.get_matching_blocks():
      for k in range(block.size):
        out[block.a + k] = utt_of[block.b + k]
  fallback = np.zeros(n, bool)
  for j in range(n):
    if out[j] >= 0:
      continue
    if not cap[j]:  # punctuation-only word: belongs with its predecessor (or successor at the start)
      continue
    fallback[j] = True
    if utterances:
      out[j] = min(len(utterances) - 1, int((j + 0.5) / max(n, 1) * len(utterances)))
  # Punctuation-only words take a neighbour's utterance.
  for j in range(n):
    if out[j] < 0 and not cap[j]:
      prev = next((out[k] for k in range(j - 1, -1, -1) if out[k] >= 0), -1)
      out[j] = prev if prev >= 0 else next((out[k] for k in range(j + 1, n) if out[k] >= 0), -1)
  return out, fallback


def _target(ids: list[int], word_of: list[int], word_utt: np.ndarray, words: range,
            fallback: np.ndarray, eos_id: int, max_len: int) -> AlignedTarget:
  keep = [t for t, w in enumerate(word_of) if w in words]
  truncated = len(keep) > max_len - 1
  keep = keep[: max_len - 1]
  tok = np.asarray([ids[t] for t in keep] + [eos_id], np.int32)
  utt = np.asarray([word_utt[word_of[t]] for t in keep] + [-1], np.int32)
  return AlignedTarget(tok, utt, len(words), int(fallback[words.start:words.stop].sum()), truncated)


def align_narrative(caption: str, utterances: tp.Sequence[str], tokenizer, *, max_len: int = 128,
                    split_sentences: bool = False) -> list[AlignedTarget]:
  """Targets for one narrative (one, or one per sentence with `split_sentences`).

  Args:
    caption: the narrative text (the decoder target).
    utterances: the timed utterances' texts, in order (their index is the trace-box index).
    tokenizer: `pixelground.data.tokenizer.Tokenizer` (needs `encode_words` and `eos_id`).
    max_len: maximum target length including EOS (SPEC: 128).
  """
  words = caption.split()
  ids, word_of = tokenizer.encode_words(words)
  word_utt, fallback = word_utterances(words, utterances)
  if not split_sentences:
    return [_target(ids, word_of, word_utt, range(len(words)), fallback, tokenizer.eos_id, max_len)]
  targets, start = [], 0
  for j, w in enumerate(words):
    if _SENTENCE_END.search(w) or j == len(words) - 1:
      targets.append(_target(ids, word_of, word_utt, range(start, j + 1), fallback, tokenizer.eos_id,
                             max_len))
      start = j + 1
  return targets

