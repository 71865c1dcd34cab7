"""`compare`: eval result files -> a Markdown report, two PNG plots, and a verdict per model against a baseline.

Why paired tests on shared problems only: a model is compared with the baseline on the problems both answered (ids
matched), so a run with `--limit` or a different task file cannot silently change the denominator. The verdict says
"better"/"worse" only when the paired bootstrap p-value is below 0.05; otherwise "no significant difference".

The plots are written next to the report (`plots.py`): `<stem>_accuracy.png` (pass@1 with 95% CI, one labelled
horizontal bar per model, grouped and sorted, baseline marked) and `<stem>_levels.png` (shares of levels I-IV in the
same order). When models come from `sfn sweep` (or carry an `sfn train` manifest), a section states each model's
learning rate and how it was chosen, next to its test result (`provenance.py`).

Seeds: results of models whose `sfn train` manifests differ only in the training seed (same recipe and base, read
from each model folder's manifest: `seeds.group_by_seed`) are one variant, one row: the number of seeds, mean pass@1,
the range over seeds, and an interval covering seeds and problems. Tests involving a variant are
`seeds.seed_aware_comparison`; a model not trained here (no training manifest) counts as fixed. With fewer than 3 seeds
a trained model's test covers problems only, and the report says so.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import SfnError
from .tokens import signature_differences
from .run import load_result
from .seeds import METHOD, MIN_SEEDS, group_by_seed, pool_seeds, results_test, training_manifest, variant_label
from .stats import N_RESAMPLES, format_p, paired_bootstrap, pass_at_1

ALPHA = 0.05


def _per_problem(result: dict) -> dict[str, float]:
    ids = [str(p["id"]) for p in result["problems"]]
    values = pass_at_1([[s["correct"] for s in p["samples"]] for p in result["problems"]])
    return dict(zip(ids, values))


def compare(files: list, baseline: str | None = None, out: str | os.PathLike = "compare.md", *, seed: int = 0,
            groups: dict[str, str] | None = None) -> dict:
    """Write the report and plots; return {"report", "plots", "rows"} (rows = one dict per model x task).
    `groups` (label -> group name, e.g. fine-tunes / merges / destruction) groups the plots' rows."""
    if not files:
        raise SfnError("no eval result files to compare; pass the JSON files `sfn eval` wrote.")
    results, trained, aliases = _variants([load_result(f) for f in files])
    labels = list(dict.fromkeys(r["model"]["label"] for r in results))
    baseline = aliases.get(baseline, baseline) or labels[0]
    if baseline not in labels:
        raise SfnError(f"baseline {baseline!r} matches no model label; the labels are: {', '.join(labels)}.")
    by_key = {}
    for r in results:
        key = (r["model"]["label"], r["task"]["name"])
        if key in by_key:
            raise SfnError(f"two files hold model {key[0]!r} on task {key[1]!r}; pass each result once.")
        by_key[key] = r
    tasks = list(dict.fromkeys(r["task"]["name"] for r in results))

    rows, notes = [], []
    for task in tasks:
        base = by_key.get((baseline, task))
        if base is None:
            notes.append(f"task {task}: no baseline result, so no Δ or verdict.")
        for label in labels:
            r = by_key.get((label, task))
            if r is None:
                continue
            s = r["summary"]
            row = {"model": label, "task": task, "pass_at_1": s["pass_at_1"], "ci_low": s["ci_low"],
                   "ci_high": s["ci_high"], "ci_method": s.get("ci_method", "bootstrap"), "levels": s["level_shares"],
                   "mean_tokens": s["mean_tokens"], "tokens_per_s": s["tokens_per_s"], "n_problems": s["n_problems"],
                   "n_seeds": s.get("n_seeds", 1), "seed_min": s.get("seed_min"), "seed_max": s.get("seed_max"),
                   "trained": trained[label], "delta": None, "p_value": None, "method": None,
                   "verdict": "baseline" if label == baseline else "—"}
            if base is not None and label != baseline:
                notes += _test_row(row, r, base, trained[label], trained[baseline], seed)
                diff = signature_differences(base["model"]["tokenizer_signature"], r["model"]["tokenizer_signature"])
                if diff:
                    notes.append(f"{label} / {task}: tokenizer differs from the baseline in {', '.join(diff)}.")
                if _sampling(r) != _sampling(base):
                    notes.append(f"{label} / {task}: sampling settings differ from the baseline's.")
            rows.append(row)

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from .plots import accuracy_plot, levels_plot
    from .provenance import provenance_lines

    groups = {aliases.get(k, k): v for k, v in groups.items()} if groups else groups
    plots = [accuracy_plot(rows, tasks, baseline, out.with_name(f"{out.stem}_accuracy.png"), groups),
             levels_plot(rows, tasks, baseline, out.with_name(f"{out.stem}_levels.png"), groups)]
    rates = provenance_lines(rows, {label: r for (label, _), r in by_key.items()})
    out.write_text(_markdown(rows, baseline, notes, plots, files, rates), encoding="utf-8")
    return {"report": out, "plots": plots, "rows": rows}


def _variants(results: list[dict]) -> tuple[list[dict], dict[str, bool], dict[str, str]]:
    """(results with each seed group pooled into one, label -> trained here, member label -> variant label)."""
    out, trained, aliases = [], {}, {}
    for group in group_by_seed(results):
        members = [results[i] for i in group]
        manifests = [training_manifest(r) for r in members]
        if len(group) == 1:
            out.append(members[0])
        else:
            seeds = [m["recipe"]["training"]["seed"] for m in manifests]
            label = variant_label([r["model"]["label"] for r in members], seeds)
            aliases.update({r["model"]["label"]: label for r in members})
            out.append(pool_seeds(members, seeds, label))
        trained[out[-1]["model"]["label"]] = manifests[0] is not None
    return out, trained, aliases


def _test_row(row: dict, r: dict, base: dict, trained: bool, base_trained: bool, seed: int) -> list[str]:
    """Fill the row's Δ, p, method and verdict against the baseline; return notes on what was tested."""
    label, task = row["model"], row["task"]
    mine, theirs = _per_problem(r), _per_problem(base)
    shared = [i for i in mine if i in theirs]
    if not shared:
        return [f"{label} / {task}: no problem ids shared with the baseline; not tested."]
    if "seed_runs" in r or "seed_runs" in base:  # pooled runs: every seed's problems, shared by all of them
        test = results_test(r, base, trained_a=trained, trained_b=base_trained, seed=seed)
    else:
        test = paired_bootstrap([mine[i] for i in shared], [theirs[i] for i in shared], seed=seed)
    n = test.get("n_shared", len(shared))
    row.update(delta=test["delta"], p_value=test["p_value"], n_shared=n, method=test.get("method"))
    row["verdict"] = ("no significant difference" if test["p_value"] >= ALPHA else
                      "better" if test["delta"] > 0 else "worse")
    notes = [f"{label} / {task}: {test['note']}"] if test.get("method") and test["method"] != METHOD else []
    if n != len(mine) or n != len(theirs):
        notes.append(f"{label} / {task}: tested on the {n} problems shared with the baseline.")
    return notes


def _sampling(result: dict) -> tuple:
    s = result["settings"]
    return tuple(s.get(k) for k in ("temperature", "top_p", "max_new_tokens", "samples", "budget_forcing",
                                    "chat_template", "end_of_thinking", "thinking_budget", "max_model_len"))


def _seeds(row) -> str:
    if row["method"] == METHOD:
        return f", {row['n_seeds']} seeds, seed-aware"
    return ", one training run: not tested against another seed" if row["trained"] and row["n_seeds"] == 1 else ""


def _seed_lines(rows) -> list[str]:
    """What the tests cover, as far as training seeds go: the seed-aware method, and the models trained too few times."""
    lines = []
    if any(r["n_seeds"] > 1 for r in rows):
        lines.append(f"Rows with several seeds are one variant trained on each (same recipe and base, read from the "
                     f"models' manifests): pass@1 is the mean over seeds, its interval covers seeds and problems, "
                     f"and Δ/p involving it come from a {METHOD} (docs/seeds.md); it needs {MIN_SEEDS} seeds per "
                     "trained side to estimate seed variance, and says where there were fewer.")
    once = [r["model"] for r in rows if r["trained"] and r["n_seeds"] == 1]
    if once:
        lines.append(f"Trained once ({', '.join(dict.fromkeys(once))}): their tests cover the sampling of problems "
                     "only; they do not cover a different training seed, which can move a fine-tune's score by more "
                     "than these differences.")
    return lines


def _markdown(rows, baseline, notes, plots, files, trained=()) -> str:
    lines = [f"# Evaluation comparison (baseline: {baseline})", "",
             "pass@1 is averaged over each problem's samples; ± is the 95% bootstrap CI over problems, except where "
             "every problem scored the same (0/n, n/n): there the bootstrap has zero width and the 95% Wilson score "
             "interval over the n problems is given instead, marked W. "
             f"Δ is pass@1 minus the baseline's on shared problems, p from a paired bootstrap (two-sided, "
             f"{N_RESAMPLES} resamples: p<0.001 is the test's resolution, not a value); "
             f"a verdict other than 'no significant difference' needs p < {ALPHA}. "
             "Levels: I degenerate, II off task, III on task but wrong, IV correct.", "",
             *[line + "\n" for line in _seed_lines(rows)],
             "| model | task | pass@1 (95% CI) | seeds | range over seeds | Δ vs baseline (p) | verdict | I | II | III | "
             "IV | mean tokens | tokens/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        half = (r["ci_high"] - r["ci_low"]) / 2
        acc = f"{100 * r['pass_at_1']:.1f} ± {100 * half:.1f} [{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}]"
        acc += " W" if r["ci_method"] == "wilson" else ""
        delta = "—" if r["delta"] is None else f"{100 * r['delta']:+.1f} ({format_p(r['p_value'])})"
        spread = "—" if r["n_seeds"] == 1 else f"{100 * r['seed_min']:.1f}–{100 * r['seed_max']:.1f}"
        lv = r["levels"]
        lines.append(f"| {r['model']} | {r['task']} | {acc} | {r['n_seeds']} | {spread} | {delta} | {r['verdict']} | "
                     + " | ".join(f"{100 * lv.get(k, 0):.0f}%" for k in ("I", "II", "III", "IV"))
                     + f" | {r['mean_tokens']:.0f} | {r['tokens_per_s']:.1f} |")
    lines += ["", *trained] if trained else []
    lines += ["", "## Verdicts", ""]
    for r in rows:
        if r["delta"] is not None:
            lines.append(f"- **{r['model']}** on {r['task']}: {r['verdict']} than {baseline} "
                         f"(Δ {100 * r['delta']:+.1f} points, {format_p(r['p_value'])}, n={r.get('n_shared')}{_seeds(r)})."
                         if r["verdict"] in ("better", "worse") else
                         f"- **{r['model']}** on {r['task']}: no significant difference from {baseline} "
                         f"(Δ {100 * r['delta']:+.1f} points, {format_p(r['p_value'])}, n={r.get('n_shared')}{_seeds(r)}).")
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    lines += ["", "## Inputs", ""] + [f"- {f}" for f in files]
    return "\n".join(lines) + "\n"
