"""DTU, the Dynamic Transformer Unit (SPEC section 4, paper appendix B.4, Alg. 6).

Self-attention in which, on training calls, each query i attends only to a sampled set
I_i of a3 = `DTUConfig.keep` keys (Alg. 6, eq. 144):

* Sampling: without replacement, by Gumbel-top-k on log c~_j + Gumbel noise drawn from
  the `'dtu'` RNG stream, independently per (batch, head, query). This is successive
  sampling proportional to c~_j (Plackett-Luce), so P(j in I_i) increases with c~_j
  (it is exactly proportional only when a3 = 1). Scores c~_j (`DTUConfig.scores`):
  `key_norm`, the L2 norm of key j per head (no gradient), or `uniform`.
* Candidates: keys that are not padding and, for causal models, j <= i; causal models
  always keep j = i. When fewer than a3 keys are candidates all of them are kept and
  the surplus slots are masked out.
* Compute: the a3 keys/values of each query are gathered ([B, H, q_block, a3, Dh]) and
  the softmax runs over the a3 slots, O(n a3 d) instead of O(n^2 d). Queries go in
  blocks of `DTUConfig.block_q` (`lax.map`), so the per-query scores used for sampling
  (O(n^2) scalars per head) and the gathered keys exist one block at a time; the
  attention of a block is rematerialised in the backward pass, so what is kept for
  it is O(n a3) indices, not O(n a3 d) gathered keys. The Gumbel noise of a query
  depends only on (key, query position), so the result does not depend on block_q.

Evaluation (`deterministic=True`), `enabled=False`, or a3 >= the sequence length (every
candidate set then fits) use standard full attention: DTU is a training-time stochastic
unit, like dropout, and evaluation sees every key. The KV-cache decode path
(`decode=True`, Flax's pattern) is always full attention as well.

A query with no candidate key at all (e.g. a left-padding position of a causal model)
outputs zeros before the output projection on the sampled path.
"""

from __future__ import annotations

import math
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
# A factor-of-8 cost ratio: below it a dense masked softmax over all T keys beats the
# gather/scatter of `keep` keys per query (CPU, benchmarks/RESULTS.md).
DENSE_BELOW = 8
# Margin (in standard deviations) of the survival threshold of `_survival_threshold`.
_THRESHOLD_SIGMAS = 6.0


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


def _gumbel(seeds: jax.Array, t: int) -> jax.Array:
  """float32 [B, H, Q, T] standard Gumbel noise, one per (query, key), from the query seeds.

  The per-pair uniforms are a keyed hash of the key index, not `jax.random` draws:
  threefry costs about 7 ns per 32-bit word on CPU, more than the attention the DTU
  saves (benchmarks/RESULTS.md). The seeds themselves come from the `'dtu'` stream.
  """
  j = lax.broadcasted_iota(jnp.uint32, (1, 1, 1, t), 3)
  bits = _mix32(_mix32(j ^ seeds[..., :1]) ^ seeds[..., 1:])
  u = ((bits >> 8).astype(jnp.float32) + 0.5) * (1.0 / (1 << 24))  # in (0, 1)
  return -jnp.log(-jnp.log(u))


def _perturbed(seeds: jax.Array, log_scores: jax.Array, q_pos: jax.Array,
               mask: jax.Array | None, causal: bool) -> jax.Array:
  """log c~_j + Gumbel noise [B, H, Q, T]; +inf at a causal query's own key, -inf off
  the candidates."""
  t = log_scores.shape[-1]
  perturbed = log_scores[:, :, None, :] + _gumbel(seeds, t)
  if causal:  # the query's own position always wins
    is_self = jnp.arange(t)[None, :] == q_pos[:, None]
    perturbed = jnp.where(is_self[None, None], jnp.inf, perturbed)
  return jnp.where(_candidates(q_pos, t, mask, causal), perturbed, -jnp.inf)


def _survival_threshold(log_scores: jax.Array, q_pos: jax.Array, mask: jax.Array | None,
                        causal: bool, keep: int) -> jax.Array:
  """tau [B, H, Q]: a threshold that at least `keep` perturbed keys pass, almost surely.

  Key j passes (log c~_j + G >= tau) with probability 1 - exp(-w_j s), s = e^-tau,
  w_j = c~_j / max c~ <= 1. By concavity, 1 - exp(-w s) >= w (1 - e^-s), so the expected
  number passing is at least W (1 - e^-s), W the candidates' total weight (a prefix sum
  for causal queries). tau puts that bound `_THRESHOLD_SIGMAS` standard deviations above
  the number needed; -inf when the candidates are too few for that (all of them pass).
  """
  ls = log_scores - jnp.max(log_scores, axis=-1, keepdims=True)
  w = jnp.exp(ls)
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
    needed = jnp.float32(keep)
  target = needed + _THRESHOLD_SIGMAS * (jnp.sqrt(needed) + 1.0)
  ratio = target / jnp.maximum(total, jnp.finfo(jnp.float32).tiny)
  safe = jnp.minimum(ratio, 0.5)
  return jnp.where(ratio < 1.0, -jnp.log(-jnp.log1p(-jnp.where(ratio < 1.0, ratio, safe))),
                   -jnp.inf)


def _top_keep(perturbed: jax.Array, tau: jax.Array, keep: int) -> tuple[jax.Array, jax.Array]:
  """Exact top-`keep` (values, indices) of `perturbed` [..., T] using the threshold tau.

  Keys below tau are set to -inf first, which makes XLA's top-k (a partial sort) much
  cheaper; a row where fewer than `keep` keys pass falls back to its unthresholded keys,
  so the result is always the exact top-k (ties: lower index first, as `lax.top_k`).
  """
  passes = perturbed >= tau[..., None]
  enough = (jnp.sum(passes, axis=-1) >= keep) | (tau == -jnp.inf)
  tau = jnp.where(enough, tau, -jnp.inf)
  return lax.top_k(jnp.where(perturbed >= tau[..., None], perturbed, -jnp.inf), keep)


def _sample_block_values(seeds: jax.Array, log_scores: jax.Array, q_pos: jax.Array,
                         mask: jax.Array | None, causal: bool, keep: int
                         ) -> tuple[jax.Array, jax.Array]:
  """Gumbel-top-k of the queries at q_pos: (values, indices) [B, H, Q, keep]."""
  perturbed = _perturbed(seeds, log_scores, q_pos, mask, causal)
  tau = _survival_threshold(log_scores, q_pos, mask, causal, keep)
  values, indices = _top_keep(perturbed, tau, keep)
  return values, indices.astype(jnp.int32)


def _sample_block(rng: jax.Array, log_scores: jax.Array, q_pos: jax.Array,
                  mask: jax.Array | None, causal: bool,
                  keep: int) -> tuple[jax.Array, jax.Array]:
  """Gumbel-top-k for the queries at positions q_pos: indices, valid [B, H, Q, keep]."""
  b, h, _ = log_scores.shape
  seeds = _row_seeds(rng, q_pos, b, h)
  values, indices = _sample_block_values(seeds, log_scores, q_pos, mask, causal, keep)
  return indices, values > -jnp.inf


def dtu_sample(rng: jax.Array, log_scores: jax.Array, keep: int, causal: bool,
               mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """The sampled key sets I_i of every query (one block; the module samples blockwise).

  log_scores [B, H, T] (`dtu_log_scores`), mask [B, T] bool or None. Returns indices
  [B, H, T, keep] int32 and valid [B, H, T, keep] bool (False: a surplus slot). The
  same draws as the module's blockwise sampling with the same rng.
  """
  t = log_scores.shape[-1]
  return _sample_block(rng, log_scores, jnp.arange(t), mask, causal, keep)


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


def _set_mask(indices: jax.Array, valid: jax.Array, t: int) -> jax.Array:
  """bool [B, H, Q, T]: True at the valid sampled keys of each query (a scatter).

  Built from the indices, not by comparing with the keep-th value: XLA's CPU top-k does
  not order ties by index, so only the indices say which of tied keys were taken.
  """
  lead = indices.shape[:-1]
  rows = jnp.arange(math.prod(lead), dtype=indices.dtype).reshape(lead + (1,)) * t
  flat = jnp.zeros((math.prod(lead) * t,), bool)
  flat = flat.at[(indices + rows).reshape(-1)].set(valid.reshape(-1), mode="promise_in_bounds",
                                                   unique_indices=True)
  return flat.reshape(lead + (t,))


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, indices: jax.Array,
                     valid: jax.Array) -> jax.Array:
  """The same attention as `gathered_attention`, as a masked softmax over all T keys.

  O(Q T Dh) but plain matmuls, so faster than the gathers when keep is a large share
  of T. Shapes as in `gathered_attention`.
  """
  allowed = _set_mask(indices, valid, k.shape[2])
  hd = q.shape[-1]
  logits = jnp.einsum("bhqd,bhtd->bhqt", q, k) / jnp.sqrt(hd).astype(q.dtype)
  logits = jnp.where(allowed, logits.astype(jnp.float32), jnp.finfo(jnp.float32).min)
  w = jax.nn.softmax(logits, axis=-1) * allowed  # all-invalid rows -> 0
  return jnp.einsum("bhqt,bhtd->bhqd", w.astype(v.dtype), v)


def sampled_attention(rng: jax.Array, q: jax.Array, k: jax.Array, v: jax.Array,
                      config: DTUConfig, causal: bool, mask: jax.Array | None = None,
                      impl: str = "auto") -> tuple[jax.Array, jax.Array, jax.Array]:
  """DTU attention with sampling and attention done per block of queries (Alg. 6).

  q, k, v [B, T, H, Dh]; mask [B, T] bool or None. Returns the attention output
  [B, T, H, Dh] and the sampled indices, valid [B, H, T, keep] (the sets used).

  `impl`: 'gathered' gathers the keep keys/values of each query (O(T keep Dh), SPEC 4);
  'dense' computes the same softmax over the same sets as a masked softmax over all T
  keys (O(T^2 Dh), but plain matmuls); 'auto' takes 'dense' when T <= DENSE_BELOW *
  keep, where the gathers cost more than the keys they skip. Same result either way.
  """
  b, t, h, hd = q.shape
  keep = min(config.keep, t)
  block = min(config.block_q, t)
  num_blocks = -(-t // block)
  if impl == "auto":
    impl = "dense" if t <= DENSE_BELOW * keep else "gathered"
  if impl not in ("dense", "gathered"):
    raise ValueError(f"impl must be auto, dense or gathered, got {impl!r}")
  log_scores = dtu_log_scores(k, config.scores)
  qt, kt, vt = (a.transpose(0, 2, 1, 3) for a in (q, k, v))  # [B, H, T, Dh]
  qt = jnp.pad(qt, ((0, 0), (0, 0), (0, num_blocks * block - t), (0, 0)))
  q_blocks = qt.reshape(b, h, num_blocks, block, hd).transpose(2, 0, 1, 3, 4)
  # Rematerialised in the backward pass: only indices are kept for it, not gathered keys
  # or [Q, T] weights.
  attend = jax.checkpoint(gathered_attention if impl == "gathered" else masked_attention)

  def one_block(args):
    q_blk, start = args
    q_pos = start + jnp.arange(block)
    seeds = _row_seeds(rng, q_pos, b, h)
    values, indices = _sample_block_values(seeds, log_scores, q_pos, mask, causal, keep)
    valid = values > -jnp.inf
    return attend(q_blk, kt, vt, indices, valid), indices, valid

  starts = jnp.arange(num_blocks) * block
  out, indices, valid = lax.map(one_block, (q_blocks, starts))
  unblock = lambda a: jnp.moveaxis(a, 0, 2).reshape(b, h, num_blocks * block, -1)[:, :, :t]
  out, indices, valid = unblock(out), unblock(indices), unblock(valid)
  return out.transpose(0, 2, 1, 3), indices, valid


def full_attention(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array) -> jax.Array:
  """Standard attention, q [B, Q, H, Dh], k, v [B, T, H, Dh], allowed [B|1, 1, Q, T]."""
  hd = q.shape[-1]
  logits = jnp.einsum("bqhk,bshk->bhqs", q, k) / jnp.sqrt(hd).astype(q.dtype)
  logits = jnp.where(allowed, logits, jnp.finfo(logits.dtype).min)
  w = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(q.dtype)
  return jnp.einsum("bhqs,bshk->bqhk", w, v)


class DTU(nn.Module):
  """Self-attention x [B, T, d] -> [B, T, d] over a sampled subset of keys per query.

  mask: optional [B, T] bool, True for real (non-padding) tokens; padded keys are
  never attended to. With `decode=True` (after initialising with decode=True on an
  input [B, max_len, d], which creates the 'cache' collection), x is [B, L, d] new
  tokens (L = 1 for token-by-token decoding) written at cache_index, attending to
  every cached position <= their own; `mask` is then None or [B, max_len] over the
  cache positions.
  """

  num_heads: int
  causal: bool
  config: DTUConfig = DTUConfig(enabled=False)
  dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.normal(stddev=0.02)

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None,
               deterministic: bool = True, decode: bool = False) -> jax.Array:
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
        out, _, _ = sampled_attention(self.make_rng("dtu"), q, k, v, cfg, self.causal, mask)
      else:
        out = full_attention(q, k, v, _candidates(jnp.arange(t), t, mask, self.causal))
    chex.assert_shape(out, (b, t, h, hd))
    return jnp.einsum("bqhk,hkd->bqd", out, cast(o_kernel)) + cast(o_bias)

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
