"""Stop tokens that match the template: a base whose EOS is <|endoftext|> while its ChatML template ends turns with
<|im_end|> (Qwen2.5-Math's case) gives a fine-tune that stops at <|im_end|>."""

from __future__ import annotations

import json
import logging

import pytest

from helpers import train_recipe


@pytest.fixture(scope="module")
def endoftext_base(tmp_path_factory):
    """A tiny qwen2 whose tokenizer and generation config stop on <|endoftext|> only."""
    from sfn_train.tiny import build_tokenizer, tiny_model

    out = tmp_path_factory.mktemp("ckpt") / "endoftext"
    tokenizer = build_tokenizer()
    tokenizer.eos_token = "<|endoftext|>"
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    model = tiny_model("qwen2", seed=0, vocab_size=len(tokenizer), pad_token_id=eos, eos_token_id=eos)
    model.generation_config.eos_token_id = eos
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_template_end_of_turn_is_read_from_the_template(endoftext_base):
    from transformers import AutoTokenizer

    from sfn_train.stop_tokens import template_end_of_turn

    tokenizer = AutoTokenizer.from_pretrained(endoftext_base)
    assert template_end_of_turn(tokenizer) == tokenizer.convert_tokens_to_ids("<|im_end|>")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"  # no end-of-turn token
    assert template_end_of_turn(tokenizer) is None


def test_a_fine_tune_stops_at_the_templates_end_of_turn(tmp_path, endoftext_base, caplog):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sfn_train.cli import main
    from sfn_train.evaluation.tokens import eos_token_ids

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"prompt": "hi", "completion": "ab"}) + "\n" for _ in range(8)))
    caplog.set_level(logging.INFO, logger="sfn_train")
    recipe = train_recipe(tmp_path, endoftext_base, data, trainable_modules="all", max_steps=12, learning_rate=1e-2)
    assert main(["train", "--config", str(recipe)]) == 0
    out = tmp_path / "out"
    tokenizer = AutoTokenizer.from_pretrained(out)
    im_end, endoftext = (tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>"))
    assert "ends a turn with <|im_end|>" in caplog.text and "added it" in caplog.text
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [endoftext, im_end]
    assert im_end in eos_token_ids(str(out), tokenizer)  # what `sfn eval` stops on
    record = json.loads((out / "sfn_manifest.json").read_text())["metrics"]["stop_tokens"]
    assert record["added_to_generation_config"] and record["end_of_turn_id"] == im_end

    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    for folder, stops in ((out, True), (endoftext_base, False)):  # the base's config: generation runs on
        model = AutoModelForCausalLM.from_pretrained(out)
        model.generation_config = model.generation_config.from_pretrained(folder)
        new = model.generate(**prompt, max_new_tokens=12, do_sample=False)[0, prompt["input_ids"].shape[1]:].tolist()
        assert tokenizer.decode(new[:3]) == "ab<|im_end|>"  # the fine-tune learned its turn
        assert (len(new) == 3) == stops, tokenizer.decode(new)
