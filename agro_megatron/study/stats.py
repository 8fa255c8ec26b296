"""Statistics of scaling studies: pass@k, intervals over seeds, paired differences, scaling fits.

Plain functions over plain sequences or numpy arrays, so the study report, `agro-eval` and
notebooks share one implementation. Every function checks its input first and raises
`StatsInputError` (a `ValueError`) naming the argument and the fix, before any work starts.

What each piece is for:

* `pass_at_k`: the unbiased estimator of Chen et al. (2021) for one problem.
* `mean_ci`: mean and Student-t interval over seeds (few seeds, unknown variance: t, not normal).
  One seed has no spread to estimate, so its interval is ``(nan, nan)``: a report over a study
  where only one seed finished prints the mean and "no interval" instead of crashing.
* `paired_diff`, `paired_diff_se`: arm minus baseline on the same problems. Pairing removes the
  problem-difficulty variance that dominates unpaired comparisons.
* `sigmoid_curve`, `fit_compute_curve`, `bootstrap_fit`, `holdout_prediction_error`: the
  sigmoidal compute curve of ScaleRL (arXiv 2510.13786, eq. 1),
  ``R(C) = r0 + (A - r0) / (1 + (C_mid / C)**B)``, its least-squares fit, a bootstrap over seeds
  for its parameters, and an honest check (fit the first half of the compute, predict the rest).
  The asymptote ``A`` is only pinned down by data that passes the midpoint ``C_mid``: below it the
  curve is a power law ``r0 + (A - r0) (C / C_mid)**B`` in which ``A`` and ``C_mid`` trade off
  along a ridge, so such fits come back with ``identified=False``.
* `fit_size_curve`, `size_curve`, `size_extrapolation_error`: the size axis, value linear in
  ``log10(params)`` (see `fit_size_curve` for why that model and not a saturating one).

scipy is imported inside the functions that use it, so `agro_megatron.eval` (which needs only
`pass_at_k`) does not pay scipy's import time.
"""
from __future__ import annotations

import functools
import math
import numbers
import operator
from typing import Sequence

import numpy as np

# Bounds of the compute-curve fit. B is the exponent of C. At B_MAX = 10 the reward goes from 10%
# to 90% of its rise within a factor 1.55 of compute (ln 81 / B in ln C): sharper than evaluation
# points spaced along a run resolve, so a fit that wants more is a step fitted to a jump in the
# last points and sits on the bound (not identified); B_MIN is a flat line. C_mid may range
# C_MID_PAD_DECADES decades beyond the data on either side; further out the data says nothing of it.
B_MIN = 1e-3
B_MAX = 10.0
C_MID_PAD_DECADES = 3.0
_AT_BOUND_RTOL = 1e-4  # a parameter within this fraction of its range from a bound sits on it
_MAX_NFEV = 300  # a fit from the grid start converges in tens of evaluations; more is a ridge crawl


class StatsInputError(ValueError):
    """Input a statistic cannot be computed from; the message names the argument and the fix."""


# ------------------------------------------------------------------------------------ checks


def _count(name: str, value) -> int:
    try:
        out = operator.index(value)
    except TypeError:
        raise StatsInputError(f"{name} must be an integer, got {value!r}") from None
    if out < 0:
        raise StatsInputError(f"{name} must be >= 0, got {out}")
    return out


def _vector(name: str, values, *, min_len: int = 1, positive: bool = False) -> np.ndarray:
    """``values`` as a finite 1-D float64 array of at least ``min_len`` entries."""
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise StatsInputError(f"{name} must be a sequence of numbers ({err})") from None
    if arr.ndim != 1:
        raise StatsInputError(f"{name} must be one-dimensional (one value per seed/point), got shape {arr.shape}")
    if arr.size < min_len:
        raise StatsInputError(f"{name} needs at least {min_len} value(s), got {arr.size}")
    if not np.all(np.isfinite(arr)):
        raise StatsInputError(f"{name} holds NaN or infinite values; drop the missing runs before calling")
    if positive and np.any(arr <= 0):
        raise StatsInputError(f"{name} must be > 0 everywhere (it is put on a log scale), got min {arr.min()!r}")
    return arr


def _fraction(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 < float(value) < 1.0:
        raise StatsInputError(f"{name} must be a number strictly between 0 and 1, got {value!r}")
    return float(value)


def _level(level) -> float:
    return _fraction("level (e.g. 0.95)", level)


def _same_length(name_a: str, a: np.ndarray, name_b: str, b: np.ndarray) -> None:
    if a.size != b.size:
        raise StatsInputError(f"{name_a} and {name_b} must have the same length, got {a.size} and {b.size}")


# ------------------------------------------------------------------------------------ pass@k


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with ``c`` correct among ``n`` samples: ``1 - C(n-c, k) / C(n, k)``.

    The probability that at least one of ``k`` samples drawn without replacement from the ``n`` is
    correct (Chen et al. 2021). Computed as ``1 - prod_{i=n-c+1..n} (1 - k/i)``: the binomials
    overflow floats for n in the hundreds, the product of ``c`` factors in (0, 1] does not.
    """
    n, c, k = _count("n", n), _count("c", c), _count("k", k)
    if c > n:
        raise StatsInputError(f"pass@k needs c <= n (correct samples among n), got n={n}, c={c}")
    if not 1 <= k <= n:
        raise StatsInputError(f"pass@k needs 1 <= k <= n (sample at least k per problem), got n={n}, k={k}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


# ------------------------------------------------------------------------------ seeds, pairs


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean over seeds and its two-sided Student-t interval.

    ``mean +- t_{(1+level)/2, n-1} * s / sqrt(n)`` with ``s`` the sample standard deviation
    (ddof=1). With one value there is no spread to estimate: the interval is ``(nan, nan)`` (not an
    error, so a report over a study where one seed finished still prints the mean).
    """
    x = _vector("values", values)
    level = _level(level)
    mean = float(np.mean(x))
    if x.size == 1:
        return mean, math.nan, math.nan
    half = _t_quantile(0.5 + level / 2, x.size - 1) * float(np.std(x, ddof=1)) / math.sqrt(x.size)
    return mean, mean - half, mean + half


@functools.lru_cache(maxsize=256)
def _t_quantile(q: float, df: int) -> float:
    """Student-t quantile, cached: a report asks for the same few (level, seeds) thousands of times,
    and each scipy call costs far more than the interval around it."""
    from scipy import stats as sp_stats

    return float(sp_stats.t.ppf(q, df))


def _paired(a, b) -> np.ndarray:
    a, b = _vector("a", a), _vector("b", b)
    _same_length("a", a, "b", b)
    return a - b


def paired_diff(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """``(mean, low, high)`` of the per-problem differences ``a[i] - b[i]``, t-interval.

    ``a`` and ``b`` are one value per problem (e.g. per-problem accuracy of an arm and of the
    baseline, each averaged over seeds), in the same problem order. This is the interval of
    `scipy.stats.ttest_rel`. One problem gives ``(diff, nan, nan)`` as in `mean_ci`.
    """
    return mean_ci(_paired(a, b), level)


def paired_diff_se(a: Sequence[float], b: Sequence[float]) -> float:
    """Standard error of the mean paired difference, ``std(a - b, ddof=1) / sqrt(n)``; nan for n=1."""
    d = _paired(a, b)
    if d.size == 1:
        return math.nan
    return float(np.std(d, ddof=1)) / math.sqrt(d.size)


# ------------------------------------------------------------------------------ compute axis


def _logistic(z):
    """``1 / (1 + exp(-z))`` without overflow for large ``|z|`` (tanh saturates, exp does not)."""
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def sigmoid_curve(C, A: float, B: float, C_mid: float, r0: float):
    """ScaleRL eq. 1: ``R(C) = r0 + (A - r0) / (1 + (C_mid / C)**B)``; a float for scalar ``C``.

    Evaluated as ``r0 + (A - r0) * logistic(B * (ln C - ln C_mid))``, the same function, which
    stays finite when ``(C_mid / C)**B`` would overflow.
    """
    c = np.asarray(C, dtype=np.float64)
    if np.any(~np.isfinite(c)) or np.any(c <= 0):
        raise StatsInputError("sigmoid_curve: compute C must be finite and > 0")
    if not (C_mid > 0 and B > 0):
        raise StatsInputError(f"sigmoid_curve: needs C_mid > 0 and B > 0, got C_mid={C_mid!r}, B={B!r}")
    out = r0 + (A - r0) * _logistic(B * (np.log(c) - math.log(C_mid)))
    return float(out) if out.ndim == 0 else out


def _check_curve_data(compute, reward, r0, a_max) -> tuple[np.ndarray, np.ndarray]:
    c = _vector("compute", compute, positive=True)
    y = _vector("reward", reward)
    _same_length("compute", c, "reward", y)
    if np.unique(c).size < 3:
        raise StatsInputError(
            f"compute needs at least 3 distinct values to fit the 3 parameters A, B, C_mid, "
            f"got {np.unique(c).size}; log more evaluation points along training"
        )
    if not all(isinstance(v, numbers.Real) and math.isfinite(v) for v in (r0, a_max)) or not r0 < a_max:
        raise StatsInputError(f"r0 (reward at the start) must be finite and below a_max, got r0={r0!r}, a_max={a_max!r}")
    return c, y


def _grid_start(u: np.ndarray, y: np.ndarray, r0: float, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """Starting point ``(A, b, m)`` for the fit: the best of a grid over ``(b, m)``.

    For fixed ``b`` and ``m`` the model is linear in ``A - r0``, so each grid point gets its
    least-squares ``A`` in closed form (clipped to the bounds); one vectorised pass over ~200
    points replaces several local fits from guessed starts, which the ridge of an unidentified
    curve (and a midpoint far from the guess) would otherwise send to different answers.
    """
    b_grid = np.geomspace(max(lower[1], 0.05), min(upper[1], 20.0), 12)
    m_grid = np.linspace(lower[2], upper[2], 17)
    b, m = (g.reshape(-1, 1) for g in np.meshgrid(b_grid, m_grid))
    g = _logistic(b * (u[None, :] - m))  # (grid, points)
    gg = np.sum(g * g, axis=1)
    scale = np.clip(np.sum(g * (y - r0), axis=1) / np.maximum(gg, 1e-300), 0.0, upper[0] - r0)
    sse = np.sum((r0 + scale[:, None] * g - y) ** 2, axis=1)
    i = int(np.argmin(sse))
    p0 = np.array([r0 + scale[i], b[i, 0], m[i, 0]])
    margin = 1e-6 * (upper - lower)
    return np.clip(p0, lower + margin, upper - margin)


def _a_standard_error(jacobian: np.ndarray, sse: float, n: int) -> float:
    """Asymptotic standard error of ``A``: ``sqrt(s^2 (J^T J)^-1 [0, 0])``, ``s^2 = SSE / (n - 3)``.

    ``A`` is the same parameter in the fitted and the reported parameterisation, so the Jacobian of
    the fit serves. ``inf`` where ``J^T J`` is singular (a flat ridge), ``nan`` with 3 points (no
    residual degrees of freedom to estimate the noise from).
    """
    if n <= 3:
        return math.nan
    try:
        var = float(np.linalg.inv(jacobian.T @ jacobian)[0, 0]) * sse / (n - 3)
    except np.linalg.LinAlgError:
        return math.inf
    return math.sqrt(var) if var >= 0 else math.inf


def _fit_arrays(c: np.ndarray, y: np.ndarray, r0: float, a_max: float, start: dict | None = None) -> dict:
    """Least-squares fit of `sigmoid_curve` to checked arrays (see `fit_compute_curve`).

    Fitted in standardised log-compute ``u = (ln C - mu) / s`` with parameters ``(A, b, m)``,
    ``b = B * s`` and ``m = (ln C_mid - mu) / s``: ln C is ~40 for FLOPs, and on that scale the
    three parameters differ by orders of magnitude in their effect, which conditions the problem
    badly. One local fit from the best point of a grid (`_grid_start`), or from ``start`` (the
    point fit, for bootstrap replicates), with the analytic Jacobian keeps a fit to milliseconds;
    MINPACK's unbounded Levenberg-Marquardt is tried first and kept when its minimum lies inside
    the bounds (a report's fits ran 1.6x faster, with the same answers to 4e-6).
    `scipy.optimize.least_squares` rather than its wrapper `curve_fit`: on an unidentified ridge
    the fit can run out of evaluations, and `curve_fit` then raises and drops the iterate, which
    the report still needs to show as "not converged, not identified".
    """
    from scipy.optimize import least_squares

    x = np.log(c)
    mu, s = float(x.mean()), float(x.std())
    u = (x - mu) / s
    ln10 = math.log(10.0)
    lower = np.array([r0, B_MIN * s, (x.min() - C_MID_PAD_DECADES * ln10 - mu) / s])
    upper = np.array([a_max, B_MAX * s, (x.max() + C_MID_PAD_DECADES * ln10 - mu) / s])

    def residual(p):
        return r0 + (p[0] - r0) * _logistic(p[1] * (u - p[2])) - y

    def jac(p):
        g = _logistic(p[1] * (u - p[2]))
        dg = (p[0] - r0) * g * (1.0 - g)
        return np.stack([g, dg * (u - p[2]), -dg * p[1]], axis=1)

    margin = 1e-6 * (upper - lower)
    if start is not None and start["converged"]:
        p0 = np.array([start["A"], start["B"] * s, (math.log(start["C_mid"]) - mu) / s])
    else:
        p0 = _grid_start(u, y, r0, lower, upper)
    p0 = np.clip(p0, lower + margin, upper - margin)
    out = {"r0": float(r0), "n": int(c.size), "max_compute": float(c.max())}
    tol = _AT_BOUND_RTOL * (upper - lower)
    try:
        fit = None
        if c.size >= 3:
            # Fast path: MINPACK's Levenberg-Marquardt (compiled, a fraction of a millisecond) without
            # bounds. A minimum it finds strictly inside the box (clear of every bound by the at-bound
            # tolerance) is a stationary point of the bounded problem too, so it is kept; anything
            # else (a bound, a ridge crawl, no convergence) is refitted by the bounded TRF solver.
            try:
                lm = least_squares(residual, p0, jac=jac, method="lm", ftol=1e-10, xtol=1e-10, gtol=1e-10,
                                   max_nfev=_MAX_NFEV)
            except ValueError:  # e.g. it wandered where the residuals overflow: the bounded solver decides
                lm = None
            if (lm is not None and lm.status > 0 and np.all(np.isfinite(lm.x)) and np.all(lm.x - lower > tol)
                    and np.all(upper - lm.x > tol)):
                fit = lm
        if fit is None:
            fit = least_squares(residual, p0, jac=jac, bounds=(lower, upper), method="trf", ftol=1e-10,
                                xtol=1e-10, gtol=1e-10, max_nfev=_MAX_NFEV)
    except ValueError as err:  # e.g. non-finite residuals
        return {**out, "A": math.nan, "B": math.nan, "C_mid": math.nan, "identified": False, "converged": False,
                "A_se": math.nan, "rmse": math.nan, "at_bound": [], "note": f"A not identified: the fit failed ({err})"}
    A, b, m = (float(v) for v in fit.x)
    sse = 2.0 * float(fit.cost)
    at_bound = [f"{name}={'lower' if p - lo <= t else 'upper'}"
                for name, p, lo, hi, t in zip(("A", "B", "C_mid"), (A, b, m), lower, upper, tol)
                if p - lo <= t or hi - p <= t]
    a_se = _a_standard_error(jac(fit.x), sse, c.size)
    C_mid = math.exp(m * s + mu)
    out.update({"A": A, "B": b / s, "C_mid": C_mid, "converged": bool(fit.status > 0), "A_se": a_se,
                "rmse": math.sqrt(sse / c.size), "at_bound": at_bound})
    out["note"] = _unidentified_reasons(out, A - r0)
    out["identified"] = out["note"] == ""
    return out


def _unidentified_reasons(fit: dict, rise: float) -> str:
    """Empty when the fit identifies A, else "A not identified: " and every reason (rules in `fit_compute_curve`)."""
    reasons = []
    if not fit["converged"]:
        reasons.append(f"the fit ran out of {_MAX_NFEV} evaluations (it crawls along a flat ridge)")
    if fit["max_compute"] < fit["C_mid"]:
        reasons.append(f"the data never passes C_mid (max compute {fit['max_compute']:.3g} < fitted C_mid "
                       f"{fit['C_mid']:.3g})")
    # A at its upper bound a_max (the reward ceiling) is a clamped but determined estimate; A at r0
    # (no learning) or B / C_mid on a bound means the data does not determine the curve.
    unidentifying = [t for t in fit["at_bound"] if t != "A=upper"]
    if unidentifying:
        reasons.append(f"the fit sits on a bound ({', '.join(unidentifying)})")
    if not fit["A_se"] < rise / 2:
        reasons.append(f"the rise A - r0 = {rise:.3g} is under twice its standard error {fit['A_se']:.3g}")
    return "A not identified: " + "; ".join(reasons) if reasons else ""


def fit_compute_curve(compute: Sequence[float], reward: Sequence[float], r0: float, *, a_max: float = 1.0) -> dict:
    """Fit ``A, B, C_mid`` of `sigmoid_curve` to ``(compute, reward)`` points with ``r0`` fixed.

    ``compute`` and ``reward`` are one entry per evaluation point; points of several seeds may be
    pooled (repeated compute values are fine). Bounds: ``A`` in ``[r0, a_max]`` (``a_max`` = 1 for
    an accuracy), ``B`` in ``[B_MIN, B_MAX]``, ``C_mid`` within ``C_MID_PAD_DECADES`` decades of
    the data.

    Returns a dict with ``A``, ``B``, ``C_mid``, ``identified``, and ``rmse`` (of the fit over all
    points), ``n``, ``r0``, ``max_compute``, ``converged``, ``at_bound`` (e.g. ``["C_mid=upper"]``)
    and ``note`` (empty, or why the fit is not identified: the report prints it), and ``A_se``
    (asymptotic standard error of ``A``). ``identified`` is False when

    * the data never passes C_mid (``max(compute) < C_mid``): below the midpoint A and C_mid trade
      off along a ridge;
    * ``A`` sits at ``r0``, or ``B`` or ``C_mid`` sit on a bound (``A`` at ``a_max`` alone still
      counts: the reward cannot exceed its ceiling, the estimate is clamped but determined);
    * the rise is not resolved, ``A - r0 < 2 * A_se`` (an approximate 95% interval of A includes
      r0): on noisy data whose rise is barely above the noise, least squares can put a small
      saturating curve's midpoint inside the data, which passes the first test without determining
      A. With 3 points there is no residual to estimate ``A_se`` from: never identified.
    """
    c, y = _check_curve_data(compute, reward, r0, a_max)
    return _fit_arrays(c, y, float(r0), float(a_max))


def _expanded_tail(level: float, n_seeds: int) -> float:
    """Tail probability per side of the expanded percentile interval (Hesterberg, The American
    Statistician 69(4), 2015).

    The plain percentile bootstrap over ``n`` clusters is too narrow for small ``n``: resampling
    sees only ``(n-1)/n`` of the variance, and it uses normal where a t with ``n - 1`` degrees of
    freedom belongs. The expanded interval takes the percentiles at ``Phi(-sqrt(n/(n-1)) *
    t_{(1+level)/2, n-1})`` instead of ``(1-level)/2``: 0.57% for 8 seeds at 95%, and for 3 seeds
    practically the extremes of the (at most 10) distinct replicates.
    """
    from scipy import stats as sp_stats

    t = float(sp_stats.t.ppf(0.5 + level / 2, n_seeds - 1))
    return float(sp_stats.norm.sf(math.sqrt(n_seeds / (n_seeds - 1)) * t))


def _percentile_interval(values: np.ndarray, tail: float, log: bool = False) -> tuple[float, float]:
    if values.size == 0:
        return math.nan, math.nan
    q = [100 * tail, 100 * (1 - tail)]
    if log:
        lo, hi = np.exp(np.percentile(np.log(values), q))
    else:
        lo, hi = np.percentile(values, q)
    return float(lo), float(hi)


def bootstrap_fit(compute_by_seed: Sequence[Sequence[float]], reward_by_seed: Sequence[Sequence[float]],
                  r0: float, n_boot: int, seed: int, *, level: float = 0.95, a_max: float = 1.0) -> dict:
    """Bootstrap over seeds (expanded percentile intervals) for ``A``, ``B`` and ``C_mid`` of `fit_compute_curve`.

    ``compute_by_seed[s]`` and ``reward_by_seed[s]`` are seed ``s``'s curve. Each of ``n_boot``
    replicates draws as many seeds with replacement, pools their points and refits; whole seeds
    are resampled because points of one run are correlated, seeds are independent. Each replicate's
    fit starts from the point fit. The interval is the expanded percentile interval (see
    `_expanded_tail`), on ``log`` for ``B`` and ``C_mid`` (fitted on a log scale). Replicates with
    the same multiset of seeds share one fit, so a 3-seed study costs at most 10 fits whatever
    ``n_boot``. Deterministic for a given ``seed`` (numpy ``default_rng``).

    Coverage of the nominal 95% interval, measured over 200 synthetic studies of 6 seeds x 10
    points (noise sd 0.03, n_boot=60): A 86%, B 84%, C_mid 92% (the plain percentile interval:
    80%, 76%, 86%). With 3 seeds no bootstrap does well: the interval is about the range of the
    per-seed fits, which misses the truth whenever all three fall on one side (1 in 4).

    Returns ``{"A": (point, low, high), "B": ..., "C_mid": ..., "identified": bool (of the point
    fit), "identified_fraction": share of replicates whose fit is identified, "n_boot", "n_seeds",
    "n_failed" (replicates that could not be fitted, e.g. too few distinct compute values), "level",
    "fit": the point fit's dict}``. The point estimate is the fit on all seeds pooled. With one seed
    there is nothing to resample: the intervals are ``(nan, nan)``, as in `mean_ci`.
    """
    if isinstance(compute_by_seed, np.ndarray) and compute_by_seed.ndim == 1:
        raise StatsInputError("compute_by_seed must be a list of per-seed sequences, not one flat array")
    n_seeds = len(compute_by_seed)
    if n_seeds < 1 or len(reward_by_seed) != n_seeds:
        raise StatsInputError(
            f"compute_by_seed and reward_by_seed need one sequence per seed (at least one), got "
            f"{len(compute_by_seed)} and {len(reward_by_seed)}"
        )
    curves = []
    for i, (c, y) in enumerate(zip(compute_by_seed, reward_by_seed)):
        c, y = _vector(f"compute_by_seed[{i}]", c, positive=True), _vector(f"reward_by_seed[{i}]", y)
        _same_length(f"compute_by_seed[{i}]", c, f"reward_by_seed[{i}]", y)
        curves.append((c, y))
    n_boot = _count("n_boot", n_boot)
    if n_boot < 1:
        raise StatsInputError("n_boot must be >= 1 (e.g. 1000)")
    seed = _count("seed", seed)
    level = _level(level)

    def pooled(indices: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        return (np.concatenate([curves[i][0] for i in indices]), np.concatenate([curves[i][1] for i in indices]))

    point = fit_compute_curve(*pooled(tuple(range(n_seeds))), r0, a_max=a_max)  # raises on unusable data
    out = {"identified": point["identified"], "identified_fraction": math.nan, "n_boot": n_boot,
           "n_seeds": n_seeds, "n_failed": 0, "level": level, "fit": point}
    if n_seeds == 1:
        out.update({name: (point[name], math.nan, math.nan) for name in ("A", "B", "C_mid")})
        out["identified_fraction"] = float(point["identified"])
        return out

    rng = np.random.default_rng(seed)
    cache: dict[tuple[int, ...], dict | None] = {}
    fits = []
    for _ in range(n_boot):
        key = tuple(sorted(rng.integers(0, n_seeds, size=n_seeds).tolist()))
        if key not in cache:
            try:
                c, y = _check_curve_data(*pooled(key), r0, a_max)
            except StatsInputError:  # e.g. the drawn seeds share fewer than 3 compute values
                cache[key] = None
            else:
                cache[key] = _fit_arrays(c, y, float(r0), float(a_max), start=point)
        if cache[key] is not None and cache[key]["converged"]:
            fits.append(cache[key])
    out["n_failed"] = n_boot - len(fits)
    out["identified_fraction"] = sum(f["identified"] for f in fits) / n_boot
    tail = _expanded_tail(level, n_seeds)
    out["percentiles"] = (100 * tail, 100 * (1 - tail))
    for name in ("A", "B", "C_mid"):
        values = np.array([f[name] for f in fits], dtype=np.float64)
        out[name] = (point[name], *_percentile_interval(values, tail, log=name in ("B", "C_mid")))
    return out


def holdout_prediction_error(compute: Sequence[float], reward: Sequence[float], r0: float,
                             fit_fraction: float = 0.5, *, a_max: float = 1.0) -> dict:
    """Fit on the first ``fit_fraction`` of the compute range, report the error on the rest.

    The split is at ``min(C) + fit_fraction * (max(C) - min(C))``, in compute itself, not log
    compute: compute grows linearly with training steps, so this is "fit the first half of the
    run, predict the second half", the question an extrapolation to more compute has to answer.
    Errors are ``predicted - observed`` on the held-out points (nan when the partial fit did not
    converge).

    Returns ``{"mean_abs_error", "max_abs_error", "mean_error" (signed: > 0 means the fit
    over-predicts), "cutoff", "n_fit", "n_test", "identified" (of the partial fit), "fit"}``.
    """
    c, y = _check_curve_data(compute, reward, r0, a_max)
    fit_fraction = _fraction("fit_fraction", fit_fraction)
    cutoff = float(c.min() + fit_fraction * (c.max() - c.min()))
    train, test = c <= cutoff, c > cutoff
    if np.unique(c[train]).size < 3 or not test.any():
        raise StatsInputError(
            f"holdout_prediction_error: the first {fit_fraction:g} of the compute range (C <= {cutoff:.3g}) "
            f"holds {np.unique(c[train]).size} distinct compute values and the rest {int(test.sum())} points; "
            f"it needs at least 3 and 1: raise fit_fraction or log more evaluation points early in training"
        )
    fit = _fit_arrays(c[train], y[train], float(r0), float(a_max))
    if not fit["converged"]:
        err = np.full(int(test.sum()), math.nan)
    else:
        err = sigmoid_curve(c[test], fit["A"], fit["B"], fit["C_mid"], r0) - y[test]
    return {"mean_abs_error": float(np.mean(np.abs(err))), "max_abs_error": float(np.max(np.abs(err))),
            "mean_error": float(np.mean(err)), "cutoff": cutoff, "n_fit": int(train.sum()),
            "n_test": int(test.sum()), "identified": fit["identified"], "fit": fit}


# --------------------------------------------------------------------------------- size axis


def _check_size_data(params, values, min_sizes: int) -> tuple[np.ndarray, np.ndarray]:
    n = _vector("params", params, positive=True)
    v = _vector("values", values)
    _same_length("params", n, "values", v)
    if np.unique(n).size < min_sizes:
        raise StatsInputError(
            f"params needs at least {min_sizes} distinct model sizes, got {np.unique(n).size}; "
            f"add a model size to the study"
        )
    return n, v


def size_curve(params, slope: float, intercept: float):
    """The size model of `fit_size_curve`: ``intercept + slope * log10(params)``."""
    n = np.asarray(params, dtype=np.float64)
    if np.any(~np.isfinite(n)) or np.any(n <= 0):
        raise StatsInputError("size_curve: params must be finite and > 0")
    out = intercept + slope * np.log10(n)
    return float(out) if out.ndim == 0 else out


def fit_size_curve(params: Sequence[float], values: Sequence[float]) -> dict:
    """Least-squares line of ``values`` against ``log10(params)``: ``{"slope", "intercept", "rmse", "n", "n_sizes"}``.

    ``slope`` is the gain per tenfold parameters. Why a line in log size and not a saturating power
    law ``v_inf - k * N**-alpha``: a study affords few sizes (3 to 5), and the extrapolation check
    holds the largest out, leaving as few as 2 to fit: a 3-parameter curve is then not determined
    at all, while a 2-parameter line is. Within a decade or two, any smooth curve in log size
    (the ScaleRL sigmoid in log compute included) is close to its tangent line, and the held-out
    error of `size_extrapolation_error` measures how far that holds. The line does not saturate:
    far beyond the data it can leave the reward's range, so extrapolate one size step, not ten.
    Several values per size (seeds) are fine; they are weighted equally.
    """
    n, v = _check_size_data(params, values, 2)
    x = np.log10(n)
    design = np.stack([np.ones_like(x), x], axis=1)
    (intercept, slope), *_ = np.linalg.lstsq(design, v, rcond=None)
    resid = v - (intercept + slope * x)
    return {"slope": float(slope), "intercept": float(intercept), "rmse": float(np.sqrt(np.mean(resid ** 2))),
            "n": int(v.size), "n_sizes": int(np.unique(n).size)}


def size_extrapolation_error(params: Sequence[float], values: Sequence[float]) -> dict:
    """Hold out the largest size, fit `fit_size_curve` on the rest, and compare at the held-out size.

    Needs at least 3 distinct sizes (2 to fit a line, 1 to check it). The observed value at the
    held-out size is the mean of its entries (one per seed). Returns ``{"held_out_params",
    "predicted", "observed", "error" (predicted - observed), "abs_error", "fit"}``.
    """
    n, v = _check_size_data(params, values, 3)
    largest = float(n.max())
    held = n == largest
    fit = fit_size_curve(n[~held], v[~held])
    predicted = size_curve(largest, fit["slope"], fit["intercept"])
    observed = float(np.mean(v[held]))
    return {"held_out_params": largest, "predicted": predicted, "observed": observed,
            "error": predicted - observed, "abs_error": abs(predicted - observed), "fit": fit}
