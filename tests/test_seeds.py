"""The seed-aware comparison (sfn_train/evaluation/seeds.py): its arithmetic, its fallback below 3 seeds, and its
calibration by simulation with a seed effect as large as the lab's (the numbers docs/seeds.md states)."""

import math

import numpy as np
import pytest

from sfn_train.evaluation.seeds import (FALLBACK, METHOD, seed_aware_comparison, seed_aware_interval, t_ppf,
                                        t_sf)
from sfn_train.evaluation.stats import paired_bootstrap

P = 200  # problems, as in the lab's held-out set
TAU = 5.0  # sd of a training run's ability on the logit scale: per-seed accuracy sd ~0.4, as the lab's full fine-tune
SPREAD = 1.5  # sd of problem difficulty (logit)
ALPHA = 0.05


def simulate(rng, n: int, k: int, mu_a: float, mu_b: float) -> np.ndarray:
    """n studies x 2 variants x k seeds x P problems of greedy (0/1) results. Each study draws new problems
    (difficulty b_p) and each training run its own ability u ~ N(mu, TAU); run r answers problem p with probability
    sigmoid(u_r - b_p)."""
    b = rng.normal(0.0, SPREAD, (n, 1, 1, P))
    u = rng.normal(0.0, TAU, (n, 2, k, 1)) + np.array([mu_a, mu_b]).reshape(1, 2, 1, 1)
    return (rng.random((n, 2, k, P)) < 1 / (1 + np.exp(b - u))).astype(float)


def rejection_rate(studies: np.ndarray) -> float:
    return float(np.mean([seed_aware_comparison(s[0], s[1])["p_value"] < ALPHA for s in studies]))


@pytest.mark.parametrize("k", [3, 5])
def test_calibrated_under_no_difference_with_the_labs_seed_effect(k):
    studies = simulate(np.random.default_rng(2100 + k), 2000, k, 0.0, 0.0)
    seed_sd = studies.mean(axis=-1).std()
    assert 0.35 < seed_sd < 0.45, seed_sd  # the regime the lab showed (1.000 / 0.770 / 0.175)
    rate = rejection_rate(studies)
    mc = math.sqrt(ALPHA * (1 - ALPHA) / len(studies))
    assert rate <= ALPHA + 2 * mc, f"false-positive rate {rate:.4f} at {k} seeds"
    assert rate >= ALPHA - 4 * mc, f"rate {rate:.4f}: the test never rejects, so it cannot detect anything"
    # the per-problem test on the same data (seed-averaged scores; and one seed per variant, today's single run)
    # treats a training run's luck as a real difference
    pooled = np.mean([paired_bootstrap(s[0].mean(0), s[1].mean(0))["p_value"] < ALPHA for s in studies[:200]])
    single = np.mean([paired_bootstrap(s[0][0], s[1][0])["p_value"] < ALPHA for s in studies[:200]])
    print(f"k={k}: seed sd {seed_sd:.3f}; false positives: seed-aware {rate:.4f} (n=2000), per-problem on "
          f"seed means {pooled:.3f}, per-problem on one seed {single:.3f} (n=200)")
    assert pooled > 0.5 and single > 0.5


def test_power_for_a_difference_of_the_labs_size():
    rng = np.random.default_rng(2121)
    power = {}
    for k in (3, 5):
        studies = simulate(rng, 1000, k, 3.7, -3.7)  # +-3.7 on the logit scale: a mean difference of ~0.5
        diff = studies[:, 0].mean() - studies[:, 1].mean()
        assert 0.45 < diff < 0.55, diff
        power[k] = rejection_rate(studies)
    print(f"power for a 0.5 difference: {power[3]:.3f} at 3 seeds, {power[5]:.3f} at 5 seeds (n=1000 each)")
    assert 0.15 < power[3] < power[5]


def test_arithmetic_against_a_hand_computation():
    a = [[1, 1, 0, 1], [0, 1, 0, 0], [1, 1, 1, 1]]
    b = [[0, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 1], [0, 1, 0, 1]]
    r = seed_aware_comparison(a, b)
    sa, sb = np.array([0.75, 0.25, 1.0]), np.array([0.25, 0.0, 0.5, 0.5])
    dp = np.mean(a, axis=0) - np.mean(b, axis=0)
    parts = [(sa.var(ddof=1) / 3, 2), (sb.var(ddof=1) / 4, 3), (dp.var(ddof=1) / 4, 3)]
    var = sum(v for v, _ in parts)
    df = var ** 2 / sum(v * v / d for v, d in parts)
    t = (sa.mean() - sb.mean()) / math.sqrt(var)
    assert r["method"] == METHOD and r["seed_variance_estimable"] and (r["n_seeds_a"], r["n_seeds_b"]) == (3, 4)
    assert r["diff"] == pytest.approx(sa.mean() - sb.mean()) and r["df"] == pytest.approx(df)
    assert r["p_value"] == pytest.approx(2 * t_sf(t, df))
    assert r["ci_high"] - r["diff"] == pytest.approx(t_ppf(0.975, df) * math.sqrt(var))


def test_t_distribution_matches_scipy():
    st = pytest.importorskip("scipy.stats")
    for df in (1, 2, 2.7, 4, 30, 400):
        for t in (0.0, 0.5, 2.0, 9.0):
            assert t_sf(t, df) == pytest.approx(st.t.sf(t, df), rel=1e-8)
        assert t_ppf(0.975, df) == pytest.approx(st.t.ppf(0.975, df), rel=1e-9)


@pytest.mark.parametrize("ka,kb", [(1, 1), (2, 5), (5, 1)])
def test_fewer_than_three_seeds_says_seed_variance_cannot_be_estimated(ka, kb):
    rng = np.random.default_rng(ka * 10 + kb)
    a, b = rng.integers(0, 2, (ka, 30)).tolist(), rng.integers(0, 2, (kb, 30)).tolist()
    r = seed_aware_comparison(a, b)
    assert r["method"] == FALLBACK and not r["seed_variance_estimable"]
    assert "cannot be estimated" in r["note"] and "not a different training seed" in r["note"]
    assert r["p_value"] == paired_bootstrap(np.mean(a, 0), np.mean(b, 0))["p_value"]


def test_interval_covers_seed_spread_and_falls_back_below_three_seeds():
    wide = seed_aware_interval([[1.0] * 50, [0.77] * 50, [0.175] * 50])
    assert wide["n_seeds"] == 3 and (wide["min"], wide["max"]) == pytest.approx((0.175, 1.0))
    assert wide["ci_low"] < 0.3 and wide["ci_high"] == 1.0 and wide["method"] == METHOD
    one = seed_aware_interval([[1, 0] * 25])
    assert one["method"] == FALLBACK and not one["seed_variance_estimable"]


def test_no_variation_at_all():
    r = seed_aware_comparison([[1, 0, 1]] * 3, [[1, 0, 1]] * 3)
    assert (r["diff"], r["p_value"], r["ci_low"], r["ci_high"]) == (0.0, 1.0, 0.0, 0.0)


def test_rejects_mismatched_problems():
    with pytest.raises(ValueError, match="same problems"):
        seed_aware_comparison([[1, 0]] * 3, [[1, 0, 1]] * 3)
