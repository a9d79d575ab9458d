"""Statistics for repeated runs: summaries with confidence intervals and paired tests.

Pure numpy/scipy; every function returns a plain ``dict`` of Python floats/ints (JSON-able).
Conventions shared by the paired tests: ``a`` and ``b`` are matched per position (the same seed,
fold or test sample), differences are ``a - b``, and p-values are two-sided.

Degenerate inputs never raise; they give ``nan`` where a quantity is undefined:

* ``summarize`` with one value: ``std``, ``sem`` and both intervals are ``nan``. With fewer than
  :data:`BOOTSTRAP_MIN_N` values the bootstrap interval is ``nan`` too (``boot_note`` says why):
  with 3 runs a 95 % percentile bootstrap of the mean is exactly ``[min, max]`` (all three draws
  equal the minimum with probability 1/27 > 2.5 %), and below ~10 runs it undercovers.
* ``paired_ttest`` / ``corrected_resampled_ttest`` whose paired differences are all equal (zero
  variance, e.g. three seeds that each gain exactly one test image): ``zero_variance`` is true,
  ``warning`` says so, and ``t``, ``p`` and the interval are ``nan``. scipy would give
  ``t = +-inf, p = 0`` for a constant non-zero difference, which reads as certainty when it only
  means the runs did not vary. Differences count as equal within ``1e-9`` of the inputs' scale,
  so float rounding of ``a - b`` does not turn into a huge ``t``. Fewer than two pairs: ``t``,
  ``p`` and CI ``nan``.
* ``wilcoxon_signed_rank`` with identical pairs: statistic 0 and ``p = 1`` (as scipy).
* ``mcnemar`` with no discordant samples: statistic 0 and ``p = 1``.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
from scipy import stats as _st

ArrayLike = Sequence[float] | np.ndarray

__all__ = ["summarize", "bootstrap_mean_interval", "paired_ttest", "wilcoxon_signed_rank", "mcnemar",
           "corrected_resampled_ttest", "BOOTSTRAP_MIN_N"]

# fewest runs for which summarize reports a bootstrap interval (see the module docstring)
BOOTSTRAP_MIN_N = 10
# paired differences closer than this, relative to the inputs' magnitude, count as equal
_ZERO_VAR_RTOL = 1e-9


def _as_1d(values: ArrayLike, name: str = "values") -> np.ndarray:
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if x.size == 0:
        raise ValueError(f"{name} is empty")
    return x


def _paired(a: ArrayLike, b: ArrayLike) -> np.ndarray:
    """Differences ``a - b`` of two equally long 1-d arrays."""
    x, y = _as_1d(a, "a"), _as_1d(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"paired samples differ in length: {x.size} vs {y.size}")
    return x - y


def _zero_variance(a: ArrayLike, b: ArrayLike, d: np.ndarray) -> Optional[str]:
    """A warning when two or more paired differences ``d`` are all equal (else ``None``)."""
    if d.size < 2 or not np.isfinite(d).all():
        return None
    scale = max(float(np.abs(np.asarray(a, np.float64)).max()), float(np.abs(np.asarray(b, np.float64)).max()))
    if float(np.ptp(d)) > _ZERO_VAR_RTOL * scale:
        return None
    return (f"all {d.size} paired differences are {float(d.mean()):+.4g}: zero variance, so no t-test "
            "(t would be infinite and p = 0 although nothing varied); more seeds or folds are needed")


def _t_from(mean: float, se: float, df: int, confidence: float) -> tuple[float, float, float, float]:
    """(t, two-sided p, CI lo, CI hi) of a mean with standard error ``se`` and ``df`` dof."""
    if df < 1 or not math.isfinite(se):
        return math.nan, math.nan, math.nan, math.nan
    half = float(_st.t.ppf(0.5 + confidence / 2, df)) * se
    if se == 0.0:
        t = math.nan if mean == 0.0 else math.copysign(math.inf, mean)
    else:
        t = mean / se
    p = math.nan if math.isnan(t) else float(2 * _st.t.sf(abs(t), df))
    return t, p, mean - half, mean + half


def bootstrap_mean_interval(values: ArrayLike, *, confidence: float = 0.95, n_boot: int = 10000,
                            seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (resampling with replacement, seeded).

    Resamples are drawn in chunks so that large ``values`` do not need an ``n_boot x n`` array.
    """
    x = _as_1d(values)
    n = x.size
    rng = np.random.default_rng(seed)
    rows = max(1, min(n_boot, (1 << 22) // n))
    means = np.concatenate([x[rng.integers(0, n, size=(min(rows, n_boot - start), n))].mean(axis=1)
                            for start in range(0, n_boot, rows)])
    alpha = 1.0 - confidence
    lo, hi = np.percentile(means, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)


def summarize(values: ArrayLike, *, confidence: float = 0.95, n_boot: int = 10000, seed: int = 0,
              min_boot_n: int = BOOTSTRAP_MIN_N) -> dict:
    """Mean, spread and two confidence intervals of the mean of repeated measurements.

    Args:
        values: one number per run (seed, fold).
        confidence: coverage of both intervals.
        n_boot: bootstrap resamples.
        seed: seed of the bootstrap's ``numpy.random.Generator``.
        min_boot_n: fewest values for a bootstrap interval; below it ``boot_lo, boot_hi`` are ``nan``.
    Returns:
        ``n, mean, std`` (sample, ddof=1), ``sem``, ``ci_lo, ci_hi`` (Student t interval),
        ``boot_lo, boot_hi`` (percentile bootstrap), ``boot_note`` (why there is no bootstrap
        interval, else ``None``), ``min, max``, ``confidence``, ``values``. With ``n == 1`` std,
        sem and both intervals are ``nan``; a ``nan`` value propagates.
    """
    x = _as_1d(values)
    n = int(x.size)
    mean = float(x.mean())
    std = float(x.std(ddof=1)) if n > 1 else math.nan
    sem = std / math.sqrt(n) if n > 1 else math.nan
    _, _, ci_lo, ci_hi = _t_from(mean, sem, n - 1, confidence)
    boot_lo = boot_hi = math.nan
    boot_note = None
    if n < max(2, min_boot_n):
        boot_note = f"bootstrap needs >= {max(2, min_boot_n)} values, got {n}"
    elif np.isfinite(x).all():
        boot_lo, boot_hi = bootstrap_mean_interval(x, confidence=confidence, n_boot=n_boot, seed=seed)
    return {"n": n, "mean": mean, "std": std, "sem": sem, "ci_lo": ci_lo, "ci_hi": ci_hi,
            "boot_lo": boot_lo, "boot_hi": boot_hi, "boot_note": boot_note,
            "min": float(x.min()), "max": float(x.max()),
            "confidence": confidence, "values": x.tolist()}


def paired_ttest(a: ArrayLike, b: ArrayLike, *, confidence: float = 0.95) -> dict:
    """Paired Student t-test of ``a - b`` (same numbers as :func:`scipy.stats.ttest_rel`).

    Unlike scipy, all-equal differences give ``nan`` (not ``t = inf, p = 0``) and a warning.

    Returns:
        ``n, mean_diff, std_diff, t, p, df, ci_lo, ci_hi`` (t interval of the mean difference),
        ``zero_variance`` and ``warning`` (``None`` unless zero variance).
    """
    d = _paired(a, b)
    n = int(d.size)
    mean = float(d.mean())
    std = float(d.std(ddof=1)) if n > 1 else math.nan
    warning = _zero_variance(a, b, d)
    se = std / math.sqrt(n) if n > 1 and warning is None else math.nan
    t, p, lo, hi = _t_from(mean, se, n - 1, confidence)
    return {"n": n, "mean_diff": mean, "std_diff": std, "t": t, "p": p, "df": n - 1,
            "ci_lo": lo, "ci_hi": hi, "confidence": confidence, "zero_variance": warning is not None,
            "warning": warning}


def wilcoxon_signed_rank(a: ArrayLike, b: ArrayLike, *, alpha: float = 0.05) -> dict:
    """Wilcoxon signed-rank test of ``a - b`` (:func:`scipy.stats.wilcoxon`, its default method).

    Zero differences are dropped (``zero_method="wilcox"``). With ``m`` non-zero differences the
    exact two-sided test cannot go below ``2 / 2**m``; when that floor is above ``alpha`` (``m < 6``
    for 0.05) the result carries a ``warning``: no outcome could be significant.

    Returns:
        ``n, n_nonzero, statistic, p, min_attainable_p, warning`` (``None`` when none).
    """
    d = _paired(a, b)
    nonzero = int(np.count_nonzero(d))
    min_p = min(1.0, 2.0 / 2.0 ** nonzero)
    if nonzero == 0:
        statistic, p = 0.0, 1.0
    else:
        res = _st.wilcoxon(d)
        statistic, p = float(res.statistic), float(res.pvalue)
    warning = None
    if min_p > alpha:
        warning = (f"Wilcoxon with {nonzero} non-zero paired differences cannot reach p < {alpha:g} "
                   f"(smallest attainable p = {min_p:.3g}); at least "
                   f"{math.ceil(math.log2(2 / alpha) - 1e-9)} non-zero pairs are needed")
    return {"n": int(d.size), "n_nonzero": nonzero, "statistic": statistic, "p": p,
            "min_attainable_p": min_p, "warning": warning}


def mcnemar(correct_a: ArrayLike, correct_b: ArrayLike, *, exact: Optional[bool] = None) -> dict:
    """McNemar's test of two classifiers scored on the same test samples.

    Args:
        correct_a: per-sample correctness (bool) of classifier A.
        correct_b: the same for classifier B, in the same sample order.
        exact: exact binomial test; ``None`` picks it when fewer than 25 samples are discordant,
            else the chi-square test with continuity correction (1 dof).
    Returns:
        ``n, b`` (A right, B wrong), ``c`` (A wrong, B right), ``exact``, ``statistic`` (``min(b, c)``
        for the exact test, the chi-square value otherwise), ``p``, ``acc_a``, ``acc_b``.
    """
    x = np.asarray(correct_a).reshape(-1).astype(bool)
    y = np.asarray(correct_b).reshape(-1).astype(bool)
    if x.shape != y.shape:
        raise ValueError(f"correctness vectors differ in length: {x.size} vs {y.size}")
    b = int(np.count_nonzero(x & ~y))
    c = int(np.count_nonzero(~x & y))
    if exact is None:
        exact = b + c < 25
    if b + c == 0:
        statistic, p = 0.0, 1.0
    elif exact:
        statistic = float(min(b, c))
        p = float(_st.binomtest(min(b, c), b + c, 0.5).pvalue)
    else:
        statistic = (abs(b - c) - 1.0) ** 2 / (b + c)
        p = float(_st.chi2.sf(statistic, 1))
    n = int(x.size)
    return {"n": n, "b": b, "c": c, "exact": bool(exact), "statistic": float(statistic), "p": p,
            "acc_a": float(x.mean()) if n else math.nan, "acc_b": float(y.mean()) if n else math.nan}


def corrected_resampled_ttest(a: ArrayLike, b: ArrayLike, *, n_train: float, n_test: float,
                              confidence: float = 0.95) -> dict:
    """Nadeau & Bengio (2003) corrected resampled t-test for scores from CV folds / resamples.

    Folds share training data, so their scores are correlated and the plain paired t-test is
    too optimistic. The variance of the mean difference is ``(1/k + n_test/n_train) * s**2``
    instead of ``s**2 / k`` (``k`` paired scores, ``s`` their sample std), with ``k - 1`` dof.

    Args:
        a, b: one score per fold (or resample), paired.
        n_train: training-set size of one fold.
        n_test: held-out size of one fold (the part of the resampled data not trained on; for
            k-fold CV the validation fold, so ``n_test / n_train = 1 / (k - 1)``).
    Returns:
        ``n, mean_diff, t, p, df, ci_lo, ci_hi, correction`` (the factor ``1/k + n_test/n_train``),
        ``zero_variance, warning`` as :func:`paired_ttest`.
    """
    if n_train <= 0 or n_test <= 0:
        raise ValueError(f"n_train and n_test must be positive, got {n_train} and {n_test}")
    d = _paired(a, b)
    k = int(d.size)
    mean = float(d.mean())
    correction = 1.0 / k + n_test / n_train
    warning = _zero_variance(a, b, d)
    se = math.sqrt(correction * float(d.var(ddof=1))) if k > 1 and warning is None else math.nan
    t, p, lo, hi = _t_from(mean, se, k - 1, confidence)
    return {"n": k, "mean_diff": mean, "t": t, "p": p, "df": k - 1, "ci_lo": lo, "ci_hi": hi,
            "correction": correction, "n_train": float(n_train), "n_test": float(n_test),
            "confidence": confidence, "zero_variance": warning is not None, "warning": warning}
