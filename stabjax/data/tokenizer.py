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


# ------------------------------------------------------------- Hugging Face tokenizers

# The files an HF tokenizer is read from, in order of preference (SPEC 2: local only).
HF_TOKENIZER_FILES = ("tokenizer.json", "vocab.json + merges.txt", "vocab.txt")
# Files copied along when a run that used an HF tokenizer is exported.
HF_TOKENIZER_SIDE_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "vocab.txt",
                           "tokenizer_config.json", "special_tokens_map.json")
# Conventional names of the special tokens, tried when the tokenizer files name none.
_SPECIAL_NAMES = {
    "bos": ("<|endoftext|>", "[CLS]", "<s>"),
    "eos": ("<|endoftext|>", "[SEP]", "</s>"),
    "pad": ("[PAD]", "<pad>", "<|pad|>"),
    "mask": ("[MASK]", "<mask>"),
}


def _special_token_strings(path) -> dict[str, str]:
  """{'bos_token': '<s>', ...} from tokenizer_config.json / special_tokens_map.json."""
  import json
  out: dict[str, str] = {}
  for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
    f = os.path.join(path, name)
    if not os.path.isfile(f):
      continue
    with open(f) as fh:
      data = json.load(fh)
    for k, v in data.items():
      if k.endswith("_token") and v is not None:
        content = v.get("content") if isinstance(v, dict) else v
        if isinstance(content, str):
          out[k] = content
  return out


class HFTokenizer:
  """A Hugging Face tokenizer (read with the `tokenizers` library) behind the common
  interface, for runs started from an HF checkpoint (`--init_from`).

  Read from `tokenizer.json`, else `vocab.json` + `merges.txt` (byte-level BPE, GPT-2),
  else `vocab.txt` (WordPiece, BERT; lower-cased unless tokenizer_config.json says
  `do_lower_case: false`). `encode` adds no special tokens; `decode` drops them.

  Special ids (the training code needs four distinct roles):
    bos: the `bos_token` (BERT: `cls_token`), else '<|endoftext|>' / '[CLS]' / '<s>'.
    eos: the `eos_token` (BERT: `sep_token`), else '<|endoftext|>' / '[SEP]' / '</s>';
      GPT-2's single '<|endoftext|>' is both BOS and EOS.
    pad: the `pad_token` or a '[PAD]'/'<pad>' token, unless it equals BOS/EOS (HF's
      habit of padding GPT-2 with EOS would mask every EOS out of the loss); else the
      first id above the tokenizer's that the model's (padded) vocabulary still has.
      Padding is masked everywhere, so that spare embedding row is never trained or
      read. With neither, ValueError: the packed data needs an id that is not a token.
    mask: the `mask_token` or '[MASK]'/'<mask>'; else (GPT-2, which never masks) pad.

  `vocab_size` is the model's vocabulary (>= the tokenizer's ids), so per-token tables
  (the token rarity) match the embedding.
  """

  def __init__(self, path: str | os.PathLike, model_vocab_size: int | None = None,
               model_type: str = "gpt2"):
    import hashlib
    import json
    path = os.fspath(path)
    self.path = os.path.abspath(path)
    if not os.path.isdir(path):
      raise ValueError(f"{path}: no such tokenizer directory (a run started --init_from it "
                       f"reads its tokenizer there)")
    files = lambda *names: [os.path.join(path, n) for n in names]  # noqa: E731
    config_file = os.path.join(path, "tokenizer_config.json")
    tok_config = {}
    if os.path.isfile(config_file):
      with open(config_file) as f:
        tok_config = json.load(f)
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
      from tokenizers import Tokenizer as _Tok
      used = files("tokenizer.json")
      self._tok = _Tok.from_file(used[0])
    elif all(map(os.path.isfile, files("vocab.json", "merges.txt"))):
      from tokenizers import ByteLevelBPETokenizer
      used = files("vocab.json", "merges.txt")
      self._tok = ByteLevelBPETokenizer(*used,
                                        add_prefix_space=bool(tok_config.get("add_prefix_space")))
    elif os.path.isfile(os.path.join(path, "vocab.txt")):
      from tokenizers import BertWordPieceTokenizer
      used = files("vocab.txt")
      self._tok = BertWordPieceTokenizer(used[0],
                                         lowercase=bool(tok_config.get("do_lower_case", True)))
    else:
      raise ValueError(f"{path}: no tokenizer found; accepted: "
                       f"{', '.join(HF_TOKENIZER_FILES)}")
    self.files = tuple(used)
    self.num_tokens = int(self._tok.get_vocab_size(with_added_tokens=True))
    if model_vocab_size is not None and self.num_tokens > model_vocab_size:
      # Ids past the embedding would be clamped silently by the lookup.
      raise ValueError(f"{path}: the tokenizer has {self.num_tokens} tokens, more than the "
                       f"model's {model_vocab_size}-entry vocabulary")
    self.vocab_size = max(self.num_tokens, int(model_vocab_size or 0))
    named = _special_token_strings(path)

    def find(role: str, *keys: str) -> int | None:
      for k in keys:
        if k in named and self._tok.token_to_id(named[k]) is not None:
          return int(self._tok.token_to_id(named[k]))
      for s in _SPECIAL_NAMES[role]:
        if self._tok.token_to_id(s) is not None:
          return int(self._tok.token_to_id(s))
      return None

    bert = model_type == "bert"
    bos = find("bos", *(("cls_token", "bos_token") if bert else ("bos_token", "cls_token")))
    eos = find("eos", *(("sep_token", "eos_token") if bert else ("eos_token", "sep_token")))
    if bos is None and eos is None:
      raise ValueError(f"{path}: the tokenizer has no BOS/EOS token (bos_token, eos_token, "
                       f"'<|endoftext|>', '[CLS]'/'[SEP]'); add one to tokenizer_config.json")
    self.bos_id = bos if bos is not None else eos
    self.eos_id = eos if eos is not None else bos
    pad = find("pad", "pad_token")
    if pad in (self.bos_id, self.eos_id):
      pad = None
    if pad is None:
      if self.vocab_size <= self.num_tokens:
        raise ValueError(
            f"{path}: the tokenizer has no pad token other than BOS/EOS and the model's "
            f"{self.vocab_size}-entry vocabulary has no spare id for one; use a checkpoint "
            f"whose tokenizer defines pad_token (or whose vocabulary is padded)")
      pad = self.num_tokens
    self.pad_id = pad
    mask = find("mask", "mask_token")
    if mask is None and bert:
      raise ValueError(f"{path}: a BERT tokenizer needs a mask token ([MASK]); none found")
    self.mask_id = mask if mask is not None else pad
    for name in ("bos_id", "eos_id", "pad_id", "mask_id"):
      if getattr(self, name) >= self.vocab_size:
        raise ValueError(f"{path}: tokenizer {name} {getattr(self, name)} is outside the "
                         f"model's {self.vocab_size}-entry vocabulary")
    h = hashlib.sha256()
    for f in self.files + ((config_file,) if os.path.isfile(config_file) else ()):
      with open(f, "rb") as fh:
        h.update(fh.read())
    h.update(repr((self.vocab_size, self.bos_id, self.eos_id, self.pad_id,
                   self.mask_id)).encode())
    # Identifies the tokenization (files, ids, vocabulary): the dataset cache key.
    self.fingerprint = h.hexdigest()

  def encode(self, text: str) -> list[int]:
    return list(self._tok.encode(text, add_special_tokens=False).ids)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [list(e.ids) for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Sequence[int]) -> str:
    # The spare pad id (and any id of a padded vocabulary) is no token of the tokenizer.
    return self._tok.decode([i for i in _as_int_list(ids) if i < self.num_tokens],
                            skip_special_tokens=True)

  def __repr__(self) -> str:
    return (f"HFTokenizer({self.path}, vocab_size={self.vocab_size}, bos={self.bos_id}, "
            f"eos={self.eos_id}, pad={self.pad_id}, mask={self.mask_id})")


# ------------------------------------------------------------------- export (HF files)


def sentencepiece_to_hf(tok: SentencePieceTokenizer):
  """The SentencePiece model as a `tokenizers.Tokenizer` that encodes and decodes alike.

  transformers' `SpmConverter.build_tokenizer_from_spm_proto` follows the model's own
  normalizer settings (identity, dummy prefix, byte fallback, user-defined '\n' and
  '[MASK]' emitted whole); `legacy=True` prefixes every chunk between added tokens, which
  is what SentencePiece does with user-defined pieces (the non-legacy scheme misplaces
  the dummy prefix after leading spaces). `export_hf_tokenizer` checks the result.
  """
  from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf
  proto = import_protobuf().ModelProto()
  proto.ParseFromString(tok.model_proto)
  vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
  return SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=True)


# Text the converted tokenizer must encode exactly as SentencePiece (spaces, newlines,
# the mask symbol, characters outside the vocabulary).
_PROBES = ("The cat sat on the mat.\nA second line,  two  spaces\n\nand a [MASK] here. ",
           "\nleading newline", "tab\tand émigré naïve 東京 🙂", "  ")


def export_hf_tokenizer(tok, out: str | os.PathLike, probes: Sequence[str] = ()) -> str:
  """Writes the tokenizer in a form transformers loads (`AutoTokenizer.from_pretrained`),
  where it can; returns what was written.

  HFTokenizer: its own files are copied. SentencePieceTokenizer: tokenizer.json /
  tokenizer_config.json (`sentencepiece_to_hf`, kept only when it encodes `probes` and
  some fixed text exactly as SentencePiece), and the original tokenizer.model either
  way. '[MASK]' keeps its id but is not registered as the HF `mask_token`: a special
  token splits the text around it, and the dummy prefix SentencePiece does not put
  after a user-defined piece would then be added there. Other tokenizers (the
  synthetic language's words): nothing.
  """
  import shutil
  out = os.fspath(out)
  if isinstance(tok, HFTokenizer):
    for name in HF_TOKENIZER_SIDE_FILES:
      src = os.path.join(tok.path, name)
      if os.path.isfile(src):
        shutil.copy(src, os.path.join(out, name))
    return "huggingface (copied)"
  if not isinstance(tok, SentencePieceTokenizer):
    return "none (the synthetic language's word tokenizer)"
  with open(os.path.join(out, "tokenizer.model"), "wb") as f:
    f.write(tok.model_proto)
  try:
    import transformers
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=sentencepiece_to_hf(tok), bos_token=tok.id_to_piece(tok.bos_id),
        eos_token=tok.id_to_piece(tok.eos_id), unk_token=tok.id_to_piece(tok.unk_id),
        pad_token=tok.id_to_piece(tok.pad_id))
  except Exception as e:  # noqa: BLE001  (no transformers/protobuf, or a model it cannot read)
    return f"sentencepiece tokenizer.model only (conversion failed: {type(e).__name__})"
  bad = [t for t in (*_PROBES, *probes)
         if fast(t, add_special_tokens=False)["input_ids"] != tok.encode(t)]
  if bad:
    return "sentencepiece tokenizer.model only (the converted tokenizer encodes differently)"
  fast.save_pretrained(out)
  return "sentencepiece converted to tokenizer.json (+ tokenizer.model)"
