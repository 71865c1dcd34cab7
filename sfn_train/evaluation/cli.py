"""`sfn eval`, `sfn compare`, `sfn grade`: argparse wrappers over `evaluate`, `compare` and `grade_file`.

Multi-word options accept both spellings (`--max-new-tokens` and `--max_new_tokens`), because the papers' scripts
use underscores while the rest of the CLI uses dashes.
"""

from __future__ import annotations

import argparse
import shlex

from ..arguments import ArgumentParser as _Parser  # errors are one SfnError line (sfn_train/arguments.py)
from ..errors import SfnError
from .grading import DEFAULT_TIMEOUT_S
from .settings import PROTOCOLS




def _opt(parser, name: str, **kw):
    names = [name] + (["--" + name[2:].replace("-", "_")] if "-" in name[2:] else [])
    parser.add_argument(*names, **kw)


def _on_off(value: str):
    v = value.lower()
    if v in ("auto",):
        return None
    if v in ("on", "true", "yes", "1"):
        return True
    if v in ("off", "false", "no", "0"):
        return False
    raise SfnError(f"--chat-template {value!r}: use on, off or auto.")


def _budget(value: str):
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise SfnError(f"--thinking-budget {value!r}: use a number of tokens or auto.") from None


def _task_files(values: list[str] | None, tasks: list[str], flag: str = "--task-file") -> dict[str, str]:
    files = {}
    for v in values or []:
        if "=" in v:
            name, path = v.split("=", 1)
        elif len(tasks) == 1:
            name, path = tasks[0], v
        else:
            raise SfnError(f"{flag} {v!r} must say which task it is for: {flag} NAME=VALUE.")
        files[name] = path
    return files


def eval_parser() -> argparse.ArgumentParser:
    """`sfn eval`'s options and defaults; `sfn study` validates its `eval:` block against the same parser."""
    p = _Parser(prog="sfn eval", description="Generate on tasks, grade, classify levels, write one JSON per model x task.")
    p.add_argument("models", nargs="+", help="checkpoint folders or hub ids (a base, with --plugin)")
    p.add_argument("--task", action="append", required=True, help="task name (aime24, math500, gsm8k, gpqa_diamond, "
                   "registered lab_*) or a problems .jsonl; repeatable")
    _opt(p, "--task-file", action="append", help="NAME=PATH: local JSONL for a built-in task (repeatable)")
    _opt(p, "--task-revision", action="append", help="NAME=REV: load built-in task NAME from the hub at revision REV "
         "(a commit, tag or branch; recorded in the result); repeatable")
    _opt(p, "--answer-type", choices=["math", "choice", "exact"], help="override the task's answer type")
    p.add_argument("--out", required=True, help="a .json file (one model, one task) or a folder")
    p.add_argument("--overwrite", action="store_true", help="replace results that --out already holds")
    p.add_argument("--label", action="append", help="label per model (default: the folder name); repeatable")
    p.add_argument("--plugin", help="plugin .safetensors applied on the (single) base model")
    p.add_argument("--force", action="store_true", help="apply --plugin even to a base whose fingerprint is not the "
                   "plugin's (recorded in the result)")
    p.add_argument("--protocol", choices=sorted(PROTOCOLS), default="sampled",
                   help="named settings for every option below left unset: s1 = simplescaling/s1's evaluation (greedy, "
                   "bare prompts, <|im_start|>think/answer, 'Wait' twice, s1's thinking budget), the paper's; sampled "
                   "= temperature 0.6, top_p 0.95, instruction prompts (default)")
    p.add_argument("--backend", choices=["hf", "vllm"], default="hf")
    p.add_argument("--temperature", type=float, help="0 = greedy (protocol: s1 0, sampled 0.6)")
    _opt(p, "--top-p", type=float)
    _opt(p, "--max-new-tokens", type=int, help="token budget per response (both protocols 32768)")
    p.add_argument("--samples", type=int, help="samples per problem (pass@1 is averaged over them; protocols 1)")
    p.add_argument("--prompts", choices=["instruct", "bare"], help="instruct: the task's instruction template; "
                   "bare: the problem alone (s1)")
    p.add_argument("--seed", type=int, default=0)
    _opt(p, "--chat-template", type=_on_off, default=None, help="on, off or auto (default: on if the tokenizer has one)")
    _opt(p, "--budget-forcing", type=int,
         help="s1: the first N times the model stops thinking, suppress the stop and append --wait-text")
    _opt(p, "--wait-text")
    _opt(p, "--end-of-thinking", help="the one token that closes the model's thinking (e.g. '</think>'); "
         "default: EOS ends thinking and response")
    _opt(p, "--thinking-budget", type=_budget, help="max thinking tokens, or auto (s1's rule); then the thinking "
         "is closed for the model")
    _opt(p, "--thinking-start", help="appended to the prompt to open the thinking (s1: '<|im_start|>think')")
    _opt(p, "--answer-start", help="replaces the end of thinking and opens the answer (s1: '<|im_start|>answer')")
    _opt(p, "--budget-spent-text", help="after --answer-start when the budget ran out (s1: '\\nFinal Answer:')")
    _opt(p, "--thinking-min-tokens", type=int, help="least tokens per thinking request (s1: 1)")
    _opt(p, "--max-model-len", type=int, help="context length per request (prompt + response); default the model's")
    _opt(p, "--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="auto", help="auto, bf16, fp16, fp32")
    p.add_argument("--device", default="auto")
    _opt(p, "--tensor-parallel-size", type=int, default=1, help="vLLM only")
    _opt(p, "--gpu-memory-utilization", type=float, default=0.9, help="vLLM only")
    p.add_argument("--limit", type=int, help="only the first N problems of each task")
    _opt(p, "--grading-timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per answer")
    _opt(p, "--grading-workers", type=int)
    _opt(p, "--allow-tokenizer-mismatch", action="store_true")
    _opt(p, "--no-progress", action="store_true")
    return p


def evaluate_kwargs(a: argparse.Namespace) -> dict:
    """Parsed `sfn eval` options -> the keyword arguments of `evaluate` other than models, tasks, out and labels."""
    return dict(
        task_files=_task_files(a.task_file, a.task), task_revisions=_task_files(a.task_revision, a.task, "--task-revision"),
        answer_type=a.answer_type,
        limit=a.limit, grading_timeout=a.grading_timeout, grading_workers=a.grading_workers,
        allow_tokenizer_mismatch=a.allow_tokenizer_mismatch, progress=not a.no_progress,
        backend=a.backend, temperature=a.temperature, top_p=a.top_p, max_new_tokens=a.max_new_tokens,
        samples=a.samples, seed=a.seed, chat_template=a.chat_template, budget_forcing=a.budget_forcing,
        wait_text=a.wait_text, batch_size=a.batch_size, dtype=a.dtype, device=a.device,
        tensor_parallel_size=a.tensor_parallel_size, gpu_memory_utilization=a.gpu_memory_utilization,
        max_model_len=a.max_model_len, end_of_thinking=a.end_of_thinking, thinking_budget=a.thinking_budget,
        protocol=a.protocol, prompts=a.prompts, thinking_start=a.thinking_start, answer_start=a.answer_start,
        budget_spent_text=a.budget_spent_text, thinking_min_tokens=a.thinking_min_tokens,
    )


def eval_main(argv: list[str]) -> int:
    a = eval_parser().parse_args(argv)
    if a.force and not a.plugin:
        raise SfnError("--force only applies with --plugin: remove it, or name the plugin file.")
    if a.plugin and len(a.models) != 1:
        raise SfnError("--plugin applies to one base model, but several were given; evaluate the base+plugin "
                       "in its own `sfn eval` call with the same --out folder.")
    from .settings import ModelSpec
    from .run import evaluate

    models = [ModelSpec(m, plugin=a.plugin, force_plugin=a.force) for m in a.models]
    written = evaluate(models, a.task, a.out, labels=a.label, command=shlex.join(["sfn", "eval", *argv]),
                       overwrite=a.overwrite, **evaluate_kwargs(a))
    import json

    for path in written:
        s = json.loads(path.read_text())["summary"]
        ci = "Wilson" if s.get("ci_method") == "wilson" else "bootstrap"
        print(f"{path}: pass@1 {100 * s['pass_at_1']:.1f}% [{100 * s['ci_low']:.1f}, {100 * s['ci_high']:.1f}] ({ci}) "
              f"over {s['n_problems']} problems, {s['mean_tokens']:.0f} tokens/response")
    return 0


def compare_main(argv: list[str]) -> int:
    p = _Parser(prog="sfn compare", description="Table, plots and verdicts of eval results against a baseline.")
    p.add_argument("files", nargs="+", help="JSON files written by `sfn eval`")
    p.add_argument("--baseline", help="model label to compare against (default: the first file's)")
    p.add_argument("--out", default="compare.md", help="Markdown report; PNG plots are written next to it")
    a = p.parse_args(argv)
    from .comparison import compare

    result = compare(a.files, a.baseline, a.out)
    print(f"wrote {result['report']} and {', '.join(str(x) for x in result['plots'])}")
    return 0


def grade_main(argv: list[str]) -> int:
    p = _Parser(prog="sfn grade", description="Grade {response, answer, type?} JSONL rows made elsewhere.")
    p.add_argument("responses", help="JSONL with fields response, answer and optional type (math, choice, exact)")
    p.add_argument("--out", required=True, help="JSONL: the same rows plus correct and extracted")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per answer")
    p.add_argument("--workers", type=int)
    _opt(p, "--no-progress", action="store_true")
    a = p.parse_args(argv)
    from .grading import grade_file

    s = grade_file(a.responses, a.out, timeout_s=a.timeout, workers=a.workers, progress=not a.no_progress)
    print(f"{a.out}: {s['correct']}/{s['rows']} correct ({100 * s['accuracy']:.1f}%)")
    return 0
