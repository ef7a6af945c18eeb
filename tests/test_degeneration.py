"""Generation + metrics of a model on the synthetic language (SPEC 9, paper Lemma 4.2)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from stabjax import configs, metrics
from stabjax.data import DataConfig, load_dataset
from stabjax.degeneration import GenerationEvalConfig, measure, sequence_logprobs
from stabjax.models import get_model, init_params


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  data = load_dataset(DataConfig(spec="synthetic", seq_len=24, synthetic_n=300,
                                 synthetic_n_validation=64,
                                 cache_dir=str(tmp_path_factory.mktemp("cache"))))
  cfg = configs.get_model_config("gpt2_tiny", vocab_size=data.vocab_size, num_layers=2,
                                 d_model=32, d_ff=64, num_heads=2, max_len=32)
  model = get_model(cfg)
  params = init_params(model, jax.random.PRNGKey(0), seq_len=24)
  return data, model, params


def test_forward_kl_is_training_nll_minus_empirical_entropy(setup):
  """Lemma 4.2: L(theta) = d(P_emp || P_theta) + H(P_emp), with the NLL over all n rows."""
  data, model, params = setup
  emp = data.train_empirical()
  kl = metrics.forward_kl(emp.p_emp, sequence_logprobs(model, params, emp.sequences, emp.mask))
  rows = sequence_logprobs(model, params, data.train.tokens, data.train.mask)
  assert len(rows) == 300 and len(emp.p_emp) < 300  # repeats exist
  np.testing.assert_allclose(kl, -rows.mean() - emp.entropy, rtol=1e-5)


def test_measure_reports_the_metrics_of_its_own_samples(setup):
  data, model, params = setup
  result, texts = measure(model, params, data, GenerationEvalConfig(num_samples=16, prompt_len=3))
  assert len(texts) == 16 == result["num_generations"]
  words = [w for t in texts for w in metrics.words(t)]
  top = metrics.top_k_words(data.train_word_counts(), 20)
  assert result["hf_proportion"] == pytest.approx(metrics.high_freq_proportion(words, top))
  assert result["num_words"] == len(words)
  # A random-init model spreads its mass: little of it on the training support.
  assert 0.0 <= result["syn/support_mass"] < 0.5
  assert result["syn/forward_kl"] > 0
  assert 0 < result["generative_entropy"] <= np.log(data.vocab_size) + 1e-4
