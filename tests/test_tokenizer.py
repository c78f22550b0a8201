"""Tests of pixelground/data/tokenizer.py and train_tokenizer.py (SPEC 4.2): T5 ids, where added
tokens land in each vocabulary layout, encode/decode round trips, encode_words == encode, the
committed tiny model, and deterministic training."""

from __future__ import annotations

import os
import pickle
import random
import string

import numpy as np
import pytest

from pixelground.data import tokenizer as tk
from pixelground.data import train_tokenizer as tt

CAPTIONS = (
    "A medium purple circle is on the left.",
    "Two triangles are also visible: a large orange one at the bottom left and a large black one on "
    "the right.",
    "The man's 3 dogs (brown, white & black) ran 12.5 km in 2024!",
    "A well-known, self-driving truck; refrigerator-sized boxes... \"quoted\" 'words'",
    "xylophone quizzically juxtaposed zzqx 1234567 $5.99 50% #1 a/b",
    "naïve café in São Paulo",
    "where is the person holding an umbrella?",
    "In the background we can see buildings, trees and the sky.",
)
WITH_SEG = ("Sure, it is [SEG].", "It is [SEG].", "a dog [SEG] and a cat [SEG]", "[SEG]",
            "[SEG] [SEG] on the left", "the grass [SEG], the sky [SEG].")


@pytest.fixture(scope="module")
def tiny():
  """The committed tiny model."""
  return tk.load_tokenizer("tiny")


@pytest.fixture(scope="module")
def plain_proto(tmp_path_factory):
  """A small model trained in the test with T5 ids and no reserved symbols at all."""
  out = str(tmp_path_factory.mktemp("plain") / "plain")
  tt.train(tt.builtin_sentences(), out, 300, reserved=())
  with open(out + ".model", "rb") as f:
    return f.read()


def t5_layout(proto: bytes) -> bytes:
  """`proto` with 100 USER_DEFINED sentinels appended at the top like cc_all.32000.100extra:
  ids n..n+99 are <extra_id_99>..<extra_id_0>, so <extra_id_i> = n + 99 - i."""
  return tk.append_pieces(proto, [f"<extra_id_{i}>" for i in reversed(range(100))])


def test_t5_ids_and_tiny_model(tiny):
  assert (tiny.pad_id, tiny.eos_id, tiny.unk_id, tiny.decoder_start_id) == (0, 1, 2, 0)
  assert tiny.pieces[:4] == ["<pad>", "</s>", "<unk>", "[SEG]"]
  assert tiny.special_ids == {"[SEG]": 3}  # the reserved USER_DEFINED symbol
  assert tiny.vocab_size % 128 == 0 and tiny.vocab_size - 128 < tiny.num_ids <= tiny.vocab_size
  assert tiny.num_ids == tiny.num_pieces
  assert os.path.getsize(tk.NAMED_MODELS["tiny"]) < 500_000
  for i, token in enumerate(tt.RESERVED):  # the training script's layout
    assert tiny.token_id(token) == 3 + i
  assert tiny.aligns_words
  for word in ("left", "right", "person", "dog", "tree", "the", "a", "sky", "red"):
    assert len(tiny.encode(word)) == 1, word  # common words are single pieces
  alnum = string.ascii_letters + string.digits
  assert tiny.decode(tiny.encode(alnum)) == alnum


def test_special_tokens_unused_by_normal_text_and_round_trip(tiny):
  tok = tk.load_tokenizer("tiny", extra_tokens=("[SEG]", "[POINT]"))
  special = set(tok.special_ids.values())
  assert tok.special_ids["[POINT]"] == tok.token_id("<extra_id_0>")  # unreserved → first sentinel
  for text in CAPTIONS + tuple(s for s in tt.builtin_sentences() if "[" not in s):
    assert not special & set(tok.encode(text)), text
  for text in WITH_SEG:
    ids = tok.encode(text)
    assert ids.count(tok.special_ids["[SEG]"]) == text.count("[SEG]")
    assert tok.decode(ids) == text
  ids = tok.encode("the [POINT] of [SEG].")
  assert tok.decode(ids) == "the [POINT] of [SEG]."
  assert [tok.id_to_piece(i) for i in ids][-3:] == ["▁of", "[SEG]", "."]
  # Glued text keeps no space after the token; a space before it is always rendered.
  assert tok.decode(tok.encode("dog[SEG]cat")) == "dog [SEG]cat"


def test_decode_stops_at_eos_and_drops_pad(tiny):
  ids = tiny.encode("a red circle [SEG].")
  text = tiny.decode(ids)
  assert text == "a red circle [SEG]."
  assert tiny.decode(ids + [tiny.eos_id] + tiny.encode("more text")) == text
  assert tiny.decode([tiny.pad_id] + ids + [tiny.pad_id, tiny.eos_id, 0, 0]) == text
  assert tiny.decode(np.asarray(ids + [1, 0], np.int32)) == text
  assert tiny.decode([tiny.eos_id] + ids) == ""
  assert tiny.decode(ids + [tiny.vocab_size - 1]) == text  # padding rows are skipped
  with pytest.raises(ValueError):
    tiny.decode([tiny.vocab_size])
  with pytest.raises(ValueError):
    tiny.decode(np.zeros((2, 3), np.int32))


def _check_words(tok, words):
  """encode_words == encode(join) and each word's ids decode back to the word."""
  ids, word_of = tok.encode_words(words)
  assert ids == tok.encode(" ".join(words)), words
  assert len(word_of) == len(ids) and word_of == sorted(word_of)
  for k, word in enumerate(words):
    own = [i for i, w in zip(ids, word_of) if w == k]
    assert own == tok.encode(word)
    if "<unk>" not in [tok.id_to_piece(i) for i in own] and "[SEG]" not in word[1:]:  # decode: " [SEG]"
      assert tok.decode(own) == word, (word, own)


@pytest.mark.parametrize("layout", ["tiny", "t5"])
def test_encode_words_matches_encode(tiny, plain_proto, layout):
  tok = tiny if layout == "tiny" else tk.Tokenizer.from_bytes(t5_layout(plain_proto))
  multi_piece = 0
  for caption in CAPTIONS + WITH_SEG:
    words = caption.split()
    _check_words(tok, words)
    multi_piece += sum(len(tok.encode(w)) > 1 for w in words)
  assert multi_piece > 10  # the batch exercises words of several pieces
  # Multi-word units (utterances, SPEC 4.1) and glued added tokens.
  _check_words(tok, ["A medium purple circle", "is on", "the", "left."])
  _check_words(tok, ["Sure,", "it", "is", "[SEG].", "and", "[SEG]", "x[SEG]y"])
  ids, word_of = tok.encode_words(["a", "", "dog"])  # an empty word contributes no ids
  assert ids == tok.encode("a  dog") and set(word_of) == {0, 2}
  # Random words over letters, digits, punctuation and accents (fixed seed).
  rng = random.Random(0)
  alphabet = string.ascii_letters + string.digits + string.punctuation.replace("[", "") + "éüñ"
  for _ in range(300):
    words = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 9)))
             for _ in range(rng.randint(1, 8))]
    ids, word_of = tok.encode_words(words)
    assert ids == tok.encode(" ".join(words)), words


def test_t5_sentinel_layout(plain_proto):
  proto = t5_layout(plain_proto)
  tok = tk.Tokenizer.from_bytes(proto, extra_tokens=("[SEG]", "[REGION]"))
  top = tok.num_pieces - 1
  assert tok.token_id("<extra_id_0>") == top and tok.token_id("<extra_id_99>") == top - 99
  assert tok.special_ids == {"[SEG]": top, "[REGION]": top - 1}  # from the top down
  assert tok.num_ids == tok.num_pieces and tok.vocab_size == -(-tok.num_pieces // 128) * 128
  assert tok.id_to_piece(top) == "[SEG]" and tok.id_to_piece(top - 2) == "<extra_id_2>"
  ids = tok.encode("It is [SEG] and [REGION].")
  assert ids[-2:] == [top - 1, tok.token_id(".")] and ids[-4] == top
  assert tok.decode(ids) == "It is [SEG] and [REGION]."
  assert tok.decode([top - 2, tok.eos_id]) == "<extra_id_2>"
  # A token that is itself a sentinel keeps its id and is skipped by the others.
  tok = tk.Tokenizer.from_bytes(proto, extra_tokens=("[SEG]", "<extra_id_1>", "[X]"))
  assert tok.special_ids == {"[SEG]": top, "<extra_id_1>": top - 1, "[X]": top - 2}


def test_implicit_t5_sentinels(plain_proto):
  n = tk.Tokenizer.from_bytes(plain_proto, extra_tokens=()).num_pieces
  tok = tk.Tokenizer.from_bytes(plain_proto, extra_ids=100)
  assert tok.special_ids == {"[SEG]": n + 99} and tok.num_ids == n + 100
  assert tok.token_id("<extra_id_3>") == n + 96
  assert tok.decode(tok.encode("it is") + [n + 96]) == "it is <extra_id_3>"
  # Hugging Face T5 spiece.model layout: exactly 32000 pieces, no sentinel pieces → 100 implicit.
  filler = [f"\u2581zzfill{i}" for i in range(tk.T5_NUM_PIECES - n)]
  hf = tk.append_pieces(plain_proto, filler, piece_type=tk.NORMAL)
  tok = tk.Tokenizer.from_bytes(hf)
  assert tok.num_pieces == 32000 and tok.extra_ids == 100
  assert tok.special_ids == {"[SEG]": 32099} and tok.vocab_size == 32128
  # The same ids as the cc_all.32000.100extra layout (sentinels as pieces 32000..32099).
  tok100 = tk.Tokenizer.from_bytes(t5_layout(hf))
  assert tok100.num_pieces == 32100 and tok100.extra_ids == 0
  assert tok100.special_ids == {"[SEG]": 32099} and tok100.vocab_size == 32128
  text = "a dog [SEG] on the grass."
  assert tok.encode(text) == tok100.encode(text) and tok100.decode(tok100.encode(text)) == text


def test_appended_ids_and_errors(plain_proto, tiny):
  tok = tk.Tokenizer.from_bytes(plain_proto, extra_tokens=("[SEG]", "[A]", "[B]"))
  n = tok.num_pieces
  assert tok.special_ids == {"[SEG]": n, "[A]": n + 1, "[B]": n + 2}  # no reserved ids: appended
  assert tok.num_ids == n + 3 and tok.vocab_size == -(-(n + 3) // 128) * 128
  assert tok.pieces[-3:] == ["[SEG]", "[A]", "[B]"]
  assert tok.decode(tok.encode("a [A] b [B] c [SEG].")) == "a [A] b [B] c [SEG]."
  # Reserved symbols but neither this token nor sentinels: error.
  reserved = tk.append_pieces(plain_proto, ["[SEG]"])
  assert tk.Tokenizer.from_bytes(reserved).special_ids == {"[SEG]": n}
  with pytest.raises(ValueError, match="no unused id"):
    tk.Tokenizer.from_bytes(reserved, extra_tokens=("[SEG]", "[OTHER]"))
  # The tiny model's 16 sentinels run out at the 17th unreserved token.
  many = [f"[NEW_{i}]" for i in range(16)]
  assert sorted(tk.load_tokenizer("tiny", many).special_ids.values()) == list(range(13, 29))
  with pytest.raises(ValueError, match="no unused id"):
    tk.load_tokenizer("tiny", many + ["[ONE_TOO_MANY]"])
  for bad in (("[SEG]", "[SEG]"), ("</s>",), ("",), (" [SEG]",)):
    with pytest.raises(ValueError):
      tk.load_tokenizer("tiny", bad)
  with pytest.raises(TypeError):
    tk.load_tokenizer("tiny", "[SEG]")
  with pytest.raises(KeyError):
    tiny.token_id("[NOT_A_TOKEN]")
  with pytest.raises(IndexError):
    tiny.id_to_piece(tiny.num_ids)
  assert tiny.token_id("<unk>") == 2 and tiny.token_id("\u2581the") == tiny.encode("the")[0]


def test_non_t5_ids_refused(tmp_path):
  import sentencepiece as spm

  prefix = str(tmp_path / "llama_like")
  spm.SentencePieceTrainer.train(sentence_iterator=iter(tt.builtin_sentences()), model_prefix=prefix,
                                 vocab_size=200, hard_vocab_limit=False, minloglevel=2)
  with pytest.raises(ValueError, match="pad = 0, eos = 1"):
    tk.Tokenizer(prefix + ".model")


def test_load_paths_and_pickle(tmp_path, plain_proto, tiny):
  (tmp_path / "spiece.model").write_bytes(plain_proto)
  by_dir = tk.load_tokenizer(str(tmp_path))
  by_file = tk.load_tokenizer(str(tmp_path / "spiece.model"))
  assert by_dir.special_ids == by_file.special_ids == {"[SEG]": by_dir.num_pieces}
  with pytest.raises(FileNotFoundError):
    tk.load_tokenizer(str(tmp_path / "missing.model"))
  with pytest.raises(FileNotFoundError):
    tk.load_tokenizer(str(tmp_path / "empty_dir_does_not_exist"))
  clone = pickle.loads(pickle.dumps(tiny))
  assert clone.special_ids == tiny.special_ids and clone.vocab_size == tiny.vocab_size
  assert clone.encode(WITH_SEG[0]) == tiny.encode(WITH_SEG[0])


def test_training_is_deterministic(tmp_path):
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("\n".join(tt.builtin_sentences()[:400]) + "\n", encoding="utf-8")
  outs = []
  for run in ("a", "b"):
    tt.main(["--out", str(tmp_path / run / "tok"), "--vocab_size", "300", "--corpus", str(corpus)])
    outs.append(tmp_path / run / "tok")
  model_a, model_b = (p.with_suffix(".model").read_bytes() for p in outs)
  assert model_a == model_b
  assert outs[0].with_suffix(".vocab").read_bytes() == outs[1].with_suffix(".vocab").read_bytes()
  tok = tk.Tokenizer(str(outs[0].with_suffix(".model")))
  assert tok.special_ids == {"[SEG]": 3} and tok.token_id("<extra_id_15>") == 28


@pytest.mark.slow
def test_committed_tiny_model_is_reproducible(tmp_path):
  """Retrains with the default corpus (generates 300 grounded_shapes scenes, ~10 s)."""
  tt.main(["--out", str(tmp_path / "tiny"), "--vocab_size", "2000"])
  with open(tk.NAMED_MODELS["tiny"], "rb") as f:
    assert (tmp_path / "tiny.model").read_bytes() == f.read()
