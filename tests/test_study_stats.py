"""Statistics of scaling studies (agro_megatron.study.stats) against independent references:
pass@k against subset enumeration, intervals against scipy.stats, the ScaleRL compute curve
against data generated from its formula (and a direct scipy fit of the formula), the size line
against scipy.stats.linregress, and hand-computed answers for the held-out errors."""
import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
from scipy import optimize, stats as sp_stats

from agro_megatron.study import stats
from agro_megatron.study.stats import (
    StatsInputError, bootstrap_fit, fit_compute_curve, fit_size_curve, holdout_prediction_error, mean_ci,
    paired_diff, paired_diff_se, pass_at_k, sigmoid_curve, size_curve, size_extrapolation_error,
)

TRUE = {"A": 0.8, "B": 1.5, "C_mid": 1e6, "r0": 0.1}


def formula(C, A, B, C_mid, r0):
    """ScaleRL eq. 1 written as in the paper, in float64: the reference for sigmoid_curve."""
    C = np.asarray(C, dtype=np.float64)
    return r0 + (A - r0) / (1.0 + (C_mid / C) ** B)


def seeded_curves(n_seeds, noise, rng_seed, compute=np.logspace(4, 8, 20)):
    rng = np.random.default_rng(rng_seed)
    clean = formula(compute, **TRUE)
    return [compute] * n_seeds, [clean + rng.normal(0.0, noise, compute.size) for _ in range(n_seeds)]


# ----------------------------------------------------------------------------------- pass@k


def test_pass_at_k_matches_subset_enumeration():
    for n in range(1, 9):
        for c in range(n + 1):
            outcomes = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(outcomes, k))
                exact = Fraction(sum(any(s) for s in subsets), len(subsets))
                assert pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-12), (n, c, k)
                assert pass_at_k(np.int64(n), np.int32(c), k) == pass_at_k(n, c, k)


def test_pass_at_k_large_n_against_exact_binomials():
    # math.comb(2000, 500) is ~1e487: the binomial form overflows floats, the product form does not
    for n, c, k in [(1000, 3, 100), (2000, 1000, 500), (500, 0, 10), (64, 63, 64), (256, 1, 1)]:
        exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
        assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12, abs=1e-15), (n, c, k)


@pytest.mark.parametrize("n, c, k", [(4, 5, 1), (4, 1, 5), (4, 1, 0), (-1, 0, 1), (4, -1, 1), (4, 1, -2), (4.0, 1, 1), (4, 1, 1.5)])
def test_pass_at_k_rejects_bad_counts(n, c, k):
    with pytest.raises(StatsInputError):
        pass_at_k(n, c, k)


def test_eval_uses_the_one_pass_at_k():
    from agro_megatron import eval as harness

    assert harness.pass_at_k is stats.pass_at_k
    assert issubclass(StatsInputError, ValueError)  # agro-eval's callers caught ValueError before


# ------------------------------------------------------------------------------ seeds, pairs


@pytest.mark.parametrize("n", [2, 3, 5, 17])
@pytest.mark.parametrize("level", [0.5, 0.9, 0.95, 0.99])
def test_mean_ci_matches_scipy_t_interval(n, level):
    x = np.random.default_rng(n).normal(0.4, 0.1, n)
    mean, low, high = mean_ci(list(x), level)
    ref_low, ref_high = sp_stats.t.interval(level, df=n - 1, loc=np.mean(x), scale=sp_stats.sem(x))
    assert mean == pytest.approx(np.mean(x), rel=1e-14)
    assert (low, high) == pytest.approx((ref_low, ref_high), rel=1e-12)


def test_mean_ci_one_seed_and_constant_seeds():
    mean, low, high = mean_ci([0.7])
    assert mean == 0.7 and math.isnan(low) and math.isnan(high)
    assert mean_ci(np.full(4, 0.25)) == (0.25, 0.25, 0.25)


@pytest.mark.parametrize("values, level", [([], 0.95), ([0.1, float("nan")], 0.95), ([[0.1, 0.2]], 0.95),
                                           ([0.1, 0.2], 1.0), ([0.1, 0.2], 0.0), (["a", "b"], 0.95)])
def test_mean_ci_rejects_bad_input(values, level):
    with pytest.raises(StatsInputError):
        mean_ci(values, level)


def test_paired_diff_matches_ttest_rel_and_a_hand_computation():
    rng = np.random.default_rng(3)
    difficulty = rng.uniform(0.0, 1.0, 50)  # shared by both arms: pairing removes it
    a = np.clip(difficulty + 0.05 + rng.normal(0, 0.05, 50), 0, 1)
    b = np.clip(difficulty + rng.normal(0, 0.05, 50), 0, 1)
    for level in (0.9, 0.95):
        mean, low, high = paired_diff(a.tolist(), b.tolist(), level)
        ref = sp_stats.ttest_rel(a, b).confidence_interval(confidence_level=level)
        d = [float(x) - float(y) for x, y in zip(a, b)]
        hand_mean = math.fsum(d) / len(d)
        hand_se = math.sqrt(math.fsum((x - hand_mean) ** 2 for x in d) / (len(d) - 1) / len(d))
        assert mean == pytest.approx(hand_mean, rel=1e-12)
        assert (low, high) == pytest.approx((ref.low, ref.high), rel=1e-12)
        assert paired_diff_se(a, b) == pytest.approx(hand_se, rel=1e-12)
    # the unpaired interval (Welch) is much wider here: the shared difficulty is not removed
    welch = sp_stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert (welch.high - welch.low) > 5 * (high - low)


def test_paired_diff_one_problem_and_bad_input():
    mean, low, high = paired_diff([0.5], [0.25])
    assert mean == 0.25 and math.isnan(low) and math.isnan(high) and math.isnan(paired_diff_se([0.5], [0.25]))
    with pytest.raises(StatsInputError, match="same length"):
        paired_diff([0.1, 0.2], [0.1])


# ---------------------------------------------------------------------------- compute curve


def test_sigmoid_curve_is_scalerl_eq1():
    C = np.logspace(2, 10, 33)
    for A, B, C_mid, r0 in [(0.8, 1.5, 1e6, 0.1), (0.5, 0.3, 3e4, 0.2), (1.0, 4.0, 1e9, 0.0)]:
        assert sigmoid_curve(C, A, B, C_mid, r0) == pytest.approx(formula(C, A, B, C_mid, r0), rel=1e-13, abs=1e-15)
        assert sigmoid_curve(C_mid, A, B, C_mid, r0) == pytest.approx((A + r0) / 2, rel=1e-15)
    # (C_mid/C)**B overflows here; the curve is still its limit r0
    assert sigmoid_curve(1e-300, 0.8, 50.0, 1e300, 0.1) == 0.1
    with pytest.raises(StatsInputError):
        sigmoid_curve([1.0, 0.0], 0.8, 1.5, 1e6, 0.1)


@pytest.mark.parametrize("A, B, C_mid, r0, compute", [
    (0.8, 1.5, 1e6, 0.1, np.logspace(4, 8, 30)),
    (0.55, 0.7, 3e19, 0.05, np.logspace(17, 22, 25)),  # FLOPs scale: fitted on standardised log C
    (0.95, 3.0, 2e3, 0.3, np.linspace(100, 1e5, 40)),  # linear spacing, as along one training run
])
def test_fit_compute_curve_recovers_noiseless_parameters(A, B, C_mid, r0, compute):
    fit = fit_compute_curve(compute.tolist(), formula(compute, A, B, C_mid, r0).tolist(), r0)
    assert fit["identified"] and fit["converged"] and fit["note"] == ""
    assert (fit["A"], fit["B"], fit["C_mid"]) == pytest.approx((A, B, C_mid), rel=1e-6)
    assert fit["rmse"] < 1e-9 and fit["n"] == compute.size


def test_fit_compute_curve_noisy_finds_the_least_squares_optimum():
    (compute, *_), (reward, *_) = seeded_curves(1, 0.02, rng_seed=11, compute=np.logspace(4, 8, 40))
    fit = fit_compute_curve(compute, reward, TRUE["r0"])
    # independent reference: scipy fit of the paper's formula in its own parameters, started at the truth
    ref, _ = optimize.curve_fit(lambda C, A, B, logc: formula(C, A, B, 10.0 ** logc, TRUE["r0"]), compute, reward,
                                p0=(TRUE["A"], TRUE["B"], 6.0), xtol=1e-14, ftol=1e-14, gtol=1e-14)
    assert (fit["A"], fit["B"], math.log10(fit["C_mid"])) == pytest.approx(tuple(ref), rel=1e-5)
    assert fit["identified"]
    assert fit["A"] == pytest.approx(TRUE["A"], abs=0.03) and fit["B"] == pytest.approx(TRUE["B"], rel=0.25)
    assert fit["C_mid"] == pytest.approx(TRUE["C_mid"], rel=0.25)
    resid = reward - formula(compute, fit["A"], fit["B"], fit["C_mid"], TRUE["r0"])
    assert fit["rmse"] == pytest.approx(np.sqrt(np.mean(resid ** 2)), rel=1e-10)


def test_fit_compute_curve_data_below_c_mid_is_not_identified():
    compute = np.logspace(2, 5, 20)  # the true midpoint is 1e7: the data never reaches it
    fit = fit_compute_curve(compute, formula(compute, 0.8, 1.0, 1e7, 0.1), 0.1)
    assert not fit["identified"]
    assert fit["C_mid"] > compute.max() and "A not identified" in fit["note"] and "never passes C_mid" in fit["note"]
    # with noise the 0.007 rise is barely above it: whatever curve least squares picks, A is not determined
    for rng_seed in range(4):
        noisy = formula(compute, 0.8, 1.0, 1e7, 0.1) + np.random.default_rng(rng_seed).normal(0, 1e-3, 20)
        fit = fit_compute_curve(compute, noisy, 0.1)
        assert not fit["identified"] and "A not identified" in fit["note"], (rng_seed, fit)
    # the same curve observed past its midpoint is identified
    compute = np.logspace(5, 9, 20)
    assert fit_compute_curve(compute, formula(compute, 0.8, 1.0, 1e7, 0.1), 0.1)["identified"]


def test_fit_compute_curve_without_learning_sits_on_the_bound():
    compute = np.logspace(3, 8, 20)
    fit = fit_compute_curve(compute, np.full(20, 0.1), 0.1)  # reward never leaves r0
    assert not fit["identified"] and "A=lower" in fit["at_bound"] and fit["A"] == pytest.approx(0.1, abs=1e-4)
    falling = fit_compute_curve(compute, np.linspace(0.1, 0.0, 20), 0.1)  # A >= r0 cannot fit a drop
    assert not falling["identified"]


@pytest.mark.parametrize("compute, reward, r0, match", [
    ([1, 2, 3], [0.1, 0.2], 0.1, "same length"),
    ([0, 2, 3], [0.1, 0.2, 0.3], 0.1, "> 0"),
    ([1, 1, 2, 2], [0.1, 0.2, 0.3, 0.4], 0.1, "3 distinct"),
    ([1, 2, 3], [0.1, float("inf"), 0.3], 0.1, "NaN or infinite"),
    ([1, 2, 3], [0.1, 0.2, 0.3], 1.5, "r0"),
])
def test_fit_compute_curve_rejects_bad_input(compute, reward, r0, match):
    with pytest.raises(StatsInputError, match=match):
        fit_compute_curve(compute, reward, r0)


# -------------------------------------------------------------------------------- bootstrap


def test_bootstrap_intervals_cover_the_truth():
    """Coverage over 30 synthetic studies (6 seeds of 10 points each) of the nominal 95% interval.
    Measured over 200 such studies: A 86%, B 84%, C_mid 92% (n_boot=60); 89%, 90%, 94% (n_boot=200).
    The same intervals shrunk to half their width cover 53-63%; the plain percentile interval 76-87%."""
    covered = {name: 0 for name in ("A", "B", "C_mid")}
    widths = []
    for study in range(30):
        compute, reward = seeded_curves(6, 0.03, 100 + study, compute=np.logspace(4, 8, 10))
        out = bootstrap_fit(compute, reward, TRUE["r0"], n_boot=60, seed=study)
        pooled = fit_compute_curve(np.concatenate(compute), np.concatenate(reward), TRUE["r0"])
        for name in covered:
            point, low, high = out[name]
            assert point == pooled[name] and low <= point <= high, (name, out[name])
            covered[name] += low <= TRUE[name] <= high
        widths.append([out[name][2] - out[name][1] for name in covered])
        assert out["identified"] and out["identified_fraction"] == 1.0 and out["n_failed"] == 0
    assert all(n >= 0.7 * 30 for n in covered.values()), covered
    assert np.all(np.median(widths, axis=0) < [0.05, 0.6, 3e5]), np.median(widths, axis=0)


def test_bootstrap_is_deterministic_per_seed():
    compute, reward = seeded_curves(4, 0.03, 3, compute=np.logspace(4, 8, 8))
    out = bootstrap_fit(compute, reward, TRUE["r0"], n_boot=40, seed=7)
    again = bootstrap_fit(compute, reward, TRUE["r0"], n_boot=40, seed=7)
    other = bootstrap_fit(compute, reward, TRUE["r0"], n_boot=40, seed=8)
    assert {k: again[k] for k in ("A", "B", "C_mid")} == {k: out[k] for k in ("A", "B", "C_mid")}
    assert other["A"][1:] != out["A"][1:] and other["A"][0] == out["A"][0]


def test_bootstrap_width_follows_the_noise():
    quiet = bootstrap_fit(*seeded_curves(6, 0.005, 4), TRUE["r0"], n_boot=100, seed=0)
    loud = bootstrap_fit(*seeded_curves(6, 0.05, 4), TRUE["r0"], n_boot=100, seed=0)
    for name in ("A", "B", "C_mid"):
        assert loud[name][2] - loud[name][1] > 3 * (quiet[name][2] - quiet[name][1]), name
    # identical seeds: every replicate is the same data, the interval collapses onto the truth
    same = bootstrap_fit(*seeded_curves(4, 0.0, 0), TRUE["r0"], n_boot=20, seed=0)
    for name in ("A", "B", "C_mid"):
        assert same[name] == pytest.approx((TRUE[name],) * 3, rel=1e-6), name


def test_bootstrap_one_seed_and_unidentified_seeds():
    one = bootstrap_fit(*seeded_curves(1, 0.01, 0), TRUE["r0"], n_boot=50, seed=0)
    assert all(math.isnan(one[name][1]) and math.isnan(one[name][2]) for name in ("A", "B", "C_mid"))
    assert one["A"][0] == pytest.approx(TRUE["A"], abs=0.02)
    low_compute = np.logspace(2, 4.5, 15)
    below = bootstrap_fit(*seeded_curves(3, 0.002, 5, compute=low_compute), TRUE["r0"], n_boot=30, seed=0)
    assert not below["identified"] and below["identified_fraction"] < 0.25


def test_bootstrap_rejects_bad_input():
    with pytest.raises(StatsInputError, match="one sequence per seed"):
        bootstrap_fit([[1, 2, 3]], [[0.1, 0.2, 0.3], [0.1, 0.2, 0.3]], 0.1, 10, 0)
    with pytest.raises(StatsInputError, match="flat array"):
        bootstrap_fit(np.array([1.0, 2.0, 3.0]), [[0.1, 0.2, 0.3]], 0.1, 10, 0)
    with pytest.raises(StatsInputError, match="compute_by_seed\\[1\\]"):
        bootstrap_fit([[1, 2, 3], [1, 2]], [[0.1, 0.2, 0.3], [0.1]], 0.1, 10, 0)
    with pytest.raises(StatsInputError, match="n_boot"):
        bootstrap_fit([[1, 2, 3]], [[0.1, 0.2, 0.3]], 0.1, 0, 0)


# ---------------------------------------------------------------------------------- holdout


def test_holdout_error_of_the_true_curve_is_zero():
    compute = np.linspace(1e5, 2e7, 40)  # one run: compute linear in steps, C_mid in the first half
    reward = formula(compute, 0.8, 1.5, 2e6, 0.1)
    out = holdout_prediction_error(compute, reward, 0.1)
    cutoff = 1e5 + 0.5 * (2e7 - 1e5)
    assert out["cutoff"] == pytest.approx(cutoff) and out["identified"]
    assert (out["n_fit"], out["n_test"]) == (int(np.sum(compute <= cutoff)), int(np.sum(compute > cutoff))) == (20, 20)
    assert out["max_abs_error"] < 1e-7


def test_holdout_error_measures_a_known_shift():
    compute = np.linspace(1e5, 2e7, 40)
    reward = formula(compute, 0.8, 1.5, 2e6, 0.1)
    late = compute > 1e5 + 0.25 * (2e7 - 1e5)
    reward[late] += 0.05  # the last three quarters sit 0.05 above the curve the first quarter follows
    out = holdout_prediction_error(compute, reward, 0.1, fit_fraction=0.25)
    assert out["n_test"] == int(late.sum())
    assert out["mean_error"] == pytest.approx(-0.05, abs=1e-7)
    assert out["mean_abs_error"] == pytest.approx(0.05, abs=1e-7) and out["max_abs_error"] == pytest.approx(0.05, abs=1e-7)
    with pytest.raises(StatsInputError, match="fit_fraction"):
        holdout_prediction_error(compute, reward, 0.1, fit_fraction=1.0)
    with pytest.raises(StatsInputError, match="distinct compute values"):
        holdout_prediction_error(compute, reward, 0.1, fit_fraction=0.01)


# -------------------------------------------------------------------------------- size axis


def test_fit_size_curve_matches_linregress():
    rng = np.random.default_rng(9)
    params = np.repeat([1e6, 4e6, 2e7, 1e8], 3)  # 3 seeds per size
    values = 0.2 + 0.07 * np.log10(params) + rng.normal(0, 0.02, params.size)
    fit = fit_size_curve(params.tolist(), values.tolist())
    ref = sp_stats.linregress(np.log10(params), values)
    assert (fit["slope"], fit["intercept"]) == pytest.approx((ref.slope, ref.intercept), rel=1e-10)
    assert (fit["n"], fit["n_sizes"]) == (12, 4)
    assert size_curve(3e7, fit["slope"], fit["intercept"]) == pytest.approx(ref.intercept + ref.slope * math.log10(3e7))


def test_size_extrapolation_error_known_answers():
    params = np.repeat([1e6, 1e7, 1e8], 2)
    # a line in log10(params) extrapolates exactly
    exact = size_extrapolation_error(params, 0.1 + 0.05 * np.log10(params))
    assert exact["held_out_params"] == 1e8 and abs(exact["error"]) < 1e-12
    # curved: 0.1 * (log10 N - 6)**2 is 0, 0.1, 0.4; the line through the first two predicts 0.2 at 1e8
    values = 0.1 * (np.log10(params) - 6) ** 2 + np.tile([-0.01, 0.01], 3)  # seeds symmetric about the curve
    out = size_extrapolation_error(params.tolist(), values.tolist())
    assert out["predicted"] == pytest.approx(0.2, abs=1e-12) and out["observed"] == pytest.approx(0.4, abs=1e-12)
    assert out["error"] == pytest.approx(-0.2, abs=1e-12) and out["abs_error"] == pytest.approx(0.2, abs=1e-12)
    assert out["fit"]["n_sizes"] == 2
    with pytest.raises(StatsInputError, match="3 distinct model sizes"):
        size_extrapolation_error([1e6, 1e7, 1e7], [0.1, 0.2, 0.3])
    with pytest.raises(StatsInputError, match="> 0"):
        fit_size_curve([0, 1e7], [0.1, 0.2])
