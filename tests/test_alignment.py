"""Word ↔ trace alignment for Localized Narratives targets, with the committed tiny SentencePiece model."""

import numpy as np
import pytest

from pixelground.data import alignment
from pixelground.data.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok():
  return load_tokenizer("tiny")


CAPTION = "In this image there is a xylophone-shaped, purple-ish hexagon. On the left, a dog!"
UTTERANCES = ["In this image", "there is a", "xylophone-shaped purple-ish", "hexagon", "On the left",
              "a dog"]
# The utterance each caption word comes from (hand-labelled).
WORD_UTTERANCE = [0, 0, 0, 1, 1, 1, 2, 2, 3, 4, 4, 4, 5, 5]


def test_every_token_gets_its_utterance(tok):
  words = CAPTION.split()
  assert len(words) == len(WORD_UTTERANCE)
  ids, word_of = tok.encode_words(words)
  assert ids == tok.encode(CAPTION)
  multi = [w for w in range(len(words)) if word_of.count(w) > 1]
  assert multi, "the fixture must contain words split into several tokens"
  (target,) = alignment.align_narrative(CAPTION, UTTERANCES, tok, max_len=128)
  assert target.num_fallback == 0 and not target.truncated
  np.testing.assert_array_equal(target.ids[:-1], ids)
  assert target.ids[-1] == tok.eos_id and target.utterance[-1] == -1
  want = [WORD_UTTERANCE[w] for w in word_of]
  np.testing.assert_array_equal(target.utterance[:-1], want)  # punctuation tokens included


def test_fallback_where_caption_and_utterances_disagree(tok):
  caption = "A red circle next to something completely unrelated here."
  utterances = ["A red circle", "next to", "a blue square"]
  words = caption.split()
  word_utt, fallback = alignment.word_utterances(words, utterances)
  # "something completely unrelated here." has no counterpart: 4 words aligned by position.
  assert fallback.sum() == 4 and list(np.flatnonzero(fallback)) == [5, 6, 7, 8]
  assert list(word_utt[:5]) == [0, 0, 0, 1, 1]
  assert all(0 <= u < 3 for u in word_utt)
  (target,) = alignment.align_narrative(caption, utterances, tok)
  assert target.num_fallback == 4


def test_punctuation_only_words_join_their_neighbour():
  utt, fb = alignment.word_utterances(["A", "dog", "-", "a", "cat", "..."], ["A dog", "a cat"])
  assert list(utt) == [0, 0, 0, 1, 1, 1] and not fb.any()


def test_truncation_and_sentence_split(tok):
  long_caption = " ".join(["a dog"] * 100)
  (target,) = alignment.align_narrative(long_caption, ["a dog"] * 100, tok, max_len=16)
  assert len(target.ids) == 16 and target.truncated and target.ids[-1] == tok.eos_id
  parts = alignment.align_narrative(CAPTION, UTTERANCES, tok, split_sentences=True)
  assert len(parts) == 2
  assert set(parts[0].utterance[:-1]) == {0, 1, 2, 3} and set(parts[1].utterance[:-1]) == {4, 5}
  joined = np.concatenate([p.ids[:-1] for p in parts])
  np.testing.assert_array_equal(joined, tok.encode(CAPTION))
