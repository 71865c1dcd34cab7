"""`lab/report.md`: the paper's Tables 1-3 at lab scale, the delta plots, and what this run found.

Every number is read from the files the stages wrote (eval JSONs, run manifests, trainer states, delta.json); the
findings are sentences chosen by comparing those numbers, never fixed text.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from ..evaluation import compare, load_result
from ..evaluation.stats import format_p, paired_bootstrap

ALPHA = 0.05


def _result(lab, label: str, task: str = "lab_reason") -> dict:
    return load_result(lab.root / "evals" / f"{label}__{task}.json")


def _per_problem(result: dict) -> dict[str, float]:
    return {p["id"]: sum(s["correct"] for s in p["samples"]) / len(p["samples"]) for p in result["problems"]}


def _acc(result: dict) -> str:
    s = result["summary"]
    return f"{s['pass_at_1']:.3f} [{s['ci_low']:.3f}, {s['ci_high']:.3f}]"


def _levels(result: dict) -> str:
    shares = result["summary"]["level_shares"]
    return " / ".join(f"{shares[k]:.2f}" for k in ("I", "II", "III", "IV"))


def _majority_level(result: dict) -> str:
    counts = Counter(s["level"] for p in result["problems"] for s in p["samples"])
    return counts.most_common(1)[0][0]


def _test(a: dict, b: dict, seed: int) -> dict:
    pa, pb = _per_problem(a), _per_problem(b)
    shared = [i for i in pa if i in pb]
    return paired_bootstrap([pa[i] for i in shared], [pb[i] for i in shared], seed=seed)


def _loss_curve(lab, out: Path) -> tuple[Path | None, list[tuple[int, float]]]:
    state = lab.root / "base" / "trainer_state.json"
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
    ax.set_title("Base model A: pre-training on direct-style text")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out, points


def write_report(lab) -> Path:
    from .pipeline import DESTROY_ROLES, MERGES, VARIANTS

    root, seed = lab.root, lab.seed
    files = sorted((root / "evals").glob("*__lab_reason.json"))
    comparison = compare(files, baseline="full", out=root / "compare.md", seed=seed)
    results = {label: _result(lab, label) for label in ["A", *VARIANTS, *MERGES]}
    a, b = results["A"], results["full"]
    onestep = _result(lab, "A", "lab_onestep")
    curve_png, curve = _loss_curve(lab, root / "base_loss.png")

    lines = [f"# SfN lab report (size {lab.size_name}, seed {seed})", ""]
    lines += [
        "Everything below was measured in this run; the lab's design is in `sfn_train/lab/problems.py` "
        "(modular-arithmetic chains) and `sfn_train/lab/pipeline.py`. Task `lab_reason`: "
        f"{a['summary']['n_problems']} held-out problems of {', '.join(map(str, _steps(lab)))} steps, greedy decoding, "
        "exact match of the boxed answer; pass@1 with a 95% bootstrap CI over problems (a Wilson score interval where "
        "every problem scored the same, e.g. 0/n, since the bootstrap then has zero width). Levels I/II/III/IV are the "
        "shares of responses at each level (rules in `sfn_train/evaluation/levels.py`).",
        "",
        "## Base model A",
        "",
        f"A small Qwen2 ({_params(root / 'base'):,} parameters, {lab.size.layers} layers, hidden {lab.size.hidden}) "
        "pre-trained from scratch on direct-style text (problem -> boxed answer, and single operations).",
        "",
        f"- training loss: {curve[0][1]:.3f} at step {curve[0][0]} -> {curve[-1][1]:.3f} at step {curve[-1][0]}"
        if curve else "- training loss: not recorded",
        f"- single-step problems (`lab_onestep`): pass@1 {_acc(onestep)}",
        f"- multi-step problems answered directly (`lab_reason`): pass@1 {_acc(a)} (chance is 0.1)",
        "",
    ]
    if curve_png:
        lines += [f"![base loss]({curve_png.name})", ""]

    # Table 2: fine-tune variants
    lines += ["## Fine-tunes on reasoning traces (the paper's Table 2)", "",
              "Same data, steps and recipe except `trainable_modules`; baseline B = full.", "",
              "| model | tuned | trainable params | steps/s | train time (s) | peak RSS (MB) | pass@1 [95% CI] | "
              "Δ vs B (p) | levels I/II/III/IV |", "|---|---|---|---|---|---|---|---|---|"]
    for variant, tuned in VARIANTS.items():
        manifest = json.loads((root / "runs" / variant / "sfn_manifest.json").read_text())
        stats = json.loads((root / "runs" / variant / "lab_train_stats.json").read_text())
        metrics = manifest["metrics"]
        r = results[variant]
        test = "—" if variant == "full" else _fmt_test(_test(r, b, seed))
        lines.append(f"| {variant} | {tuned} | {manifest['selection']['trainable_params']:,} "
                     f"({manifest['selection']['trainable_fraction']:.1%}) | {metrics['train_steps_per_second']:.2f} | "
                     f"{metrics['train_runtime']:.1f} | {stats['peak_rss_mb']:.0f} | {_acc(r)} | {test} | {_levels(r)} |")
    lines.append(f"| A | — | 0 | — | — | — | {_acc(a)} | {_fmt_test(_test(a, b, seed))} | {_levels(a)} |")
    lines.append("")

    # Table 1: merges
    lines += ["## Merges: A with B's modules, no further training (the paper's Table 1)", "",
              "| model | replaced | pass@1 [95% CI] | Δ vs A (p) | mean tokens | levels I/II/III/IV |",
              "|---|---|---|---|---|---|"]
    lines.append(f"| A | — | {_acc(a)} | — | {a['summary']['mean_tokens']:.1f} | {_levels(a)} |")
    for merge, modules in MERGES.items():
        r = results[merge]
        lines.append(f"| {merge} | {modules} | {_acc(r)} | {_fmt_test(_test(r, a, seed))} | "
                     f"{r['summary']['mean_tokens']:.1f} | {_levels(r)} |")
    lines.append(f"| B | all | {_acc(b)} | {_fmt_test(_test(b, a, seed))} | {b['summary']['mean_tokens']:.1f} | "
                 f"{_levels(b)} |")
    lines.append("")

    # Table 3: destruction
    layers = lab.middle_layers()
    lines += [f"## Destruction of B in layers {layers} of {lab.size.layers} (the paper's Table 3)", "",
              "Cell: majority response level, then pass@1.", "",
              "| destroyed | " + " | ".join(DESTROY_ROLES) + " |", "|---|" + "---|" * len(DESTROY_ROLES)]
    destroy = {}
    for mode in ("zero", "reinit"):
        cells = []
        for role in DESTROY_ROLES:
            r = _result(lab, f"{mode}_{role}")
            destroy[mode, role] = r
            cells.append(f"{_majority_level(r)} ({r['summary']['pass_at_1']:.2f})")
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    removed = _result(lab, "remove")
    lines.append(f"| remove layers | {_majority_level(removed)} ({removed['summary']['pass_at_1']:.2f}) "
                 + "| " * (len(DESTROY_ROLES) - 1) + "|")
    lines.append("")

    # Delta
    delta = json.loads((root / "gadgets" / "delta" / "delta.json").read_text())
    ranking = [r for r in delta["ranking"] if delta["roles"][r]["mean_rel_change"] is not None]
    lines += ["## Delta A -> B (the paper's Figures 2-3)", "",
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
              "![relative change by layer](gadgets/delta/delta_rel_by_layer.png)",
              "![histograms](gadgets/delta/delta_hist_by_role.png)", ""]

    lines += ["## What this run found", ""]
    lines += [f"- {s}" for s in _findings(results, destroy, ranking, seed)]
    lines += ["", f"Full comparison table and plots (baseline B): [compare.md](compare.md).", "",
              "## Run", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {name} | {seconds:.1f} |" for name, seconds in lab.timings.items()]
    lines.append("")
    out = root / "report.md"
    out.write_text("\n".join(lines), encoding="utf-8")
    return out


def _steps(lab):
    from .problems import REASON_STEPS

    return REASON_STEPS


def _params(folder: Path) -> int:
    import math

    from ..checkpoint import Checkpoint

    return sum(math.prod(info.shape) for info in Checkpoint(folder).tensors.values())


def _fmt_test(test: dict) -> str:
    return f"{test['delta']:+.3f} ({format_p(test['p_value'])})"


def _findings(results: dict, destroy: dict, delta_ranking: list[str], seed: int) -> list[str]:
    """Sentences chosen by the measured numbers."""
    acc = {k: v["summary"]["pass_at_1"] for k, v in results.items()}
    a, b, c = results["A"], results["full"], results["oproj"]
    out = []
    t_ba = _test(b, a, seed)
    if t_ba["p_value"] < ALPHA and t_ba["delta"] > 0:
        out.append(f"The full fine-tune B beats the base A on held-out multi-step problems: {acc['full']:.3f} vs "
                   f"{acc['A']:.3f} (Δ {t_ba['delta']:+.3f}, {format_p(t_ba['p_value'])}).")
    else:
        out.append(f"The full fine-tune B did NOT significantly beat the base A ({acc['full']:.3f} vs {acc['A']:.3f}, "
                   f"{format_p(t_ba['p_value'])}); the rest of this report compares variants that did not clearly learn.")
    gain_b = acc["full"] - acc["A"]
    if t_ba["p_value"] < ALPHA and gain_b > 0:  # a share of a gain that is noise would mean nothing
        share = (acc["oproj"] - acc["A"]) / gain_b
        t_cb = _test(c, b, seed)
        verdict = ("not significantly different from B" if t_cb["p_value"] >= ALPHA else
                   ("significantly worse than B" if t_cb["delta"] < 0 else "significantly better than B"))
        recovered = (f"recovers {share:.0%} of B's gain over A" if share > 0 else
                     f"does not improve on A ({acc['oproj']:.3f} vs {acc['A']:.3f})")
        out.append(f"Training only o_proj (C) {recovered}; C scores {acc['oproj']:.3f} and is {verdict} "
                   f"({format_p(t_cb['p_value'])}). The paper reports o_proj-centred tuning (F2) close to full tuning on "
                   "AIME/MATH/GPQA at 14B/32B.")
        f2, f1 = acc["f2"], acc["f1"]
        out.append(f"Adding o_proj to embed+lm_head+norms: F1 {f1:.3f} -> F2 {f2:.3f}; F3 (q,k,v,o) {acc['f3']:.3f}. "
                   + ("As in the paper, o_proj is what lifts F1." if f2 > f1 and _test(results['f2'], results['f1'], seed)["p_value"] < ALPHA
                      else "Unlike the paper, adding o_proj does not significantly lift F1 here."))
    if "oproj_4bit" in results:
        t_q = _test(results["oproj_4bit"], c, seed)
        out.append(f"o_proj trained over a 4-bit frozen base: {acc['oproj_4bit']:.3f} vs {acc['oproj']:.3f} over the "
                   f"full-precision base (Δ {t_q['delta']:+.3f}, {format_p(t_q['p_value'])}): "
                   + ("no significant cost from quantizing the frozen layers." if t_q["p_value"] >= ALPHA else
                      "quantizing the frozen layers changed the result significantly."))
    merges = {m: acc[m] for m in ("m1_oproj", "m2_qkv", "m3_mlp")}
    best = max(merges, key=merges.get)
    t_m1 = _test(results["m1_oproj"], a, seed)
    out.append(f"Merges of B's modules into A: o_proj {merges['m1_oproj']:.3f}, q,k,v {merges['m2_qkv']:.3f}, mlp "
               f"{merges['m3_mlp']:.3f} (A {acc['A']:.3f}); the best is {best}. "
               + ("M1 significantly improves on A, as the paper found at 1.5B." if t_m1["p_value"] < ALPHA and t_m1["delta"] > 0
                  else "M1 does not significantly improve on A here (the paper saw it at 1.5B, not at 7B)."))
    o_level = _majority_level(destroy["zero", "o_proj"])
    others = {r: _majority_level(destroy["zero", r]) for r in ("q_proj", "k_proj", "up_proj", "gate_proj", "down_proj")}
    worse = [r for r, lv in others.items() if lv < o_level]  # "I" < "II" < "III" < "IV"
    out.append(f"Zeroing o_proj in the middle layers leaves level {o_level} responses; zeroing "
               + ", ".join(f"{r} -> {lv}" for r, lv in others.items())
               + (". As in the paper, o_proj matters less for producing coherent text than the MLP and q/k."
                  if len(worse) >= 3 else ". This differs from the paper's pattern (o_proj mild, MLP/q/k severe)."))
    if delta_ranking:
        top = delta_ranking[0]
        out.append(f"Delta A -> B: the role with the largest mean relative change is {top}"
                   + (" (o_proj, as the paper's Figure 2 suggests)." if top == "o_proj" else
                      f"; o_proj ranks {delta_ranking.index('o_proj') + 1} of {len(delta_ranking)}."
                      if "o_proj" in delta_ranking else "."))
    return out
