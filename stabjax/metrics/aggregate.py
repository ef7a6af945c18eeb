"""Metrics across runs: cross-seed statistics, convergence speed, trajectory shape (SPEC 9).

Numbers only (no files, no plots), so the sweeps' tables and tests share one definition.
"""

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


def group_by(records: Sequence[Mapping[str, Any]], keys: Sequence[str]
             ) -> dict[tuple, list[Mapping[str, Any]]]:
  """Records grouped by the values of `keys`, groups in first-seen order."""
  out: dict[tuple, list] = {}
  for r in records:
    out.setdefault(tuple(r[k] for k in keys), []).append(r)
  return out


def seed_aggregate(records: Sequence[Mapping[str, Any]], keys: Sequence[str],
                   metrics: Sequence[str]) -> list[dict[str, Any]]:
  """Per group of `keys`: n and (mean, std over seeds, ddof=1) of each metric present."""
  out = []
  for group, recs in group_by(records, keys).items():
    stats = cross_seed_summary([{m: r[m] for m in metrics if r.get(m) is not None}
                                for r in recs])
    out.append({**dict(zip(keys, group)), "n": len(recs), **stats})
  return out


def convergence_steps(histories: Mapping[str, Sequence[Mapping[str, Any]]], key: str = "loss",
                      tail: int = 3) -> tuple[float, dict[str, float | None]]:
  """The step at which each run first reaches the level that every run ends at.

  The common threshold is the largest, over runs, of the mean of the last `tail` logged
  values of `key`; each run's step is `aggregate.convergence_step(..., 'below')`. This is
  our reading of the paper's "the baseline converges 24% faster" (section 6.3).
  """
  series = {name: [(r["step"], r[key]) for r in h if key in r] for name, h in histories.items()}
  threshold = max(float(np.mean([v for _, v in s[-tail:]])) for s in series.values())
  return threshold, {name: convergence_step([st for st, _ in s], [v for _, v in s], threshold)
                     for name, s in series.items()}


def split_slopes(loss: Sequence[float], entropy: Sequence[float]
                 ) -> dict[str, float]:
  """Least-squares slope dH/dloss above and below the median loss (Figure 3's claim).

  The paper (section 6.4): at high loss the entropy falls steeply with the loss, at low
  loss the relation flattens. Returns {'median_loss', 'slope_high_loss', 'slope_low_loss'}.
  """
  x, y = np.asarray(loss, float), np.asarray(entropy, float)
  med = float(np.median(x))
  out = {"median_loss": med}
  for name, sel in (("slope_high_loss", x >= med), ("slope_low_loss", x < med)):
    xs, ys = x[sel], y[sel]
    out[name] = float(np.polyfit(xs, ys, 1)[0]) if xs.size >= 2 and np.ptp(xs) > 0 else math.nan
  return out


def plateau_step(steps: Sequence[float], values: Sequence[float], tail_frac: float = 0.2,
                 tol: float = 0.02) -> tuple[float, float | None]:
  """(level, step) at which a series settles on its final plateau.

  The level is the mean of the last max(3, ceil(tail_frac * n)) values; the step is the
  first one from which every later value (itself included) stays within `tol` of the
  level (absolute: for a share such as the HF proportion, 0.02 is 2 points). A series
  that touches the band and leaves it again settles only at its later return; one whose
  last value is outside the band never settles (step None). nan values (e.g. an HF
  proportion of a batch without words) are dropped first; (nan, None) with fewer than 3
  points. Our convergence criterion for the generated text (the paper's "converges
  faster", section 6.3, where every variant reaches 100% HF proportion).
  """
  if len(steps) != len(values):
    raise ValueError(f"{len(steps)} steps but {len(values)} values")
  keep = [(s, float(v)) for s, v in zip(steps, values) if not math.isnan(float(v))]
  n = len(keep)
  if n < 3:
    return math.nan, None
  v = np.asarray([x for _, x in keep], np.float64)
  level = float(v[-max(3, math.ceil(tail_frac * n)):].mean())
  inside = np.abs(v - level) <= tol + 1e-12  # rounding must not move a value out of the band
  if not inside[-1]:
    return level, None
  outside = np.flatnonzero(~inside)
  return level, keep[int(outside[-1]) + 1 if outside.size else 0][0]
