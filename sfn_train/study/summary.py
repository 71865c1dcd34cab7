"""A study's `report.md`: the paper's tables for whatever the study contains, the delta, the comparison plots and
the findings, from a plain record of the run (`study_run.json`) and the files the stages wrote.

Why a plain record: the report then depends on what was run, not on the pipeline object, so any pipeline that writes
the same record (the lab's, over its generated data) gets the same report. Tables and findings come from
`sfn_train.evaluation.tables`; the all-models table and plots from `sfn compare`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
from pathlib import Path

from ..errors import SfnError
from ..evaluation import compare, load_result
from ..evaluation.tables import (ModelEntry, delta_table, destruction_table, findings, finetune_table,
                                 group_by_variant, merge_table, seed_findings, seed_table)
from ..manifest import MANIFEST_FILE, new_manifest, write_json
from .schema import seeded, variant_of

RECORD_FILE = "study_run.json"
FORMAT = "sfn-study-run/1"


# ---------------------------------------------------------------------------------------------------------------
# The record of a run


def _effective(ns):
    """The generation settings a study's `sfn eval` runs use: its options over their protocol's values."""
    from ..evaluation.cli import evaluate_kwargs
    from ..evaluation.settings import GenerationSettings, resolve_settings

    kwargs = evaluate_kwargs(ns)
    return resolve_settings({k: v for k, v in kwargs.items() if k in GenerationSettings.__dataclass_fields__})[0]


def build_record(pipe) -> dict:
    """What the study ran, with every path relative to its output folder."""
    study, out, runner = pipe.study, pipe.out, pipe.runner
    rel = lambda p: os.path.relpath(p, out)  # noqa: E731
    models = []
    for name in pipe.model_names:
        path = pipe.model_path(name)
        entry = {"name": name, "path": path if pipe.producer(name) is None else rel(path),
                 "variant": variant_of(name)[0], "seed": pipe.seed_of.get(name),
                 "evals": {r["task"]["name"]: rel(f) for f, r in _eval_results(out / "evals" / name)}}
        if name == "base":
            entry.update(group="base", describe="A, as given")
        elif name == "reasoning":
            entry.update(group="reasoning", describe="B, as given")
        elif name in pipe.finetunes:
            entry.update(group="finetune", describe="", training=_training(out / "train" / name,
                                                                          runner.marker(f"train:{name}") or {}))
            entry["describe"] = entry["training"].pop("describe")
        elif name in pipe.merges:
            m = pipe.merges[name]
            describe = ", ".join(m.modules) + _layers(m.layers)
            describe += f", alpha {m.alpha:g}" if m.alpha != 1.0 else ""
            describe += f" (from {m.donor})" if m.donor != "reasoning" else ""
            entry.update(group="merge", describe=describe, donor=m.donor)
        else:
            mode, module = pipe.destroyed[name]
            entry.update(group="destroy", describe=f"{mode} {module or 'whole layers'}{_layers(study.destroy.layers)}"
                         + (f" of {pipe.destroy_source[name]}" if pipe.seed_of.get(name) is not None else ""),
                         destroy=[mode, module])
        models.append(entry)
    ns = pipe.eval_ns
    command = shlex.join(["sfn", "study", str(pipe.study_file), "--out", str(out)])
    return new_manifest("study", command, **{
        "format": FORMAT,
        "title": pipe.study_file.stem,
        "study_file": str(pipe.study_file),
        "base": study.base,
        "reasoning": study.reasoning,
        "baseline": pipe.baseline,
        "seed": ns.seed,
        "seeds": list(study.seeds),  # training seeds of the fine-tunes (empty: one run each at the recipe's seed)
        "eval": {**{k: getattr(_effective(ns), k) for k in ("protocol", "backend", "samples", "temperature", "top_p",
                                                            "max_new_tokens", "budget_forcing", "tensor_parallel_size")},
                 "limit": ns.limit},
        "eval_destroyed": dict(study.destroy.eval) if study.destroy else {},
        "models": models,
        "destroy": None if study.destroy is None else {
            "model": study.destroy.model, "layers": ",".join(study.destroy.layers),
            "modules": list(study.destroy.modules), "modes": list(study.destroy.modes)},
        "deltas": {f"A -> {'B' if n == 'reasoning' else n}": rel(out / "delta" / n)
                   for n in (s.split(":", 1)[1] for s in runner.order if s.startswith("delta:"))},
        "stages": [{"name": n, "seconds": (runner.marker(n) or {}).get("seconds")} for n in runner.order
                   if n != "report"],
        "study": dataclasses.asdict(study),
    })


def _layers(layers: list[str]) -> str:
    joined = ",".join(map(str, layers))
    return "" if joined == "all" else f" in layers {joined}"


def _eval_results(folder: Path) -> list[tuple[Path, dict]]:
    return [(f, load_result(f)) for f in sorted(folder.glob("*.json"))] if folder.is_dir() else []


def _training(folder: Path, marker: dict) -> dict:
    """Trainable share, speed and peak memory of one `sfn train` run, from its manifest and the stage's marker."""
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    selection, metrics = manifest["selection"], manifest.get("metrics", {})
    layers = ",".join(map(str, selection.get("trainable_layers") or ["all"]))
    rss = marker.get("peak_rss_mb")
    gpu = metrics.get("peak_gpu_memory_mb")
    memory = [f"{gpu / 1024:.1f} GB GPU (rank 0)"] if gpu else []
    memory += [f"{rss:.0f} MB RSS"] if rss else []
    return {
        "describe": ", ".join(selection["trainable_modules"]) + ("" if layers == "all" else f" in layers {layers}"),
        "trainable_params": selection["trainable_params"],
        "trainable_fraction": selection["trainable_fraction"],
        "steps_per_s": metrics.get("train_steps_per_second"),
        "train_s": metrics.get("train_runtime"),
        "peak_memory": ", ".join(memory) or "—",
        "peak_memory_mb": gpu or rss,
        "processes": manifest.get("world_size"),
    }


# ---------------------------------------------------------------------------------------------------------------
# The report


def entries_from_record(record: dict, out: Path) -> list[ModelEntry]:
    entries = []
    for m in record["models"]:
        results = {task: load_result(out / path) for task, path in m["evals"].items()}
        entries.append(ModelEntry(m["name"], m["group"], m["describe"], results, m.get("training"),
                                  tuple(m["destroy"]) if m.get("destroy") else None,
                                  {"donor": m.get("donor"), "variant": m.get("variant"), "seed": m.get("seed")}))
    return entries


def write_report(pipe) -> Path:
    out = pipe.out
    record = build_record(pipe)
    write_json(out / RECORD_FILE, record)
    return report_from_record(record, out)


def report_from_record(record: dict, out: Path) -> Path:
    """`out/report.md` (+ compare.md and its plots) from a run record; every number read from the files."""
    out = Path(out)
    entries = entries_from_record(record, out)
    tasks = list(dict.fromkeys(t for e in entries for t in e.results))
    missing = [f"{e.name}/{t}" for e in entries for t in tasks if t not in e.results]
    if missing:
        raise SfnError(f"the study's evaluation is incomplete (no result for {', '.join(missing[:4])}); rerun the eval "
                       "stages before the report.")
    lines = _header(record, entries, tasks)
    for seed in record.get("seeds") or [None]:
        lines += _tables(record, entries, tasks, seed)
    delta_lines, deltas = _deltas(record, out)
    lines += delta_lines
    lines += _every_model(record, out)
    lines += _seed_section(record, entries, tasks)
    lines += ["## What this study found", ""]
    lines += [f"- {s}" for s in _findings(record, entries, tasks, deltas)] + [""]
    lines += ["## Run", "", "Seconds each stage took when it ran (a stage done before is not run again).", "",
              "| stage | seconds |", "|---|---|"]
    lines += [f"| {s['name']} | {_seconds(s['seconds'])} |" for s in record["stages"]]
    report = out / "report.md"
    from ..checkpoint import atomic_file

    with atomic_file(report) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return report


def _header(record: dict, entries: list[ModelEntry], tasks: list[str]) -> list[str]:
    base = next(e for e in entries if e.name == "base")
    ev = record["eval"]
    seeds = record.get("seeds") or []
    lines = [f"# Study report: {record['title']}", ""]
    lines += [f"A = `{record['base']}`" + (f"; B = `{record['reasoning']}`" if record["reasoning"] else "")
              + f". Baseline of the comparisons: **{record['baseline']}**. Tasks: {', '.join(tasks)} "
              f"({', '.join(_n_problems(base, t) for t in tasks)}).", ""]
    lines += [f"Evaluation: protocol {ev.get('protocol', 'sampled')} (docs/evaluation.md), backend {ev['backend']}, "
              f"{ev['samples']} sample(s) per problem, temperature "
              f"{ev['temperature']}, top_p {ev['top_p']}, at most {ev['max_new_tokens']} new tokens"
              + (f", budget forcing {ev['budget_forcing']}" if ev["budget_forcing"] else "")
              + (f", first {ev['limit']} problems of each task" if ev["limit"] else "")
              + (f"; the destroyed models with {_options(record['eval_destroyed'])}"
                 if record["eval_destroyed"] else "")
              + ". pass@1 is averaged over samples, with a 95% bootstrap CI over problems (W: a Wilson interval where "
              "every problem scored the same); Δ is a paired bootstrap over the problems both models answered "
              "(p<0.001 is the test's resolution). Levels I/II/III/IV: degenerate, off task, on task but wrong, "
              "correct. Every number below was measured by this study's stages.", ""]
    if seeds:
        lines += [f"Training seeds: {', '.join(map(str, seeds))}. Each fine-tune, and each model made from one, is "
                  "listed once per seed (`name@seed`) in the tables below, whose intervals and tests cover the test "
                  "problems only; the section \"Variants over seeds\" compares the variants over seeds and "
                  "problems, and the findings use that test.", ""]
    else:
        lines += ["Each fine-tune was trained once: the intervals and tests cover the sampling of test problems, "
                  "not a different training seed (add `seeds:` to the study for that).", ""]
    return lines


def _tables(record: dict, entries: list[ModelEntry], tasks: list[str], seed: int | None) -> list[str]:
    """The paper's Tables 1-3 for the models of one training seed (every model when the study has no seeds)."""
    shown = [e for e in entries if e.extra.get("seed") in (None, seed)]
    by = {e.extra.get("variant") or e.name: e for e in shown}
    baseline, eval_seed = by[record["baseline"]], record["seed"]
    base, reasoning = by["base"], by.get("reasoning")
    tuned = [e for e in shown if e.group == "finetune"]
    merges = [e for e in shown if e.group == "merge"]
    destroyed = [e for e in shown if e.group == "destroy"]
    at = f" (training seed {seed})" if seed is not None else ""
    lines = []
    if tuned:
        rows = [base] + ([reasoning] if reasoning else []) + tuned
        lines += [f"## Fine-tunes from A against {baseline.name}{at} (the paper's Table 2)", "",
                  "Trainable share, steps/s and training time from each run's manifest; peak memory of the training "
                  "process (RSS; on a GPU also the allocator's peak on rank 0).", ""]
        lines += finetune_table(rows, baseline, tasks, eval_seed) + [""]
    if merges:
        donors = [by[n] for n in dict.fromkeys(variant_of(e.extra.get("donor") or "")[0] for e in merges) if n in by]
        lines += [f"## Merges: A with modules of B, no further training{at} (the paper's Table 1)", ""]
        lines += merge_table([base, *merges, *donors], base, tasks, eval_seed) + [""]
    if destroyed:
        d = record["destroy"]
        lines += [f"## Destruction of {d['model']} in layers {d['layers']}{at} (the paper's Table 3)", "",
                  "Cell: the majority response level, then pass@1. The paper judged one conversation per cell; "
                  "here every problem of the task counts.", ""]
        modules = [m for m in d["modules"]] if any(mode != "remove" for mode in d["modes"]) else [""]
        for task in tasks:
            lines += [f"{task}:", ""] + destruction_table(destroyed, modules, task) + [""]
    return lines


def _deltas(record: dict, out: Path) -> tuple[list[str], dict]:
    deltas, lines = {}, []
    if record["deltas"]:
        lines += ["## Delta: where fine-tuning moved the weights (the paper's Figures 2-3)", "",
                  "Per role: mean over layers of ‖W_B − W_A‖/‖W_A‖ and of ‖W_B − W_A‖; BC is Sarle's bimodality "
                  "coefficient of log10|r| over the role's elements (r = ΔW/|W_A| element-wise); above 5/9 the "
                  "elements form two groups, such as untouched and moved.", ""]
        for label, folder in record["deltas"].items():
            delta = json.loads((out / folder / "delta.json").read_text())
            deltas[label] = delta
            lines += [f"### {label}", ""] + delta_table(delta) + [""]
            lines += [f"![{label}: {what}]({folder}/{png})" for png, what in
                      (("delta_l2_by_role.png", "L2 by role"), ("delta_rel_by_layer.png", "relative change by layer"),
                       ("delta_hist_by_role.png", "histograms")) if (out / folder / png).exists()] + [""]
    return lines, deltas


def _every_model(record: dict, out: Path) -> list[str]:
    seeds, baseline = record.get("seeds") or [], record["baseline"]
    names = [m["name"] for m in record["models"]]
    against = baseline if baseline in names else seeded(baseline, seeds[0])  # a seeded baseline: its first seed
    files = [out / path for m in record["models"] for path in m["evals"].values()]
    comparison = compare(files, baseline=against, out=out / "compare.md", seed=record["seed"])
    lines = [f"## Every model against {against}", "",
             "The full table with verdicts and level shares: [compare.md](compare.md).", ""]
    return lines + [f"![{p.stem}]({p.name})" for p in comparison["plots"]] + [""]


def _seed_section(record: dict, entries: list[ModelEntry], tasks: list[str]) -> list[str]:
    if not record.get("seeds"):
        return []
    groups = group_by_variant(entries)
    seeded_groups = {v: es for v, es in groups.items() if es[0].extra.get("seed") is not None or v == record["baseline"]}
    return ["## Variants over seeds", "",
            "One row per variant: its training seeds, the mean pass@1 over them, the range across seeds, and its "
            f"difference from {record['baseline']} with an interval and a test that cover both the training seeds "
            "and the test problems (`sfn_train.evaluation.seeds`: a seed-level Welch t with a problem term). †: "
            "fewer than 3 seeds on a side, so seed variance cannot be estimated and that test covers the problems "
            "only.", ""] + seed_table(seeded_groups, record["baseline"], tasks) + [""]


def _findings(record: dict, entries: list[ModelEntry], tasks: list[str], deltas: dict) -> list[str]:
    """With seeds, every model trained per seed is judged by the seed-aware test; the rest (A, B, damaged copies of
    them) by the per-problem test, as without seeds."""
    if not record.get("seeds"):
        return findings(entries, tasks, record["baseline"], deltas, record["seed"])
    unseeded = [e for e in entries if e.extra.get("seed") is None]
    said = seed_findings(group_by_variant(entries), record["baseline"], tasks)
    baseline_unseeded = record["baseline"] in {e.name for e in unseeded}
    return said + findings(unseeded, tasks, record["baseline"] if baseline_unseeded else "base", deltas,
                           record["seed"])


def _n_problems(entry: ModelEntry, task: str) -> str:
    return f"{task}: {entry.results[task]['summary']['n_problems']} problems"


def _seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def _options(options: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in options.items())
