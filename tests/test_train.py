"""The Freeze trainer: exactly the selected tensors change; everything else is bitwise the base."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from helpers import (
    assert_resumes_from_step_2,
    changed_tensors,
    load_tensors,
    one_line_error,
    run_with_callbacks,
    step_watcher,
    train_recipe,
)
from sfn_train.cli import main
from sfn_train.manifest import manifest_problems
from sfn_train.roles import select_names

O_PROJ = {f"model.layers.{i}.self_attn.o_proj.weight" for i in range(4)}


def train(tmp_path, base, data, *flags, **keys):
    recipe = train_recipe(tmp_path, base, data, **keys)
    rc = main(["train", "--config", str(recipe), *flags])
    assert rc == 0
    return tmp_path / "out"


def test_default_trains_only_o_proj(tmp_path, qwen2_base, sum_data, caplog):
    caplog.set_level(logging.INFO, logger="sfn_train")
    out = train(tmp_path, qwen2_base, sum_data, memory_plan=True)
    changed, unchanged = changed_tensors(qwen2_base, out)
    assert changed == O_PROJ
    assert "model.layers.0.self_attn.q_proj.weight" in unchanged and "lm_head.weight" in unchanged
    total = sum(t.numel() for t in load_tensors(qwen2_base).values())
    assert f"trainable: 16,384 of {total:,} params ({100 * 16384 / total:.2f}%) in 4 tensors" in caplog.text

    manifest = json.loads((out / "sfn_manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert set(manifest["selection"]["trainable_tensors"]) == O_PROJ
    assert manifest["selection"]["trainable_params"] == 16384
    assert manifest["base"]["fingerprint"].startswith("sha256:")
    assert manifest["recipe"]["sfn"]["trainable_modules"] == ["o_proj"]
    assert manifest["versions"]["trl"] and manifest["versions"]["torch"]
    assert "git" in manifest
    assert manifest_problems(manifest) == [] and manifest["kind"] == "train"
    assert not (out / "training_args.bin").exists()  # no pickles in the output
    memory = manifest["metrics"]["memory"]  # the start-up plan beside what the run measured (sfn_train/memory)
    assert 0 < memory["predicted_peak_bytes"] < memory["measured_peak_rss"] and memory["device"] == "cpu"
    assert "memory plan: predicted peak" in caplog.text


def test_plugin_holds_exactly_the_trained_tensors_and_rebuilds_the_checkpoint(tmp_path, qwen2_base, sum_data):
    from safetensors.torch import load_file

    from sfn_train.checkpoint import fingerprint
    from sfn_train.plugin import read_plugin_metadata

    watcher = step_watcher(O_PROJ)
    out = run_with_callbacks(train_recipe(tmp_path, qwen2_base, sum_data), watcher)
    plugin = load_file(out / "sfn_plugin.safetensors")
    assert set(plugin) == O_PROJ == set(watcher.final)
    base, tuned = load_tensors(qwen2_base), load_tensors(out)
    for name in O_PROJ:  # against the live model at the end of training, not the checkpoint the plugin is cut from
        assert torch.equal(plugin[name], watcher.final[name]) and torch.equal(tuned[name], watcher.final[name])
        assert not torch.equal(plugin[name], base[name])
    meta = read_plugin_metadata(out / "sfn_plugin.safetensors")
    assert meta["base_fingerprint"] == fingerprint(qwen2_base)
    rebuilt = {**base, **plugin}
    assert all(torch.equal(rebuilt[n], tuned[n]) for n in tuned)
    assert json.loads((out / "sfn_manifest.json").read_text())["plugin"] == {"file": "sfn_plugin.safetensors"}


def test_trainable_layers_flag_overrides_the_recipe(tmp_path, qwen2_base, sum_data):
    out = train(tmp_path, qwen2_base, sum_data, "--trainable_layers", "1-2", trainable_layers="all")
    changed, _ = changed_tensors(qwen2_base, out)
    assert changed == {"model.layers.1.self_attn.o_proj.weight", "model.layers.2.self_attn.o_proj.weight"}


def test_several_roles_and_layer_list(tmp_path, qwen2_base, sum_data):
    out = train(tmp_path, qwen2_base, sum_data, trainable_modules=["q_proj", "down_proj"], trainable_layers=[0, 3])
    changed, _ = changed_tensors(qwen2_base, out)
    names = list(load_tensors(qwen2_base))
    assert changed == set(select_names(names, ["q_proj", "down_proj"], [0, 3]))
    assert "model.layers.0.self_attn.q_proj.bias" in changed


def test_all_is_a_full_fine_tune_without_a_plugin_copy(tmp_path, qwen2_base, sum_data, caplog, capsys):
    """A full fine-tune leaves one checkpoint, as in TRL: its plugin would be a second full copy of it."""
    caplog.set_level(logging.INFO, logger="sfn_train")
    out = train(tmp_path, qwen2_base, sum_data, trainable_modules="all")
    changed, unchanged = changed_tensors(qwen2_base, out)
    assert unchanged == set() and len(changed) == 51
    assert not (out / "sfn_plugin.safetensors").exists()
    plugin = json.loads((out / "sfn_manifest.json").read_text())["plugin"]
    assert plugin["file"] is None and "trains every parameter" in plugin["skipped"]
    assert "plugin: not written: the selection trains every parameter" in caplog.text
    # the plugin commands say why there is no plugin instead of "file not found"
    capsys.readouterr()
    assert main(["plugin", "apply", str(qwen2_base), str(out / "sfn_plugin.safetensors"),
                 "--out", str(tmp_path / "applied")]) == 2
    assert f"the run in {out} wrote none because the selection trains every parameter" in one_line_error(capsys)


def test_paper_f1_on_tied_llama(tmp_path, llama_tied_base, sum_data):
    """F1 = embed + lm_head + norms; on a tied model lm_head *is* the embedding matrix."""
    out = train(tmp_path, llama_tied_base, sum_data, trainable_modules=["embed", "lm_head", "norm"])
    changed, _ = changed_tensors(llama_tied_base, out)
    norms = {n for n in load_tensors(llama_tied_base) if "norm" in n}
    assert changed == {"model.embed_tokens.weight"} | norms


def frozen_tiny_model():
    from sfn_train.roles import apply_freeze, select_parameters
    from sfn_train.tiny import tiny_model

    model = tiny_model("qwen2")
    apply_freeze(model, select_parameters(model, ["o_proj"]))
    return model


def embeddings_pass_gradients(model) -> bool:
    """Whether the (frozen) input embeddings' output requires grad: what reentrant checkpointing needs."""
    return model.get_input_embeddings()(torch.tensor([[5, 6, 7]])).requires_grad


@pytest.mark.parametrize("given, reentrant", [(None, False), ({}, False), ({"use_reentrant": False}, False),
                                              ({"use_reentrant": True}, True)])
def test_configure_activation_checkpointing(tmp_path, qwen2_base, sum_data, given, reentrant):
    """Non-reentrant unless the recipe insists; reentrant gets input gradients on the frozen embeddings."""
    from sfn_train.config import parse_recipe
    from sfn_train.train import configure_activation_checkpointing

    keys = {"gradient_checkpointing": True} | ({} if given is None else {"gradient_checkpointing_kwargs": given})
    training_args = parse_recipe(["--config", str(train_recipe(tmp_path, qwen2_base, sum_data, **keys))])[1]
    model = frozen_tiny_model()
    assert not embeddings_pass_gradients(model)
    configure_activation_checkpointing(model, training_args)
    assert training_args.gradient_checkpointing_kwargs == {"use_reentrant": reentrant}
    assert training_args.activation_checkpointing_kwargs == {"use_reentrant": reentrant}
    assert embeddings_pass_gradients(model) is reentrant


def test_transformers_checkpointing_default_is_non_reentrant_with_input_gradients():
    """What the Trainer does on its own (transformers 5.24): non-reentrant, and input gradients enabled anyway.

    This is why a training run cannot tell whether configure_activation_checkpointing ran. If this test fails,
    transformers changed its default: then configure_activation_checkpointing is what keeps o_proj training under
    activation checkpointing, and the end-to-end tests below must be rerun with it stubbed out.
    """
    model = frozen_tiny_model()
    model.activation_checkpointing_enable()  # as Trainer.__init__ calls it for a recipe without kwargs
    assert model.model.layers[0]._gradient_checkpointing_func.keywords == {"use_reentrant": False}
    assert embeddings_pass_gradients(model)


def test_activation_checkpointing_with_frozen_inputs_still_trains(tmp_path, qwen2_base, sum_data):
    out = train(tmp_path, qwen2_base, sum_data, gradient_checkpointing=True)
    assert changed_tensors(qwen2_base, out)[0] == O_PROJ


def test_reentrant_checkpointing_trains_where_transformers_leaves_input_gradients_off(tmp_path, qwen2_base, sum_data,
                                                                                      monkeypatch):
    """Reentrant checkpointing with frozen embeddings yields no gradients (transformers #21381). transformers 5.24
    enables input gradients itself; older releases (and any model it does not do this for) did not: with that
    behaviour, only configure_activation_checkpointing makes o_proj train."""
    from transformers import PreTrainedModel

    inside = []
    enable_checkpointing = PreTrainedModel._activation_checkpointing_enable
    enable_input_grads = PreTrainedModel.enable_input_require_grads

    def checkpointing_without_input_grads(self, *args, **kwargs):
        inside.append(True)
        try:
            return enable_checkpointing(self, *args, **kwargs)
        finally:
            inside.pop()

    def input_grads_unless_from_checkpointing(self):
        if not inside:
            enable_input_grads(self)

    monkeypatch.setattr(PreTrainedModel, "_activation_checkpointing_enable", checkpointing_without_input_grads)
    monkeypatch.setattr(PreTrainedModel, "enable_input_require_grads", input_grads_unless_from_checkpointing)
    out = train(tmp_path, qwen2_base, sum_data, gradient_checkpointing=True,
                gradient_checkpointing_kwargs={"use_reentrant": True})
    assert changed_tensors(qwen2_base, out)[0] == O_PROJ


def test_messages_rows_train_on_the_assistant_turn(tmp_path, qwen2_base):
    from sfn_train.lab.problems import generate, write_jsonl

    rows = [{"messages": [{"role": "user", "content": p.text}, {"role": "assistant", "content": p.trace}]}
            for p in generate(16, (2,), seed=3)]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    out = train(tmp_path, qwen2_base, data)
    assert changed_tensors(qwen2_base, out)[0] == O_PROJ


def test_prepared_messages_mask_the_prompt(qwen2_base):
    from transformers import AutoTokenizer

    from sfn_train.data import prepare_dataset
    import datasets

    rows = datasets.Dataset.from_list([{"prompt": "Start at 1. Add 2.", "completion": "1+2=3."}])
    prepared = prepare_dataset(rows, chat_template=True)
    assert prepared[0]["prompt"] == [{"role": "user", "content": "Start at 1. Add 2."}]
    assert prepared[0]["completion"] == [{"role": "assistant", "content": "1+2=3."}]
    assert AutoTokenizer.from_pretrained(qwen2_base).chat_template


def test_flash_attention_falls_back_to_sdpa_without_a_gpu(tmp_path, qwen2_base, sum_data, caplog):
    caplog.set_level(logging.WARNING, logger="sfn_train")
    out = train(tmp_path, qwen2_base, sum_data, attn_implementation="flash_attention_2", padding_free=True,
                max_length=None)
    assert "flash_attention_2 needs a CUDA GPU and none is visible; falling back to sdpa" in caplog.text
    manifest = json.loads((out / "sfn_manifest.json").read_text())
    # padding-free batches stay on: sdpa separates the rows too (tests/test_attention.py)
    assert manifest["attention"]["used"] == "sdpa" and manifest["attention"]["padding_free"] is True
    assert changed_tensors(qwen2_base, out)[0] == O_PROJ


# (attention requested, packing_strategy, packing after resolve_attention). BFD packing makes padding-free batches;
# resolve_attention keeps them where they are verified correct (FlashAttention: tests/test_attention.py; sdpa, eager)
# and switches packing off elsewhere, saying so. Where that decision changes, change this table.
PACKING_GUARD = [
    ("sdpa", "bfd", True),
    ("eager", "bfd", True),
    (None, "bfd", True),  # transformers' default, sdpa
    ("sdpa", "bfd_split", True),
    ("flex_attention", "bfd", False),
    ("flex_attention", "bfd_split", False),
    ("flex_attention", "wrapped", True),  # wrapped packing is not padding-free: no kernel requirement
]


@pytest.mark.parametrize("attention, strategy, packing", PACKING_GUARD)
def test_packing_guard_does_what_resolve_attention_decides_and_logs_it(tmp_path, qwen2_base, sum_data, caplog,
                                                                       attention, strategy, packing):
    from sfn_train.config import parse_recipe
    from sfn_train.startup import resolve_attention

    keys = {"packing": True, "packing_strategy": strategy} | ({"attn_implementation": attention} if attention else {})
    _, training_args, model_args, _ = parse_recipe(["--config", str(train_recipe(tmp_path, qwen2_base, sum_data,
                                                                                  **keys))])
    caplog.set_level(logging.WARNING, logger="sfn_train")
    decision = resolve_attention(model_args, training_args)
    assert training_args.packing is packing and decision["packing"] is packing
    assert decision["used"] == attention
    disabled_line = f"packing with strategy {strategy} switched off (it makes padding-free batches)"
    assert (disabled_line in caplog.text) is (not packing)


def test_frozen_parameters_get_no_optimizer_state(qwen2_base, sum_data, tmp_path):
    """The optimizer holds only the selected tensors: no Adam moments for frozen weights (DeepSpeed #2615)."""
    from sfn_train.config import parse_recipe
    from sfn_train.train import freeze, load_model
    from trl import SFTTrainer

    script_args, training_args, model_args, sfn_args = parse_recipe(
        ["--config", str(train_recipe(tmp_path, qwen2_base, sum_data))])
    model = load_model(model_args)
    freeze(model, sfn_args)
    trainer = SFTTrainer(model=model, args=training_args, train_dataset=None or __import__("datasets").Dataset.from_list(
        [{"prompt": "a", "completion": "b"}]))
    optimizer = trainer.create_optimizer()
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert in_optimizer == trainable and len(trainable) == 4


def test_resume_runs_only_the_remaining_steps_and_gives_the_same_weights(tmp_path, qwen2_base, sum_data):
    """Resuming from the step-2 checkpoint of a 4-step run runs steps 3-4 only and ends bitwise on that run's weights
    (the checks are in `assert_resumes_from_step_2`)."""
    save = dict(max_steps=4, save_strategy="steps", save_steps=2)
    (tmp_path / "full").mkdir()
    full = step_watcher()
    reference = run_with_callbacks(train_recipe(tmp_path / "full", qwen2_base, sum_data, **save), full)
    assert (reference / "checkpoint-2").is_dir()
    assert (full.start_step, full.steps) == (0, 4)
    assert_resumes_from_step_2(tmp_path, qwen2_base, sum_data, reference, O_PROJ, **save)


# --- bad input: one clear line, exit code 2 ---------------------------------------------------------------------------
def run_bad(tmp_path, capsys, base, data, *flags, **keys) -> str:
    recipe = train_recipe(tmp_path, base, data, **keys)
    assert main(["train", "--config", str(recipe), *flags]) == 2
    return one_line_error(capsys)


def test_pattern_matching_nothing(tmp_path, capsys, qwen2_base, sum_data):
    line = run_bad(tmp_path, capsys, qwen2_base, sum_data, trainable_modules=["o_prj"])
    assert "'o_prj' matches no parameter of Qwen2ForCausalLM" in line
    assert not (tmp_path / "out").exists()


def test_unknown_recipe_key(tmp_path, capsys, qwen2_base, sum_data):
    assert "unknown key(s) trainable_modlues" in run_bad(tmp_path, capsys, qwen2_base, sum_data,
                                                          trainable_modlues=["o_proj"])


def test_unknown_flag_and_wrong_type(tmp_path, capsys, qwen2_base, sum_data):
    assert "--learnig_rate" in run_bad(tmp_path, capsys, qwen2_base, sum_data, "--learnig_rate", "1")
    assert "learning_rate" in run_bad(tmp_path, capsys, qwen2_base, sum_data, learning_rate="fast")


def test_quantize_frozen_invalid_choice(tmp_path, capsys, qwen2_base, sum_data):
    # 4bit / 8bit themselves: tests/test_quantize.py
    assert "quantize_frozen" in run_bad(tmp_path, capsys, qwen2_base, sum_data, quantize_frozen="3bit")


def test_output_dir_not_empty(tmp_path, capsys, qwen2_base, sum_data):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("a finished run")
    assert "output_dir" in run_bad(tmp_path, capsys, qwen2_base, sum_data)
    assert (tmp_path / "out" / "keep.txt").read_text() == "a finished run"


def test_dataset_problems(tmp_path, capsys, qwen2_base):
    assert "does not exist" in run_bad(tmp_path, capsys, qwen2_base, tmp_path / "missing.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert "empty" in run_bad(tmp_path, capsys, qwen2_base, empty)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": ""}\n')
    assert "row 1" in run_bad(tmp_path, capsys, qwen2_base, bad)
    cols = tmp_path / "cols.jsonl"
    cols.write_text('{"question": "a", "answer": "b"}\n')
    assert "prompt_template" in run_bad(tmp_path, capsys, qwen2_base, cols)


def test_column_templates_map_other_layouts(tmp_path, qwen2_base):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(f'{{"question": "Start at {i}. Add 1.", "solution": "{i}+1={i + 1}."}}\n'
                            for i in range(8)))
    out = train(tmp_path, qwen2_base, data, prompt_template="{question}", completion_template="{solution}")
    assert changed_tensors(qwen2_base, out)[0] == O_PROJ


def test_resume_without_checkpoint(tmp_path, capsys, qwen2_base, sum_data):
    assert "no complete checkpoint" in run_bad(tmp_path, capsys, qwen2_base, sum_data, resume_from_checkpoint="true")


def test_missing_model_is_one_line(tmp_path, capsys, sum_data):
    line = run_bad(tmp_path, capsys, tmp_path / "no-such-model", sum_data)
    assert "no-such-model" in line and "model_name_or_path" in line
    line = run_bad(tmp_path, capsys, "nobody/no-such-model", sum_data)
    assert "nobody/no-such-model" in line


def test_a_gathered_copy_of_a_tied_weight_is_dropped(tmp_path, llama_tied_base):
    """What an FSDP2 save writes for a tied-embedding model (lm_head.weight next to model.embed_tokens.weight, equal)
    becomes the base's layout again; a normal save is left as it is. (The 2-process runs: tests/test_distributed.py.)"""
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from sfn_train.outputs import drop_tied_copies

    model = AutoModelForCausalLM.from_pretrained(llama_tied_base)
    out = tmp_path / "out"
    shutil.copytree(llama_tied_base, out)
    assert drop_tied_copies(out, model) == [] and load_tensors(out).keys() == load_tensors(llama_tied_base).keys()
    tensors = load_file(out / "model.safetensors")
    save_file({**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"].clone()}, out / "model.safetensors",
              metadata={"format": "pt"})
    assert drop_tied_copies(out, model) == ["lm_head.weight"]
    assert changed_tensors(llama_tied_base, out) == (set(), set(load_tensors(llama_tied_base)))
