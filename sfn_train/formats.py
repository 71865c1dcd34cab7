"""Named dataset formats: a recipe's `dataset_format` builds `prompt`/`completion` from a known dataset's columns.

`s1` is simplescaling/s1's training text (its data/tokenization.py): the prompt is the bare question (s1's
QUERY_TEMPLATE '{Question}'), the assistant turn is

    <|im_start|>think\\n{thinking}\\n<|im_start|>answer\\n{answer}

where `thinking` is the trace (s1K: the `thinking_trajectories` list joined by newlines; s1K-1.1: the
`deepseek_thinking_trajectory` string), stripped, and `answer` is the attempt (`attempt`, or `deepseek_attempt`)
with "Answer: " put in front unless it already says "Answer:". The chat template then wraps them as s1's
`apply_chat_template` does (user turn, assistant turn). `<|im_start|>` is the one token that ends s1's thinking at
evaluation (`sfn eval --protocol s1`), which is why the delimiters are these and not `<think>`/`</think>`.
"""

from __future__ import annotations

from .errors import SfnError

FORMATS = ("none", "s1")

# (thinking column, attempt column) of s1K and of s1K-1.1, tried in this order
S1_COLUMNS = (("thinking_trajectories", "attempt"), ("deepseek_thinking_trajectory", "deepseek_attempt"))


def s1_text(thinking, attempt: str) -> str:
    """The assistant turn s1 trains on, from one row's thinking trace (a string or a list of strings) and attempt."""
    trace = "\n".join(thinking) if isinstance(thinking, list) else str(thinking)
    answer = attempt if "Answer:" in attempt else "Answer: " + attempt
    return "<|im_start|>think\n" + trace.strip() + "\n<|im_start|>answer\n" + answer.strip()


def s1_columns(columns: list[str]) -> tuple[str, str]:
    for thinking, attempt in S1_COLUMNS:
        if {"question", thinking, attempt} <= set(columns):
            return thinking, attempt
    raise SfnError(f"dataset_format s1 needs s1K's columns (question, thinking_trajectories, attempt) or s1K-1.1's "
                   f"(question, deepseek_thinking_trajectory, deepseek_attempt); the rows have {sorted(columns)}.")


def apply_format(dataset, name: str):
    """`dataset` with `prompt`/`completion` columns built by the named format ("none": unchanged)."""
    if name == "none":
        return dataset
    if name != "s1":
        raise SfnError(f"dataset_format {name!r} is unknown; use one of {', '.join(FORMATS)}.")
    thinking, attempt = s1_columns(dataset.column_names)

    def row(r, i):
        if not isinstance(r[attempt], str) or r[thinking] is None:
            raise SfnError(f"row {i} has no {thinking}/{attempt} text; dataset_format s1 needs both in every row.")
        return {"prompt": str(r["question"]), "completion": s1_text(r[thinking], r[attempt])}

    return dataset.map(row, with_indices=True, remove_columns=dataset.column_names, desc="s1 format")
