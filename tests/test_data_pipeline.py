"""The input pipeline (SPEC 8): determinism, resume, process shards, validation pass."""

from __future__ import annotations

import collections
import json

import chex
import numpy as np
import pytest

from stabjax.data import (DataConfig, DataError, Dataset, IteratorState, PseudoWordTokenizer,
                          Split, load_dataset, make_iterator, parse_data_spec)

T = 6


def indexed_dataset(n_train: int, n_val: int) -> Dataset:
  """Rows whose second token names the row: tokens[i] = BOS, 4 + i, EOS, PAD..."""

  def rows(n):
    x = np.zeros((n, T), np.int32)
    x[:, 0], x[:, 1], x[:, 2] = 1, 4 + np.arange(n), 2
    return x

  tok = PseudoWordTokenizer(4 + max(n_train, n_val))
  return Dataset(config=DataConfig(seq_len=T), spec=parse_data_spec("synthetic"),
                 tokenizer=tok, splits={"train": Split(rows(n_train)),
                                        "validation": Split(rows(n_val))},
                 neg_log_freq=np.zeros(tok.vocab_size, np.float32),
                 word_counts=collections.Counter, validation_texts=list)


def row_ids(batch) -> list[int]:
  return [int(t) - 4 if m else -1 for t, m in zip(batch["tokens"][:, 1], batch["mask"][:, 1])]


def take(it, k):
  return [next(it) for _ in range(k)]


def test_same_seed_same_batches_other_seed_other_order_and_shapes():
  ds = load_dataset(DataConfig(seq_len=16, synthetic_n=64, synthetic_vocab_size=30))
  a = take(make_iterator(ds, "train", 8, seed=1), 12)
  b = take(make_iterator(ds, "train", 8, seed=1), 12)
  c = take(make_iterator(ds, "train", 8, seed=2), 12)
  for x, y in zip(a, b):
    chex.assert_trees_all_equal(x, y)
  assert any(not np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(a, c))
  for batch in a:
    chex.assert_shape([batch["tokens"], batch["mask"]], (8, 16))
    chex.assert_type([batch["tokens"], batch["mask"]], np.int32)
    np.testing.assert_array_equal(batch["mask"], (batch["tokens"] != 0).astype(np.int32))
    assert np.all(batch["tokens"][:, 0] == 1)  # synthetic rows: one sequence per row


def test_each_epoch_is_a_permutation_reshuffled_per_epoch():
  ds = indexed_dataset(10, 4)
  it = make_iterator(ds, "train", 4, seed=0)
  stream = [i for b in take(it, 10) for i in row_ids(b)]  # 40 rows = 4 epochs of 10
  epochs = [stream[10 * e:10 * (e + 1)] for e in range(4)]
  for e in epochs:
    assert sorted(e) == list(range(10))
  assert len({tuple(e) for e in epochs}) == 4  # a different order every epoch
  assert it.state == IteratorState("train", 0, epoch=4, position=0, num_rows=10)


@pytest.mark.parametrize("k", [0, 1, 2, 3, 5])
def test_resume_from_json_state_matches_uninterrupted_run(k):
  ds = indexed_dataset(10, 4)  # batch 4 over 10 rows: batches 3, 5, 8 cross epoch ends
  reference = take(make_iterator(ds, "train", 4, seed=3), k + 6)
  it = make_iterator(ds, "train", 4, seed=3)
  take(it, k)
  saved = json.loads(json.dumps(it.state.to_dict()))
  resumed = make_iterator(ds, "train", 4, seed=3, state=IteratorState.from_dict(saved))
  for want, got in zip(reference[k:], take(resumed, 6)):
    chex.assert_trees_all_equal(want, got)


def test_resume_mid_validation_pass():
  ds = indexed_dataset(10, 7)
  reference = list(make_iterator(ds, "validation", 2, seed=0))
  it = make_iterator(ds, "validation", 2, seed=0)
  take(it, 2)
  rest = list(make_iterator(ds, "validation", 2, seed=0, state=it.state.to_dict()))
  assert len(rest) == 2
  for want, got in zip(reference[2:], rest):
    chex.assert_trees_all_equal(want, got)


def test_two_processes_see_each_example_exactly_once():
  ds = indexed_dataset(12, 5)
  steps = 3  # one epoch: 3 global batches of 4
  single = take(make_iterator(ds, "train", 4, seed=9), steps)
  shards = [take(make_iterator(ds, "train", 4, seed=9, process_index=p, process_count=2),
                 steps) for p in range(2)]
  seen = []
  for step in range(steps):
    local = [shards[p][step] for p in range(2)]
    for b in local:
      chex.assert_shape(b["tokens"], (2, T))
    glued = {k: np.concatenate([b[k] for b in local]) for k in ("tokens", "mask")}
    chex.assert_trees_all_equal(glued, single[step])  # rows [p*local, (p+1)*local)
    seen += [i for b in local for i in row_ids(b)]
  assert sorted(seen) == list(range(12))


def test_validation_is_one_ordered_pass_with_a_padded_last_batch():
  ds = indexed_dataset(10, 7)
  it = make_iterator(ds, "validation", 3, seed=0)
  assert it.steps_per_epoch == 3
  batches = list(it)
  assert [row_ids(b) for b in batches] == [[0, 1, 2], [3, 4, 5], [6, -1, -1]]
  last = batches[-1]
  chex.assert_shape([last["tokens"], last["mask"]], (3, T))
  assert last["mask"][1:].sum() == 0 and np.all(last["tokens"][1:] == 0)
  with pytest.raises(StopIteration):
    next(it)
  # Sharded validation: process 1 of 3 gets the middle row of each global batch.
  shard = list(make_iterator(ds, "validation", 3, seed=0, process_index=1, process_count=3))
  assert [row_ids(b) for b in shard] == [[1], [4], [-1]]


def test_pipeline_input_errors_are_one_line_data_errors():
  ds = indexed_dataset(10, 4)
  cases = [
      (dict(split="train", global_batch_size=6, seed=0, process_count=4), "divisible"),
      (dict(split="test", global_batch_size=4, seed=0), "unknown split"),
      (dict(split="train", global_batch_size=4, seed=0, process_index=2, process_count=2),
       "process_index"),
      (dict(split="train", global_batch_size=4, seed=1,
            state=IteratorState("train", 0, num_rows=10)), "seed"),
      (dict(split="train", global_batch_size=4, seed=0,
            state=IteratorState("train", 0, num_rows=11)), "rows"),
      (dict(split="train", global_batch_size=0, seed=0), "global_batch_size"),
  ]
  for kwargs, phrase in cases:
    with pytest.raises(DataError) as e:
      make_iterator(ds, **kwargs)
    assert phrase in str(e.value) and "\n" not in str(e.value)
