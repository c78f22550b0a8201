"""SentencePiece tokenizer with T5 conventions and added tokens such as `[SEG]` (SPEC 4.2).

    tok = load_tokenizer("tiny")                     # the committed model (data/vocab/tiny.model)
    tok = load_tokenizer("/ckpt/flan_t5/spiece.model")  # full size: the T5 vocabulary
    ids = tok.encode("It is [SEG].")                 # no EOS appended
    tok.decode(ids + [tok.eos_id, 0, 0])             # "It is [SEG]."

Ids (T5): pad = 0 (also the decoder start id), eos = 1, unk = 2, no BOS. A model that does not put pad
at 0 and EOS at 1 is refused. `vocab_size` is the number of embedding rows: the largest id + 1 rounded
up to a multiple of 128 (T5: 32100 → 32128); ids in the padding rows are skipped by `decode`.

Where added tokens (`extra_tokens`) get their ids, in this order of preference:
  1. a USER_DEFINED piece of the same string reserved when the model was trained (the tiny model
     reserves `[SEG]`, `[REGION]`, `[TASK_0]`..`[TASK_7]`: `[SEG]` = 3 there);
  2. the next free T5 sentinel, `<extra_id_0>` first, then `<extra_id_1>`, ... (in the T5 layout
     `<extra_id_i>` = 32099 - i, so this takes ids from the top down: `[SEG]` = 32099, a second
     token 32098). Sentinels are either pieces of the model named `<extra_id_i>` (the
     `cc_all.32000.100extra` file, and the tiny model's 16) or implicit ids after the pieces
     (`extra_ids`; the Hugging Face `spiece.model` has the 32000 pieces only, and is detected:
     exactly 32000 pieces, no sentinel pieces, T5's pad/eos/unk → 100 implicit sentinels, so both
     T5 files give identical ids);
  3. only for a model with neither reserved symbols nor sentinels: new ids after the vocabulary
     (`vocab_size` grows accordingly).
A sentinel taken this way stands for the added token: its own name in a text ("<extra_id_0>") then
encodes to the same id, which decodes as the added token. A token that fits none of these (all
sentinels taken, or a model with reserved symbols that lacks it) raises ValueError.

Encoding text with added tokens: the text is cut at every added-token string; each piece of text is
encoded by SentencePiece and the token's id goes between. A piece of text right after an added token
that does not start with whitespace is encoded without SentencePiece's dummy "▁" prefix, so
"[SEG]." keeps "." attached. `decode` renders an added token with one space before it (unless it
opens the text) and restores the space after it from the "▁" of the next piece, so
`decode(encode(t)) == t` for text whose added tokens each follow a space (or open the text), with
single spaces and nothing SentencePiece normalises ("It is [SEG].", "a dog [SEG] and a cat [SEG]").

Word alignment (`encode_words`, SPEC 4.1): the ids of " ".join(words) equal the concatenated ids of
each word encoded alone, token for token, because no piece spans whitespace. That holds when
  - the model was trained with split_by_whitespace (the SentencePiece default; the tiny model was,
    T5's vocabulary is expected to be): no piece has "▁" after its first character — checked on
    load (`aligns_words`), so an unexpected T5 file fails loudly in `encode_words`;
  - the dummy prefix is on (default; checked), so a word alone gets the same leading "▁" it has
    after a space;
  - normalisation does not act across the joining space — true of the NFKC-based rules for ordinary
    text; and, for models trained with remove_extra_whitespaces off (tiny has it on), words
    are non-empty and without leading/trailing whitespace.
`encode_words` raises ValueError for a model that fails the checks.

The model file is parsed with a small protobuf wire-format reader (below) rather than the
`sentencepiece_model_pb2` module, whose generated code may not match the installed protobuf runtime.
"""

from __future__ import annotations

import math
import os
import re
import struct
from typing import Iterable, Sequence

import numpy as np
import sentencepiece as spm

# SentencePiece piece types (sentencepiece_model.proto, ModelProto.SentencePiece.Type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
WHITESPACE = "\u2581"  # "▁": SentencePiece's visible space
T5_NUM_PIECES, T5_EXTRA_IDS = 32000, 100
ROW_MULTIPLE = 128  # embedding rows are padded to a multiple of this
_VOCAB_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vocab")
NAMED_MODELS = {"tiny": os.path.join(_VOCAB_DIR, "tiny.model")}
_MODEL_FILE_NAMES = ("sentencepiece.model", "spiece.model", "tokenizer.model")  # looked up in a dir
_SENTINEL = re.compile(WHITESPACE + r"?<extra_id_(\d+)>")


# ---------------------------------------------------------------- protobuf wire format (ModelProto)
# ModelProto: 1 = pieces (repeated {1: piece, 2: score (float), 3: type}), 2 = trainer_spec,
# 3 = normalizer_spec (3: add_dummy_prefix, 4: remove_extra_whitespaces; both default true).

def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
  """Decodes the varint at buf[i:]; returns (value, index after it)."""
  value = shift = 0
  while True:
    byte = buf[i]
    i += 1
    value |= (byte & 0x7F) << shift
    shift += 7
    if byte < 0x80:
      return value, i


def _varint(value: int) -> bytes:
  """Encodes a varint (negative int32/int64 values as 10-byte two's complement)."""
  value &= (1 << 64) - 1
  out = bytearray()
  while value >= 0x80:
    out.append((value & 0x7F) | 0x80)
    value >>= 7
  out.append(value)
  return bytes(out)


def parse_fields(buf: bytes) -> list[tuple[int, int, int | bytes]]:
  """Splits a serialised protobuf message into (field number, wire type, value) in file order; the
  value is an int for varints, the raw bytes otherwise."""
  fields, i = [], 0
  while i < len(buf):
    key, i = _read_varint(buf, i)
    number, wire = key >> 3, key & 7
    if wire == 0:
      value, i = _read_varint(buf, i)
    elif wire == 1:
      value, i = buf[i:i + 8], i + 8
    elif wire == 5:
      value, i = buf[i:i + 4], i + 4
    elif wire == 2:
      size, i = _read_varint(buf, i)
      value, i = buf[i:i + size], i + size
    else:
      raise ValueError(f"unsupported protobuf wire type {wire} (field {number})")
    fields.append((number, wire, value))
  return fields


def serialize_fields(fields: Iterable[tuple[int, int, int | bytes]]) -> bytes:
  """Inverse of `parse_fields`."""
  out = bytearray()
  for number, wire, value in fields:
    out += _varint(number << 3 | wire)
    if wire == 0:
      out += _varint(value)
    elif wire == 2:
      out += _varint(len(value)) + value
    else:
      out += value
  return bytes(out)


def model_pieces(model_proto: bytes) -> list[tuple[str, float, int]]:
  """(piece, score, type) for every id of a serialised SentencePiece ModelProto."""
  pieces = []
  for number, _, value in parse_fields(model_proto):
    if number == 1:
      piece, score, kind = "", 0.0, NORMAL
      for n, _, v in parse_fields(value):
        if n == 1:
          piece = v.decode("utf-8")
        elif n == 2:
          score = struct.unpack("<f", v)[0]
        elif n == 3:
          kind = v
      pieces.append((piece, score, kind))
  return pieces


def _normalizer_flag(model_proto: bytes, number: int) -> bool:
  """A bool field of normalizer_spec (those used here default to true)."""
  for n, _, value in parse_fields(model_proto):
    if n == 3:
      for m, _, v in parse_fields(value):
        if m == number:
          return bool(v)
  return True


def without_dummy_prefix(model_proto: bytes) -> bytes:
  """The same model with normalizer_spec.add_dummy_prefix = false."""
  out, seen = [], False
  for n, wire, value in parse_fields(model_proto):
    if n == 3:
      value = serialize_fields([f for f in parse_fields(value) if f[0] != 3] + [(3, 0, 0)])
      seen = True
    out.append((n, wire, value))
  if not seen:
    out.append((3, 2, serialize_fields([(3, 0, 0)])))
  return serialize_fields(out)


def append_pieces(model_proto: bytes, pieces: Sequence[str], piece_type: int = USER_DEFINED) -> bytes:
  """The model with `pieces` (score 0) added after its last piece, i.e. at the top of the id range —
  how T5's `cc_all.32000.100extra` places its 100 `<extra_id_i>` sentinels."""
  fields = parse_fields(model_proto)
  last = max(i for i, f in enumerate(fields) if f[0] == 1)
  new = [(1, 2, serialize_fields([(1, 2, p.encode("utf-8")), (2, 5, struct.pack("<f", 0.0)),
                                  (3, 0, piece_type)])) for p in pieces]
  return serialize_fields(fields[:last + 1] + new + fields[last + 1:])


# ---------------------------------------------------------------- the tokenizer

class Tokenizer:
  """SentencePiece model + added tokens, T5 id conventions (module docstring).

  Attributes: pad_id (0), eos_id (1), decoder_start_id (= pad_id), unk_id, vocab_size (embedding
  rows, a multiple of 128), num_ids (largest id + 1), num_pieces (pieces in the model file),
  special_ids ({token: id} of the added tokens), aligns_words (whether `encode_words` is exact).
  Picklable (for multi-process input pipelines): the model bytes travel with it.
  """

  def __init__(self, model_path: str, extra_tokens: Sequence[str] = ("[SEG]",), *,
               extra_ids: int | None = None):
    """Loads the SentencePiece model file `model_path`.

    Args:
      model_path: a `.model` file (serialised ModelProto).
      extra_tokens: strings to map to unused ids, in order of priority for the sentinels.
      extra_ids: implicit T5 sentinels after the model's pieces (`<extra_id_i>` = num_pieces +
        extra_ids - 1 - i). None: 100 for the Hugging Face T5 `spiece.model` layout, else 0.
    """
    with open(model_path, "rb") as f:
      self._setup(f.read(), extra_tokens, extra_ids, model_path)

  @classmethod
  def from_bytes(cls, model_proto: bytes, extra_tokens: Sequence[str] = ("[SEG]",), *,
                 extra_ids: int | None = None) -> "Tokenizer":
    """A tokenizer for a serialised ModelProto held in memory."""
    tok = cls.__new__(cls)
    tok._setup(bytes(model_proto), extra_tokens, extra_ids, "<bytes>")
    return tok

  def _setup(self, proto: bytes, extra_tokens: Sequence[str], extra_ids: int | None, source: str):
    """Loads the processors and assigns the added tokens' ids."""
    if isinstance(extra_tokens, str):
      raise TypeError(f"extra_tokens must be a sequence of strings, got the string {extra_tokens!r}")
    self._proto, self._source = proto, source
    self._extra_tokens = tuple(extra_tokens)
    self._sp = spm.SentencePieceProcessor(model_proto=proto)
    # For text right after an added token that does not start with whitespace (module docstring).
    self._sp_bare = spm.SentencePieceProcessor(model_proto=without_dummy_prefix(proto))
    if self._sp.pad_id() != 0 or self._sp.eos_id() != 1:
      raise ValueError(f"{source}: pad_id {self._sp.pad_id()} / eos_id {self._sp.eos_id()}; the T5 "
                       "convention pad = 0, eos = 1 is required (train with --pad_id=0 --eos_id=1)")
    self.pad_id, self.eos_id, self.unk_id = 0, 1, self._sp.unk_id()
    self.decoder_start_id = self.pad_id
    pieces = model_pieces(proto)
    self.num_pieces = len(pieces)
    assert self.num_pieces == self._sp.get_piece_size(), (self.num_pieces, self._sp.get_piece_size())

    # Sentinels: pieces named <extra_id_i>, or implicit ids after the pieces.
    self._sentinels: dict[int, int] = {}  # sentinel number -> id
    for i, (piece, _, _) in enumerate(pieces):
      m = _SENTINEL.fullmatch(piece)
      if m:
        self._sentinels[int(m.group(1))] = i
    if extra_ids is None:
      t5_like = (self.num_pieces == T5_NUM_PIECES and self.unk_id == 2 and not self._sentinels)
      extra_ids = T5_EXTRA_IDS if t5_like else 0
    if extra_ids < 0:
      raise ValueError(f"extra_ids must be >= 0, got {extra_ids}")
    if extra_ids and self._sentinels:
      raise ValueError(f"{source} already has {len(self._sentinels)} <extra_id_i> pieces; "
                       f"extra_ids={extra_ids} would add a second set")
    self.extra_ids = extra_ids
    for k in range(extra_ids):
      self._sentinels[k] = self.num_pieces + extra_ids - 1 - k

    # Added tokens (order of preference: module docstring).
    user_defined = {p: i for i, (p, _, t) in enumerate(pieces) if t == USER_DEFINED}
    reserved = {p for p in user_defined if not _SENTINEL.fullmatch(p)}
    control = {p for p, _, t in pieces if t in (CONTROL, UNKNOWN)}
    self._special: dict[str, int] = {}
    taken_sentinels = {int(_SENTINEL.fullmatch(t).group(1)) for t in self._extra_tokens
                       if _SENTINEL.fullmatch(t)}
    next_new = self.num_pieces + extra_ids
    for token in self._extra_tokens:
      if not isinstance(token, str) or not token or token != token.strip():
        raise ValueError(f"extra token {token!r}: must be a non-empty string without edge whitespace")
      if token in self._special:
        raise ValueError(f"extra token {token!r} given twice")
      if token in control:
        raise ValueError(f"extra token {token!r} is a control piece of {source}")
      m = _SENTINEL.fullmatch(token)
      if token in user_defined:
        self._special[token] = user_defined[token]
      elif m and int(m.group(1)) in self._sentinels:
        self._special[token] = self._sentinels[int(m.group(1))]
      elif free := sorted(set(self._sentinels) - taken_sentinels):
        taken_sentinels.add(free[0])
        self._special[token] = self._sentinels[free[0]]
      elif not reserved and not self._sentinels:
        self._special[token] = next_new
        next_new += 1
      else:
        raise ValueError(
            f"extra token {token!r} has no unused id in {source}: it is not among the reserved "
            f"symbols {sorted(reserved)} and all {len(self._sentinels)} <extra_id_i> sentinels are "
            "taken; retrain with it in user_defined_symbols (pixelground.data.train_tokenizer)")
    self._id_to_special = {i: t for t, i in self._special.items()}
    self._implicit = {i: f"<extra_id_{k}>" for k, i in self._sentinels.items() if i >= self.num_pieces}
    self.num_ids = max([self.num_pieces + extra_ids, *(i + 1 for i in self._special.values())])
    self.vocab_size = int(math.ceil(self.num_ids / ROW_MULTIPLE) * ROW_MULTIPLE)
    if self._special:
      alternatives = sorted(self._special, key=len, reverse=True)  # longest match first
      self._split = re.compile("|".join(re.escape(t) for t in alternatives))
    else:
      self._split = None
    inner_space = any(WHITESPACE in p[1:] for p, _, t in pieces if t in (NORMAL, USER_DEFINED))
    self.aligns_words = not inner_space and _normalizer_flag(proto, 3)

  # -- pickling (grain workers): rebuild from the model bytes
  def __getstate__(self):
    return {"proto": self._proto, "extra_tokens": self._extra_tokens, "extra_ids": self.extra_ids,
            "source": self._source}

  def __setstate__(self, state):
    self._setup(state["proto"], state["extra_tokens"], state["extra_ids"], state["source"])

  def __repr__(self) -> str:
    return (f"Tokenizer({self._source!r}, pieces={self.num_pieces}, vocab_size={self.vocab_size}, "
            f"special_ids={self._special})")

  @property
  def special_ids(self) -> dict[str, int]:
    """{added token: id} (a copy)."""
    return dict(self._special)

  # -- encoding
  def _encode_text(self, text: str, after_special: bool) -> list[int]:
    """SentencePiece ids of text between added tokens (no dummy prefix where glued to one)."""
    if after_special and text and not text[0].isspace():
      return self._sp_bare.encode(text)
    return self._sp.encode(text)

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without EOS; added-token strings in the text become their ids."""
    if not isinstance(text, str):
      raise TypeError(f"encode takes a str, got {type(text).__name__}")
    if self._split is None:
      return self._sp.encode(text)
    ids, start, after_special = [], 0, False
    for m in self._split.finditer(text):
      ids += self._encode_text(text[start:m.start()], after_special)
      ids.append(self._special[m.group(0)])
      start, after_special = m.end(), True
    return ids + self._encode_text(text[start:], after_special)

  def encode_words(self, words: Sequence[str]) -> tuple[list[int], list[int]]:
    """Ids of " ".join(words) and, per id, the index of the word it came from (module docstring
    gives the conditions under which the ids equal `encode(" ".join(words))`; checked on load)."""
    if not self.aligns_words:
      raise ValueError(f"{self._source}: pieces may span whitespace (model not trained with "
                       "split_by_whitespace, or no dummy prefix): encode_words would not match encode")
    if isinstance(words, str):
      raise TypeError("encode_words takes a sequence of words, not a str")
    ids, word_of = [], []
    for k, word in enumerate(words):
      word_ids = self.encode(word)
      ids += word_ids
      word_of += [k] * len(word_ids)
    return ids, word_of

  # -- decoding
  def decode(self, ids) -> str:
    """Text of `ids` (list or 1-D array): stops at the first EOS, drops pad and padding-row ids,
    renders added tokens (and unused implicit sentinels) as their strings."""
    ids = np.asarray(ids)
    if ids.ndim != 1:
      raise ValueError(f"decode takes a 1-D sequence of ids, got shape {ids.shape}")
    parts: list[str] = []
    run: list[int] = []

    def flush():
      if run:
        text = self._sp.decode(run)
        if parts and self._sp.id_to_piece(run[0]).startswith(WHITESPACE):
          text = " " + text
        parts.append(text)
        run.clear()

    for i in ids.tolist():
      if i == self.eos_id:
        break
      if i == self.pad_id or self.num_ids <= i < self.vocab_size:
        continue
      if not 0 <= i < self.vocab_size:
        raise ValueError(f"id {i} outside [0, {self.vocab_size})")
      token = self._id_to_special.get(i, self._implicit.get(i))
      if token is None:
        run.append(i)
        continue
      flush()
      parts.append(" " + token if parts else token)
    flush()
    return "".join(parts)

  # -- pieces
  def token_id(self, token: str) -> int:
    """Id of an added token, a sentinel name or a piece of the model; KeyError otherwise."""
    if token in self._special:
      return self._special[token]
    m = _SENTINEL.fullmatch(token)
    if m and int(m.group(1)) in self._sentinels:
      return self._sentinels[int(m.group(1))]
    i = self._sp.piece_to_id(token)
    if i != self.unk_id or token == self._sp.id_to_piece(self.unk_id):
      return i
    raise KeyError(f"{token!r} is neither an added token nor a piece of {self._source}")

  def id_to_piece(self, i: int) -> str:
    """The piece of id `i`: an added token's string where one took the id, `<extra_id_k>` for an
    implicit sentinel, else the model's piece; IndexError for padding rows and beyond."""
    i = int(i)
    if i in self._id_to_special:
      return self._id_to_special[i]
    if i in self._implicit:
      return self._implicit[i]
    if 0 <= i < self.num_pieces:
      return self._sp.id_to_piece(i)
    raise IndexError(f"id {i} has no piece (pieces and added tokens end at {self.num_ids})")

  @property
  def pieces(self) -> list[str]:
    """`id_to_piece(i)` for i in [0, num_ids)."""
    return [self.id_to_piece(i) for i in range(self.num_ids)]


def resolve_model_path(name_or_path: str) -> str:
  """A named model ("tiny") → its committed file; a directory → the model file inside it."""
  if name_or_path in NAMED_MODELS:
    return NAMED_MODELS[name_or_path]
  path = os.path.expanduser(name_or_path)
  if os.path.isdir(path):
    for name in _MODEL_FILE_NAMES:
      if os.path.isfile(os.path.join(path, name)):
        return os.path.join(path, name)
    raise FileNotFoundError(f"no {' / '.join(_MODEL_FILE_NAMES)} in directory {path}")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"tokenizer {name_or_path!r}: neither a named model {sorted(NAMED_MODELS)} "
                            "nor an existing SentencePiece model file / directory")
  return path


def load_tokenizer(name_or_path: str, extra_tokens: Sequence[str] = ("[SEG]",), *,
                   extra_ids: int | None = None) -> Tokenizer:
  """`Tokenizer` for "tiny" (the committed model) or a SentencePiece model path (full-size configs:
  T5's `cc_all.32000.100extra/sentencepiece.model` or a T5 checkpoint's `spiece.model`)."""
  return Tokenizer(resolve_model_path(name_or_path), extra_tokens, extra_ids=extra_ids)
