"""DMU (SPEC 3, Alg. 2-4): mask statistics, gradients, gathering, scaling."""

from __future__ import annotations

import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stabjax.configs import DMUConfig
from stabjax.models import dmu as dmu_lib
from stabjax.models.dmu import DMU

D, D_FF = 16, 48


def np_gelu(x, activation):
  if activation == "gelu_tanh":
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
  erf = np.vectorize(math.erf)
  return 0.5 * x * (1 + erf(x / math.sqrt(2)))


def np_mlp(p, x, activation="gelu_tanh", s_in=1.0, s_h=1.0, s_out=1.0, m_in=1.0, m_h=1.0,
           m_out=1.0):
  """Node-masked MLP in float64 NumPy: s_out M_out (s_h M_h act(s_in M_in x W1 + b1) W2 + b2)."""
  p = {k: np.asarray(v, np.float64) for k, v in p.items()}
  x = np.asarray(x, np.float64) * m_in * s_in
  h = np_gelu(x @ p["wi_kernel"] + p["wi_bias"], activation) * m_h * s_h
  return (h @ p["wo_kernel"] + p["wo_bias"]) * m_out * s_out


def init(config, x, activation="gelu_tanh", seed=0):
  module = DMU(D_FF, config, activation=activation)
  params = module.init(jax.random.key(seed), x)["params"]
  # Non-zero biases, so bias masking and bias scaling are visible.
  params = nn.meta.unbox(params)
  params["wi_bias"] = 0.1 * jax.random.normal(jax.random.key(seed + 1), (D_FF,))
  params["wo_bias"] = 0.1 * jax.random.normal(jax.random.key(seed + 2), (D,))
  return module, params


def masks_of_call(module, params, x, rng):
  """The masks the module draws in `module.apply(..., rngs={'dmu': rng})` (same RNG path)."""
  cfg = module.config
  return module.apply({"params": params}, x, rngs={"dmu": rng},
                      method=lambda m, x: dmu_lib.dmu_masks(m.make_rng("dmu"), cfg, D, D_FF))


@pytest.fixture
def x():
  return jax.random.normal(jax.random.key(42), (3, 5, D))


@pytest.mark.parametrize("mode", ["dmu2_prob", "dprob"])
@pytest.mark.parametrize("c", [0.3, 0.7])
def test_bernoulli_share_within_3_standard_errors(mode, c):
  d, d_ff = 512, 2048  # node modes: 512 / 2048 nodes; edge modes: 1M entries per kernel
  masks = dmu_lib.dmu_masks(jax.random.key(1), DMUConfig(c_tilde=c, mode=mode), d, d_ff)
  assert set(masks) == (set(dmu_lib.PARAM_NAMES) if mode == "dmu2_prob"
                        else set(dmu_lib.NODE_NAMES))
  for name, m in masks.items():
    n = m.size
    share = float(m.mean())
    assert abs(share - c) < 3 * math.sqrt(c * (1 - c) / n), (name, share)


@pytest.mark.parametrize("c", [0.5, 0.29, 0.13])
def test_fixed_modes_keep_exactly_floor(c):
  d, d_ff = 100, 300
  hundredths = round(c * 100)  # integer arithmetic: floor(c n) without float error
  want = lambda n: hundredths * n // 100
  m = dmu_lib.dmu_masks(jax.random.key(2), DMUConfig(c_tilde=c, mode="dmu2_fix"), d, d_ff)
  chex.assert_shape([m["wi_kernel"], m["wo_kernel"]], [(d, d_ff), (d_ff, d)])
  assert int(m["wi_kernel"].sum()) == want(d * d_ff)
  assert int(m["wo_kernel"].sum()) == want(d * d_ff)
  assert int(m["wi_bias"].sum()) == want(d_ff)
  assert int(m["wo_bias"].sum()) == want(d)
  m = dmu_lib.dmu_masks(jax.random.key(3), DMUConfig(c_tilde=c, mode="dfix"), d, d_ff)
  for name, n in [("input", d), ("hidden", d_ff), ("output", d)]:
    idx = np.asarray(m[name + "_idx"])
    chex.assert_shape(idx, (want(n),))
    assert int(m[name].sum()) == want(n)
    np.testing.assert_array_equal(np.flatnonzero(np.asarray(m[name])), idx)  # sorted, unique


def test_fixed_subsets_are_uniform():
  # Each of 10 nodes is kept in floor(0.3 * 10) = 3 of 10 places: over 3000 draws each
  # node's frequency is 0.3 within 4 standard errors, and every draw keeps exactly 3.
  cfg = DMUConfig(c_tilde=0.3, mode="dfix")
  keys = jax.random.split(jax.random.key(4), 3000)
  m = jax.vmap(lambda k: dmu_lib.dmu_masks(k, cfg, 10, 20)["input"])(keys)
  np.testing.assert_array_equal(np.asarray(m.sum(1)), 3)
  freq = np.asarray(m.mean(0))
  assert np.all(np.abs(freq - 0.3) < 4 * math.sqrt(0.3 * 0.7 / 3000)), freq


@pytest.mark.parametrize("mode", dmu_lib.EDGE_MODES + dmu_lib.NODE_MODES)
def test_same_key_same_mask_other_step_other_mask(mode, x):
  module, params = init(DMUConfig(c_tilde=0.5, mode=mode), x)
  key = jax.random.key(7)
  run = lambda rng: module.apply({"params": params}, x, deterministic=False, rngs={"dmu": rng})
  step = lambda s: jax.random.fold_in(key, s)
  np.testing.assert_array_equal(run(step(3)), run(step(3)))
  assert not np.allclose(run(step(3)), run(step(4)))
  m3, m3b, m4 = (masks_of_call(module, params, x, step(s)) for s in (3, 3, 4))
  chex.assert_trees_all_equal(m3, m3b)
  assert any(not np.array_equal(m3[k], m4[k]) for k in m3)


@pytest.mark.parametrize("mode", dmu_lib.EDGE_MODES + dmu_lib.NODE_MODES)
@pytest.mark.parametrize("rescale", [False, True])
def test_masked_weights_get_exactly_zero_gradient(mode, rescale, x):
  module, params = init(DMUConfig(c_tilde=0.5, mode=mode, rescale=rescale), x)
  rng = jax.random.key(11)
  r = jax.random.normal(jax.random.key(12), x.shape)

  def loss(p):
    return jnp.sum(r * module.apply({"params": p}, x, deterministic=False, rngs={"dmu": rng}))

  grads = jax.grad(loss)(params)
  used = dmu_lib.dmu_param_masks(masks_of_call(module, params, x, rng))
  for name in dmu_lib.PARAM_NAMES:
    g, u = np.asarray(grads[name]), np.asarray(used[name])
    chex.assert_equal_shape([g, u])
    assert 0 < u.mean() < 1
    np.testing.assert_array_equal(g[~u], 0.0)  # masked: exactly zero
    assert np.all(g[u] != 0.0), name  # kept: take part (generic inputs)


@pytest.mark.parametrize("rescale", [False, True])
def test_dfix_module_equals_masked_dense_and_numpy(rescale, x):
  cfg = DMUConfig(c_tilde=0.5, mode="dfix", rescale=rescale)
  module, params = init(cfg, x)
  rng = jax.random.key(5)
  y = module.apply({"params": params}, x, deterministic=False, rngs={"dmu": rng})
  masks = masks_of_call(module, params, x, rng)
  chex.assert_shape(y, x.shape)
  scales = dmu_lib.dmu_scales(cfg, D, D_FF, deterministic=False)
  act = dmu_lib.ACTIVATIONS["gelu_tanh"]
  dense = dmu_lib.dmu_dense_reference(params, x, masks, scales, act)
  np.testing.assert_allclose(y, dense, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(dmu_lib.dmu_gathered(params, x, masks, scales, act), dense,
                             atol=1e-5, rtol=1e-5)
  # Independent float64 reference: 1/2 of the nodes kept, so rescale divides by 1/2.
  s = 2.0 if rescale else 1.0
  m = {k: np.asarray(masks[k], np.float64) for k in dmu_lib.NODE_NAMES}
  ref = np_mlp(params, x, s_in=s, s_h=s, s_out=s, m_in=m["input"], m_h=m["hidden"],
               m_out=m["output"])
  np.testing.assert_allclose(y, ref, atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(y)[..., ~np.asarray(masks["output"])], 0.0)


@pytest.mark.parametrize("mode", ["dmu2_prob", "dmu2_fix", "dprob"])
def test_masked_modes_equal_numpy(mode, x):
  cfg = DMUConfig(c_tilde=0.5, mode=mode)
  module, params = init(cfg, x)
  rng = jax.random.key(6)
  y = module.apply({"params": params}, x, deterministic=False, rngs={"dmu": rng})
  masks = {k: np.asarray(v) for k, v in masks_of_call(module, params, x, rng).items()}
  if mode == "dprob":
    ref = np_mlp(params, x, m_in=masks["input"], m_h=masks["hidden"], m_out=masks["output"])
  else:
    ref = np_mlp({k: np.where(masks[k], params[k], 0.0) for k in dmu_lib.PARAM_NAMES}, x)
  np.testing.assert_allclose(y, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("activation", ["gelu_tanh", "gelu"])
@pytest.mark.parametrize("mode", dmu_lib.EDGE_MODES + dmu_lib.NODE_MODES)
def test_c_tilde_one_and_disabled_are_the_plain_mlp(mode, activation, x):
  off, params = init(DMUConfig(enabled=False), x, activation)
  ref = np_mlp(params, x, activation)
  y_off = off.apply({"params": params}, x)
  np.testing.assert_allclose(y_off, ref, atol=1e-5, rtol=1e-5)
  for rescale in (False, True):
    one = DMU(D_FF, DMUConfig(c_tilde=1.0, mode=mode, rescale=rescale), activation=activation)
    for det in (True, False):
      y = one.apply({"params": params}, x, deterministic=det, rngs={"dmu": jax.random.key(0)})
      np.testing.assert_array_equal(y, y_off)  # bitwise


@pytest.mark.parametrize("mode", dmu_lib.EDGE_MODES + dmu_lib.NODE_MODES)
def test_eval_is_documented_weight_scaling(mode, x):
  c = 0.3
  cfg = DMUConfig(c_tilde=c, mode=mode)
  module, params = init(cfg, x)
  y = module.apply({"params": params}, x, deterministic=True)
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  if mode in dmu_lib.NODE_MODES:
    # dfix: floor(0.3 * 16) / 16 = 4/16 input/output, floor(0.3 * 48) / 48 = 14/48 hidden.
    q_d, q_h = (4 / 16, 14 / 48) if mode == "dfix" else (c, c)
    ref = np_mlp(params, x, s_in=q_d, s_h=q_h, s_out=q_d)
  else:
    # dmu2_fix: floor(0.3 * 768) / 768 = 230/768 per kernel, 14/48 and 4/16 per bias.
    q_w, q_bi, q_bo = (230 / 768, 14 / 48, 4 / 16) if mode == "dmu2_fix" else (c, c, c)
    u = q_w * np.asarray(x, np.float64) @ p["wi_kernel"] + q_bi * p["wi_bias"]
    ref = q_w * np_gelu(u, "gelu_tanh") @ p["wo_kernel"] + q_bo * p["wo_bias"]
  np.testing.assert_allclose(y, ref, atol=1e-5, rtol=1e-5)
  # rescale=True: evaluation is the plain MLP.
  y_inv = DMU(D_FF, DMUConfig(c_tilde=c, mode=mode, rescale=True)).apply({"params": params}, x)
  np.testing.assert_allclose(y_inv, np_mlp(params, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", dmu_lib.EDGE_MODES + dmu_lib.NODE_MODES)
@pytest.mark.parametrize("rescale", [False, True])
def test_eval_scaling_is_the_expectation_of_training(mode, rescale):
  # With a linear activation the unit is multilinear in independently drawn masks, so
  # the evaluation rule is exactly E[training output]: c~(Wx + b) per linear map
  # (eq. 117), or the plain map under inverted scaling. Monte Carlo over 4000 draws,
  # every output entry within 5 standard errors.
  d, d_ff, draws = 8, 16, 4000
  cfg = DMUConfig(c_tilde=0.4, mode=mode, rescale=rescale)
  k = jax.random.split(jax.random.key(9), 6)
  shapes = {"wi_kernel": (d, d_ff), "wi_bias": (d_ff,), "wo_kernel": (d_ff, d), "wo_bias": (d,)}
  params = {name: jax.random.normal(key, shape) for key, (name, shape) in zip(k, shapes.items())}
  x = jax.random.normal(k[4], (4, d))
  identity = lambda a: a
  train_scales = dmu_lib.dmu_scales(cfg, d, d_ff, deterministic=False)

  def one(key):
    masks = dmu_lib.dmu_masks(key, cfg, d, d_ff)
    return dmu_lib.dmu_dense_reference(params, x, masks, train_scales, identity)

  ys = np.asarray(jax.vmap(one)(jax.random.split(k[5], draws)), np.float64)
  chex.assert_shape(ys, (draws, 4, d))
  expect = dmu_lib.dmu_dense_reference(params, x, None,
                                       dmu_lib.dmu_scales(cfg, d, d_ff, deterministic=True),
                                       identity)
  se = ys.std(0) / math.sqrt(draws)
  z = np.abs(ys.mean(0) - np.asarray(expect)) / se
  assert z.max() < 5, z.max()
  if not rescale:  # and it is not the unscaled map: the test can tell the rules apart
    plain = dmu_lib.mlp(params, x, identity)
    assert (np.abs(ys.mean(0) - np.asarray(plain)) / se).max() > 20


# --------------------------------------------------------------------------- 'dmu_masks'


def stored_call(module, params, x, rng, **variables):
  """A training call with the 'dmu_masks' collection mutable: (y, stored masks)."""
  y, state = module.apply({"params": params, **variables}, x, deterministic=False,
                          rngs={"dmu": rng}, mutable=["dmu_masks"])
  return y, state.get("dmu_masks", {})


@pytest.mark.parametrize("mode", dmu_lib.EDGE_MODES + dmu_lib.NODE_MODES)
def test_stored_masks_are_the_call_masks_and_are_used_when_passed_back(mode, x):
  module, params = init(DMUConfig(c_tilde=0.5, mode=mode), x)
  rng = jax.random.key(21)
  y, stored = stored_call(module, params, x, rng)
  drawn = masks_of_call(module, params, x, rng)
  names = dmu_lib.NODE_NAMES if mode in dmu_lib.NODE_MODES else dmu_lib.PARAM_NAMES
  assert set(stored) == set(names)  # bool masks only, no gather indices
  for name in names:
    chex.assert_type(stored[name], bool)
    np.testing.assert_array_equal(stored[name], drawn[name])
  np.testing.assert_array_equal(
      y, module.apply({"params": params}, x, deterministic=False, rngs={"dmu": rng}))
  # Passed back, the stored masks are used whatever the key: the output under another
  # key is the first call's, bitwise, and the collection comes back unchanged.
  other = jax.random.key(22)
  y_other = module.apply({"params": params}, x, deterministic=False, rngs={"dmu": other})
  assert not np.allclose(y_other, y)
  y_frozen, again = stored_call(module, params, x, other, dmu_masks=stored)
  np.testing.assert_array_equal(y_frozen, y)
  chex.assert_trees_all_equal(again, stored)
  # No 'dmu' stream needed then.
  y_frozen = module.apply({"params": params, "dmu_masks": stored}, x, deterministic=False)
  np.testing.assert_array_equal(y_frozen, y)


@pytest.mark.parametrize("mode", dmu_lib.EDGE_MODES + dmu_lib.NODE_MODES)
def test_touched_params_of_one_unit_are_its_param_masks(mode, x):
  module, params = init(DMUConfig(c_tilde=0.5, mode=mode), x)
  rng = jax.random.key(23)
  _, stored = stored_call(module, params, x, rng)
  touched = dmu_lib.touched_params(params, stored)
  want = dmu_lib.dmu_param_masks(masks_of_call(module, params, x, rng))
  assert set(touched) == set(params)
  for name in dmu_lib.PARAM_NAMES:
    chex.assert_equal_shape([touched[name], params[name]])
    np.testing.assert_array_equal(touched[name], want[name])
  # Jittable, with the same leaves.
  chex.assert_trees_all_equal(jax.jit(dmu_lib.touched_params)(params, stored), touched)


@pytest.mark.parametrize("config,det", [(DMUConfig(enabled=False), False),
                                        (DMUConfig(c_tilde=1.0), False),
                                        (DMUConfig(c_tilde=0.5), True)])
def test_no_masks_stored_when_off_full_or_deterministic(config, det, x):
  module, params = init(config, x)
  y, state = module.apply({"params": params}, x, deterministic=det,
                          rngs={"dmu": jax.random.key(0)}, mutable=["dmu_masks"])
  assert state == {}
  assert all(leaf is True for leaf in jax.tree.leaves(dmu_lib.touched_params(params, {})))
  assert all(leaf is True for leaf in jax.tree.leaves(dmu_lib.touched_params(params, None)))
  # Masks of a training call passed into such a call change nothing.
  _, stored = stored_call(DMU(D_FF, DMUConfig(c_tilde=0.5)), params, x, jax.random.key(1))
  assert stored
  y_passed = module.apply({"params": params, "dmu_masks": stored}, x, deterministic=det,
                          rngs={"dmu": jax.random.key(0)})
  np.testing.assert_array_equal(y_passed, y)


def test_param_masks_keep_leading_axes():
  # Scanned blocks store node masks [L, n]: the param masks are [L, n, m].
  masks = [dmu_lib.dmu_masks(jax.random.key(i), DMUConfig(mode="dprob"), D, D_FF)
           for i in range(3)]
  stacked = dmu_lib.dmu_param_masks(jax.tree.map(lambda *a: jnp.stack(a), *masks))
  for i, m in enumerate(masks):
    chex.assert_trees_all_equal(jax.tree.map(lambda a: a[i], stacked),
                                dmu_lib.dmu_param_masks(m))
