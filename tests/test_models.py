"""GPT2 / BERT modules: sizes, shapes, layer stacking, masking, dtypes, partitioning."""

from __future__ import annotations

import functools

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stabjax.configs import DMUConfig, DTUConfig, ModelConfig, get_model_config
from stabjax.models import count_params, get_model, init_params
from stabjax.models.hf import stack_layers

B, T, V, D = 2, 8, 61, 32
ALLOWED_AXES = {"vocab", "embed", "mlp", "heads", "kv", "layers", None}


def tiny(arch: str, **kw) -> ModelConfig:
  return ModelConfig(name=f"{arch}_test", arch=arch, vocab_size=V, max_len=16, num_layers=2,
                     num_heads=4, d_model=D, d_ff=64, type_vocab_size=3, **kw)


def ids(seed: int = 0, shape: tuple[int, int] = (B, T)) -> jax.Array:
  return jax.random.randint(jax.random.key(seed), shape, 0, V)


def apply(cfg: ModelConfig, params, *args, **kw):
  return get_model(cfg).apply({"params": params}, *args, **kw)


def params_of(cfg: ModelConfig):
  """Initial params of a `tiny` config; one compiled init per parameter structure."""
  return _params_of(cfg.arch, cfg.scan_layers)


@functools.cache
def _params_of(arch: str, scan_layers: bool):
  cfg = tiny(arch, scan_layers=scan_layers)
  return jax.jit(lambda k: init_params(cfg, k))(jax.random.key(0))


# --------------------------------------------------------------------------- sizes


def test_gpt2_small_has_the_published_count():
  assert count_params(get_model_config("gpt2_small")) == 124_439_808


def test_bert_base_count_matches_closed_form():
  cfg = get_model_config("bert_base")
  d, v, p, layers = cfg.d_model, cfg.vocab_size, cfg.max_len, cfg.num_layers
  embeddings = (v + p + cfg.type_vocab_size) * d + 2 * d
  block = 4 * d * d + 4 * d + 2 * d * cfg.d_ff + cfg.d_ff + d + 4 * d
  head = d * d + d + 2 * d + v
  assert count_params(cfg) == embeddings + layers * block + head == 109_514_298


@pytest.mark.parametrize("name,target", [("gpt2_1b", 1e9), ("gpt2_2b", 2e9),
                                         ("gpt2_3b", 3e9), ("bert_1b", 1e9)])
def test_paper_sizes_within_ten_percent(name, target):
  assert abs(count_params(get_model_config(name)) / target - 1) < 0.10


def test_count_params_scanned_equals_unrolled():
  cfg = get_model_config("gpt2_medium")
  assert count_params(cfg) == count_params(cfg.replace(scan_layers=True, remat=True))


# --------------------------------------------------------------------------- structure


@pytest.mark.parametrize("arch,keys", [
    ("gpt2", {"wte", "wpe", "block_0", "block_1", "ln_f"}),
    ("bert", {"embeddings", "block_0", "block_1", "mlm_head"}),
])
def test_top_level_param_names(arch, keys):
  shapes = lambda cfg: jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))
  assert set(shapes(tiny(arch))) == keys
  scanned = shapes(tiny(arch, scan_layers=True))
  assert set(scanned) == {k for k in keys if not k.startswith("block_")} | {"layers"}


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
@pytest.mark.parametrize("scan_layers", [False, True])
def test_every_param_is_logically_partitioned(arch, scan_layers):
  boxed = jax.eval_shape(lambda k: init_params(tiny(arch, scan_layers=scan_layers), k,
                                               unbox=False), jax.random.key(0))
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
  assert all(x.value.dtype == jnp.float32 for x in leaves)
  specs = jax.tree.leaves(nn.get_partition_spec(boxed),
                          is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  assert len(specs) == len(leaves)
  for spec, leaf in zip(specs, leaves):
    assert set(spec) <= ALLOWED_AXES and len(spec) == leaf.value.ndim
  stacked = nn.get_partition_spec(boxed)["layers"] if scan_layers else {}
  assert all(s[0] == "layers" for s in jax.tree.leaves(
      stacked, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)))


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_output_shapes_and_dtypes(arch):
  cfg = tiny(arch)
  params = params_of(cfg)
  logits = apply(cfg, params, ids())
  logits2, hidden = apply(cfg, params, ids(), return_hidden=True)
  chex.assert_shape(logits, (B, T, V))
  chex.assert_shape(hidden, (B, T, D))
  chex.assert_type([logits, hidden], jnp.float32)
  chex.assert_trees_all_close(logits, logits2)


def test_gpt2_logits_are_tied_to_wte_through_ln_f_output():
  cfg = tiny("gpt2")
  params = params_of(cfg)
  logits, hidden = apply(cfg, params, ids(), return_hidden=True)
  np.testing.assert_allclose(logits, np.asarray(hidden) @ np.asarray(params["wte"]).T,
                             atol=1e-5)
  # The ln_f output: zero mean per token under ln_f's initial (scale 1, bias 0).
  np.testing.assert_allclose(np.asarray(hidden).mean(-1), 0, atol=1e-5)


# --------------------------------------------------------------------------- stacking


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_scanned_equals_unrolled_with_stacked_weights(arch):
  cfg = tiny(arch)
  params = params_of(cfg)
  stacked = stack_layers(params, cfg.num_layers)
  x, mask = ids(), jnp.arange(T)[None] < jnp.array([[T], [5]])
  ref = jax.jit(lambda p: apply(cfg, p, x, attention_mask=mask))(params)
  for remat in (False, True):
    scanned = cfg.replace(scan_layers=True, remat=remat)
    chex.assert_trees_all_equal_shapes(
        stacked, jax.eval_shape(lambda k: init_params(scanned, k), jax.random.key(0)))
    out = jax.jit(lambda p: apply(scanned, p, x, attention_mask=mask))(stacked)
    chex.assert_trees_all_close(out, ref, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_scanned_remat_gradients_equal_unrolled(arch):
  cfg = tiny(arch)
  scanned = cfg.replace(scan_layers=True, remat=True)
  params = params_of(cfg)
  x, mask = ids(), jnp.arange(T)[None] < jnp.array([[T], [5]])

  def loss(c, p):
    return jnp.sum(jnp.sin(apply(c, p, x, attention_mask=mask)))

  value, grads = jax.jit(jax.value_and_grad(lambda p: loss(cfg, p)))(params)
  value_s, grads_s = jax.jit(jax.value_and_grad(lambda p: loss(scanned, p)))(
      stack_layers(params, cfg.num_layers))
  np.testing.assert_allclose(value, value_s, rtol=1e-5)
  chex.assert_trees_all_close(stack_layers(grads, cfg.num_layers), grads_s, atol=1e-5)


# --------------------------------------------------------------------------- masking


def test_gpt2_is_causal():
  cfg = tiny("gpt2")
  params = params_of(cfg)
  x = ids()
  t = 5
  y = x.at[:, t].set((x[:, t] + 1) % V)
  a, b = apply(cfg, params, x), apply(cfg, params, y)
  np.testing.assert_array_equal(a[:, :t], b[:, :t])
  assert np.all(np.abs(np.asarray(a[:, t:] - b[:, t:])).max(-1) > 1e-4)


def test_bert_real_positions_ignore_padded_keys():
  cfg = tiny("bert")
  params = params_of(cfg)
  x, types = ids(0), ids(1) % 3
  mask = jnp.arange(T)[None] < jnp.array([[T], [5]])
  y = jnp.where(mask, x, (x + 7) % V)  # change only the padding tokens
  a = apply(cfg, params, x, token_type_ids=types, attention_mask=mask)
  b = apply(cfg, params, y, token_type_ids=types, attention_mask=mask)
  np.testing.assert_allclose(np.asarray(a)[np.asarray(mask)], np.asarray(b)[np.asarray(mask)],
                             atol=1e-6)
  # Without the mask the padding does change the real positions: the test can fail.
  c = apply(cfg, params, y, token_type_ids=types)
  assert np.abs(np.asarray(c - a)[1, :5]).max() > 1e-4
  # An all-ones mask is no mask.
  np.testing.assert_allclose(apply(cfg, params, x, attention_mask=jnp.ones((B, T))),
                             apply(cfg, params, x), atol=1e-6)


def test_bert_token_types_matter():
  cfg = tiny("bert")
  params = params_of(cfg)
  zeros = apply(cfg, params, ids(), token_type_ids=jnp.zeros((B, T), jnp.int32))
  np.testing.assert_array_equal(zeros, apply(cfg, params, ids()))
  assert np.abs(np.asarray(apply(cfg, params, ids(), token_type_ids=jnp.ones((B, T), jnp.int32))
                           - zeros)).max() > 1e-4


@pytest.mark.parametrize("scan_layers", [False, True])
def test_gpt2_kv_cache_decode_matches_full_forward(scan_layers):
  cfg = tiny("gpt2", scan_layers=scan_layers)
  model = get_model(cfg)
  params = params_of(cfg)
  x = ids(3, (B, cfg.max_len))
  full = jax.jit(model.apply)({"params": params}, x)
  cache = jax.eval_shape(lambda: model.init(jax.random.key(1), x, decode=True)["cache"])
  cache = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), cache)
  step = jax.jit(lambda c, tok, pos: model.apply({"params": params, "cache": c}, tok,
                                                 positions=pos, decode=True, mutable=["cache"]))
  for t in range(6):
    logits, mutated = step(cache, x[:, t:t + 1], jnp.full((B, 1), t))
    cache = mutated["cache"]
    np.testing.assert_allclose(logits[:, 0], full[:, t], atol=1e-5)
  with pytest.raises(ValueError, match="positions"):
    jax.eval_shape(lambda: model.apply({"params": params, "cache": cache}, x[:, :1],
                                       decode=True, mutable=["cache"]))


# --------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_bfloat16_compute_returns_float32_logits_close_to_float32(arch):
  cfg = tiny(arch)
  params = params_of(cfg)
  ref = apply(cfg, params, ids())
  low = jax.jit(lambda p: apply(cfg.replace(dtype="bfloat16"), p, ids()))(params)
  chex.assert_type(low, jnp.float32)
  assert jnp.abs(low - ref).max() < 0.05 * jnp.abs(ref).max()
  assert jnp.abs(low - ref).max() > 0  # bfloat16 really was used


# --------------------------------------------------------------------------- randomness


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_dropout_uses_the_dropout_stream(arch):
  cfg = tiny(arch, dropout_rate=0.3)
  params = params_of(cfg)
  run = jax.jit(lambda k: apply(cfg, params, ids(), deterministic=False, rngs={"dropout": k}))
  with pytest.raises(flax.errors.InvalidRngError, match="dropout"):
    jax.eval_shape(lambda: apply(cfg, params, ids(), deterministic=False))
  chex.assert_trees_all_equal(run(jax.random.key(1)), run(jax.random.key(1)))
  assert jnp.abs(run(jax.random.key(1)) - run(jax.random.key(2))).max() > 1e-3
  chex.assert_trees_all_close(apply(cfg, params, ids()), apply(tiny(arch), params, ids()))


@pytest.mark.parametrize("arch,scan_layers,unit", [
    ("gpt2", False, "dmu"), ("gpt2", True, "dtu"), ("bert", True, "dmu"), ("bert", False, "dtu")])
def test_stochastic_units_draw_from_their_streams(arch, scan_layers, unit):
  units = {"dmu": DMUConfig(enabled=unit == "dmu", c_tilde=0.5),
           "dtu": DTUConfig(enabled=unit == "dtu", keep=3, block_q=4)}
  cfg = tiny(arch, scan_layers=scan_layers, **units)
  params = params_of(cfg)
  run = jax.jit(lambda k: apply(cfg, params, ids(), deterministic=False, rngs={unit: k}))
  with pytest.raises(flax.errors.InvalidRngError, match=unit):
    jax.eval_shape(lambda: apply(cfg, params, ids(), deterministic=False))
  chex.assert_trees_all_equal(run(jax.random.key(1)), run(jax.random.key(1)))
  assert jnp.abs(run(jax.random.key(1)) - run(jax.random.key(2))).max() > 1e-4
  # Evaluation needs no RNG.
  chex.assert_shape(jax.eval_shape(lambda: apply(cfg, params, ids())), (B, T, V))
