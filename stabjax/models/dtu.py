"""DTU, the Dynamic Transformer Unit (SPEC section 4, paper appendix B.4, Alg. 6).

SKELETON: only the switched-off path (standard multi-head self-attention) is here; the
sampled, gathered attention and the KV cache are being written. Parameter names and
logical axes are final.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from stabjax.configs import DTUConfig


class DTU(nn.Module):
  """Self-attention x [B, T, d] -> [B, T, d] over a sampled subset of keys per query.

  mask: optional [B, T] bool, True for real (non-padding) tokens; padded keys are
  never attended to.
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
    logits = jnp.einsum("bqhk,bshk->bhqs", q, k) / jnp.sqrt(hd).astype(self.dtype)
    allowed = jnp.ones((b, 1, t, t), bool)
    if self.causal:
      allowed &= jnp.tril(jnp.ones((t, t), bool))[None, None]
    if mask is not None:
      allowed &= mask[:, None, None, :]
    logits = jnp.where(allowed, logits, jnp.finfo(logits.dtype).min)
    w = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqs,bshk->bqhk", w, v)
    return jnp.einsum("bqhk,hkd->bqd", out, cast(o_kernel)) + cast(o_bias)
