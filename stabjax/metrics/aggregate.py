"""Metrics across runs: cross-seed consistency and convergence speed (SPEC section 9)."""

from __future__ import annotations

import collections
import itertools
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from stabjax.metrics.text import top_k_words


def _is_scalar(v: Any) -> bool:
  if isinstance(v, np.ndarray):
    return v.ndim == 0 and np.issubdtype(v.dtype, np.number)
  return isinstance(v, numbers.Real) and not isinstance(v, bool)


def cross_seed_summary(metric_dicts: Sequence[Mapping[str, Any]],
                       ddof: int = 1) -> dict[str, tuple[float, float]]:
  """{metric: (mean, std)} across runs (e.g. seeds) of the same condition.

  Only metrics that every dict holds as a real scalar are summarised; lists, strings,
  bools and metrics missing from some run are left out, so a summary never silently
  averages over fewer seeds. `std` uses `ddof` (default 1: the sample standard
  deviation, `nan` for a single run). A `nan` in any run makes that metric's mean `nan`.
  """
  if not metric_dicts:
    return {}
  keys = [k for k in metric_dicts[0] if all(k in d and _is_scalar(d[k]) for d in metric_dicts)]
  out = {}
  for k in keys:
    v = np.array([float(d[k]) for d in metric_dicts], np.float64)
    std = float(v.std(ddof=ddof)) if v.size > ddof else math.nan
    out[k] = (float(v.mean()), std)
  return out


def top_word_overlap(word_lists: Sequence[Sequence[str]], k: int = 20) -> float:
  """Mean pairwise Jaccard index of the top-`k` generated words of each run.

  Each run's top-k words come from `top_k_words` (ties alphabetical). 1 means every
  run favours the same words. Two empty sets count as identical (1.0). `nan` with
  fewer than two runs.
  """
  tops = [set(top_k_words(collections.Counter(ws), k)) for ws in word_lists]
  if len(tops) < 2:
    return math.nan
  jac = [len(a & b) / len(a | b) if a | b else 1.0 for a, b in itertools.combinations(tops, 2)]
  return float(np.mean(jac))


def convergence_step(steps: Sequence[float], values: Sequence[float], threshold: float,
                     mode: str = "below") -> float | None:
  """The first step whose value reaches `threshold`, or None if none does.

  mode 'below': value <= threshold (e.g. a loss); 'above': value >= threshold (e.g. the
  high-frequency proportion reaching 1.0, the paper's "converges 24% faster",
  section 6.3). Steps are taken in the given order; `nan` values never reach.
  """
  if mode not in ("below", "above"):
    raise ValueError(f"mode must be 'below' or 'above', got {mode!r}")
  if len(steps) != len(values):
    raise ValueError(f"{len(steps)} steps but {len(values)} values")
  for s, v in zip(steps, values):
    if (v <= threshold) if mode == "below" else (v >= threshold):
      return s
  return None
