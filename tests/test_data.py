"""Which tokens train: labels after TRL's collator, as the trainer builds them, for every row format we accept.

The expected mask is computed here from the messages and the tiny tokenizer's ChatML template (sfn_train/tiny.py:
one token per byte, so a token trains exactly when its characters lie in a trained span of the rendered text), not
from TRL's own masks.
"""

from __future__ import annotations

import json
import logging

import pytest

from helpers import one_line_error, train_recipe
from sfn_train.cli import main
from sfn_train.errors import SfnError

IGNORE = -100


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


SINGLE_TURN = [
    {"messages": [user("Start at 1. Add 2."), assistant("1+2=3.")]},
    {"messages": [system("Be brief."), user("Start at 4. Add 4."), assistant("4+4=8. Done.")]},
]
MULTI_TURN = [
    {"messages": [user("Start at 2."), assistant("Now 2."), user("Add 5."), assistant("2+5=7.")]},
    {"messages": [system("Count."), user("1?"), assistant("one"), user("2?"), assistant("two"), user("3?"),
                  assistant("three")]},
]
PROMPT_COMPLETION = [
    {"prompt": "Start at 3. Add 3.", "completion": "3+3=6."},
    {"prompt": "Start at 10. Add 1.", "completion": "10+1=11. That is all."},
]


def expected_labels(messages, trained_turns, tokenizer, *, turn_end_newline: bool) -> tuple[str, list[bool]]:
    """(rendered text, per token: does it train). `trained_turns`: indices of the messages whose content trains,
    with the end-of-turn token (a model that never learns to stop is not trained) and, for prompt/completion rows,
    the newline the template puts after the completion's end-of-turn token."""
    text, trained = "", []
    for i, message in enumerate(messages):
        header = f"<|im_start|>{message['role']}\n"
        body = message["content"] + "<|im_end|>"
        text += header + body + "\n"
        on = i in trained_turns
        trained += [False] * len(header) + [on] * len(body) + [on and turn_end_newline]
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return text, [trained[start] for start, _ in encoding["offset_mapping"]]


def collated(tmp_path, base, rows, **keys):
    """(batch, tokenizer): the rows through sfn's dataset preparation, SFTTrainer and its train dataloader."""
    from trl import SFTTrainer

    from sfn_train.config import parse_recipe
    from sfn_train.train import load_model, load_train_dataset, load_train_tokenizer

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    script_args, training_args, model_args, sfn_args = parse_recipe(
        ["--config", str(train_recipe(tmp_path, base, data, per_device_train_batch_size=len(rows), **keys))])
    tokenizer = load_train_tokenizer(model_args)
    dataset = load_train_dataset(script_args, training_args, sfn_args, tokenizer)
    trainer = SFTTrainer(model=load_model(model_args), args=training_args, train_dataset=dataset,
                         processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    assert len(batch["input_ids"]) == len(rows)
    return batch, tokenizer


def check_labels(batch, tokenizer, expectations: dict[str, list[bool]]) -> None:
    """Every row of the batch: labels are the input ids where a token trains and -100 everywhere else."""
    seen = set()
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        n = int(mask.sum())
        ids, labels = ids[:n].tolist(), labels.tolist()
        text = tokenizer.decode(ids)
        assert text in expectations, f"unexpected row {text!r}"
        want = expectations[text]
        assert len(want) == n
        assert [label != IGNORE for label in labels[:n]] == want, text
        assert all(label == token for label, token, on in zip(labels, ids, want) if on)
        assert all(label == IGNORE for label in labels[n:])  # padding never trains
        seen.add(text)
    assert seen == set(expectations)


def test_prompt_completion_rows_train_on_the_completion_only(tmp_path, qwen2_base):
    batch, tok = collated(tmp_path, qwen2_base, PROMPT_COMPLETION)
    expectations = dict(expected_labels([user(r["prompt"]), assistant(r["completion"])], {1}, tok,
                                        turn_end_newline=True) for r in PROMPT_COMPLETION)
    check_labels(batch, tok, expectations)


def test_single_turn_messages_train_on_the_answer_only(tmp_path, qwen2_base):
    batch, tok = collated(tmp_path, qwen2_base, SINGLE_TURN)
    expectations = dict(expected_labels(r["messages"], {len(r["messages"]) - 1}, tok, turn_end_newline=True)
                        for r in SINGLE_TURN)
    check_labels(batch, tok, expectations)


def assistant_turns(messages) -> set[int]:
    return {i for i, m in enumerate(messages) if m["role"] == "assistant"}


def test_multi_turn_messages_with_assistant_only_loss_train_every_assistant_turn(tmp_path, qwen2_base):
    batch, tok = collated(tmp_path, qwen2_base, MULTI_TURN, assistant_only_loss=True)
    expectations = dict(expected_labels(r["messages"], assistant_turns(r["messages"]), tok, turn_end_newline=False)
                        for r in MULTI_TURN)
    check_labels(batch, tok, expectations)


def test_mixed_dataset_with_assistant_only_loss_masks_each_row(tmp_path, qwen2_base):
    rows = SINGLE_TURN + MULTI_TURN
    batch, tok = collated(tmp_path, qwen2_base, rows, assistant_only_loss=True)
    expectations = dict(expected_labels(r["messages"], assistant_turns(r["messages"]), tok, turn_end_newline=False)
                        for r in rows)
    check_labels(batch, tok, expectations)


def test_mixed_dataset_without_assistant_only_loss_is_refused(tmp_path, capsys, qwen2_base):
    """Training every row on its prompt because one row is multi-turn would silently change what the single-turn
    rows teach: one line, before the model loads."""
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in SINGLE_TURN + MULTI_TURN))
    assert main(["train", "--config", str(train_recipe(tmp_path, qwen2_base, data))]) == 2
    line = one_line_error(capsys)
    assert "mixes single-turn conversations (row 0) with conversations that have several assistant turns" in line
    assert "(row 2, 2 such rows)" in line and "assistant_only_loss: true" in line
    assert not (tmp_path / "out").exists()


def test_multi_turn_only_without_assistant_only_loss_trains_whole_conversations(tmp_path, qwen2_base, caplog):
    caplog.set_level(logging.WARNING, logger="sfn_train")
    batch, tok = collated(tmp_path, qwen2_base, MULTI_TURN)
    assert "the loss covers whole conversations" in caplog.text
    expectations = {}
    for r in MULTI_TURN:
        text, _ = expected_labels(r["messages"], set(), tok, turn_end_newline=False)
        expectations[text] = [True] * len(_)
    check_labels(batch, tok, expectations)


def test_prepare_dataset_decides_on_all_rows():
    import datasets

    from sfn_train.data import prepare_dataset

    split = prepare_dataset(datasets.Dataset.from_list(SINGLE_TURN))
    assert split.column_names == ["prompt", "completion"]
    assert split[1]["prompt"] == SINGLE_TURN[1]["messages"][:-1]
    assert prepare_dataset(datasets.Dataset.from_list(MULTI_TURN)).column_names == ["messages"]
    assert prepare_dataset(datasets.Dataset.from_list(SINGLE_TURN + MULTI_TURN),
                           assistant_only_loss=True).column_names == ["messages"]
    ends_with_user = [{"messages": [user("a"), assistant("b"), user("c")]}]
    with pytest.raises(SfnError, match=r"row 2, 1 such rows"):
        prepare_dataset(datasets.Dataset.from_list(SINGLE_TURN + ends_with_user))


@pytest.fixture(scope="module")
def unmarked_template_base(tmp_path_factory, qwen2_base):
    """The tiny checkpoint with a ChatML template that has no {% generation %} markers (and that TRL cannot patch)."""
    import shutil

    from sfn_train.tiny import CHAT_TEMPLATE

    folder = tmp_path_factory.mktemp("unmarked") / "qwen2"
    shutil.copytree(qwen2_base, folder)
    unmarked = CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    (folder / "chat_template.jinja").write_text(unmarked)
    return folder


def test_assistant_only_loss_without_generation_markers_is_one_line(tmp_path, capsys, unmarked_template_base):
    from transformers import AutoTokenizer

    assert "{% generation %}" not in AutoTokenizer.from_pretrained(unmarked_template_base).chat_template
    data = tmp_path / "multi.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in MULTI_TURN))
    recipe = train_recipe(tmp_path, unmarked_template_base, data, assistant_only_loss=True)
    assert main(["train", "--config", str(recipe)]) == 2
    assert "assistant_only_loss needs a chat template with {% generation %}" in one_line_error(capsys)
    assert not (tmp_path / "out").exists()


S1K_ROWS = [  # s1K's columns: the trace is a list of strings, the attempt lacks "Answer:"
    {"question": "Start at 1. Add 2.", "thinking_trajectories": ["1 and 2.", " So 3. "], "attempt": "3", "cot": None},
    {"question": "Start at 4.", "thinking_trajectories": ["Just 4."], "attempt": "The value.\nAnswer: 4", "cot": None},
]
S1K_11_ROWS = [  # s1K-1.1's: one trace string, from DeepSeek-R1
    {"question": "Start at 2. Add 5.", "deepseek_thinking_trajectory": "\n2+5 is 7.\n", "deepseek_attempt": "7",
     "gemini_attempt": "wrong"},
]


@pytest.mark.parametrize("rows,completions", [
    (S1K_ROWS, ["<|im_start|>think\n1 and 2.\n So 3.\n<|im_start|>answer\nAnswer: 3",
                "<|im_start|>think\nJust 4.\n<|im_start|>answer\nThe value.\nAnswer: 4"]),
    (S1K_11_ROWS, ["<|im_start|>think\n2+5 is 7.\n<|im_start|>answer\nAnswer: 7"]),
])
def test_dataset_format_s1_trains_s1s_text(tmp_path, qwen2_base, rows, completions):
    """s1's data/tokenization.py: bare question as the user turn; the assistant turn <|im_start|>think, the trace,
    <|im_start|>answer, "Answer: " + attempt (unless it says "Answer:" already); loss on the assistant turn."""
    batch, tok = collated(tmp_path, qwen2_base, rows, dataset_format="s1")
    expectations = dict(expected_labels([user(r["question"]), assistant(c)], {1}, tok, turn_end_newline=True)
                        for r, c in zip(rows, completions))
    check_labels(batch, tok, expectations)


def test_dataset_format_s1_names_the_columns_it_needs(tmp_path, qwen2_base, capsys):
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"question": "q", "solution": "s"}) + "\n")
    assert main(["train", "--config", str(train_recipe(tmp_path, qwen2_base, data, dataset_format="s1"))]) == 2
    assert "dataset_format s1 needs s1K's columns (question, thinking_trajectories, attempt)" in one_line_error(capsys)


@pytest.mark.parametrize("bad_line, reason", [
    ('{"prompt": "2+2=", "completion": }', ":3 is not valid JSON (Expecting value at column 34)"),
    ('["2+2=", "4"]', ":3 is a JSON list, not an object"),
])
def test_malformed_jsonl_names_the_file_and_line(tmp_path, capsys, qwen2_base, bad_line, reason):
    data = tmp_path / "rows.jsonl"
    good = json.dumps({"prompt": "1+1=", "completion": "2"})
    data.write_text(f"{good}\n\n{bad_line}\n{good}\n")
    assert main(["train", "--config", str(train_recipe(tmp_path, qwen2_base, data))]) == 2
    assert f"dataset {data}{reason}" in one_line_error(capsys)


def test_validation_rows_are_held_out_of_the_training_rows(tmp_path, qwen2_base, sum_data):
    """validation_fraction: the rows the trainer gets and the rows it validates on are disjoint and together the
    whole file (the slow sweep test sees this only through trained runs)."""
    from sfn_train.config import parse_recipe
    from sfn_train.train import load_datasets, load_train_tokenizer

    script_args, training_args, model_args, sfn_args = parse_recipe(
        ["--config", str(train_recipe(tmp_path, qwen2_base, sum_data, validation_fraction=0.25))])
    train, validation, counts = load_datasets(script_args, training_args, sfn_args, load_train_tokenizer(model_args))
    prompts = [json.loads(line)["prompt"] for line in sum_data.read_text().splitlines()]

    def texts(dataset) -> list[str]:  # the rows' prompts, wrapped as one user turn by the chat template
        return [p if isinstance(p, str) else p[-1]["content"] for p in dataset["prompt"]]

    assert len(set(prompts)) == len(prompts) == 32 and validation is not None and len(validation) > 0
    assert not set(texts(train)) & set(texts(validation))
    assert sorted([*texts(train), *texts(validation)]) == sorted(prompts)
    assert (counts["train_rows"], counts["validation_rows"]) == (len(train), len(validation))
