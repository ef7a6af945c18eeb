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


# ------------------------------------------------------------------------------ Lemma 4.3


@pytest.mark.xfail(strict=True, reason=(
    "Lemma 4.3 read as eq. 48 (KL(theta*) <= inf KL + lambda ||theta*||) fails at the "
    "stationary point: lambda=0.1, KL(theta*) = 1.084 while gradient descent at "
    "lambda=0.001 reaches KL 0.563 (so inf KL <= 0.563) and lambda ||theta*|| = 0.29: the "
    "gap is >= 0.52 > 0.29; eq. 37's delta^2 / (2 beta) is smaller still"))
def test_lemma_4_3_at_the_stationary_point(lang, data, trained, stationary):
  tokens, mask, emp = data
  run, dist = stationary
  # An upper bound on inf KL: the trained point continued by descent at a smaller lambda
  # (L-BFGS stalls there at KL 0.78 in float32).
  low = theory.train_sgd(lang, tokens, mask, 0.001, LR, STEPS, params=trained[0].params,
                         chunk=1000)
  kl_ref = theory.forward_kl(theory.exact_model_distribution(low.model, low.params, lang), emp)
  res = theory.check_lemma_4_3(run, lang, emp, tokens, mask, kl_ref, dist)
  assert res["stationary"], res  # theta* is stationary: the lemma applies
  assert kl_ref < 0.6 * res["forward_kl"], res
  assert res["eq37_bound"] < res["eps"], res  # eq. 37's constant is the tighter one
  assert res["holds"], res


# ------------------------------------------------------------ DMU: Lemma B.2, B.4 / B.5, B.7


def test_lemma_b2_prob_and_fix_update_variances():
  # Output bias of the DMU, c~ = 0.3: p = floor(0.3 n) / n = 0.25 at n = 8, 38/128 at 128.
  res = theory.check_lemma_b2(jax.random.PRNGKey(0), widths=(8, 128), num_masks=4000)
  small, large = res["widths"]
  assert math.isclose(small["dmu2_fix"]["keep_prob"], 0.25)
  assert math.isclose(large["dmu2_fix"]["keep_prob"], 38 / 128)
  assert res["formulas_agree"] and res["differences_agree"], res
  # The Monte Carlo can tell the two modes apart at n = 8 (0.21 vs 0.1875) ...
  assert small["difference_measured"] > 5 * small["difference_se"], small
  # ... and the normalised difference shrinks with n (eq. 95 vs eq. 87): Lemma B.2.
  assert res["vanishes"] and res["holds"], res
  # The proof's own reading (Var(b | S_b) = 0 for Fix) would leave c~(1-c~) = 0.21.
  assert large["proof_reading_difference"] > 100 * abs(large["difference_formula"])


@pytest.fixture(scope="module")
def node_edge():
  return theory.check_node_edge_equivalence(jax.random.PRNGKey(1), widths=((8, 16), (32, 64)),
                                            c_tilde=0.5, num_masks=2000,
                                            modes=("dmu2_prob", "dprob"))


def test_node_modes_keep_a_weight_with_c_squared(node_edge):
  # What the measurement behind Lemma B.4's failure is: Alg. 4 masks both nodes of a
  # weight, so it is kept with c~^2 = 0.25; edge modes keep it with c~ = 0.5.
  for row in node_edge["widths"]:
    se = lambda p: 4 * math.sqrt(p * (1 - p) / (2000 * row["d"]))  # d entries at least
    prob, node = row["modes"]["dmu2_prob"], row["modes"]["dprob"]
    for name in ("wi_kernel", "wo_kernel"):
      assert abs(prob[name]["keep"] - 0.5) < se(0.5), (name, prob[name])
      assert abs(node[name]["keep"] - 0.25) < se(0.25), (name, node[name])
    for name in ("wi_bias", "wo_bias"):
      assert abs(node[name]["keep"] - 0.5) < se(0.5), (name, node[name])
    # The output bias's update is -M g exactly: mean c~ g, variance c~(1-c~) g^2 (eq. 86).
    assert abs(node["wo_bias"]["mean_ratio"] - 0.5) < 0.03
    assert abs(node["wo_bias"]["var_ratio"] - 0.25) < 0.02


@pytest.mark.xfail(strict=True, reason=(
    "Lemma B.4 / Theorem B.5 fail for the kernels: node-level masks (Alg. 4) keep a "
    "weight with c~^2, edge-level with c~; at c~ = 0.5, d = 32, d_ff = 64, dprob / "
    "dmu2_prob: keep 0.50, E[update] 0.50 (wi_kernel), 0.74 (wo_kernel), variance "
    "0.58 / 0.79; the biases agree (1.00-1.01). The gap does not shrink from width 8 to 32"))
def test_lemma_b4_node_and_edge_modes_are_equivalent(node_edge):
  assert node_edge["holds"], node_edge


def test_theorem_b7_hoeffding_coverage():
  res = theory.check_theorem_b7(jax.random.PRNGKey(2), ks=(4, 64), groups=500,
                                reference=20_000)
  assert 0.0 <= res["loss_min"] and res["loss_max"] <= 1.0  # [a, b] = [0, 1]
  assert res["loss_std"] > 0.01  # the masks move the loss
  for row in res["rows"]:
    assert row["coverage"] >= row["promised"] - 3 * row["se"], row
    assert row["quantile_over_epsilon"] < 1.0, row
  assert res["rate_holds"], res["rates"]  # i.i.d. passes: std of the mean ~ 1 / sqrt(K)
  assert res["holds"], res


# ------------------------------------------------------------------------- DTU: Theorem B.9


@pytest.fixture(scope="module")
def dtu_b9():
  return theory.check_theorem_b9(jax.random.PRNGKey(3), num_points=4, num_pairs=128,
                                 segment_points=65)


def test_theorem_b9_lipschitz_with_frozen_sets(dtu_b9):
  res = dtu_b9
  assert res["L_frozen"] > 0.5 * res["B_V"], res  # the measured constant is not trivial
  assert res["max_pair_ratio"] <= max(res["jacobian_norms"]) * 1.01, res
  assert res["B_X"] <= res["B_X_bound"], res
  assert res["holds_frozen"], res  # within eq. 153's constant for fixed sets
  assert res["flip_found"] and res["flip_changed_queries"] >= 1, res
  assert res["frozen_ratio_same_pair"] <= 1.01 * res["L_frozen"], res


@pytest.mark.xfail(strict=True, reason=(
    "eq. 155's DTU constant a_V B_V (1 + (2 C_soft + B_X^2 a_Q a_K B_Q B_K) / sqrt(d_k)), "
    "a = a3/n = 1/4, C_soft = 1, is 2.60, below the measured 4.06 with frozen sets: the "
    "a3/n factors shrink a constant that keeping fewer keys does not shrink (C_soft >= 6.1 "
    "would be needed)"))
def test_theorem_b9_eq155_constant(dtu_b9):
  assert dtu_b9["holds_eq155"], dtu_b9


@pytest.mark.xfail(strict=True, reason=(
    "with the key sets re-drawn (key-norm scores recomputed from X) the DTU is not "
    "Lipschitz: a set flips between inputs 2.9e-7 apart and the output jumps by 0.54, a "
    "quotient of 1.9e6 against eq. 153's constant 247 and the frozen-set quotient 2.1 on "
    "the same pair"))
def test_theorem_b9_lipschitz_when_a_set_flips(dtu_b9):
  assert dtu_b9["holds_redrawn"], dtu_b9


# ------------------------------------------------------------------------- PSU: Theorem B.1


@pytest.mark.parametrize("alpha", [0.05, 0.2])
@pytest.mark.xfail(strict=True, reason=(
    "at the paper's alpha (0.05, 0.2) the toy of tests/test_psu.py reverses Theorem B.1: "
    "mean gamma over the last 1000 of 3000 steps, informative / noisy, seeds 0-2: alpha "
    "0.2: 1.84 / 1.84, 0.62 / 1.81, 0.63 / 1.79; alpha 0.05: 1.83 / 1.84, 0.61 / 1.81, "
    "0.58 / 1.79 (the property holds at alpha = 5, test_psu)"))
def test_theorem_b1_at_the_papers_alpha(alpha):
  from stabjax.psu import PSUConfig
  records = [theory.psu_toy_run(PSUConfig(penalty=4e-5), alpha, 3000, seed)[2]
             for seed in (0, 1, 2)]
  res = theory.check_theorem_b1(records, alpha)
  for row in res["seeds"]:
    assert row["entropy_noisy"] > row["entropy_informative"] + 0.8  # the toy is as assumed
  assert res["holds"], res
