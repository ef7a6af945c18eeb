"""Local text files -> a TFDS array_record dataset with 'train' and 'validation' splits.

SPEC section 8, `--data=text:PATH_OR_GLOB`. How a file is cut into documents is
`DataConfig.text_split` (`--text_split`), decided per file:

* `blank_line`: documents are blocks separated by blank lines (a line that is empty or
  holds only whitespace), so one big file still holds many multi-line documents;
* `line`: every non-blank line is one document (a news corpus, one article per line);
* `auto` (default): `blank_line` for a file that has a blank line between two non-blank
  lines, else `line`.

Files are decoded as UTF-8; a leading byte order mark is dropped and Windows (CRLF) and
old Mac (CR) line ends become '\n', so neither reaches the tokenizer or the word
metrics. Each document goes to the
validation split when a stable hash of its text falls below `validation_fraction`, so
identical documents always land in the same split and no document is in both. If no
document hashes into validation, the one with the smallest hash is moved there (and
symmetrically for train), so both splits are non-empty whenever there are >= 2 distinct
documents.

TFDS needs the builder class in a package module (it inspects the module's folder), and
reads it back without TensorFlow through `builder.as_data_source()` (ENVIRONMENT.md).
A builder constructed without files reads an already prepared dataset, which is how
`tfds.data_source('stabjax_text', data_dir=...)` finds one.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
from collections.abc import Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from stabjax import paths
from stabjax.data.spec import TEXT_SPLITS, DataError

BUILDER_NAME = "stabjax_text"
_BLANK_LINE = re.compile(r"\n[ \t\r\f\v]*\n")


def resolve_files(path_or_glob: str) -> list[str]:
  """The sorted regular files a `text:` path or glob names; DataError if there are none.

  A cloud path or glob (gs://bucket/books/*.txt) is listed through `etils.epath`."""
  if not paths.is_local(path_or_glob):
    return _resolve_cloud_files(path_or_glob)
  path = os.path.expanduser(path_or_glob)
  if glob.has_magic(path):
    files = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
    if not files:
      raise DataError(f"text:{path_or_glob}: the glob matched no files; check the pattern "
                      f"(quote it so the shell does not expand it)")
    return [os.path.abspath(f) for f in files]
  if not os.path.exists(path):
    raise DataError(f"text:{path_or_glob}: no such file; give an existing file or a glob "
                    f"such as 'text:corpus/*.txt'")
  if os.path.isdir(path):
    raise DataError(f"text:{path_or_glob} is a directory; give a glob such as "
                    f"'text:{path_or_glob.rstrip('/')}/*.txt'")
  return [os.path.abspath(path)]


def _resolve_cloud_files(path_or_glob: str) -> list[str]:
  if glob.has_magic(path_or_glob):
    parts = path_or_glob.split("/")
    fixed = next(i for i, p in enumerate(parts) if glob.has_magic(p))
    root = epath.Path("/".join(parts[:fixed]))
    files = sorted(str(f) for f in root.glob("/".join(parts[fixed:])) if f.is_file())
    if not files:
      raise DataError(f"text:{path_or_glob}: the glob matched no files; check the pattern "
                      f"(quote it so the shell does not expand it)")
    return files
  path = epath.Path(path_or_glob)
  if not path.exists():
    raise DataError(f"text:{path_or_glob}: no such file; give an existing file or a glob "
                    f"such as 'text:gs://bucket/corpus/*.txt'")
  if path.is_dir():
    raise DataError(f"text:{path_or_glob} is a directory; give a glob such as "
                    f"'text:{path_or_glob.rstrip('/')}/*.txt'")
  return [str(path)]


def read_text_file(path: str) -> str:
  """The UTF-8 text of a file with '\\n' line ends; DataError if empty or not UTF-8."""
  raw = epath.Path(path).read_bytes()
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise DataError(f"{path} is not valid UTF-8 (byte {e.start}: {e.reason}); convert it, "
                    f"e.g. iconv -f latin1 -t utf-8") from None
  text = text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
  if not text.strip():
    raise DataError(f"{path} is empty; remove it from the file list or add text")
  return text


def split_into_documents(text: str, text_split: str = "auto") -> list[str]:
  """The documents of one file's text (see the module docstring for `text_split`).

  Trailing whitespace and surrounding newlines are removed; blank documents are dropped.
  """
  if text_split not in TEXT_SPLITS:
    raise DataError(f"text_split={text_split!r} is not accepted; accepted: "
                    f"{', '.join(TEXT_SPLITS)}")
  if text_split == "auto":
    text_split = "blank_line" if _BLANK_LINE.search(text.strip()) else "line"
  blocks = _BLANK_LINE.split(text) if text_split == "blank_line" else text.split("\n")
  docs = (b.strip("\n").rstrip() for b in blocks)
  return [d for d in docs if d.strip()]


def document_hash(doc: str) -> float:
  """A stable uniform number in [0, 1) from the document's text (sha256)."""
  return int.from_bytes(hashlib.sha256(doc.encode("utf-8")).digest()[:8], "big") / 2.0**64


def split_documents(docs: Sequence[str], validation_fraction: float
                    ) -> tuple[list[str], list[str]]:
  """(train, validation) documents by `document_hash`, both non-empty.

  Raises DataError with fewer than two distinct documents.
  """
  if len(set(docs)) < 2:
    raise DataError(f"the text has {len(set(docs))} distinct document(s); at least 2 are "
                    f"needed for train and validation splits: separate documents by blank "
                    f"lines or put one per line (--text_split=auto|blank_line|line)")
  h = np.array([document_hash(d) for d in docs])
  to_val = h < validation_fraction
  if not to_val.any():
    to_val = h == h.min()
  elif to_val.all():
    to_val = h != h.max()
  train = [d for d, v in zip(docs, to_val) if not v]
  val = [d for d, v in zip(docs, to_val) if v]
  return train, val


def read_documents(files: Sequence[str], text_split: str = "auto") -> list[str]:
  """All documents of `files`, in file order; DataError for an unreadable file."""
  docs = []
  for f in files:
    docs.extend(split_into_documents(read_text_file(f), text_split))
  return docs


def content_hash(files: Sequence[str]) -> str:
  """sha256 over the files' contents in order (names do not matter)."""
  h = hashlib.sha256()
  for f in files:
    h.update(hashlib.sha256(epath.Path(f).read_bytes()).digest())
  return h.hexdigest()


class StabjaxText(tfds.core.GeneratorBasedBuilder):
  """Documents of local UTF-8 files, hash-split into 'train' and 'validation'.

  Args:
    files: the text files (see `resolve_files`); None to read a prepared dataset.
    validation_fraction: share of documents hashed into validation.
    text_split: how files are cut into documents ('auto', 'blank_line' or 'line').
    documents: optional precomputed (train, validation) documents of `files`, to skip
      reading them again.
    **kwargs: `tfds.core.GeneratorBasedBuilder` arguments (data_dir, file_format, ...).
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Blank-line (or one-per-line) documents, sha256 hash split."}

  def __init__(self, *, files: Sequence[str] | None = None, validation_fraction: float = 0.1,
               text_split: str = "auto",
               documents: tuple[Sequence[str], Sequence[str]] | None = None, **kwargs):
    self._files = list(files) if files is not None else None
    self._validation_fraction = validation_fraction
    self._text_split = text_split
    self._documents = documents
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description="Local UTF-8 text files, documents split by blank lines or lines.",
        features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
        disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager  # local files only, nothing to download
    if self._documents is None:
      if self._files is None:
        raise DataError("StabjaxText needs files= to prepare a dataset")
      self._documents = split_documents(read_documents(self._files, self._text_split),
                                        self._validation_fraction)
    train, val = self._documents
    return {"train": self._generate_examples(train),
            "validation": self._generate_examples(val)}

  def _generate_examples(self, docs):
    for i, doc in enumerate(docs):
      yield i, {"text": doc}
