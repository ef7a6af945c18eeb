"""`load_dataset`: a DataConfig -> tokenizer, packed splits and frequency tables (SPEC 8).

* `synthetic`: the language of `synthetic.py`; a finite training draw of n sequences and
  a fresh validation draw, one sequence per row (BOS w_1..w_k EOS PAD...), because the
  theory's quantities (P_emp, P_theta(S_0), Lemma 4.2) are per sequence.
* `text:` / `tfds:`: documents -> SentencePiece ids -> packed rows:
  BOS doc EOS BOS doc EOS ... chopped into seq_len-token rows; the final row is padded
  (mask 0 on its padding).

Text data is cached under `cache_dir` (default ~/.cache/stabjax):

    text-<hash of the files' contents, text_split, validation_fraction>/  or tfds-<name>-<hash>/
      manifest.json
      tfds/stabjax_text/1.0.0/...          the array_record dataset (text: only)
      word_counts.json                     training words (SPEC 9), made on first use
      spm-<type>-<vocab>/tokenizer.model   SentencePiece trained on the training split
      spm-<type>-<vocab>/neg_log_freq.npy  -log add-one unigram frequency, training split
      spm-<type>-<vocab>/<split>-T<len>.npy  packed int32 rows
      hf-<tokenizer fingerprint>/...       the same tables for a given (HF) tokenizer

`load_dataset(config, tokenizer=...)` tokenizes text with that tokenizer (e.g. the
`HFTokenizer` of a checkpoint, `--init_from`) instead of training SentencePiece; its
tables live under hf-<fingerprint of its files and special ids>/, so no SentencePiece
table is ever read for it, nor its tables for another tokenizer.

A first build happens in a temporary folder that is renamed into place at the end, so a
failure (e.g. a vocabulary the corpus cannot support) leaves nothing behind; every later
addition (another vocabulary or sequence length) is written to a temporary file and
renamed. All input is validated before anything is written.

`cache_dir` may be a cloud path (gs://, shared by every host of a pod): the cache is read
and written through `etils.epath`; local packed rows are memory-mapped, cloud ones read
into memory.
"""

from __future__ import annotations

import collections
import dataclasses
import difflib
import hashlib
import importlib
import itertools
import io
import json
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
from etils import epath
from etils.epath import Path

from stabjax.data import synthetic as synthetic_lib
from stabjax.data import tokenizer as tokenizer_lib
from stabjax.data.spec import DataConfig, DataError, DataSpec
# The one word tokenizer (SPEC 9), shared with stabjax.metrics; `text_words` is its
# name here.
from stabjax.words import words as text_words

SPLITS: tuple[str, ...] = ("train", "validation")
# Bump when the layout or the meaning of cached files changes.
CACHE_FORMAT = 1
# Lines of training text the tokenizer is trained on (the first ones, deterministic).
TOKENIZER_MAX_LINES = 2_000_000
_READ_CHUNK = 1024
TFDS_TEXT_CATEGORIES = ("text", "summarization", "translate", "question_answering",
                        "text_simplification")


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
  """One split as rows of token ids: `tokens` int32 [N, seq_len] (maybe a read-only memmap).

  `mask` is 1 on real tokens (BOS and EOS included) and 0 on padding; padding is the
  only place `pad_id` occurs.
  """

  tokens: np.ndarray
  pad_id: int = 0

  def __len__(self) -> int:
    return int(self.tokens.shape[0])

  @property
  def mask(self) -> np.ndarray:
    return (np.asarray(self.tokens) != self.pad_id).astype(np.int32)

  def rows(self, index: np.ndarray) -> dict[str, np.ndarray]:
    """{'tokens', 'mask'} int32 [len(index), seq_len] for the given row indices."""
    tokens = np.asarray(self.tokens[np.asarray(index)], dtype=np.int32)
    return {"tokens": tokens, "mask": (tokens != self.pad_id).astype(np.int32)}


class Dataset:
  """What training, evaluation and the metrics need from the data.

  Attributes:
    config: the DataConfig it was loaded from.
    spec: the parsed spec.
    tokenizer: SentencePieceTokenizer (text/tfds) or PseudoWordTokenizer (synthetic).
    splits: {'train': Split, 'validation': Split}.
    neg_log_freq: float32 [vocab_size], -log add-one-smoothed unigram frequency of the
      training split's real tokens (the token rarity of SPEC 6).
    synthetic: the SyntheticLanguage, or None for text data.
    cache_path: the cache folder (text/tfds), or None.
  """

  def __init__(self, *, config: DataConfig, spec: DataSpec, tokenizer: Any,
               splits: dict[str, Split], neg_log_freq: np.ndarray,
               word_counts: Callable[[], collections.Counter],
               validation_texts: Callable[[], list[str]],
               synthetic: synthetic_lib.SyntheticLanguage | None = None,
               cache_path: Path | None = None):
    self.config = config
    self.spec = spec
    self.tokenizer = tokenizer
    self.splits = splits
    self.neg_log_freq = neg_log_freq
    self.synthetic = synthetic
    self.cache_path = cache_path
    self._word_counts_fn = word_counts
    self._validation_texts_fn = validation_texts
    self._word_counts: collections.Counter | None = None
    self._validation_texts: list[str] | None = None

  @property
  def kind(self) -> str:
    return self.spec.kind

  @property
  def seq_len(self) -> int:
    return self.config.seq_len

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.vocab_size

  def split(self, name: str) -> Split:
    if name not in self.splits:
      raise DataError(f"unknown split {name!r}; accepted: {', '.join(self.splits)}")
    return self.splits[name]

  @property
  def train(self) -> Split:
    return self.splits["train"]

  @property
  def validation(self) -> Split:
    return self.splits["validation"]

  def train_word_counts(self) -> collections.Counter:
    """Counter of the training corpus's words (lowercase [a-z']+ runs, SPEC 9); cached."""
    if self._word_counts is None:
      self._word_counts = self._word_counts_fn()
    return collections.Counter(self._word_counts)

  def validation_texts(self, limit: int | None = None) -> list[str]:
    """Held-out reference text: validation documents (synthetic: decoded sequences)."""
    if self._validation_texts is None:
      self._validation_texts = self._validation_texts_fn()
    return list(self._validation_texts[:limit])

  def train_empirical(self) -> synthetic_lib.Empirical:
    """P_emp of the synthetic training set (S_0, counts, P_emp; paper eq. 6)."""
    if self.synthetic is None:
      raise DataError(f"P_emp is only known for synthetic data, not {self.spec}")
    return self.synthetic.empirical(self.train.tokens, self.train.mask)

  def __repr__(self) -> str:
    sizes = ", ".join(f"{k}={len(v)}" for k, v in self.splits.items())
    return (f"Dataset({self.spec}, seq_len={self.seq_len}, vocab_size={self.vocab_size}, "
            f"rows: {sizes})")


def load_dataset(config: DataConfig, seed: int = 0, tokenizer: Any = None) -> Dataset:
  """The dataset `config` describes, built or read from the cache (SPEC section 8).

  `tokenizer` (text/tfds only): tokenize with it instead of a SentencePiece model
  trained on the data; it needs `encode_batch` and a `fingerprint` string that
  identifies its tokenization (the cache key).

  `seed` is the run seed. It only matters for synthetic data with
  `synthetic_seed=None`; text data and the default synthetic data do not depend on it,
  so runs with different seeds see the same data (in a seed-dependent order, see
  `pipeline.make_iterator`).
  """
  spec = config.data_spec
  if spec.kind == "synthetic":
    if tokenizer is not None:
      raise DataError(f"{spec} data has its own word tokenizer; a given tokenizer (e.g. "
                      f"--init_from's) needs text: or tfds: data")
    return _load_synthetic(config, spec, seed)
  if spec.kind == "text":
    return _load_text(config, spec, tokenizer)
  return _load_tfds(config, spec, tokenizer)


def neg_log_frequency(tokens: np.ndarray, mask: np.ndarray, vocab_size: int) -> np.ndarray:
  """-log((count + 1) / (total + V)) per token id over the real positions; float32 [V]."""
  ids = np.asarray(tokens)[np.asarray(mask) > 0].astype(np.int64)
  counts = np.bincount(ids, minlength=vocab_size)[:vocab_size].astype(np.float64)
  return (-np.log((counts + 1.0) / (counts.sum() + vocab_size))).astype(np.float32)


# ------------------------------------------------------------------------------ synthetic


def _load_synthetic(config: DataConfig, spec: DataSpec, seed: int) -> Dataset:
  s = config.synthetic_seed if config.synthetic_seed is not None else seed
  if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0:
    raise DataError(f"seed={s!r} is not accepted for synthetic data; accepted: an integer >= 0")
  lang = synthetic_lib.SyntheticLanguage(
      vocab_size=config.synthetic_vocab_size, max_len=config.seq_len,
      zipf_exponent=config.synthetic_zipf, eos_prob=config.synthetic_eos_prob,
      concentration=config.synthetic_concentration, seed=int(s))
  train, _ = lang.sample(np.random.SeedSequence([int(s), 1]), config.synthetic_n)
  val, _ = lang.sample(np.random.SeedSequence([int(s), 2]), config.synthetic_n_validation)
  tok = tokenizer_lib.PseudoWordTokenizer(config.synthetic_vocab_size)
  splits = {"train": Split(train, tok.pad_id), "validation": Split(val, tok.pad_id)}

  def word_counts() -> collections.Counter:
    ids, counts = np.unique(train[train >= tok.num_reserved], return_counts=True)
    return collections.Counter({tok.words[i - tok.num_reserved]: int(c)
                                for i, c in zip(ids, counts)})

  return Dataset(config=config, spec=spec, tokenizer=tok, splits=splits,
                 neg_log_freq=neg_log_frequency(train, train != tok.pad_id, tok.vocab_size),
                 word_counts=word_counts,
                 validation_texts=lambda: [tok.decode(r) for r in val],
                 synthetic=lang)


# ------------------------------------------------------------------------------ text data


@dataclasses.dataclass
class _Source:
  """Where the documents of each split come from, for one cache folder."""

  docs: Callable[[Path, str], Iterable[str]]  # (cache folder, split) -> documents
  build: Callable[[Path], None] | None = None  # writes the source data into a new folder
  manifest: dict | None = None


def _load_text(config: DataConfig, spec: DataSpec, tokenizer: Any = None) -> Dataset:
  from stabjax.data import text_builder

  files = text_builder.resolve_files(spec.path)
  key = _hash(text_builder.content_hash(files), config.validation_fraction,
              config.text_split, text_builder.StabjaxText.VERSION, CACHE_FORMAT)
  root = epath.Path(config.cache_path) / f"text-{key[:16]}"
  documents: dict[str, list[str]] = {}

  if not root.is_dir():
    # Read and check everything before a byte is written.
    train, val = text_builder.split_documents(
        text_builder.read_documents(files, config.text_split), config.validation_fraction)
    documents = {"train": train, "validation": val}

  def build(work: Path) -> None:
    builder = text_builder.StabjaxText(
        files=files, validation_fraction=config.validation_fraction,
        text_split=config.text_split, documents=(documents["train"], documents["validation"]),
        data_dir=str(work / "tfds"), file_format="array_record")
    builder.download_and_prepare()

  def docs(folder: Path, split: str) -> Iterable[str]:
    if split in documents:
      return documents[split]
    builder = text_builder.StabjaxText(data_dir=str(folder / "tfds"),
                                       file_format="array_record")
    return _iter_feature(builder.as_data_source()[split], "text", None)

  manifest = {"spec": str(spec), "files": files, "validation_fraction":
              config.validation_fraction, "text_split": config.text_split,
              "format": CACHE_FORMAT}
  dataset = _load_cached(config, spec, root, _Source(docs=docs, build=build, manifest=manifest),
                         tokenizer)
  documents.clear()  # from now on the documents are read from the cache folder
  return dataset


def _load_tfds(config: DataConfig, spec: DataSpec, tokenizer: Any = None) -> Dataset:
  import tensorflow_datasets as tfds
  from tensorflow_datasets.core import registered

  from stabjax.data import text_builder  # also registers 'stabjax_text'

  for category in TFDS_TEXT_CATEGORIES:  # TFDS imports these lazily: register c4 & co
    try:
      importlib.import_module(f"tensorflow_datasets.{category}")
    except Exception:  # pylint: disable=broad-except
      pass
  try:
    builder = tfds.builder(spec.tfds_id, data_dir=config.tfds_data_dir)
  except registered.DatasetNotFoundError:
    raise DataError(_unknown_tfds_message(spec.name)) from None
  except (ValueError, AssertionError, KeyError) as e:
    raise DataError(_bad_tfds_config_message(spec, e)) from None
  if not builder.is_prepared():
    raise DataError(
        f"tfds:{spec.tfds_id} is not prepared in {builder.data_dir} and is never downloaded "
        f"here; prepare it on a machine with network (tfds build {spec.tfds_id} "
        f"--file_format=array_record --data_dir=DIR) and pass --tfds_data_dir=DIR")
  fmt = str(getattr(builder.info.file_format, "value", builder.info.file_format))
  if fmt not in ("array_record", "parquet"):
    raise DataError(f"tfds:{spec.tfds_id} is prepared as {fmt} in {builder.data_dir}; random "
                    f"access needs array_record: rebuild it with --file_format=array_record")
  features = builder.info.features
  if config.text_feature not in features:
    raise DataError(f"tfds:{spec.tfds_id} has no feature {config.text_feature!r}; set "
                    f"text_feature to one of: {', '.join(features.keys())}")
  available = list(builder.info.splits.keys())
  if "train" not in available:
    raise DataError(f"tfds:{spec.tfds_id} has no 'train' split (splits: "
                    f"{', '.join(available)})")
  val_split = next((s for s in ("validation", "test") if s in available), None)
  limit = config.max_documents
  key = _hash(builder.name, builder.builder_config.name if builder.builder_config else "",
              str(builder.version), config.text_feature, val_split, limit,
              config.validation_fraction if val_split is None else None, CACHE_FORMAT)
  label = spec.tfds_id.replace("/", "-").replace(":", "-")
  root = epath.Path(config.cache_path) / f"tfds-{label}-{key[:12]}"
  sources = builder.as_data_source()
  carved: dict[str, list[str]] = {}

  def docs(folder: Path, split: str) -> Iterable[str]:
    del folder
    if val_split is not None:
      source = sources["train" if split == "train" else val_split]
      return _iter_feature(source, config.text_feature, limit)
    if not carved:  # no held-out split: carve one from train by document hash
      train, val = text_builder.split_documents(
          list(_iter_feature(sources["train"], config.text_feature, limit)),
          config.validation_fraction)
      carved.update(train=train, validation=val)
    return carved[split]

  manifest = {"spec": str(spec), "data_dir": str(builder.data_dir), "version":
              str(builder.version), "text_feature": config.text_feature,
              "validation_split": val_split or f"hash({config.validation_fraction}) of train",
              "max_documents": limit, "format": CACHE_FORMAT}
  return _load_cached(config, spec, root, _Source(docs=docs, manifest=manifest), tokenizer)


def _unknown_tfds_message(name: str) -> str:
  import tensorflow_datasets as tfds

  try:
    names = tfds.list_builders(with_community_datasets=False)
  except Exception:  # pylint: disable=broad-except
    names = []
  close = difflib.get_close_matches(name, list(dict.fromkeys(names)), n=3)
  hint = f"did you mean {', '.join(close)}? " if close else ""
  return (f"unknown TFDS dataset {name!r}; {hint}list names with "
          f"tfds.list_builders(with_community_datasets=False) or see "
          f"https://www.tensorflow.org/datasets/catalog/overview")


def _bad_tfds_config_message(spec: DataSpec, error: Exception) -> str:
  import tensorflow_datasets as tfds

  try:
    configs = [c.name for c in tfds.builder_cls(spec.name).BUILDER_CONFIGS]
  except Exception:  # pylint: disable=broad-except
    configs = []
  if spec.config is not None and configs and spec.config not in configs:
    shown = ", ".join(configs[:20]) + (", ..." if len(configs) > 20 else "")
    return f"tfds:{spec.name} has no config {spec.config!r}; accepted: {shown}"
  return f"tfds:{spec.tfds_id}: {' '.join(str(error).split())[:300]}"


def _iter_feature(source, feature: str, limit: int | None) -> Iterator[str]:
  """The text of `feature` for the first `limit` records of a TFDS data source."""
  n = len(source) if limit is None else min(limit, len(source))
  for start in range(0, n, _READ_CHUNK):
    for record in source.__getitems__(list(range(start, min(start + _READ_CHUNK, n)))):
      value = record[feature]
      yield value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _load_cached(config: DataConfig, spec: DataSpec, root: Path, source: _Source,
                 tokenizer: Any = None) -> Dataset:
  """Builds (or reuses) the cache folder `root`, then reads the dataset out of it.

  With `tokenizer` its tables go to hf-<fingerprint>/ and no SentencePiece is trained.
  """
  if tokenizer is not None:
    tok_dir = f"hf-{tokenizer.fingerprint[:16]}"
  else:
    tok_dir = f"spm-{config.tokenizer_type}-{config.vocab_size}"
  proto = None
  if tokenizer is None and not (root / tok_dir / "tokenizer.model").exists():
    # Trained before anything is written: a vocabulary the corpus cannot support fails
    # here, with the cache untouched.
    lines = _training_lines(source.docs(root, "train"))
    proto = tokenizer_lib.train_sentencepiece(lines, config.vocab_size, config.tokenizer_type)

  def complete(folder: Path) -> None:
    _ensure_tokenized(config, folder, folder / tok_dir, source, proto, tokenizer)

  if root.is_dir():
    complete(root)
  else:
    _build_atomically(root, source, complete)

  tok = (tokenizer if tokenizer is not None
         else _load_tokenizer(root / tok_dir / "tokenizer.model"))
  splits = {s: Split(_load_npy(root / tok_dir / f"{s}-T{config.seq_len}.npy", mmap=True),
                     tok.pad_id) for s in SPLITS}
  neg_log_freq = _load_npy(root / tok_dir / "neg_log_freq.npy")

  def word_counts() -> collections.Counter:
    path = root / "word_counts.json"
    if path.exists():
      return collections.Counter(json.loads(path.read_text()))
    counts = collections.Counter()
    for doc in source.docs(root, "train"):
      counts.update(text_words(doc))
    _atomic_write_bytes(path, json.dumps(dict(counts.most_common())).encode())
    return counts

  return Dataset(config=config, spec=spec, tokenizer=tok, splits=splits,
                 neg_log_freq=neg_log_freq, word_counts=word_counts,
                 validation_texts=lambda: list(source.docs(root, "validation")),
                 cache_path=_public_path(root))


def _build_atomically(root: Path, source: _Source, complete: Callable[[Path], None]) -> None:
  """Builds into a temporary sibling folder and renames it to `root` when all succeeded."""
  parent = root.parent
  made_parent = not parent.exists()
  parent.mkdir(parents=True, exist_ok=True)
  work = parent / f".tmp-{root.name}-{uuid.uuid4().hex}"
  work.mkdir()
  try:
    if source.build is not None:
      source.build(work)
    complete(work)
    if source.manifest is not None:
      _atomic_write_bytes(work / "manifest.json", json.dumps(source.manifest, indent=1).encode())
    try:
      work.rename(root)
    except OSError:
      if not root.is_dir():
        raise
      _rmtree_quietly(work)  # another process built it first
      complete(root)
  except BaseException:
    _rmtree_quietly(work)
    if made_parent:
      try:
        parent.rmdir()
      except OSError:
        pass
    raise


def _ensure_tokenized(config: DataConfig, folder: Path, tok_dir: Path, source: _Source,
                      proto: bytes | None, tokenizer: Any = None) -> None:
  """Tokenizer, packed splits and frequency table in `tok_dir`, each made once.

  `proto` is the freshly trained tokenizer, written when `tok_dir` has none yet. A given
  `tokenizer` is used as is (its fingerprint recorded in tokenizer.txt).
  """
  model_path = tok_dir / "tokenizer.model"
  if tokenizer is not None:
    tok_dir.mkdir(exist_ok=True)
    if not (tok_dir / "tokenizer.txt").exists():
      _atomic_write_bytes(tok_dir / "tokenizer.txt",
                          f"{tokenizer!r}\n{tokenizer.fingerprint}\n".encode())
    tok = tokenizer
  elif not model_path.exists():
    if proto is None:
      proto = tokenizer_lib.train_sentencepiece(_training_lines(source.docs(folder, "train")),
                                                config.vocab_size, config.tokenizer_type)
    tok_dir.mkdir(exist_ok=True)
    _atomic_write_bytes(model_path, proto)
  if tokenizer is None:
    tok = _load_tokenizer(model_path)
  for split in SPLITS:
    path = tok_dir / f"{split}-T{config.seq_len}.npy"
    if not path.exists():
      rows = pack_documents(source.docs(folder, split), tok, config.seq_len)
      _atomic_write(path, lambda f, rows=rows: np.save(f, rows))
  freq_path = tok_dir / "neg_log_freq.npy"
  if not freq_path.exists():
    train = _load_npy(tok_dir / f"train-T{config.seq_len}.npy", mmap=True)
    freq = neg_log_frequency(train, train != tok.pad_id, tok.vocab_size)
    _atomic_write(freq_path, lambda f: np.save(f, freq))


def _training_lines(docs: Iterable[str]) -> Iterator[str]:
  """Non-empty lines of the training documents, at most TOKENIZER_MAX_LINES."""
  lines = (line for doc in docs for line in doc.split("\n") if line.strip())
  return itertools.islice(lines, TOKENIZER_MAX_LINES)


def pack_documents(docs: Iterable[str], tokenizer, seq_len: int) -> np.ndarray:
  """BOS doc EOS BOS doc EOS ... as int32 [ceil(n / seq_len), seq_len], PAD-filled tail."""
  bos, eos = np.int32(tokenizer.bos_id), np.int32(tokenizer.eos_id)
  pieces: list[np.ndarray] = []
  chunk: list[str] = []

  def flush() -> None:
    for ids in tokenizer.encode_batch(chunk):
      pieces.append(np.concatenate([[bos], np.asarray(ids, np.int32), [eos]]).astype(np.int32))
    chunk.clear()

  for doc in docs:
    chunk.append(doc)
    if len(chunk) >= _READ_CHUNK:
      flush()
  flush()
  flat = np.concatenate(pieces) if pieces else np.zeros((0,), np.int32)
  n_rows = max(1, -(-flat.size // seq_len))
  out = np.full(n_rows * seq_len, tokenizer.pad_id, np.int32)
  out[:flat.size] = flat
  return out.reshape(n_rows, seq_len)


def _hash(*parts) -> str:
  return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()


def _atomic_write(path: Path, write: Callable[[Any], None]) -> None:
  tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
  try:
    with tmp.open("wb") as f:
      write(f)
    tmp.replace(path)
  except BaseException:
    if tmp.exists():
      tmp.unlink()
    raise


def _public_path(path: Path):
  """`Dataset.cache_path`: a pathlib.Path when local (rglob and friends work), else the
  epath.Path of the cloud folder."""
  import pathlib
  from stabjax import paths
  return pathlib.Path(path) if paths.is_local(path) else path


def _rmtree_quietly(path: Path) -> None:
  try:
    path.rmtree()
  except OSError:
    pass


def _load_tokenizer(path: Path) -> tokenizer_lib.SentencePieceTokenizer:
  return tokenizer_lib.SentencePieceTokenizer(path.read_bytes())


def _load_npy(path: Path, mmap: bool = False) -> np.ndarray:
  """A .npy file: memory-mapped when local and `mmap`, else read (cloud paths)."""
  from stabjax import paths
  if paths.is_local(path):
    return np.load(path, mmap_mode="r" if mmap else None)
  return np.load(io.BytesIO(path.read_bytes()))


def _atomic_write_bytes(path: Path, data: bytes) -> None:
  _atomic_write(path, lambda f: f.write(data))
