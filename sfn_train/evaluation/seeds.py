"""Comparisons whose interval covers training seeds as well as test problems.

Why: a fine-tune's score moves with its training seed (data order, initialisation) far more than with the sample of
test problems. The lab's full fine-tune scored 1.000, 0.770 and 0.175 on seeds 42, 43, 44 with one recipe; a test
that resamples problems only (`stats.paired_bootstrap`) calls a one-seed difference "p<0.001" that the next seed can
reverse. Here the unit of replication is the training run, and problems are the second source of variance.

The method, named `METHOD` in every result, is a **seed-level Welch t-test with a problem-sampling term**:

- each seed's score is its mean pass@1 over the problems; a variant's score is the mean over its seeds;
- the variance of the difference of the two means is `s_a^2 / k_a + s_b^2 / k_b + s_p^2 / P`, where `s_a^2` and `s_b^2`
  are the sample variances of the seed scores (what another seed would do) and `s_p^2` the variance over the P
  problems of the per-problem difference, each side averaged over its seeds (what another sample of problems would
  do; the seed terms cannot see it, since every seed answered the same problems);
- the reference distribution is Student's t with Welch-Satterthwaite degrees of freedom over the three terms, so at 3
  seeds per side it has about 2-4 degrees of freedom and its interval is as wide as 3 seeds warrant.

With no seed variance it reduces to a paired test over problems; with much seed variance it is Welch's t over runs
(Bouthillier et al. 2021 recommend comparing over runs; Dodge et al. 2020 show how far fine-tuning moves with the seed).
Why not the alternatives: an exact permutation test over seeds cannot go below p = 0.1 with 3 seeds per side
(2 of the 20 relabellings are as extreme as the observed one); a two-level bootstrap (seeds, then problems) resamples
3 seeds into at most 10 distinct sets and underestimates their variance, so it rejects too often at 3 seeds (see
docs/seeds.md for the simulated rates).

What it needs: at least 3 seeds on each side (`MIN_SEEDS`). With fewer, seed variance cannot be estimated, and the
result falls back to the paired bootstrap over problems on the seed-averaged scores, says so in `method` and `note`,
and sets `seed_variance_estimable` False: its p-value then does not cover a different training seed.

Calibration (tests/test_seeds.py, simulated with a seed effect as large as the lab's): see docs/seeds.md.
"""

from __future__ import annotations

import math

import numpy as np

from ..manifest import MANIFEST_FILE, read_json
from .stats import bootstrap_ci, paired_bootstrap

METHOD = "seed-level Welch t with a problem term (seeds + problems)"
FALLBACK = "paired bootstrap over problems (seed-averaged; seed variance not estimated)"
MIN_SEEDS = 3
LEVEL = 0.95
NOT_SEEDS = "this test covers the sampling of problems only, not a different training seed"


def _scores(x, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=float)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name}: scores must be a non-empty list (seeds) of lists (problems), got shape {arr.shape}")
    return arr


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), by its continued fraction (modified Lentz)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast only below this point; use the symmetry
        return 1.0 - _betainc(b, a, 1.0 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return front * h


def t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with `df` degrees of freedom (df > 0, not necessarily an integer)."""
    tail = 0.5 * _betainc(df / 2, 0.5, df / (df + t * t))
    return tail if t >= 0 else 1.0 - tail


def t_ppf(q: float, df: float) -> float:
    """The q-quantile of Student's t (0.5 <= q < 1). Newton's method from the normal quantile, which lies below it;
    the tail is convex there, so the steps rise to the root without overshooting."""
    from statistics import NormalDist

    t = NormalDist().inv_cdf(q)
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    for _ in range(100):
        pdf = math.exp(log_norm - (df + 1) / 2 * math.log1p(t * t / df))
        step = (t_sf(t, df) - (1 - q)) / pdf
        t += step
        if abs(step) < 1e-12 * max(1.0, t):
            break
    return t


def _t_test(diff: float, parts: list[tuple[float, int]]) -> tuple[float, float, float, float]:
    """(p_value, ci_low, ci_high, df) for `diff` with variance sum(v) over parts (v, degrees of freedom)."""
    var = sum(v for v, _ in parts)
    if var <= 0.0:  # every seed and every problem gave the same difference: nothing varies
        return (1.0 if diff == 0.0 else 0.0), diff, diff, math.inf
    df = var * var / sum(v * v / d for v, d in parts if d > 0 and v > 0)
    se = math.sqrt(var)
    half = t_ppf(0.5 + LEVEL / 2, df) * se
    p = 2 * t_sf(abs(diff) / se, df)
    return min(1.0, p), diff - half, diff + half, float(df)


def seed_aware_comparison(a: list[list[float]], b: list[list[float]], *, fixed_a: bool = False,
                          fixed_b: bool = False, seed: int = 0) -> dict:
    """Test mean pass@1 of variant `a` minus variant `b`, covering both training seeds and test problems.

    `a` and `b` hold one list per training seed of per-problem scores (pass@1 of each problem), every list over the
    same problems in the same order. `fixed_a` / `fixed_b`: that side is one model not trained here (a base, a
    released checkpoint, a merge of such): it has no seed variance and holds one list. Returns:

    - `diff` (also `delta`): mean over a's seeds minus mean over b's seeds; `ci_low`, `ci_high`: its 95% interval;
    - `p_value`: two-sided; `method`: `METHOD`, or `FALLBACK` with fewer than `MIN_SEEDS` seeds on a trained side;
    - `n_seeds_a`, `n_seeds_b`, `n_problems` (also `n`), `seed_variance_estimable`;
    - `mean_a`, `mean_b`, `seeds_a`, `seeds_b` (each seed's mean), `df` (None for the fallback);
    - `note`: one sentence on what the interval and p cover.
    """
    A, B = _scores(a, "a"), _scores(b, "b")
    if A.shape[1] != B.shape[1]:
        raise ValueError(f"a and b must score the same problems: {A.shape[1]} vs {B.shape[1]}")
    ka, kb, n = A.shape[0], B.shape[0], A.shape[1]
    for name, fixed, k in (("a", fixed_a, ka), ("b", fixed_b, kb)):
        if fixed and k != 1:
            raise ValueError(f"{name} is a fixed model (not trained) but holds {k} runs; a fixed model holds one")
    seeds_a, seeds_b = A.mean(axis=1), B.mean(axis=1)
    diff = float(seeds_a.mean() - seeds_b.mean())
    per_problem = A.mean(axis=0) - B.mean(axis=0)
    out = {"diff": diff, "delta": diff, "n_seeds_a": ka, "n_seeds_b": kb, "n_problems": n, "n": n,
           "mean_a": float(seeds_a.mean()), "mean_b": float(seeds_b.mean()),
           "seeds_a": seeds_a.tolist(), "seeds_b": seeds_b.tolist()}
    trained = [k for k, fixed in ((ka, fixed_a), (kb, fixed_b)) if not fixed]
    if not trained or min(trained) < MIN_SEEDS:
        test = paired_bootstrap(A.mean(axis=0), B.mean(axis=0), seed=seed)
        fewest = "" if not trained else "one seed" if min(trained) == 1 else f"{min(trained)} seeds"
        note = ("neither model was trained here, so the test covers the sampling of problems" if not trained else
                f"{fewest} on a trained side: seed variance cannot be estimated (it needs {MIN_SEEDS} seeds per "
                f"side), so {NOT_SEEDS}")
        return {**out, "p_value": test["p_value"], "ci_low": test["ci_low"], "ci_high": test["ci_high"],
                "method": FALLBACK if trained else "paired bootstrap over problems", "seed_variance_estimable": False,
                "df": None, "note": note + "."}
    parts = [(0.0, 0) if fixed_a else (float(seeds_a.var(ddof=1)) / ka, ka - 1),
             (0.0, 0) if fixed_b else (float(seeds_b.var(ddof=1)) / kb, kb - 1),
             (float(per_problem.var(ddof=1)) / n if n > 1 else 0.0, n - 1)]
    p, low, high, df = _t_test(diff, parts)
    sides = " vs ".join("a fixed model" if fixed else f"{k} seeds" for k, fixed in ((ka, fixed_a), (kb, fixed_b)))
    return {**out, "p_value": p, "ci_low": low, "ci_high": high, "method": METHOD, "seed_variance_estimable": True,
            "df": df, "note": f"the 95% interval and p cover both training seeds ({sides}) and the {n} problems."}


def seed_aware_interval(a: list[list[float]], *, seed: int = 0) -> dict:
    """One variant's mean pass@1 over seeds with a 95% interval covering seeds and problems (the same variance terms
    as `seed_aware_comparison`, one side). Returns {mean, ci_low, ci_high, min, max, n_seeds, n_problems, method,
    seed_variance_estimable}; `min`/`max` are the range of the seed means. Fewer than `MIN_SEEDS` seeds: the bootstrap
    interval over problems of the seed-averaged scores, with `method` saying so."""
    A = _scores(a, "a")
    k, n = A.shape
    seeds = A.mean(axis=1)
    out = {"mean": float(seeds.mean()), "min": float(seeds.min()), "max": float(seeds.max()), "n_seeds": k,
           "n_problems": n, "seeds": seeds.tolist()}
    if k < MIN_SEEDS:
        mean, low, high = bootstrap_ci(A.mean(axis=0), seed=seed)
        return {**out, "ci_low": low, "ci_high": high, "method": FALLBACK, "seed_variance_estimable": False}
    parts = [(float(seeds.var(ddof=1)) / k, k - 1), (float(A.mean(axis=0).var(ddof=1)) / n if n > 1 else 0.0, n - 1)]
    _, low, high, _ = _t_test(out["mean"], parts)
    return {**out, "ci_low": max(0.0, low), "ci_high": min(1.0, high), "method": METHOD,
            "seed_variance_estimable": True}


def per_seed_scores(results: list[dict]) -> tuple[list[str], list[list[float]]]:
    """(problem ids, scores): the per-problem pass@1 of each `sfn eval` result (one per seed) on the problems every
    result answered, in the first result's order."""
    tables = [{str(p["id"]): float(np.mean([s["correct"] for s in p["samples"]])) if p["samples"] else 0.0
               for p in r["problems"]} for r in results]
    ids = [i for i in tables[0] if all(i in t for t in tables[1:])]
    return ids, [[t[i] for i in ids] for t in tables]


def pool_seeds(results: list[dict], seeds: list[int], label: str | None = None) -> dict:
    """One result standing for a variant trained on several seeds: `results` are its `sfn eval` results on one task,
    one per training seed (`seeds`, same order). Tables and tests read it like any result:

    - `problems`: the problems every seed answered, each with the samples of every seed;
    - `summary`: `pass_at_1` the mean over seeds, `ci_low`/`ci_high` from `seed_aware_interval`, `ci_method` "seeds"
      (or "bootstrap" over seed-averaged problems below `MIN_SEEDS` seeds), `n_seeds`, `seed_min`/`seed_max` (the
      range of the seed means), level shares, tokens and speed averaged over seeds;
    - `seed_runs`: {"seeds", "results"}, what `seed_aware_comparison` is run on."""
    if not results or len(results) != len(seeds):
        raise ValueError(f"pool_seeds: {len(results)} results for {len(seeds)} seeds")
    tasks = {r["task"]["name"] for r in results}
    if len(tasks) != 1:
        raise ValueError(f"pool_seeds: one task per pool, got {sorted(tasks)}")
    ids, scores = per_seed_scores(results)
    if not ids:
        raise ValueError(f"pool_seeds: the {len(results)} results share no problem ids")
    interval = seed_aware_interval(scores)
    by_id = [{str(p["id"]): p for p in r["problems"]} for r in results]
    problems = [{**by_id[0][i], "samples": [s for table in by_id for s in table[i]["samples"]]} for i in ids]
    summaries = [r["summary"] for r in results]
    avg = lambda key: float(np.mean([s[key] for s in summaries]))  # noqa: E731
    summary = {"pass_at_1": interval["mean"], "ci_low": interval["ci_low"], "ci_high": interval["ci_high"],
               "ci_level": LEVEL, "ci_method": "seeds" if interval["seed_variance_estimable"] else "bootstrap",
               "n_seeds": len(results), "seed_min": interval["min"], "seed_max": interval["max"],
               "seed_means": interval["seeds"], "n_problems": len(ids),
               "n_responses": sum(s["n_responses"] for s in summaries),
               "level_shares": {lv: float(np.mean([s["level_shares"].get(lv, 0.0) for s in summaries]))
                                for lv in ("I", "II", "III", "IV")},
               "mean_tokens": avg("mean_tokens"), "tokens_per_s": avg("tokens_per_s"),
               "total_tokens": sum(s.get("total_tokens", 0) for s in summaries),
               "generation_seconds": sum(s.get("generation_seconds", 0.0) for s in summaries)}
    model = {**results[0]["model"], "label": label or results[0]["model"]["label"]}
    return {**results[0], "model": model, "problems": problems, "summary": summary,
            "seed_runs": {"seeds": list(seeds), "results": list(results)}}


def runs_of(result: dict) -> list[dict]:
    """The per-seed results behind `result`: its `seed_runs` when pooled, else the result itself."""
    return result["seed_runs"]["results"] if "seed_runs" in result else [result]


def results_test(a: dict, b: dict, *, trained_a: bool, trained_b: bool, seed: int = 0) -> dict:
    """`seed_aware_comparison` of two `sfn eval` results (each pooled over seeds by `pool_seeds`, or one run) on the
    problems every run answered. A one-run side that was not trained (`trained_*` False) is a fixed model. Adds
    `n_shared`, the number of problems tested."""
    runs_a, runs_b = runs_of(a), runs_of(b)
    ids, scores = per_seed_scores(runs_a + runs_b)
    test = seed_aware_comparison(scores[:len(runs_a)], scores[len(runs_a):], seed=seed,
                                 fixed_a=not trained_a and len(runs_a) == 1, fixed_b=not trained_b and len(runs_b) == 1)
    return {**test, "n_shared": len(ids)}


# Keys of a training recipe that name a run rather than define it: two runs that differ only in these (and the seed)
# are the same variant trained on different seeds.
RUN_KEYS = ("seed", "data_seed", "output_dir", "logging_dir", "run_name", "resume_from_checkpoint", "hub_model_id")


def training_manifest(result: dict) -> dict | None:
    """The `sfn train` manifest of the model an eval result names (its folder's sfn_manifest.json), else None."""
    from pathlib import Path

    path = result.get("model", {}).get("path")
    manifest = read_json(Path(path) / MANIFEST_FILE) if path else None
    return manifest if isinstance(manifest, dict) and manifest.get("kind") == "train" else None


def variant_key(manifest: dict) -> str:
    """What defines a trained variant: the resolved recipe without the run's name, place and seed, and the base
    checkpoint (its fingerprint, or its path where it had none)."""
    import json

    recipe = {part: dict(keys) for part, keys in manifest.get("recipe", {}).items()}
    for key in RUN_KEYS:
        recipe.get("training", {}).pop(key, None)
    base = manifest.get("base", {})
    return json.dumps({"recipe": recipe, "base": base.get("fingerprint") or base.get("model_name_or_path")},
                      sort_keys=True, default=str)


def variant_label(labels: list[str], seeds: list[int]) -> str:
    """The name of a variant from its runs' labels: each label without its seed ("full-s42", "full_seed43" -> "full")
    where that leaves one name, else the first label followed by "+seeds"."""
    import re

    names = {re.sub(rf"[-_. ]*(?:seed|s)?[-_=]?{seed}(?!\d)", "", label).strip("-_. ") for label, seed in zip(labels, seeds)}
    return names.pop() if len(names) == 1 and "" not in names else f"{labels[0]}+seeds"


def group_by_seed(results: list[dict]) -> list[list[int]]:
    """Indices of `results` grouped into variants: results on the same task whose models' training manifests agree
    on everything but the seed and the run's name and place (`variant_key`), with distinct seeds. Every other result
    is a group of its own. Groups keep the order of their first result."""
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(results):
        manifest = training_manifest(r)
        key = (r["task"]["name"], variant_key(manifest)) if manifest else ("single", i)
        groups.setdefault(key, []).append(i)
    out = []
    for members in groups.values():
        seeds = [training_manifest(results[i])["recipe"]["training"].get("seed") for i in members] \
            if len(members) > 1 else [None]
        out += [members] if len(set(seeds)) == len(members) else [[i] for i in members]
    return sorted(out, key=lambda g: g[0])
