"""fgclf.stats against scipy/statsmodels reference implementations and hand-computed values."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as st
from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar
from statsmodels.stats.weightstats import DescrStatsW

from fgclf.stats import (BOOTSTRAP_MIN_N, bootstrap_mean_interval, corrected_resampled_ttest, mcnemar, paired_ttest,
                         summarize, wilcoxon_signed_rank)


@pytest.mark.parametrize("seed,n", [(0, 3), (1, 5), (2, 10), (3, 40)])
@pytest.mark.parametrize("confidence", [0.9, 0.95])
def test_summarize_matches_statsmodels(seed, n, confidence):
    x = np.random.default_rng(seed).normal(0.7, 0.05, size=n)
    s = summarize(x, confidence=confidence, n_boot=2000)
    lo, hi = DescrStatsW(x).tconfint_mean(alpha=1 - confidence)
    assert s["n"] == n
    assert s["mean"] == pytest.approx(x.mean(), rel=1e-12)
    assert s["std"] == pytest.approx(np.std(x, ddof=1), rel=1e-12)
    assert s["sem"] == pytest.approx(st.sem(x), rel=1e-12)
    assert (s["ci_lo"], s["ci_hi"]) == pytest.approx((lo, hi), rel=1e-10)
    assert (s["min"], s["max"]) == (x.min(), x.max())
    assert s["values"] == pytest.approx(x.tolist())
    if n >= BOOTSTRAP_MIN_N:
        assert s["boot_lo"] <= s["mean"] <= s["boot_hi"] and s["boot_note"] is None
    else:  # too few runs for a percentile bootstrap: withheld, and said why
        assert math.isnan(s["boot_lo"]) and math.isnan(s["boot_hi"]) and f"got {n}" in s["boot_note"]


def test_bootstrap_withheld_below_ten_runs():
    x = [0.71, 0.74, 0.69]
    # what it would print: with 3 runs the 95 % percentile bootstrap is exactly [min, max]
    assert bootstrap_mean_interval(x, n_boot=10000, seed=0) == pytest.approx((min(x), max(x)), abs=1e-12)
    s = summarize(x)
    assert BOOTSTRAP_MIN_N == 10 and math.isnan(s["boot_lo"]) and math.isnan(s["boot_hi"])
    assert s["boot_note"] == "bootstrap needs >= 10 values, got 3"
    assert (s["ci_lo"], s["ci_hi"]) == pytest.approx(DescrStatsW(np.array(x)).tconfint_mean(0.05))  # t-CI stays
    forced = summarize(x, min_boot_n=3)
    assert (forced["boot_lo"], forced["boot_hi"]) == pytest.approx((min(x), max(x)), abs=1e-12)
    assert forced["boot_note"] is None
    ten = summarize(np.linspace(0.6, 0.8, 10), n_boot=2000)
    assert ten["boot_note"] is None and 0.6 < ten["boot_lo"] < ten["mean"] < ten["boot_hi"] < 0.8


def test_bootstrap_close_to_scipy_and_seeded():
    x = np.random.default_rng(7).exponential(1.0, size=30)
    lo, hi = bootstrap_mean_interval(x, n_boot=20000, seed=0)
    ref = st.bootstrap((x,), np.mean, method="percentile", n_resamples=20000, rng=np.random.default_rng(1))
    width = ref.confidence_interval.high - ref.confidence_interval.low
    assert lo == pytest.approx(ref.confidence_interval.low, abs=0.05 * width)
    assert hi == pytest.approx(ref.confidence_interval.high, abs=0.05 * width)
    assert bootstrap_mean_interval(x, n_boot=20000, seed=0) == (lo, hi)
    assert bootstrap_mean_interval(x, n_boot=20000, seed=1) != (lo, hi)


def test_bootstrap_interval_narrows_with_n():
    rng = np.random.default_rng(0)
    widths = []
    for n in (10, 50, 500):
        s = summarize(rng.normal(0.5, 0.1, size=n), n_boot=4000)
        assert s["boot_lo"] < s["mean"] < s["boot_hi"]
        widths.append(s["boot_hi"] - s["boot_lo"])
    assert widths[0] > widths[1] > widths[2]
    # large inputs are resampled in chunks; still the same distribution of means
    big = rng.normal(0.0, 1.0, size=200_000)
    lo, hi = bootstrap_mean_interval(big, n_boot=300)
    assert hi - lo == pytest.approx(2 * 1.96 / math.sqrt(big.size), rel=0.25)


def test_summarize_single_value_is_nan_not_error():
    s = summarize([0.8])
    assert s["n"] == 1 and s["mean"] == 0.8 and s["min"] == s["max"] == 0.8
    for key in ("std", "sem", "ci_lo", "ci_hi", "boot_lo", "boot_hi"):
        assert math.isnan(s[key]), key


def test_summarize_all_equal_values():
    s = summarize([0.5] * 10)
    assert s["std"] == 0.0 and s["sem"] == 0.0
    assert (s["ci_lo"], s["ci_hi"]) == (0.5, 0.5)
    assert (s["boot_lo"], s["boot_hi"]) == (0.5, 0.5)


def test_summarize_empty_raises():
    with pytest.raises(ValueError, match="empty"):
        summarize([])


@pytest.mark.parametrize("seed,n", [(0, 2), (1, 5), (2, 12), (3, 30)])
def test_paired_ttest_matches_scipy(seed, n):
    rng = np.random.default_rng(seed)
    a = rng.normal(0.70, 0.02, size=n)
    b = a - rng.normal(0.01, 0.01, size=n)
    ours = paired_ttest(a, b)
    ref = st.ttest_rel(a, b)
    ci = ref.confidence_interval(0.95)
    assert ours["t"] == pytest.approx(ref.statistic, rel=1e-10)
    assert ours["p"] == pytest.approx(ref.pvalue, rel=1e-10)
    assert ours["df"] == ref.df == n - 1
    assert ours["mean_diff"] == pytest.approx(np.mean(a - b), rel=1e-12)
    assert (ours["ci_lo"], ours["ci_hi"]) == pytest.approx((ci.low, ci.high), rel=1e-10)
    lo, hi = DescrStatsW(a - b).tconfint_mean(alpha=0.05)
    assert (ours["ci_lo"], ours["ci_hi"]) == pytest.approx((lo, hi), rel=1e-10)


@pytest.mark.filterwarnings("ignore:Precision loss:RuntimeWarning")  # scipy's own, on the reference call
def test_paired_ttest_degenerate_cases():
    same = paired_ttest([0.5, 0.6, 0.7], [0.5, 0.6, 0.7])
    assert same["mean_diff"] == 0.0 and math.isnan(same["t"]) and math.isnan(same["p"])
    assert same["zero_variance"] and math.isnan(same["ci_lo"]) and math.isnan(same["ci_hi"])
    shift = paired_ttest([2.0, 3.0, 4.0], [1.0, 2.0, 3.0])  # constant difference: scipy says t=inf, p=0
    ref = st.ttest_rel([2.0, 3.0, 4.0], [1.0, 2.0, 3.0])
    assert ref.statistic == math.inf and ref.pvalue == 0.0
    assert shift["zero_variance"] and math.isnan(shift["t"]) and math.isnan(shift["p"])
    assert shift["mean_diff"] == 1.0 and "zero variance" in shift["warning"] and "+1" in shift["warning"]
    assert math.isnan(shift["ci_lo"]) and math.isnan(shift["ci_hi"])
    ok = paired_ttest([2.0, 3.0, 4.1], [1.0, 2.0, 3.0])
    assert not ok["zero_variance"] and ok["warning"] is None and ok["p"] > 0
    one = paired_ttest([0.7], [0.6])
    assert one["mean_diff"] == pytest.approx(0.1) and math.isnan(one["p"]) and math.isnan(one["ci_lo"])
    with pytest.raises(ValueError, match="length"):
        paired_ttest([1.0, 2.0], [1.0])


@pytest.mark.filterwarnings("ignore:Precision loss:RuntimeWarning")  # scipy's own, on the reference call
def test_three_seeds_one_image_better_each_is_flagged_not_p_zero():
    # three seeds, each one more of 100 test images right: 0.01 every time, up to float rounding
    a, b = np.array([0.42, 0.41, 0.39]), np.array([0.41, 0.40, 0.38])
    d = a - b
    assert np.ptp(d) > 0  # the rounding that makes scipy print an enormous t and p ~ 0
    assert st.ttest_rel(a, b).pvalue < 1e-10
    res = paired_ttest(a, b)
    assert res["zero_variance"] and math.isnan(res["p"]) and math.isnan(res["t"])
    assert res["mean_diff"] == pytest.approx(0.01) and "all 3 paired differences are +0.01" in res["warning"]
    cv = corrected_resampled_ttest(a, b, n_train=80, n_test=40)
    assert cv["zero_variance"] and math.isnan(cv["p"]) and math.isnan(cv["ci_lo"]) and cv["warning"]


@pytest.mark.parametrize("seed,n", [(0, 6), (1, 9), (2, 20), (3, 70)])
def test_wilcoxon_matches_scipy(seed, n):
    rng = np.random.default_rng(seed)
    a = rng.normal(0.7, 0.02, size=n)
    b = a - rng.normal(0.005, 0.01, size=n)
    ours = wilcoxon_signed_rank(a, b)
    ref = st.wilcoxon(a, b)
    assert ours["statistic"] == pytest.approx(ref.statistic)
    assert ours["p"] == pytest.approx(ref.pvalue, rel=1e-10)
    assert ours["min_attainable_p"] == pytest.approx(2 / 2**n)
    assert ours["warning"] is None


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_wilcoxon_small_n_warns_and_floor_is_attained(n):
    a = np.arange(1, n + 1) / 10
    res = wilcoxon_signed_rank(a + 1.0, a)  # every difference positive: the most extreme outcome
    assert res["min_attainable_p"] == pytest.approx(2 / 2**n)
    assert res["p"] == pytest.approx(st.wilcoxon(a + 1.0, a).pvalue)
    assert res["p"] == pytest.approx(res["min_attainable_p"])
    assert res["warning"] and "cannot reach p < 0.05" in res["warning"] and "6" in res["warning"]


def test_wilcoxon_zero_differences():
    same = wilcoxon_signed_rank([0.5, 0.6, 0.7], [0.5, 0.6, 0.7])
    assert (same["statistic"], same["p"], same["n_nonzero"]) == (0.0, 1.0, 0)
    assert same["min_attainable_p"] == 1.0 and same["warning"]
    a = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    b = a - np.array([0.0, 0.01, 0.02, -0.015, 0.03, 0.04, 0.05, 0.06])
    res = wilcoxon_signed_rank(a, b)
    assert res["n"] == 8 and res["n_nonzero"] == 7
    assert res["p"] == pytest.approx(st.wilcoxon(a, b).pvalue)


def _correct_pairs(b: int, c: int, both: int = 30, neither: int = 10) -> tuple[np.ndarray, np.ndarray]:
    x = np.array([True] * b + [False] * c + [True] * both + [False] * neither)
    y = np.array([False] * b + [True] * c + [True] * both + [False] * neither)
    perm = np.random.default_rng(b * 100 + c).permutation(x.size)
    return x[perm], y[perm]


@pytest.mark.parametrize("b,c", [(3, 9), (0, 5), (12, 12), (20, 4), (30, 12), (7, 40)])
def test_mcnemar_matches_statsmodels(b, c):
    x, y = _correct_pairs(b, c)
    res = mcnemar(x, y)
    assert (res["b"], res["c"], res["n"]) == (b, c, x.size)
    assert res["exact"] == (b + c < 25)
    table = [[30, b], [c, 10]]
    ref = sm_mcnemar(table, exact=res["exact"], correction=True)
    assert res["statistic"] == pytest.approx(ref.statistic)
    assert res["p"] == pytest.approx(ref.pvalue, rel=1e-10)
    if res["exact"]:
        assert res["p"] == pytest.approx(st.binomtest(min(b, c), b + c, 0.5).pvalue)
    assert res["acc_a"] == pytest.approx(x.mean()) and res["acc_b"] == pytest.approx(y.mean())


def test_mcnemar_threshold_and_override():
    assert mcnemar(*_correct_pairs(10, 14))["exact"] is True  # 24 discordant
    assert mcnemar(*_correct_pairs(10, 15))["exact"] is False  # 25 discordant
    forced = mcnemar(*_correct_pairs(10, 15), exact=True)
    assert forced["p"] == pytest.approx(sm_mcnemar([[30, 10], [15, 10]], exact=True).pvalue)
    chi = mcnemar(*_correct_pairs(3, 9), exact=False)
    assert chi["p"] == pytest.approx(sm_mcnemar([[30, 3], [9, 10]], exact=False, correction=True).pvalue)


def test_mcnemar_no_discordant_samples():
    x = np.array([True, False, True])
    for exact in (None, True, False):
        res = mcnemar(x, x, exact=exact)
        assert (res["b"], res["c"], res["statistic"], res["p"]) == (0, 0, 0.0, 1.0)


def test_corrected_resampled_ttest_hand_computed():
    d = np.array([0.02, 0.01, 0.03, 0.00, 0.04])
    b = np.full(5, 0.70)
    res = corrected_resampled_ttest(b + d, b, n_train=800, n_test=200)
    # mean 0.02; s^2 = (0 + 1e-4 + 1e-4 + 4e-4 + 4e-4) / 4 = 2.5e-4; factor 1/5 + 200/800 = 0.45
    se = math.sqrt(0.45 * 2.5e-4)
    t = 0.02 / se
    assert res["correction"] == pytest.approx(0.45)
    assert res["mean_diff"] == pytest.approx(0.02)
    assert res["t"] == pytest.approx(t, rel=1e-9) and res["t"] == pytest.approx(1.885618, rel=1e-6)
    assert res["p"] == pytest.approx(2 * st.t.sf(t, 4), rel=1e-9)
    half = st.t.ppf(0.975, 4) * se
    assert (res["ci_lo"], res["ci_hi"]) == pytest.approx((0.02 - half, 0.02 + half), rel=1e-9)
    # corrected is more conservative than the plain paired t-test
    assert res["p"] > st.ttest_rel(b + d, b).pvalue


def test_corrected_ttest_reduces_to_paired_ttest_without_overlap():
    rng = np.random.default_rng(5)
    a, b = rng.normal(0.7, 0.02, 10), rng.normal(0.69, 0.02, 10)
    res = corrected_resampled_ttest(a, b, n_train=1e12, n_test=1.0)  # n_test/n_train -> 0
    ref = st.ttest_rel(a, b)
    assert res["t"] == pytest.approx(ref.statistic, rel=1e-9)
    assert res["p"] == pytest.approx(ref.pvalue, rel=1e-9)
    with pytest.raises(ValueError, match="positive"):
        corrected_resampled_ttest(a, b, n_train=0, n_test=10)
