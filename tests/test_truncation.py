"""No silent truncation: rows longer than max_length are counted at start-up and dropped, kept cut or refused.

The tiny tokenizer has one token per byte, so every count below is computed from the rows' text, independently of
sfn_train/truncation.py: a row's length is its chat-rendered text in tokens, its completion what follows the prompt.
"""

from __future__ import annotations

import json
import logging

import pytest

from helpers import one_line_error, train_recipe
from sfn_train.errors import SfnError

MAX = 96


def row(i: int, think: int, answer: int = 6) -> dict:
    return {"prompt": f"q{i}", "completion": f"<think>\n{'x' * think}\n</think>\n\n{'y' * answer}"}


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def lengths(tokenizer, r: dict) -> tuple[int, int]:
    """(tokens of the whole row, tokens of its prompt) as the chat template renders them."""
    def n(text):
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    user = [{"role": "user", "content": r["prompt"]}]
    whole = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": r["completion"]}], tokenize=False)
    return n(whole), n(tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True))


def prepared(tmp_path, base, rows, **keys):
    """(train dataset, counts, tokenizer, training_args) from sfn's data loading, as `sfn train` does it."""
    from sfn_train.config import parse_recipe
    from sfn_train.train import load_datasets, load_train_tokenizer

    tmp_path.mkdir(parents=True, exist_ok=True)
    data = write_rows(tmp_path / "rows.jsonl", rows)
    script_args, training_args, model_args, sfn_args = parse_recipe(
        ["--config", str(train_recipe(tmp_path, base, data, max_length=MAX, **keys))])
    tokenizer = load_train_tokenizer(model_args)
    dataset, _, counts = load_datasets(script_args, training_args, sfn_args, tokenizer)
    return dataset, counts, tokenizer, training_args


# Rows 0-4 fit; row 5's cut falls in its answer; row 6's in its thinking (its `</think>` and answer are both lost).
MIXED = [row(i, 20 + 5 * i) for i in range(5)] + [row(5, 62), row(6, 90)]


def expected(tokenizer, rows) -> dict:
    total = cut = over = 0
    for r in rows:
        whole, prompt = lengths(tokenizer, r)
        total += whole - prompt
        if whole > MAX:
            over += 1
            cut += whole - MAX
    return {"rows_too_long": over, "completion_tokens": total, "completion_tokens_cut": cut}


def test_long_rows_are_counted_and_dropped(tmp_path, qwen2_base, caplog):
    caplog.set_level(logging.INFO, logger="sfn_train")
    dataset, counts, tokenizer, _ = prepared(tmp_path, qwen2_base, MIXED, truncation="drop")
    record = counts["truncation"]["train"]
    want = expected(tokenizer, MIXED)
    assert want["rows_too_long"] == 2 and want["completion_tokens_cut"] > 0  # the fixture reaches the case
    assert {k: record[k] for k in want} == want
    assert (record["answers_cut"], record["answers_lost"], record["end_of_turn_cut"]) == (2, 1, 2)
    assert (record["rows_dropped"], counts["train_rows"], len(dataset)) == (2, 5, 5)
    assert sorted(len(ids) for ids in dataset["input_ids"]) == sorted(lengths(tokenizer, r)[0] for r in MIXED[:5])
    assert "2 of 7 training rows (28.6%) are longer than max_length 96" in caplog.text and "dropped them" in caplog.text


def test_unset_truncation_refuses_more_than_one_percent_and_drops_up_to_it(tmp_path, qwen2_base):
    short = [row(i, 10) for i in range(98)]
    with pytest.raises(SfnError, match=r"2 of 100 training rows \(2.0%\).*above 1% of the rows.*truncation: drop"):
        prepared(tmp_path / "a", qwen2_base, short + [row(98, 90), row(99, 90)])
    dataset, counts, _, _ = prepared(tmp_path / "b", qwen2_base, short + [row(98, 10), row(99, 90)])
    assert (counts["truncation"]["train"]["policy"], counts["truncation"]["train"]["rows_dropped"]) == ("unset", 1)
    assert len(dataset) == 99


def test_error_and_keep_head_and_rows_that_all_fit(tmp_path, qwen2_base, caplog):
    with pytest.raises(SfnError, match="2 of 7 training rows"):
        prepared(tmp_path / "e", qwen2_base, MIXED, truncation="error")
    caplog.set_level(logging.INFO, logger="sfn_train")
    dataset, counts, _, _ = prepared(tmp_path / "k", qwen2_base, MIXED, truncation="keep_head")
    assert len(dataset) == 7 and counts["truncation"]["train"]["rows_dropped"] == 0
    assert "keep_head" in caplog.text and "each keeps its first 96 tokens" in caplog.text
    dataset, counts, _, _ = prepared(tmp_path / "f", qwen2_base, MIXED[:5], truncation="error")
    assert len(dataset) == 5 and counts["truncation"]["train"]["rows_too_long"] == 0
    with pytest.raises(SfnError, match="leaves no training row"):
        prepared(tmp_path / "all", qwen2_base, MIXED[5:], truncation="drop")
    with pytest.raises(SfnError, match="truncation_mode is keep_end"):
        prepared(tmp_path / "end", qwen2_base, MIXED, truncation="keep_head", truncation_mode="keep_end")


@pytest.mark.parametrize("packing, policy", [(False, "keep_head"), ("bfd", "drop"), ("wrapped", "keep_head")])
def test_the_trainer_trains_the_rows_the_policy_kept(tmp_path, qwen2_base, packing, policy, caplog):
    """What reaches the trainer: TRL keeps the prepared rows, cuts (keep_head) or packs them, and nothing else."""
    from sfn_train.train import build_trainer, load_model

    keys = {"packing": True, "packing_strategy": packing} if packing else {}
    caplog.set_level(logging.INFO, logger="sfn_train")
    dataset, _, tokenizer, training_args = prepared(tmp_path, qwen2_base, MIXED, truncation=policy, **keys)
    trainer = build_trainer(load_model(type("M", (), {"model_name_or_path": str(qwen2_base), "model_revision": None,
                                                      "dtype": None, "attn_implementation": None})()),
                            training_args, dataset, tokenizer)
    trained = trainer.train_dataset["input_ids"]
    whole = [lengths(tokenizer, r)[0] for r in MIXED]
    if policy == "drop":
        assert sum(map(len, trained)) == sum(n for n in whole if n <= MAX)
    elif packing == "wrapped":  # split across packed sequences: every token is kept
        assert sum(map(len, trained)) == sum(whole) and "splits them across packed sequences" in caplog.text
    else:
        assert sorted(map(len, trained)) == sorted(min(n, MAX) for n in whole)
    assert max(map(len, trained)) <= MAX


def test_sfn_train_refuses_before_writing_and_records_what_it_dropped(tmp_path, qwen2_base, capsys):
    from sfn_train.cli import main

    data = write_rows(tmp_path / "rows.jsonl", MIXED)
    recipe = train_recipe(tmp_path, qwen2_base, data, max_length=MAX, max_steps=1)
    assert main(["train", "--config", str(recipe)]) != 0
    assert "truncation: drop" in one_line_error(capsys)
    assert not (tmp_path / "out").exists()  # refused before anything was written: the same command can run again
    assert main(["train", "--config", str(recipe), "--truncation", "drop"]) == 0
    metrics = json.loads((tmp_path / "out" / "sfn_manifest.json").read_text())["metrics"]
    assert (metrics["train_rows"], metrics["truncation"]["train"]["rows_dropped"]) == (5, 2)
