"""Metrics of the sampling process itself (SPEC section 9): per-step predictive entropy,
lengths until EOS, effective rank of hidden states, perplexity.

`predictive_entropy` is written with `jax.numpy` so that the sampler can call it inside
its jitted loop; everything else takes NumPy (or JAX) arrays and returns Python floats.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def predictive_entropy(logits: jax.Array) -> jax.Array:
  """Entropy in nats of softmax(logits) over the last axis: [..., V] -> [...].

  Computed in float32 through `log_softmax` (stable for large logits). Logits of -inf
  (tokens removed by top-k / top-p) contribute 0, not nan.
  """
  logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
  p = jnp.exp(logp)
  return -jnp.sum(jnp.where(p > 0, p * logp, 0.0), axis=-1)


def _step_mask(shape: tuple[int, ...], mask: Any, lengths: Any) -> np.ndarray:
  if (mask is None) == (lengths is None):
    raise ValueError("give exactly one of mask and lengths")
  if mask is not None:
    mask = np.asarray(mask).astype(bool)
    if mask.shape != shape:
      raise ValueError(f"mask shape {mask.shape} != step_entropies shape {shape}")
    return mask
  lengths = np.asarray(lengths)
  if lengths.shape != shape[:1]:
    raise ValueError(f"lengths shape {lengths.shape} != ({shape[0]},)")
  return np.arange(shape[1])[None, :] < lengths[:, None]


def generative_entropy(step_entropies: Any, mask: Any = None, lengths: Any = None) -> float:
  """Mean predictive entropy per sampled token (SPEC 9, the paper's generative entropy).

  Args:
    step_entropies: [n, T] entropy of the distribution each token was sampled from.
    mask: [n, T], true on the steps that produced a real token; or
    lengths: [n], the first lengths[i] steps of row i are real.

  The mean is over all real steps pooled (token-weighted), so long generations weigh
  more than short ones. `nan` when there is no real step.
  """
  ent = np.asarray(step_entropies, np.float64)
  if ent.ndim != 2:
    raise ValueError(f"step_entropies must be [n, T], got shape {ent.shape}")
  m = _step_mask(ent.shape, mask, lengths)
  return float(ent[m].mean()) if m.any() else math.nan


def effective_rank(hidden: Any, mask: Any = None, center: bool = False) -> float:
  """Effective rank of Roy & Vetterli (2007): exp(-sum_i p_i log p_i), p_i = s_i / sum_j s_j.

  Args:
    hidden: [..., d] hidden states (e.g. final-layer states of generated tokens).
    mask: optional boolean array of shape hidden.shape[:-1] selecting real tokens.
    center: subtract the mean hidden state first. Default False, as in Roy & Vetterli,
      who define the effective rank of the matrix itself: a common direction shared by
      all states (anisotropy) then counts, and states that all collapse onto one vector
      have effective rank 1. With center=True the same collapse gives the zero matrix.

  Between 1 and rank(hidden); 0.0 for a zero matrix (no singular value), `nan` when no
  row is selected. Computed in float64. Singular values at most max(N, d) * eps *
  ||hidden||_F (the norm before centring) count as zero, as in `np.linalg.matrix_rank`,
  so that the rounding noise centring leaves on identical states is not read as rank.
  """
  h = np.asarray(hidden, np.float64)
  if mask is not None:
    mask = np.asarray(mask).astype(bool)
    if mask.shape != h.shape[:-1]:
      raise ValueError(f"mask shape {mask.shape} != hidden.shape[:-1] {h.shape[:-1]}")
    h = h[mask]
  h = h.reshape(-1, h.shape[-1])
  if h.shape[0] == 0:
    return math.nan
  tol = max(h.shape) * np.finfo(np.float64).eps * np.linalg.norm(h)
  if center:
    h = h - h.mean(axis=0, keepdims=True)
  s = np.linalg.svd(h, compute_uv=False)
  s = s[s > tol]
  if s.size == 0:
    return 0.0
  p = s / s.sum()
  return float(np.exp(-(p * np.log(p)).sum()))


def generation_lengths(tokens: Any, eos_id: int,
                       start: int | Any = 0) -> tuple[np.ndarray, np.ndarray]:
  """Tokens generated before the first EOS, per row: ([n] lengths, [n] bool has_eos).

  Row i is read from position start[i] (the prompt length; an int applies to all rows).
  The EOS itself is not counted, so a row whose first generated token is EOS has length
  0. A row without EOS has length T - start[i], the most it could have.
  """
  tokens = np.asarray(tokens)
  if tokens.ndim != 2:
    raise ValueError(f"tokens must be [n, T], got shape {tokens.shape}")
  n, t = tokens.shape
  start = np.broadcast_to(np.asarray(start, np.int64), (n,))
  if np.any(start < 0) or np.any(start > t):
    raise ValueError(f"start must be in [0, {t}]")
  pos = np.arange(t)[None, :]
  is_eos = (tokens == eos_id) & (pos >= start[:, None])
  has_eos = is_eos.any(axis=1)
  first = np.where(has_eos, is_eos.argmax(axis=1), t)
  return (first - start).astype(np.int64), has_eos


def length_stats(tokens: Any, eos_id: int, start: int | Any = 0,
                 num_bins: int = 10) -> dict[str, Any]:
  """Length distribution of generations (SPEC 9, "abnormal end-of-sequence behavior").

  Lengths are those of `generation_lengths`. The histogram has fixed bins that depend
  only on the shapes, not on the data, so runs with the same generation length are
  comparable: `num_bins` equal bins over [0, max_len], max_len = T - min(start), the
  last bin closed (it holds the rows that never emit EOS); with several prompt
  lengths a row can hold at most T - start[i] tokens. `std` is the population
  standard deviation (ddof=0). Means are `nan` for zero rows.

  Returns:
    dict with mean, std, no_eos_share (floats), max_len (int), histogram (list of
    int counts) and bin_edges (list of num_bins + 1 floats).
  """
  lengths, has_eos = generation_lengths(tokens, eos_id, start)
  n, t = np.asarray(tokens).shape
  max_len = t - int(np.min(np.asarray(start), initial=t))
  # max(., 1): a prompt that fills the whole row still gets increasing bin edges.
  edges = np.linspace(0.0, max(max_len, 1), num_bins + 1)
  hist, _ = np.histogram(lengths, bins=edges)
  return {
      "mean": float(lengths.mean()) if n else math.nan,
      "std": float(lengths.std()) if n else math.nan,
      "no_eos_share": float((~has_eos).mean()) if n else math.nan,
      "max_len": max_len,
      "histogram": [int(c) for c in hist],
      "bin_edges": [float(e) for e in edges],
  }


def perplexity(total_nll: float, total_tokens: float) -> float:
  """exp(total_nll / total_tokens): the perplexity of summed token NLLs (nats).

  `nan` for zero tokens, `inf` when the mean NLL overflows exp.
  """
  if total_tokens <= 0:
    return math.nan
  try:
    return math.exp(float(total_nll) / float(total_tokens))
  except OverflowError:
    return math.inf
