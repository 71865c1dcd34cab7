"""Evaluation tasks: a list of `{id, problem, answer}` problems, a prompt template and an answer type.

Why one shape for every task: generation, grading and statistics then never special-case a benchmark. A task is a
local JSONL file (one JSON object a line: `id`, `problem`, `answer`, optional `solution`, `choices`) or a registered
name. Built-in names (the paper's benchmarks) are resolved, in this order, from

1. an explicit file (`--task-file NAME=PATH`, or `task_files={"math500": PATH}` in the API),
2. the environment variable `SFN_TASK_<NAME>` (e.g. `SFN_TASK_MATH500=/data/math500.jsonl`),
3. `$SFN_TASKS_DIR/<name>.jsonl`,
4. the Hugging Face datasets hub, when reachable (the rows are converted to the shape above),

and otherwise fail with an `SfnError` saying how to provide the file. Tasks that ship inside the package (the lab's
`lab_reason`, `lab_onestep`) are JSONL files in `packaged_tasks/`, listed with their answer type and template in
`packaged_tasks/index.json`: evaluation reads them as data and never imports the code that generated them (the lab
depends on evaluation, not the reverse). `register_task` adds further local-file tasks at run time.

Templates are filled with plain `str.replace` of `{problem}` and `{choices}` (never `str.format`), because the
standard math instruction itself contains braces: `\\boxed{}`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SfnError
from ..jsonl import iter_jsonl

ANSWER_TYPES = ("math", "choice", "exact")

# The field's standard instruction (DeepSeek-R1, s1, Qwen2.5-Math evaluations).
MATH_TEMPLATE = "{problem}\nPlease reason step by step, and put your final answer within \\boxed{}."
CHOICE_TEMPLATE = (
    "{problem}\n\n{choices}\n"
    "Please reason step by step, and put the letter of your final answer (A, B, C or D) within \\boxed{}."
)
EXACT_TEMPLATE = "{problem}"
DEFAULT_TEMPLATES = {"math": MATH_TEMPLATE, "choice": CHOICE_TEMPLATE, "exact": EXACT_TEMPLATE}
# Bare prompts, as s1 trains and evaluates: the problem alone (s1's QUERY_TEMPLATE '{Question}'); GPQA's choices as
# s1's gpqa_diamond_openai lists them ("{Question}\n\nA) ...\nB) ...").
BARE_TEMPLATES = {"math": "{problem}", "choice": "{problem}\n\n{choices}", "exact": "{problem}"}
LETTERS = "ABCDEFGHIJ"


@dataclass
class Task:
    """A loaded task: everything generation and grading need, and where the problems came from."""

    name: str
    answer_type: str
    template: str
    problems: list[dict]
    source: str
    revision: str | None = None  # the hub revision asked for (None: a local file, or the hub's default branch)
    resolved_revision: str | None = None  # the hub commit the problems were loaded at (None: a local file, or unknown)

    def prompt(self, problem: dict) -> str:
        choices = problem.get("choices") or []
        block = "\n".join(f"{LETTERS[i]}) {c}" for i, c in enumerate(choices))
        return self.template.replace("{problem}", str(problem["problem"])).replace("{choices}", block)

    def describe(self) -> dict:
        digest = hashlib.sha256(json.dumps(self.problems, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
        return {"name": self.name, "answer_type": self.answer_type, "template": self.template,
                "source": self.source, "revision": self.revision,
                "resolved_revision": self.resolved_revision, "n_problems": len(self.problems),
                "problems_sha256": digest}


@dataclass
class TaskSpec:
    """A registered task: a local file, or a hub copy for built-ins (`hub` = dataset id shown in errors, `hub_args`
    = load_dataset's path, config and split, `loader` = hub rows -> problems)."""

    name: str
    answer_type: str
    template: str
    path: str | None = None
    hub: str | None = None
    hub_args: tuple[str, ...] = ()
    loader: Callable[..., list[dict]] | None = field(default=None, repr=False)
    n_problems: int | None = None  # how many problems the benchmark has: a hub copy with another count is refused
    access: str | None = None  # how to get access to a gated hub dataset


_REGISTRY: dict[str, TaskSpec] = {}

PACKAGED_TASKS_DIR = Path(__file__).resolve().parent / "packaged_tasks"


def packaged_task_file(name: str) -> Path:
    """The JSONL file of a task that ships with the package (e.g. `lab_reason`)."""
    spec = _REGISTRY.get(name)
    if spec is None or not spec.path or Path(spec.path).parent != PACKAGED_TASKS_DIR:
        raise SfnError(f"task {name!r} does not ship with the package; packaged tasks: {', '.join(_packaged_names())}.")
    return Path(spec.path)


def _packaged_names() -> list[str]:
    return sorted(n for n, s in _REGISTRY.items() if s.path and Path(s.path).parent == PACKAGED_TASKS_DIR)


def _register_packaged_tasks() -> None:
    index = json.loads((PACKAGED_TASKS_DIR / "index.json").read_text(encoding="utf-8"))
    for name, entry in index.items():
        _REGISTRY[name] = TaskSpec(name, entry["answer_type"], entry["template"],
                                   path=str(PACKAGED_TASKS_DIR / entry["file"]))


def register_task(name: str, path: str | os.PathLike, answer_type: str = "exact", template: str | None = None) -> None:
    """Register a task that ships as a local JSONL file, so `sfn eval --task NAME` finds it.

    Re-registering a name replaces it.
    """
    if answer_type not in ANSWER_TYPES:
        raise SfnError(f"task {name!r}: answer type {answer_type!r} is unknown; use one of {', '.join(ANSWER_TYPES)}.")
    _REGISTRY[name] = TaskSpec(name, answer_type, template or DEFAULT_TEMPLATES[answer_type], path=str(path))


def registered_tasks() -> list[str]:
    return sorted(_REGISTRY)


# ---------------------------------------------------------------------------------------------------------------
# Built-ins: hub rows -> {id, problem, answer, ...}


COMMIT = re.compile(r"[0-9a-f]{40}")


def _hub(dataset: str, *args, split: str, revision: str | None = None):
    from datasets import load_dataset

    return load_dataset(dataset, *args, split=split, revision=revision)


def loaded_commit(rows, revision: str | None = None) -> str | None:
    """The hub commit a `datasets.Dataset` was loaded at, or None when it cannot be told.

    `datasets` resolves the revision asked for (a branch, a tag, None for the default branch) to a commit before it
    downloads anything, and prepares the copy under `<cache>/<namespace>___<name>/<config>/<version>/<commit>/`: the
    folder of the Dataset's cache files names the commit it was read from. This also holds when `datasets`, unable to
    reach the hub, falls back to the newest copy in its cache, whatever the revision asked for. A revision asked for as
    a full commit is that commit. Otherwise None: a Dataset held in memory keeps no file, and a cache layout older
    than datasets 3 names no commit.
    """
    for entry in getattr(rows, "cache_files", None) or []:
        folder = Path(entry["filename"]).parent.name
        if COMMIT.fullmatch(folder):
            return folder
    return revision if revision and COMMIT.fullmatch(revision) else None


def _aime24(rows) -> list[dict]:
    return [{"id": str(r["ID"]), "problem": r["Problem"], "answer": str(r["Answer"]), "solution": r.get("Solution")}
            for r in rows]


def _aime24_nofigures(rows) -> list[dict]:
    """s1's AIME 2024 copy (its task aime24_nofigures): problems whose figures are described in text."""
    return [{"id": str(r.get("id", i)), "problem": r["problem"], "answer": str(r["answer"]),
             "solution": r.get("solution")} for i, r in enumerate(rows)]


def _math500(rows) -> list[dict]:
    return [{"id": r["unique_id"], "problem": r["problem"], "answer": r["answer"], "solution": r["solution"]}
            for r in rows]


def _openai_math(rows) -> list[dict]:
    """s1's MATH-500 copy (its task openai_math): the 500 test problems of OpenAI's PRM800K split."""
    return [{"id": str(r.get("unique_id", i)), "problem": r["problem"], "answer": str(r["answer"]),
             "solution": r.get("solution")} for i, r in enumerate(rows)]


def gsm8k_answer(solution: str) -> str:
    """GSM8K's gold is the text after '####', with thousands separators removed ('1,000' -> '1000')."""
    return solution.split("####")[-1].strip().replace(",", "")


def _gsm8k(rows) -> list[dict]:
    return [{"id": f"gsm8k-test-{i}", "problem": r["question"], "answer": gsm8k_answer(r["answer"]),
             "solution": r["answer"]} for i, r in enumerate(rows)]


def gpqa_choices(row: dict, index: int, seed: int = 0) -> tuple[list[str], str]:
    """Four choices in a shuffled order that depends only on (seed, index), and the letter of the correct one.

    GPQA lists the correct answer first; without shuffling a model could score by always answering A.
    """
    options = [row["Correct Answer"], row["Incorrect Answer 1"], row["Incorrect Answer 2"], row["Incorrect Answer 3"]]
    options = [str(o).strip() for o in options]
    order = list(range(4))
    random.Random(seed * 100003 + index).shuffle(order)
    return [options[i] for i in order], LETTERS[order.index(0)]


def _gpqa_diamond(rows) -> list[dict]:
    out = []
    for i, r in enumerate(rows):
        choices, letter = gpqa_choices(r, i)
        out.append({"id": r.get("Record ID") or f"gpqa-diamond-{i}", "problem": r["Question"].strip(),
                    "answer": letter, "choices": choices})
    return out


GPQA_ACCESS = ("Idavidrein/gpqa is gated: accept its terms at https://huggingface.co/datasets/Idavidrein/gpqa, then "
               "log in (huggingface-cli login, or set HF_TOKEN)")
for _name, _type, _hub_id, _hub_args, _loader, _n, _access in [
    ("aime24", "math", "Maxwell-Jia/AIME_2024", ("Maxwell-Jia/AIME_2024", "train"), _aime24, 30, None),  # the paper's
    ("aime24_nofigures", "math", "simplescaling/aime24_nofigures", ("simplescaling/aime24_nofigures", "train"),
     _aime24_nofigures, 30, None),  # s1's
    ("math500", "math", "HuggingFaceH4/MATH-500", ("HuggingFaceH4/MATH-500", "test"), _math500, 500, None),
    ("openai_math", "math", "simplescaling/openaimath (test)", ("simplescaling/openaimath", "test"), _openai_math, 500,
     None),  # s1's MATH-500
    ("gsm8k", "math", "openai/gsm8k (main, test)", ("openai/gsm8k", "main", "test"), _gsm8k, 1319, None),
    ("gpqa_diamond", "choice", "Idavidrein/gpqa (gpqa_diamond)", ("Idavidrein/gpqa", "gpqa_diamond", "train"),
     _gpqa_diamond, 198, GPQA_ACCESS),
]:
    _REGISTRY[_name] = TaskSpec(_name, _type, DEFAULT_TEMPLATES[_type], hub=_hub_id, hub_args=_hub_args,
                                loader=_loader, n_problems=_n, access=_access)
_register_packaged_tasks()


# ---------------------------------------------------------------------------------------------------------------
# Loading


def read_problems(path: str | os.PathLike, answer_type: str | None = None) -> list[dict]:
    """Read and check a problems JSONL: a clear error names the file and line of the first bad row."""
    path = Path(path)
    problems, seen = [], set()
    for lineno, row in iter_jsonl(path, ("problem", "answer"), "task file",
                                  "a JSONL file with one {id, problem, answer} object a line"):
        row = dict(row)
        row["id"] = str(row.get("id", lineno))
        if row["id"] in seen:
            raise SfnError(f"{path}:{lineno} repeats id {row['id']!r}; every problem needs its own id.")
        seen.add(row["id"])
        row["answer"] = str(row["answer"])
        if answer_type == "choice" and not row.get("choices") and row["answer"] not in LETTERS[:4]:
            raise SfnError(f"{path}:{lineno}: a choice task's answer must be a letter A-D or come with 'choices'.")
        problems.append(row)
    if not problems:
        raise SfnError(f"task file {path} holds no problems; write one {{id, problem, answer}} object a line.")
    return problems


def _is_path(name: str) -> bool:
    return name.endswith((".jsonl", ".json")) or os.sep in name or "/" in name or Path(name).is_file()


def _explicit_file(name: str, task_files: dict[str, str] | None) -> str | None:
    if task_files and name in task_files:
        return task_files[name]
    env = os.environ.get(f"SFN_TASK_{name.upper()}")
    if env:
        return env
    folder = os.environ.get("SFN_TASKS_DIR")
    if folder and (Path(folder) / f"{name}.jsonl").is_file():
        return str(Path(folder) / f"{name}.jsonl")
    return None


def load_task(name: str, *, task_files: dict[str, str] | None = None, answer_type: str | None = None,
              template: str | None = None, limit: int | None = None, bare: bool = False,
              revisions: dict[str, str] | None = None) -> Task:
    """Resolve a task name or JSONL path into a `Task` (see the module docstring for the resolution order).

    `bare`: prompt with the problem alone (BARE_TEMPLATES) instead of the task's instruction template.
    `revisions`: task name -> hub revision (a commit, tag or branch) to load a built-in at; recorded in the Task."""
    if answer_type is not None and answer_type not in ANSWER_TYPES:
        raise SfnError(f"answer type {answer_type!r} is unknown; use one of {', '.join(ANSWER_TYPES)}.")
    if name in _REGISTRY:
        spec = _REGISTRY[name]
        kind = answer_type or spec.answer_type
        tmpl = template or (spec.template if kind == spec.answer_type else DEFAULT_TEMPLATES[kind])
        path = _explicit_file(name, task_files) or spec.path
        if path:
            task = Task(name, kind, tmpl, read_problems(path, kind), str(path))
        else:
            revision = (revisions or {}).get(name)
            problems, commit = _from_hub(spec, revision)
            task = Task(name, kind, tmpl, problems, f"hub:{spec.hub}", revision, commit)
    elif _is_path(name):
        kind = answer_type or "math"
        task = Task(Path(name).stem, kind, template or DEFAULT_TEMPLATES[kind], read_problems(name, kind), str(name))
    else:
        raise SfnError(f"task {name!r} is neither a registered task ({', '.join(registered_tasks())}) nor a .jsonl "
                       "file; pass a known name or the path of a problems file.")
    if bare and template is None:
        task.template = BARE_TEMPLATES[task.answer_type]
    if limit is not None:
        task.problems = task.problems[:limit]
    return task


def _from_hub(spec: TaskSpec, revision: str | None = None) -> tuple[list[dict], str | None]:
    """A built-in's problems from the hub, and the commit they were loaded at (None, said in one line, if unknown)."""
    how = (f"task {spec.name!r} needs its problems: pass --task-file {spec.name}=PATH.jsonl (rows {{id, problem, "
           f"answer}}) or set SFN_TASK_{spec.name.upper()}=PATH, or make the hub dataset {spec.hub} reachable")
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise SfnError(how + " (the hub is switched off by HF_HUB_OFFLINE/HF_DATASETS_OFFLINE).")
    try:
        *args, split = spec.hub_args
        rows = _hub(*args, split=split, revision=revision)
        problems, commit = spec.loader(rows), loaded_commit(rows, revision)
    except Exception as exc:  # noqa: BLE001 - offline, gated, renamed: the fix is the same
        if spec.access and ("gated" in f"{type(exc).__name__} {exc}".lower() or "401" in str(exc)):
            raise SfnError(f"task {spec.name!r}: {spec.access}; or pass --task-file {spec.name}=PATH.jsonl.") from None
        raise SfnError(f"{how} (loading it failed: {type(exc).__name__}).") from None
    for p in problems:
        p["answer"] = str(p["answer"])
    if spec.n_problems is not None and len(problems) != spec.n_problems:
        raise SfnError(f"task {spec.name!r}: {spec.hub}{f' at {revision}' if revision else ''} gave {len(problems)} "
                       f"problems, not the benchmark's {spec.n_problems}; pass --task-revision {spec.name}=REV of "
                       "the copy you mean, or --task-file.")
    if commit and revision and COMMIT.fullmatch(revision) and commit != revision:
        raise SfnError(f"task {spec.name!r}: asked for commit {revision} of {spec.hub}, but datasets loaded commit "
                       f"{commit} (from its cache, when the hub was unreachable); make the hub reachable, or pass "
                       f"--task-file {spec.name}=PATH.jsonl.")
    _say_commit(spec, revision, commit)
    return problems, commit


def _say_commit(spec: TaskSpec, revision: str | None, commit: str | None) -> None:
    """One line: the commit a built-in was loaded at and how to load it again, or that it is unknown."""
    if commit is None:
        print(f"warning: task {spec.name!r}: the hub commit of {spec.hub}{f' at {revision}' if revision else ''} "
              "could not be told (datasets kept no cached copy naming it), so its result records resolved_revision "
              f"null; pin a commit with --task-revision {spec.name}=SHA.", file=sys.stderr)
    elif commit == revision:
        print(f"note: task {spec.name!r}: loaded {spec.hub} at the pinned commit {commit}.", file=sys.stderr)
    else:
        asked = f"revision {revision}" if revision else "the default branch"
        print(f"note: task {spec.name!r}: loaded {spec.hub} at commit {commit} (asked for {asked}); to load this copy "
              f"again pass --task-revision {spec.name}={commit}.", file=sys.stderr)


def write_problems(path: str | os.PathLike, problems: list[dict]) -> Path:
    """Write problems as JSONL (used to freeze a hub task into a local file, and by tests)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in problems), encoding="utf-8")
    return path
