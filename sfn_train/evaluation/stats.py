"""Statistics over problems: pass@1, bootstrap confidence intervals, paired bootstrap tests.

Why bootstrap over *problems*: the samples of one problem are not independent (same difficulty), so the unit that is
resampled is the problem, and pass@1 of a problem is the mean correctness of its n samples. Why *paired*: two models
answered the same problems, and most of the variance is problem difficulty; resampling problem-wise differences
removes it, so real but small differences become visible (Dror et al. 2018; the usual practice for MATH/AIME).

Why a Wilson interval when every problem has the same score (0/n and n/n included): resampling identical values gives
identical means, so the bootstrap interval has zero width, which would claim certainty from n problems. The Wilson
score interval over the n problems (the resampling unit) has a width that shrinks with n, e.g. [0, 0.161] for 0/20.
`summarize` says which one it used in `ci_method`.

Why `p<0.001`: the paired test's p-value is (k + 1) / (B + 1); with B = 2000 resamples the smallest value is 1/2001, so
a printed "p=0.000" would claim a resolution the test does not have. `format_p` prints such values as a bound.

All functions are seeded and deterministic.
"""

from __future__ import annotations

import math

import numpy as np

N_RESAMPLES = 2000
Z_95 = 1.959963984540054


def pass_at_1(per_problem: list[list[bool]]) -> list[float]:
    """Per-problem pass@1: the mean correctness of each problem's samples."""
    return [float(np.mean(s)) if len(s) else 0.0 for s in per_problem]


def bootstrap_ci(values, *, n_resamples: int = N_RESAMPLES, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap CI of the mean of `values` (one value per problem)."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return 0.0, 0.0, 0.0
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_resamples, x.size))].mean(axis=1)
    alpha = (1.0 - level) / 2
    return float(x.mean()), float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def wilson_interval(mean: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a proportion `mean` observed over `n` trials (default 95%)."""
    if n <= 0:
        return 0.0, 0.0
    z2 = z * z
    centre = (mean + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(mean * (1 - mean) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def format_p(p: float, n_resamples: int = N_RESAMPLES) -> str:
    """The p-value as printed: "p=0.042", or a bound ("p<0.001") below what 3 decimals or the resampling resolve."""
    floor = max(1e-3, 10 ** math.ceil(math.log10(1 / (n_resamples + 1))))
    if p < floor or p <= 1 / (n_resamples + 1):
        return f"p<{floor:g}"
    return f"p={p:.3f}"


def paired_bootstrap(a, b, *, n_resamples: int = N_RESAMPLES, seed: int = 0) -> dict:
    """Two-sided paired bootstrap test of mean(a) - mean(b) over the same problems.

    The bootstrap distribution of the mean difference is shifted to mean zero (the null hypothesis) and the p-value
    is the share of resampled differences at least as far from zero as the observed one, counted as
    (k + 1) / (B + 1) so that it is never exactly 0. Returns {delta, p_value, ci_low, ci_high, n}.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired test needs the same problems: {a.shape} vs {b.shape}")
    if a.size == 0:
        return {"delta": 0.0, "p_value": 1.0, "ci_low": 0.0, "ci_high": 0.0, "n": 0}
    d = a - b
    observed = float(d.mean())
    rng = np.random.default_rng(seed)
    boot = d[rng.integers(0, d.size, size=(n_resamples, d.size))].mean(axis=1)
    extreme = np.abs(boot - observed) >= abs(observed) - 1e-12
    p = (int(extreme.sum()) + 1) / (n_resamples + 1)
    return {"delta": observed, "p_value": float(min(1.0, p)), "ci_low": float(np.quantile(boot, 0.025)),
            "ci_high": float(np.quantile(boot, 0.975)), "n": int(d.size)}


def summarize(per_problem_correct: list[list[bool]], tokens: list[int], seconds: float, levels: list[str],
              *, seed: int = 0) -> dict:
    """The summary block of an eval output: pass@1 with CI, level shares, length and speed."""
    values = pass_at_1(per_problem_correct)
    mean, low, high = bootstrap_ci(values, seed=seed)
    method = "bootstrap"
    if values and min(values) == max(values):  # zero-width bootstrap: every problem scored the same
        low, high = wilson_interval(mean, len(values))
        method = "wilson"
    total = sum(tokens)
    return {
        "pass_at_1": mean, "ci_low": low, "ci_high": high, "ci_level": 0.95, "ci_method": method,
        "bootstrap_resamples": N_RESAMPLES,
        "n_problems": len(values), "n_responses": len(tokens),
        "level_shares": {lv: (levels.count(lv) / len(levels) if levels else 0.0) for lv in ("I", "II", "III", "IV")},
        "mean_tokens": total / len(tokens) if tokens else 0.0,
        "total_tokens": total, "generation_seconds": seconds,
        "tokens_per_s": total / seconds if seconds > 0 else 0.0,
    }
