"""No silent truncation: rows longer than `max_length` are counted at start-up and handled as the recipe chooses.

TRL cuts every tokenized row to its first `max_length` tokens without a word. For reasoning traces that cut falls in
the completion: the row loses its answer and its end-of-turn token, and the model learns responses that never end.
So sfn tokenizes the rows itself, before the model loads, with TRL's own preparation (`SFTTrainer._prepare_dataset`
with no length limit: the same chat template, EOS and labels), counts what the limit would cut, and applies the
recipe's `truncation`:

- `drop`: train without the rows that do not fit (counted in the log and the manifest);
- `keep_head`: TRL's behaviour, stated: each long row keeps its first `max_length` tokens (with packing_strategy
  `bfd_split` or `wrapped`, TRL splits it across packed sequences instead; its tail then trains without its start);
- `error`: stop, with the counts.

Unset, a run drops the long rows when they are at most `DROP_AT_MOST` of the rows and stops with `error` above that.
Why 1%: the rows that do not fit are the longest traces, which are the hardest problems, so dropping them is not a
random subsample -- it changes what the recipe trains on. One row in a hundred (10 of s1K's 1,000) is a change small
enough to make by default, counted; a larger one is a different experiment, and cutting instead teaches responses
without an end, so the run asks the recipe to choose. The trainer then receives the tokenized rows; TRL keeps them
as they are (it only tokenizes rows without `input_ids`) and applies its own cut, packing and shuffling.
"""

from __future__ import annotations

import copy
import logging
import types

from .errors import SfnError

logger = logging.getLogger("sfn_train")

TRUNCATION_CHOICES = ("drop", "keep_head", "error")
DROP_AT_MOST = 0.01  # unset `truncation`: drop when at most this share of the rows is too long, else error
THINKING_ENDS = ("</think>", "<|im_start|>answer")  # what separates a reasoning trace from its answer
IGNORE = -100


def tokenize_like_trl(dataset, tokenizer, training_args, name: str):
    """The rows as TRL's SFTTrainer prepares them (input_ids, labels), uncut: its own `_prepare_dataset` with
    `max_length` unset, no packing and no shuffling. The instance attributes it reads are set as TRL sets them."""
    from trl import SFTTrainer
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    first = dataset[0]
    chat_template = None
    if training_args.assistant_only_loss and not has_generation_markers(tokenizer.chat_template):
        chat_template = get_training_chat_template(tokenizer)
    completion_only = training_args.completion_only_loss
    if completion_only is None:
        completion_only = "prompt" in first and "completion" in first
    trainer = types.SimpleNamespace(_tokenizer=tokenizer, chat_template=chat_template,
                                    completion_only_loss=completion_only)
    uncut = copy.copy(training_args)
    uncut.max_length, uncut.shuffle_dataset = None, False
    return SFTTrainer._prepare_dataset(trainer, dataset, tokenizer, uncut, False, None, name)


def measure(dataset, max_length: int, stop_ids: set[int], tokenizer) -> dict:
    """What cutting every row to its first `max_length` tokens removes: rows, completion (trained) tokens, rows whose
    answer loses text (`answers_cut`; `answers_lost` when the end of thinking itself is past the cut) and rows whose
    end-of-turn / EOS token is past the cut."""
    report = dict(rows=len(dataset), rows_too_long=0, completion_tokens=0, completion_tokens_cut=0, answers_cut=0,
                  answers_lost=0, end_of_turn_cut=0, too_long=[])
    for index, (ids, labels) in enumerate(zip(dataset["input_ids"], dataset["labels"])):
        report["completion_tokens"] += sum(label != IGNORE for label in labels)
        if len(ids) <= max_length:
            continue
        tail = ids[max_length:]
        report["too_long"].append(index)
        report["rows_too_long"] += 1
        report["completion_tokens_cut"] += sum(label != IGNORE for label in labels[max_length:])
        report["end_of_turn_cut"] += bool(stop_ids & set(tail))
        report["answers_cut"] += bool(tokenizer.decode(tail, skip_special_tokens=True).strip())
        report["answers_lost"] += any(end in tokenizer.decode(tail) for end in THINKING_ENDS)
    return report


def describe(report: dict, max_length: int, name: str) -> str:
    r = report
    share = 100 * r["rows_too_long"] / max(r["rows"], 1)
    cut = 100 * r["completion_tokens_cut"] / max(r["completion_tokens"], 1)
    return (f"{r['rows_too_long']} of {r['rows']} {name} rows ({share:.1f}%) are longer than max_length {max_length}: "
            f"cutting them would remove {r['completion_tokens_cut']:,} of {r['completion_tokens']:,} completion tokens "
            f"({cut:.1f}%), text of {r['answers_cut']} answers ({r['answers_lost']} of them whole, their end of thinking "
            f"{'/'.join(THINKING_ENDS)} past the cut) and {r['end_of_turn_cut']} end-of-turn tokens")


def apply_truncation(dataset, tokenizer, training_args, policy: str | None, name: str, stop_ids: set[int]):
    """(dataset ready for the trainer, record): tokenized uncut, measured against max_length, and handled by
    `policy` (drop, keep_head, error; None = drop up to DROP_AT_MOST of the rows, error above)."""
    max_length = training_args.max_length
    if policy == "keep_head" and training_args.truncation_mode == "keep_end":
        raise SfnError("truncation: keep_head keeps the first max_length tokens of a row, but truncation_mode is "
                       "keep_end: set truncation_mode: keep_start, or truncation: drop.")
    if max_length is None or (training_args.dataset_kwargs or {}).get("skip_prepare_dataset"):
        return dataset, {"checked": False, "why": "max_length is null" if max_length is None else
                         "skip_prepare_dataset: the rows are used as given"}
    dataset = tokenize_like_trl(dataset, tokenizer, training_args, name)
    report = measure(dataset, max_length, stop_ids, tokenizer)
    too_long = report.pop("too_long")
    record = {"checked": True, "max_length": max_length, **report, "policy": policy or "unset", "rows_dropped": 0}
    if not too_long:
        logger.info("truncation: all %d %s rows fit max_length %d (longest %d tokens).", report["rows"], name,
                    max_length, max(len(ids) for ids in dataset["input_ids"]))
        return dataset, record
    what = describe(report, max_length, name)
    if policy == "error" or (policy is None and len(too_long) > DROP_AT_MOST * len(dataset)):
        unset = f" (above {DROP_AT_MOST:.0%} of the rows with `truncation` unset)" if policy is None else ""
        raise SfnError(f"{what}{unset}: set `truncation: drop` (train on the rows that fit), `truncation: keep_head` "
                       "(cut them; the model learns responses that never end) or raise max_length.")
    if policy == "keep_head":
        splits = training_args.packing and training_args.packing_strategy in ("bfd_split", "wrapped")
        how = (f"packing_strategy {training_args.packing_strategy} splits them across packed sequences (their tails "
               "train without their starts)" if splits else f"each keeps its first {max_length} tokens (TRL's cut)")
        logger.warning("truncation: keep_head: %s; %s.", what, how)
        return dataset, record
    if len(too_long) == len(dataset):
        raise SfnError(f"{what}: dropping them leaves no {name} row; raise max_length or shorten the rows.")
    drop = set(too_long)
    dataset = dataset.select([i for i in range(len(dataset)) if i not in drop])
    logger.warning("truncation: %s: dropped them%s; %d %s rows remain.", what,
                   "" if policy else f" (at most {DROP_AT_MOST:.0%} of the rows, `truncation` unset)", len(dataset), name)
    return dataset, {**record, "rows_dropped": len(too_long)}
