"""The input pipeline: deterministic, sharded across processes, resumable (SPEC section 8).

* 'train': an endless stream of rows. Epoch e visits every row once in the order of a
  permutation drawn from (seed, e); batches run across epoch boundaries, so no row is
  dropped and a split smaller than a batch still works.
* 'validation': one pass in row order, no shuffle; the last batch is filled with PAD
  rows (mask 0) so every batch has the same shape, then StopIteration.

Every process computes the same global batch of `global_batch_size` rows and reads only
its own block of rows [process_index * local, (process_index + 1) * local). The position
is a small `IteratorState` (split, seed, epoch, position); saved with a checkpoint and
passed back to `make_iterator`, the pipeline continues with exactly the batches an
uninterrupted run would have seen.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import numpy as np

from stabjax.data.dataset import Dataset, Split
from stabjax.data.spec import DataError


@dataclasses.dataclass(frozen=True)
class IteratorState:
  """Where a pipeline stands: the next row is row `position` of epoch `epoch`'s order.

  `num_rows` records the split's size, to refuse a state saved on other data. The state
  is global (the same on every process), so any process's copy restores all of them.
  """

  split: str
  seed: int
  epoch: int = 0
  position: int = 0
  num_rows: int = 0

  def to_dict(self) -> dict[str, Any]:
    """A JSON-serialisable dict."""
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "IteratorState":
    fields = {f.name for f in dataclasses.fields(cls)}
    if not isinstance(d, dict) or set(d) != fields:
      raise DataError(f"not an iterator state: {d!r}; expected the keys "
                      f"{', '.join(sorted(fields))}")
    return cls(split=str(d["split"]), seed=int(d["seed"]), epoch=int(d["epoch"]),
               position=int(d["position"]), num_rows=int(d["num_rows"]))


class BatchIterator:
  """Batches {'tokens': int32 [local, T], 'mask': int32 [local, T]} of one split.

  Use `make_iterator` to build one.
  """

  def __init__(self, split: Split, split_name: str, global_batch_size: int, seed: int,
               state: IteratorState | None, process_index: int, process_count: int):
    self._split = split
    self.split_name = split_name
    self.global_batch_size = global_batch_size
    self.local_batch_size = global_batch_size // process_count
    self.seed = seed
    self.process_index = process_index
    self.process_count = process_count
    self.shuffle = split_name == "train"
    self.num_rows = len(split)
    self.seq_len = int(split.tokens.shape[1])
    if state is None:
      state = IteratorState(split=split_name, seed=seed, num_rows=self.num_rows)
    self._check_state(state)
    self._epoch = state.epoch
    self._position = state.position
    self._order: tuple[int, np.ndarray] | None = None

  def _check_state(self, state: IteratorState) -> None:
    if state.split != self.split_name:
      raise DataError(f"iterator state is for split {state.split!r}, not {self.split_name!r}")
    if state.seed != self.seed:
      raise DataError(f"iterator state was saved with seed {state.seed}, not {self.seed}; "
                      f"resume with the run's original seed")
    if state.num_rows != self.num_rows:
      raise DataError(f"iterator state was saved for {state.num_rows} rows of "
                      f"{self.split_name!r}, the data now has {self.num_rows}: the dataset "
                      f"or seq_len changed")
    if state.epoch < 0 or not 0 <= state.position <= self.num_rows:
      raise DataError(f"iterator state has an invalid position: {state}")

  @property
  def state(self) -> IteratorState:
    return IteratorState(split=self.split_name, seed=self.seed, epoch=self._epoch,
                         position=self._position, num_rows=self.num_rows)

  @property
  def steps_per_epoch(self) -> int:
    """Global batches per pass over the split (the last one partial)."""
    return -(-self.num_rows // self.global_batch_size)

  def epoch_order(self, epoch: int) -> np.ndarray:
    """Row order of an epoch: a permutation from (seed, epoch) for train, else 0..N-1."""
    if not self.shuffle:
      return np.arange(self.num_rows)
    if self._order is None or self._order[0] != epoch:
      rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch]))
      self._order = (epoch, rng.permutation(self.num_rows))
    return self._order[1]

  def _global_indices(self) -> np.ndarray:
    """The next global batch's row indices (train), advancing across epochs."""
    out, need = [], self.global_batch_size
    while need:
      order = self.epoch_order(self._epoch)
      take = order[self._position:self._position + need]
      out.append(take)
      need -= take.size
      self._position += take.size
      if self._position == self.num_rows:
        self._epoch, self._position = self._epoch + 1, 0
    return np.concatenate(out)

  def __iter__(self) -> "BatchIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    lo = self.process_index * self.local_batch_size
    hi = lo + self.local_batch_size
    if self.shuffle:
      return self._split.rows(self._global_indices()[lo:hi])
    if self._position >= self.num_rows:
      raise StopIteration
    index = np.arange(self._position, self._position + self.global_batch_size)[lo:hi]
    self._position = min(self._position + self.global_batch_size, self.num_rows)
    real = index[index < self.num_rows]
    batch = self._split.rows(real)
    if real.size < index.size:  # the last validation batch: pad to the full shape
      fill = index.size - real.size
      pad = np.full((fill, self.seq_len), self._split.pad_id, np.int32)
      batch = {"tokens": np.concatenate([batch["tokens"], pad]),
               "mask": np.concatenate([batch["mask"], np.zeros_like(pad)])}
    return batch

  def next(self) -> dict[str, np.ndarray]:
    return self.__next__()


def make_iterator(dataset: Dataset, split: str, global_batch_size: int, seed: int,
                  state: IteratorState | dict | None = None, process_index: int = 0,
                  process_count: int = 1) -> BatchIterator:
  """The process's shard of the global batches of `split` (see the module docstring).

  Args:
    dataset: from `load_dataset`.
    split: 'train' (endless, reshuffled each epoch) or 'validation' (one ordered pass).
    global_batch_size: rows per global batch; a multiple of `process_count`.
    seed: the data-order seed (an integer >= 0).
    state: an `IteratorState` (or its `to_dict()`) to resume from; None starts at 0.
    process_index: this process, 0 <= process_index < process_count.
    process_count: processes sharing each global batch.
  """
  for name, value, lo in (("global_batch_size", global_batch_size, 1), ("seed", seed, 0),
                          ("process_count", process_count, 1),
                          ("process_index", process_index, 0)):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < lo:
      raise DataError(f"{name}={value!r} is not accepted; accepted: an integer >= {lo}")
  if process_index >= process_count:
    raise DataError(f"process_index={process_index} is not accepted; accepted: 0.."
                    f"{process_count - 1} (process_count={process_count})")
  if global_batch_size % process_count:
    raise DataError(f"global batch size {global_batch_size} is not divisible by the "
                    f"{process_count} processes; use a multiple of {process_count}")
  data = dataset.split(split)
  if len(data) == 0:
    raise DataError(f"split {split!r} of {dataset.spec} is empty")
  if isinstance(state, dict):
    state = IteratorState.from_dict(state)
  return BatchIterator(data, split, int(global_batch_size), int(seed), state,
                       int(process_index), int(process_count))
