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


def _sample_block(rng: jax.Array, log_scores: jax.Array, q_pos: jax.Array,
                  mask: jax.Array | None, causal: bool,
                  keep: int) -> tuple[jax.Array, jax.Array]:
  """Gumbel-top-k for the queries at positions q_pos: indices, valid [B, H, Q, keep]."""
  b, h, t = log_scores.shape
  row_noise = lambda i: jax.random.gumbel(jax.random.fold_in(rng, i), (b, h, t), jnp.float32)
  noise = jax.vmap(row_noise, out_axes=2)(q_pos)  # [B, H, Q, T]
  perturbed = log_scores[:, :, None, :] + noise
  if causal:  # the query's own position always wins
    is_self = jnp.arange(t)[None, :] == q_pos[:, None]
    perturbed = jnp.where(is_self[None, None], jnp.inf, perturbed)
  perturbed = jnp.where(_candidates(q_pos, t, mask, causal), perturbed, -jnp.inf)
  values, indices = lax.top_k(perturbed, keep)
  return indices.astype(jnp.int32), values > -jnp.inf


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
  """x [B, H, T, D], indices [B, H, Q, A] -> [B, H, Q, A, D]."""
  return jax.vmap(jax.vmap(lambda xs, ix: xs[ix]))(x, indices)


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


def sampled_attention(rng: jax.Array, q: jax.Array, k: jax.Array, v: jax.Array,
                      config: DTUConfig, causal: bool, mask: jax.Array | None = None
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """DTU attention with sampling and gathering done per block of queries (Alg. 6).

  q, k, v [B, T, H, Dh]; mask [B, T] bool or None. Returns the attention output
  [B, T, H, Dh] and the sampled indices, valid [B, H, T, keep] (the sets used).
  """
  b, t, h, hd = q.shape
  keep = min(config.keep, t)
  block = min(config.block_q, t)
  num_blocks = -(-t // block)
  log_scores = dtu_log_scores(k, config.scores)
  qt, kt, vt = (a.transpose(0, 2, 1, 3) for a in (q, k, v))  # [B, H, T, Dh]
  qt = jnp.pad(qt, ((0, 0), (0, 0), (0, num_blocks * block - t), (0, 0)))
  q_blocks = qt.reshape(b, h, num_blocks, block, hd).transpose(2, 0, 1, 3, 4)
  # Rematerialised in the backward pass: only indices (not gathered keys) are kept.
  attend = jax.checkpoint(gathered_attention)

  def one_block(args):
    q_blk, start = args
    q_pos = start + jnp.arange(block)
    indices, valid = _sample_block(rng, log_scores, q_pos, mask, causal, keep)
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
