"""`compare`: eval result files -> a Markdown report, two PNG plots, and a verdict per model against a baseline.

Why paired tests on shared problems only: a model is compared with the baseline on the problems both answered (ids
matched), so a run with `--limit` or a different task file cannot silently change the denominator. The verdict says
"better"/"worse" only when the paired bootstrap p-value is below 0.05; otherwise "no significant difference".

The plots are written next to the report: `<stem>_accuracy.png` (pass@1 with 95% CI error bars, grouped by task)
and `<stem>_levels.png` (stacked shares of levels I-IV per model and task).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import SfnError
from .generate import signature_differences
from .run import load_result
from .stats import N_RESAMPLES, format_p, paired_bootstrap, pass_at_1

ALPHA = 0.05
LEVEL_COLORS = {"I": "#b2182b", "II": "#ef8a62", "III": "#67a9cf", "IV": "#1a9850"}
LEVEL_NAMES = {"I": "I degenerate", "II": "II off task", "III": "III on task, wrong", "IV": "IV correct"}


def _per_problem(result: dict) -> dict[str, float]:
    ids = [str(p["id"]) for p in result["problems"]]
    values = pass_at_1([[s["correct"] for s in p["samples"]] for p in result["problems"]])
    return dict(zip(ids, values))


def compare(files: list, baseline: str | None = None, out: str | os.PathLike = "compare.md", *, seed: int = 0) -> dict:
    """Write the report and plots; return {"report", "plots", "rows"} (rows = one dict per model x task)."""
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
    plots = _plots(rows, labels, tasks, out)
    out.write_text(_markdown(rows, baseline, notes, plots, files), encoding="utf-8")
    return {"report": out, "plots": plots, "rows": rows}


def _sampling(result: dict) -> tuple:
    s = result["settings"]
    return tuple(s.get(k) for k in ("temperature", "top_p", "max_new_tokens", "samples", "budget_forcing",
                                    "chat_template", "end_of_thinking", "thinking_budget", "max_model_len"))


def _markdown(rows, baseline, notes, plots, files) -> str:
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


def _plots(rows, labels, tasks, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    acc_path = out.with_name(f"{out.stem}_accuracy.png")
    lvl_path = out.with_name(f"{out.stem}_levels.png")
    index = {(r["model"], r["task"]): r for r in rows}
    width = 0.8 / max(1, len(labels))

    fig, ax = plt.subplots(figsize=(max(5, 1.5 * len(tasks) * max(1, len(labels)) ** 0.5 + 2), 4))
    x = np.arange(len(tasks))
    for j, label in enumerate(labels):
        vals = [index.get((label, t)) for t in tasks]
        heights = [100 * v["pass_at_1"] if v else 0 for v in vals]
        err = np.array([[100 * (v["pass_at_1"] - v["ci_low"]) if v else 0 for v in vals],
                        [100 * (v["ci_high"] - v["pass_at_1"]) if v else 0 for v in vals]])
        ax.bar(x + (j - (len(labels) - 1) / 2) * width, heights, width, yerr=err, capsize=3, label=label)
    ax.set_xticks(x, tasks)
    ax.set_ylabel("pass@1 (%)")
    ax.set_ylim(0, 100)
    ax.set_title("pass@1 with 95% CI (bootstrap; W = Wilson, see report)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(acc_path, dpi=120)
    plt.close(fig)

    names = [f"{r['model']}\n{r['task']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(rows) + 2), 4))
    bottom = np.zeros(len(rows))
    for level, color in LEVEL_COLORS.items():
        share = np.array([100 * r["levels"].get(level, 0) for r in rows])
        ax.bar(names, share, bottom=bottom, color=color, label=LEVEL_NAMES[level])
        bottom += share
    ax.set_ylabel("share of responses (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Response levels")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1, 1))
    fig.tight_layout()
    fig.savefig(lvl_path, dpi=120)
    plt.close(fig)
    return [acc_path, lvl_path]
