"""bf16 bases: the trained tensors train as fp32 master weights, the frozen ones stay bitwise the base.

AdamW on bf16 weights at lr 1e-5 loses most updates (a bf16 weight near 0.02 moves in steps of 1.2e-4); see
sfn_train/precision.py. Every run here trains a bf16 base at lr 1e-5 for a few steps.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from transformers import TrainerCallback

from helpers import load_tensors, train_recipe
from sfn_train.cli import main
from sfn_train.config import parse_recipe
from sfn_train.train import run_sft

O_PROJ = {f"model.layers.{i}.self_attn.o_proj.weight" for i in range(4)}
F2 = ["embed", "lm_head", "norm", "o_proj"]


def train(tmp_path, base, data, **keys):
    keys = dict(learning_rate=1e-5, dtype="bfloat16", **keys)
    assert main(["train", "--config", str(train_recipe(tmp_path, base, data, **keys))]) == 0
    return tmp_path / "out"


class StepRecorder(TrainerCallback):
    def __init__(self, steps: list):
        self.steps = steps

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def fraction_changed(before: torch.Tensor, after: torch.Tensor) -> float:
    return (before.float() != after.float()).float().mean().item()


@pytest.mark.parametrize("setting", [
    # the CPU default: no autocast, so the forward needs the dtype hooks around the fp32 modules
    dict(bf16=False, trainable_modules=["o_proj"]),
    # the GPU default: bf16 autocast and activation checkpointing; F2 puts fp32 embeddings, norms and head in the model
    dict(bf16=True, gradient_checkpointing=True, trainable_modules=F2),
], ids=["o_proj", "f2-autocast-checkpointing"])
def test_bf16_base_trains_fp32_masters_and_keeps_frozen_tensors_bitwise(tmp_path, qwen2_bf16_base, sum_data, setting):
    from safetensors.torch import load_file

    out = train(tmp_path, qwen2_bf16_base, sum_data, max_steps=3, **setting)
    base, saved = load_tensors(qwen2_bf16_base), load_tensors(out)
    plugin = load_file(out / "sfn_plugin.safetensors")
    trained = set(plugin)
    assert O_PROJ <= trained

    # the plugin holds the fp32 masters: (almost) every o_proj element moved at lr 1e-5
    for name in O_PROJ:
        assert plugin[name].dtype == torch.float32
        assert fraction_changed(base[name], plugin[name]) >= 0.9, name
    # the checkpoint is the base's one dtype; its trained tensors are the masters rounded to bf16
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    assert all(torch.equal(saved[n], plugin[n].to(torch.bfloat16)) for n in trained)
    # every frozen tensor is bitwise the base
    frozen = set(base) - trained
    assert frozen and all(torch.equal(base[n], saved[n]) for n in frozen)

    precision = json.loads((out / "sfn_manifest.json").read_text())["precision"]
    assert precision["engine"] == "plain" and precision["upcast_from"] == ["bfloat16"]
    assert precision["trainable_dtypes"] == {"float32": len(trained)}
    assert precision["frozen_dtypes"] == {"bfloat16": len(frozen)}
    assert precision["optimizer_param_dtypes"] == {"float32": len(trained)}
    assert precision["mixed_precision"] == ("bf16" if setting["bf16"] else None)


def test_resume_continues_from_the_fp32_masters(tmp_path, qwen2_bf16_base, sum_data):
    """checkpoint-N holds the fp32 masters, so a resumed bf16 run ends bitwise where an uninterrupted one does."""
    from safetensors.torch import load_file

    save = dict(max_steps=4, save_strategy="steps", save_steps=2)
    (tmp_path / "full").mkdir()
    reference = train(tmp_path / "full", qwen2_bf16_base, sum_data, **save)
    step2 = load_tensors(reference / "checkpoint-2")
    assert all(step2[n].dtype == torch.float32 for n in O_PROJ)

    out = tmp_path / "resumed" / "out"
    out.mkdir(parents=True)
    shutil.copytree(reference / "checkpoint-2", out / "checkpoint-2")
    recipe = train_recipe(tmp_path / "resumed", qwen2_bf16_base, sum_data, learning_rate=1e-5, dtype="bfloat16",
                          resume_from_checkpoint="true", **save)
    ran = []  # a run that ignored the checkpoint and started over would also end bitwise equal: record what ran
    run_sft(*parse_recipe(["--config", str(recipe)]), callbacks=[StepRecorder(ran)])
    assert ran == [3, 4]
    expected, resumed = load_file(reference / "sfn_plugin.safetensors"), load_file(out / "sfn_plugin.safetensors")
    assert all(torch.equal(resumed[n], expected[n]) for n in O_PROJ)


def test_dtype_hooks_keep_activations_in_the_model_dtype():
    """Without autocast an fp32 module inside a bf16 model must take bf16 inputs and give bf16 outputs."""
    from sfn_train.precision import keep_fp32_masters, restore_loaded_dtypes
    from sfn_train.roles import select_parameters
    from sfn_train.tiny import tiny_model

    model = tiny_model("qwen2").to(torch.bfloat16)
    ids = torch.tensor([[5, 6, 7, 8]])
    names = select_parameters(model, F2)
    masters = keep_fp32_masters(model, names, engine="plain")
    params = dict(model.named_parameters())
    assert all(params[n].dtype == torch.float32 for n in names)
    assert all(p.dtype == torch.bfloat16 for n, p in params.items() if n not in names)
    seen = []
    model.model.layers[0].mlp.register_forward_hook(lambda m, a, o: seen.append(a[0].dtype))
    logits = model(ids).logits
    assert logits.dtype == torch.bfloat16 and seen == [torch.bfloat16]
    logits.float().sum().backward()
    assert all(params[n].grad is not None and params[n].grad.dtype == torch.float32 for n in names)

    restore_loaded_dtypes(model, masters)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters()) and not masters.hooks


def test_deepspeed_and_fsdp_keep_their_own_masters(monkeypatch):
    from types import SimpleNamespace

    from sfn_train.precision import engine_in_use, keep_fp32_masters
    from sfn_train.tiny import tiny_model

    model = tiny_model("qwen2").to(torch.bfloat16)
    names = [n for n, _ in model.named_parameters() if "o_proj" in n]
    for args, engine in [(SimpleNamespace(deepspeed="ds_configs/zero2.json", fsdp=[]), "deepspeed"),
                         (SimpleNamespace(deepspeed=None, fsdp=["full_shard"]), "fsdp")]:
        assert engine_in_use(args) == engine
        masters = keep_fp32_masters(model, names, args)
        assert masters.engine == engine and not masters.loaded_dtypes and not masters.hooks
        assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # accelerate launch with a DeepSpeed plugin, no recipe key
    assert engine_in_use(SimpleNamespace(deepspeed=None, fsdp=[])) == "deepspeed"
