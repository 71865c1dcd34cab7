"""Rerunning `sfn train` into the same output folder (sfn_train/rerun.py): an interrupted run resumes or starts over,
a finished one is refused, `overwrite_output_dir` replaces the folder whole, and a resume refuses another recipe."""

from __future__ import annotations

import json
import logging

import pytest

from helpers import one_line_error, run_with_callbacks, train_recipe
from sfn_train.cli import main

SAVE = dict(save_strategy="steps", save_steps=2, disable_tqdm=True)


@pytest.fixture(autouse=True)
def fingerprint_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SFN_FINGERPRINT_CACHE", str(tmp_path / "fingerprints.json"))


def interrupt_at(step: int):
    """A callback that presses Ctrl-C (raises KeyboardInterrupt) when the Trainer ends optimizer step `step`."""
    from transformers import TrainerCallback

    class CtrlC(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                raise KeyboardInterrupt

    return CtrlC()


def interrupted(recipe, step: int) -> None:
    with pytest.raises(KeyboardInterrupt):
        run_with_callbacks(recipe, interrupt_at(step))


def manifest(out) -> dict:
    return json.loads((out / "sfn_manifest.json").read_text())


def test_interrupted_run_resumes_with_the_same_command(tmp_path, caplog, capsys, qwen2_base, sum_data):
    recipe = train_recipe(tmp_path, qwen2_base, sum_data, **SAVE)
    out = tmp_path / "out"
    interrupted(recipe, 3)  # after checkpoint-2 was saved
    assert manifest(out)["status"] == "running"
    caplog.set_level(logging.INFO, logger="sfn_train")
    assert main(["train", "--config", str(recipe)]) == 0
    assert f"output_dir {out} holds an interrupted run: resuming from checkpoint-2" in caplog.text
    assert manifest(out)["engine"]["steps"] == {"resumed_at": 2, "run_in_this_process": 2}
    assert manifest(out)["status"] == "complete"
    # finished: the same command is now refused, and leaves the folder as it was
    before = sorted(p.name for p in out.iterdir())
    capsys.readouterr()
    assert main(["train", "--config", str(recipe)]) == 2
    assert "holds a finished run: choose another output_dir, or set `overwrite_output_dir: true`" in \
        one_line_error(capsys)
    assert sorted(p.name for p in out.iterdir()) == before


def test_interrupted_run_without_a_checkpoint_starts_over(tmp_path, caplog, qwen2_base, sum_data):
    recipe = train_recipe(tmp_path, qwen2_base, sum_data, **SAVE)
    out = tmp_path / "out"
    interrupted(recipe, 1)  # before the first checkpoint
    (out / "stale.txt").write_text("left by the interrupted run")
    caplog.set_level(logging.INFO, logger="sfn_train")
    assert main(["train", "--config", str(recipe)]) == 0
    assert "holds an interrupted run with no complete checkpoint: starting over in it" in caplog.text
    assert manifest(out)["engine"]["steps"]["run_in_this_process"] == 4
    assert sorted(p.name for p in out.iterdir() if not p.is_file()) == ["checkpoint-2", "checkpoint-4"]
    assert not (out / "stale.txt").exists() and not (out / ".replaced-run").exists()


def test_overwrite_replaces_the_folder_whole(tmp_path, qwen2_base, sum_data):
    """The old run's checkpoints and files do not stay beside the new run, and an interrupted replacement keeps the
    old run aside, whole, until the replacement completes."""
    out = tmp_path / "out"
    assert main(["train", "--config", str(train_recipe(tmp_path, qwen2_base, sum_data, **SAVE))]) == 0
    old = manifest(out)
    new = train_recipe(tmp_path, qwen2_base, sum_data, max_steps=2, learning_rate=5e-3, overwrite_output_dir=True,
                       **SAVE)
    interrupted(new, 1)
    assert manifest(out)["status"] == "running"
    kept = out / ".replaced-run"
    assert manifest(kept) == old and (kept / "sfn_plugin.safetensors").exists() and (kept / "checkpoint-4").is_dir()
    assert not (out / "checkpoint-4").exists()
    assert main(["train", "--config", str(new)]) == 0  # the same command: the replacement completes
    assert manifest(out)["status"] == "complete" and manifest(out)["recipe"]["training"]["max_steps"] == 2
    assert sorted(p.name for p in out.iterdir() if p.name.startswith((".", "checkpoint"))) == ["checkpoint-2"]


def test_resume_refuses_another_recipe(tmp_path, capsys, qwen2_base, sum_data):
    out = tmp_path / "out"
    interrupted(train_recipe(tmp_path, qwen2_base, sum_data, **SAVE), 3)
    other = train_recipe(tmp_path, qwen2_base, sum_data, learning_rate=5e-3, seed=1, **SAVE)
    assert main(["train", "--config", str(other)]) == 2
    line = one_line_error(capsys)
    assert f"cannot resume from {out / 'checkpoint-2'}: it was written under another recipe (differs in " \
           "learning_rate, seed;" in line
    # the step budget may change: the run goes on to 6 steps from checkpoint-2
    assert main(["train", "--config", str(train_recipe(tmp_path, qwen2_base, sum_data, **{**SAVE, "max_steps": 6}))]) == 0
    assert manifest(out)["engine"]["steps"] == {"resumed_at": 2, "run_in_this_process": 4}


@pytest.mark.parametrize("keys, expected", [
    ({"report_to": "tensorboard"}, "report_to tensorboard needs the tensorboard package, which is not installed here"),
    ({"push_to_hub": True}, "push_to_hub is set but HF_HUB_OFFLINE=1 keeps this process off the hub"),
])
def test_outside_needs_are_checked_before_anything_is_written(tmp_path, capsys, monkeypatch, qwen2_base, sum_data,
                                                              keys, expected):
    """A missing logging integration or an unreachable hub: one line at start-up, no folder left to block the
    corrected command (before: a traceback from the Trainer, and a `running` manifest)."""
    import transformers.integrations.integration_utils as integrations

    monkeypatch.setattr(integrations, "get_available_reporting_integrations", lambda: [])  # as if none is installed
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = train_recipe(tmp_path, qwen2_base, sum_data, **keys)
    assert main(["train", "--config", str(recipe)]) == 2
    assert expected in one_line_error(capsys)
    assert not (tmp_path / "out").exists()
