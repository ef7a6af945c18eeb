"""The feedback forms (configs.FEEDBACK_FORMS) through the real train step.

Each test takes one SGD step (units and PSU off, so the step is plain gradient descent)
from the same state on the same batch and compares the batch's predictive entropy after
it with the step of plain MLE: a term that pulls H toward a setpoint above the current H
must end higher than MLE, one below it lower.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stabjax import configs
from stabjax.data import DataConfig, load_dataset
from stabjax.psu import PSUConfig
from stabjax.run import resolve_feedback_target
from stabjax.train import RunConfig, SpecialIds, Trainer, make_loss_fn

IDS = SpecialIds(pad=0, bos=1, eos=2, mask=3)
VOCAB = 64


def config(feedback="zero", alpha=0.0, **train_kw) -> RunConfig:
  model = configs.get_model_config("gpt2_tiny", vocab_size=VOCAB, num_layers=2, d_model=32,
                                   d_ff=64, num_heads=4)
  train = configs.TrainConfig(batch_size=8, seq_len=16, steps=10, warmup_steps=0, lr=0.5,
                              min_lr_ratio=1.0, optimizer="sgd", weight_decay=0.0,
                              clip_norm=1e9, feedback=feedback, alpha=alpha, **train_kw)
  return RunConfig(model=model, train=train, psu=PSUConfig(enabled=False))


def batch(cfg):
  rng = np.random.default_rng(0)
  tokens = rng.integers(4, VOCAB, (cfg.train.batch_size, cfg.train.seq_len)).astype(np.int32)
  tokens[:, 0] = IDS.bos
  return {"tokens": tokens, "mask": np.ones_like(tokens)}


def entropy_after_one_step(cfg, entropy_ema=None, step=None):
  """H(B) on the batch after one train step from the same initial parameters."""
  trainer = Trainer.create(cfg, IDS)
  state = trainer.init_state()
  if entropy_ema is not None:
    state = state.replace(entropy_ema=jnp.float32(entropy_ema), step=jnp.int32(step))
  b = trainer.put_batch(batch(cfg))
  freq = jnp.zeros((VOCAB,), jnp.float32)
  state, m = trainer.train_step(state, b, freq)
  loss_fn = make_loss_fn(trainer.model, cfg.model, cfg.train, IDS)
  _, aux = loss_fn(state.params, b, jax.random.PRNGKey(0), deterministic=True)
  return float(aux["entropy"]), m


@pytest.fixture(scope="module")
def h0_and_mle():
  cfg = config()
  trainer = Trainer.create(cfg, IDS)
  state = trainer.init_state()
  loss_fn = make_loss_fn(trainer.model, cfg.model, cfg.train, IDS)
  _, aux = loss_fn(state.params, batch(cfg), jax.random.PRNGKey(0), deterministic=True)
  h_mle, _ = entropy_after_one_step(cfg)
  return float(aux["entropy"]), h_mle


def test_ema_form_pushes_h_toward_its_running_average_from_both_sides(h0_and_mle):
  h0, h_mle = h0_and_mle
  cfg = config("ema", alpha=2.0, feedback_ema_decay=0.9)
  step, debias = 5, 1.0 - 0.9 ** 5  # the state holds the biased EMA; the setpoint debiases it
  above, m_above = entropy_after_one_step(cfg, (h0 + 0.5) * debias, step)
  below, m_below = entropy_after_one_step(cfg, (h0 - 0.5) * debias, step)
  np.testing.assert_allclose(float(m_above["feedback/setpoint"]), h0 + 0.5, rtol=1e-5)
  assert below < h_mle < above, (below, h_mle, above)
  # At step 0 there is no average yet: the step is plain MLE, bit for bit.
  first, _ = entropy_after_one_step(cfg, 123.0, 0)
  assert first == h_mle


def test_ema_state_is_the_exponential_average_of_the_logged_entropies():
  cfg = config("ema", alpha=0.2, feedback_ema_decay=0.8)
  trainer = Trainer.create(cfg, IDS)
  state = trainer.init_state()
  freq = jnp.zeros((VOCAB,), jnp.float32)
  rng = np.random.default_rng(3)
  logged, setpoints = [], []
  for i in range(4):
    b = batch(cfg)
    b["tokens"][:, 1:] = rng.integers(4, VOCAB, b["tokens"][:, 1:].shape)
    state, m = trainer.train_step(state, trainer.put_batch(b), freq)
    logged.append(float(m["entropy"]))
    setpoints.append(float(m["feedback/setpoint"]))
  ema = 0.0
  for i, h in enumerate(logged):
    if i > 0:  # the setpoint of step i is the debiased average of steps 0..i-1
      np.testing.assert_allclose(setpoints[i], ema / (1 - 0.8 ** i), rtol=1e-5)
    ema = 0.8 * ema + 0.2 * h
  np.testing.assert_allclose(float(state.entropy_ema), ema, rtol=1e-5)


def test_data_form_pushes_h_toward_h_data_from_both_sides(h0_and_mle):
  h0, h_mle = h0_and_mle
  above, m = entropy_after_one_step(config("data", alpha=2.0, feedback_target=h0 + 0.5))
  below, _ = entropy_after_one_step(config("data", alpha=2.0, feedback_target=h0 - 0.5))
  np.testing.assert_allclose(float(m["feedback/setpoint"]), h0 + 0.5, rtol=1e-6)
  assert below < h_mle < above, (below, h_mle, above)


def test_zero_form_lowers_h_and_psu_only_has_no_loss_term(h0_and_mle):
  _, h_mle = h0_and_mle
  lower, m = entropy_after_one_step(config("zero", alpha=2.0))
  assert lower < h_mle
  same, m = entropy_after_one_step(config("psu_only", alpha=2.0))
  assert same == h_mle and float(m["loss"]) == float(m["nll"])


def test_data_form_setpoint_on_synthetic_is_the_languages_entropy_per_token():
  """H_data against a Monte Carlo estimate from the language's own samples:
  mean -log P(sequence) / mean number of predicted tokens (words and EOS)."""
  data = load_dataset(DataConfig(spec="synthetic", seq_len=32, synthetic_n=64,
                                 synthetic_n_validation=16), seed=0)
  cfg = config("data", alpha=0.2)
  cfg = dataclasses.replace(cfg, data=data.config)
  resolved = resolve_feedback_target(cfg, data).train.feedback_target
  lang = data.synthetic
  tokens, mask = lang.sample(np.random.SeedSequence([7]), 20000)
  mc = -lang.log_prob(tokens, mask).mean() / (mask.sum(1) - 1).mean()
  assert abs(resolved - mc) < 0.02 * mc, (resolved, mc)


def test_data_form_on_text_without_a_setpoint_is_refused():
  class Text:  # what resolve_feedback_target reads of a text dataset
    synthetic = None
  cfg = dataclasses.replace(config("data", alpha=0.2), data=DataConfig(spec="text:corpus.txt"))
  with pytest.raises(ValueError, match="--feedback_target"):
    resolve_feedback_target(cfg, Text())
  with pytest.raises(ValueError, match="--feedback=data only"):
    configs.TrainConfig(feedback="zero", feedback_target=2.0)
