"""text: and tfds: data (SPEC 8): hash split, SentencePiece, packing, cache, input errors."""

from __future__ import annotations

import collections
import os

import numpy as np
import pytest

from stabjax.data import (DataConfig, DataError, DataSpec, load_dataset, parse_data_spec,
                          text_words)
from stabjax.data import dataset as dataset_lib
from stabjax.data import text_builder
from stabjax.data import tokenizer as tokenizer_lib

VOCAB = 320  # byte fallback needs 256 bytes + 6 specials + the corpus's characters
WORDS = ("the and of to a in that is was he for it with as his on be at by i this had not "
         "are but from or have an they which one you were her all she there would their we "
         "him been has when who will more no if out so said what up its about into than them "
         "can only other new some could time these two may then do first any my now such like "
         "our over man me even most made after also did many before must through back years "
         "where much your way well down should because each just those people mr how too "
         "little state good very make world still own see men work long get here between "
         "both life being under never day same another know while last might us great old "
         "year off come since against go came right used take three").split()


def make_corpus(folder, n_files=3, docs_per_file=25, seed=0) -> list[str]:
  """Files of blank-line-separated documents of random English words; the documents."""
  rng = np.random.default_rng(seed)
  folder.mkdir(parents=True, exist_ok=True)
  all_docs = []
  for f in range(n_files):
    docs = []
    for _ in range(docs_per_file):
      lines = []
      for _ in range(rng.integers(1, 4)):
        words = rng.choice(WORDS, size=rng.integers(4, 12))
        lines.append(" ".join(words).capitalize() + rng.choice([".", "!", "?", ","]))
      docs.append("\n".join(lines))
    (folder / f"part{f}.txt").write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    all_docs += docs
  return all_docs


def train_documents(ds) -> list[str]:
  source = text_builder.StabjaxText(data_dir=str(ds.cache_path / "tfds"),
                                    file_format="array_record").as_data_source()["train"]
  return [source[i]["text"].decode() for i in range(len(source))]


def test_text_splits_tokenizer_and_packing(tmp_path):
  docs = make_corpus(tmp_path / "corpus")
  cfg = DataConfig(spec=f"text:{tmp_path}/corpus/*.txt", seq_len=32, vocab_size=VOCAB,
                   cache_dir=str(tmp_path / "cache"), validation_fraction=0.2)
  ds = load_dataset(cfg)
  train, val = train_documents(ds), ds.validation_texts()
  # A hash split: disjoint, complete, both non-empty, same as the pure function's.
  assert train and val and not set(train) & set(val)
  assert sorted(train + val) == sorted(docs)
  assert (train, val) == text_builder.split_documents(docs, 0.2)

  tok = ds.tokenizer
  assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (VOCAB, 0, 1, 2)
  assert tok.id_to_piece(tok.mask_id) == "[MASK]"
  for s in docs[:20] + ["  Two  spaces,\n\nblank line\ttab and a trailing space ",
                        "Ünïcode café — naïve ✓ 漢字", "[MASK] the man"]:
    assert tok.decode(tok.encode(s)) == s
  assert tok.encode("[MASK]")[-1] == tok.mask_id

  # Packed rows: BOS doc EOS BOS doc EOS ... in document order, PAD only at the very end.
  stream = [t for d in train for t in [tok.bos_id, *tok.encode(d), tok.eos_id]]
  rows = np.asarray(ds.train.tokens)
  assert rows.shape == (-(-len(stream) // 32), 32) and rows.dtype == np.int32
  flat = rows.ravel()
  np.testing.assert_array_equal(flat[:len(stream)], stream)
  assert np.all(flat[len(stream):] == tok.pad_id)
  np.testing.assert_array_equal(ds.train.mask.ravel(), np.arange(flat.size) < len(stream))

  # Token rarity table and training words, against independent computations.
  counts = collections.Counter(stream)
  ref = [-np.log((counts.get(v, 0) + 1) / (len(stream) + VOCAB)) for v in range(VOCAB)]
  np.testing.assert_allclose(ds.neg_log_freq, ref, rtol=1e-6)
  assert ds.train_word_counts() == collections.Counter(w for d in train for w in text_words(d))


def test_second_build_reuses_dataset_tokenizer_and_tables(tmp_path, monkeypatch):
  make_corpus(tmp_path / "corpus")
  cfg = DataConfig(spec=f"text:{tmp_path}/corpus/*.txt", seq_len=32, vocab_size=VOCAB,
                   cache_dir=str(tmp_path / "cache"))
  first = load_dataset(cfg)
  first.train_word_counts()  # writes word_counts.json
  files = sorted(p for p in first.cache_path.rglob("*") if p.is_file())
  mtimes = {p: os.stat(p).st_mtime_ns for p in files}

  def forbidden(*args, **kwargs):
    raise AssertionError("rebuilt although cached")

  monkeypatch.setattr(tokenizer_lib, "train_sentencepiece", forbidden)
  monkeypatch.setattr(text_builder.StabjaxText, "_split_generators", forbidden)
  monkeypatch.setattr(dataset_lib, "pack_documents", forbidden)
  second = load_dataset(cfg)
  assert second.cache_path == first.cache_path
  np.testing.assert_array_equal(second.train.tokens, first.train.tokens)
  np.testing.assert_array_equal(second.neg_log_freq, first.neg_log_freq)
  assert second.train_word_counts() == first.train_word_counts()
  assert {p: os.stat(p).st_mtime_ns for p in files} == mtimes
  assert sorted(p for p in first.cache_path.rglob("*") if p.is_file()) == files

  # A new sequence length re-packs but reuses the dataset and the tokenizer.
  monkeypatch.undo()
  monkeypatch.setattr(tokenizer_lib, "train_sentencepiece", forbidden)
  monkeypatch.setattr(text_builder.StabjaxText, "_split_generators", forbidden)
  third = load_dataset(cfg.replace(seq_len=16))
  assert third.train.tokens.shape[1] == 16
  np.testing.assert_array_equal(np.asarray(third.train.tokens).ravel()[:64],
                                np.asarray(first.train.tokens).ravel()[:64])


def test_tfds_spec_reads_a_prepared_dataset(tmp_path):
  make_corpus(tmp_path / "corpus")
  text_ds = load_dataset(DataConfig(spec=f"text:{tmp_path}/corpus/*.txt", seq_len=32,
                                    vocab_size=VOCAB, cache_dir=str(tmp_path / "cache")))
  cfg = DataConfig(spec="tfds:stabjax_text", tfds_data_dir=str(text_ds.cache_path / "tfds"),
                   seq_len=32, vocab_size=VOCAB, cache_dir=str(tmp_path / "cache2"))
  tfds_ds = load_dataset(cfg)
  assert tfds_ds.validation_texts() == text_ds.validation_texts()
  np.testing.assert_array_equal(tfds_ds.train.tokens, text_ds.train.tokens)
  with pytest.raises(DataError, match="no feature 'body'"):
    load_dataset(cfg.replace(text_feature="body"))


def _bad(tmp_path):
  """name -> (config kwargs, phrase in the error); the files are made here."""
  d = tmp_path / "in"
  d.mkdir()
  (d / "empty.txt").write_text("  \n\n", encoding="utf-8")
  (d / "latin1.txt").write_bytes("caf\xe9 au lait\n\nand more\n".encode("latin-1"))
  make_corpus(d / "ok")
  ok = f"text:{d}/ok/*.txt"
  return {
      "missing path": (dict(spec=f"text:{d}/nope.txt"), "no such file"),
      "empty file": (dict(spec=f"text:{d}/empty.txt"), "is empty"),
      "glob matching nothing": (dict(spec=f"text:{d}/*.md"), "matched no files"),
      "non-UTF-8 file": (dict(spec=f"text:{d}/latin1.txt"), "not valid UTF-8"),
      "unknown TFDS name": (dict(spec="tfds:no_such_dataset_xyz"), "unknown TFDS dataset"),
      "TFDS not prepared": (dict(spec="tfds:tiny_shakespeare",
                                 tfds_data_dir=str(tmp_path / "tfds")), "is not prepared"),
      "vocabulary too large": (dict(spec=ok, vocab_size=20000), "larger than this corpus"),
      "vocabulary too small": (dict(spec=ok, vocab_size=100), "too small"),
      "sequence length 1": (dict(spec=ok, seq_len=1), "seq_len"),
      "unknown spec kind": (dict(spec=f"csv:{d}/a.csv"), "unknown data spec kind 'csv'"),
  }


BAD_CASES = ["missing path", "empty file", "glob matching nothing", "non-UTF-8 file",
             "unknown TFDS name", "TFDS not prepared", "vocabulary too large",
             "vocabulary too small", "sequence length 1", "unknown spec kind"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_line_data_error_and_leaves_no_cache(tmp_path, case):
  kwargs, phrase = _bad(tmp_path)[case]
  cache = tmp_path / "cache"
  with pytest.raises(DataError) as e:
    load_dataset(DataConfig(**{"vocab_size": VOCAB, "cache_dir": str(cache), **kwargs}))
  msg = str(e.value)
  assert phrase in msg and "\n" not in msg, msg
  assert not cache.exists()  # checked before anything was written, not even the cache dir


def test_vocabulary_is_checked_before_the_dataset_is_built(tmp_path, monkeypatch):
  make_corpus(tmp_path / "corpus")

  def forbidden(*args, **kwargs):
    raise AssertionError("built before the vocabulary was checked")

  monkeypatch.setattr(text_builder.StabjaxText, "_split_generators", forbidden)
  with pytest.raises(DataError, match="larger than this corpus supports"):
    load_dataset(DataConfig(spec=f"text:{tmp_path}/corpus/*.txt", vocab_size=20000,
                            cache_dir=str(tmp_path / "cache")))


def test_one_document_cannot_be_split(tmp_path):
  (tmp_path / "one.txt").write_text("just one paragraph\nwith two lines\n", encoding="utf-8")
  with pytest.raises(DataError, match="at least 2 are needed.*--text_split"):
    load_dataset(DataConfig(spec=f"text:{tmp_path}/one.txt", cache_dir=str(tmp_path / "c"),
                            text_split="blank_line"))
  assert not (tmp_path / "c").exists()


def news_lines(n=120, seed=1) -> list[str]:
  """One article per line, no blank line: the shape of a news crawl."""
  rng = np.random.default_rng(seed)
  return [" ".join(rng.choice(WORDS, size=rng.integers(8, 20))).capitalize() + "."
          for _ in range(n)]


def test_one_document_per_line_file_splits_into_train_and_validation(tmp_path):
  lines = news_lines()
  (tmp_path / "news.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
  ds = load_dataset(DataConfig(spec=f"text:{tmp_path}/news.txt", seq_len=32, vocab_size=VOCAB,
                               cache_dir=str(tmp_path / "cache")))  # text_split=auto
  train, val = train_documents(ds), ds.validation_texts()
  assert train and val and sorted(train + val) == sorted(lines)
  assert len(ds.train) > 1 and len(ds.validation) >= 1  # packed rows to train on
  # 'blank_line' reads the same file as one document, which cannot be split.
  with pytest.raises(DataError, match="1 distinct document"):
    load_dataset(DataConfig(spec=f"text:{tmp_path}/news.txt", vocab_size=VOCAB,
                            cache_dir=str(tmp_path / "cache"), text_split="blank_line"))


@pytest.mark.parametrize("encoding", ["crlf", "bom", "bom+crlf"])
def test_crlf_and_bom_never_reach_the_tokenizer_or_the_words(tmp_path, encoding):
  docs = make_corpus(tmp_path / "corpus", n_files=1, docs_per_file=40)
  raw = (tmp_path / "corpus" / "part0.txt").read_bytes()
  if "crlf" in encoding:
    raw = raw.replace(b"\n", b"\r\n")
  if "bom" in encoding:
    raw = "\ufeff".encode("utf-8") + raw
  (tmp_path / "corpus" / "part0.txt").write_bytes(raw)
  ds = load_dataset(DataConfig(spec=f"text:{tmp_path}/corpus/part0.txt", seq_len=32,
                               vocab_size=VOCAB, cache_dir=str(tmp_path / "cache")))
  train, val = train_documents(ds), ds.validation_texts()
  assert sorted(train + val) == sorted(docs)  # the same documents as the LF file's
  text = ds.tokenizer.decode(np.asarray(ds.train.tokens).ravel().tolist())
  pieces = {ds.tokenizer.id_to_piece(i) for i in range(ds.tokenizer.vocab_size)}
  for bad in ("\r", "\ufeff"):
    assert bad not in text and not any(bad in p for p in pieces)
  assert set(ds.train_word_counts()) <= set(WORDS)


def test_text_split_modes_and_the_cache_key(tmp_path, monkeypatch):
  paras = "First doc line one\nline two\n\nSecond doc\n"
  assert text_builder.split_into_documents(paras, "auto") == ["First doc line one\nline two",
                                                              "Second doc"]
  assert text_builder.split_into_documents(paras, "line") == [
      "First doc line one", "line two", "Second doc"]
  # A trailing blank line is not a separator: 'auto' reads one document per line.
  assert text_builder.split_into_documents("a b\nc d\n\n\n", "auto") == ["a b", "c d"]
  with pytest.raises(DataError, match="accepted: auto, blank_line, line"):
    DataConfig(text_split="lines")

  make_corpus(tmp_path / "corpus")
  cfg = DataConfig(spec=f"text:{tmp_path}/corpus/*.txt", seq_len=32, vocab_size=VOCAB,
                   cache_dir=str(tmp_path / "cache"))
  auto, line = load_dataset(cfg), load_dataset(cfg.replace(text_split="line"))
  assert auto.cache_path != line.cache_path  # changing text_split rebuilds
  assert len(line.validation_texts()) + len(train_documents(line)) > len(
      auto.validation_texts()) + len(train_documents(auto))

  def forbidden(*args, **kwargs):
    raise AssertionError("rebuilt although cached")

  monkeypatch.setattr(text_builder.StabjaxText, "_split_generators", forbidden)
  assert load_dataset(cfg.replace(text_split="line")).cache_path == line.cache_path


def test_documents_are_blank_line_blocks_and_hash_split_is_stable():
  text = "a b\nc d\n\n\n  \nsecond doc\n \t\nthird\r\n"
  assert text_builder.split_into_documents(text.replace("\r\n", "\n")) == [
      "a b\nc d", "second doc", "third"]
  docs = [f"document number {i}" for i in range(200)] + ["document number 3"]
  train, val = text_builder.split_documents(docs, 0.25)
  assert not set(train) & set(val) and len(train) + len(val) == 201
  assert 25 <= len(val) <= 75  # ~ Binomial(200, 0.25): mean 50, sd 6
  # Tiny fractions still give a non-empty validation split, and vice versa for train.
  assert len(text_builder.split_documents(docs[:5], 1e-9)[1]) >= 1
  assert len(text_builder.split_documents(docs[:5], 1 - 1e-9)[0]) >= 1


def test_unigram_tokenizer_round_trips(tmp_path):
  docs = make_corpus(tmp_path / "corpus", n_files=1, docs_per_file=40)
  lines = [line for d in docs for line in d.split("\n")]
  tok = tokenizer_lib.SentencePieceTokenizer(
      tokenizer_lib.train_sentencepiece(lines, VOCAB, "unigram"))
  assert tok.vocab_size == VOCAB
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
  for s in docs[:10] + ["Leading  and trailing  \n\n spaces ", "Zürich ✓"]:
    assert tok.decode(tok.encode(s)) == s


def test_parse_data_spec_forms():
  assert parse_data_spec(" synthetic ") == DataSpec("synthetic")
  assert parse_data_spec("text:a/*.txt") == DataSpec("text", path="a/*.txt")
  assert parse_data_spec("tfds:c4/en") == DataSpec("tfds", name="c4", config="en")
  assert parse_data_spec("tfds:lm1b").tfds_id == "lm1b"
  assert str(parse_data_spec("tfds:c4/en")) == "tfds:c4/en"
  for bad, phrase in [("", "empty"), ("text:", "names no file"), ("tfds:", "tfds:NAME"),
                      ("tfds:a/b/c", "tfds:NAME"), ("synthetic:x", "takes no argument"),
                      ("hf:gpt2", "unknown data spec kind 'hf'")]:
    with pytest.raises(DataError, match=phrase):
      parse_data_spec(bad)
