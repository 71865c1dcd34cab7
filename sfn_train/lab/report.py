"""`lab/report.md`: the paper's Tables 1-3 at lab scale, the learning rates and how they were chosen, the delta and
scale plots, and what this run found and what the lab cannot show.

The report reads a plain record of the run (`lab_run.json`: size, seed, variants with their folders and learning
rates, merges, destruction layers, timings, scale results) and the files the stages wrote (eval JSONs, manifests,
trainer states, sweep.json, delta.json); it never imports the pipeline. Findings are sentences chosen by comparing
those numbers with paired tests, never fixed text.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..evaluation import compare, load_result
from ..evaluation.stats import format_p
from ..evaluation.tables import fmt_acc as _acc
from ..evaluation.tables import fmt_test as _fmt_test
from ..evaluation.tables import level_shares as _levels
from ..evaluation.tables import majority_level as _majority_level
from ..evaluation.tables import paired_test as _test
from ..manifest import MANIFEST_FILE

ALPHA = 0.05
CHANCE = 0.1  # ten possible answers
KNOWS_STEPS = 0.9  # single-step accuracy at which the lab calls A "knowing the steps"


# ---------------------------------------------------------------------------------------------------------------
# Small readers


def params_of(folder: Path) -> int:
    from ..checkpoint import Checkpoint

    return sum(math.prod(info.shape) for info in Checkpoint(folder).tensors.values())


def _n_steps(problem: dict) -> int:
    return problem.get("solution", "").count("=")


def by_steps(result: dict) -> dict[int, float]:
    """pass@1 per number of steps in the problem."""
    groups: dict[int, list[float]] = {}
    for p in result["problems"]:
        groups.setdefault(_n_steps(p), []).append(sum(s["correct"] for s in p["samples"]) / len(p["samples"]))
    return {k: sum(v) / len(v) for k, v in sorted(groups.items())}


def step_written(result: dict) -> float:
    """Share of single-step responses that begin with the step written exactly as the reasoning traces write it
    ("7+5=2."): the knowledge in the notation the fine-tunes chain."""
    hits = 0
    for p in result["problems"]:
        step = p["solution"].split(" The answer")[0]
        hits += sum(s["response"].strip().startswith(step) for s in p["samples"])
    return hits / sum(len(p["samples"]) for p in result["problems"])


def answered_directly(result: dict) -> float:
    """Share of responses that give the answer with no step written out."""
    samples = [s for p in result["problems"] for s in p["samples"]]
    return sum("=" not in s["response"] for s in samples) / len(samples)


def _loss_curve(root: Path, out: Path) -> tuple[Path | None, list[tuple[int, float]]]:
    state = root / "base" / "trainer_state.json"
    if not state.exists():
        return None, []
    history = json.loads(state.read_text()).get("log_history", [])
    points = [(h["step"], h["loss"]) for h in history if "loss" in h]
    if not points:
        return None, []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(*zip(*points), marker=".")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.set_title("Base model A: pre-training")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out, points


# ---------------------------------------------------------------------------------------------------------------
# Plots of the sweeps and of the scale stage


def _sweeps_plot(sweeps: dict[str, dict], out: Path) -> Path | None:
    """Validation loss vs learning rate, one line per fine-tune variant, its chosen rate starred."""
    if not sweeps:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..sweep import log_scale_if_wide

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    cmap = plt.get_cmap("tab10")
    values = []
    for i, (variant, summary) in enumerate(sweeps.items()):
        metric = summary["metric"]
        rows = sorted((r for r in summary["points"] if r.get(metric) is not None), key=lambda r: r["learning_rate"])
        ax.plot([r["learning_rate"] for r in rows], [r[metric] for r in rows], marker="o", color=cmap(i),
                label=variant)
        values += [r[metric] for r in rows]
        for r in rows:
            if r["best"]:
                ax.plot(r["learning_rate"], r[metric], marker="*", markersize=15, color=cmap(i),
                        markeredgecolor="black", linestyle="none")
    ax.set_xscale("log")
    log_scale_if_wide(ax, values)
    ax.set_xlabel("learning rate")
    ax.set_ylabel(f"validation {metric}")
    ax.set_title("Learning-rate sweeps (star = the rate each variant uses)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


def _scale_plot(scale: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = sorted(scale["points"], key=lambda p: p["params"])
    fig, (acc_ax, ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    x = [p["params"] for p in pts]
    # left: the accuracies the gap is made of, so a reader sees which side moved
    for label, key, color in (("A (no fine-tune)", "A", "#999999"), ("full", "full", "#4c72b0"),
                              ("o_proj only", "oproj", "#dd8452")):
        acc_ax.plot(x, [100 * p["pass_at_1"][key] for p in pts], marker="o", label=label, color=color)
    acc_ax.set_ylim(0, 105)
    acc_ax.set_xlabel("parameters of A (log)")
    acc_ax.set_ylabel("pass@1 (%)")
    acc_ax.set_title("Accuracy per size", fontsize=10)
    acc_ax.legend(fontsize=8, loc="best")
    acc_ax.grid(alpha=0.3, which="both")
    y = [100 * p["gap"] for p in pts]
    err = [[100 * (p["gap"] - p["gap_ci"][0]) for p in pts], [100 * (p["gap_ci"][1] - p["gap"]) for p in pts]]
    ax.errorbar(x, y, yerr=err, marker="o", capsize=4, color="#4c72b0")
    for p, xi, yi in zip(pts, x, y):
        ax.annotate(f"{p['size']}: {yi:+.1f} ({format_p(p['p_value'])})", (xi, yi), textcoords="offset points",
                    xytext=(6, 6), fontsize=8)
    ax.axhline(0, color="black", linewidth=0.8)
    for a in (acc_ax, ax):  # one labelled tick per size instead of log decades
        a.set_xscale("log")
        a.set_xticks(x, [f"{p['size']}\n{p['params'] / 1e6:.2f}M" for p in pts])
        a.minorticks_off()
    ax.set_xlabel("parameters of A (log)")
    ax.set_ylabel("full − o_proj pass@1 (points)")
    ax.set_title("Gap full − o_proj vs model size\n(95% paired-bootstrap CI)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# ---------------------------------------------------------------------------------------------------------------
# The report


def write_report(root: str | Path) -> Path:
    root = Path(root)
    run = json.loads((root / "lab_run.json").read_text())
    seed, variants, merges = run["seed"], run["variants"], run["merges"]
    ev = root / "evals"
    groups = {"A": "fine-tunes", **{v: "fine-tunes" for v in variants}, **{m: "merges" for m in merges}}
    groups.update({label: "destruction of B" for label in run["models"] if label not in groups})
    files = [ev / f"{label}__lab_reason.json" for label in run["models"]]
    compare(files, baseline="full", out=root / "compare.md", seed=seed, groups=groups)
    results = {label: load_result(ev / f"{label}__lab_reason.json") for label in ["A", *variants, *merges]}
    onestep = load_result(ev / "A__lab_onestep.json")
    n_params = params_of(root / "base")

    lines = [f"# SfN lab report (size {run['size_name']}, seed {seed})", ""]
    lines += _base_section(root, run, results["A"], onestep, n_params)
    lines += _rates_section(root, run)
    lines += _finetune_section(run, results)
    lines += _merge_section(run, results)
    destroy_lines, destroy = _destroy_section(run, ev)
    lines += destroy_lines
    delta_lines, ranking = _delta_section(root)
    lines += delta_lines
    if run.get("scale"):
        lines += _scale_section(root, run["scale"])
    lines += ["## What this run found", ""]
    lines += [f"- {s}" for s in _findings(results, onestep, destroy, ranking, variants, run, seed)]
    lines += ["", "## What the lab can and cannot show at this scale", ""]
    lines += [f"- {s}" for s in _limits(results, onestep, run, n_params, seed)]
    lines += ["", "Full comparison table and plots (baseline B): [compare.md](compare.md).", "",
              "## Run", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {name} | {seconds:.1f} |" for name, seconds in run["timings"].items()]
    lines.append("")
    out = root / "report.md"
    out.write_text("\n".join(lines), encoding="utf-8")
    return out


def _base_section(root: Path, run: dict, a: dict, onestep: dict, n_params: int) -> list[str]:
    size = run["size"]
    curve_png, curve = _loss_curve(root, root / "base_loss.png")
    lines = [
        "Everything below was measured in this run; the lab's design is in `sfn_train/lab/problems.py` "
        "(modular-arithmetic chains) and `sfn_train/lab/pipeline.py`. Task `lab_reason`: "
        f"{a['summary']['n_problems']} held-out problems of {', '.join(map(str, run['reason_steps']))} steps, greedy "
        "decoding, exact match of the boxed answer; pass@1 with a 95% bootstrap CI over problems (a Wilson score "
        "interval where every problem scored the same, e.g. 0/n, since the bootstrap then has zero width); Δ and p from "
        "a paired bootstrap over the same problems. Levels I/II/III/IV are the shares of responses at each level (rules in "
        "`sfn_train/evaluation/levels.py`). One training run per variant: the intervals and tests cover the sampling "
        "of test problems, not a different training seed (`sfn lab --seeds 3` compares over seeds).", "",
        "## Base model A: single steps and chains", "",
        f"A small Qwen2 ({n_params:,} parameters, {size['layers']} layers, hidden {size['hidden']}) pre-trained from "
        "scratch on the 260 facts in the traces' notation (`Compute 7+5 mod 10.` -> `7+5=2.`), one-step problems "
        "answered by writing that step, and multi-step problems answered directly.", "",
        "| A on | pass@1 [95% CI] | what else |", "|---|---|---|",
        f"| single-step problems (`lab_onestep`, never seen in this form) | {_acc(onestep)} | "
        f"{step_written(onestep):.0%} of responses start with the exact step of the traces (e.g. `7+5=2.`) |",
        f"| multi-step problems, answered directly (`lab_reason`) | {_acc(a)} | chance {CHANCE}; "
        f"{answered_directly(a):.0%} answered with no step written; by steps: "
        + ", ".join(f"{k}: {v:.2f}" for k, v in by_steps(a).items()) + " |", "",
    ]
    if curve:
        lines += [f"Training loss {curve[0][1]:.3f} at step {curve[0][0]} -> {curve[-1][1]:.3f} at step {curve[-1][0]}.",
                  "", f"![base loss]({curve_png.name})", ""]
    return lines


def _finetune_section(run: dict, results: dict) -> list[str]:
    """Table 2: the fine-tune variants against B = full."""
    seed, a, b = run["seed"], results["A"], results["full"]
    lines = ["## Fine-tunes on reasoning traces (the paper's Table 2)", "",
             "Same data, epochs and recipe except `trainable_modules` (and the learning rate, each variant's own); "
             "baseline B = full.", "",
             "| model | tuned | trainable params | learning rate | steps/s | train time (s) | peak RSS (MB) | "
             "pass@1 [95% CI] | Δ vs B (p) | by steps | levels I/II/III/IV |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for variant, info in run["variants"].items():
        folder = Path(info["folder"])
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
        metrics = manifest["metrics"]
        stats = _train_stats(folder)
        r = results[variant]
        test = "—" if variant == "full" else _fmt_test(_test(r, b, seed))
        steps = ", ".join(f"{v:.2f}" for v in by_steps(r).values())
        lines.append(f"| {variant} | {info['tuned']} | {manifest['selection']['trainable_params']:,} "
                     f"({manifest['selection']['trainable_fraction']:.1%}) | {info['learning_rate']:g} | "
                     f"{metrics['train_steps_per_second']:.2f} | {metrics['train_runtime']:.1f} | "
                     f"{stats.get('peak_rss_mb', float('nan')):.0f} | {_acc(r)} | {test} | {steps} | {_levels(r)} |")
    lines.append(f"| A | — | 0 | — | — | — | — | {_acc(a)} | {_fmt_test(_test(a, b, seed))} | "
                 f"{', '.join(f'{v:.2f}' for v in by_steps(a).values())} | {_levels(a)} |")
    return lines + ["", "By steps: pass@1 on the problems of " + ", ".join(map(str, run["reason_steps"])) + " steps.",
                    ""]


def _merge_section(run: dict, results: dict) -> list[str]:
    """Table 1: A with B's modules, against A."""
    seed, a, b = run["seed"], results["A"], results["full"]
    lines = ["## Merges: A with B's modules, no further training (the paper's Table 1)", "",
             "| model | replaced | pass@1 [95% CI] | Δ vs A (p) | mean tokens | levels I/II/III/IV |",
             "|---|---|---|---|---|---|"]
    lines.append(f"| A | — | {_acc(a)} | — | {a['summary']['mean_tokens']:.1f} | {_levels(a)} |")
    for merge, modules in run["merges"].items():
        r = results[merge]
        lines.append(f"| {merge} | {modules} | {_acc(r)} | {_fmt_test(_test(r, a, seed))} | "
                     f"{r['summary']['mean_tokens']:.1f} | {_levels(r)} |")
    lines.append(f"| B | all | {_acc(b)} | {_fmt_test(_test(b, a, seed))} | {b['summary']['mean_tokens']:.1f} | "
                 f"{_levels(b)} |")
    return lines + [""]


def _destroy_section(run: dict, ev: Path) -> tuple[list[str], dict]:
    """Table 3: zero / reinit of each role of B, and the layers removed; the results by (mode, role)."""
    roles = run["destroy_roles"]
    lines = [f"## Destruction of B in layers {run['destroy_layers']} of {run['size']['layers']} (the paper's Table 3)",
             "", "Cell: majority response level, then pass@1.", "",
             "| destroyed | " + " | ".join(roles) + " |", "|---|" + "---|" * len(roles)]
    destroy = {}
    for mode in ("zero", "reinit"):
        cells = []
        for role in roles:
            r = load_result(ev / f"{mode}_{role}__lab_reason.json")
            destroy[mode, role] = r
            cells.append(f"{_majority_level(r)} ({r['summary']['pass_at_1']:.2f})")
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    removed = load_result(ev / "remove__lab_reason.json")
    lines.append(f"| remove layers | {_majority_level(removed)} ({removed['summary']['pass_at_1']:.2f}) "
                 + "| " * (len(roles) - 1) + "|")
    lines += ["", "All models, grouped and sorted (baseline B dashed):", "", "![accuracy](compare_accuracy.png)", ""]
    return lines, destroy


def _delta_section(root: Path) -> tuple[list[str], list[str]]:
    """Delta A -> B by role, and the roles' ranking."""
    delta = json.loads((root / "gadgets" / "delta" / "delta.json").read_text())
    ranking = [r for r in delta["ranking"] if delta["roles"][r]["mean_rel_change"] is not None]
    lines = ["## Delta A -> B (the paper's Figures 2-3)", "",
             "BC: Sarle's bimodality coefficient of log10|r| over the role's elements (r = ΔW/|W_A| element-wise, an "
             "unchanged element counted at the dtype's resolution); above 5/9 the elements form two groups, such as "
             "untouched and moved, below it they moved as one group.", "",
             "| role | mean ‖ΔW‖/‖W_A‖ over layers | mean ‖ΔW‖ | BC of log10(abs(r)) |", "|---|---|---|---|"]
    for role in ranking:
        s = delta["roles"][role]
        bc = (s.get("moments_of_log10_abs_r") or {}).get("bimodality_coefficient")  # absent in older delta.json
        lines.append(f"| {role} | {s['mean_rel_change']:.4f} | {s['mean_l2_diff']:.4f} | "
                     f"{'—' if bc is None else f'{bc:.3f}'} |")
    lines += ["", "![L2 by role](gadgets/delta/delta_l2_by_role.png)",
              "![relative change by layer](gadgets/delta/delta_rel_by_layer.png)", ""]
    return lines, ranking


def _train_stats(folder: Path) -> dict:
    for path in (folder / "lab_train_stats.json", folder.parent.parent / "logs" / f"{folder.name}.json"):
        if path.exists():
            return json.loads(path.read_text())
    return {}


def _rates_section(root: Path, run: dict) -> list[str]:
    from ..sweep import sweep_markdown

    variants = run["variants"]
    lines = ["## Learning rates: each variant at its own", ""]
    sweeps = {v: json.loads(Path(i["sweep"]).read_text()) for v, i in variants.items() if i.get("sweep")}
    if sweeps:
        lines += ["Each variant ran `sfn sweep` over the same rates; every point is its own `sfn train` run ranked "
                  "on the validation rows its recipe holds out of the training traces (`validation_fraction`), "
                  "never on `lab_reason`; the variant's model below is its best point.", ""]
    else:
        lines += ["Each variant trains at the rate its recipe ships (`recipes/lab/<variant>.yaml`, whose comment "
                  "says which sweep chose it, or that none has yet); this run did not sweep. `sfn lab --sweep` sweeps every "
                  "variant.",
                  ""]
    lines += ["| variant | learning rate | chosen by | validation loss | validation token accuracy | recipe ships |",
              "|---|---|---|---|---|---|"]
    for v, info in variants.items():
        val = info.get("validation") or {}
        loss, acc = val.get("eval_loss"), val.get("eval_mean_token_accuracy")
        note = info.get("recipe_note")
        how = ("its sweep (lowest validation loss)" if info["chosen_by"] == "sweep" else
               f"the recipe: {note}" if note else "the recipe")
        ships = f"{info['recipe_rate']:g}" + ("" if info["recipe_rate"] == info["learning_rate"] else " (differs)")
        lines.append(f"| {v} | {info['learning_rate']:g} | {how} | {'—' if loss is None else f'{loss:.4f}'} | "
                     f"{'—' if acc is None else f'{acc:.4f}'} | {ships} |")
    lines.append("")
    if sweeps:
        plot = _sweeps_plot(sweeps, root / "sweeps.png")
        lines += [f"![sweeps]({plot.name})", ""]
        for v, summary in sweeps.items():
            lines += [sweep_markdown(summary, heading="###").replace(f"Sweep of {summary['recipe']}",
                                                                      f"Sweep of `{v}`"), ""]
    return lines


def _scale_section(root: Path, scale: dict) -> list[str]:
    plot = _scale_plot(scale, root / "scale_gap.png")
    lines = ["## Scale: o_proj vs full at several sizes", "",
             "One lab per size (own data, base model A, both fine-tunes at their own rates), the same 200 "
             "`lab_reason` problems. Gap = full − o_proj pass@1 with its 95% paired-bootstrap CI.", "",
             "| size | parameters | A | full (lr) | o_proj (lr) | gap [95% CI] | p | rates chosen by | base + fine-tunes (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for p in sorted(scale["points"], key=lambda p: p["params"]):
        acc = p["pass_at_1"]
        lines.append(f"| {p['size']} | {p['params']:,} | {acc['A']:.3f} | {acc['full']:.3f} ({p['rates']['full']:g}) | "
                     f"{acc['oproj']:.3f} ({p['rates']['oproj']:g}) | {p['gap']:+.3f} [{p['gap_ci'][0]:+.3f}, "
                     f"{p['gap_ci'][1]:+.3f}] | {format_p(p['p_value'])} | {', '.join(sorted(set(p['chosen_by'].values())))} "
                     f"| {p['seconds']:.0f} |")
    pts = sorted(scale["points"], key=lambda p: p["params"])
    small, large = pts[0], pts[-1]
    overlap = not (small["gap_ci"][1] < large["gap_ci"][0] or large["gap_ci"][1] < small["gap_ci"][0])
    trend = ("shrinks" if large["gap"] < small["gap"] else "grows") + " from the smallest to the largest size"
    # A gap closes when o_proj gains or when full loses: say which moved. Every size trains the same number of steps,
    # so a size whose full fine-tune learned far less of the skill than another size's compares under-trained runs.
    first, last = small["pass_at_1"], large["pass_at_1"]
    d_full, d_oproj = last["full"] - first["full"], last["oproj"] - first["oproj"]
    mover = "full fine-tuning" if abs(d_full) >= abs(d_oproj) else "o_proj-only tuning"
    gains = {p["size"]: p["pass_at_1"]["full"] - p["pass_at_1"]["A"] for p in pts}
    best = max(gains, key=gains.get)
    weak = [size for size, gain in gains.items() if gain < gains[best] / 2]
    lines += ["", f"The gap {trend} ({small['gap']:+.3f} -> {large['gap']:+.3f}); "
              + ("the two CIs overlap, so this run cannot tell a trend from noise." if overlap else
                 "the two CIs do not overlap.")
              + f" Most of the change is {mover}'s: full {first['full']:.3f} -> {last['full']:.3f}, o_proj "
              f"{first['oproj']:.3f} -> {last['oproj']:.3f}."]
    for size in weak:
        lines.append(f"At {size}, full fine-tuning gains only {gains[size]:+.3f} over its A (vs {gains[best]:+.3f} at "
                     f"{best}) in the same number of steps: that model did not learn the skill, so its gap says "
                     "little about o_proj at scale.")
    lines += ["", f"![gap vs size]({plot.name})", ""]
    return lines


def _findings(results: dict, onestep: dict, destroy: dict, delta_ranking: list[str], variants: dict, run: dict,
              seed: int) -> list[str]:
    """Sentences chosen by the measured numbers."""
    acc = {k: v["summary"]["pass_at_1"] for k, v in results.items()}
    a, b, c = results["A"], results["full"], results["oproj"]
    single = onestep["summary"]["pass_at_1"]
    out = []
    if single >= KNOWS_STEPS:
        out.append(f"A knows the steps: {single:.3f} on single-step problems it never saw in that form, against "
                   f"{acc['A']:.3f} on multi-step problems answered directly -- the knowledge is there, the chaining "
                   "is not.")
    else:
        out.append(f"A does NOT reliably know the steps ({single:.3f} on single-step problems, below "
                   f"{KNOWS_STEPS}): a fine-tune that fails here may lack facts, not reasoning.")
    t_ba = _test(b, a, seed)
    if t_ba["p_value"] < ALPHA and t_ba["delta"] > 0:
        out.append(f"The full fine-tune B beats the base A on held-out multi-step problems: {acc['full']:.3f} vs "
                   f"{acc['A']:.3f} (Δ {t_ba['delta']:+.3f}, {format_p(t_ba['p_value'])}).")
    else:
        out.append(f"The full fine-tune B did NOT significantly beat the base A ({acc['full']:.3f} vs {acc['A']:.3f}, "
                   f"{format_p(t_ba['p_value'])}); the rest of this report compares variants that did not clearly learn.")
    gain_b = acc["full"] - acc["A"]
    rates = {v: variants[v]["learning_rate"] for v in variants}
    if t_ba["p_value"] < ALPHA and gain_b > 0:  # a share of a gain that is noise would mean nothing
        share = (acc["oproj"] - acc["A"]) / gain_b
        t_cb = _test(c, b, seed)
        verdict = ("not significantly different from B" if t_cb["p_value"] >= ALPHA else
                   ("significantly worse than B" if t_cb["delta"] < 0 else "significantly better than B"))
        recovered = (f"recovers {share:.0%} of B's gain over A" if share > 0 else
                     f"does not improve on A ({acc['oproj']:.3f} vs {acc['A']:.3f})")
        out.append(f"Training only o_proj (C, {100 * _fraction(variants['oproj']):.1f}% of the parameters, lr "
                   f"{rates['oproj']:g} vs B's {rates['full']:g}) {recovered}; C scores {acc['oproj']:.3f} and is "
                   f"{verdict} (Δ {t_cb['delta']:+.3f}, {format_p(t_cb['p_value'])}). The paper reports o_proj-centred "
                   "tuning (F2) close to full tuning on AIME/MATH/GPQA at 14B/32B.")
        t_21 = _test(results["f2"], results["f1"], seed)
        t_2b = _test(results["f2"], b, seed)
        out.append(f"Adding o_proj to embed+lm_head+norms: F1 {acc['f1']:.3f} -> F2 {acc['f2']:.3f} "
                   f"(Δ {t_21['delta']:+.3f}, {format_p(t_21['p_value'])}); F3 (q,k,v,o) {acc['f3']:.3f}. "
                   + ("As in the paper, o_proj is what lifts F1" if t_21["delta"] > 0 and t_21["p_value"] < ALPHA
                      else "Unlike the paper, adding o_proj does not significantly lift F1 here")
                   + (f", and F2 is not significantly below B ({format_p(t_2b['p_value'])})." if t_2b["p_value"] >= ALPHA
                      else f"; F2 stays significantly {'below' if t_2b['delta'] < 0 else 'above'} B "
                           f"(Δ {t_2b['delta']:+.3f}, {format_p(t_2b['p_value'])})."))
    if "oproj_4bit" in results:
        t_q = _test(results["oproj_4bit"], c, seed)
        out.append(f"o_proj trained over a 4-bit frozen base: {acc['oproj_4bit']:.3f} vs {acc['oproj']:.3f} over the "
                   f"full-precision base (Δ {t_q['delta']:+.3f}, {format_p(t_q['p_value'])}): "
                   + ("no significant cost from quantizing the frozen layers." if t_q["p_value"] >= ALPHA else
                      "quantizing the frozen layers changed the result significantly."))
    merges = {m: acc[m] for m in run["merges"]}
    best = max(merges, key=merges.get)
    t_m1 = _test(results["m1_oproj"], a, seed)
    out.append("Merges of B's modules into A: " + ", ".join(f"{run['merges'][m]} {v:.3f}" for m, v in merges.items())
               + f" (A {acc['A']:.3f}); the best is {best}. "
               + ("M1 (o_proj) significantly improves on A, as the paper found at 1.5B."
                  if t_m1["p_value"] < ALPHA and t_m1["delta"] > 0 else
                  f"M1 (o_proj) is significantly worse than A here (Δ {t_m1['delta']:+.3f}, "
                  f"{format_p(t_m1['p_value'])}; the paper saw M1 improve at 1.5B, not at 7B)."
                  if t_m1["p_value"] < ALPHA else
                  f"M1 (o_proj) does not significantly improve on A here ({format_p(t_m1['p_value'])}; the paper saw it "
                  "at 1.5B, not at 7B)."))
    o_level = _majority_level(destroy["zero", "o_proj"])
    o_acc = destroy["zero", "o_proj"]["summary"]["pass_at_1"]
    others = {r: destroy["zero", r] for r in ("q_proj", "k_proj", "up_proj", "gate_proj", "down_proj")}
    worse = [r for r, res in others.items() if _majority_level(res) < o_level]  # "I" < "II" < "III" < "IV"
    costlier = [r for r, res in others.items() if res["summary"]["pass_at_1"] < o_acc]
    out.append(f"Zeroing o_proj in the middle layers leaves level {o_level} responses (pass@1 {o_acc:.2f}); zeroing "
               + ", ".join(f"{r} -> {_majority_level(res)} ({res['summary']['pass_at_1']:.2f})" for r, res in others.items())
               + (". As in the paper, o_proj matters less for producing coherent text than the MLP and q/k."
                  if len(worse) >= 3 else
                  f". By level this differs from the paper's pattern (o_proj mild, MLP/q/k severe); by accuracy, "
                  f"{len(costlier)} of {len(others)} other roles cost more than o_proj."))
    if delta_ranking:
        top = delta_ranking[0]
        out.append(f"Delta A -> B: the role with the largest mean relative change is {top}"
                   + (" (o_proj, as the paper's Figure 2 suggests)." if top == "o_proj" else
                      f"; o_proj ranks {delta_ranking.index('o_proj') + 1} of {len(delta_ranking)}."
                      if "o_proj" in delta_ranking else "."))
    return out


def _fraction(info: dict) -> float:
    manifest = json.loads((Path(info["folder"]) / MANIFEST_FILE).read_text())
    return manifest["selection"]["trainable_fraction"]


def _limits(results: dict, onestep: dict, run: dict, n_params: int, seed: int) -> list[str]:
    """What this scale can and cannot support, with the numbers that decide it."""
    tuned = {v: results[v]["summary"] for v in run["variants"] if v in results}
    n = results["full"]["summary"]["n_problems"]
    # A CI is narrowest at 0 or 1 and widest near 0.5: quote both ends, so that a variant at the ceiling does not make
    # the test look sharper than it is for the variants in between
    half = {v: (s["ci_high"] - s["ci_low"]) / 2 for v, s in tuned.items()}
    narrow, wide = min(half, key=half.get), max(half, key=half.get)
    ceiling = [v for v, s in tuned.items() if s["pass_at_1"] == 1.0]
    sweep_note = ("each variant's rate was chosen by its own sweep in this run" if run["sweep"] else
                  "the rates come from the recipes, whose comments say which sweep chose each rate and which rate no "
                  "sweep has chosen yet, not from a sweep in this run")
    edges = [note for v, info in run["variants"].items() if info.get("sweep")
             for note in json.loads(Path(info["sweep"]).read_text()).get("notes", [])]
    lines = [
        f"Can: compare training only o_proj with full fine-tuning on one synthetic skill (chaining modular "
        f"arithmetic) where the base model demonstrably knows the single steps ({onestep['summary']['pass_at_1']:.2f}), "
        f"each variant at a learning rate tuned for it ({sweep_note}).",
        f"Resolution: {n} test problems give 95% CIs from ±{half[narrow]:.2f} ({narrow} at "
        f"{tuned[narrow]['pass_at_1']:.3f}) to ±{half[wide]:.2f} ({wide} at {tuned[wide]['pass_at_1']:.3f}); "
        "differences smaller than that are mostly not significant; one seed, so run-to-run variation of training is "
        "not in these intervals.",
        f"Cannot: speak for models of the paper's size ({n_params / 1e6:.2f}M parameters here vs 1.5B-32B), for "
        "natural-language reasoning, long chains of thought, or reflection: the paper's o_proj claims concern "
        "distilled reasoning in pre-trained LLMs, whose o_proj sits among layers that already hold rich "
        "representations; a model trained from scratch on one task may store the skill differently.",
        "Cannot: separate 'o_proj cannot carry this skill' from 'o_proj needs more steps' beyond the epochs run "
        "here (every variant trains for the same number of steps).",
    ]
    if ceiling:
        many = len(ceiling) > 1
        lines.append(f"Ceiling: {', '.join(ceiling)} solve{'' if many else 's'} every test problem (1.000), so this "
                     f"test cannot rank {'them against each other' if many else 'it against a stronger variant'}; "
                     "a harder task (longer chains) would be needed to do so.")
    if edges:
        lines.append("Sweep caveat: " + " ".join(edges))
    if not run.get("scale"):
        lines.append("Scale: not run here (`sfn lab --scale small,medium` adds the gap-vs-size plot).")
    return lines
