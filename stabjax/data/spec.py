"""Data spec strings, the data configuration and the one error type (SPEC section 8).

`--data` takes one of

* `synthetic`                 the offline language with a known generator (`synthetic.py`),
* `text:PATH_OR_GLOB`         local UTF-8 files, built into a TFDS dataset (`text_builder.py`),
* `tfds:NAME[/CONFIG]`        a TFDS text dataset already prepared on this machine.

`parse_data_spec` is the one place these strings are parsed. Every problem with the user's
input raises `DataError` with one line that names the problem and what is accepted, so a
launcher can print `str(e)` and exit.
"""

from __future__ import annotations

import dataclasses
import numbers
import typing
from typing import Literal

DataKind = Literal["synthetic", "text", "tfds"]
DATA_KINDS: tuple[str, ...] = ("synthetic", "text", "tfds")
TokenizerType = Literal["bpe", "unigram"]
TOKENIZER_TYPES: tuple[str, ...] = typing.get_args(TokenizerType)
# How a text: file is cut into documents (`text_builder.split_into_documents`).
TextSplit = Literal["auto", "blank_line", "line"]
TEXT_SPLITS: tuple[str, ...] = typing.get_args(TextSplit)
SPEC_FORMS = "synthetic, text:PATH_OR_GLOB, tfds:NAME[/CONFIG]"
DEFAULT_CACHE_DIR = "~/.cache/stabjax"


class DataError(ValueError):
  """A problem with the data the user asked for; `str(e)` is one line saying what to do."""


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """A parsed `--data` value.

  Attributes:
    kind: 'synthetic', 'text' or 'tfds'.
    path: the path or glob of a `text:` spec (else None).
    name: the TFDS dataset name of a `tfds:` spec, possibly with ':VERSION' (else None).
    config: the TFDS builder config of a `tfds:` spec, if one was given.
  """

  kind: str
  path: str | None = None
  name: str | None = None
  config: str | None = None

  @property
  def tfds_id(self) -> str:
    """The string `tfds.builder` takes: NAME or NAME/CONFIG."""
    if self.kind != "tfds":
      raise DataError(f"data spec {self} is not a tfds: spec")
    return self.name if self.config is None else f"{self.name}/{self.config}"

  def __str__(self) -> str:
    if self.kind == "synthetic":
      return "synthetic"
    if self.kind == "text":
      return f"text:{self.path}"
    return f"tfds:{self.tfds_id}"


def parse_data_spec(s: str) -> DataSpec:
  """Parses 'synthetic' | 'text:PATH_OR_GLOB' | 'tfds:NAME[/CONFIG]' (SPEC section 8)."""
  if not isinstance(s, str) or not s.strip():
    raise DataError(f"empty data spec; accepted: {SPEC_FORMS}")
  s = s.strip()
  kind, sep, rest = s.partition(":")
  if kind == "synthetic":
    if sep:
      raise DataError(f"data spec {s!r}: 'synthetic' takes no argument (its options are "
                      f"DataConfig.synthetic_*); accepted: {SPEC_FORMS}")
    return DataSpec(kind="synthetic")
  if kind == "text":
    if not rest.strip():
      raise DataError(f"data spec {s!r} names no file; accepted: text:PATH_OR_GLOB, "
                      f"e.g. text:corpus.txt or 'text:books/*.txt'")
    return DataSpec(kind="text", path=rest.strip())
  if kind == "tfds":
    parts = rest.strip().split("/")
    if not rest.strip() or len(parts) > 2 or not all(p.strip() for p in parts):
      raise DataError(f"data spec {s!r} is not tfds:NAME or tfds:NAME/CONFIG, "
                      f"e.g. tfds:lm1b or tfds:c4/en")
    name = parts[0].strip()
    config = parts[1].strip() if len(parts) == 2 else None
    return DataSpec(kind="tfds", name=name, config=config)
  raise DataError(f"unknown data spec kind {kind!r} in {s!r}; accepted: {SPEC_FORMS}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Everything that defines the data a run trains and evaluates on.

  Attributes:
    spec: what to train on: synthetic, text:PATH_OR_GLOB or tfds:NAME[/CONFIG]
      (`parse_data_spec`).
    seq_len: tokens per row, BOS and EOS included (>= 2; >= 3 for synthetic data, which
      needs room for BOS, one word and EOS). The synthetic generator's length cap.
    vocab_size: SentencePiece vocabulary size (text/tfds). Byte fallback needs at least
      256 byte pieces + 6 special pieces + the corpus's characters.
    tokenizer_type: SentencePiece model type, 'bpe' or 'unigram'.
    cache_dir: where built datasets, tokenizers and tables are cached.
    text_split: how a text: file is cut into documents: 'blank_line' (blocks separated by
      blank lines), 'line' (one document per non-blank line) or 'auto' (per file:
      'blank_line' if the file has a blank line between two non-blank lines, else 'line').
    text_feature: the TFDS feature that holds the text (tfds:).
    tfds_data_dir: TFDS data_dir for tfds: specs (None: TFDS's default).
    validation_fraction: share of documents hashed into the validation split (text:; and
      tfds: datasets that have neither a 'validation' nor a 'test' split).
    max_documents: read at most this many documents of each split (tfds: only; None: all).
      Large corpora (c4) need it: the packed splits are held as arrays.
    synthetic_vocab_size: synthetic token vocabulary, the 4 reserved ids included. The
      default 1024 (1020 words) with synthetic_zipf=0.7 makes the top 20 training words
      carry 25-30% of held-out text (mean 27%), like English (27-31%), so the
      high-frequency word proportion has room to move both ways (`synthetic.py` has the
      numbers per seed). 60 words at s=1.1 put 90% of the text on the top 20.
    synthetic_n: training sequences, a finite draw from the generator.
    synthetic_n_validation: validation sequences, a fresh draw from the generator.
    synthetic_zipf: Zipf exponent s of the word unigram, p(rank r) ~ r^-s. With the
      vocabulary it sets the share of the most frequent words: a larger s or fewer words
      put more of the text on the top 20.
    synthetic_eos_prob: probability of ending after each word (below the length cap).
    synthetic_concentration: Dirichlet concentration of the transition rows (smaller:
      peakier transitions, lower conditional entropy, easier to learn, more repeated
      sequences; the text's word shares, set by the chain's stationary distribution, then
      also stray further from the unigram, towards the top words, and vary more by seed).
    synthetic_seed: seed of the language and of its draws; None uses the `seed` given
      to `load_dataset`. The default keeps one fixed dataset across run seeds.
  """

  spec: str = "synthetic"
  seq_len: int = 128
  vocab_size: int = 2048
  tokenizer_type: TokenizerType = "bpe"
  cache_dir: str = DEFAULT_CACHE_DIR
  text_split: TextSplit = "auto"
  text_feature: str = "text"
  tfds_data_dir: str | None = None
  validation_fraction: float = 0.1
  max_documents: int | None = None
  synthetic_vocab_size: int = 1024
  synthetic_n: int = 2048
  synthetic_n_validation: int = 256
  synthetic_zipf: float = 0.7
  synthetic_eos_prob: float = 0.15
  synthetic_concentration: float = 2.0
  synthetic_seed: int | None = 0

  def __post_init__(self):
    parsed = parse_data_spec(self.spec)
    _check_int("seq_len", self.seq_len, 2, "an integer >= 2")
    if parsed.kind == "synthetic":
      _check_int("seq_len", self.seq_len, 3,
                 "an integer >= 3 for synthetic data (BOS, one word, EOS)")
    _check_int("vocab_size", self.vocab_size, 8, "an integer >= 8")
    if self.tokenizer_type not in TOKENIZER_TYPES:
      raise DataError(f"tokenizer_type={self.tokenizer_type!r} is not accepted; accepted: "
                      f"{', '.join(TOKENIZER_TYPES)}")
    if self.text_split not in TEXT_SPLITS:
      raise DataError(f"text_split={self.text_split!r} is not accepted; accepted: "
                      f"{', '.join(TEXT_SPLITS)}")
    if not self.cache_dir:
      raise DataError("cache_dir is empty; accepted: a directory path, e.g. ~/.cache/stabjax")
    if not self.text_feature:
      raise DataError("text_feature is empty; accepted: a TFDS feature name, e.g. 'text'")
    if not 0.0 < self.validation_fraction < 1.0:
      raise DataError(f"validation_fraction={self.validation_fraction} is not accepted; "
                      f"accepted: a number in (0, 1)")
    if self.max_documents is not None:
      _check_int("max_documents", self.max_documents, 1, "an integer >= 1 or None")
    _check_int("synthetic_vocab_size", self.synthetic_vocab_size, 5,
               "an integer >= 5 (4 reserved ids and at least one word)")
    _check_int("synthetic_n", self.synthetic_n, 1, "an integer >= 1")
    _check_int("synthetic_n_validation", self.synthetic_n_validation, 1, "an integer >= 1")
    if not self.synthetic_zipf >= 0.0:
      raise DataError(f"synthetic_zipf={self.synthetic_zipf} is not accepted; accepted: a "
                      f"number >= 0")
    if not 0.0 < self.synthetic_eos_prob <= 1.0:
      raise DataError(f"synthetic_eos_prob={self.synthetic_eos_prob} is not accepted; "
                      f"accepted: a number in (0, 1]")
    if not self.synthetic_concentration > 0.0:
      raise DataError(f"synthetic_concentration={self.synthetic_concentration} is not "
                      f"accepted; accepted: a number > 0")
    if self.synthetic_seed is not None:
      _check_int("synthetic_seed", self.synthetic_seed, 0, "an integer >= 0 or None")

  @property
  def data_spec(self) -> DataSpec:
    return parse_data_spec(self.spec)

  @property
  def cache_path(self) -> str:
    """`cache_dir` with '~' and environment variables expanded, absolute; a cloud path
    (gs://...) as given."""
    from stabjax import paths
    return str(paths.absolute(self.cache_dir))

  def replace(self, **kw) -> "DataConfig":
    return dataclasses.replace(self, **kw)


def _check_int(name: str, value, minimum: int, accepted: str) -> None:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
    raise DataError(f"{name}={value!r} is not accepted; accepted: {accepted}")
