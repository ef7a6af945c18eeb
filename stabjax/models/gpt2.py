"""GPT-2: a pre-LayerNorm causal decoder with tied embeddings (SPEC section 2).

Exactly the architecture of Hugging Face `GPT2LMHeadModel`, with the MLP a DMU and the
self-attention a DTU (SPEC sections 3-4); switched off they are the standard layers,
so public GPT-2 checkpoints load through `stabjax.models.hf.from_pretrained`.

The helpers `layer_norm`, `embedding_param` and `apply_blocks` are shared with BERT.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from stabjax.configs import ModelConfig
from stabjax.models.dmu import DMU
from stabjax.models.dtu import DTU

# RNG streams split across stacked layers, so every layer draws its own masks.
LAYER_RNG_STREAMS = ("params", "dmu", "dtu", "dropout")


def compute_dtype(config: ModelConfig) -> Any:
  return jnp.dtype(config.dtype)


def layer_norm(config: ModelConfig, name: str) -> nn.LayerNorm:
  """LayerNorm with float32 'scale'/'bias' params on the 'embed' axis."""
  return nn.LayerNorm(
      epsilon=config.layer_norm_eps,
      dtype=compute_dtype(config),
      param_dtype=jnp.float32,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
      name=name,
  )


def shard_activations(x: jax.Array, last: str = "act_embed") -> jax.Array:
  """Keeps [B, T, ...] activations split over the batch axes (a no-op without a mesh).

  Without it XLA may all-gather the batch instead of an FSDP-sharded weight (e.g. for
  the tied logits h @ wte.T, whose contraction dim is fsdp-sharded), so activation
  memory grew with the global batch.
  """
  return nn.with_logical_constraint(x, ("batch", "length", last))


def embedding_param(module: nn.Module, name: str, num: int, d: int,
                    axes: tuple[str | None, str | None],
                    stddev: float = 0.02) -> jax.Array:
  """A float32 [num, d] embedding table created with logical axis names."""
  init = nn.with_logical_partitioning(nn.initializers.normal(stddev=stddev), axes)
  return module.param(name, init, (num, d), jnp.float32)


def apply_blocks(block_cls: type[nn.Module], config: ModelConfig, x: jax.Array,
                 *args: Any, queries: jax.Array | None = None) -> jax.Array:
  """Runs `config.num_layers` blocks `block_cls(config)(x, *args) -> (x, None)`.

  Must be called inside a compact method. Unrolled, the blocks are named
  'block_0'..'block_{L-1}'. With `config.scan_layers` they are one `nn.scan` named
  'layers' (MaxText's scan_layers, SPEC section 7) whose params (and the 'cache',
  'dmu_masks' and 'dtu_scores' collections) have a leading 'layers' axis of size L.
  `args` are broadcast to every layer; the last two must be the Python bools
  (deterministic, decode).

  `queries` [B, K] (inference): only the outputs at these positions are wanted, so the
  last unrolled block computes only those rows (`block_cls(...)(x, *args, queries=...)`)
  and the result is [B, K, d]; scanned layers compute every row and take them after.
  """
  if queries is not None:
    take = lambda y: jnp.take_along_axis(y, queries[..., None], axis=1)  # noqa: E731
    if config.scan_layers:
      return take(apply_blocks(block_cls, config, x, *args))
    for i in range(config.num_layers - 1):
      x, _ = block_cls(config, name=f"block_{i}")(x, *args)
    if config.num_layers == 0:
      return take(x)
    x, _ = block_cls(config, name=f"block_{config.num_layers - 1}")(x, *args, queries=queries)
    return x
  cls = block_cls
  if config.remat:
    # Under scan, the loop already keeps XLA from CSE-ing the recomputation away.
    cls = nn.remat(cls, prevent_cse=not config.scan_layers,
                   policy=jax.checkpoint_policies.nothing_saveable,
                   static_argnums=(len(args), len(args) + 1))  # counts self and x
  if config.scan_layers:
    cls = nn.scan(
        cls,
        # The DMU masks / DTU scores of a training call stack over layers like the
        # params, and are sliced per layer when passed back (the frozen-set pass).
        variable_axes={"params": 0, "cache": 0, "dmu_masks": 0, "dtu_scores": 0},
        split_rngs={s: True for s in LAYER_RNG_STREAMS},
        in_axes=(nn.broadcast,) * len(args),
        length=config.num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    x, _ = cls(config, name="layers")(x, *args)
    return x
  for i in range(config.num_layers):
    x, _ = cls(config, name=f"block_{i}")(x, *args)
  return x


class GPT2Block(nn.Module):
  """x + DTU(LN1(x)); x + DMU(LN2(x)), as HF `GPT2Block` (no cross-attention)."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None, deterministic: bool,
               decode: bool) -> tuple[jax.Array, None]:
    cfg = self.config
    dtype = compute_dtype(cfg)
    dropout = nn.Dropout(rate=cfg.dropout_rate)
    h = layer_norm(cfg, "ln_1")(x)
    h = DTU(num_heads=cfg.num_heads, causal=True, config=cfg.dtu, dtype=dtype,
            name="attn")(h, mask=mask, deterministic=deterministic, decode=decode)
    x = x + dropout(h, deterministic=deterministic)
    h = layer_norm(cfg, "ln_2")(x)
    h = DMU(d_ff=cfg.d_ff, config=cfg.dmu, activation="gelu_tanh", dtype=dtype,
            name="mlp")(h, deterministic=deterministic)
    x = x + dropout(h, deterministic=deterministic)
    return shard_activations(x), None


class GPT2(nn.Module):
  """GPT-2 language model: token ids [B, T] -> next-token logits [B, T, V] float32.

  Top-level params: 'wte' [V, d], 'wpe' [max_len, d], 'block_0'.. (or 'layers' when
  scanned), 'ln_f'. The output projection is tied to 'wte'.
  """

  config: ModelConfig

  @nn.compact
  def __call__(self, input_ids: jax.Array, positions: jax.Array | None = None,
               attention_mask: jax.Array | None = None, deterministic: bool = True,
               decode: bool = False, return_hidden: bool = False
               ) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Logits (and the ln_f output when `return_hidden`).

    Args:
      input_ids: [B, T] int token ids ([B, 1] when decoding token by token).
      positions: [B, T] int positions; default arange(T). Required for decode steps.
      attention_mask: optional [B, T], 1/True for real tokens; padded keys are never
        attended to (on top of causality). With `decode`: None or [B, max_len] over
        the cache positions.
      deterministic: no dropout and no DMU/DTU masks (needs no RNG streams).
      decode: KV-cached generation. `init` with decode=True on ids [B, max_len]
        creates the 'cache' collection; each later call (mutable=['cache']) appends.
      return_hidden: also return the final hidden states [B, T, d] (float32).
    """
    cfg = self.config
    dtype = compute_dtype(cfg)
    b, t = input_ids.shape
    if positions is None:
      # A decode step cannot know its position; the cache-creating init can.
      if decode and not self.is_initializing():
        raise ValueError("GPT2 with decode=True needs explicit positions [B, L]")
      positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    mask = None if attention_mask is None else attention_mask.astype(bool)

    wte = embedding_param(self, "wte", cfg.vocab_size, cfg.d_model, ("vocab", "embed"))
    wpe = embedding_param(self, "wpe", cfg.max_len, cfg.d_model, (None, "embed"))
    x = (jnp.take(wte, input_ids, axis=0) + jnp.take(wpe, positions, axis=0)).astype(dtype)
    x = shard_activations(nn.Dropout(rate=cfg.dropout_rate)(x, deterministic=deterministic))

    x = apply_blocks(GPT2Block, cfg, x, mask, deterministic, decode)

    hidden = layer_norm(cfg, "ln_f")(x)
    # Accumulate the vocabulary projection in float32 even for bfloat16 compute.
    logits = jnp.einsum("btd,vd->btv", hidden, wte.astype(dtype),
                        preferred_element_type=jnp.float32)
    logits = shard_activations(logits, "act_vocab")
    if return_hidden:
      return logits, hidden.astype(jnp.float32)
    return logits
