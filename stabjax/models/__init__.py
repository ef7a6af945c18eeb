"""GPT-2 and BERT with DMU/DTU layers, and loading local Hugging Face checkpoints.

Params are the plain (unboxed) 'params' collection: `model.apply({'params': params},
input_ids, ...)`. Top-level keys are the groups other code keys on: GPT-2 'wte', 'wpe',
'block_i' (or 'layers'), 'ln_f'; BERT 'embeddings', 'block_i' (or 'layers'), 'mlm_head'.

A training-mode call can also return, and take back, the 'dmu_masks' and 'dtu_scores'
collections (the masks and key-set scores it used; `touched_params`, and the frozen-set
pass of `stabjax.models.dtu`):

  logits, state = model.apply({'params': p}, ids, deterministic=False, rngs=rngs,
                              mutable=['dmu_masks', 'dtu_scores'])
  touched = touched_params(p, state.get('dmu_masks'))
  logits2 = model.apply({'params': p2, **state}, ids, deterministic=False, rngs=rngs)
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from stabjax.configs import ModelConfig
from stabjax.models.bert import BERT
from stabjax.models.dmu import touched_params
from stabjax.models.gpt2 import GPT2
from stabjax.models.hf import from_pretrained

__all__ = ["BERT", "GPT2", "count_params", "from_pretrained", "get_model", "init_params",
           "touched_params"]


def get_model(config: ModelConfig) -> nn.Module:
  """The GPT2 or BERT module for `config.arch`."""
  if config.arch == "gpt2":
    return GPT2(config)
  if config.arch == "bert":
    return BERT(config)
  raise ValueError(f"unknown arch {config.arch!r}; accepted: gpt2, bert")


def init_params(model_or_config: nn.Module | ModelConfig, key: jax.Array, batch: int = 1,
                seq_len: int = 8, unbox: bool = True) -> Any:
  """Initial 'params' of the model (float32).

  With `unbox=False` the leaves stay `nn.LogicallyPartitioned` boxes, which is what
  `jax.eval_shape` + `nn.get_partition_spec` need for sharded init (SPEC section 7).
  """
  model = (get_model(model_or_config) if isinstance(model_or_config, ModelConfig)
           else model_or_config)
  input_ids = jnp.zeros((batch, min(seq_len, model.config.max_len)), jnp.int32)
  params = model.init({"params": key}, input_ids)["params"]
  return nn.meta.unbox(params) if unbox else params


def count_params(config: ModelConfig) -> int:
  """Number of parameters, from shapes only (`jax.eval_shape`, nothing allocated)."""
  shapes = jax.eval_shape(lambda k: init_params(config, k), jax.random.key(0))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
