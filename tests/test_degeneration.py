"""Generation + metrics of a model on the synthetic language (SPEC 9, paper Lemma 4.2):
four decoders from the same prompts, the quick measure, samples.txt."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stabjax import configs, degeneration, metrics, sampling
from stabjax.data import DataConfig, load_dataset
from stabjax.degeneration import (DECODERS, GenerationEvalConfig, measure, measure_quick,
                                  sequence_logprobs)
from stabjax.models import get_model, init_params
from test_metrics import _np_sequence_logprob

PROMPT_LEN, NEW = 3, 12
CFG = GenerationEvalConfig(num_samples=16, prompt_len=PROMPT_LEN, max_new_tokens=NEW)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  data = load_dataset(DataConfig(spec="synthetic", seq_len=24, synthetic_n=300,
                                 synthetic_n_validation=64,
                                 cache_dir=str(tmp_path_factory.mktemp("cache"))))
  cfg = configs.get_model_config("gpt2_tiny", vocab_size=data.vocab_size, num_layers=1,
                                 d_model=32, d_ff=64, num_heads=2, max_len=32)
  model = get_model(cfg)
  params = init_params(model, jax.random.PRNGKey(0), seq_len=24)
  return data, model, params


@pytest.fixture(scope="module")
def measured(setup):
  """measure(...) with every sampler call recorded: {decoder: (prompts, mask, key, output)}."""
  data, model, params = setup
  calls = []
  real = sampling.generate

  def spy(model, params, prompts, mask, key, config, **kw):
    out = real(model, params, prompts, mask, key, config, **kw)
    calls.append((config, np.asarray(prompts), np.asarray(mask),
                  np.asarray(jax.random.key_data(key)), jax.device_get(out)))
    return out

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(sampling, "generate", spy)
    result, texts = measure(model, params, data, CFG)
  by_decoder = {}
  for d in DECODERS:
    want = degeneration.decoder_config(CFG, d, NEW)
    (call,) = [c for c in calls if c[0] == want]
    by_decoder[d] = call[1:]
  return result, texts, by_decoder


def left_aligned(prompts, mask, generated):
  """Rows of real prompt tokens + generated tokens, left-aligned, PAD after; lengths."""
  rows = [list(p[m > 0]) + list(g) for p, m, g in zip(prompts, mask, generated)]
  ids = np.zeros((len(rows), PROMPT_LEN + NEW), np.int32)
  for b, r in enumerate(rows):
    ids[b, :len(r)] = r
  return ids, [len(r) for r in rows]


def plain_forward(model, params):
  """Full forward passes (no cache), default positions: causality makes the PAD on the
  right irrelevant, and the fixed width compiles once."""
  return jax.jit(lambda ids: model.apply({"params": params}, ids))


def generated_steps(out, b):
  """Row b's generated tokens through the first EOS (the steps that were sampled)."""
  return np.asarray(out.tokens)[b, PROMPT_LEN:][np.asarray(out.gen_mask)[b]]


def test_forward_kl_is_training_nll_minus_empirical_entropy(setup):
  """Lemma 4.2: L(theta) = d(P_emp || P_theta) + H(P_emp), with the NLL over all n rows."""
  data, model, params = setup
  emp = data.train_empirical()
  kl = metrics.forward_kl(emp.p_emp, sequence_logprobs(model, params, emp.sequences, emp.mask))
  rows = sequence_logprobs(model, params, data.train.tokens, data.train.mask)
  assert len(rows) == 300 and len(emp.p_emp) < 300  # repeats exist
  np.testing.assert_allclose(kl, -rows.mean() - emp.entropy, rtol=1e-5)


def test_sequence_logprobs_in_length_buckets_equal_full_width_scores(setup):
  """Rows scored sorted by length, cut to their bucket's width and filled up to the batch
  give each row's full-width score (NumPy log-softmax of one [n, T] forward), in order:
  a cut dropping a row's last token, a lost order or a filler row's score would not."""
  data, model, params = setup
  rng = np.random.default_rng(0)
  t = data.seq_len
  tokens = rng.integers(1, data.vocab_size, (11, t)).astype(np.int32)
  lengths = np.array([2, t, 5, 17, 3, 16, 9, t - 1, 2, 12, 1])
  mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.int32)
  mask[3, 10] = 0  # a hole inside a row: its columns after it still count
  logits = np.asarray(jax.jit(lambda x: model.apply({"params": params}, x))(tokens))
  want = _np_sequence_logprob(logits, tokens, mask)
  got = sequence_logprobs(model, params, tokens, mask, batch_size=4, width_step=8)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-4)


def test_measure_nests_the_metrics_of_each_decoder(setup, measured):
  data, _, _ = setup
  result, texts, _ = measured
  assert set(result) == set(DECODERS) | {"synthetic"}
  assert list(texts) == ["prompts", *DECODERS]
  assert all(len(texts[k]) == 16 for k in texts)
  top = metrics.top_k_words(data.train_word_counts(), 20)
  for d in DECODERS:
    r = result[d]
    for key in ("hf_proportion", "hf_proportion_reference", "generative_entropy",
                "effective_rank", "length_mean", "no_eos_share", "distinct_2", "num_words"):
      assert key in r, (d, key)
    assert not any(k.startswith("syn/") for k in r)
    assert len(texts[d]) == 16 == r["num_generations"]
    words = [w for t in texts[d] for w in metrics.words(t)]
    assert r["hf_proportion"] == pytest.approx(metrics.high_freq_proportion(words, top))
    assert r["num_words"] == len(words)
    assert 0 < r["generative_entropy"] <= np.log(data.vocab_size) + 1e-4
  # The decoder-free quantities once; a random-init model spreads its mass off the support.
  syn = result["synthetic"]
  assert 0.0 <= syn["support_mass"] < 0.5 and syn["forward_kl"] > 0
  assert texts["greedy"] != texts["sample"]


def test_every_decoder_continues_the_same_prompts_with_the_same_key(measured):
  _, _, calls = measured
  prompts, mask, key, _ = calls["sample"]
  assert prompts.shape == (16, PROMPT_LEN)
  for d in DECODERS:
    np.testing.assert_array_equal(calls[d][0], prompts)
    np.testing.assert_array_equal(calls[d][1], mask)
    np.testing.assert_array_equal(calls[d][2], key)
  c = {d: degeneration.decoder_config(CFG, d, NEW) for d in DECODERS}
  assert (c["greedy"].temperature, c["sample"].temperature) == (0.0, 1.0)
  assert (c["top_k"].top_k, c["top_k"].top_p) == (40, 1.0)
  assert (c["nucleus"].top_k, c["nucleus"].top_p) == (0, 0.9)


def test_greedy_is_deterministic_and_an_argmax_rollout(setup, measured):
  data, model, params = setup
  _, _, calls = measured
  prompts, mask, _, out = calls["greedy"]
  eos = data.tokenizer.eos_id
  forward = plain_forward(model, params)
  seqs, done = [[] for _ in prompts], np.zeros(len(prompts), bool)
  for _ in range(NEW):  # an argmax per step over the whole growing sequence
    ids, lengths = left_aligned(prompts, mask, seqs)
    logits = np.asarray(forward(jnp.asarray(ids)))
    for b in np.flatnonzero(~done):
      seqs[b].append(int(logits[b, lengths[b] - 1].argmax()))
      done[b] = seqs[b][-1] == eos
  for b in range(len(prompts)):
    np.testing.assert_array_equal(generated_steps(out, b), seqs[b])
  greedy = degeneration.decoder_config(CFG, "greedy", NEW)
  again = sampling.generate(model, params, jnp.asarray(prompts), jnp.asarray(mask),
                            jax.random.PRNGKey(123), greedy, eos_id=eos,
                            pad_id=data.tokenizer.pad_id)
  np.testing.assert_array_equal(again.tokens, out.tokens)


def outside(setup, call, rejects) -> int:
  """Generated tokens (over all steps) for which `rejects(logits [V], token)` holds, the
  logits from an independent forward pass over the finished texts."""
  _, model, params = setup
  prompts, mask, _, out = call
  gen = [generated_steps(out, b) for b in range(len(prompts))]
  ids, lengths = left_aligned(prompts, mask, gen)
  logits = np.asarray(plain_forward(model, params)(jnp.asarray(ids)), np.float64)
  bad = 0
  for b, g in enumerate(gen):
    first = lengths[b] - len(g) - 1  # the position predicting the first generated token
    bad += sum(bool(rejects(logits[b, first + i], t)) for i, t in enumerate(g))
  return bad


def beyond_top_40(logits, t):
  return (logits > logits[t]).sum() >= 40


def beyond_nucleus_09(logits, t):
  p = np.exp(logits - logits.max())
  p /= p.sum()
  return p[p > p[t]].sum() >= 0.9 + 1e-6  # the tokens before it already reach 0.9


def test_top_k_decoder_never_leaves_the_40_most_likely(setup, measured):
  _, _, calls = measured
  assert outside(setup, calls["top_k"], beyond_top_40) == 0
  # The check has teeth: plain sampling from this near-uniform model does leave them.
  assert outside(setup, calls["sample"], beyond_top_40) > 0


def test_nucleus_decoder_keeps_the_smallest_set_reaching_0_9(setup, measured):
  _, _, calls = measured
  assert outside(setup, calls["nucleus"], beyond_nucleus_09) == 0
  assert outside(setup, calls["sample"], beyond_nucleus_09) > 0


def test_measure_quick_is_measure_on_the_same_prompts(setup, measured):
  data, model, params = setup
  result, _, _ = measured
  for d in ("sample", "top_k"):
    quick, texts = measure_quick(model, params, data, CFG, num_prompts=16, max_new_tokens=NEW,
                                 decoder=d)
    assert quick == {k: result[d][k] for k in ("hf_proportion", "generative_entropy")}
    assert len(texts[d]) == len(texts["prompts"]) == 16


def test_measure_on_bert_covers_every_decoder(setup):
  data, _, _ = setup
  cfg = configs.get_model_config("bert_tiny", vocab_size=data.vocab_size, num_layers=1,
                                 d_model=32, d_ff=64, num_heads=2, max_len=32)
  model = get_model(cfg)
  params = init_params(model, jax.random.PRNGKey(0), seq_len=24)
  gen = dataclasses.replace(CFG, num_samples=4, max_new_tokens=6)
  before = sampling.unmask_left_to_right.jitted._cache_size()
  result, texts = measure(model, params, data, gen)
  assert set(result) == set(DECODERS)  # no sequence probability: no synthetic quantities
  assert all(len(texts[d]) == 4 and "hf_proportion" in result[d] for d in DECODERS)
  assert sampling.unmask_left_to_right.jitted._cache_size() == before + 1


def test_generation_config_validation():
  assert GenerationEvalConfig().decoders == ("sample", "greedy", "top_k", "nucleus")
  assert GenerationEvalConfig(decoders=["greedy"]).decoders == ("greedy",)  # from JSON
  assert GenerationEvalConfig(decoders="greedy,top_k").decoders == ("greedy", "top_k")
  for bad in (("beam",), (), ("greedy", "greedy")):
    with pytest.raises(ValueError, match="accepted: .*sample, greedy, top_k, nucleus") as e:
      GenerationEvalConfig(decoders=bad)
    assert "\n" not in str(e.value)
  for bad in (dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5), dict(temperature=0.0),
              dict(max_new_tokens=-1), dict(num_samples=0)):
    with pytest.raises(ValueError):
      GenerationEvalConfig(**bad)
  hash(GenerationEvalConfig(decoders=["sample"]))


def test_samples_file_round_trips():
  texts = {"sample": ["ba bo", "line\n\nbreak", ""], "greedy": [], "top_k": ["[1] x"],
           "nucleus": ["last\n"]}
  s = degeneration.format_samples(texts)
  assert s.startswith("=== decoder: sample ===\n[0] ba bo\n\n[1] line")
  assert degeneration.parse_samples(s) == texts
