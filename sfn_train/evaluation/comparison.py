"""`compare`: eval result files -> a Markdown report, two PNG plots, and a verdict per model against a baseline.

Why paired tests on shared problems only: a model is compared with the baseline on the problems both answered (ids
matched), so a run with `--limit` or a different task file cannot silently change the denominator. The verdict says
"better"/"worse" only when the paired bootstrap p-value is below 0.05; otherwise "no significant difference".

The plots are written next to the report (`plots.py`): `<stem>_accuracy.png` (pass@1 with 95% CI, one labelled
horizontal bar per model, grouped and sorted, baseline marked) and `<stem>_levels.png` (shares of levels I-IV in the
same order). When models come from `sfn sweep` (or carry an `sfn train` manifest), a section states each model's
learning rate and how it was chosen, next to its test result (`provenance.py`).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import SfnError
from .tokens import signature_differences
from .run import load_result
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
    results = [load_result(f) for f in files]
    labels = list(dict.fromkeys(r["model"]["label"] for r in results))
    baseline = baseline or labels[0]
    if baseline not in labels:
        raise SfnError(f"baseline {baseline!r} matches no model label; the labels are: {', '.join(labels)}.")
    by_key = {}
    for f, r in zip(files, results):
        key = (r["model"]["label"], r["task"]["name"])
        if key in by_key:
            raise SfnError(f"two files hold model {key[0]!r} on task {key[1]!r} (one is {f}); pass each result once.")
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
                   "ci_high": s["ci_high"], "ci_method": s.get("ci_method", "bootstrap"), "levels": s["level_shares"], "mean_tokens": s["mean_tokens"],
                   "tokens_per_s": s["tokens_per_s"], "n_problems": s["n_problems"], "delta": None,
                   "p_value": None, "verdict": "baseline" if label == baseline else "—"}
            if base is not None and label != baseline:
                mine, theirs = _per_problem(r), _per_problem(base)
                shared = [i for i in mine if i in theirs]
                if not shared:
                    notes.append(f"{label} / {task}: no problem ids shared with the baseline; not tested.")
                else:
                    test = paired_bootstrap([mine[i] for i in shared], [theirs[i] for i in shared], seed=seed)
                    row.update(delta=test["delta"], p_value=test["p_value"], n_shared=len(shared))
                    if test["p_value"] < ALPHA:
                        row["verdict"] = "better" if test["delta"] > 0 else "worse"
                    else:
                        row["verdict"] = "no significant difference"
                    if len(shared) != len(mine) or len(shared) != len(theirs):
                        notes.append(f"{label} / {task}: tested on the {len(shared)} problems shared with the baseline.")
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

    plots = [accuracy_plot(rows, tasks, baseline, out.with_name(f"{out.stem}_accuracy.png"), groups),
             levels_plot(rows, tasks, baseline, out.with_name(f"{out.stem}_levels.png"), groups)]
    trained = provenance_lines(rows, {label: r for (label, _), r in by_key.items()})
    out.write_text(_markdown(rows, baseline, notes, plots, files, trained), encoding="utf-8")
    return {"report": out, "plots": plots, "rows": rows}


def _sampling(result: dict) -> tuple:
    s = result["settings"]
    return tuple(s.get(k) for k in ("temperature", "top_p", "max_new_tokens", "samples", "budget_forcing",
                                    "chat_template", "end_of_thinking", "thinking_budget", "max_model_len"))


def _markdown(rows, baseline, notes, plots, files, trained=()) -> str:
    lines = [f"# Evaluation comparison (baseline: {baseline})", "",
             "pass@1 is averaged over each problem's samples; ± is the 95% bootstrap CI over problems, except where "
             "every problem scored the same (0/n, n/n): there the bootstrap has zero width and the 95% Wilson score "
             "interval over the n problems is given instead, marked W. "
             f"Δ is pass@1 minus the baseline's on shared problems, p from a paired bootstrap (two-sided, "
             f"{N_RESAMPLES} resamples: p<0.001 is the test's resolution, not a value); "
             f"a verdict other than 'no significant difference' needs p < {ALPHA}. "
             "Levels: I degenerate, II off task, III on task but wrong, IV correct.", "",
             "| model | task | pass@1 (95% CI) | Δ vs baseline (p) | verdict | I | II | III | IV | mean tokens | tokens/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        half = (r["ci_high"] - r["ci_low"]) / 2
        acc = f"{100 * r['pass_at_1']:.1f} ± {100 * half:.1f} [{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}]"
        acc += " W" if r["ci_method"] == "wilson" else ""
        delta = "—" if r["delta"] is None else f"{100 * r['delta']:+.1f} ({format_p(r['p_value'])})"
        lv = r["levels"]
        lines.append(f"| {r['model']} | {r['task']} | {acc} | {delta} | {r['verdict']} | "
                     + " | ".join(f"{100 * lv.get(k, 0):.0f}%" for k in ("I", "II", "III", "IV"))
                     + f" | {r['mean_tokens']:.0f} | {r['tokens_per_s']:.1f} |")
    lines += ["", *trained] if trained else []
    lines += ["", "## Verdicts", ""]
    for r in rows:
        if r["delta"] is not None:
            lines.append(f"- **{r['model']}** on {r['task']}: {r['verdict']} than {baseline} "
                         f"(Δ {100 * r['delta']:+.1f} points, {format_p(r['p_value'])}, n={r.get('n_shared')})."
                         if r["verdict"] in ("better", "worse") else
                         f"- **{r['model']}** on {r['task']}: no significant difference from {baseline} "
                         f"(Δ {100 * r['delta']:+.1f} points, {format_p(r['p_value'])}, n={r.get('n_shared')}).")
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    lines += ["", "## Inputs", ""] + [f"- {f}" for f in files]
    return "\n".join(lines) + "\n"
