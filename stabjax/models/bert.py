"""BERT: a post-LayerNorm bidirectional encoder with the MLM head (SPEC section 2).

Exactly the architecture of Hugging Face `BertForMaskedLM` (absolute positions, no
pooler), with the MLP a DMU and the self-attention a DTU (SPEC sections 3-4).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from stabjax.configs import ModelConfig
from stabjax.models.dmu import DMU
from stabjax.models.dtu import DTU
from stabjax.models.gpt2 import (apply_blocks, compute_dtype, embedding_param, layer_norm,
                                 shard_activations)


class BertEmbeddings(nn.Module):
  """LN(word + position + token type); returns it and the word table (for tying)."""

  config: ModelConfig

  @nn.compact
  def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array,
               deterministic: bool) -> tuple[jax.Array, jax.Array]:
    cfg = self.config
    t = input_ids.shape[1]
    word = embedding_param(self, "word", cfg.vocab_size, cfg.d_model, ("vocab", "embed"))
    position = embedding_param(self, "position", cfg.max_len, cfg.d_model, (None, "embed"))
    token_type = embedding_param(self, "token_type", cfg.type_vocab_size, cfg.d_model,
                                 (None, "embed"))
    x = (jnp.take(word, input_ids, axis=0) + position[None, :t]
         + jnp.take(token_type, token_type_ids, axis=0))
    x = layer_norm(cfg, "ln")(x.astype(compute_dtype(cfg)))
    x = nn.Dropout(rate=cfg.dropout_rate)(x, deterministic=deterministic)
    return x, word


class BertBlock(nn.Module):
  """LN(x + DTU(x, mask)); LN(x + DMU(x)), as HF `BertLayer`."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None, deterministic: bool,
               decode: bool, queries: jax.Array | None = None) -> tuple[jax.Array, None]:
    """x [B, T, d] -> [B, T, d], or [B, K, d] at the positions `queries` [B, K] only."""
    if decode:
      raise ValueError("BERT is an encoder; decode=True is not supported")
    cfg = self.config
    dtype = compute_dtype(cfg)
    dropout = nn.Dropout(rate=cfg.dropout_rate)
    h = DTU(num_heads=cfg.num_heads, causal=False, config=cfg.dtu, dtype=dtype,
            name="attn")(x, mask=mask, deterministic=deterministic, queries=queries)
    if queries is not None:
      x = jnp.take_along_axis(x, queries[..., None], axis=1)
    x = layer_norm(cfg, "attn_ln")(x + dropout(h, deterministic=deterministic))
    h = DMU(d_ff=cfg.d_ff, config=cfg.dmu, activation="gelu", dtype=dtype,
            name="mlp")(x, deterministic=deterministic)
    x = layer_norm(cfg, "mlp_ln")(x + dropout(h, deterministic=deterministic))
    return shard_activations(x), None


class BertMLMHead(nn.Module):
  """dense -> gelu -> LN -> tied decoder + bias, as HF `BertOnlyMLMHead`."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array, word: jax.Array) -> jax.Array:
    cfg = self.config
    dtype = compute_dtype(cfg)
    x = nn.Dense(
        cfg.d_model, dtype=dtype, param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                 ("embed", "mlp")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)),
        name="dense")(x)
    x = layer_norm(cfg, "ln")(jax.nn.gelu(x, approximate=False))
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
                      (cfg.vocab_size,), jnp.float32)
    # Accumulate the vocabulary projection in float32 even for bfloat16 compute.
    logits = jnp.einsum("btd,vd->btv", x, word.astype(dtype),
                        preferred_element_type=jnp.float32)
    return shard_activations(logits + bias, "act_vocab")


class BERT(nn.Module):
  """BERT masked LM: token ids [B, T] -> MLM logits [B, T, V] float32.

  Top-level params: 'embeddings' (word/position/token_type + ln), 'block_0'.. (or
  'layers' when scanned), 'mlm_head' (dense, ln, bias; decoder tied to the word table).
  """

  config: ModelConfig

  @nn.compact
  def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array | None = None,
               attention_mask: jax.Array | None = None, deterministic: bool = True,
               return_hidden: bool = False, head_positions: jax.Array | None = None
               ) -> jax.Array | tuple[jax.Array, jax.Array]:
    """MLM logits (and the last encoder layer's output when `return_hidden`).

    Args:
      input_ids: [B, T] int token ids.
      token_type_ids: [B, T] int segment ids; default zeros.
      attention_mask: optional [B, T], 1/True for real tokens; padded keys are never
        attended to. Outputs at padded positions are meaningless.
      deterministic: no dropout and no DMU/DTU masks (needs no RNG streams).
      return_hidden: also return the encoder output [B, T, d] (float32).
      head_positions: optional int [B, K] (inference): the outputs at these positions
        only, logits [B, K, V] and hidden [B, K, d]. The last layer and the MLM head
        then run on those K rows (a sampler reading one slot per forward skips most of
        the last layer and the vocabulary projection of the other T - 1).
    """
    cfg = self.config
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    mask = None if attention_mask is None else attention_mask.astype(bool)
    x, word = BertEmbeddings(cfg, name="embeddings")(input_ids, token_type_ids, deterministic)
    x = shard_activations(x)
    x = apply_blocks(BertBlock, cfg, x, mask, deterministic, False, queries=head_positions)
    logits = BertMLMHead(cfg, name="mlm_head")(x, word)
    if return_hidden:
      return logits, x.astype(jnp.float32)
    return logits
