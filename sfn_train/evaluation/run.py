"""`evaluate`: models x tasks -> one self-contained JSON per pair (responses, verdicts, levels, settings, summary).

Why one file per model x task holding everything: a result must be re-gradable and auditable months later without
the run that made it, and `sfn compare` needs nothing else. Everything that could change a number is recorded:
sampling settings, backend, seed, budget forcing, model path, plugin (with its metadata and the check it passed),
tokenizer signature, level thresholds, and the provenance every sfn output carries (`sfn_train.manifest`: command,
versions, git revision). Each file is written atomically.

Order of work: all inputs are checked first (tasks load, labels unique, output paths decided, tokenizers agree, the
end-of-thinking token exists, --max-model-len fits every model, and for vLLM the tensor-parallel size fits the heads
and GPUs), so a typo fails in seconds rather than after the first model has generated for an hour. Then each model is
loaded once (hf: one model in memory; vLLM: one engine, base + plugin merged once) and runs every task, and is freed
(the vLLM engine shut down) before the next model loads.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ..errors import SfnError
from ..manifest import new_manifest, write_json
from . import levels as levels_mod
from .context import check_max_model_len
from .forcing import end_of_thinking_id, make_rows
from .hf_backend import free_model, generate_hf, hf_context_length, load_hf_model, resolve_device
from .settings import ModelSpec, resolve_settings
from .tokens import build_prompt_ids, eos_token_ids, load_tokenizer, signature_differences, tokenizer_signature
from .vllm_backend import VllmEngine, check_vllm
from .grading import DEFAULT_TIMEOUT_S, grade_many
from .stats import summarize
from .tasks import Task, load_task

FORMAT = "sfn-eval/1"


def _as_spec(model) -> ModelSpec:
    if isinstance(model, ModelSpec):
        return model
    if isinstance(model, dict):
        return ModelSpec(**model)
    return ModelSpec(str(model))


def output_paths(out: str | os.PathLike, specs: list[ModelSpec], tasks: list[Task]) -> dict[tuple[str, str], Path]:
    """`out` is the JSON file for a single model x task; otherwise a folder of `{label}__{task}.json`."""
    out = Path(out)
    pairs = [(s.label, t.name) for s in specs for t in tasks]
    if out.suffix == ".json":
        if len(pairs) != 1:
            raise SfnError(f"--out {out} names one JSON file but there are {len(pairs)} model x task results; "
                           "pass a folder as --out.")
        return {pairs[0]: out}
    safe = lambda s: "".join(c if c.isalnum() or c in "-_.+" else "_" for c in s)  # noqa: E731
    return {(label, task): out / f"{safe(label)}__{safe(task)}.json" for label, task in pairs}


def _check_tokenizers(specs: list[ModelSpec], allow_mismatch: bool) -> dict[str, tuple]:
    """Load every tokenizer (cheap) and insist they agree, unless allowed: else a comparison is not like for like."""
    info = {}
    for spec in specs:
        tok = load_tokenizer(spec.path)
        eos = eos_token_ids(spec.path, tok)
        info[spec.label] = (tok, eos, tokenizer_signature(tok, eos))
    first_label, (_, _, first) = next(iter(info.items()))
    for label, (_, _, sig) in info.items():
        diff = signature_differences(first, sig)
        if diff and not allow_mismatch:
            raise SfnError(f"models {first_label!r} and {label!r} differ in {', '.join(diff)}; their responses are not "
                           "comparable -- evaluate them separately or pass --allow-tokenizer-mismatch.")
    return info


def _check_before_loading(paths: dict, specs: list[ModelSpec], overwrite: bool) -> None:
    """Refuse to replace existing results unless `overwrite`; fail at once on a model that is not there (a mistyped
    folder, or a hub id out of reach: sfn_train/preflight.py), not after the hub's retries."""
    from ..preflight import check_model_source

    existing = [str(p) for p in paths.values() if p.exists()]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise SfnError(f"{existing[0]} already holds a result{more}: choose another --out or pass --overwrite to "
                       "replace it.")
    for spec in specs:
        check_model_source(spec.path, "model")


def evaluate(models: list, tasks: list[str], out: str | os.PathLike, *, labels: list[str] | None = None,
             task_files: dict[str, str] | None = None, task_revisions: dict[str, str] | None = None, answer_type: str | None = None, limit: int | None = None,
             grading_timeout: float = DEFAULT_TIMEOUT_S, grading_workers: int | None = None,
             allow_tokenizer_mismatch: bool = False, progress: bool = True, command: str | None = None,
             overwrite: bool = True, **settings) -> list[Path]:
    """Generate, grade, classify and summarise every model on every task; return the JSON files written.

    `models`: paths / hub ids, `ModelSpec`s or dicts {path, plugin?, label?, force_plugin?}. `settings`:
    `GenerationSettings` fields (temperature, top_p, max_new_tokens, samples, seed, chat_template, budget_forcing,
    backend, ...). `command`: the command line recorded in each result (default: this process's). `overwrite`:
    whether a result file that already exists may be replaced (`sfn eval` refuses unless --overwrite).
    """
    gen, changed = resolve_settings(settings)
    specs = [_as_spec(m) for m in models]
    if not specs or not tasks:
        raise SfnError("nothing to evaluate: pass at least one model and one --task.")
    if labels:
        if len(labels) != len(specs):
            raise SfnError(f"{len(labels)} --label value(s) for {len(specs)} model(s); give one label per model.")
        for spec, label in zip(specs, labels):
            spec.label = label
    seen = [s.label for s in specs]
    if len(set(seen)) != len(seen):
        raise SfnError(f"two models share the label {next(x for x in seen if seen.count(x) > 1)!r}; "
                       "give each a distinct --label.")
    loaded = [load_task(t, task_files=task_files, answer_type=answer_type, limit=limit,
                        bare=gen.prompts == "bare", revisions=task_revisions) for t in tasks]
    paths = output_paths(out, specs, loaded)
    _check_before_loading(paths, specs, overwrite)
    tok_info = _check_tokenizers(specs, allow_tokenizer_mismatch)
    for spec in specs:
        tokenizer, eos, _ = tok_info[spec.label]
        end_of_thinking_id(tokenizer, gen.end_of_thinking, eos)
        if gen.backend == "hf":
            check_max_model_len(spec, gen)
    if gen.backend == "vllm":
        check_vllm(specs, gen)
    plugin_checks = _check_plugins(specs)

    written = []
    for spec in specs:
        tokenizer, eos, signature = tok_info[spec.label]
        model = engine = None
        if gen.backend == "hf":
            model, tokenizer = load_hf_model(spec, gen, plugin_checks.get(spec.label))
            context_len = hf_context_length(model, gen)
            engine_info = {"engine": "hf", "context_length": context_len,
                           "dtype": str(next(model.parameters()).dtype)}
        use_chat = gen.chat_template if gen.chat_template is not None else bool(tokenizer.chat_template)
        if use_chat and not tokenizer.chat_template:
            raise SfnError(f"{spec.path} has no chat template; pass --chat-template off.")
        if gen.backend == "vllm":
            engine = VllmEngine(spec, gen)
            engine_info = engine.info
        try:
            for task in loaded:
                prompts = [_prompt(tokenizer, task.prompt(p), use_chat, gen) for p in task.problems]
                rows = make_rows([ids for _, ids in prompts], gen.samples)
                shown = progress and f"{spec.label} on {task.name}"  # each progress bar names its model and task
                if engine is None:
                    seconds = generate_hf(model, tokenizer, rows, gen, eos, shown, context_len)
                else:
                    seconds = engine.generate(tokenizer, rows, eos, shown)
                _note_context_stops(spec, task, rows, engine_info)
                result = _assemble(spec, task, gen, use_chat, prompts, rows, tokenizer, seconds, signature,
                                   grading_timeout, grading_workers, shown, plugin_checks.get(spec.label), command)
                result["settings"].update(engine=engine_info, protocol_changes=changed)
                path = paths[(spec.label, task.name)]
                path.parent.mkdir(parents=True, exist_ok=True)
                write_json(path, result, indent=1)
                written.append(path)
        finally:
            if engine is not None:
                engine.close()
            if model is not None:
                free_model(model)
            model = engine = None
    return written


def _prompt(tokenizer, text: str, use_chat: bool, gen) -> tuple[str, list[int]]:
    """(prompt string, ids): the chat-templated (or raw) prompt, then `thinking_start` (s1: "<|im_start|>think")."""
    prompt, ids = build_prompt_ids(tokenizer, text, use_chat)
    if gen.thinking_start:
        prompt += gen.thinking_start
        ids = ids + list(tokenizer(gen.thinking_start, add_special_tokens=False)["input_ids"])
    return prompt, ids


def _texts(tokenizer, row, gen) -> tuple[str, str]:
    """(the response, the part graded). With s1's markers the response keeps them ("<|im_start|>answer") and the
    answer after them is graded, as s1's extraction does; otherwise the whole response, special tokens dropped."""
    if gen.answer_start is None:
        text = tokenizer.decode(row.gen_ids, skip_special_tokens=True)
        return text, text
    text = tokenizer.decode(row.gen_ids, skip_special_tokens=False)
    if row.answer_from is None:
        return text, text
    return text, tokenizer.decode(row.gen_ids[row.answer_from :], skip_special_tokens=True)


def _note_context_stops(spec, task, rows, engine_info) -> None:
    stopped = sum(r.finish_reason == "context" for r in rows)
    if stopped:
        print(f"note: {spec.label} / {task.name}: {stopped} of {len(rows)} responses stopped at the context length "
              f"({engine_info['context_length']} tokens); raise --max-model-len if the model allows it.",
              file=sys.stderr)


def _check_plugins(specs: list[ModelSpec]) -> dict[str, dict]:
    """Check every plugin against its base before anything generates: label -> `check_plugin`'s record."""
    from ..checkpoint import Checkpoint
    from ..plugin import check_plugin

    return {spec.label: check_plugin(spec.plugin, Checkpoint(spec.path), force=spec.force_plugin)
            for spec in specs if spec.plugin}


def _assemble(spec, task, gen, use_chat, prompts, rows, tokenizer, seconds, signature, grading_timeout,
              grading_workers, progress, plugin_check=None, command=None) -> dict:
    texts = [_texts(tokenizer, r, gen) for r in rows]
    responses = [text for text, _ in texts]
    items = [{"response": graded, "answer": task.problems[r.problem_index]["answer"], "type": task.answer_type,
              "choices": task.problems[r.problem_index].get("choices")} for r, (_, graded) in zip(rows, texts)]
    grades = grade_many(items, timeout_s=grading_timeout, workers=grading_workers, progress=progress)

    problems = [{**{k: v for k, v in p.items()}, "prompt": prompts[i][0], "samples": []}
                for i, p in enumerate(task.problems)]
    all_levels = []
    for row, text, grade in zip(rows, responses, grades):
        problem = task.problems[row.problem_index]
        level, features = levels_mod.classify_level(text, problem=str(problem["problem"]), correct=grade["correct"],
                                                    extracted=grade["extracted"], finish_reason=row.finish_reason)
        all_levels.append(level)
        problems[row.problem_index]["samples"].append({
            "sample": row.sample_index, "response": text, "extracted": grade["extracted"],
            "correct": grade["correct"], "reason": grade["reason"], "level": level, "level_features": features,
            "tokens": len(row.gen_ids), "finish_reason": row.finish_reason, "waits": row.waits,
            "answer_from": row.answer_from, "budget_spent": row.budget_spent,
        })
    per_problem = [[s["correct"] for s in p["samples"]] for p in problems]
    plugin_meta = None
    if spec.plugin:
        from ..plugin import read_plugin_metadata

        plugin_meta = read_plugin_metadata(spec.plugin)
    return new_manifest(
        "eval", command,
        format=FORMAT,
        model={"label": spec.label, "path": str(spec.path), "plugin": spec.plugin, "plugin_metadata": plugin_meta,
               "plugin_check": plugin_check, "tokenizer_signature": signature},
        task=task.describe(),
        settings={**gen.to_dict(), "chat_template": use_chat, "grading_timeout_s": grading_timeout,
                  "device": resolve_device(gen.device) if gen.backend == "hf" else "cuda"},
        level_thresholds=dict(levels_mod.THRESHOLDS),
        summary=summarize(per_problem, [len(r.gen_ids) for r in rows], seconds, all_levels, seed=gen.seed),
        problems=problems,
    )


def load_result(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise SfnError(f"eval result {path} does not exist; pass the JSON files `sfn eval` wrote.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SfnError(f"{path} is not valid JSON ({exc.msg}); pass the JSON files `sfn eval` wrote.") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise SfnError(f"{path} is not an `sfn eval` result (no format {FORMAT!r}).")
    return data
