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
from stabjax.models import count_params, get_model, init_params, touched_params
from stabjax.models import dmu as dmu_lib
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


@pytest.mark.parametrize("variant", [dict(), dict(remat=True), dict(scan_layers=True)],
                         ids=["unrolled", "remat", "scanned"])
def test_bert_head_positions_are_the_full_forward_at_those_positions(variant):
  """Per-row positions (a sampler's slots): logits [B, K, V] and hidden [B, K, d] equal
  the [B, T, ...] forward's there, although the last layer computes only those rows."""
  cfg = tiny("bert", **variant)
  params = params_of(cfg)
  x, mask = ids(0), jnp.arange(T)[None] < jnp.array([[T], [5]])
  full, hidden = apply(cfg, params, x, attention_mask=mask, return_hidden=True)
  at = jnp.array([[0, 6, 6], [4, 1, 2]])
  part, part_hidden = apply(cfg, params, x, attention_mask=mask, return_hidden=True,
                            head_positions=at)
  chex.assert_shape([part, part_hidden], [(B, 3, V), (B, 3, D)])
  take = lambda y: np.stack([np.asarray(y)[b, np.asarray(at)[b]] for b in range(B)])  # noqa: E731
  np.testing.assert_allclose(np.asarray(part), take(full), atol=1e-5)
  np.testing.assert_allclose(np.asarray(part_hidden), take(hidden), atol=1e-5)


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


# --------------------------------------------------------------------------- the step's collections

COLLECTIONS = ["dmu_masks", "dtu_scores"]


def train_loss_and_collections(cfg: ModelConfig, x, rngs):
  """loss(params) -> (loss, collections) of one training-mode forward, as a step takes it."""
  model = get_model(cfg)
  r = jax.random.normal(jax.random.key(99), (B, T, V))

  def loss(params, collections=None):
    logits, state = model.apply({"params": params, **(collections or {})}, x,
                                deterministic=False, rngs=rngs, mutable=COLLECTIONS)
    return jnp.sum(r * logits), state

  return loss


# DMU modes x stacking (unrolled, scanned, scanned with remat) x both models; the DTU
# (independent of the DMU's touched set) is on in one case only, to bound compile time.
@pytest.mark.parametrize("arch,mode,scan_layers,remat,dtu", [
    ("gpt2", "dfix", False, False, False), ("gpt2", "dfix", True, True, True),
    ("gpt2", "dprob", True, False, False), ("gpt2", "dmu2_fix", False, False, False),
    ("gpt2", "dmu2_prob", True, True, False), ("bert", "dprob", False, False, False)])
def test_touched_params_are_where_the_gradient_can_be_nonzero(arch, mode, scan_layers, remat,
                                                             dtu):
  dmu = DMUConfig(c_tilde=0.5, mode=mode)
  cfg = tiny(arch, scan_layers=scan_layers, remat=remat, dmu=dmu,
             dtu=DTUConfig(enabled=dtu, keep=3, block_q=4))
  params = params_of(cfg)
  loss = train_loss_and_collections(
      cfg, ids(), {"dmu": jax.random.key(1), "dtu": jax.random.key(2)})
  grads, collections = jax.jit(jax.grad(loss, has_aux=True))(params)
  assert set(collections) == ({"dmu_masks", "dtu_scores"} if dtu else {"dmu_masks"})
  touched = touched_params(params, collections["dmu_masks"])
  chex.assert_trees_all_equal_structs(jax.tree.map(lambda _: 0, touched),
                                      jax.tree.map(lambda _: 0, params))
  blocks = [k for k in params if k.startswith("block_") or k == "layers"]
  assert len(blocks) == (1 if scan_layers else cfg.num_layers)
  probs = dmu_lib.keep_probs(dmu, cfg.d_model, cfg.d_ff)
  if mode in dmu_lib.NODE_MODES:
    want = {"wi_kernel": probs["input"] * probs["hidden"], "wi_bias": probs["hidden"],
            "wo_kernel": probs["hidden"] * probs["output"], "wo_bias": probs["output"]}
  else:
    want = probs
  flat = jax.tree_util.tree_flatten_with_path(touched)[0]
  g_of = dict(jax.tree_util.tree_flatten_with_path(grads)[0])
  p_of = dict(jax.tree_util.tree_flatten_with_path(params)[0])
  seen = set()
  for path, used in flat:
    g = np.asarray(g_of[path])
    keys = [p.key for p in path]
    if keys[0] in blocks and keys[1] == "mlp":
      name = keys[-1]
      seen.add(name)
      used = np.asarray(used)
      assert used.dtype == bool and used.shape == np.shape(p_of[path])
      np.testing.assert_array_equal(g[~used], 0.0)  # untouched: exactly zero gradient
      assert np.all(g[used] != 0.0), path  # touched: takes part (generic inputs)
      share = used.mean()
      if mode.endswith("fix"):  # exactly the fixed subset sizes
        np.testing.assert_allclose(share, want[name], rtol=1e-6)
      else:  # Bernoulli: within 5 standard errors of the node / entry counts
        n = used.size // (cfg.d_ff if name.endswith("kernel") and mode == "dprob" else 1)
        assert abs(share - want[name]) < 5 * np.sqrt(0.25 / n), (path, share)
    else:
      assert used is True, path
      assert np.abs(g).max() > 0, path
  assert seen == set(dmu_lib.PARAM_NAMES)


@pytest.mark.parametrize("arch,scan_layers,remat", [("gpt2", True, True), ("bert", False, False)])
def test_frozen_pass_uses_the_stored_masks_and_scores_per_layer(arch, scan_layers, remat):
  cfg = tiny(arch, scan_layers=scan_layers, remat=remat, dmu=DMUConfig(c_tilde=0.5),
             dtu=DTUConfig(keep=3, block_q=4))
  params = params_of(cfg)
  model = get_model(cfg)
  x = ids()
  rngs = {"dmu": jax.random.key(1), "dtu": jax.random.key(2)}

  @jax.jit
  def run(params, collections, rngs):
    return model.apply({"params": params, **collections}, x, deterministic=False, rngs=rngs,
                       mutable=COLLECTIONS)

  y1, c1 = run(params, {}, rngs)
  layers = (cfg.num_layers,) if scan_layers else ()
  for leaf in jax.tree.leaves(c1["dtu_scores"]):
    chex.assert_shape(leaf, layers + (B, cfg.num_heads, T))
  for leaf in jax.tree.leaves(c1["dmu_masks"]):
    assert leaf.dtype == bool and leaf.shape[:len(layers)] == layers
  # Same params: passing the collections back changes nothing, and they come back as is.
  y, c = run(params, c1, rngs)
  np.testing.assert_array_equal(y, y1)
  chex.assert_trees_all_equal(c, c1)
  # The DMU masks are used whatever the 'dmu' key.
  y, _ = run(params, c1, {**rngs, "dmu": jax.random.key(3)})
  np.testing.assert_array_equal(y, y1)
  assert not np.allclose(run(params, {}, {**rngs, "dmu": jax.random.key(3)})[0], y1)
  # Other params: a pass given the collections of its own first pass (right layer for
  # right layer) reproduces that pass; given the old params' scores, the sets of the
  # old pass are used and the output differs.
  new = jax.tree.map(lambda a, k: a + 0.5 * jax.random.normal(k, a.shape), params,
                     jax.tree.unflatten(jax.tree.structure(params),
                                        list(jax.random.split(jax.random.key(5),
                                                              len(jax.tree.leaves(params))))))
  y2, c2 = run(new, {}, rngs)
  chex.assert_trees_all_equal(c2["dmu_masks"], c1["dmu_masks"])  # masks: the key only
  assert not np.allclose(jax.tree.leaves(c2["dtu_scores"])[0],
                         jax.tree.leaves(c1["dtu_scores"])[0])
  np.testing.assert_array_equal(run(new, c2, rngs)[0], y2)
  y_frozen, c = run(new, c1, rngs)
  chex.assert_trees_all_equal(c, c1)
  assert not np.allclose(y_frozen, y2, atol=1e-4)
  # Layers swapped: the per-layer consumption matters.
  swap = lambda a: a[::-1] if scan_layers else a
  c_swapped = {"dmu_masks": c2["dmu_masks"],
               "dtu_scores": (jax.tree.map(swap, c2["dtu_scores"]) if scan_layers else
                              {"block_0": c2["dtu_scores"]["block_1"],
                               "block_1": c2["dtu_scores"]["block_0"]})}
  assert not np.allclose(run(new, c_swapped, rngs)[0], y2, atol=1e-4)


@pytest.mark.parametrize("arch,scan_layers", [("gpt2", True), ("bert", False)])
def test_collections_change_nothing_when_units_are_off_or_deterministic(arch, scan_layers):
  on = tiny(arch, scan_layers=scan_layers, dmu=DMUConfig(c_tilde=0.5),
            dtu=DTUConfig(keep=3, block_q=4))
  params = params_of(on)
  x = ids()
  rngs = {"dmu": jax.random.key(1), "dtu": jax.random.key(2)}
  _, stored = jax.jit(lambda p: get_model(on).apply(
      {"params": p}, x, deterministic=False, rngs=rngs, mutable=COLLECTIONS))(params)
  assert set(stored) == set(COLLECTIONS)
  off = tiny(arch, scan_layers=scan_layers)
  full = tiny(arch, scan_layers=scan_layers, dmu=DMUConfig(c_tilde=1.0),
              dtu=DTUConfig(keep=T, block_q=4))
  for cfg, det in [(off, False), (full, False), (on, True)]:
    model = get_model(cfg)
    run = jax.jit(lambda p, c: model.apply({"params": p, **c}, x, deterministic=det,
                                           rngs=rngs, mutable=COLLECTIONS))
    plain = jax.jit(lambda p: model.apply({"params": p}, x, deterministic=det,
                                          rngs=rngs))(params)
    y, state = run(params, {})
    assert state == {}
    np.testing.assert_array_equal(y, plain)
    assert all(leaf is True for leaf in jax.tree.leaves(touched_params(params, state.get(
        "dmu_masks"))))
    y, state = run(params, stored)  # passed in, ignored (and not written)
    np.testing.assert_array_equal(y, plain)
    chex.assert_trees_all_equal(state, stored)
