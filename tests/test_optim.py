"""Tests of stabjax.optim: the base optimizers and `masked_step` (a step touches only its
sub-network, parameters and optimizer state alike)."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import optax

from stabjax import optim
from stabjax.configs import TrainConfig
from stabjax.psu import PSUConfig, find_psu_state, psu


def _params(seed=0):
  rng = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  return {"wte": {"embedding": f(6, 4)}, "block_0": {"kernel": f(4, 5), "bias": f(5)},
          "ln_f": {"scale": f(4)}}


def _grads(rng, params):
  return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)


def _adam_moments(state):
  """(mu, nu) of the base optimizer's ScaleByAdamState (the first; the PSU's policy has one too)."""
  found = [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
           if isinstance(s, optax.ScaleByAdamState)]
  return found[0].mu, found[0].nu


def test_masked_entries_keep_parameter_and_adam_moments():
  params = _params()
  t = TrainConfig(lr=1e-2, weight_decay=0.1, warmup_steps=0, steps=100)
  plain = optax.chain(optax.clip_by_global_norm(1.0), optim.base_optimizer(t))
  masked = optim.masked_step(plain)
  rng = np.random.default_rng(1)
  s_plain, s_masked = plain.init(params), masked.init(params)
  for _ in range(3):  # build up momentum everywhere
    g = _grads(rng, params)
    _, s_plain = plain.update(g, s_plain, params)
    _, s_masked = masked.update(g, s_masked, params)
  # This step's sub-network: every other row of the embedding, columns 0-2 of the kernel.
  touched = {"wte": {"embedding": (np.arange(6) % 2 == 0)[:, None]},
             "block_0": {"kernel": (np.arange(5) < 3)[None, :], "bias": True},
             "ln_f": {"scale": True}}
  g = jax.tree.map(lambda x, m: jnp.where(m, x, 0.0), _grads(rng, params), touched)
  u_plain, s_plain2 = plain.update(g, s_plain, params)
  u_masked, s_masked2 = jax.jit(lambda g, s: masked.update(g, s, params, touched=touched))(g, s_masked)
  mu0, nu0 = _adam_moments(s_masked)
  mu1, nu1 = _adam_moments(s_masked2)
  mu_p, nu_p = _adam_moments(s_plain2)
  for path in (("wte", "embedding"), ("block_0", "kernel")):
    m = np.broadcast_to(touched[path[0]][path[1]], params[path[0]][path[1]].shape)
    get = lambda tree: np.asarray(tree[path[0]][path[1]])
    assert np.all(get(u_masked)[~m] == 0.0)
    assert np.all(get(u_plain)[~m] != 0.0)  # AdamW alone moves them (momentum, decay)
    np.testing.assert_array_equal(get(mu1)[~m], get(mu0)[~m])
    np.testing.assert_array_equal(get(nu1)[~m], get(nu0)[~m])
    # Inside the sub-network: exactly AdamW (the same state history).
    np.testing.assert_allclose(get(u_masked)[m], get(u_plain)[m], rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(get(mu1)[m], get(mu_p)[m], rtol=1e-5, atol=1e-9)


def test_groups_outside_the_psu_active_set_keep_parameter_and_moments():
  params = _params()
  t = TrainConfig(lr=1e-2, warmup_steps=0, steps=100)
  tx = optim.make_optimizer(t, PSUConfig(init_active_logit=0.0, learn=False, value="linear"),
                            c_tilde=0.5)
  rng = np.random.default_rng(2)
  state = tx.init(params)
  update = jax.jit(lambda g, s: tx.update(g, s, params, value=1.0, grad=g, entropy=1.0))
  names = ("block_0", "ln_f", "wte")  # group order: natural sort of the top-level keys
  checked = 0
  for _ in range(12):
    g = _grads(rng, params)
    mu0, nu0 = _adam_moments(state)
    u, state = update(g, state)
    active = np.asarray(find_psu_state(state).active)
    mu1, nu1 = _adam_moments(state)
    for name, on in zip(names, active):
      for leaf in params[name]:
        if on:
          assert np.all(np.asarray(u[name][leaf]) != 0)
        else:
          checked += 1
          assert np.all(np.asarray(u[name][leaf]) == 0)
          np.testing.assert_array_equal(mu1[name][leaf], mu0[name][leaf])
          np.testing.assert_array_equal(nu1[name][leaf], nu0[name][leaf])
  assert checked > 0


def test_sgd_is_plain_sgd_on_the_l2_regularised_loss():
  params = _params()
  t = TrainConfig(optimizer="sgd", lr=0.1, weight_decay=0.01, warmup_steps=0, steps=10,
                  min_lr_ratio=1.0, clip_norm=1e9)
  tx = optim.make_optimizer(t, PSUConfig(enabled=False), c_tilde=1.0)
  g = _grads(np.random.default_rng(3), params)
  u, _ = tx.update(g, tx.init(params), params)
  # Lemma 4.1's update: -lr (g + lambda theta) on kernels/embeddings, -lr g on biases/scales.
  np.testing.assert_allclose(u["block_0"]["kernel"],
                             -0.1 * (np.asarray(g["block_0"]["kernel"])
                                     + 0.01 * np.asarray(params["block_0"]["kernel"])), rtol=1e-6)
  np.testing.assert_allclose(u["block_0"]["bias"], -0.1 * np.asarray(g["block_0"]["bias"]),
                             rtol=1e-6)
  np.testing.assert_allclose(u["ln_f"]["scale"], -0.1 * np.asarray(g["ln_f"]["scale"]), rtol=1e-6)



def test_lr_schedule_matches_optax_warmup_cosine_with_traced_scalars():
  """Our schedule against optax's warmup_cosine_decay_schedule (warmup clamped to
  steps - 1, a 1-step run), with every scalar traced: optax's own branches on them."""
  for steps, warmup in ((50, 10), (50, 0), (5, 9), (1, 3)):
    lr, ratio = 2e-3, 0.1
    w = min(warmup, steps - 1) if steps > 1 else 0
    ref = optax.warmup_cosine_decay_schedule(0.0, lr, w, max(steps, w + 1), end_value=lr * ratio)
    counts = np.arange(steps + 3)

    @jax.jit
    def ours(c, steps_, warmup_, lr_, ratio_):
      return optim.lr_schedule(types.SimpleNamespace(
          steps=steps_, warmup_steps=warmup_, lr=lr_, min_lr_ratio=ratio_))(c)

    np.testing.assert_allclose(ours(counts, float(steps), float(warmup), lr, ratio),
                               [float(ref(c)) for c in counts], rtol=2e-6, atol=1e-12)
