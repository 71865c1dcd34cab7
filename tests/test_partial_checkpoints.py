"""Checkpoints that hold only what changed: an o_proj run's checkpoint-N has the trained tensors and the training
state, not the frozen weights; a resume rebuilds the model from the base it checks by fingerprint. (Bitwise resume
under one process, 2-process DDP, ZeRO-2/3 and FSDP2 is tests/test_reliability.py's and tests/test_engines.py's
kill-and-resume; the latter also checks what an FSDP2 checkpoint holds.)"""

from __future__ import annotations

import json
import logging
import shutil
from types import SimpleNamespace

import torch

from helpers import load_tensors, one_line_error, train_recipe
from sfn_train.cli import main
from sfn_train.partial_checkpoints import partial_checkpoints

O_PROJ = {f"model.layers.{i}.self_attn.o_proj.weight" for i in range(4)}


def test_checkpoint_holds_the_trained_tensors_and_resume_checks_the_base(tmp_path, qwen2_base, sum_data, capsys):
    from safetensors.torch import load_file

    from sfn_train.tiny import save_tiny_checkpoint

    save = dict(max_steps=2, save_strategy="steps", save_steps=2)
    (tmp_path / "run").mkdir()
    assert main(["train", "--config", str(train_recipe(tmp_path / "run", qwen2_base, sum_data, **save))]) == 0
    out = tmp_path / "run" / "out"
    checkpoint = out / "checkpoint-2"
    files = {p.name for p in checkpoint.iterdir()}
    assert "model.safetensors" not in files and "training_args.bin" not in files  # no frozen weights, no pickle
    assert {"sfn_trained.safetensors", "sfn_checkpoint.json", "optimizer.pt", "scheduler.pt", "rng_state.pth",
            "trainer_state.json"} <= files
    trained = load_file(checkpoint / "sfn_trained.safetensors")
    assert set(trained) == O_PROJ
    final = load_tensors(out)  # the final output stays a full checkpoint, whose o_proj is the checkpoint's
    assert len(final) > len(O_PROJ) and all(torch.equal(trained[n], final[n]) for n in O_PROJ)
    record = json.loads((checkpoint / "sfn_checkpoint.json").read_text())
    manifest = json.loads((out / "sfn_manifest.json").read_text())
    assert record["base_fingerprint"] == manifest["base"]["fingerprint"] and set(record["trained_tensors"]) == O_PROJ
    weights = sum(p.stat().st_size for p in checkpoint.iterdir())
    assert weights < (qwen2_base / "model.safetensors").stat().st_size

    other = save_tiny_checkpoint(tmp_path / "other-base", "qwen2", seed=1)  # same shapes, other weights
    (tmp_path / "resumed" / "out").mkdir(parents=True)
    shutil.copytree(checkpoint, tmp_path / "resumed" / "out" / "checkpoint-2")
    recipe = train_recipe(tmp_path / "resumed", other, sum_data, resume_from_checkpoint="true",
                          **{**save, "max_steps": 4})
    assert main(["train", "--config", str(recipe)]) == 2
    line = one_line_error(capsys)
    assert "cannot resume from" in line and "fingerprint" in line and str(other) in line

    # the same checkpoint under a recipe that trains every parameter (whole checkpoints): refused in one line
    (tmp_path / "full" / "out").mkdir(parents=True)
    shutil.copytree(checkpoint, tmp_path / "full" / "out" / "checkpoint-2")
    recipe = train_recipe(tmp_path / "full", qwen2_base, sum_data, resume_from_checkpoint="true",
                          trainable_modules=["all"], **{**save, "max_steps": 4})
    assert main(["train", "--config", str(recipe)]) == 2
    line = one_line_error(capsys)
    assert "holds only the trained tensors" in line and "keeps whole checkpoints" in line


def test_which_runs_keep_whole_checkpoints(caplog):
    """Partial checkpoints for any engine but FSDP1 (which says so in one line), unless every tensor trains or the
    Trainer reloads the best checkpoint's whole model at the end."""
    part = SimpleNamespace(trainable_params=1, total_params=3, trainable_tensors=["o"])
    full = SimpleNamespace(trainable_params=3, total_params=3, trainable_tensors=["o", "q", "k"])
    model_args, args = SimpleNamespace(model_name_or_path="base"), SimpleNamespace(load_best_model_at_end=False)
    for engine in ("None", "ddp", "deepspeed_zero2", "deepspeed_zero3", "fsdp2"):
        assert partial_checkpoints(part, model_args, args, "fp", engine).trained == ["o"], engine
        assert partial_checkpoints(full, model_args, args, "fp", engine) is None, engine
    assert partial_checkpoints(part, model_args, SimpleNamespace(load_best_model_at_end=True), "fp", "fsdp2") is None
    with caplog.at_level(logging.INFO, logger="sfn_train"):
        assert partial_checkpoints(part, model_args, args, "fp", "fsdp1") is None
    assert "FSDP1 keeps whole checkpoints" in caplog.text
