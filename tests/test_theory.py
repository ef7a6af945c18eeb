"""The enumerable language, the exact model quantities, and the paper's claims (stabjax.theory).

One tiny GPT-2 (1 layer, d_model 32) is trained once per module (full-batch gradient
descent on eq. 3, lambda = 0.1) and shared, and continued by L-BFGS to a near-stationary
point for Theorem 5.5; the lambda sweep of check e (four more runs) is marked slow. The
launcher experiments/theory.py runs the same checks with longer runs.
"""

import math

import jax
import numpy as np
import pytest

from stabjax import theory
from stabjax.data.enumerable import EnumerableLanguage, num_sequences
from stabjax.data.synthetic import SyntheticLanguage

SEED = 0
N_TRAIN = 128
LAM = 0.1  # eq. 3's lambda of the shared model: Theorem 5.5 is tested there
LR = 0.03
STEPS = 3000
POLISH = 1000  # L-BFGS iterations toward theta*


@pytest.fixture(scope="module")
def lang():
  return EnumerableLanguage(zipf_exponent=0.7, concentration=2.0, eos_prob=0.3, seed=SEED)


@pytest.fixture(scope="module")
def data(lang):
  tokens, mask = lang.sample(SEED + 1, N_TRAIN)
  return tokens, mask, lang.empirical(tokens, mask)


@pytest.fixture(scope="module")
def trained(lang, data):
  tokens, mask, _ = data
  run = theory.train_sgd(lang, tokens, mask, LAM, LR, STEPS, seed=SEED, chunk=1000)
  return run, theory.exact_model_distribution(run.model, run.params, lang)


@pytest.fixture(scope="module")
def stationary(lang, data, trained):
  tokens, mask, _ = data
  run = theory.polish(trained[0], tokens, mask, POLISH)
  return run, theory.exact_model_distribution(run.model, run.params, lang)


# ------------------------------------------------------------------ the enumerable language


def test_enumeration_is_every_sequence_and_sums_to_one(lang):
  tokens, mask = lang.all_sequences()
  assert tokens.shape == (1884, 5) == (num_sequences(12, 3), lang.max_len)
  assert lang.vocab_size == 16 and lang.max_words == 3
  assert len(np.unique(tokens, axis=0)) == len(tokens)
  logp = lang.log_prob(tokens, mask)
  assert np.all(np.isfinite(logp))
  assert math.isclose(np.exp(logp).sum(), 1.0, abs_tol=1e-12)
  # Entropy by dynamic programming (synthetic.py) = the sum over the enumeration.
  assert math.isclose(lang.entropy(), -(np.exp(logp) * logp).sum(), rel_tol=1e-10)
  np.testing.assert_array_equal(lang.index_of(tokens, mask), np.arange(len(tokens)))


def test_enumerable_is_the_synthetic_generator(lang):
  ref = SyntheticLanguage(vocab_size=16, max_len=5, zipf_exponent=0.7, eos_prob=0.3,
                          concentration=2.0, seed=SEED)
  np.testing.assert_array_equal(lang.transition, ref.transition)
  a, b = lang.sample(3, 500), ref.sample(3, 500)
  np.testing.assert_array_equal(a[0], b[0])
  tokens, mask = lang.all_sequences()
  np.testing.assert_array_equal(lang.log_prob(tokens, mask), ref.log_prob(tokens, mask))


def test_index_of_rejects_non_sequences(lang):
  rows = np.array([[1, 4, 4, 4, 4],   # no EOS at the cap (a model going on)
                   [1, 2, 0, 0, 0],   # no word
                   [1, 4, 0, 5, 2],   # PAD inside
                   [1, 3, 2, 0, 0],   # MASK as a word
                   [1, 4, 2, 0, 0]])  # a sequence
  idx = lang.index_of(rows, np.array([[1] * 5, [1, 1, 0, 0, 0], [1] * 5, [1, 1, 1, 0, 0],
                                      [1, 1, 1, 0, 0]]))
  assert list(idx[:4]) == [-1] * 4 and idx[4] >= 0
  assert lang.index_of(np.array([[1, 4, 2]]))[0] == idx[4]  # short rows are padded
  with pytest.raises(ValueError, match="accepted"):
    EnumerableLanguage(num_words=100, max_words=4)


def test_empirical_over_the_enumeration(lang, data):
  tokens, mask, emp = data
  assert emp.p_dense.shape == (lang.num_sequences,)
  assert math.isclose(emp.p_dense.sum(), 1.0, abs_tol=1e-12)
  np.testing.assert_array_equal(emp.p_dense[emp.index], emp.p_emp)
  rows = lang.index_of(tokens, mask)
  np.testing.assert_array_equal(np.bincount(rows, minlength=lang.num_sequences) / len(rows),
                                emp.p_dense)
  assert 1 < emp.support_size < N_TRAIN


# ---------------------------------------------------------------------- exact quantities


def test_mode_collapse_set_is_the_smallest():
  dist = theory.ExactDistribution(logp=np.log(np.array([0.05, 0.6, 0.3, 0.04])), past_cap=0.0)
  s = theory.mode_collapse_set(dist, 0.1)
  assert s.exists and s.size == 2 and list(s.indices) == [1, 2]
  assert math.isclose(s.mass, 0.9) and s.fraction == 0.5
  assert theory.mode_collapse_set(dist, 0.02).size == 4  # 0.99 >= 0.98
  assert not theory.mode_collapse_set(dist, 0.005).exists  # 1% lies outside the language


def test_wilson_hilferty():
  # Tabulated chi-square 99.9% quantiles: 29.588 (df 10), 149.449 (df 100), 1143.917 (1000).
  assert abs(theory.wilson_hilferty_quantile(10, 3.0902) - 29.588) < 0.2
  assert abs(theory.wilson_hilferty_quantile(100, 3.0902) - 149.449) < 0.1
  assert abs(theory.wilson_hilferty_quantile(1000, 3.0902) - 1143.917) < 0.05
  assert abs(theory.wilson_hilferty_pvalue(149.449, 100) - 0.001) < 2e-5
  stat, df, cells = theory.pooled_chi_square([10, 12, 1, 2, 0], [11, 11, 1.5, 2.5, 1])
  assert cells == 3 and df == 2
  assert math.isclose(stat, 1 / 11 + 1 / 11 + 2 ** 2 / 5)
  # A pooled cell still under 5 joins the smallest remaining cell.
  stat, df, cells = theory.pooled_chi_square([10, 20, 1, 2], [11, 19, 1.5, 1.5])
  assert cells == 2 and math.isclose(stat, (13 - 14) ** 2 / 14 + (20 - 19) ** 2 / 19)


def test_exact_distribution_of_a_random_model(lang):
  run_model = theory.tiny_model_config(lang)
  from stabjax.models import get_model
  model, params = get_model(run_model), theory.init_model_params(run_model, SEED)
  dist = theory.exact_model_distribution(model, params, lang)
  # Near-uniform next-token distributions over 16 tokens: little mass on the language.
  assert 0 < dist.total < 0.2 and dist.past_cap > 0.05 and dist.off_language > 0.5
  assert math.isclose(dist.total + dist.past_cap + dist.off_language, 1.0, abs_tol=1e-12)


# ------------------------------------------------------------------------------- checks a-e


def test_a_chi_square_random_init(lang):
  from stabjax.models import get_model
  mc = theory.tiny_model_config(lang)
  res = theory.check_chi_square(get_model(mc), theory.init_model_params(mc, SEED), lang,
                                jax.random.PRNGKey(11), num_samples=20_000)
  assert res["holds"], res
  assert abs(res["off_language_sampled"] - res["off_language_exact"]) < 0.02


def test_a_chi_square_trained(lang, trained):
  run, dist = trained
  res = theory.check_chi_square(run.model, run.params, lang, jax.random.PRNGKey(12),
                                num_samples=20_000, dist=dist)
  assert res["holds"], res
  assert res["cells"] > 50  # a trained model puts > 5 expected samples on many sequences
  assert abs(res["language_mass_sampled"] - res["language_mass_exact"]) < 0.01


def test_b_lemma_4_2_at_the_trained_model(lang, data, trained):
  tokens, mask, emp = data
  run, dist = trained
  res = theory.check_lemma_4_2(run.model, run.params, lang, tokens, mask, emp, dist)
  assert res["holds"], res
  assert res["forward_kl"] > 0.05  # a trained, not a degenerate, point
  assert math.isclose(res["token_nll"] * res["mean_tokens"], res["nll"], rel_tol=1e-6)


@pytest.mark.slow  # about 20 s: the Trainer's compilation
def test_project_sgd_step_is_eq_4_in_paper_units(lang, data):
  tokens, mask, _ = data
  res = theory.check_trainer_equivalence(lang, tokens, mask, weight_decay=0.01, lr=0.1,
                                         steps=3, seed=SEED)
  assert res["holds"], res


@pytest.mark.xfail(strict=True, reason=(
    "Definition 3.1 (2) is not reached by SGD + L2 on a tiny GPT-2: lambda=0.1, lr=0.03 "
    "constant, 3000 full-batch steps: ||theta|| 9.98 -> 3.08 (bounded), residual "
    "||grad L + lambda theta|| 7.75 -> 3.53 (ratio 0.45, needs <= 0.05); the top Hessian "
    "eigenvalue is 58 against 2/lr = 67: descent oscillates at the edge of stability"))
def test_c_definition_3_1_along_sgd(data, trained):
  tokens, mask, _ = data
  run, _ = trained
  res = theory.check_stationarity(run, tokens, mask, with_sharpness=False)
  assert res["bounded"], res  # this part holds: the norm shrinks under full L2
  assert res["holds"], res


def test_polish_reaches_near_stationarity(trained, stationary):
  gd, run = trained[0], stationary[0]
  assert run.residual[-1] < 1e-3 * gd.residual[0]  # L-BFGS gets where descent does not
  assert run.residual[-1] < 1e-3 * gd.residual[-1]
  assert run.loss[-1] <= gd.loss[-1] + 0.5 * gd.lam * (gd.param_norm[-1] ** 2
                                                       - run.param_norm[-1] ** 2)


@pytest.mark.xfail(strict=True, reason=(
    "Theorem 5.5 fails at a stationary point: lambda=0.1, P(S_0) = 0.562 < "
    "1 - lambda ||theta*|| = 1 - 0.1 x 2.918 = 0.708 (residual ||grad L_lambda|| 7.7e-5 "
    "against ||grad L|| = 0.292 = lambda ||theta*||); at smaller lambda it holds, see "
    "experiments/theory.py"))
def test_d_theorem_5_5(lang, data, stationary):
  tokens, mask, emp = data
  run, dist = stationary
  res = theory.check_theorem_5_5(run, lang, emp, tokens, mask, dist)
  assert not res["vacuous"] and res["stationary"], res
  assert res["holds"], res


def test_kl_order_fit():
  lams = np.array([0.01, 0.02, 0.04, 0.08])
  slope, pref, local = theory.fit_exponent(lams, 3.0 * lams ** 1.5)
  assert math.isclose(slope, 1.5, rel_tol=1e-9) and math.isclose(pref, 3.0, rel_tol=1e-9)
  assert np.allclose(local, 1.5)


@pytest.mark.slow
def test_e_kl_order_in_lambda(lang, data):
  tokens, mask, emp = data
  runs = [theory.polish(theory.train_sgd(lang, tokens, mask, lam, LR, STEPS, seed=SEED),
                        tokens, mask, 2000)
          for lam in (0.01, 0.0215, 0.0464, 0.1)]
  res = theory.check_kl_order(runs, lang, emp, tokens, mask)
  assert res["holds"], res  # KL falls at least about linearly in lambda (eq. 39's order)
  assert not res["consistent_with_eq37"], res  # but not as lambda^2 (eq. 37)
