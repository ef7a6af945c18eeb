"""DTU (SPEC 4, Alg. 6): sampled key sets, gathered attention, blocks, KV-cache decode."""

from __future__ import annotations

import functools
import itertools
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stabjax.configs import DTUConfig
from stabjax.models import dtu as dtu_lib
from stabjax.models.dtu import DTU

B, T, D, H = 2, 11, 16, 2
HD = D // H


@pytest.fixture
def x():
  return jax.random.normal(jax.random.key(0), (B, T, D))


@pytest.fixture
def pad():
  # Example 1 is right-padded: its last 4 positions are padding.
  return jnp.array([[True] * T, [True] * 7 + [False] * 4])


def init(config, causal, x, seed=1):
  module = DTU(H, causal, config)
  params = nn.meta.unbox(module.init(jax.random.key(seed), x)["params"])
  params["qkv_bias"] = 0.1 * jax.random.normal(jax.random.key(seed + 1), (3, H, HD))
  return module, params


def np_qkv(params, x):
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  qkv = np.einsum("btd,dshk->sbthk", np.asarray(x, np.float64), p["qkv_kernel"])
  return qkv + p["qkv_bias"][:, None, None]  # [3, B, T, H, Dh]


def np_attention(params, x, allowed):
  """float64 reference: softmax over allowed keys, allowed [B, H, T, T] (query, key)."""
  q, k, v = np_qkv(params, x)
  logits = np.einsum("bqhk,bshk->bhqs", q, k) / math.sqrt(HD)
  logits = np.where(allowed, logits, -np.inf)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w = w / w.sum(-1, keepdims=True)
  out = np.einsum("bhqs,bshk->bqhk", w, v)
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  return np.einsum("bqhk,hkd->bqd", out, p["o_kernel"]) + p["o_bias"]


def np_allowed(causal, mask):
  allowed = np.ones((B, H, T, T), bool)
  if causal:
    allowed &= np.tril(np.ones((T, T), bool))
  return allowed & np.asarray(mask)[:, None, None, :]


@functools.lru_cache(maxsize=None)
def compiled(config, causal):
  """jit(apply) of a training call, and jit of the sets that call samples, per config.

  Shared by the tests so that each configuration compiles once (threefry is slow to
  compile on CPU).
  """
  module = DTU(H, causal, config)

  def run(params, x, mask, rng):
    return module.apply({"params": params}, x, mask, deterministic=False, rngs={"dtu": rng})

  def sets(params, x, mask, rng):
    # The same RNG path as `run`: the first make_rng('dtu') of the top-level module.
    def sample(m, x):
      qkv = jnp.einsum("btd,dshk->sbthk", x, params["qkv_kernel"])
      k = qkv[1] + params["qkv_bias"][1, None, None]
      log_scores = dtu_lib.dtu_log_scores(k, config.scores)
      return dtu_lib.dtu_sample(m.make_rng("dtu"), log_scores, config.keep, causal, mask)

    return module.apply({"params": params}, x, rngs={"dtu": rng}, method=sample)

  return jax.jit(run), jax.jit(sets)


SAMPLED = DTUConfig(keep=4, block_q=4)  # the configuration most tests share


@pytest.mark.parametrize("causal,config", [(True, SAMPLED), (False, SAMPLED),
                                           (True, DTUConfig(keep=4, block_q=4, scores="uniform"))])
def test_module_equals_dense_reference_of_its_sets(causal, config, x, pad):
  module, params = init(config, causal, x)
  run, sets = compiled(config, causal)
  rng = jax.random.key(3)
  y = run(params, x, pad, rng)
  chex.assert_shape(y, (B, T, D))
  indices, valid = sets(params, x, pad, rng)
  chex.assert_shape([indices, valid], [(B, H, T, 4)] * 2)
  # Dense float64 reference: a masked softmax over exactly the sampled sets. (The module
  # samples in blocks of 4 queries, `dtu_sample` in one block: the sets agree.)
  allowed = np.zeros((B, H, T, T), bool)
  ii = np.asarray(indices)
  bb, hh, qq, aa = np.nonzero(np.asarray(valid))
  allowed[bb, hh, qq, ii[bb, hh, qq, aa]] = True
  assert np.all(allowed.sum(-1) == np.minimum(4, np_allowed(causal, pad).sum(-1)))
  np.testing.assert_allclose(y, np_attention(params, x, allowed), atol=1e-5, rtol=1e-5)
  assert not np.allclose(y, module.apply({"params": params}, x, pad), atol=1e-3)


@pytest.mark.parametrize("impl", ["gathered", "dense"])
def test_sampled_attention_equals_dense_reference_values_and_gradients(impl):
  # Example 0 right-padded, example 1 left-padded: its first 3 (causal) queries have no
  # candidate key at all, and output 0.
  pad = jnp.array([[True] * 8 + [False] * 3, [False] * 3 + [True] * 8])
  k = jax.random.split(jax.random.key(4), 3)
  q, kk, v = (jax.random.normal(key, (B, T, H, HD)) for key in k)
  cfg = DTUConfig(keep=3, block_q=5)
  rng = jax.random.key(5)

  def gathered(q, kk, v):
    return dtu_lib.sampled_attention(rng, q, kk, v, cfg, True, pad, impl=impl)

  out, indices, valid = jax.jit(gathered)(q, kk, v)
  chex.assert_shape(out, (B, T, H, HD))

  def dense(q, kk, v):
    t = lambda a: a.transpose(0, 2, 1, 3)
    return t(dtu_lib.dtu_dense_reference(t(q), t(kk), t(v), indices, valid))

  np.testing.assert_allclose(out, dense(q, kk, v), atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(out[1, :3], 0.0)
  assert np.all(np.abs(np.asarray(out[1, 3:])).sum(-1) > 0)
  # The blockwise, rematerialised backward pass gives the dense gradients.
  r = jax.random.normal(jax.random.key(6), out.shape)
  g1 = jax.jit(jax.grad(lambda *a: jnp.sum(r * gathered(*a)[0]), argnums=(0, 1, 2)))(q, kk, v)
  g2 = jax.grad(lambda *a: jnp.sum(r * dense(*a)), argnums=(0, 1, 2))(q, kk, v)
  chex.assert_trees_all_close(g1, g2, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_keep_at_least_seq_len_is_full_attention(causal, x, pad):
  module, params = init(DTUConfig(keep=T), causal, x)
  y = module.apply({"params": params}, x, pad, deterministic=False, rngs={"dtu": jax.random.key(0)})
  ref = np_attention(params, x, np_allowed(causal, pad))
  np.testing.assert_allclose(y, ref, atol=1e-5, rtol=1e-5)
  # Also the evaluation path and the switched-off unit.
  np.testing.assert_array_equal(module.apply({"params": params}, x, pad), y)
  off = DTU(H, causal, DTUConfig(enabled=False))
  np.testing.assert_array_equal(off.apply({"params": params}, x, pad, deterministic=False), y)


def _einsum_attention(q, k, v, allowed):
  """The dense attention as it was written before jax.nn.dot_product_attention."""
  logits = jnp.einsum("bqhk,bshk->bhqs", q, k) / jnp.sqrt(q.shape[-1])
  w = jax.nn.softmax(jnp.where(allowed, logits, jnp.finfo(logits.dtype).min), axis=-1)
  return jnp.einsum("bhqs,bshk->bqhk", w, v)


@pytest.mark.parametrize("causal", [True, False])
def test_full_attention_equals_the_einsum_softmax_in_values_and_gradients(causal, pad):
  ks = jax.random.split(jax.random.key(11), 4)
  q, k, v = (jax.random.normal(kk, (B, T, H, 8)) for kk in ks[:3])
  allowed = jnp.asarray(np_allowed(causal, pad))
  r = jax.random.normal(ks[3], q.shape)
  for f in (dtu_lib.full_attention, _einsum_attention):
    chex.assert_shape(f(q, k, v, allowed), q.shape)
  chex.assert_trees_all_close(dtu_lib.full_attention(q, k, v, allowed),
                              _einsum_attention(q, k, v, allowed), atol=1e-5, rtol=1e-5)
  grad = lambda f: jax.grad(lambda *a: jnp.sum(r * f(*a, allowed)), argnums=(0, 1, 2))(q, k, v)
  chex.assert_trees_all_close(grad(dtu_lib.full_attention), grad(_einsum_attention),
                              atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_cudnn_attention_gets_a_mask_that_holds_for_any_padding(causal, monkeypatch):
  """impl='cudnn' on rows padded at the start, in the middle and at the end: its call of
  dot_product_attention, run by XLA (no GPU here), equals the einsum softmax on every real
  query (per-row key lengths would let left padding be attended)."""
  mask = jnp.array([[False] * 3 + [True] * (T - 3), [True] * 4 + [False, False] + [True] * (T - 6)])
  ks = jax.random.split(jax.random.key(13), 3)
  q, k, v = (jax.random.normal(kk, (B, T, H, 8)) for kk in ks)
  allowed = jnp.asarray(np_allowed(causal, mask))
  xla = jax.nn.dot_product_attention
  calls = []

  def as_xla(*args, implementation=None, **kwargs):
    calls.append(implementation)
    return xla(*args, implementation="xla", **kwargs)

  monkeypatch.setattr(jax.nn, "dot_product_attention", as_xla)
  got = dtu_lib.full_attention(q, k, v, allowed, "cudnn", causal, mask)
  assert calls == ["cudnn"]
  real = np.asarray(mask)[:, :, None, None]
  want = _einsum_attention(q, k, v, allowed)
  np.testing.assert_allclose(np.where(real, got, 0), np.where(real, want, 0), atol=1e-5)
  if causal:  # no padding: cuDNN's own causal mask
    no_pad = jnp.asarray(np_allowed(True, jnp.ones((B, T), bool)))
    np.testing.assert_allclose(dtu_lib.full_attention(q, k, v, no_pad, "cudnn", True, None),
                               _einsum_attention(q, k, v, no_pad), atol=1e-5)


def test_masked_attention_equals_the_einsum_softmax_in_values_and_gradients():
  """The DTU's dense path (dot_product_attention with the key sets as its mask) against
  the masked einsum softmax it replaced, on random sets that include empty rows (-> 0)."""
  ks = jax.random.split(jax.random.key(12), 5)
  q, k, v = (jax.random.normal(kk, (B, H, T, 8)) for kk in ks[:3])
  selected = jax.random.bernoulli(ks[3], 0.3, (B, H, T, T)).at[0, 1, 2].set(False)
  r = jax.random.normal(ks[4], q.shape)

  def einsum(q, k, v, selected):
    logits = jnp.einsum("bhqd,bhtd->bhqt", q, k) / jnp.sqrt(q.shape[-1])
    w = jax.nn.softmax(jnp.where(selected, logits, jnp.finfo(jnp.float32).min), axis=-1)
    return jnp.einsum("bhqt,bhtd->bhqd", w * selected, v)

  out = dtu_lib.masked_attention(q, k, v, selected)
  chex.assert_shape(out, q.shape)
  np.testing.assert_array_equal(out[0, 1, 2], 0.0)
  chex.assert_trees_all_close(out, einsum(q, k, v, selected), atol=1e-5, rtol=1e-5)
  grad = lambda f: jax.grad(lambda *a: jnp.sum(r * f(*a, selected)), argnums=(0, 1, 2))(q, k, v)
  chex.assert_trees_all_close(grad(dtu_lib.masked_attention), grad(einsum), atol=1e-5, rtol=1e-5)


def test_sampled_path_keeps_everything_when_few_candidates(x):
  # 4 real keys per example, keep = 5 < T: the sampled (gathered) path must keep every
  # candidate and so equal full attention.
  mask = jnp.array([[True] * 4 + [False] * (T - 4), [False] * (T - 4) + [True] * 4])
  config = DTUConfig(keep=5, block_q=4)
  _, params = init(config, False, x)
  y = compiled(config, False)[0](params, x, mask, jax.random.key(1))
  np.testing.assert_allclose(y, np_attention(params, x, np_allowed(False, mask)),
                             atol=1e-5, rtol=1e-5)


def test_no_query_sees_the_future(x):
  _, params = init(SAMPLED, True, x)
  run, sets = compiled(SAMPLED, True)
  no_pad = jnp.ones((B, T), bool)
  rng = jax.random.key(2)
  y = run(params, x, no_pad, rng)
  for t0 in (1, 5, T - 1):
    x2 = x.at[:, t0:].add(jax.random.normal(jax.random.key(t0), (B, T - t0, D)))
    y2 = run(params, x2, no_pad, rng)
    np.testing.assert_array_equal(y2[:, :t0], y[:, :t0])  # past untouched, exactly
    assert not np.allclose(y2[:, t0], y[:, t0])
  indices, valid = sets(params, x, no_pad, rng)
  q_pos = np.arange(T)[None, None, :, None]
  assert np.all(np.where(np.asarray(valid), np.asarray(indices) <= q_pos, True))


@pytest.mark.parametrize("impl", ["gathered", "dense"])
def test_own_position_always_kept_and_padding_never(pad, impl):
  log_scores = jnp.log(jax.random.uniform(jax.random.key(0), (B, H, T)) + 0.01)
  for seed in range(5):
    indices, valid = dtu_lib.dtu_sample(jax.random.key(seed), log_scores, 3, True, pad, impl)
    ii, vv = np.asarray(indices), np.asarray(valid)
    is_self = (ii == np.arange(T)[None, None, :, None]) & vv
    real = np.asarray(pad)[:, None, :]
    np.testing.assert_array_equal(is_self.sum(-1), np.broadcast_to(real, (B, H, T)))
    is_real_key = np.asarray(pad)[np.arange(B)[:, None, None, None], ii]  # [B, H, T, 3]
    assert not (vv & ~is_real_key).any()
    # Each set holds distinct keys (sampling without replacement).
    for b, h, q in itertools.product(range(B), range(H), range(T)):
      kept = ii[b, h, q][vv[b, h, q]]
      assert len(set(kept.tolist())) == len(kept) == min(3, int(pad[b, :q + 1].sum()))


def exact_inclusion(weights, keep):
  """P(j in I) for successive sampling without replacement prop. to weights (= Gumbel-top-k)."""
  w = np.asarray(weights, np.float64)
  prob = np.zeros(len(w))
  for order in itertools.permutations(range(len(w)), keep):
    p, left = 1.0, w.sum()
    for j in order:
      p *= w[j] / left
      left -= w[j]
    prob[list(order)] += p
  return prob


@pytest.mark.parametrize("impl", ["gathered", "dense"])
def test_inclusion_frequency_increases_with_score(impl):
  # Keys with scores 1..8, keep 3, 500 x 8 = 4000 independent draws (batch x queries).
  n, keep, batch = 8, 3, 500
  weights = np.arange(1, n + 1)
  log_scores = jnp.broadcast_to(jnp.log(jnp.asarray(weights, jnp.float32)), (batch, 1, n))
  indices, valid = dtu_lib.dtu_sample(jax.random.key(8), log_scores, keep, causal=False,
                                      impl=impl)
  assert bool(valid.all())
  counts = np.bincount(np.asarray(indices).ravel(), minlength=n)
  draws = batch * n
  freq = counts / draws
  assert np.all(np.diff(freq) > 0), freq  # monotone in the score
  exact = exact_inclusion(weights, keep)
  np.testing.assert_allclose(exact.sum(), keep)
  se = np.sqrt(exact * (1 - exact) / draws)
  assert np.all(np.abs(freq - exact) < 4 * se), (freq, exact)
  # Not proportional to the score: that would give 3 * 8 / 36 = 0.67 for the top key.
  assert abs(freq[-1] - keep * weights[-1] / weights.sum()) > 6 * se[-1]


def sorted_sets(indices, valid):
  """The sets as sorted index lists, -1 for the unused slots (the slot order is immaterial)."""
  return np.sort(np.where(np.asarray(valid), np.asarray(indices), -1), axis=-1)


@pytest.mark.parametrize("causal", [True, False])
def test_dense_and_gathered_implementations_agree(causal):
  # T = 96, keep = 6: 'auto' gathers here (T >= DENSE_BELOW * keep); both must draw the
  # same sets from the same race keys and give the same attention.
  b, t, h, hd, keep = 2, 96, 2, 8, 6
  assert t >= dtu_lib.DENSE_BELOW * keep
  pad = jnp.arange(t)[None, :] < jnp.array([[t], [70]])
  q, k, v = (jax.random.normal(key, (b, t, h, hd)) for key in jax.random.split(jax.random.key(0), 3))
  cfg = DTUConfig(keep=keep, block_q=32)
  rng = jax.random.key(1)
  run = jax.jit(lambda impl: dtu_lib.sampled_attention(rng, q, k, v, cfg, causal, pad, impl),
                static_argnums=0)
  (out_g, *sets_g), (out_d, *sets_d), (out_a, *_) = run("gathered"), run("dense"), run("auto")
  np.testing.assert_array_equal(sorted_sets(*sets_g), sorted_sets(*sets_d))
  np.testing.assert_allclose(out_g, out_d, atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(out_a, out_g)
  log_scores = dtu_lib.dtu_log_scores(k, "key_norm")
  sample = lambda impl: sorted_sets(*dtu_lib.dtu_sample(rng, log_scores, keep, causal, pad, impl))
  np.testing.assert_array_equal(sample("gathered"), sample("dense"))


@pytest.mark.parametrize("full_steps", [12, 2])
def test_bisection_selects_the_top_keep_ties_to_the_lowest_index(full_steps):
  # Small integer race keys: many ties at the keep-th key. 1024 rows > 8 * 64, so rows
  # left after `full_steps` go through the compacted second bisection.
  rows, t, keep = 1024, 40, 7
  race = jax.random.randint(jax.random.key(0), (rows, t), 0, 12).astype(jnp.float32)
  race = jnp.where(jax.random.bernoulli(jax.random.key(1), 0.1, (rows, t)), -jnp.inf, race)
  x_lo, x_hi = jnp.zeros(rows), jnp.full(rows, jnp.inf)
  select = jax.jit(lambda r: dtu_lib._sample_mask(r, x_lo, x_hi, keep, full_steps))
  got = np.asarray(select(race))
  r = np.asarray(race)
  order = np.argsort(-r, axis=-1, kind="stable")  # descending value, then ascending index
  want = np.zeros_like(got)
  for i in range(rows):
    top = [j for j in order[i, :keep] if r[i, j] > -np.inf]
    want[i, top] = True
  np.testing.assert_array_equal(got, want)
  assert (got.sum(-1) == keep).mean() > 0.9


def test_uniform_scores_give_uniform_inclusion():
  n, keep, batch = 8, 3, 500
  log_scores = dtu_lib.dtu_log_scores(jax.random.normal(jax.random.key(0), (batch, n, 1, 4)),
                                      "uniform")
  indices, _ = dtu_lib.dtu_sample(jax.random.key(9), log_scores, keep, causal=False)
  freq = np.bincount(np.asarray(indices).ravel(), minlength=n) / (batch * n)
  p = keep / n
  assert np.all(np.abs(freq - p) < 4 * math.sqrt(p * (1 - p) / (batch * n))), freq


def test_key_norm_scores():
  k = jax.random.normal(jax.random.key(1), (B, T, H, HD))
  want = np.log(np.linalg.norm(np.asarray(k, np.float64), axis=-1)).transpose(0, 2, 1)
  got = dtu_lib.dtu_log_scores(k, "key_norm")
  chex.assert_shape(got, (B, H, T))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  grad = jax.grad(lambda k: dtu_lib.dtu_log_scores(k, "key_norm").sum())(k)
  np.testing.assert_array_equal(grad, 0.0)  # scores carry no gradient


def test_same_key_same_sets_other_step_other_sets(x, pad):
  _, params = init(SAMPLED, True, x)
  run, sets = compiled(SAMPLED, True)
  key = jax.random.key(10)
  step = lambda s: jax.random.fold_in(key, s)
  np.testing.assert_array_equal(run(params, x, pad, step(1)), run(params, x, pad, step(1)))
  assert not np.allclose(run(params, x, pad, step(1)), run(params, x, pad, step(2)))
  s1, s1b, s2 = (sets(params, x, pad, step(s)) for s in (1, 1, 2))
  chex.assert_trees_all_equal(s1, s1b)
  assert not np.array_equal(s1[0], s2[0])


@pytest.mark.parametrize("causal,block_sizes", [(True, (T, 4, 3)), (False, (T, 4))])
def test_block_size_does_not_change_the_result(causal, block_sizes, x, pad):
  _, params = init(SAMPLED, causal, x)
  rng = jax.random.key(12)
  outs = [compiled(DTUConfig(keep=4, block_q=bq), causal)[0](params, x, pad, rng)
          for bq in block_sizes]
  for y in outs[1:]:
    np.testing.assert_allclose(y, outs[0], atol=1e-6, rtol=1e-6)


def test_decode_matches_full_causal_forward(x):
  # The sampling settings must not matter for decoding (always full attention).
  module, params = init(DTUConfig(keep=2, block_q=4), True, x)
  full = module.apply({"params": params}, x)
  cache = module.init(jax.random.key(0), x, decode=True)["cache"]
  chex.assert_shape([cache["cached_key"], cache["cached_value"]], [(B, T, H, HD)] * 2)
  assert cache["cache_index"].dtype == jnp.int32 and int(cache["cache_index"]) == 0
  step = jax.jit(lambda cache, xt: module.apply({"params": params, "cache": cache}, xt,
                                                deterministic=False, decode=True,
                                                mutable=["cache"]))
  outs = []
  for t in range(T):
    y, mutated = step(cache, x[:, t:t + 1])
    cache = mutated["cache"]
    chex.assert_shape(y, (B, 1, D))
    outs.append(y)
  assert int(cache["cache_index"]) == T
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-5, rtol=1e-5)
  # A 5-token prefill chunk followed by single tokens gives the same.
  cache = module.init(jax.random.key(0), x, decode=True)["cache"]
  y0, mutated = module.apply({"params": params, "cache": cache}, x[:, :5], decode=True,
                             mutable=["cache"])
  y1, _ = module.apply({"params": params, "cache": mutated["cache"]}, x[:, 5:6], decode=True,
                       mutable=["cache"])
  np.testing.assert_allclose(jnp.concatenate([y0, y1], 1), full[:, :6], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- frozen sets


@functools.lru_cache(maxsize=None)
def scored(config, causal):
  """jit of a training call with 'dtu_scores' mutable: (y, the stored collection).

  `scores` (a collection to pass in, or None) selects the frozen-set pass.
  """
  module = DTU(H, causal, config)

  def call(params, x, mask, rng, scores):
    variables = {"params": params} if scores is None else {"params": params,
                                                            "dtu_scores": scores}
    y, state = module.apply(variables, x, mask, deterministic=False, rngs={"dtu": rng},
                            mutable=["dtu_scores"])
    return y, state.get("dtu_scores", {})

  return jax.jit(call)


def allowed_of(indices, valid, t):
  """bool [B, H, T, t] from sets (indices, valid) [B, H, T, keep]."""
  ii, vv = np.asarray(indices), np.asarray(valid)
  allowed = np.zeros(ii.shape[:3] + (t,), bool)
  bb, hh, qq, aa = np.nonzero(vv)
  allowed[bb, hh, qq, ii[bb, hh, qq, aa]] = True
  return allowed


# keep 4 of 11 keys samples with the bisection ('dense'); keep 2 of 24 gathers (top-k).
@pytest.mark.parametrize("causal,t,keep", [(True, T, 4), (False, 24, 2)])
def test_frozen_set_pass_attends_over_the_first_calls_sets(causal, t, keep):
  assert (t < dtu_lib.DENSE_BELOW * keep) == (keep == 4)
  config = DTUConfig(keep=keep, block_q=4)
  x = jax.random.normal(jax.random.key(30), (B, t, D))
  pad = jnp.arange(t)[None, :] < jnp.array([[t], [t - 4]])
  _, params = init(config, causal, x)
  _, sets = compiled(config, causal)
  rng = jax.random.key(31)
  call = scored(config, causal)
  y1, stored = call(params, x, pad, rng, None)
  # The stored scores are the key-norm log scores of the call.
  k = np_qkv(params, x)[1]
  chex.assert_shape(stored["log_scores"], (B, H, t))
  chex.assert_type(stored["log_scores"], jnp.float32)
  np.testing.assert_allclose(stored["log_scores"],
                             np.log(np.linalg.norm(k, axis=-1)).transpose(0, 2, 1),
                             atol=1e-5, rtol=1e-5)
  first = allowed_of(*sets(params, x, pad, rng), t)
  np.testing.assert_allclose(y1, np_attention(params, x, first), atol=1e-5, rtol=1e-5)
  # New parameters, far from the old ones (other key norms, so other scores).
  _, new = init(config, causal, x, seed=7)
  new = jax.tree.map(lambda a, b: a + 3.0 * b, params, new)
  y_frozen, again = call(new, x, pad, rng, stored)
  chex.assert_trees_all_equal(again, stored)  # used as given, not recomputed
  np.testing.assert_allclose(y_frozen, np_attention(new, x, first), atol=1e-4, rtol=1e-4)
  # Without the stored scores the same key draws other sets for some queries.
  redrawn = allowed_of(*sets(new, x, pad, rng), t)
  assert (redrawn != first).any()
  y_new = call(new, x, pad, rng, None)[0]
  np.testing.assert_allclose(y_new, np_attention(new, x, redrawn), atol=1e-4, rtol=1e-4)
  assert not np.allclose(y_new, y_frozen, atol=1e-3)


def test_frozen_sets_make_the_unit_lipschitz_in_the_params(x, pad):
  # Theorem B.9: with the key sets frozen the output is a smooth function of the params
  # (a fixed masked softmax); re-drawn, the sets change along the way and the output
  # jumps. Along 65 points of a segment in parameter space, the largest step of the
  # output is a few times the median one frozen, many times re-drawn.
  config = DTUConfig(keep=2, block_q=4)
  _, params = init(config, True, x)
  _, far = init(config, True, x, seed=9)
  far = jax.tree.map(lambda a, b: a + 3.0 * b, params, far)
  rng = jax.random.key(32)
  call = scored(config, True)
  _, stored = call(params, x, pad, rng, None)

  def steps(scores):
    def at(s):
      return call(jax.tree.map(lambda a, b: a + s * (b - a), params, far), x, pad, rng,
                  scores)[0]
    ys = jax.jit(jax.vmap(at))(jnp.linspace(0.0, 1.0, 65))
    d = np.abs(np.diff(np.asarray(ys), axis=0)).reshape(64, -1).max(-1)
    return d.max() / np.median(d)

  frozen, redrawn = steps(stored), steps(None)
  assert frozen < 4, frozen
  assert redrawn > 10, redrawn


@pytest.mark.parametrize("config,det", [(DTUConfig(enabled=False), False),
                                        (DTUConfig(keep=T), False),
                                        (SAMPLED, True)])
def test_no_scores_stored_or_used_on_full_attention_paths(config, det, x, pad):
  module, params = init(config, True, x)
  y, state = module.apply({"params": params}, x, pad, deterministic=det,
                          rngs={"dtu": jax.random.key(0)}, mutable=["dtu_scores"])
  assert state == {}
  _, stored = scored(SAMPLED, True)(params, x, pad, jax.random.key(1), None)
  y_passed = module.apply({"params": params, "dtu_scores": stored}, x, pad, deterministic=det,
                          rngs={"dtu": jax.random.key(0)})
  np.testing.assert_array_equal(y_passed, y)
  np.testing.assert_allclose(y, np_attention(params, x, np_allowed(True, pad)), atol=1e-5,
                             rtol=1e-5)
