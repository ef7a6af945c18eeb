"""Samplers (SPEC 9): KV cache vs recomputation, top-k/top-p/temperature, EOS, entropies,
BERT mask-predict, prompt selection."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stabjax import sampling
from stabjax.configs import ModelConfig
from stabjax.metrics import generation_lengths
from stabjax.models import get_model, init_params
from stabjax.sampling import SamplingConfig

V, D, P, N = 50, 32, 5, 10
PAD, BOS, EOS, MASK = 0, 1, 2, 3
GPT = ModelConfig(name="gpt2_sampling_test", arch="gpt2", vocab_size=V, max_len=24,
                  num_layers=2, num_heads=2, d_model=D, d_ff=64)
BERT = ModelConfig(name="bert_sampling_test", arch="bert", vocab_size=V, max_len=24,
                   num_layers=2, num_heads=2, d_model=D, d_ff=64, layer_norm_eps=1e-12)
GREEDY = SamplingConfig(max_new_tokens=N, top_k=1)
SAMPLE = SamplingConfig(max_new_tokens=N)
# Rows 1 and 2 are left-padded: their real prompts are 3 and 1 tokens long.
PROMPT_MASK = np.array([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 0, 0, 1]], np.int32)
PROMPTS = np.where(PROMPT_MASK > 0,
                   np.random.default_rng(0).integers(4, V, PROMPT_MASK.shape), PAD).astype(np.int32)


@functools.cache
def params_of(cfg: ModelConfig):
  return jax.jit(lambda k: init_params(cfg, k))(jax.random.key(0))


def gpt_run(fn, config, params=None, prompts=PROMPTS, mask=PROMPT_MASK, seed=7):
  params = params_of(GPT) if params is None else params
  return fn(get_model(GPT), params, jnp.asarray(prompts), jnp.asarray(mask),
            jax.random.key(seed), config, eos_id=EOS, pad_id=PAD)


@functools.cache
def cached_output(config: SamplingConfig) -> sampling.GenerationOutput:
  return gpt_run(sampling.generate, config)


def unpadded_rows(tokens, prompt_mask):
  """Each row as its real prompt tokens + generated tokens, left-aligned, PAD on the right."""
  tokens = np.asarray(tokens)
  out = np.full_like(tokens, PAD)
  lengths = prompt_mask.sum(1)
  for b in range(tokens.shape[0]):
    row = np.concatenate([tokens[b, :P][prompt_mask[b] > 0], tokens[b, P:]])
    out[b, :len(row)] = row
  return out, lengths


def softmax_entropy(logits):
  logits = np.asarray(logits, np.float64)
  logits = logits - logits.max(-1, keepdims=True)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  p = np.exp(logp)
  return -(p * np.where(p > 0, logp, 0.0)).sum(-1)


# --------------------------------------------------------------------- KV cache vs recompute


@pytest.mark.parametrize("config", [GREEDY, SAMPLE], ids=["greedy", "sample"])
def test_kv_cache_gives_the_tokens_of_recomputation(config):
  cached = cached_output(config)
  plain = gpt_run(sampling.generate_no_cache, config)
  np.testing.assert_array_equal(cached.tokens, plain.tokens)
  np.testing.assert_array_equal(cached.gen_mask, plain.gen_mask)
  np.testing.assert_array_equal(cached.lengths, plain.lengths)
  np.testing.assert_allclose(cached.entropies, plain.entropies, atol=1e-5)
  np.testing.assert_allclose(cached.hidden, plain.hidden, atol=1e-4)
  chex.assert_shape([cached.tokens, cached.gen_mask, cached.entropies, cached.hidden],
                    [(3, P + N), (3, N), (3, N), (3, N, D)])
  np.testing.assert_array_equal(cached.tokens[:, :P], PROMPTS)


def test_greedy_matches_an_argmax_loop_on_unpadded_prompts():
  """Independent reference: growing sequences without padding, default positions."""
  out = cached_output(GREEDY)
  forward = jax.jit(lambda ids: get_model(GPT).apply({"params": params_of(GPT)}, ids))
  # Real prompt tokens from column 0, PAD after them (causal: later columns do not matter).
  seq, lengths = unpadded_rows(np.pad(PROMPTS, ((0, 0), (0, N))), PROMPT_MASK)
  for i in range(N):
    logits = np.asarray(forward(jnp.asarray(seq)))
    for b in range(3):
      seq[b, lengths[b] + i] = logits[b, lengths[b] + i - 1].argmax()
  want = np.stack([seq[b, lengths[b]:lengths[b] + N] for b in range(3)])
  np.testing.assert_array_equal(out.tokens[:, P:], want)


@pytest.mark.parametrize("config", [GREEDY, SAMPLE], ids=["greedy", "sample"])
def test_entropies_and_hidden_are_those_of_the_model_at_temperature_one(config):
  out = cached_output(config)
  seq, lengths = unpadded_rows(out.tokens, PROMPT_MASK)
  logits, hidden = get_model(GPT).apply({"params": params_of(GPT)}, jnp.asarray(seq),
                                        return_hidden=True)
  steps = lengths[:, None] + np.arange(N)[None, :]
  want_ent = softmax_entropy(np.take_along_axis(np.asarray(logits), steps[..., None] - 1, 1))
  want_hid = np.take_along_axis(np.asarray(hidden), steps[..., None], 1)
  m = np.asarray(out.gen_mask)
  np.testing.assert_allclose(np.asarray(out.entropies)[m], want_ent[m], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(out.hidden)[m], want_hid[m], atol=1e-4)
  # The entropy is of the full distribution: ~log V for a random init, also when greedy.
  assert np.all(np.asarray(out.entropies)[m] > 0.9 * np.log(V))


def test_same_key_same_tokens_other_key_other_tokens():
  a = cached_output(SAMPLE)
  np.testing.assert_array_equal(a.tokens, gpt_run(sampling.generate, SAMPLE).tokens)
  assert not np.array_equal(a.tokens, gpt_run(sampling.generate, SAMPLE, seed=8).tokens)


def test_low_temperature_generation_is_greedy():
  cold = gpt_run(sampling.generate, SamplingConfig(max_new_tokens=N, temperature=1e-4))
  np.testing.assert_array_equal(cold.tokens, cached_output(GREEDY).tokens)


# --------------------------------------------------------------------------------- EOS


def eos_params(boost: float = 2.0):
  """Params whose every next-token logit of EOS is raised by `boost` (via ln_f's bias)."""
  params = jax.tree.map(lambda x: x, params_of(GPT))
  w = params["wte"][EOS]
  params["ln_f"]["bias"] = params["ln_f"]["bias"] + boost * w / jnp.dot(w, w)
  return params


@functools.cache
def eos_outputs():
  # The shapes and configs of the tests above: nothing new to compile but one config.
  run = lambda fn, cfg: gpt_run(fn, cfg, params=eos_params(), seed=3)
  return (run(sampling.generate, SAMPLE), run(sampling.generate_no_cache, SAMPLE),
          run(sampling.generate, SamplingConfig(max_new_tokens=N, stop_at_eos=False)))


def test_after_eos_only_pad_and_lengths_match_the_metrics():
  out, plain, _ = eos_outputs()
  gen = np.asarray(out.tokens[:, P:])
  has_eos = (gen == EOS).any(1)
  assert has_eos.any() and not has_eos.all()  # the seed gives both kinds of rows
  first = np.where(has_eos, (gen == EOS).argmax(1), N)
  after = np.arange(N)[None, :] > first[:, None]
  assert np.all(gen[after] == PAD)
  np.testing.assert_array_equal(out.gen_mask, ~after)
  want_len, want_has = generation_lengths(out.tokens, EOS, start=P)
  np.testing.assert_array_equal(out.lengths, want_len)
  np.testing.assert_array_equal(out.has_eos, want_has)
  assert np.all(np.asarray(out.entropies)[after] == 0)
  assert np.all(np.asarray(out.hidden)[after] == 0)
  # The early-exit loop of the reference agrees.
  np.testing.assert_array_equal(out.tokens, plain.tokens)
  np.testing.assert_array_equal(out.gen_mask, plain.gen_mask)


def test_without_stop_at_eos_sampling_continues():
  out, _, free = eos_outputs()
  assert np.asarray(free.gen_mask).all()
  # Same key: identical up to and including the first EOS, then it keeps sampling.
  m = np.asarray(out.gen_mask)
  np.testing.assert_array_equal(np.asarray(free.tokens[:, P:])[m], np.asarray(out.tokens[:, P:])[m])
  assert np.any(np.asarray(free.tokens[:, P:])[~m] != PAD)
  np.testing.assert_array_equal(free.lengths, out.lengths)


# ------------------------------------------------------------------------- sample_logits


def test_top_k_only_samples_the_k_most_likely():
  logits = jax.random.normal(jax.random.key(0), (4000, 20)) * 2
  tok = np.asarray(sampling.sample_logits(jax.random.key(1), logits, top_k=3))
  top3 = np.argsort(-np.asarray(logits), axis=1)[:, :3]
  assert np.all((top3 == tok[:, None]).any(1))
  # Within the top k the draw follows the renormalised probabilities.
  row = jnp.broadcast_to(logits[0], (4000, 20))
  tok = np.asarray(sampling.sample_logits(jax.random.key(2), row, top_k=3))
  p = np.exp(np.asarray(logits[0], np.float64))[top3[0]]
  freq = np.array([(tok == t).mean() for t in top3[0]])
  np.testing.assert_allclose(freq, p / p.sum(), atol=0.03)  # ~4 standard errors


def test_top_p_samples_only_the_nucleus():
  probs = np.array([0.06, 0.5, 0.04, 0.3, 0.1])  # sorted: 0.5, 0.3 | 0.1, 0.06, 0.04
  logits = jnp.broadcast_to(jnp.log(jnp.asarray(probs, jnp.float32)), (4000, 5))
  tok = np.asarray(sampling.sample_logits(jax.random.key(3), logits, top_p=0.75))
  assert set(np.unique(tok)) == {1, 3}
  np.testing.assert_allclose([(tok == 1).mean(), (tok == 3).mean()], [0.625, 0.375], atol=0.03)
  tok = np.asarray(sampling.sample_logits(jax.random.key(4), logits, top_p=0.85))
  assert set(np.unique(tok)) == {1, 3, 4}
  # The most likely token is always kept, however small top_p.
  tok = np.asarray(sampling.sample_logits(jax.random.key(5), logits, top_p=1e-3))
  assert set(np.unique(tok)) == {1}


def test_temperature_to_zero_approaches_argmax():
  logits = np.asarray(jax.random.normal(jax.random.key(6), (2000, 20)))
  best = logits.argmax(1)
  top2 = np.sort(logits, 1)[:, -2:]
  clear = top2[:, 1] - top2[:, 0] > 0.05  # gap / T = 50 nats: no other token is drawn
  agree = lambda t: np.asarray(sampling.sample_logits(jax.random.key(7), logits, t)) == best
  np.testing.assert_array_equal(agree(0.0), True)
  assert agree(1e-3)[clear].all()
  assert agree(1.0).mean() < agree(0.3).mean() < agree(0.05).mean() < agree(1e-3).mean()


def test_sampling_config_validation():
  for bad in (dict(temperature=-1.0), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5),
              dict(max_new_tokens=0), dict(iterations=0), dict(lookahead=-1)):
    with pytest.raises(ValueError):
      SamplingConfig(**bad)
  with pytest.raises(ValueError, match="max_len"):
    gpt_run(sampling.generate, SamplingConfig(max_new_tokens=GPT.max_len))


# --------------------------------------------------------------------- BERT mask-predict

MP = SamplingConfig(max_new_tokens=N, iterations=4)


def bert_run(config=MP, params=None, seed=11):
  params = params_of(BERT) if params is None else params
  return sampling.mask_predict(get_model(BERT), params, jnp.asarray(PROMPTS),
                               jnp.asarray(PROMPT_MASK), jax.random.key(seed), config,
                               mask_id=MASK, eos_id=EOS, pad_id=PAD)


def bias_params(token: int, value: float = 50.0):
  params = jax.tree.map(lambda x: x, params_of(BERT))
  params["mlm_head"]["bias"] = params["mlm_head"]["bias"].at[token].add(value)
  return params


def test_mask_predict_keeps_prompts_and_is_reproducible():
  out = bert_run()
  chex.assert_shape([out.tokens, out.gen_mask, out.entropies, out.hidden, out.lengths],
                    [(3, P + N), (3, N), (3, N), (3, N, D), (3,)])
  np.testing.assert_array_equal(out.tokens[:, :P], PROMPTS)
  chex.assert_trees_all_equal(out, bert_run())
  assert not np.array_equal(out.tokens, bert_run(seed=12).tokens)
  gen = np.asarray(out.tokens[:, P:])[np.asarray(out.gen_mask)]
  assert not np.isin(gen, [MASK, PAD]).any()


def test_mask_predict_outputs_a_forced_token():
  out = bert_run(params=bias_params(17))
  np.testing.assert_array_equal(out.tokens[:, P:], 17)
  np.testing.assert_array_equal(out.lengths, N)
  assert not np.asarray(out.has_eos).any()


def test_mask_predict_never_samples_mask_or_pad_and_eos_ends_the_text():
  out = bert_run(params=bias_params(MASK))  # the banned [MASK] would dominate
  gen = np.asarray(out.tokens[:, P:])[np.asarray(out.gen_mask)]
  assert gen.size and not np.isin(gen, [MASK, PAD]).any()
  out = bert_run(params=bias_params(EOS))
  gen = np.asarray(out.tokens[:, P:])
  np.testing.assert_array_equal(gen[:, 0], EOS)
  np.testing.assert_array_equal(gen[:, 1:], PAD)
  np.testing.assert_array_equal(out.gen_mask, np.arange(N)[None, :].repeat(3, 0) == 0)
  np.testing.assert_array_equal(out.lengths, 0)
  assert np.asarray(out.has_eos).all()


def test_one_round_entropies_and_hidden_match_the_model():
  out = bert_run(SamplingConfig(max_new_tokens=N, iterations=1))
  model, params = get_model(BERT), params_of(BERT)
  lengths = PROMPT_MASK.sum(1)
  masked = np.full((3, P + N), PAD, np.int32)
  for b in range(3):
    masked[b, :lengths[b]] = PROMPTS[b][PROMPT_MASK[b] > 0]
    masked[b, lengths[b]:lengths[b] + N] = MASK
  attn = masked != PAD
  logits = np.asarray(model.apply({"params": params}, jnp.asarray(masked),
                                  attention_mask=jnp.asarray(attn)), np.float64)
  logits[..., [MASK, PAD]] = -np.inf
  steps = lengths[:, None] + np.arange(N)[None, :]
  want = softmax_entropy(np.take_along_axis(logits, steps[..., None], 1))
  m = np.asarray(out.gen_mask)
  np.testing.assert_allclose(np.asarray(out.entropies)[m], want[m], rtol=1e-5)
  final, _ = unpadded_rows(out.tokens, PROMPT_MASK)
  _, hidden = model.apply({"params": params}, jnp.asarray(final),
                          attention_mask=jnp.asarray(final != PAD), return_hidden=True)
  want_hid = np.take_along_axis(np.asarray(hidden), steps[..., None], 1)
  np.testing.assert_allclose(np.asarray(out.hidden)[m], want_hid[m], atol=1e-4)


def test_remask_counts_are_linear():
  assert sampling.remask_counts(10, 4) == [7, 5, 2, 0]
  assert sampling.remask_counts(6, 1) == [0]


# ----------------------------------------------------------------------------- prompts


def split_rows():
  """Row kinds: full (0, 1, 4, 5), EOS inside the prompt (2), padding (3), empty (6)."""
  tokens = np.array([
      [BOS, 10, 11, 12, 13, 14],
      [BOS, 20, 21, 22, 23, EOS],
      [BOS, 30, EOS, BOS, 31, 32],
      [BOS, 40, EOS, PAD, PAD, PAD],
      [50, 51, 52, 53, 54, 55],
      [60, 61, 62, 63, EOS, PAD],
      [EOS, BOS, 70, 71, 72, 73],
  ], np.int32)
  return tokens, (tokens != PAD).astype(np.int32)


def test_prompts_prefer_full_rows_and_are_left_padded():
  tokens, mask = split_rows()
  full = {0, 1, 4, 5}
  got = sampling.prompts_from_split(tokens, mask, prompt_len=4, num=6, seed=3, eos_id=EOS)
  assert set(got.rows[:4]) == full and set(got.rows[4:]) == {2, 3}
  for i, r in enumerate(got.rows):
    real = tokens[r, :4][(mask[r, :4] > 0) & (np.cumsum(tokens[r, :4] == EOS) == 0)]
    np.testing.assert_array_equal(got.tokens[i, 4 - len(real):], real)
    np.testing.assert_array_equal(got.tokens[i, :4 - len(real)], PAD)
    np.testing.assert_array_equal(got.mask[i], np.arange(4) >= 4 - len(real))
  again = sampling.prompts_from_split(tokens, mask, 4, 6, seed=3, eos_id=EOS)
  np.testing.assert_array_equal(again.rows, got.rows)
  orders = {tuple(sampling.prompts_from_split(tokens, mask, 4, 4, seed=s, eos_id=EOS).rows)
            for s in range(8)}
  assert len(orders) > 1 and all(set(o) == full for o in orders)
  # Row 6 is empty: asking for 7 gives the 6 usable rows; a split of empty rows is an error.
  assert len(sampling.prompts_from_split(tokens, mask, 4, 7, seed=0, eos_id=EOS).rows) == 6
  with pytest.raises(ValueError, match="non-empty"):
    sampling.prompts_from_split(tokens[6:], mask[6:], 4, 1, seed=0, eos_id=EOS)


# ------------------------------------------------------------ decoders: traced parameters


def test_decoders_share_one_compilation():
  """Greedy / temperature / top-k / top-p differ only in traced values: one compile."""
  jitted = sampling.generate.jitted
  before = jitted._cache_size()
  configs = [SamplingConfig(max_new_tokens=3, **kw) for kw in (
      dict(temperature=0.0), dict(), dict(top_k=40), dict(top_p=0.9))]
  outs = [gpt_run(sampling.generate, c, prompts=PROMPTS[:2], mask=PROMPT_MASK[:2]) for c in configs]
  assert jitted._cache_size() == before + 1
  assert len({np.asarray(o.tokens).tobytes() for o in outs}) > 1  # the values do reach the draw


def test_traced_top_k_and_top_p_keep_the_same_sets():
  probs = np.array([0.06, 0.5, 0.04, 0.3, 0.1])
  logits = jnp.broadcast_to(jnp.log(jnp.asarray(probs, jnp.float32)), (4000, 5))
  draw = jax.jit(sampling.sample_logits)
  cases = [((1.0, 0, 0.75), {1, 3}), ((1.0, 0, 0.85), {1, 3, 4}), ((1.0, 2, 1.0), {1, 3}),
           # top-p after top-k, on the renormalised top 3: 0.556, 0.333 | 0.111
           ((1.0, 3, 0.85), {1, 3}), ((1.0, 3, 0.9), {1, 3, 4}), ((0.0, 0, 1.0), {1}),
           ((1.0, 0, 1.0), {0, 1, 2, 3, 4})]
  for (t, k, p), want in cases:
    tok = np.asarray(draw(jax.random.key(3), logits, jnp.float32(t), jnp.int32(k), jnp.float32(p)))
    assert set(np.unique(tok)) == want, (t, k, p)


# ------------------------------------------------------ BERT left-to-right unmasking

L2R = SamplingConfig(max_new_tokens=N)


def l2r_run(config=L2R, params=None, seed=11, prompts=PROMPTS, mask=PROMPT_MASK):
  params = params_of(BERT) if params is None else params
  return sampling.unmask_left_to_right(get_model(BERT), params, jnp.asarray(prompts),
                                       jnp.asarray(mask), jax.random.key(seed), config,
                                       mask_id=MASK, eos_id=EOS, pad_id=PAD)


def test_unmask_keeps_prompts_and_is_reproducible():
  out = l2r_run()
  chex.assert_shape([out.tokens, out.gen_mask, out.entropies, out.hidden, out.lengths],
                    [(3, P + N), (3, N), (3, N), (3, N, D), (3,)])
  np.testing.assert_array_equal(out.tokens[:, :P], PROMPTS)
  chex.assert_trees_all_equal(out, l2r_run())
  assert not np.array_equal(out.tokens, l2r_run(seed=12).tokens)


@pytest.mark.parametrize("lookahead", [None, 2])
def test_unmask_greedy_matches_a_slot_by_slot_loop(lookahead):
  """Independent reference: per row, real prompt + sampled slots + [MASK]s, one forward
  per slot on an unpadded buffer; also the entropies and the final hidden states."""
  out = l2r_run(SamplingConfig(max_new_tokens=N, temperature=0.0, lookahead=lookahead))
  model, params = get_model(BERT), params_of(BERT)
  forward = jax.jit(lambda ids, attn: model.apply({"params": params}, ids, attention_mask=attn,
                                                  return_hidden=True))
  ahead = N if lookahead is None else lookahead
  for b in range(3):
    real = list(PROMPTS[b][PROMPT_MASK[b] > 0])
    gen, ents = [], []
    for i in range(N):
      seen = len(real) + min(i + 1 + ahead, N)
      ids = np.full((1, P + N), PAD, np.int32)
      ids[0, :seen] = real + gen + [MASK] * (seen - len(real) - i)
      logits = np.asarray(forward(jnp.asarray(ids), jnp.asarray(ids != PAD))[0], np.float64)
      row = logits[0, len(real) + i]
      row[[MASK, PAD]] = -np.inf
      gen.append(int(row.argmax()))
      ents.append(softmax_entropy(row))
      if gen[-1] == EOS:
        break
    k = len(gen)
    np.testing.assert_array_equal(out.tokens[b, P:P + k], gen)
    np.testing.assert_array_equal(out.tokens[b, P + k:], PAD)
    np.testing.assert_array_equal(out.gen_mask[b], np.arange(N) < k)
    np.testing.assert_allclose(np.asarray(out.entropies[b, :k]), ents, rtol=1e-5)
    final = np.full((1, P + N), PAD, np.int32)
    final[0, :len(real) + k] = real + gen
    _, hidden = forward(jnp.asarray(final), jnp.asarray(final != PAD))
    np.testing.assert_allclose(np.asarray(out.hidden[b, :k]),
                               np.asarray(hidden)[0, len(real):len(real) + k], atol=1e-4)


def test_unmask_outputs_a_forced_token_and_never_samples_mask_or_pad():
  out = l2r_run(params=bias_params(17))
  np.testing.assert_array_equal(out.tokens[:, P:], 17)
  np.testing.assert_array_equal(out.lengths, N)
  assert not np.asarray(out.has_eos).any()
  out = l2r_run(params=bias_params(MASK))  # the banned [MASK] would dominate
  gen = np.asarray(out.tokens[:, P:])[np.asarray(out.gen_mask)]
  assert gen.size and not np.isin(gen, [MASK, PAD]).any()


def test_unmask_eos_ends_the_text():
  out = l2r_run(params=bias_params(EOS))
  gen = np.asarray(out.tokens[:, P:])
  np.testing.assert_array_equal(gen[:, 0], EOS)
  np.testing.assert_array_equal(gen[:, 1:], PAD)
  np.testing.assert_array_equal(out.gen_mask, np.arange(N)[None, :].repeat(3, 0) == 0)
  np.testing.assert_array_equal(out.lengths, 0)
  assert np.asarray(out.has_eos).all()
  assert np.all(np.asarray(out.hidden)[:, 1:] == 0)
  assert np.all(np.asarray(out.entropies)[:, 1:] == 0)


# A model whose every prediction is one known distribution over 10 words: the MLM head's
# LayerNorm scale is 0, so the logits are the head's bias whatever the input.
KNOWN_P = np.array([0.3, 0.2, 0.15, 0.1, 0.08, 0.06, 0.05, 0.03, 0.02, 0.01])
KNOWN_WORDS = np.arange(4, 14)


@functools.cache
def known_params():
  params = jax.tree.map(lambda x: x, params_of(BERT))
  head = dict(params["mlm_head"])
  head["ln"] = {"scale": jnp.zeros_like(head["ln"]["scale"]),
                "bias": jnp.zeros_like(head["ln"]["bias"])}
  bias = np.full(V, -30.0, np.float32)  # EOS and the other words: never
  bias[KNOWN_WORDS] = np.log(KNOWN_P)
  bias[[MASK, PAD]] = 10.0  # banned: must never be drawn, however likely
  head["bias"] = jnp.asarray(bias)
  params["mlm_head"] = head
  return params


@functools.cache
def known_output(sampler, config):
  rows = 256
  prompts = np.random.default_rng(1).integers(4, V, (rows, P)).astype(np.int32)
  return sampler(get_model(BERT), known_params(), jnp.asarray(prompts),
                 jnp.ones((rows, P), jnp.int32), jax.random.key(5), config, mask_id=MASK,
                 eos_id=EOS, pad_id=PAD)


def known_frequencies(sampler, config):
  out = known_output(sampler, config)
  gen = np.asarray(out.tokens[:, P:])
  assert np.asarray(out.gen_mask).all()
  return np.array([(gen == w).mean() for w in KNOWN_WORDS]), gen.size


@pytest.mark.parametrize("decoder,want", [
    (dict(), KNOWN_P),
    (dict(top_k=3), np.r_[KNOWN_P[:3] / KNOWN_P[:3].sum(), np.zeros(7)]),
    (dict(top_p=0.6), np.r_[KNOWN_P[:3] / KNOWN_P[:3].sum(), np.zeros(7)]),
    (dict(temperature=0.0), np.r_[1.0, np.zeros(9)]),
], ids=["sample", "top_k", "nucleus", "greedy"])
def test_unmask_draws_the_model_marginals(decoder, want):
  freq, draws = known_frequencies(sampling.unmask_left_to_right,
                                  SamplingConfig(max_new_tokens=N, **decoder))
  se = np.sqrt(want * (1 - want) / draws)
  np.testing.assert_array_less(np.abs(freq - want), 4 * se + 1e-9)


def test_unmask_entropies_are_those_of_the_known_distribution():
  out = known_output(sampling.unmask_left_to_right, SamplingConfig(max_new_tokens=N))
  logits = np.full(V, -30.0)
  logits[KNOWN_WORDS] = np.log(KNOWN_P)
  logits[[MASK, PAD]] = -np.inf
  np.testing.assert_allclose(np.asarray(out.entropies), softmax_entropy(logits), rtol=1e-4)


def test_mask_predict_over_produces_the_frequent_tokens():
  """Why it is not the default: confidence re-masking keeps frequent draws and redraws
  rare ones, so even a model with fixed marginals comes out skewed."""
  freq, _ = known_frequencies(sampling.mask_predict, SamplingConfig(max_new_tokens=N))
  assert freq[0] > KNOWN_P[0] + 0.1
  assert freq[5:].sum() < 0.5 * KNOWN_P[5:].sum()
