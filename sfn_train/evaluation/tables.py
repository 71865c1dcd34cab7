"""The paper's three tables and the findings, from eval results and plain records of what was trained and built.

Shared by every report that compares a base model A, a reasoning model B, fine-tunes, merges and destroyed copies:
`sfn study`'s report, and the lab's once it becomes a study over its generated data. Nothing here knows how the
models were made; each is a `ModelEntry` (name, group, one eval result per task, and what the table needs: training
figures, the modules a merge took, the cell a destroyed model fills). Tables 1-3 follow the paper's layout:

- fine-tunes vs a baseline (Table 2): trainable share, steps/s, peak memory, pass@1 with CI and a paired test;
- merges vs A (Table 1): pass@1, paired test against A, mean response tokens (the paper saw merged models write more);
- destruction (Table 3): the majority response level and pass@1 per mode x module.

The findings are sentences chosen by the measured numbers and paired tests, never fixed text: a difference is called
one only at p < ALPHA.

Seeds: a model trained on several seeds is one entry whose result per task is pooled over its seeds
(`seeds.pool_seeds`); its pass@1 is the mean over seeds with an interval covering seeds and problems, and every test
that involves it is `seeds.seed_aware_comparison` (a model not trained here, such as A or B, counts as fixed: no seed
variance). Where no entry has seeds, the tests are the paired bootstrap over problems, as before, and the findings say
in one line that they do not cover a different training seed.
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass, field

from .seeds import METHOD, MIN_SEEDS, results_test
from .stats import format_p, paired_bootstrap

ALPHA = 0.05
LEVELS = ("I", "II", "III", "IV")
COHERENT = ("III", "IV")  # on-task text: the paper's "o_proj matters little for conversation" reads off these
BC_BIMODAL = 5 / 9  # Sarle's threshold: a bimodality coefficient above it suggests two groups of elements


@dataclass
class ModelEntry:
    """One model of a comparison, as the tables need it."""

    name: str
    group: str  # base | reasoning | finetune | merge | destroy
    describe: str  # what it is, in a few words: "o_proj", "A + B's q,k,v_proj in layers 0-13", "zero o_proj"
    results: dict[str, dict]  # task -> `sfn eval` result
    training: dict | None = None  # trainable_params, trainable_fraction, steps_per_s, train_s, peak_memory (text)
    destroy: tuple[str, str | None] | None = None  # (mode, module); module None for `remove`
    extra: dict = field(default_factory=dict)
    trained: bool | None = None  # carries a training seed's variance; None: fine-tunes do, other groups are fixed

    @property
    def is_trained(self) -> bool:
        return self.group == "finetune" if self.trained is None else self.trained


# ---------------------------------------------------------------------------------------------------------------
# Cells


def per_problem(result: dict) -> dict[str, float]:
    return {str(p["id"]): sum(s["correct"] for s in p["samples"]) / len(p["samples"]) for p in result["problems"]}


def paired_test(a: dict, b: dict, seed: int = 0) -> dict:
    """Paired bootstrap of a - b over the problems both answered (ids matched)."""
    pa, pb = per_problem(a), per_problem(b)
    shared = [i for i in pa if i in pb]
    test = paired_bootstrap([pa[i] for i in shared], [pb[i] for i in shared], seed=seed)
    return {**test, "n_shared": len(shared)}


def entry_test(a: ModelEntry, b: ModelEntry, task: str, seed: int = 0) -> dict | None:
    """a - b on `task`: the seed-aware test when either was trained on several seeds (pooled result), else the
    paired bootstrap over problems. None when either has no result on the task."""
    ra, rb = a.results.get(task), b.results.get(task)
    if ra is None or rb is None:
        return None
    if "seed_runs" not in ra and "seed_runs" not in rb:
        return paired_test(ra, rb, seed)
    return results_test(ra, rb, trained_a=a.is_trained, trained_b=b.is_trained, seed=seed)


def fmt_acc(result: dict) -> str:
    s = result["summary"]
    wilson = " W" if s.get("ci_method") == "wilson" else ""
    seeds = (f" ({s['n_seeds']} seeds: {s['seed_min']:.3f}–{s['seed_max']:.3f})" if s.get("n_seeds", 1) > 1 else "")
    return f"{s['pass_at_1']:.3f} [{s['ci_low']:.3f}, {s['ci_high']:.3f}]{wilson}{seeds}"


def fmt_test(test: dict) -> str:
    return f"{test['delta']:+.3f} ({format_p(test['p_value'])}{_seed_tag(test)})"


def _seed_tag(test: dict) -> str:
    """", seeds 3/3" for a seed-aware test; ", seeds n.e." where seeds were given but too few to estimate."""
    if "method" not in test:
        return ""
    if test["method"] == METHOD:
        return f", seeds {test['n_seeds_a']}/{test['n_seeds_b']}"
    return ", seed variance n.e." if max(test["n_seeds_a"], test["n_seeds_b"]) > 1 else ""


def pass1(result: dict) -> float:
    return result["summary"]["pass_at_1"]


def majority_level(result: dict) -> str:
    counts = Counter(s["level"] for p in result["problems"] for s in p["samples"])
    return counts.most_common(1)[0][0] if counts else "—"


def level_shares(result: dict) -> str:
    shares = result["summary"]["level_shares"]
    return " / ".join(f"{shares.get(k, 0):.2f}" for k in LEVELS)


def significant(test: dict) -> bool:
    return test["p_value"] < ALPHA


def verdict(test: dict) -> str:
    if not significant(test):
        return "no significant difference"
    return "better" if test["delta"] > 0 else "worse"


def versus(test: dict, other: str) -> str:
    """"better than X" / "worse than X" / "not significantly different from X", with Δ and p."""
    said = {"better": f"better than {other}", "worse": f"worse than {other}"}.get(
        verdict(test), f"not significantly different from {other}")
    return f"{said} (Δ {test['delta']:+.3f}, {format_p(test['p_value'])}{_seed_tag(test)})"


# ---------------------------------------------------------------------------------------------------------------
# Tables


def _task_header(tasks: list[str], what: str) -> tuple[str, str]:
    head = "".join(f" {t} pass@1 [95% CI] | Δ vs {what} (p) |" for t in tasks)
    return head, "---|---|" * len(tasks)


def finetune_table(entries: list[ModelEntry], baseline: ModelEntry, tasks: list[str], seed: int = 0) -> list[str]:
    """Table 2: each row a model, its training figures (— where not trained here) and pass@1 per task against the
    baseline. `entries` in row order; the baseline's own Δ is —."""
    head, rule = _task_header(tasks, baseline.name)
    lines = ["| model | tuned | trainable params | steps/s | train time (s) | peak memory |" + head,
             "|---|---|---|---|---|---|" + rule]
    for e in entries:
        t = e.training or {}
        share = (f"{t['trainable_params']:,} ({t['trainable_fraction']:.1%})" if "trainable_params" in t else "—")
        steps = f"{t['steps_per_s']:.3g}" if t.get("steps_per_s") is not None else "—"
        train_s = f"{t['train_s']:.1f}" if t.get("train_s") is not None else "—"
        cells = "".join(f" {_cell_acc(e, task)} | {_cell_test(e, baseline, task, seed)} |" for task in tasks)
        lines.append(f"| {e.name} | {e.describe} | {share} | {steps} | {train_s} | {t.get('peak_memory', '—')} |"
                     + cells)
    return lines


def merge_table(entries: list[ModelEntry], base: ModelEntry, tasks: list[str], seed: int = 0) -> list[str]:
    """Table 1: A, the merges and the donors, each against A, with mean response tokens and response levels."""
    head = "".join(f" {t} pass@1 [95% CI] | Δ vs {base.name} (p) | mean tokens | levels I/II/III/IV |" for t in tasks)
    lines = ["| model | modules from the donor |" + head, "|---|---|" + "---|---|---|---|" * len(tasks)]
    for e in entries:
        cells = ""
        for task in tasks:
            r = e.results.get(task)
            tokens = f"{r['summary']['mean_tokens']:.0f}" if r else "—"
            cells += (f" {_cell_acc(e, task)} | {_cell_test(e, base, task, seed)} | {tokens} | "
                      f"{level_shares(r) if r else '—'} |")
        lines.append(f"| {e.name} | {e.describe} |" + cells)
    return lines


def destruction_table(entries: list[ModelEntry], modules: list[str], task: str) -> list[str]:
    """Table 3 for one task: rows are modes, columns modules; a cell is the majority level and pass@1."""
    grid = {e.destroy: e for e in entries if e.destroy is not None and task in e.results}
    modes = list(dict.fromkeys(mode for mode, _ in grid))
    lines = ["| destroyed | " + " | ".join(modules) + " |", "|---|" + "---|" * len(modules)]
    for mode in modes:
        if mode == "remove":
            e = grid[("remove", None)]
            r = e.results[task]
            lines.append(f"| remove layers | {majority_level(r)} ({pass1(r):.2f}) |" + " |" * (len(modules) - 1))
            continue
        cells = []
        for module in modules:
            e = grid.get((mode, module))
            cells.append(f"{majority_level(e.results[task])} ({pass1(e.results[task]):.2f})" if e else "—")
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    return lines


def delta_table(delta: dict) -> list[str]:
    """One row per role of a `sfn delta` result, in its ranking order (largest mean relative change first)."""
    lines = ["| role | mean ‖ΔW‖/‖W_A‖ over layers | mean ‖ΔW‖ | BC of log10(abs(r)) |", "|---|---|---|---|"]
    for role in delta_ranking(delta):
        s = delta["roles"][role]
        bc = (s.get("moments_of_log10_abs_r") or {}).get("bimodality_coefficient")
        lines.append(f"| {role} | {s['mean_rel_change']:.4g} | {s['mean_l2_diff']:.4g} | "
                     f"{'—' if bc is None else f'{bc:.3f}'} |")
    return lines


def delta_ranking(delta: dict) -> list[str]:
    return [r for r in delta["ranking"] if delta["roles"][r]["mean_rel_change"] is not None]


def _cell_acc(e: ModelEntry, task: str) -> str:
    r = e.results.get(task)
    return fmt_acc(r) if r else "—"


def _cell_test(e: ModelEntry, against: ModelEntry, task: str, seed: int) -> str:
    if e.name == against.name or task not in e.results or task not in against.results:
        return "—"
    return fmt_test(entry_test(e, against, task, seed))


# ---------------------------------------------------------------------------------------------------------------
# Findings


def findings(entries: list[ModelEntry], tasks: list[str], baseline: str, deltas: dict[str, dict] | None = None,
             seed: int = 0) -> list[str]:
    """What the numbers say, one sentence each, chosen by paired tests at p < ALPHA (seed-aware where models were
    trained on several seeds)."""
    by = {e.name: e for e in entries}
    base = next((e for e in entries if e.group == "base"), None)
    reasoning = next((e for e in entries if e.group == "reasoning"), None)
    tuned = [e for e in entries if e.group == "finetune"]
    merges = [e for e in entries if e.group == "merge"]

    def test(a: ModelEntry, b: ModelEntry, task: str) -> dict | None:
        return entry_test(a, b, task, seed)

    out = _reasoning_findings(base, reasoning, tasks, test)
    out += _finetune_findings(tuned, by.get(baseline), base, reasoning or None, tasks, test)
    out += _merge_findings(merges, base, tasks, test, by)
    out += _destruction_findings([e for e in entries if e.group == "destroy"], tasks)
    out += _delta_findings(deltas or {})
    out += _seed_findings(entries)
    widths = [(r["summary"]["ci_high"] - r["summary"]["ci_low"]) / 2 for e in entries for r in e.results.values()]
    if widths:
        n = statistics.median(r["summary"]["n_problems"] for e in entries for r in e.results.values())
        out.append(f"Resolution: with a median of {n:g} problems per task, the 95% CIs are "
                   f"±{statistics.median(widths):.3f} "
                   "wide (median); differences smaller than that are not distinguishable from noise here.")
    return out


def _reasoning_findings(base, reasoning, tasks, test) -> list[str]:
    """B against A: did the reasoning fine-tune gain anything measurable here?"""
    out = []
    for task in tasks if base and reasoning else ():
        t = test(reasoning, base, task)
        if t is None:
            continue
        a, b = pass1(base.results[task]), pass1(reasoning.results[task])
        out.append(f"{task}: B ({reasoning.name}) scores {b:.3f} and A ({base.name}) {a:.3f}: "
                   + (f"B is {versus(t, 'A')}." if significant(t) else
                      f"no significant difference ({format_p(t['p_value'])}), so nothing below can show B's "
                      "reasoning moving into A on this task."))
    return out


def _finetune_findings(tuned, baseline, base, reasoning, tasks, test) -> list[str]:
    """Fine-tunes: against the baseline, the share of a reference gain they recover, and their cost."""
    full = next((e for e in tuned if (e.training or {}).get("trainable_fraction") == 1.0), None)
    reference = full or reasoning
    out = []
    for e in tuned:
        parts = []
        for task in tasks:
            t = test(e, baseline, task) if baseline is not None and e.name != baseline.name else None
            if t is not None:
                parts.append(f"{task} {pass1(e.results[task]):.3f}, {versus(t, baseline.name)}")
            gain = test(reference, base, task) if base and reference and reference is not e else None
            if gain is not None and significant(gain) and gain["delta"] > 0:
                share = (pass1(e.results[task]) - pass1(base.results[task])) / gain["delta"]
                parts.append(f"recovers {share:.0%} of {reference.name}'s significant gain over A on {task}")
        share = (e.training or {}).get("trainable_fraction")
        trained = f" (trains {share:.1%} of the parameters)" if share is not None else ""
        if parts:
            out.append(f"Fine-tune {e.name}{trained}: " + "; ".join(parts) + _cost(e, full) + ".")
    return out


def _cost(e: ModelEntry, full: ModelEntry | None) -> str:
    if full is None or e is full or not e.training or not full.training:
        return ""
    ratios = []
    if e.training.get("steps_per_s") and full.training.get("steps_per_s"):
        ratios.append(f"{e.training['steps_per_s'] / full.training['steps_per_s']:.2f}x the steps/s")
    if e.training.get("peak_memory_mb") and full.training.get("peak_memory_mb"):
        ratios.append(f"{e.training['peak_memory_mb'] / full.training['peak_memory_mb']:.2f}x the peak memory")
    return f"; it trained at {' and '.join(ratios)} of {full.name}" if ratios else ""


def _merge_findings(merges, base, tasks, test, by) -> list[str]:
    """Merges against A."""
    out = []
    for task in tasks if base and merges else ():
        tests = {m.name: test(m, base, task) for m in merges}
        tests = {k: v for k, v in tests.items() if v is not None}
        if not tests:
            continue
        better = [k for k, t in tests.items() if significant(t) and t["delta"] > 0]
        worse = [k for k, t in tests.items() if significant(t) and t["delta"] < 0]
        best = max(tests, key=lambda k: pass1(by[k].results[task]))
        tokens = by[best].results[task]["summary"]["mean_tokens"], base.results[task]["summary"]["mean_tokens"]
        line = f"{task}: merges into A -- "
        line += (f"significantly better than A: {', '.join(better)}" if better else "none is significantly better "
                 "than A")
        line += f"; significantly worse: {', '.join(worse)}" if worse else ""
        line += (f". The best, {best}, scores {pass1(by[best].results[task]):.3f} vs A's "
                 f"{pass1(base.results[task]):.3f} ({format_p(tests[best]['p_value'])}{_seed_tag(tests[best])}) "
                 f"and writes {tokens[0]:.0f} tokens per response vs A's {tokens[1]:.0f}.")
        out.append(line)
    return out


def _destruction_findings(destroyed, tasks) -> list[str]:
    """Destruction: which damaged modules still give on-task text."""
    task = next((t for t in tasks if all(t in e.results for e in destroyed)), None) if destroyed else None
    if task is None:
        return []
    out = []
    for mode in dict.fromkeys(e.destroy[0] for e in destroyed if e.destroy):
        cells = {e.destroy[1]: majority_level(e.results[task]) for e in destroyed
                 if e.destroy and e.destroy[0] == mode}
        if mode == "remove":
            out.append(f"{task}: removing the layers leaves level {cells[None]} responses.")
            continue
        mild = [m for m, lv in cells.items() if lv in COHERENT]
        severe = [m for m, lv in cells.items() if lv not in COHERENT]
        if not mild:
            line = f"{task}, {mode}: damaging any of {', '.join(severe)} degrades responses to level I/II"
        elif not severe:
            line = f"{task}, {mode}: responses stay on task (level III/IV) whichever of {', '.join(mild)} is damaged"
        else:
            line = (f"{task}, {mode}: responses stay on task (level III/IV) with {', '.join(mild)} damaged and "
                    f"degrade to level I/II with {', '.join(severe)}")
        if "o_proj" in cells and len(cells) > 1:
            line += (". As in the paper, damaging o_proj is milder than damaging most other modules"
                     if cells["o_proj"] in COHERENT and len(severe) >= (len(cells) - 1) / 2 else
                     ". Unlike the paper's Table 3, o_proj is not among the mild ones here"
                     if cells["o_proj"] not in COHERENT else
                     ". o_proj is mild here, but so are most other modules, so this does not single it out")
        out.append(line + ".")
    return out


def _delta_findings(deltas: dict[str, dict]) -> list[str]:
    """Delta: where did fine-tuning move the weights?"""
    out = []
    for label, delta in deltas.items():
        ranking = delta_ranking(delta)
        if not ranking:
            continue
        line = f"Delta {label}: the largest mean relative change is in {ranking[0]}"
        if "o_proj" in ranking and ranking[0] != "o_proj":
            line += f"; o_proj ranks {ranking.index('o_proj') + 1} of {len(ranking)}"
        bimodal = [r for r in ranking if ((delta["roles"][r].get("moments_of_log10_abs_r") or {})
                                          .get("bimodality_coefficient") or 0) > BC_BIMODAL]
        line += (f"; roles whose element changes form two groups (BC > 5/9): {', '.join(bimodal)}" if bimodal else
                 "; no role's element changes form two groups (every BC <= 5/9)")
        out.append(line + ".")
    return out


def _seed_findings(entries: list[ModelEntry]) -> list[str]:
    """What the tests cover: the seed-aware method where it ran, and which trained models had too few seeds."""
    trained = [e for e in entries if e.is_trained and e.results]
    seeds = {e.name: max(r["summary"].get("n_seeds", 1) for r in e.results.values()) for e in trained}
    out = []
    if any(k >= MIN_SEEDS for k in seeds.values()):
        out.append(f"Seeds: every test involving a model trained on several seeds is a {METHOD}: its interval and p "
                   "cover another training seed as well as another sample of problems (docs/seeds.md).")
    few = [name for name, k in seeds.items() if k < MIN_SEEDS]
    if few:
        counts = sorted({seeds[n] for n in few})
        out.append(f"Training seeds: {', '.join(few)} trained on {' or '.join(map(str, counts))} seed(s), so their "
                   "tests cover the sampling of problems only, not a different training seed (seed variance needs "
                   f"{MIN_SEEDS} seeds per variant to estimate); a new seed can move a fine-tune's score by more "
                   "than these differences.")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Variants over training seeds


def group_by_variant(entries: list[ModelEntry]) -> dict[str, list[ModelEntry]]:
    """Entries of one variant trained at several seeds (extra["variant"], extra["seed"]), in seed order; a model
    without a seed is a variant of one."""
    groups: dict[str, list[ModelEntry]] = {}
    for e in entries:
        groups.setdefault(e.extra.get("variant") or e.name, []).append(e)
    return {v: sorted(es, key=lambda e: e.extra.get("seed") or 0) for v, es in groups.items()}


def seed_test(a: list[ModelEntry], b: list[ModelEntry], task: str) -> dict:
    """The seed-aware comparison of variant a against variant b on `task` (every seed of each, per-problem scores),
    from `sfn_train.evaluation.seeds`."""
    from .seeds import per_seed_scores, seed_aware_comparison

    _, scores = per_seed_scores([e.results[task] for e in a + b])  # on the problems every run answered
    return seed_aware_comparison(scores[: len(a)], scores[len(a):], fixed_a=_fixed(a), fixed_b=_fixed(b))


def _fixed(members: list[ModelEntry]) -> bool:
    """One model not trained at a seed here (A, B, a merge of them): no seed variance of its own."""
    return len(members) == 1 and members[0].extra.get("seed") is None


def seed_interval(members: list[ModelEntry], task: str) -> dict:
    """A variant's mean pass@1 over its seeds with an interval covering seeds and problems, and the seeds' range."""
    from .seeds import per_seed_scores, seed_aware_interval

    return seed_aware_interval(per_seed_scores([e.results[task] for e in members])[1])


def seed_table(groups: dict[str, list[ModelEntry]], baseline: str, tasks: list[str]) -> list[str]:
    """One row per variant: seeds, mean pass@1 over seeds, the range across seeds, and the seed-aware Δ against the
    baseline variant with its interval (seeds and problems) and p."""
    head = "".join(f" {t} mean pass@1 [95% CI] | range over seeds | Δ vs {baseline} [95% CI] (p) |" for t in tasks)
    lines = ["| variant | seeds |" + head, "|---|---|" + "---|---|---|" * len(tasks)]
    for variant, members in groups.items():
        cells = ""
        for task in tasks:
            if not all(task in e.results for e in members):
                cells += " — | — | — |"
                continue
            m = seed_interval(members, task)
            test = "—"
            if variant != baseline and baseline in groups:
                t = seed_test(members, groups[baseline], task)
                test = f"{t['delta']:+.3f} [{t['ci_low']:+.3f}, {t['ci_high']:+.3f}] ({format_p(t['p_value'])})"
                test += "" if t["seed_variance_estimable"] else " †"
            cells += (f" {m['mean']:.3f} [{m['ci_low']:.3f}, {m['ci_high']:.3f}] | {m['min']:.3f}–{m['max']:.3f} | "
                      f"{test} |")
        lines.append(f"| {variant} | {len(members)} |" + cells)
    return lines


def seed_findings(groups: dict[str, list[ModelEntry]], baseline: str, tasks: list[str]) -> list[str]:
    """One sentence per trained variant against the baseline, from the seed-aware test: a difference is called one
    only when the interval over seeds and problems excludes zero at p < ALPHA."""
    out = []
    for variant, members in groups.items():
        if variant == baseline or baseline not in groups or len(members) < 2 and len(groups[baseline]) < 2:
            continue
        for task in tasks:
            if not all(task in e.results for e in members + groups[baseline]):
                continue
            t = seed_test(members, groups[baseline], task)
            scores = [pass1(e.results[task]) for e in members]
            said = ("not significantly different from" if not significant(t) else
                    "better than" if t["delta"] > 0 else "worse than")
            line = (f"{task}: {variant} over {len(members)} seeds (mean {statistics.fmean(scores):.3f}, range "
                    f"{min(scores):.3f}–{max(scores):.3f}) is {said} {baseline} over {len(groups[baseline])} "
                    f"(Δ {t['delta']:+.3f}, 95% CI [{t['ci_low']:+.3f}, {t['ci_high']:+.3f}], "
                    f"{format_p(t['p_value'])}; {t['method']})")
            note = (t.get("note") or "").rstrip(".")
            out.append(line + (f": {note}" if note else "") + ".")
    return out
