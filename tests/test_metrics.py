"""Degeneration metrics (SPEC section 9) against hand / NumPy computations."""

from __future__ import annotations

import collections
import itertools
import math

import chex
import numpy as np
import pytest

from stabjax import metrics as M

# ---------------------------------------------------------------- words and frequencies


def test_words_lowercase_letter_apostrophe_runs():
  text = "Don't STOP-me now,\n3 times! 'Tis caf\u00e9 o'er"
  assert M.words(text) == ["don't", "stop", "me", "now", "times", "'tis", "caf", "o'er"]
  assert M.words("") == []
  assert M.words("-- 42 --") == []


def test_one_word_tokenizer_for_metrics_and_training_counts():
  # The training word counts (top-K words) and the metrics must split text identically.
  from stabjax.data import text_words
  assert text_words is M.words


def test_top_k_words_ties_alphabetical_and_short_counter():
  c = collections.Counter({"b": 2, "a": 2, "c": 3, "d": 1, "e": 2})
  assert M.top_k_words(c, 3) == ["c", "a", "b"]
  assert M.top_k_words(c, 4) == ["c", "a", "b", "e"]
  # Insertion order does not matter.
  c2 = collections.Counter(dict(reversed(list(c.items()))))
  assert M.top_k_words(c2, 3) == ["c", "a", "b"]
  assert M.top_k_words(c, 10) == ["c", "a", "b", "e", "d"]
  assert M.top_k_words(c, 0) == []


def test_high_freq_proportion():
  gen = ["the", "cat", "the", "a", "dog", "of"]
  assert M.high_freq_proportion(gen, ["the", "of", "a"]) == pytest.approx(4 / 6)
  assert M.high_freq_proportion(["the"] * 7, {"the"}) == 1.0
  assert M.high_freq_proportion(["zebra"], ["the"]) == 0.0
  assert math.isnan(M.high_freq_proportion([], ["the"]))


def test_unigram_entropy_hand_and_edges():
  h = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
  assert M.unigram_entropy(["a", "a", "b", "c"]) == pytest.approx(h, abs=1e-12)
  counts = collections.Counter({"a": 2, "b": 1, "c": 1})
  assert M.unigram_entropy(counts) == pytest.approx(h, abs=1e-12)
  assert M.unigram_entropy(["w"] * 9) == 0.0
  assert math.isnan(M.unigram_entropy([]))


def test_unigram_kl_smooths_only_the_training_side():
  gen = collections.Counter({"a": 3, "b": 1})
  train = collections.Counter({"a": 4, "c": 5})
  # P_gen = (3/4, 1/4) on {a, b}, unsmoothed. V = {a, b, c}, N_train = 9, s = 0.5:
  # P_train(a) = 4.5 / 10.5, P_train(b) = 0.5 / 10.5 (b is unseen in training).
  want = 0.75 * math.log(0.75 / (4.5 / 10.5)) + 0.25 * math.log(0.25 / (0.5 / 10.5))
  assert want == pytest.approx(0.8342689, abs=1e-7)
  assert M.unigram_kl(gen, train) == pytest.approx(want, abs=1e-12)
  from_words = M.unigram_kl(["a", "b", "a", "a"], ["c", "a", "c", "a", "c", "a", "c", "a", "c"])
  assert from_words == pytest.approx(want, abs=1e-12)
  # s = 1: denominators 9 + 3 = 12.
  want1 = 0.75 * math.log(0.75 / (5 / 12)) + 0.25 * math.log(0.25 / (1 / 12))
  assert M.unigram_kl(gen, train, smoothing=1.0) == pytest.approx(want1, abs=1e-12)
  # Zero counts are not words: they neither enter V nor the sum.
  assert M.unigram_kl({**gen, "z": 0}, {**train, "y": 0}) == pytest.approx(want, abs=1e-12)
  assert math.isnan(M.unigram_kl({}, train))
  with pytest.raises(ValueError):
    M.unigram_kl(gen, train, smoothing=0.0)


def test_unigram_kl_moves_with_the_generations():
  # A training corpus with count(w_r) = round(10000 / r) over 200 words.
  names = [a + b for a in "abcdefghij" for b in "abcdefghijklmnopqrst"]
  train = collections.Counter({w: round(10000 / r) for r, w in enumerate(names, 1)})
  p = np.array([train[w] for w in names], np.float64)
  p /= p.sum()
  # Distributed exactly like training: only the smoothing (s |V| = 100 of ~59k) is left.
  assert M.unigram_kl(train, train) == pytest.approx(0.0, abs=1e-4)
  assert M.unigram_kl({w: 3 * c for w, c in train.items()}, train) == pytest.approx(0.0, abs=1e-4)
  # Collapsed onto the most frequent word: KL = -log P_train(w_1) (smoothing aside).
  collapsed = M.unigram_kl([names[0]] * 1000, train)
  assert collapsed == pytest.approx(-math.log(p[0]), abs=0.01)
  assert collapsed == pytest.approx(1.7711, abs=0.01)
  # 1000 words sampled from the training distribution: a small finite-sample KL
  # (0.100-0.119 over seeds 0-4), far below the collapsed one; four words each 250 times
  # lie between.
  sampled = M.unigram_kl(list(np.random.default_rng(0).choice(names, size=1000, p=p)), train)
  four = M.unigram_kl(names[:4] * 250, train)
  assert 0.05 < sampled < 0.2 < 1.0 < four < collapsed


# ---------------------------------------------------------------- Zipf


def test_zipf_exact_power_law_recovers_exponent():
  # count(r) = round(C / r^s): the fit recovers s up to the rounding (< 1e-3 here).
  for s in (0.8, 1.0, 1.3):
    counts = {f"w{r}": round(1e7 / r**s) for r in range(1, 201)}
    assert M.zipf_coefficient(counts) == pytest.approx(s, abs=1e-3)


def test_zipf_sampled_zipf_text_within_tolerance():
  # 200k words drawn from p(r) ~ r^-1.1 over 1000 ranks, fit over the top 100 ranks (counts
  # >= ~230). Over seeds 0-19 the estimate lay within 0.008 of 1.1; tolerance 0.02.
  rng = np.random.default_rng(0)
  r = np.arange(1, 1001)
  p = r**-1.1 / np.sum(r**-1.1)
  draws = rng.choice(r, size=200_000, p=p)
  values, freq = np.unique(draws, return_counts=True)
  counts = collections.Counter({f"w{k}": int(c) for k, c in zip(values, freq)})
  assert M.zipf_coefficient(counts, top=100) == pytest.approx(1.1, abs=0.02)


def test_zipf_ties_top_truncation_and_edges():
  # Counts [8, 4, 4, 1]: ordinal ranks 1..4 whatever the tied words are called.
  x, y = np.log([1, 2, 3, 4]), np.log([8, 4, 4, 1])
  want = -np.polyfit(x, y, 1)[0]
  a = M.zipf_coefficient(["p"] * 8 + ["q"] * 4 + ["r"] * 4 + ["s"])
  b = M.zipf_coefficient(["p"] * 8 + ["z"] * 4 + ["a"] * 4 + ["s"])
  assert a == pytest.approx(want, abs=1e-12) and b == a
  # A tail far below the power law changes the fit only if it is inside `top`.
  counts = {f"w{r}": 1000 // r for r in range(1, 11)} | {f"t{r}": 1 for r in range(50)}
  head = [1000 // r for r in range(1, 11)]
  want_head = -np.polyfit(np.log(np.arange(1, 11)), np.log(head), 1)[0]
  assert M.zipf_coefficient(counts, top=10) == pytest.approx(want_head, abs=1e-12)
  assert M.zipf_coefficient(counts, top=60) > M.zipf_coefficient(counts, top=10) + 0.3
  assert math.isnan(M.zipf_coefficient(["w"] * 5))
  assert math.isnan(M.zipf_coefficient([]))


# ---------------------------------------------------------------- repetition and diversity


def test_seq_rep_n_hand_values():
  gens = [[1, 1, 1, 1], [1, 2, 3], [5, 6, 5, 6, 5]]
  # n=1: 1-1/4, 0, 1-2/5.  n=2: 1-1/3, 0, 1-2/4.
  assert M.seq_rep_n(gens, 1) == pytest.approx(np.mean([0.75, 0.0, 0.6]))
  assert M.seq_rep_n(gens, 2) == pytest.approx(np.mean([2 / 3, 0.0, 0.5]))
  # Generations with no n-gram are left out, not counted as 0.
  assert M.seq_rep_n(gens + [[], [7]], 2) == M.seq_rep_n(gens, 2)
  assert M.seq_rep_n([["a", "b", "a"]], 1) == pytest.approx(1 / 3)  # one generation
  assert math.isnan(M.seq_rep_n([[], [1]], 2))
  assert math.isnan(M.seq_rep_n([], 1))


def test_distinct_n_pooled_hand_values():
  gens = [["a", "b", "a"], ["a", "b"], []]
  assert M.distinct_n(gens, 1) == pytest.approx(2 / 5)
  # Bigrams: (a,b), (b,a), (a,b) -> 2 distinct / 3.
  assert M.distinct_n(gens, 2) == pytest.approx(2 / 3)
  assert M.distinct_n([["w"] * 10], 1) == pytest.approx(1 / 10)
  assert math.isnan(M.distinct_n(gens, 4))
  assert math.isnan(M.distinct_n([], 1))


@pytest.mark.parametrize("seq, want", [
    (list("xyzxyz"), (3, 2)),
    (list("qqxyzxyzxyz"), (3, 3)),
    (list("a") * 10, None),            # one-token run, 10 <= 50 copies
    (list("a") * 51, (1, 51)),         # a very long run of a single token
    (list("ab") * 30, None),           # two-token phrase, 30 <= 50 copies
    (list("ab") * 51, (2, 51)),
    (list("xaaxaa"), (3, 2)),          # Holtzman's script says no here (see docstring)
    (list("xyzw"), None),
    (list("abcabcd"), None),           # the loop must reach the end
    ([], None),
    (list("abcdabcd"), (4, 2)),
])
def test_trailing_loop_cases(seq, want):
  assert M.trailing_loop(seq) == want


def test_trailing_loop_phrase_limit_and_primitive():
  seq = list(range(5)) * 2
  assert M.trailing_loop(seq, max_phrase_len=4) is None
  assert M.trailing_loop(seq, max_phrase_len=5) == (5, 2)
  # "abab abab": the 4-gram is not primitive; "ab" (2 items) is too short for 4 copies.
  assert M.trailing_loop(list("abababab")) is None
  assert M.trailing_loop(list("abababab"), min_phrase_len=2) == (2, 4)


def test_repetition_share():
  gens = [list("xyzxyz"), list("hello"), list("a") * 60, []]
  assert M.repetition_share(gens) == pytest.approx(2 / 4)
  assert M.repetition_share([list("hello")]) == 0.0
  assert math.isnan(M.repetition_share([]))


# ---------------------------------------------------------------- generation process


def _np_entropy(logits):
  z = logits.astype(np.float64)
  z = z - z.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  p = np.exp(logp)
  return -np.sum(np.where(p > 0, p * np.where(p > 0, logp, 0), 0), -1)


def test_predictive_entropy_matches_numpy_and_is_stable():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(3, 4, 11)).astype(np.float32) * 3
  got = np.asarray(M.predictive_entropy(logits))
  chex.assert_shape(got, (3, 4))
  np.testing.assert_allclose(got, _np_entropy(logits), atol=1e-5)
  # Shifted by 1e4 (a naive exp overflows): compared on the same float32 input.
  big = logits + np.float32(1e4)
  np.testing.assert_allclose(np.asarray(M.predictive_entropy(big)), _np_entropy(big), atol=1e-4)
  uniform = float(M.predictive_entropy(np.zeros(7, np.float32)))
  assert uniform == pytest.approx(math.log(7), abs=1e-6)
  # Top-k style -inf logits contribute 0: the entropy of the 3 kept tokens.
  truncated = np.array([0.0, 0.0, 0.0, -np.inf, -np.inf], np.float32)
  assert float(M.predictive_entropy(truncated)) == pytest.approx(math.log(3), abs=1e-6)


def test_generative_entropy_mask_and_lengths():
  ent = np.array([[1.0, 2.0, 9.0], [3.0, 9.0, 9.0], [9.0, 9.0, 9.0]])
  lengths = np.array([2, 1, 0])
  mask = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
  assert M.generative_entropy(ent, lengths=lengths) == pytest.approx(2.0)  # (1+2+3)/3
  assert M.generative_entropy(ent, mask=mask) == pytest.approx(2.0)
  assert M.generative_entropy(ent, mask=np.ones_like(ent)) == pytest.approx(ent.mean())
  assert math.isnan(M.generative_entropy(ent, lengths=np.zeros(3)))
  with pytest.raises(ValueError):
    M.generative_entropy(ent)


def test_effective_rank_rank_one_and_orthogonal():
  rng = np.random.default_rng(2)
  u, v = rng.normal(size=(20, 1)), rng.normal(size=(1, 6))
  assert M.effective_rank(u @ v) == pytest.approx(1.0, abs=1e-6)
  # Columns orthonormal, all singular values equal -> d.
  q, _ = np.linalg.qr(rng.normal(size=(20, 6)))
  assert M.effective_rank(3.0 * q) == pytest.approx(6.0, abs=1e-9)
  assert M.effective_rank(np.eye(4)) == pytest.approx(4.0, abs=1e-12)
  # Hand value for singular values (4, 2, 1, 1): U diag(s) V^T with random orthogonal U, V.
  s = np.array([4.0, 2.0, 1.0, 1.0])
  p = s / s.sum()
  want = math.exp(-np.sum(p * np.log(p)))
  vt, _ = np.linalg.qr(rng.normal(size=(4, 4)))
  assert M.effective_rank(q[:, :4] @ np.diag(s) @ vt.T) == pytest.approx(want, abs=1e-9)
  assert M.effective_rank(np.zeros((5, 3))) == 0.0


def test_effective_rank_centering_and_mask():
  rng = np.random.default_rng(3)
  a = rng.normal(size=(30, 5))
  a -= a.mean(0)
  shifted = a + 10.0 * rng.normal(size=(1, 5))
  assert M.effective_rank(shifted, center=True) == pytest.approx(M.effective_rank(a), abs=1e-9)
  # Without centring the shared mean direction dominates.
  assert M.effective_rank(shifted) < M.effective_rank(a) - 0.5
  # States that all collapse onto one vector: rank 1 uncentred, zero matrix centred.
  same = np.tile(rng.normal(size=(1, 5)), (8, 1))
  assert M.effective_rank(same) == pytest.approx(1.0, abs=1e-9)
  # Centring leaves only rounding noise (~1e-17), which must not be read as rank.
  assert M.effective_rank(same, center=True) == 0.0
  assert M.effective_rank(same + 1e-3 * rng.normal(size=same.shape), center=True) > 2.0
  # [n, T, d] with a mask equals the selected rows stacked.
  h = rng.normal(size=(2, 4, 5))
  mask = np.array([[1, 1, 0, 0], [1, 1, 1, 0]], bool)
  assert M.effective_rank(h, mask=mask) == pytest.approx(M.effective_rank(h[mask]), abs=1e-12)
  assert math.isnan(M.effective_rank(h, mask=np.zeros((2, 4), bool)))


def test_length_stats_eos_prompt_and_histogram():
  eos = 2
  tokens = np.array([
      [5, 5, 7, 2, 0, 0],   # EOS at 3: 1 generated token after a 2-token prompt
      [5, 2, 7, 7, 7, 7],   # EOS inside the prompt is ignored; no EOS after: 4
      [5, 5, 2, 0, 0, 0],   # first generated token is EOS: 0
      [5, 5, 7, 7, 7, 2],   # 3
  ])
  lengths, has_eos = M.generation_lengths(tokens, eos, start=2)
  np.testing.assert_array_equal(lengths, [1, 4, 0, 3])
  np.testing.assert_array_equal(has_eos, [True, False, True, True])
  st = M.length_stats(tokens, eos, start=2, num_bins=4)
  assert st["mean"] == pytest.approx(2.0)
  assert st["std"] == pytest.approx(np.std([1, 4, 0, 3]))
  assert st["no_eos_share"] == pytest.approx(0.25)
  assert st["max_len"] == 4
  assert st["bin_edges"] == [0.0, 1.0, 2.0, 3.0, 4.0]
  assert st["histogram"] == [1, 1, 0, 2]  # [0,1) [1,2) [2,3) [3,4]
  # Per-row prompt lengths.
  lengths, _ = M.generation_lengths(tokens, eos, start=[1, 2, 0, 5])
  np.testing.assert_array_equal(lengths, [2, 4, 2, 0])


def test_length_stats_no_eos_and_empty():
  st = M.length_stats(np.full((3, 5), 7), eos_id=2, num_bins=5)
  assert st["mean"] == 5.0 and st["std"] == 0.0 and st["no_eos_share"] == 1.0
  assert st["histogram"] == [0, 0, 0, 0, 3]  # the last bin is closed
  st = M.length_stats(np.zeros((0, 5), np.int32), eos_id=2, num_bins=5)
  assert math.isnan(st["mean"]) and math.isnan(st["no_eos_share"])
  assert st["histogram"] == [0] * 5


def test_perplexity():
  assert M.perplexity(2.0 * 10, 10) == pytest.approx(math.exp(2.0))
  assert M.perplexity(0.0, 3) == 1.0
  assert math.isnan(M.perplexity(5.0, 0))
  assert M.perplexity(1e6, 1) == math.inf


# ---------------------------------------------------------------- across runs


def test_cross_seed_summary():
  runs = [{"hf": 0.2, "zipf": 1.0, "name": "a", "hist": [1, 2], "only": 3.0, "flag": True},
          {"hf": 0.4, "zipf": np.float32(1.5), "name": "b", "hist": [0, 1], "flag": False},
          {"hf": 0.9, "zipf": 2.0, "name": "c", "hist": [], "flag": True}]
  got = M.cross_seed_summary(runs)
  assert set(got) == {"hf", "zipf"}
  assert got["hf"] == pytest.approx((0.5, np.std([0.2, 0.4, 0.9], ddof=1)))
  assert got["zipf"] == pytest.approx((1.5, 0.5))
  assert M.cross_seed_summary(runs, ddof=0)["zipf"][1] == pytest.approx(np.std([1, 1.5, 2]))
  one = M.cross_seed_summary(runs[:1])
  assert one["hf"][0] == 0.2 and math.isnan(one["hf"][1])
  assert math.isnan(M.cross_seed_summary([{"x": 1.0}, {"x": math.nan}])["x"][0])
  assert M.cross_seed_summary([]) == {}


def test_top_word_overlap_jaccard():
  a = ["x"] * 3 + ["y"] * 2 + ["z"]
  b = ["x"] * 5 + ["w"] * 4 + ["y"]
  c = ["q"] * 2
  # top-2: {x, y}, {x, w}, {q}: J = 1/3, 0, 0.
  assert M.top_word_overlap([a, b, c], k=2) == pytest.approx(np.mean([1 / 3, 0, 0]))
  assert M.top_word_overlap([a, a], k=2) == 1.0
  assert M.top_word_overlap([[], []], k=2) == 1.0
  assert math.isnan(M.top_word_overlap([a], k=2))
  # Ties in the top-k are broken alphabetically, so equal counts give equal sets.
  assert M.top_word_overlap([["b", "a", "c"], ["c", "a", "b"]], k=2) == 1.0


def test_convergence_step():
  steps = [0, 100, 200, 300, 400]
  hf = [0.3, 0.6, 1.0, 0.99, 1.0]
  assert M.convergence_step(steps, hf, 1.0, mode="above") == 200
  assert M.convergence_step(steps, hf, 0.6, mode="above") == 100
  loss = [5.0, math.nan, 3.0, 2.0, 1.0]
  assert M.convergence_step(steps, loss, 2.0) == 300
  assert M.convergence_step(steps, loss, 0.5) is None
  assert M.convergence_step([], [], 0.5) is None
  with pytest.raises(ValueError):
    M.convergence_step(steps, hf, 1.0, mode="up")


# ---------------------------------------------------------------- synthetic language


def _toy_model(rng):
  """A model over all sequences of 1-2 words from {4, 5, 6}, as BOS w.. EOS token rows."""
  space = [s for L in (1, 2) for s in itertools.product((4, 5, 6), repeat=L)]
  logits = rng.normal(size=len(space)) * 2
  logp = logits - np.log(np.exp(logits).sum())
  return space, logp


def test_lemma_4_2_identity_on_constructed_example():
  rng = np.random.default_rng(4)
  space, logp = _toy_model(rng)
  model = dict(zip(space, logp))
  # n = 10 training sequences with repeats.
  train = [(4,), (4,), (4, 5), (6,), (4,), (4, 5), (6, 6), (4,), (5, 4), (6,)]
  uniq = list(dict.fromkeys(train))
  counts = np.array([train.count(s) for s in uniq])
  p_emp = counts / counts.sum()
  model_logp = np.array([model[s] for s in uniq])
  mean_nll = float(np.mean([-model[s] for s in train]))  # over the 10 with repeats
  kl = M.forward_kl(p_emp, model_logp)
  h = M.empirical_entropy(p_emp)
  assert M.mle_loss(p_emp, model_logp) == pytest.approx(mean_nll, abs=1e-12)
  assert abs(mean_nll - (kl + h)) < 1e-6
  # Independent values: H from the counts, KL by its definition.
  q = counts / 10
  assert h == pytest.approx(-np.sum(q * np.log(q)), abs=1e-12)
  want_kl = sum(pi * math.log(pi / math.exp(li)) for pi, li in zip(q, model_logp))
  assert kl == pytest.approx(want_kl, abs=1e-12)
  assert kl > 0
  # The model equal to P_emp: KL 0, all mass on the support, loss = H(P_emp).
  assert M.forward_kl(p_emp, np.log(p_emp)) == pytest.approx(0.0, abs=1e-12)
  assert M.support_mass(np.log(p_emp)) == pytest.approx(1.0, abs=1e-12)
  want_mass = sum(math.exp(model[s]) for s in uniq)
  assert M.support_mass(model_logp) == pytest.approx(want_mass, abs=1e-12)
  # The summary dict holds the same values, checked against the independent ones above
  # (not against its own entries: mle_loss = forward_kl + entropy holds by construction).
  out = M.synthetic_metrics(p_emp, model_logp)
  assert out["mle_loss"] == pytest.approx(mean_nll, abs=1e-12)
  assert out["forward_kl"] == pytest.approx(want_kl, abs=1e-12)
  assert out["empirical_entropy"] == pytest.approx(-np.sum(q * np.log(q)), abs=1e-12)
  assert out["support_mass"] == pytest.approx(want_mass, abs=1e-12)
  assert "model_entropy" not in out


def test_forward_kl_edges():
  p = np.array([0.5, 0.5, 0.0])
  assert M.forward_kl(p, [-math.log(2), -math.inf, -math.inf]) == math.inf
  # A zero-probability support entry contributes 0 even where the model gives 0.
  assert M.forward_kl(p, [-math.log(2), -math.log(2), -math.inf]) == pytest.approx(0.0, abs=1e-15)
  with pytest.raises(ValueError):
    M.forward_kl([0.5, 0.2], [0.0, 0.0])


def test_model_entropy_mc_estimate_and_stderr():
  rng = np.random.default_rng(5)
  space, logp = _toy_model(rng)
  exact = -np.sum(np.exp(logp) * logp)
  idx = rng.choice(len(space), size=4000, p=np.exp(logp))
  mean, se = M.model_entropy_mc(logp[idx])
  assert se == pytest.approx(np.std(-logp[idx], ddof=1) / math.sqrt(4000), rel=1e-12)
  assert abs(mean - exact) < 4 * se  # a 4-sigma statistical tolerance, fixed seed
  m1, s1 = M.model_entropy_mc([-2.0])
  assert m1 == 2.0 and math.isnan(s1)


def _np_sequence_logprob(logits, tokens, mask):
  z = logits.astype(np.float64)
  z = z - z.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  n, t = tokens.shape
  out = np.zeros(n)
  for i in range(n):
    for j in range(1, t):
      if mask[i, j]:
        out[i] += logp[i, j - 1, tokens[i, j]]
  return out


def test_sequence_logprob_matches_numpy_and_is_stable():
  rng = np.random.default_rng(6)
  n, t, v = 3, 5, 9
  logits = rng.normal(size=(n, t, v)).astype(np.float32)
  tokens = rng.integers(0, v, size=(n, t))
  mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
  got = np.asarray(M.sequence_logprob(logits, tokens, mask))
  chex.assert_shape(got, (n,))
  want = _np_sequence_logprob(logits, tokens, mask)
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert got[2] == 0.0  # BOS only: nothing scored
  # Shifted by 1e4 (a naive exp overflows): compared on the same float32 input.
  big = logits + np.float32(1e4)
  np.testing.assert_allclose(np.asarray(M.sequence_logprob(big, tokens, mask)),
                             _np_sequence_logprob(big, tokens, mask), atol=1e-4)
  # Logits beyond the mask, and at the last position, do not matter.
  changed = logits.copy()
  changed[0, 2:] = 100.0
  changed[:, -1] = -100.0
  got_changed = np.asarray(M.sequence_logprob(changed, tokens, mask))
  np.testing.assert_allclose(got_changed[0], want[0], atol=1e-5)
  # A padding target the model rules out (-inf) stays out of the sum instead of giving nan.
  ruled_out = logits.copy()
  ruled_out[0, 2, tokens[0, 3]] = -np.inf
  got_ruled = np.asarray(M.sequence_logprob(ruled_out, tokens, mask))
  np.testing.assert_allclose(got_ruled[0], want[0], atol=1e-5)


def test_sequence_logprob_sums_to_one_over_a_toy_space():
  # A context-free model (same next-token distribution everywhere) over {w, EOS} with the
  # length cap at 2 words: P(w EOS) + P(w w EOS) + P(EOS) over padded rows, the capped
  # row scored without its EOS (the cap ends it), sums to 1.
  bos, eos, w, pad = 0, 1, 2, 3
  dist = np.log(np.array([1e-9, 0.3, 0.7, 1e-9]))
  logits = np.tile(dist, (3, 3, 1)).astype(np.float32)
  tokens = np.array([[bos, eos, pad], [bos, w, eos], [bos, w, w]])
  mask = np.array([[1, 1, 0], [1, 1, 1], [1, 1, 1]])
  lp = np.asarray(M.sequence_logprob(logits, tokens, mask))
  np.testing.assert_allclose(np.exp(lp), [0.3, 0.7 * 0.3, 0.7 * 0.7], rtol=1e-5)
  assert M.support_mass(lp) == pytest.approx(1.0, abs=1e-5)


# ---------------------------------------------------------------- run summary


def test_summarize_text_metrics_matches_components():
  train = collections.Counter(M.words("the cat sat on the mat the end of the day of days"))
  gen_texts = ["The the the the.", "Cat on the mat, the end!", ""]
  gen_tokens = [[9, 9, 9, 9], [1, 2, 3, 1, 2, 3], []]
  ref = ["The dog of the day.", "A cat!"]
  out = M.summarize_text_metrics(gen_texts, gen_tokens, train, ref, k=2, ngram_orders=(1, 2),
                                 hf_ks=(1, 3))
  top = M.top_k_words(train, 3)
  assert top == ["the", "of", "cat"]  # the: 4, of: 2, then the 1-count words alphabetically
  gw = ["the"] * 4 + ["cat", "on", "the", "mat", "the", "end"]
  assert out["hf_proportion"] == pytest.approx(6 / 10)
  assert out["hf_proportion_reference"] == pytest.approx(3 / 7)  # the, of, the / 7 words
  assert out["hf_proportion_k1"] == pytest.approx(6 / 10)
  assert out["hf_proportion_k3"] == pytest.approx(7 / 10)
  assert out["hf_proportion_k1_reference"] == pytest.approx(2 / 7)
  assert out["hf_proportion_k3_reference"] == pytest.approx(4 / 7)
  assert "hf_proportion_k2" not in out and "hf_proportion_k20" not in out
  assert out["num_words"] == 10 and out["num_generations"] == 3
  assert out["unigram_entropy"] == pytest.approx(M.unigram_entropy(gw))
  assert out["unigram_kl"] == pytest.approx(M.unigram_kl(collections.Counter(gw), train))
  assert out["zipf"] == pytest.approx(M.zipf_coefficient(gw))
  assert out["distinct_2"] == pytest.approx(M.distinct_n([gw[:4], gw[4:]], 2))
  assert out["seq_rep_1"] == pytest.approx(np.mean([0.75, 0.5]))
  assert out["repetition_share"] == pytest.approx(1 / 3)
  # 7 reference words < 10 generated: the whole reference, as its documents, once.
  assert out["num_words_reference"] == 7
  assert out["distinct_1_reference"] == pytest.approx(6 / 7)
  assert out["distinct_2_reference"] == pytest.approx(5 / 5)  # 4 + 1 bigrams, all distinct
  assert all(isinstance(v, float) for v in out.values())
  no_tokens = M.summarize_text_metrics(gen_texts, None, train, None, k=2)
  assert "seq_rep_1" not in no_tokens and "hf_proportion_reference" not in no_tokens
  assert no_tokens["hf_proportion"] == out["hf_proportion"]
  # Default Ks 10, 20, 50, 100: all exceed the 9 training words, so every generated word
  # counts; "dog" and "a" of the reference are not training words.
  default = M.summarize_text_metrics(gen_texts, None, train, ref)
  for kk in (10, 20, 50, 100):
    assert default[f"hf_proportion_k{kk}"] == 1.0
    assert default[f"hf_proportion_k{kk}_reference"] == pytest.approx(5 / 7)
  assert default["hf_proportion"] == default["hf_proportion_k20"]


def test_summarize_reference_windows_stay_inside_documents():
  # 40 reference documents, document i = its own word five times. Four generations of 5
  # words: each pseudo-generation must be one whole document, so the reference side is
  # 4 words x 5 whatever the subsample. A window across two documents would mix two
  # words and raise distinct-1 above 4/20.
  names = [a + b for a in "abcd" for b in "abcdefghij"]
  ref = [" ".join([w] * 5) for w in names]
  train = collections.Counter(w for t in ref for w in M.words(t))  # each word 5 times
  gens = ["one two three four five"] * 3 + ["six seven eight nine ten"]
  out = M.summarize_text_metrics(gens, None, train, ref, ngram_orders=(1, 2, 3))
  assert out["num_words_reference"] == 20 == out["num_words"]
  assert out["distinct_1_reference"] == pytest.approx(4 / 20, abs=1e-12)
  assert out["distinct_2_reference"] == pytest.approx(4 / 16, abs=1e-12)
  assert out["distinct_3_reference"] == pytest.approx(4 / 12, abs=1e-12)
  assert out["unigram_entropy_reference"] == pytest.approx(math.log(4), abs=1e-12)
  assert out["zipf_reference"] == pytest.approx(0.0, abs=1e-12)  # four equal counts
  # P_ref = 1/4 on four words; P_train = (5 + 0.5) / (200 + 0.5 * 40) = 0.025 each.
  assert out["unigram_kl_reference"] == pytest.approx(math.log(0.25 / 0.025), abs=1e-12)
  # The high-frequency proportion still uses all 200 reference words: the top 20 of 40
  # equally frequent training words are the first 20 names (ties alphabetical), 100 words.
  assert out["hf_proportion_reference"] == pytest.approx(100 / 200)


def test_summarize_reference_equal_to_generations_gives_equal_values():
  # Reference = the generations (shuffled): as many words, and documents of exactly the
  # generations' lengths, so every cut is the generations themselves and each size-matched
  # reference metric must equal the generated one.
  train = collections.Counter(M.words("the cat sat on the mat and the dog sat on the log"))
  gens = ["the cat sat on the mat", "a dog a dog a dog a", "of the day", "",
          "the end of the story it was the end", "cat"]
  ref = [gens[i] for i in (4, 2, 0, 5, 3, 1)]
  out = M.summarize_text_metrics(gens, None, train, ref, k=3, seed=7)
  assert out["num_words_reference"] == out["num_words"] == 26
  for key in ("unigram_entropy", "unigram_kl", "zipf", "distinct_1", "distinct_2",
              "distinct_3", "distinct_4", "hf_proportion", "hf_proportion_k10"):
    assert out[f"{key}_reference"] == pytest.approx(out[key], abs=1e-12), key


def _letter_names(n):
  return ["".join(t) for t in itertools.product("abcdefghijklmnopqrstuvwxyz", repeat=3)][:n]


def test_summarize_reference_is_size_matched_and_seeded():
  # Generations and reference drawn i.i.d. from the same Zipf(1.1) law over 2000 words:
  # 64 x 17 = 1088 generated words, 1000 x 20 = 20000 reference words. The size-matched
  # reference values agree with the generated ones; computed on all 20000 reference words
  # they would not (more types per word seen, fewer distinct per total). Over seeds 0-7
  # the |generated - reference| gaps stayed under 0.026 (distinct-1), 0.04 (distinct-2),
  # 0.015 (KL), 0.04 (Zipf); the full-reference gaps were over 0.2, 0.25, 0.45, 0.3.
  names = _letter_names(2000)
  p = np.arange(1, 2001, dtype=np.float64)**-1.1
  p /= p.sum()
  train = collections.Counter({w: round(1e6 * pi) for w, pi in zip(names, p)})
  rng = np.random.default_rng(0)
  texts = lambda n, length: [" ".join(rng.choice(names, size=length, p=p)) for _ in range(n)]
  gens, ref = texts(64, 17), texts(1000, 20)
  out = M.summarize_text_metrics(gens, None, train, ref)
  assert out["num_words_reference"] == out["num_words"] == 1088
  ref_words = [t.split() for t in ref]
  flat = [w for ws in ref_words for w in ws]
  full = {"distinct_1": len(set(flat)) / len(flat),
          "distinct_2": len({g for ws in ref_words for g in zip(ws, ws[1:])}) / (19 * 1000),
          "unigram_kl": M.unigram_kl(flat, train), "zipf": M.zipf_coefficient(flat)}
  for key, tol in (("distinct_1", 0.05), ("distinct_2", 0.06), ("unigram_kl", 0.05),
                   ("zipf", 0.08)):
    assert out[f"{key}_reference"] == pytest.approx(out[key], abs=tol), key
    assert abs(full[key] - out[key]) > 3 * tol, key
  # Deterministic for a seed; another seed or number of subsamples gives other cuts.
  again = M.summarize_text_metrics(gens, None, train, ref)
  assert again == out
  other = M.summarize_text_metrics(gens, None, train, ref, seed=1)
  one = M.summarize_text_metrics(gens, None, train, ref, num_subsamples=1)
  for d in (other, one):
    assert d["distinct_1_reference"] != out["distinct_1_reference"]
    assert d["hf_proportion_reference"] == out["hf_proportion_reference"]  # all words
  with pytest.raises(ValueError):
    M.summarize_text_metrics(gens, None, train, ref, num_subsamples=0)


# ------------------------------------------------------------------ across runs (aggregate)


def test_seed_aggregate_matches_numpy():
  from stabjax.metrics.aggregate import group_by, seed_aggregate
  recs = [{"model": "m", "alpha": a, "seed": s, "hf": v, "ent": 10 * v}
          for a, vals in ((0.0, [0.2, 0.3, 0.4]), (0.2, [0.9, 1.0, 1.0]))
          for s, v in zip((1, 2, 3), vals)]
  assert [k for k in group_by(recs[::-1], ["alpha"])] == [(0.2,), (0.0,)]
  out = seed_aggregate(recs, ["model", "alpha"], ["hf", "ent", "missing"])
  assert [(g["model"], g["alpha"], g["n"]) for g in out] == [("m", 0.0, 3), ("m", 0.2, 3)]
  for g, vals in zip(out, ([0.2, 0.3, 0.4], [0.9, 1.0, 1.0])):
    np.testing.assert_allclose(g["hf"], (np.mean(vals), np.std(vals, ddof=1)), rtol=1e-12)
    np.testing.assert_allclose(g["ent"], (10 * np.mean(vals), 10 * np.std(vals, ddof=1)),
                               rtol=1e-12)
    assert "missing" not in g
  # A metric that is None in one seed is left out rather than averaged over fewer seeds.
  recs[0]["hf"] = None
  assert "hf" not in seed_aggregate(recs, ["model", "alpha"], ["hf"])[0]


def test_convergence_steps_common_threshold():
  from stabjax.metrics.aggregate import convergence_steps
  hist = {
      "full": [{"step": s, "loss": v} for s, v in zip((10, 20, 30, 40, 50), (5, 3, 2, 2, 2))],
      "nodtu": [{"step": s, "loss": v} for s, v in zip((10, 20, 30, 40, 50), (5, 4, 3, 2.5, 2.5))],
      "eval_rows_only": [{"step": 10, "val_loss": 1.0}, {"step": 10, "loss": 9}],
  }
  thr, steps = convergence_steps({k: hist[k] for k in ("full", "nodtu")}, tail=3)
  assert thr == pytest.approx((3 + 2.5 + 2.5) / 3)
  assert steps == {"full": 30, "nodtu": 40}
  thr, steps = convergence_steps(hist, tail=1)
  assert thr == 9 and steps == {"full": 10, "nodtu": 10, "eval_rows_only": 10}


def test_split_slopes_piecewise_linear():
  from stabjax.metrics.aggregate import split_slopes
  # Entropy falls 2 nats per nat of loss above loss 3 and 0.5 below: the paper's Figure 3.
  loss = np.linspace(6.0, 0.0, 61)
  ent = np.where(loss >= 3.0, 4.0 + 2.0 * (loss - 3.0), 4.0 + 0.5 * (loss - 3.0))
  out = split_slopes(loss, ent)
  assert out["median_loss"] == pytest.approx(3.0)
  assert out["slope_high_loss"] == pytest.approx(2.0, abs=1e-9)
  assert out["slope_low_loss"] == pytest.approx(0.5, abs=1e-9)
  assert math.isnan(split_slopes([1.0, 1.0], [2.0, 3.0])["slope_low_loss"])


def test_plateau_step_on_hand_made_series():
  from stabjax.metrics.aggregate import plateau_step
  steps = [5, 10, 15, 20, 25, 30, 35, 40, 45, 50]
  # Rises and settles at 1.0 from step 25: tail = last 3 (max(3, ceil(0.2 * 10)) = 3).
  level, step = plateau_step(steps, [0.2, 0.5, 0.8, 0.95, 1.0, 1.0, 0.99, 1.0, 1.0, 1.0])
  assert level == pytest.approx(1.0) and step == 25
  # Touches the band at step 20, dips out at 30, settles again from 35: the later step.
  level, step = plateau_step(steps, [0.2, 0.5, 0.8, 0.99, 1.0, 0.9, 1.0, 0.985, 1.0, 1.0])
  assert level == pytest.approx(0.995) and step == 35
  # The band is absolute and inclusive: 0.98 is within 0.02 of 1.0, 0.975 is not.
  assert plateau_step(steps, [0.5] * 5 + [0.98, 1.0, 1.0, 1.0, 1.0])[1] == 30
  assert plateau_step(steps, [0.5] * 5 + [0.975, 1.0, 1.0, 1.0, 1.0])[1] == 35
  assert plateau_step(steps, [0.5] * 5 + [0.975, 1.0, 1.0, 1.0, 1.0], tol=0.03)[1] == 30
  # The tail is ceil(tail_frac * n) long when that exceeds 3: 20 points, tail_frac 0.25 -> 5.
  vals = [0.0] * 15 + [0.5, 0.5, 0.5, 0.6, 0.6]
  level, step = plateau_step(list(range(20)), vals, tail_frac=0.25, tol=0.1)
  assert level == pytest.approx(0.54) and step == 15
  # Flat from the start; the last value out of the band never settles; nan is dropped.
  assert plateau_step([1, 2, 3], [0.3, 0.3, 0.3]) == (pytest.approx(0.3), 1)
  level, step = plateau_step([1, 2, 3, 4], [0.0, 0.5, 0.5, 0.2])
  assert level == pytest.approx(0.4) and step is None
  assert plateau_step([1, 2, 3, 4], [0.5, float("nan"), 0.5, 0.5]) == (pytest.approx(0.5), 1)
  # Fewer than 3 points.
  level, step = plateau_step([1, 2], [0.5, 0.5])
  assert math.isnan(level) and step is None
  with pytest.raises(ValueError):
    plateau_step([1, 2, 3], [0.1, 0.2])
