"""Tests of stabjax.feedback: the entropy feedback loop (SPEC 5) and the batch statistics."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stabjax import feedback
from stabjax.configs import DMUConfig, DTUConfig, ModelConfig


def _np_entropy(logits):
  z = logits - logits.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  return -(np.exp(logp) * logp).sum(-1)


def _unscanned_params():
  s = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  block = {"attn": {"qkv_kernel": s(4, 3, 2, 2), "o_bias": s(4)}, "ln_1": {"scale": s(4)}}
  return {"wte": {"embedding": s(11, 4)}, "wpe": {"embedding": s(8, 4)},
          "block_0": block, "block_1": block, "block_2": block, "block_10": block,
          "ln_f": {"scale": s(4), "bias": s(4)}}


def test_param_groups_unscanned_on_abstract_params():
  params = _unscanned_params()
  groups, num_groups, names = feedback.param_groups(params)
  assert names == ("block_0", "block_1", "block_2", "block_10", "ln_f", "wpe", "wte")
  assert num_groups == 7
  assert jax.tree.structure(groups) == jax.tree.structure(params)
  for key, sub in groups.items():
    for leaf in jax.tree.leaves(sub):
      assert leaf.dtype == np.int32 and leaf.shape == ()
      assert int(leaf) == names.index(key)


def test_param_groups_scanned_layers_and_params_wrapper():
  L = 3
  params = {"params": {
      "wte": {"embedding": np.zeros((11, 4), np.float32)},
      "layers": {"attn": {"qkv_kernel": np.zeros((L, 4, 3, 2, 2), np.float32)},
                 "ln_1": {"scale": np.zeros((L, 4), np.float32)}},
      "ln_f": {"scale": np.zeros((4,), np.float32)}}}
  groups, num_groups, names = feedback.param_groups(params)
  assert names == ("layers_0", "layers_1", "layers_2", "ln_f", "wte")
  assert num_groups == 5
  g = groups["params"]
  np.testing.assert_array_equal(g["layers"]["attn"]["qkv_kernel"],
                                np.arange(3, dtype=np.int32).reshape(3, 1, 1, 1, 1))
  np.testing.assert_array_equal(g["layers"]["ln_1"]["scale"], [[0], [1], [2]])
  assert g["ln_f"]["scale"].shape == () and int(g["ln_f"]["scale"]) == 3
  assert int(g["wte"]["embedding"]) == 4
  with pytest.raises(ValueError, match="leading"):
    feedback.param_groups({"layers": {"a": np.zeros((2, 3)), "b": np.zeros((3, 3))}})


def test_group_fisher_matches_numpy():
  rng = np.random.default_rng(0)
  L = 3
  grads = {"wte": rng.normal(size=(5, 4)).astype(np.float32),
           "layers": {"k": rng.normal(size=(L, 4, 6)).astype(np.float32),
                      "b": rng.normal(size=(L, 6)).astype(np.float32)},
           "ln_f": {"scale": rng.normal(size=(4,)).astype(np.float32),
                    "bias": rng.normal(size=(4,)).astype(np.float32)}}
  groups, num_groups, names = feedback.param_groups(grads)
  got = jax.jit(lambda g: feedback.group_fisher(g, groups, num_groups))(grads)
  want = {}
  for i in range(L):
    sq = np.concatenate([grads["layers"]["k"][i].ravel(), grads["layers"]["b"][i].ravel()]) ** 2
    want[f"layers_{i}"] = sq.mean()
  want["ln_f"] = np.concatenate([grads["ln_f"]["scale"], grads["ln_f"]["bias"]]).__pow__(2).mean()
  want["wte"] = (grads["wte"] ** 2).mean()
  chex.assert_shape(got, (num_groups,))
  np.testing.assert_allclose(got, [want[n] for n in names], rtol=1e-6)


def test_token_rarity_and_global_norm_match_numpy():
  rng = np.random.default_rng(1)
  counts = rng.integers(0, 50, size=13)
  nlf = feedback.neg_log_unigram_freq(counts)
  np.testing.assert_allclose(nlf, -np.log((counts + 1) / (counts + 1).sum()), rtol=1e-6)
  tokens = rng.integers(0, 13, size=(3, 7))
  mask = rng.random((3, 7)) < 0.6
  got = feedback.token_rarity(jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(nlf))
  np.testing.assert_allclose(got, nlf[tokens][mask].mean(), rtol=1e-6)
  np.testing.assert_allclose(feedback.token_rarity(tokens, None, nlf), nlf[tokens].mean(),
                             rtol=1e-6)
  tree = {"a": rng.normal(size=(3, 4)), "b": [rng.normal(size=5)]}
  want = np.sqrt((tree["a"] ** 2).sum() + (tree["b"][0] ** 2).sum())
  np.testing.assert_allclose(feedback.global_norm(tree), want, rtol=1e-6)


def test_predictive_entropy_matches_numpy_with_padding():
  rng = np.random.default_rng(2)
  logits = (3.0 * rng.normal(size=(2, 5, 7))).astype(np.float32)
  mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
  # Garbage in padded positions must not matter, even extreme values.
  logits[0, 3:] = np.finfo(np.float32).min
  got = jax.jit(feedback.predictive_entropy)(jnp.asarray(logits), jnp.asarray(mask))
  want = _np_entropy(logits.astype(np.float64)[mask])
  np.testing.assert_allclose(got, want.mean(), rtol=1e-5)
  grad = jax.grad(feedback.predictive_entropy)(jnp.asarray(logits), jnp.asarray(mask))
  assert np.isfinite(grad).all() and np.all(grad[0, 3:] == 0)
  # Rows with -inf logits (masked vocabulary): one-hot rows have entropy exactly 0, and
  # neither the value nor the gradient is NaN.
  peaked = np.full((1, 2, 4), -np.inf, np.float32)
  peaked[..., 0] = 0.0
  assert float(feedback.predictive_entropy(jnp.asarray(peaked))) == 0.0
  peaked[0, 1, 1] = 0.0  # two equal choices: log 2
  np.testing.assert_allclose(feedback.predictive_entropy(jnp.asarray(peaked)), np.log(2) / 2,
                             rtol=1e-6)
  assert np.isfinite(jax.grad(feedback.predictive_entropy)(jnp.asarray(peaked))).all()
  # Uniform logits give log V.
  np.testing.assert_allclose(feedback.predictive_entropy(jnp.zeros((2, 3, 9))), np.log(9.0),
                             rtol=1e-6)


def test_learning_complexity_by_hand():
  base = ModelConfig(name="t", arch="gpt2", vocab_size=10, max_len=8, num_layers=2, num_heads=2,
                     d_model=4, d_ff=16)
  assert feedback.learning_complexity(base, 4) == 1.0
  # DTU keeps more keys than any query has: nothing saved, and DMU at c~ = 1.
  same = base.replace(dmu=DMUConfig(enabled=True, c_tilde=1.0), dtu=DTUConfig(keep=4))
  assert feedback.learning_complexity(same, 4) == 1.0
  # GPT-2, dfix c~ = 0.5, a3 = 2, T = 4 (causal: 1 + 2 + 3 + 4 = 10 allowed keys, 1 + 2 + 2 + 2
  # = 7 kept). Per layer: projections 8 d^2 T = 512, MLP 4 d f T = 1024, attention 4 d * keys
  # = 160 full / 112 kept; logits 2 d V T = 320.
  # full = 2 (512 + 1024 + 160) + 320 = 3712; actual = 2 (512 + 256 + 112) + 320 = 2080.
  cfg = base.replace(dmu=DMUConfig(enabled=True, c_tilde=0.5, mode="dfix"), dtu=DTUConfig(keep=2))
  assert feedback.learning_complexity(cfg, 4) == pytest.approx(2080 / 3712, rel=1e-12)
  # Edge mode scales the MLP by c~, DTU off: actual = 2 (512 + 512 + 160) + 320 = 2688.
  cfg = base.replace(dmu=DMUConfig(enabled=True, c_tilde=0.5, mode="dmu2_prob"))
  assert feedback.learning_complexity(cfg, 4) == pytest.approx(2688 / 3712, rel=1e-12)
  # BERT (non-causal: every query has T = 4 allowed keys, 16 in all, 8 kept with a3 = 2), plus
  # the MLM transform 2 d^2 T = 128 beside the logits. dprob c~ = 0.5 (MLP x 0.25).
  # full = 2 (512 + 1024 + 256) + 320 + 128 = 4032; actual = 2 (512 + 256 + 128) + 448 = 2240.
  bert = base.replace(arch="bert", dmu=DMUConfig(enabled=True, c_tilde=0.5, mode="dprob"),
                      dtu=DTUConfig(keep=2))
  assert feedback.learning_complexity(bert, 4) == pytest.approx(2240 / 4032, rel=1e-12)


# ----------------------------------------------------------------------------------------
# The loop itself on a toy softmax model: logits theta [V], data tokens i.i.d. from p*.

V = 6
P_STAR = np.array([0.5, 0.2, 0.12, 0.08, 0.06, 0.04])
H_STAR = float(-(P_STAR * np.log(P_STAR)).sum())  # ~1.42 nats; log V ~1.79


def _toy_losses(theta, tokens, alpha, target):
  logits = jnp.broadcast_to(theta, tokens.shape + (V,))
  logp = jax.nn.log_softmax(logits)
  mle = -jnp.mean(jnp.take_along_axis(logp, tokens[..., None], -1))
  ent = feedback.predictive_entropy(logits)
  return mle, mle + feedback.feedback_loss(ent, alpha, target), ent


def test_alpha_zero_is_exactly_mle():
  rng = np.random.default_rng(4)
  theta = jnp.asarray(rng.normal(size=V), jnp.float32)
  tokens = jnp.asarray(rng.choice(V, size=(4, 9), p=P_STAR))
  total = lambda th, a: _toy_losses(th, tokens, a, 0.3)[1]
  mle = lambda th: _toy_losses(th, tokens, 0.0, 0.0)[0]
  l1, g1 = jax.jit(jax.value_and_grad(mle))(theta)
  # alpha a Python 0 (as from a config): bit for bit.
  l0, g0 = jax.jit(jax.value_and_grad(lambda th: total(th, 0.0)))(theta)
  assert np.array_equal(l0, l1) and np.array_equal(g0, g1)
  # A traced 0: same up to float32 rounding of a differently fused log-softmax.
  l0, g0 = jax.jit(jax.value_and_grad(total))(theta, jnp.float32(0.0))
  np.testing.assert_allclose(l0, l1, rtol=1e-6)
  np.testing.assert_allclose(g0, g1, rtol=1e-5, atol=1e-7)
  assert float(feedback.feedback_loss(jnp.float32(2.0), 0.0)) == 0.0
  np.testing.assert_allclose(feedback.feedback_loss(jnp.float32(2.0), 0.2, 0.5),
                             0.5 * 0.2 * 1.5 ** 2, rtol=1e-7)


def _train_entropy(alpha, target, steps=400, lr=0.5, batch=64, seed=0):
  """SGD on MLE + L_fb from uniform logits; returns H(B_t) per step."""
  tokens = jax.random.choice(jax.random.PRNGKey(seed), V, (steps, batch), p=jnp.asarray(P_STAR))

  def step(theta, toks):
    grad = jax.grad(lambda th: _toy_losses(th, toks, alpha, target)[1])(theta)
    return theta - lr * grad, _toy_losses(theta, toks, alpha, target)[2]

  _, ent = jax.lax.scan(step, jnp.zeros((V,), jnp.float32), tokens)
  return np.asarray(ent)


def test_feedback_lowers_entropy_faster_and_tracks_the_setpoint():
  mle = _train_entropy(0.0, 0.0)
  fb = _train_entropy(0.2, 0.0)
  # Both start at log V. The feedback term pulls H down at every point of the descent.
  assert mle[0] == pytest.approx(np.log(V), rel=1e-6) and fb[0] == mle[0]
  # (Measured: 1.52 vs 1.61 at t = 10, 1.26 vs 1.47 at t = 40; first below H* + 0.05 at t = 11
  # vs 28.)
  for t in (10, 20, 40):
    assert fb[t] < mle[t] - 0.05, (t, fb[t], mle[t])
  first = lambda h: int(np.argmax(h < H_STAR + 0.05))
  assert first(fb) < first(mle)
  # MLE settles at the data entropy; with x* = 0 the loop holds H below it (eq. 61's fixed point
  # moves), with x* = H(p*) it settles at H(p*).
  tail = slice(-100, None)
  assert abs(mle[tail].mean() - H_STAR) < 0.02
  assert fb[tail].mean() < H_STAR - 0.05
  at_target = _train_entropy(0.2, H_STAR)
  assert abs(at_target[tail].mean() - H_STAR) < 0.02
  assert at_target[tail].std() < 0.05
