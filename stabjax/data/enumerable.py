"""An enumerable synthetic language: every sequence can be listed (issue 13).

`SyntheticLanguage` (synthetic.py) has exact sequence probabilities, but with 1020
words and up to 126 words a sequence its sequence space cannot be listed, so quantities
that sum over ALL sequences (the model's normaliser, its mass outside the training
support, its entropy H(P_theta), the smallest set carrying 1 - eps of its mass) are only
estimated there. `EnumerableLanguage` is the same generator (Zipf unigram, Dirichlet
Markov rows with a unigram floor, EOS probability, forced EOS at the length cap) made
small enough to list: W words and at most K words a sequence give

    N = W + W^2 + ... + W^K   sequences       (12 words, K = 3: 12 + 144 + 1728 = 1884)

in rows of T = K + 2 tokens (`BOS w_1..w_k EOS PAD..`, ids 0..3 PAD, BOS, EOS, MASK,
words 4..W+3). It is a `SyntheticLanguage` with vocab_size = W + 4 and max_len = K + 2
(the constructor of synthetic.py expresses it exactly), plus

* `all_sequences()`: (tokens int32 [N, T], mask int32 [N, T]) of every sequence, by
  length then lexicographically; `log_prob` of them sums to 1 (up to float rounding);
* `index_of(tokens, mask)`: the enumeration index of each row, -1 for rows that are not
  sequences of the language (e.g. a model's sample that never emitted EOS);
* `empirical(tokens, mask)`: the training set's P_emp (synthetic.`Empirical`) together
  with its support's enumeration indices and P_emp as a dense [N] vector.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from stabjax.data.synthetic import (BOS_ID, EOS_ID, NUM_RESERVED, PAD_ID, Empirical,
                                    SyntheticLanguage, empirical_distribution)

# Above this many sequences the enumeration (and a model's forward over it) stops being
# cheap; the theory checks use about 2,000.
MAX_SEQUENCES = 200_000


@dataclasses.dataclass(frozen=True, eq=False)
class EnumeratedEmpirical(Empirical):
  """`Empirical` plus where its support sits in the enumeration.

  Attributes (besides Empirical's):
    index: int64 [K], the enumeration index of each support sequence (row of
      `sequences`).
    p_dense: float64 [N], P_emp over all N enumerated sequences (0 off the support).
  """

  index: np.ndarray
  p_dense: np.ndarray


def num_sequences(num_words: int, max_words: int) -> int:
  """W + W^2 + ... + W^K."""
  return int(sum(num_words ** k for k in range(1, max_words + 1)))


class EnumerableLanguage(SyntheticLanguage):
  """A `SyntheticLanguage` small enough to list every sequence.

  Args:
    num_words: W >= 1 word types (vocab_size = W + 4).
    max_words: K >= 1, the length cap in words (max_len = K + 2).
    eos_prob: probability of EOS after each of the first K - 1 words.
    zipf_exponent, concentration, seed: as in `SyntheticLanguage`.
  """

  def __init__(self, num_words: int = 12, max_words: int = 3, eos_prob: float = 0.3,
               zipf_exponent: float = 1.0, concentration: float = 1.0, seed: int = 0):
    if num_words < 1:
      raise ValueError(f"num_words must be >= 1, got {num_words}")
    if max_words < 1:
      raise ValueError(f"max_words must be >= 1, got {max_words}")
    n = num_sequences(num_words, max_words)
    if n > MAX_SEQUENCES:
      raise ValueError(f"{num_words} words and at most {max_words} words a sequence make {n} "
                       f"sequences; accepted: at most {MAX_SEQUENCES}")
    super().__init__(vocab_size=num_words + NUM_RESERVED, max_len=max_words + 2,
                     zipf_exponent=zipf_exponent, eos_prob=eos_prob,
                     concentration=concentration, seed=seed)
    self.num_sequences = n
    self._tokens, self._mask = self._enumerate()
    self._codes = self._encode(self._tokens)
    self._order = np.argsort(self._codes, kind="stable")
    self._sorted_codes = self._codes[self._order]

  def __repr__(self) -> str:
    return (f"EnumerableLanguage(num_words={self.num_words}, max_words={self.max_words}, "
            f"eos_prob={self.eos_prob}, zipf_exponent={self.zipf_exponent}, "
            f"concentration={self.concentration}, seed={self.seed})")

  def _enumerate(self) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.full((self.num_sequences, self.max_len), PAD_ID, np.int32)
    tokens[:, 0] = BOS_ID
    row = 0
    for k in range(1, self.max_words + 1):
      words = np.array(list(itertools.product(range(self.num_words), repeat=k)), np.int32)
      tokens[row:row + len(words), 1:k + 1] = words + NUM_RESERVED
      tokens[row:row + len(words), k + 1] = EOS_ID
      row += len(words)
    return tokens, (tokens != PAD_ID).astype(np.int32)

  def _encode(self, tokens: np.ndarray) -> np.ndarray:
    """Each row as one integer in base vocab_size (exact: V^T < 2^63 is checked)."""
    if self.max_len * np.log2(self.vocab_size) >= 62:
      raise ValueError("rows too long to encode as int64")  # unreachable under MAX_SEQUENCES
    code = np.zeros(tokens.shape[0], np.int64)
    for t in range(tokens.shape[1]):
      code = code * self.vocab_size + tokens[:, t].astype(np.int64)
    return code

  def all_sequences(self) -> tuple[np.ndarray, np.ndarray]:
    """(tokens int32 [N, T], mask int32 [N, T]) of every sequence (copies)."""
    return self._tokens.copy(), self._mask.copy()

  def index_of(self, tokens: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Enumeration index of each row (int64 [n]); -1 where the row is not a sequence.

    Positions outside `mask` (default: tokens != PAD) are read as PAD; rows shorter
    than T are padded, longer rows must be PAD beyond T.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be [n, T], got shape {tokens.shape}")
    if mask is None:
      mask = tokens != PAD_ID
    canon = np.where(np.asarray(mask) > 0, tokens, PAD_ID).astype(np.int64)
    n, t = canon.shape
    extra = np.zeros(n, bool)
    if t > self.max_len:
      extra = (canon[:, self.max_len:] != PAD_ID).any(axis=1)
      canon = canon[:, :self.max_len]
    elif t < self.max_len:
      canon = np.pad(canon, ((0, 0), (0, self.max_len - t)), constant_values=PAD_ID)
    bad = extra | (canon < 0).any(axis=1) | (canon >= self.vocab_size).any(axis=1)
    code = self._encode(np.clip(canon, 0, self.vocab_size - 1))
    pos = np.clip(np.searchsorted(self._sorted_codes, code), 0, self.num_sequences - 1)
    found = (self._sorted_codes[pos] == code) & ~bad
    return np.where(found, self._order[pos], -1).astype(np.int64)

  def sample(self, key, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n i.i.d. sequences (a finite training set): `SyntheticLanguage.sample`."""
    return super().sample(key, n)

  def empirical(self, tokens: np.ndarray, mask: np.ndarray | None = None
                ) -> EnumeratedEmpirical:
    """P_emp of the rows (synthetic.`empirical_distribution`) located in the enumeration."""
    emp = empirical_distribution(tokens, mask)
    index = self.index_of(emp.sequences, emp.mask)
    if (index < 0).any():
      raise ValueError(f"{int((index < 0).sum())} distinct rows are not sequences of {self!r}")
    dense = np.zeros(self.num_sequences, np.float64)
    dense[index] = emp.p_emp
    return EnumeratedEmpirical(sequences=emp.sequences, mask=emp.mask, counts=emp.counts,
                               p_emp=emp.p_emp, inverse=emp.inverse, index=index,
                               p_dense=dense)
