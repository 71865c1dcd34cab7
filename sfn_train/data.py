"""Training data: load from a local file, a `save_to_disk` folder or the hub, check it, shape it for TRL.

Accepted rows: conversational `messages`, `prompt`/`completion` (strings or message lists), or `text`; other column
layouts are mapped with `prompt_template`/`completion_template`.

Loss goes on completions only, by default. Plain-text prompt/completion rows are wrapped as a user/assistant
conversation when the tokenizer has a chat template (`use_chat_template`), and a `messages` conversation whose only
assistant turn is the last one is split into prompt (everything before) and completion (that turn). TRL then
masks the prompt (`completion_only_loss`), which works with any chat template -- unlike `assistant_only_loss`, which
needs `{% generation %}` markers. Conversations with several assistant turns (or not ending in one) cannot be split
that way: with `assistant_only_loss: true` every row stays `messages` and TRL masks all but the assistant turns;
without it, a dataset made only of such conversations trains on whole conversations (with a warning), and a dataset
mixing them with single-turn rows is refused -- one TRL dataset has one format, and training every row on its prompt
because one row is multi-turn would silently change what the single-turn rows teach.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .errors import SfnError
from .jsonl import iter_jsonl

logger = logging.getLogger(__name__)

LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def load_rows(name: str, config: str | None = None, split: str = "train"):
    """A `datasets.Dataset` from a local .jsonl/.json/.parquet file, a save_to_disk folder, or a hub id."""
    import datasets

    path = Path(name)
    try:
        if path.is_file():
            if path.stat().st_size == 0:
                raise SfnError(f"dataset {name} is empty: it needs at least one training row.")
            builder = LOCAL_SUFFIXES.get(path.suffix)
            if builder is None:
                raise SfnError(f"dataset file {path} has suffix {path.suffix!r}: use .jsonl, .json or .parquet.")
            if path.suffix == ".jsonl":  # the file, the line and the reason (datasets says "at position 29", or
                for _ in iter_jsonl(path, what="dataset"):  # logs a pyarrow traceback for a non-object line)
                    pass
            dataset = datasets.load_dataset(builder, data_files=str(path), split="train")
        elif path.is_dir():
            if not any((path / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
                raise SfnError(f"dataset folder {path} was not written by Dataset.save_to_disk: pass a .jsonl file instead.")
            dataset = datasets.load_from_disk(str(path))
            if isinstance(dataset, datasets.DatasetDict):
                if split not in dataset:
                    raise SfnError(f"dataset folder {path} has splits {list(dataset)}, not {split!r}: set dataset_train_split.")
                dataset = dataset[split]
        elif name.startswith((".", "/", "~")) or path.suffix in LOCAL_SUFFIXES:
            raise SfnError(f"dataset {name} does not exist: fix dataset_name (a .jsonl/.json/.parquet file, a folder, or a hub id).")
        else:
            dataset = datasets.load_dataset(name, config, split=split)
    except SfnError:
        raise
    except Exception as exc:  # noqa: BLE001 - a broken file or unreachable hub: one line, with the cause
        cause = (str(exc).strip().splitlines() or [""])[0][:200]
        raise SfnError(f"dataset {name} could not be loaded ({type(exc).__name__}: {cause}); check the file or hub id.") from None
    if len(dataset) == 0:
        raise SfnError(f"dataset {name} is empty: it needs at least one training row.")
    return dataset


class _Template(dict):
    def __missing__(self, key):
        raise KeyError(key)


def _format(template: str, row: dict, index: int, what: str) -> str:
    try:
        return template.format_map(_Template(row))
    except KeyError as exc:
        raise SfnError(f"row {index} has no column {exc} used by {what}; its columns are {sorted(row)}.") from None


def _is_messages(value) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)


def prepare_dataset(dataset, *, prompt_template=None, completion_template=None, chat_template: bool = True,
                    assistant_only_loss: bool = False, dataset_format: str = "none"):
    """Check every row and return a dataset in one of TRL's formats (see module docstring)."""
    if dataset_format != "none":
        if prompt_template or completion_template:
            raise SfnError(f"dataset_format {dataset_format} builds prompt and completion itself; remove "
                           "prompt_template/completion_template (or set dataset_format: none).")
        from .formats import apply_format

        dataset = apply_format(dataset, dataset_format)
    if prompt_template or completion_template:
        if not (prompt_template and completion_template):
            raise SfnError("set both prompt_template and completion_template (or neither).")
        dataset = dataset.map(
            lambda row, i: {"prompt": _format(prompt_template, row, i, "prompt_template"),
                            "completion": _format(completion_template, row, i, "completion_template")},
            with_indices=True, remove_columns=dataset.column_names, desc="formatting rows",
        )
    columns = set(dataset.column_names)
    if "messages" in columns:
        kind = "messages"
    elif {"prompt", "completion"} <= columns:
        kind = "prompt_completion"
    elif "text" in columns:
        kind = "text"
    else:
        raise SfnError(
            f"dataset rows have columns {sorted(columns)}: need `messages`, `prompt`+`completion`, or `text` "
            "(or map columns with prompt_template/completion_template)."
        )
    _check_rows(dataset, kind)
    if kind == "prompt_completion" and chat_template and isinstance(dataset[0]["prompt"], str):
        dataset = dataset.map(
            lambda row: {"prompt": [{"role": "user", "content": row["prompt"]}],
                         "completion": [{"role": "assistant", "content": row["completion"]}]},
            desc="wrapping rows in the chat template",
        )
    if kind == "messages" and not assistant_only_loss:
        splittable = [_single_final_answer(msgs) for msgs in dataset["messages"]]
        if all(splittable):
            dataset = dataset.map(
                lambda row: {"prompt": row["messages"][:-1], "completion": row["messages"][-1:]},
                remove_columns=["messages"], desc="splitting conversations into prompt/completion",
            )
        elif any(splittable):
            single, multi = splittable.index(True), splittable.index(False)
            raise SfnError(
                f"dataset mixes single-turn conversations (row {single}) with conversations that have several "
                f"assistant turns or do not end in one (row {multi}, {splittable.count(False)} such rows): set "
                "`assistant_only_loss: true` to train on every assistant turn (needs a chat template with "
                "{% generation %} markers), or train on the two kinds separately."
            )
        else:
            logger.warning(
                "dataset has multi-turn conversations: the loss covers whole conversations; set "
                "`assistant_only_loss: true` to train on assistant turns only (needs {%% generation %%} markers)."
            )
    return dataset


def _single_final_answer(messages: list[dict]) -> bool:
    """One assistant turn, and it is the last message: the conversation splits into prompt and completion."""
    return [m["role"] for m in messages].count("assistant") == 1 and messages[-1]["role"] == "assistant"


def _check_rows(dataset, kind: str) -> None:
    fields = {"messages": ["messages"], "prompt_completion": ["prompt", "completion"], "text": ["text"]}[kind]
    for field in fields:
        for index, value in enumerate(dataset[field]):
            empty = value is None or (isinstance(value, (str, list)) and len(value) == 0)
            if empty:
                raise SfnError(f"row {index} has an empty `{field}`: fix or drop that row.")
            if kind == "messages" and not _is_messages(value):
                raise SfnError(f"row {index} `messages` is not a list of {{role, content}} dicts: fix that row.")


def row_hash_fraction(row: dict) -> float:
    """A number in [0, 1) fixed by the row's content alone (sha256 of its canonical JSON)."""
    import hashlib
    import json

    digest = hashlib.sha256(json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_validation(dataset, fraction: float):
    """(train, validation): rows whose content hash falls below `fraction` are held out.

    Why a content hash rather than a seeded shuffle: the split is then the same whatever the row order, the seed or
    the rows added later, so every run of a sweep (and a later run at the chosen rate) validates on the same rows;
    and identical rows always land on the same side, so a duplicate can never put a validation row into training.
    """
    held = [row_hash_fraction(row) < fraction for row in dataset]
    n_val = sum(held)
    if n_val == 0 or n_val == len(held):
        raise SfnError(f"validation_fraction {fraction} leaves {'no validation' if n_val == 0 else 'no training'} rows "
                       f"out of {len(held)}: choose a fraction that splits the data.")
    train = dataset.select([i for i, h in enumerate(held) if not h])
    validation = dataset.select([i for i, h in enumerate(held) if h])
    return train, validation


def load_validation_rows(name: str, config: str | None, split: str):
    """TRL's convention without validation_fraction: the dataset's own `dataset_test_split` split."""
    path = Path(name)
    if path.is_file():
        raise SfnError(f"eval_strategy asks for a validation split, but dataset {name} is a single file with no "
                       f"{split!r} split: set validation_fraction (e.g. 0.1) to hold out rows of it.")
    return load_rows(name, config, split)
