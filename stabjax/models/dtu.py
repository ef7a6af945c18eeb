"""DTU, the Dynamic Transformer Unit (SPEC section 4, paper appendix B.4, Alg. 6).

Self-attention in which, on training calls, each query i attends only to a sampled set
I_i of a3 = `DTUConfig.keep` keys (Alg. 6, eq. 144):

* Sampling: without replacement, by Gumbel-top-k on log c~_j + Gumbel noise, independently
  per (batch, head, query). This is successive sampling proportional to c~_j
  (Plackett-Luce), so P(j in I_i) increases with c~_j (it is exactly proportional only
  when a3 = 1). Scores c~_j (`DTUConfig.scores`): `key_norm`, the L2 norm of key j per
  head (no gradient), or `uniform`. Computed as the equivalent exponential race: the a3
  largest c~_j / E_ij, E_ij = -log U_ij ~ Exp(1) (log of it = log c~_j + Gumbel). The
  seeds of each (batch, head, query) come from the `'dtu'` stream (fold_in of the query
  position); the uniform U_ij of each key is a keyed integer hash of j under them
  (threefry per pair costs more on CPU than the attention the unit saves).
* Candidates: keys that are not padding and, for causal models, j <= i; causal models
  always keep j = i. When fewer than a3 keys are candidates all of them are kept and
  the surplus slots are masked out.
* Compute, two implementations of the same sets and the same softmax (`sampled_attention`
  picks by cost): 'gathered' selects with a (thresholded) top-k and gathers the a3
  keys/values of each query ([B, H, q_block, a3, Dh]), softmax over the a3 slots, O(n a3
  d) instead of O(n^2 d) (SPEC 4); 'dense', for a3 > n / `DENSE_BELOW`, selects with a
  bisection on the race keys (no sort) and runs a masked softmax over all n keys: plain
  matmuls, faster there than the gathers. Queries go in blocks of `DTUConfig.block_q`
  (`lax.map`), so the per-query race keys (O(n^2) scalars per head) and the gathered
  keys exist one block at a time; the attention of a block is rematerialised in the
  backward pass, so what is kept for it is O(n a3) indices (gathered) or an n x n bool
  mask (dense), not gathered keys or float weights. The noise of a query depends only
  on (key, query position), so the result does not depend on block_q.

Evaluation (`deterministic=True`), `enabled=False`, or a3 >= the sequence length (every
candidate set then fits) use standard full attention: DTU is a training-time stochastic
unit, like dropout, and evaluation sees every key. The KV-cache decode path
(`decode=True`, Flax's pattern) is always full attention as well.

A query with no candidate key at all (e.g. a left-padding position of a causal model)
outputs zeros before the output projection on the sampled path.

The frozen-set pass. The sets depend on the 'dtu' key (the race noise) and on the log
scores log c~_j, which (`key_norm`) depend on the parameters: the same key at other
parameters draws other sets. On a sampled training call with the 'dtu_scores'
collection mutable (`model.apply(..., mutable=['dtu_scores'])`) the unit stores the log
scores it used as ('dtu_scores', 'log_scores') [B, H, T] float32; when the collection
holds them (`{'params': ..., 'dtu_scores': ...}`) they are used instead of
`dtu_log_scores(k)`. With the same key the call then attends over exactly the first
call's sets, at any parameters. The PSU's exact value L(theta_{t+1}; B_t) (SPEC 6) uses
it, and so do the checks of Theorem B.9 (with frozen key sets the DTU is Lipschitz in
the parameters).
"""

from __future__ import annotations

from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from stabjax.configs import DTUConfig


def dtu_log_scores(k: jax.Array, scores: str) -> jax.Array:
  """log c~_j per key and head, [B, H, T] float32, from keys k [B, T, H, Dh].

  `key_norm`: log ||k_j|| (no gradient; a zero key gets a tiny, not zero, weight);
  `uniform`: 0.
  """
  b, t, h, _ = k.shape
  if scores == "uniform":
    return jnp.zeros((b, h, t), jnp.float32)
  if scores != "key_norm":
    raise ValueError(f"dtu scores must be key_norm or uniform, got {scores!r}")
  norm = jnp.linalg.norm(lax.stop_gradient(k).astype(jnp.float32), axis=-1)
  return jnp.log(jnp.maximum(norm, jnp.finfo(jnp.float32).tiny)).transpose(0, 2, 1)


def _candidates(q_pos: jax.Array, t: int, mask: jax.Array | None,
                causal: bool) -> jax.Array:
  """bool [B or 1, 1, Q, T]: which keys query positions `q_pos` may attend to."""
  j = jnp.arange(t)
  allowed = jnp.ones((1, 1, q_pos.shape[0], t), bool)
  if causal:
    allowed &= (j[None, :] <= q_pos[:, None])[None, None]
  if mask is not None:
    allowed &= mask[:, None, None, :]
  return allowed


# lowbias32 (C. Wellons, "Hash function prospector"): a bijective 32-bit mixer with good
# avalanche. Two keyed rounds turn (query seeds, key index) into the uniform of one pair.
_MIX1, _MIX2 = 0x7FEB352D, 0x846CA68B
# 'auto' computes the sampled attention densely (a masked softmax over all T keys) when
# T < DENSE_BELOW * keep: there the top-k and the gather/scatter of keep keys per query
# cost more than the keys they skip (on CPU dense wins at T = 8 keep, gathered at T = 16
# keep for T >= 2048; benchmarks/RESULTS.md).
DENSE_BELOW = 12
# Margin, in standard deviations, of the race-key bounds of `_race_bounds`.
_SIGMAS = 6.0
_ABOVE_INF = 0x7F800001  # an int32 race key above every float key, +inf included


def _mix32(x: jax.Array) -> jax.Array:
  x = x ^ (x >> 16)
  x = x * jnp.uint32(_MIX1)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(_MIX2)
  return x ^ (x >> 16)


def _row_seeds(rng: jax.Array, q_pos: jax.Array, b: int, h: int) -> jax.Array:
  """uint32 [B, H, Q, 2]: the seeds of each (batch, head, query) from fold_in(rng, position)."""
  bits = lambda i: jax.random.bits(jax.random.fold_in(rng, i), (b, h, 2), jnp.uint32)
  return jax.vmap(bits, out_axes=2)(q_pos)


def _exponentials(seeds: jax.Array, t: int) -> jax.Array:
  """float32 [B, H, Q, T] standard exponentials, one per (query, key), from the seeds.

  The per-pair uniforms are a keyed hash of the key index, not `jax.random` draws:
  threefry costs about 7 ns per 32-bit word on CPU, more than the attention the DTU
  saves (benchmarks/RESULTS.md). The seeds themselves come from the `'dtu'` stream.
  """
  j = lax.broadcasted_iota(jnp.uint32, (1, 1, 1, t), 3)
  bits = _mix32(_mix32(j ^ seeds[..., :1]) ^ seeds[..., 1:])
  u = ((bits >> 8).astype(jnp.float32) + 0.5) * (1.0 / (1 << 24))  # in (0, 1)
  return -jnp.log(u)


def _race_keys(seeds: jax.Array, log_scores: jax.Array, q_pos: jax.Array,
               mask: jax.Array | None, causal: bool) -> jax.Array:
  """Race keys r_ij = w_j / E_ij [B, H, Q, T], w_j = c~_j / max c~, E_ij ~ Exp(1).

  log r = log w_j + G_ij with G = -log E a standard Gumbel, so the top keep race keys
  are exactly the Gumbel-top-k sample of SPEC 4 (the "exponential race"), for one log
  per pair instead of two. +inf at a causal query's own key, -inf off the candidates.
  """
  t = log_scores.shape[-1]
  w = jnp.exp(log_scores - jnp.max(log_scores, axis=-1, keepdims=True))
  race = w[:, :, None, :] / _exponentials(seeds, t)
  if causal:  # the query's own position always wins
    is_self = jnp.arange(t)[None, :] == q_pos[:, None]
    race = jnp.where(is_self[None, None], jnp.inf, race)
  return jnp.where(_candidates(q_pos, t, mask, causal), race, -jnp.inf)


def _race_bounds(log_scores: jax.Array, q_pos: jax.Array, mask: jax.Array | None,
                 causal: bool, keep: int) -> tuple[jax.Array, jax.Array]:
  """(x_lo, x_hi) [B, H, Q]: at least keep race keys reach x_lo, fewer than keep x_hi.

  Each holds with probability > 1 - 1e-8. Key j reaches x with probability
  1 - exp(-w_j / x), w_j <= 1, and by concavity W (1 - e^(-1/x)) <= sum_j (1 - e^(-w_j/x))
  <= W / x, W the candidates' total weight (a prefix sum for causal queries). x_lo puts
  the lower bound `_SIGMAS` standard deviations above the number of keys needed, x_hi
  the upper bound as far below it; x_lo = 0 (every candidate reaches it) and x_hi = +inf
  where the candidates are too few for that.
  """
  w = jnp.exp(log_scores - jnp.max(log_scores, axis=-1, keepdims=True))
  if mask is not None:
    w = w * mask[:, None, :]
  t = log_scores.shape[-1]
  if causal:  # the own key (when real) is forced in: keep - 1 among the others
    pos = jnp.minimum(q_pos, t - 1)
    own = jnp.take(w, pos, axis=-1)
    total = jnp.take(jnp.cumsum(w, axis=-1), pos, axis=-1) - own
    needed = keep - (own > 0).astype(jnp.float32)
  else:
    total = jnp.broadcast_to(jnp.sum(w, axis=-1, keepdims=True), w.shape[:2] + q_pos.shape)
    needed = jnp.full(total.shape, keep, jnp.float32)
  margin = _SIGMAS * (jnp.sqrt(needed) + 1.0)
  ratio = (needed + margin) / jnp.maximum(total, jnp.finfo(jnp.float32).tiny)
  fits = ratio < 1.0
  x_lo = jnp.where(fits, -1.0 / jnp.log1p(-jnp.where(fits, ratio, 0.5)), 0.0)
  below = needed - margin
  x_hi = jnp.where(below > 0, total / jnp.where(below > 0, below, 1.0), jnp.inf)
  return x_lo, x_hi


def _sample_top_k(race: jax.Array, x_lo: jax.Array, keep: int) -> tuple[jax.Array, jax.Array]:
  """The top keep race keys per row, exactly: (indices int32, valid) [..., keep].

  Keys below x_lo are set to -inf first, which makes XLA's top-k (a partial sort) much
  cheaper; a row where fewer than keep keys reach x_lo uses all its keys.
  """
  enough = (jnp.sum(race >= x_lo[..., None], axis=-1) >= keep) | (x_lo <= 0)
  x = jnp.where(enough, x_lo, -jnp.inf)
  values, indices = lax.top_k(jnp.where(race >= x[..., None], race, -jnp.inf), keep)
  return indices.astype(jnp.int32), values > -jnp.inf


def _count_at_least(key: jax.Array, threshold: jax.Array) -> jax.Array:
  """int32 [...]: how many of key [..., T] are >= threshold [...] (one pass).

  Summed in int16 when T < 2^15: XLA's CPU backend materialises partial sums of long
  reductions, and narrower ones make the pass about 1.3x faster.
  """
  dtype = jnp.int16 if key.shape[-1] < 2**15 else jnp.int32
  return jnp.sum(key >= threshold[..., None], axis=-1, dtype=dtype).astype(jnp.int32)


def _bisect(key: jax.Array, state: tuple, keep: int, max_steps: int | None = None) -> tuple:
  """Bisection steps on (lo, hi, c_lo, c_hi, done) [R] for key [R, T] until every row is
  resolved (exactly keep keys reach lo) or pinned (hi = lo + 1), or max_steps."""

  def unresolved(state):
    lo, hi, _, _, done = state[:5]
    return ~done & (hi - lo > 1)

  def step(state):
    lo, hi, c_lo, c_hi, done, i = state
    active = unresolved(state)
    mid = lo + (hi - lo) // 2
    c = _count_at_least(key, mid)
    up, down = active & (c >= keep), active & (c < keep)
    lo, c_lo = jnp.where(up, mid, lo), jnp.where(up, c, c_lo)
    hi, c_hi = jnp.where(down, mid, hi), jnp.where(down, c, c_hi)
    return lo, hi, c_lo, c_hi, done | (c_lo == keep), i + 1

  def cond(state):
    more = jnp.any(unresolved(state))
    return more if max_steps is None else more & (state[5] < max_steps)

  return lax.while_loop(cond, step, state + (0,))[:5]


def _sample_threshold(race: jax.Array, x_lo: jax.Array, x_hi: jax.Array, keep: int,
                      full_steps: int = 12) -> tuple[jax.Array, jax.Array]:
  """The top keep race keys per row (every candidate if fewer), exactly, as (thr, last).

  Row i selects the keys whose int32 pattern is >= thr_i, and of those equal to
  thr_i - 1 the ones with index <= last_i (-1: none); see `_threshold_mask`.

  No sorting: a bisection on the race keys' int32 bit patterns (monotone in the value
  for keys >= 0; -inf is negative) between x_lo and x_hi, one counting pass per step,
  until exactly keep keys reach the threshold; float ties at the keep-th key go to the
  lowest indices. After `full_steps` steps on all rows, the few rows left (close k-th
  and k+1-th keys) continue gathered into an array of 1/8 of the rows. On CPU about 3x
  cheaper than top-k when keep is a large share of T.
  """
  shape, t = race.shape, race.shape[-1]
  # Materialised once: otherwise XLA recomputes the race keys (a hash and a log per key)
  # inside every pass that reads them.
  key = lax.optimization_barrier(lax.bitcast_convert_type(race, jnp.int32).reshape(-1, t))
  rows = key.shape[0]
  lo = lax.bitcast_convert_type(x_lo, jnp.int32).reshape(-1)
  hi = jnp.where(x_hi < jnp.inf, lax.bitcast_convert_type(x_hi, jnp.int32), _ABOVE_INF).reshape(-1)
  c_lo, c_hi = _count_at_least(key, lo), _count_at_least(key, hi)
  # A failed bound (probability < 1e-8) widens to every candidate / above every key. (x_lo
  # > 0 implies more than keep candidates, so the count at 0 is only known to be > keep;
  # x_lo = 0 is every candidate already, and c_lo their exact number.)
  ok_lo = (c_lo >= keep) | (lo <= 0)
  lo, c_lo = jnp.where(ok_lo, lo, 0), jnp.where(ok_lo, c_lo, keep + 1)
  hi, c_hi = jnp.where(c_hi < keep, hi, _ABOVE_INF), jnp.where(c_hi < keep, c_hi, 0)
  state = (lo, hi, c_lo, c_hi, c_lo <= keep)  # done: exactly keep reach lo, or all fit
  cap = max(64, rows // 8)
  if cap < rows:
    state = _bisect(key, state, keep, full_steps)
    lo, hi, _, _, done = state
    idx = jnp.nonzero(~done & (hi - lo > 1), size=cap, fill_value=rows)[0]
    sub_key = key.at[idx].get(mode="fill", fill_value=jnp.iinfo(jnp.int32).min)
    sub = tuple(a.at[idx].get(mode="fill", fill_value=f)
                for a, f in zip(state, (0, 1, keep, 0, True)))
    sub = _bisect(sub_key, sub, keep)
    state = tuple(a.at[idx].set(b, mode="drop") for a, b in zip(state, sub))
  # Whatever is left (more than `cap` rows were unresolved, or no compaction).
  lo, hi, c_lo, c_hi, done = _bisect(key, state, keep)
  # Unresolved rows: lo is the keep-th key and several keys equal it (hi = lo + 1); of
  # those, the keep - c_hi with the lowest indices are taken, up to index `last`.
  tied = ~done

  def last_tie():
    at_lo = tied[:, None] & (key == lo[:, None])
    rank = jnp.cumsum(at_lo, axis=-1, dtype=jnp.int32)
    return jnp.sum(rank < (keep - c_hi)[:, None], axis=-1, dtype=jnp.int32)

  last = lax.cond(jnp.any(tied), last_tie, lambda: jnp.full(lo.shape, -1, jnp.int32))
  thr = jnp.where(tied, hi, lo)
  return thr.reshape(shape[:-1]), jnp.where(tied, last, -1).reshape(shape[:-1])


def _threshold_mask(race: jax.Array, thr: jax.Array, last: jax.Array) -> jax.Array:
  """bool [..., T]: the keys selected by `_sample_threshold`'s (thr, last) [...]."""
  key = lax.bitcast_convert_type(race, jnp.int32)
  j = lax.broadcasted_iota(jnp.int32, key.shape, key.ndim - 1)
  return ((key >= thr[..., None]) |
          ((key == thr[..., None] - 1) & (j <= last[..., None])))


def _sample_mask(race: jax.Array, x_lo: jax.Array, x_hi: jax.Array, keep: int,
                 full_steps: int = 12) -> jax.Array:
  """bool [..., T]: the top keep race keys per row (every candidate if fewer), exactly."""
  return _threshold_mask(race, *_sample_threshold(race, x_lo, x_hi, keep, full_steps))


def _sets_from_mask(race: jax.Array, selected: jax.Array, keep: int
                    ) -> tuple[jax.Array, jax.Array]:
  """(indices, valid) [..., keep] of the keys in a set mask (the order is immaterial)."""
  values, indices = lax.top_k(jnp.where(selected, race, -jnp.inf), keep)
  return indices.astype(jnp.int32), values > -jnp.inf


def _impl(impl: str, t: int, keep: int) -> str:
  if impl == "auto":
    return "dense" if t < DENSE_BELOW * keep else "gathered"
  if impl not in ("dense", "gathered"):
    raise ValueError(f"impl must be auto, dense or gathered, got {impl!r}")
  return impl


def _sample_block(rng: jax.Array, log_scores: jax.Array, q_pos: jax.Array,
                  mask: jax.Array | None, causal: bool, keep: int,
                  impl: str = "auto") -> tuple[jax.Array, jax.Array]:
  """Gumbel-top-k for the queries at positions q_pos: indices, valid [B, H, Q, keep]."""
  b, h, t = log_scores.shape
  race = _race_keys(_row_seeds(rng, q_pos, b, h), log_scores, q_pos, mask, causal)
  x_lo, x_hi = _race_bounds(log_scores, q_pos, mask, causal, keep)
  if _impl(impl, t, keep) == "gathered":
    return _sample_top_k(race, x_lo, keep)
  selected = _sample_mask(race, x_lo, x_hi, keep)
  return _sets_from_mask(race, selected, keep)


def dtu_sample(rng: jax.Array, log_scores: jax.Array, keep: int, causal: bool,
               mask: jax.Array | None = None, impl: str = "auto"
               ) -> tuple[jax.Array, jax.Array]:
  """The sampled key sets I_i of every query (one block; the module samples blockwise).

  log_scores [B, H, T] (`dtu_log_scores`), mask [B, T] bool or None. Returns indices
  [B, H, T, keep] int32 and valid [B, H, T, keep] bool (False: a surplus slot). The
  same draws as the module's blockwise sampling with the same rng and `impl` (the two
  implementations select the same sets but for float ties at the keep-th key).
  """
  t = log_scores.shape[-1]
  return _sample_block(rng, log_scores, jnp.arange(t), mask, causal, min(keep, t), impl)


def _gather_rows(x: jax.Array, indices: jax.Array) -> jax.Array:
  """x [B, H, T, D], indices [B, H, Q, A] (in [0, T)) -> [B, H, Q, A, D].

  One gather from the flattened [B H T, D] rows: on CPU about 3x faster than the
  batched (vmapped) gather, and its transpose is a plain scatter-add.
  """
  b, h, t, d = x.shape
  offset = (jnp.arange(b * h, dtype=indices.dtype) * t).reshape(b, h, 1, 1)
  rows = (indices + offset).reshape(-1)
  flat = x.reshape(b * h * t, d).at[rows].get(mode="promise_in_bounds")
  return flat.reshape(indices.shape + (d,))


def gathered_attention(q: jax.Array, k: jax.Array, v: jax.Array, indices: jax.Array,
                       valid: jax.Array) -> jax.Array:
  """softmax(q K_I^T / sqrt(Dh)) V_I over the gathered sets (eq. 144), per query.

  q [B, H, Q, Dh]; k, v [B, H, T, Dh]; indices, valid [B, H, Q, A]. Returns
  [B, H, Q, Dh]; a query without any valid slot gives 0.
  """
  hd = q.shape[-1]
  k_sel = _gather_rows(k, indices)  # [B, H, Q, A, Dh]
  v_sel = _gather_rows(v, indices)
  logits = jnp.einsum("bhqd,bhqad->bhqa", q, k_sel) / jnp.sqrt(hd).astype(q.dtype)
  logits = jnp.where(valid, logits.astype(jnp.float32), jnp.finfo(jnp.float32).min)
  w = jax.nn.softmax(logits, axis=-1) * valid  # all-invalid rows -> 0
  return jnp.einsum("bhqa,bhqad->bhqd", w.astype(v.dtype), v_sel)


def dtu_dense_reference(q: jax.Array, k: jax.Array, v: jax.Array, indices: jax.Array,
                        valid: jax.Array) -> jax.Array:
  """The same attention as `gathered_attention`, as a dense [T, T] masked softmax.

  O(n^2 d); for tests. Shapes as in `gathered_attention`.
  """
  t = k.shape[2]
  hd = q.shape[-1]
  onehot = jax.nn.one_hot(indices, t, dtype=jnp.int32) * valid[..., None]
  allowed = onehot.sum(-2) > 0  # [B, H, Q, T]
  logits = jnp.einsum("bhqd,bhtd->bhqt", q, k) / jnp.sqrt(hd).astype(q.dtype)
  logits = jnp.where(allowed, logits.astype(jnp.float32), jnp.finfo(jnp.float32).min)
  w = jax.nn.softmax(logits, axis=-1) * allowed
  return jnp.einsum("bhqt,bhtd->bhqd", w.astype(v.dtype), v)


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, selected: jax.Array
                     ) -> jax.Array:
  """The attention of `gathered_attention` as a masked softmax over all T keys.

  q [B, H, Q, Dh]; k, v [B, H, T, Dh]; selected [B, H, Q, T] bool, the sets. O(Q T Dh),
  but plain matmuls: faster than the gathers when keep is a large share of T. Through
  `jax.nn.dot_product_attention` with the sets as its mask, like `full_attention`. A
  query with an empty set gives 0 (dot_product_attention alone would average all keys).
  """
  out = jax.nn.dot_product_attention(*(a.swapaxes(1, 2) for a in (q, k, v)), mask=selected)
  return out.swapaxes(1, 2) * jnp.any(selected, axis=-1, keepdims=True).astype(out.dtype)


def sampled_attention(rng: jax.Array, q: jax.Array, k: jax.Array, v: jax.Array,
                      config: DTUConfig, causal: bool, mask: jax.Array | None = None,
                      impl: str = "auto", return_sets: bool = True,
                      log_scores: jax.Array | None = None
                      ) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
  """DTU attention with sampling and attention done per block of queries (Alg. 6).

  q, k, v [B, T, H, Dh]; mask [B, T] bool or None. Returns the attention output
  [B, T, H, Dh] and the sampled indices, valid [B, H, T, keep] (the sets used; None
  with `return_sets=False`, which spares the dense implementation a top-k).
  `log_scores` [B, H, T]: the log c~_j to sample with (the frozen-set pass, see the
  module docstring); default `dtu_log_scores(k, config.scores)`.

  `impl`: 'gathered' samples with a top-k and gathers the keep keys/values of each
  query (O(T keep Dh), SPEC 4); 'dense' samples with a bisection (`_sample_threshold`)
  and computes the same softmax over the same sets as a masked softmax over all T keys
  (O(T^2 Dh), but plain matmuls); 'auto' takes 'dense' when T < DENSE_BELOW * keep,
  where the top-k and the gathers cost more than the keys they skip. The two select
  the same sets but for float ties at the keep-th key (lowest index wins in 'dense').
  """
  b, t, h, hd = q.shape
  keep = min(config.keep, t)
  block = min(config.block_q, t)
  num_blocks = -(-t // block)
  impl = _impl(impl, t, keep)
  if log_scores is None:
    log_scores = dtu_log_scores(k, config.scores)
  chex.assert_shape(log_scores, (b, h, t))
  log_scores = lax.stop_gradient(log_scores).astype(jnp.float32)
  qt, kt, vt = (a.transpose(0, 2, 1, 3) for a in (q, k, v))  # [B, H, T, Dh]
  qt = jnp.pad(qt, ((0, 0), (0, 0), (0, num_blocks * block - t), (0, 0)))
  q_blocks = qt.reshape(b, h, num_blocks, block, hd).transpose(2, 0, 1, 3, 4)
  # Rematerialised in the backward pass: what is kept for a block is its indices
  # (gathered: 5 bytes per kept key) or its bool set mask (dense: 1 byte per key, a
  # quarter of the float weights the full attention keeps), not gathered keys or [Q, T]
  # float weights. (Rebuilding the mask from a threshold per query instead would keep
  # O(Q) numbers but recompute the race keys: 3% slower steps on CPU.)
  attend_gathered = jax.checkpoint(gathered_attention)
  attend_dense = jax.checkpoint(masked_attention)

  def one_block(args):
    q_blk, start = args
    q_pos = start + jnp.arange(block)
    race = _race_keys(_row_seeds(rng, q_pos, b, h), log_scores, q_pos, mask, causal)
    x_lo, x_hi = _race_bounds(log_scores, q_pos, mask, causal, keep)
    if impl == "gathered":
      indices, valid = _sample_top_k(race, x_lo, keep)
      return attend_gathered(q_blk, kt, vt, indices, valid), indices, valid
    selected = _sample_mask(race, x_lo, x_hi, keep)
    out = attend_dense(q_blk, kt, vt, selected)
    if not return_sets:
      return out, None, None
    indices, valid = _sets_from_mask(race, selected, keep)
    return out, indices, valid

  starts = jnp.arange(num_blocks) * block
  out, indices, valid = lax.map(one_block, (q_blocks, starts))
  unblock = lambda a: jnp.moveaxis(a, 0, 2).reshape(b, h, num_blocks * block, -1)[:, :, :t]
  out = unblock(out).transpose(0, 2, 1, 3)
  if indices is None or not return_sets:
    return out, None, None
  return out, unblock(indices), unblock(valid)


def full_attention(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array,
                   impl: str = "xla", causal: bool = False,
                   mask: jax.Array | None = None) -> jax.Array:
  """Standard attention, q [B, Q, H, Dh], k, v [B, T, H, Dh], allowed [B|1, 1, Q, T].

  `jax.nn.dot_product_attention`, the one entry point where backends add fused kernels.
  impl 'xla': logits accumulated and the softmax taken in float32, under `allowed`.
  impl 'cudnn': cuDNN flash attention; its own causal mask where there is no padding
  (`mask` None), else `allowed` as a bias. Not per-row key lengths: those would assume
  the padding at the end of every row, and sampling left-pads its prompts.
  """
  if impl == "cudnn":
    if mask is None:
      return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")
    return jax.nn.dot_product_attention(q, k, v, mask=allowed, implementation="cudnn")
  return jax.nn.dot_product_attention(q, k, v, mask=allowed)


class DTU(nn.Module):
  """Self-attention x [B, T, d] -> [B, T, d] over a sampled subset of keys per query.

  mask: optional [B, T] bool, True for real (non-padding) tokens; padded keys are
  never attended to. With `decode=True` (after initialising with decode=True on an
  input [B, max_len, d], which creates the 'cache' collection), x is [B, L, d] new
  tokens (L = 1 for token-by-token decoding) written at cache_index, attending to
  every cached position <= their own; `mask` is then None or [B, max_len] over the
  cache positions. Sampled training calls read and write the 'dtu_scores' collection
  (the frozen-set pass, module docstring).
  """

  num_heads: int
  causal: bool
  config: DTUConfig = DTUConfig(enabled=False)
  dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.normal(stddev=0.02)

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None,
               deterministic: bool = True, decode: bool = False,
               queries: jax.Array | None = None) -> jax.Array:
    b, t, d = x.shape
    h = self.num_heads
    hd = d // h
    p = lambda name, init, shape, axes: self.param(
        name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)
    qkv_kernel = p("qkv_kernel", self.kernel_init, (d, 3, h, hd), ("embed", None, "heads", "kv"))
    qkv_bias = p("qkv_bias", nn.initializers.zeros, (3, h, hd), (None, "heads", "kv"))
    o_kernel = p("o_kernel", self.kernel_init, (h, hd, d), ("heads", "kv", "embed"))
    o_bias = p("o_bias", nn.initializers.zeros, (d,), ("embed",))
    cast = lambda a: jnp.asarray(a, self.dtype)
    if queries is not None:
      return self._at_queries(x, mask, queries, cast(qkv_kernel), cast(qkv_bias),
                              cast(o_kernel), cast(o_bias), deterministic, decode)
    qkv = jnp.einsum("btd,dshk->sbthk", cast(x), cast(qkv_kernel)) + cast(qkv_bias)[:, None, None]
    q, k, v = qkv[0], qkv[1], qkv[2]

    if decode and self.has_variable("cache", "cached_key"):
      out = self._decode_step(q, k, v, mask)
    else:
      if decode:  # initialisation: create the cache, compute as usual
        self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
        self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
        self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
      cfg = self.config
      if cfg.enabled and not deterministic and not decode and cfg.keep < t:
        if self.has_variable("dtu_scores", "log_scores"):
          log_scores = self.get_variable("dtu_scores", "log_scores")
        else:
          log_scores = dtu_log_scores(k, cfg.scores)
        if self.is_mutable_collection("dtu_scores"):
          self.put_variable("dtu_scores", "log_scores", log_scores)
        out, _, _ = sampled_attention(self.make_rng("dtu"), q, k, v, cfg, self.causal, mask,
                                      return_sets=False, log_scores=log_scores)
      else:
        out = full_attention(q, k, v, _candidates(jnp.arange(t), t, mask, self.causal),
                             cfg.attention, self.causal, mask)
    chex.assert_shape(out, (b, t, h, hd))
    return jnp.einsum("bqhk,hkd->bqd", out, cast(o_kernel)) + cast(o_bias)

  def _at_queries(self, x, mask, queries, qkv_kernel, qkv_bias, o_kernel, o_bias,
                  deterministic: bool, decode: bool) -> jax.Array:
    """Full two-sided attention for the query positions `queries` [B, K] only -> [B, K, d]."""
    sampled = self.config.enabled and not deterministic and self.config.keep < x.shape[1]
    if self.causal or decode or sampled:
      raise ValueError("DTU queries: only for non-causal full attention (BERT inference)")
    xq = jnp.take_along_axis(x, queries[..., None], axis=1)
    q = jnp.einsum("bqd,dhk->bqhk", xq.astype(qkv_kernel.dtype), qkv_kernel[:, 0]) + qkv_bias[0]
    kv = jnp.einsum("btd,dshk->sbthk", x.astype(qkv_kernel.dtype), qkv_kernel[:, 1:])
    kv = kv + qkv_bias[1:, None, None]
    allowed = _candidates(jnp.zeros(queries.shape[1], jnp.int32), x.shape[1], mask, causal=False)
    out = full_attention(q, kv[0], kv[1], allowed, self.config.attention, False, mask)
    return jnp.einsum("bqhk,hkd->bqd", out, o_kernel) + o_bias

  def _decode_step(self, q: jax.Array, k: jax.Array, v: jax.Array,
                   mask: jax.Array | None) -> jax.Array:
    """Writes the new k, v at cache_index and attends over the cache (full attention)."""
    cached_key = self.variable("cache", "cached_key")
    cached_value = self.variable("cache", "cached_value")
    cache_index = self.variable("cache", "cache_index")
    b, max_len, h, hd = cached_key.value.shape
    chex.assert_shape(q, (b, None, h, hd))
    length = q.shape[1]
    start = cache_index.value
    zero = jnp.zeros((), start.dtype)
    cached_key.value = lax.dynamic_update_slice(cached_key.value, k, (zero, start, zero, zero))
    cached_value.value = lax.dynamic_update_slice(cached_value.value, v, (zero, start, zero, zero))
    cache_index.value = start + length
    q_pos = start + jnp.arange(length)
    if mask is not None:
      chex.assert_shape(mask, (b, max_len))
    allowed = _candidates(q_pos, max_len, mask, causal=True)
    return full_attention(q, cached_key.value, cached_value.value, allowed)
