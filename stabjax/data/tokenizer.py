"""Tokenizers with one interface: SentencePiece for text, pseudo-words for synthetic data.

Both expose `encode(str) -> list[int]` (no BOS/EOS added), `decode(ids) -> str`,
`vocab_size` and the ids `pad_id`, `bos_id`, `eos_id`, `mask_id` (SPEC section 8).

SentencePiece (`train_sentencepiece`) is trained on the training split with the settings
that make `decode(encode(s)) == s` hold for ordinary text (ENVIRONMENT.md): identity
normalisation, no whitespace folding, '\\n' a user-defined symbol, byte fallback for
characters outside the vocabulary. '[MASK]' is a user-defined symbol (BERT). Ids 0..3 are
PAD, BOS, EOS, UNK.

The synthetic language's "tokenizer" (`PseudoWordTokenizer`) spells word id 4 + j as the
j-th pseudo-word of consonant-vowel syllables ('ba', 'be', ..., 'baba', ...), so the
words of the decoded text (lowercase [a-z']+ runs, SPEC 9) are exactly its word tokens.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterable, Sequence
from typing import Protocol

import numpy as np

from stabjax.data.spec import DataError

SP_PAD_ID, SP_BOS_ID, SP_EOS_ID, SP_UNK_ID = 0, 1, 2, 3
MASK_PIECE = "[MASK]"
# Sentences longer than this are skipped by the SentencePiece trainer (default 4192 bytes).
SP_MAX_SENTENCE_BYTES = 1 << 16


class Tokenizer(Protocol):
  vocab_size: int
  pad_id: int
  bos_id: int
  eos_id: int
  mask_id: int

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: Sequence[int]) -> str: ...


def _as_int_list(ids) -> list[int]:
  return [int(i) for i in np.asarray(ids).ravel()]


class SentencePieceTokenizer:
  """A trained SentencePiece model (serialized proto) behind the common interface."""

  def __init__(self, model_proto: bytes):
    import sentencepiece as spm

    self.model_proto = bytes(model_proto)
    self._sp = spm.SentencePieceProcessor(model_proto=self.model_proto)
    self.vocab_size = int(self._sp.get_piece_size())
    self.pad_id = int(self._sp.pad_id())
    self.bos_id = int(self._sp.bos_id())
    self.eos_id = int(self._sp.eos_id())
    self.unk_id = int(self._sp.unk_id())
    self.mask_id = int(self._sp.piece_to_id(MASK_PIECE))
    self.newline_id = int(self._sp.piece_to_id("\n"))

  @classmethod
  def load(cls, path: str | os.PathLike) -> "SentencePieceTokenizer":
    with open(path, "rb") as f:
      return cls(f.read())

  def encode(self, text: str) -> list[int]:
    return list(self._sp.encode(text))

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [list(x) for x in self._sp.encode(list(texts))]

  def decode(self, ids: Sequence[int]) -> str:
    return self._sp.decode(_as_int_list(ids))

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))

  def __repr__(self) -> str:
    return f"SentencePieceTokenizer(vocab_size={self.vocab_size})"


def train_sentencepiece(lines: Iterable[str], vocab_size: int, model_type: str,
                        num_threads: int = 1) -> bytes:
  """Trains SentencePiece on `lines` (training-split text, one line each); the model proto.

  One thread by default: the model (its proto records the thread count) is then the same
  on every host that builds it from the same files, whatever its core count.

  Raises DataError when the corpus cannot give `vocab_size` pieces (too small a
  vocabulary for byte fallback + the corpus's characters, or more than the corpus has).
  """
  import sentencepiece as spm

  buf = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size,
        model_type=model_type, byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, user_defined_symbols=["\n", MASK_PIECE],
        pad_id=SP_PAD_ID, bos_id=SP_BOS_ID, eos_id=SP_EOS_ID, unk_id=SP_UNK_ID,
        max_sentence_length=SP_MAX_SENTENCE_BYTES,
        num_threads=num_threads, minloglevel=2)
  except RuntimeError as e:
    raise _sentencepiece_error(str(e), vocab_size) from None
  return buf.getvalue()


def _sentencepiece_error(msg: str, vocab_size: int) -> DataError:
  if m := re.search(r"Vocabulary size is smaller than required_chars\. \d+ vs (\d+)", msg):
    return DataError(f"vocab_size={vocab_size} is too small for this corpus: byte fallback and "
                     f"its characters need at least {m.group(1)}; use vocab_size >= {m.group(1)}")
  if m := re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)", msg):
    return DataError(f"vocab_size={vocab_size} is larger than this corpus supports (at most "
                     f"{m.group(1)}); use a smaller vocab_size or more text")
  return DataError(f"SentencePiece training failed: {' '.join(msg.split())}")


SPECIALS = ("<pad>", "<s>", "</s>", MASK_PIECE)
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
SYLLABLES = tuple(c + v for c in _CONSONANTS for v in _VOWELS)


def pseudo_word(j: int) -> str:
  """The j-th pseudo-word (j >= 0): j + 1 in bijective base-70 over CV syllables.

  Bijective numeration makes every j a distinct string; each syllable is exactly one
  consonant and one vowel, so spellings never collide across lengths.
  """
  j += 1
  out = []
  while j > 0:
    j, r = divmod(j - 1, len(SYLLABLES))
    out.append(SYLLABLES[r])
  return "".join(reversed(out))


class PseudoWordTokenizer:
  """Word-level tokenizer of the synthetic language: id 4 + j <-> `pseudo_word(j)`.

  `decode` writes the words separated by single spaces and drops the special ids (PAD,
  BOS, EOS, MASK), so the words of the decoded text correspond 1:1 to its word tokens.
  `encode` splits on whitespace and also reads '[MASK]' as `mask_id`.
  """

  pad_id, bos_id, eos_id, mask_id = 0, 1, 2, 3
  num_reserved = 4

  def __init__(self, vocab_size: int):
    self.vocab_size = int(vocab_size)
    self.words = tuple(pseudo_word(j) for j in range(self.vocab_size - self.num_reserved))
    self._ids = {w: i + self.num_reserved for i, w in enumerate(self.words)}
    self._ids[MASK_PIECE] = self.mask_id

  def encode(self, text: str) -> list[int]:
    out = []
    for w in text.split():
      if w not in self._ids:
        raise DataError(f"{w!r} is not a word of the synthetic language (vocabulary "
                        f"{self.words[0]!r}..{self.words[-1]!r})")
      out.append(self._ids[w])
    return out

  def decode(self, ids: Sequence[int]) -> str:
    return " ".join(self.words[i - self.num_reserved] for i in _as_int_list(ids)
                    if i >= self.num_reserved)

  def __repr__(self) -> str:
    return f"PseudoWordTokenizer(vocab_size={self.vocab_size})"
