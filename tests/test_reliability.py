"""Reliability: kill-and-resume, incomplete checkpoints, bad input, disk full, no code from data.

A run killed with SIGKILL after its first checkpoint and resumed with `resume_from_checkpoint: true` must end with
the same weights, bit for bit, as a run that was never interrupted; a checkpoint left half-written must be skipped
on resume; every user mistake is one line, exit code 2, and leaves nothing that looks complete.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import REPO, load_tensors, one_line_error, train_recipe, write_recipe
from sfn_train.cli import main
from sfn_train.errors import SfnError
from sfn_train.resume import latest_complete_checkpoint, problems

O_PROJ = {f"model.layers.{i}.self_attn.o_proj.weight" for i in range(4)}


@pytest.fixture(autouse=True)
def fingerprint_cache(tmp_path, monkeypatch):
    """Keep the fingerprint cache out of the home folder (also for subprocesses, which inherit the environment)."""
    monkeypatch.setenv("SFN_FINGERPRINT_CACHE", str(tmp_path / "fingerprints.json"))


def assert_same_weights(a: Path, b: Path) -> None:
    ta, tb = load_tensors(a), load_tensors(b)
    assert set(ta) == set(tb) and ta
    different = [n for n in ta if not torch.equal(ta[n], tb[n])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    pa, pb = (load_tensors_file(p / "sfn_plugin.safetensors") for p in (a, b))
    assert set(pa) == O_PROJ and all(torch.equal(pa[n], pb[n]) for n in pa)


def load_tensors_file(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path)


# ---------------------------------------------------------------------------------------------------------------------
# Kill and resume, as real processes
# ---------------------------------------------------------------------------------------------------------------------
def subprocess_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def command(recipe: Path, processes: int) -> list[str]:
    if processes == 1:
        return [sys.executable, "-m", "sfn_train.cli", "train", "--config", str(recipe)]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
            str(REPO / "train" / "sft.py"), "--config", str(recipe)]


def run_to_end(recipe: Path, processes: int, timeout: int = 600) -> str:
    proc = subprocess.run(command(recipe, processes), capture_output=True, text=True, timeout=timeout,
                          env=subprocess_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


def run_and_kill(recipe: Path, processes: int, out: Path, after: str, timeout: int = 600) -> None:
    """Start the run in its own session; SIGKILL the whole process group once checkpoint `out/after` is complete
    (`finished_step`: its trainer_state.json parses and every process's RNG state is there; a file that merely exists
    can still be half-written when the kill lands)."""
    log = open(out.parent / "killed.log", "w")
    proc = subprocess.Popen(command(recipe, processes), stdout=log, stderr=subprocess.STDOUT, env=subprocess_env(),
                            cwd=REPO, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while finished_step(out / after, processes) is None:
            assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before {after} was saved: " + \
                (out.parent / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, f"{after} was not saved within {timeout} s"
            time.sleep(0.01)
    finally:
        # torchrun starts its workers in sessions of their own (torch.distributed.elastic, start_new_session=True):
        # killing the launcher's process group would leave them running, so kill every descendant by pid.
        family = [proc.pid, *descendants(proc.pid)]
        for pid in family:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
        log.close()
        for pid in family[1:]:  # gone before anything else looks at the folder
            while Path(f"/proc/{pid}").exists() and "zombie" not in _state(pid):
                time.sleep(0.01)
    assert proc.returncode == -signal.SIGKILL


def descendants(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            for child in map(int, (task / "children").read_text().split()):
                found += [child, *descendants(child)]
    return found


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].splitlines()[0].lower()
    except (OSError, IndexError):
        return "zombie"


def kill_and_resume(tmp_path, base, data, processes: int, **keys) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "killed").mkdir()
    reference = tmp_path / "full" / "out"
    run_to_end(train_recipe(tmp_path / "full", base, data, **keys), processes)

    out = tmp_path / "killed" / "out"
    recipe = train_recipe(tmp_path / "killed", base, data, **keys)
    run_and_kill(recipe, processes, out, "checkpoint-10")
    # The kill really interrupted the run: no final weights, and the manifest is not marked complete.
    assert json.loads((out / "sfn_manifest.json").read_text())["status"] == "running"
    assert not (out / "sfn_plugin.safetensors").exists()
    start_step = max(filter(None, (finished_step(p, processes) for p in out.glob("checkpoint-*"))))
    start = out / f"checkpoint-{start_step}"
    assert start_step >= 10 and latest_complete_checkpoint(out, processes)[0] == start

    resumed = write_recipe(tmp_path / "killed" / "resume.yaml",
                           **{**__import__("yaml").safe_load(recipe.read_text()), "resume_from_checkpoint": True})
    log = run_to_end(resumed, processes)
    assert f"resume: from {start}" in log
    manifest = json.loads((out / "sfn_manifest.json").read_text())
    assert manifest["status"] == "complete"
    # Training is deterministic: a resumed run that silently started over would end on the same weights. What the
    # Trainer ran shows it did not: it started at the checkpoint's step and ran only the remaining optimizer steps.
    assert manifest["engine"]["steps"] == {"resumed_at": start_step,
                                           "run_in_this_process": keys["max_steps"] - start_step}
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == keys["max_steps"]
    assert_same_weights(out, reference)


def finished_step(folder: Path, processes: int) -> int | None:
    """The step of a checkpoint whose save finished, read without sfn_train.resume: the Trainer writes
    trainer_state.json last, after every process's RNG state; None for a save cut short."""
    try:
        step = json.loads((folder / "trainer_state.json").read_text())["global_step"]
    except (OSError, ValueError, KeyError):
        return None
    rng = ["rng_state.pth"] if processes == 1 else [f"rng_state_{r}.pth" for r in range(processes)]
    return step if folder.name == f"checkpoint-{step}" and all((folder / f).is_file() for f in rng) else None


KILL_KEYS = dict(max_steps=60, save_strategy="steps", save_steps=5, logging_steps=5, disable_tqdm=True)


def test_killed_run_resumes_to_the_same_weights(tmp_path, qwen2_base, sum_data):
    kill_and_resume(tmp_path, qwen2_base, sum_data, 1, **KILL_KEYS)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "zero2", "zero3"])
def test_killed_two_process_run_resumes_to_the_same_weights(tmp_path, qwen2_base, sum_data, engine):
    """The checkpoints hold no frozen tensors (sfn_train/partial_checkpoints.py); the resume is bitwise, and every
    frozen tensor is the base's."""
    from safetensors import safe_open

    from helpers import changed_tensors

    deepspeed = {} if engine == "ddp" else {"deepspeed": str(REPO / "ds_configs" / f"{engine}.json")}
    kill_and_resume(tmp_path, qwen2_base, sum_data, 2, **{**KILL_KEYS, "max_steps": 30},
                    per_device_train_batch_size=2, **deepspeed)
    out = tmp_path / "killed" / "out"
    assert not list(out.glob("checkpoint-*/model.safetensors"))
    assert changed_tensors(qwen2_base, out)[0] == O_PROJ
    if engine == "ddp":  # DDP: the trained tensors, written once by rank 0
        trained = list(out.glob("checkpoint-*/sfn_trained.safetensors"))
        assert trained and all(set(safe_open(f, "pt").keys()) == O_PROJ for f in trained)
        return
    states = list(out.glob("checkpoint-*/global_step*/*model_states.pt"))
    frozen = "model.layers.0.self_attn.q_proj.weight"
    loaded = [torch.load(f, weights_only=False, map_location="cpu") for f in states]  # DeepSpeed's own format
    assert loaded and all(frozen not in s["module"] and not s.get("frozen_param_fragments") for s in loaded)
    assert not list((tmp_path / "killed" / "out").glob("checkpoint-*/model.safetensors"))


# ---------------------------------------------------------------------------------------------------------------------
# Incomplete checkpoints
# ---------------------------------------------------------------------------------------------------------------------
STEPS = dict(max_steps=6, save_strategy="steps", save_steps=2)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, qwen2_base, sum_data):
    """An uninterrupted 6-step run with checkpoint-2, -4, -6."""
    root = tmp_path_factory.mktemp("reference")
    assert main(["train", "--config", str(train_recipe(root, qwen2_base, sum_data, **STEPS))]) == 0
    return root / "out"


def test_checkpoint_checks_name_each_problem(tmp_path, reference_run):
    good = tmp_path / "checkpoint-2"
    shutil.copytree(reference_run / "checkpoint-2", good)
    assert problems(good) == []
    assert problems(good, world_size=2) == ["rng_state_0.pth is missing", "rng_state_1.pth is missing"]

    def damaged(name, damage):
        folder = tmp_path / name / "checkpoint-2"
        shutil.copytree(good, folder)
        damage(folder)
        return "; ".join(problems(folder))

    def truncate(path, keep=0.5):
        os.truncate(path, int(path.stat().st_size * keep))

    assert "trainer_state.json is missing" in damaged("state", lambda f: (f / "trainer_state.json").unlink())
    assert "trainer_state.json is unreadable" in damaged("json", lambda f: truncate(f / "trainer_state.json"))
    # an o_proj run's checkpoint holds only the trained tensors (sfn_train/partial_checkpoints.py)
    assert not (good / "model.safetensors").exists()
    assert "sfn_trained.safetensors is truncated" in damaged(
        "weights", lambda f: truncate(f / "sfn_trained.safetensors", 0.9))
    assert "sfn_trained.safetensors is missing" in damaged("noweights", lambda f: (f / "sfn_trained.safetensors").unlink())
    assert "sfn_checkpoint.json is unreadable" in damaged("record", lambda f: truncate(f / "sfn_checkpoint.json"))
    assert "optimizer.pt is not a complete torch file" in damaged("optim", lambda f: truncate(f / "optimizer.pt"))
    assert "scheduler.pt is missing" in damaged("sched", lambda f: (f / "scheduler.pt").unlink())
    assert "rng_state.pth is missing" in damaged("rng", lambda f: (f / "rng_state.pth").unlink())
    renamed = tmp_path / "renamed" / "checkpoint-3"
    shutil.copytree(good, renamed)
    assert problems(renamed) == ["trainer_state.json is for step 2"]


def test_resume_picks_the_newest_of_several_complete_checkpoints(tmp_path, reference_run):
    """Three complete checkpoints, one of them numbered past 9 (where the string order of the names is not the step
    order): the newest by step is chosen. The expected folder is read from the trainer states, not from resume.py."""
    out = tmp_path / "out"
    out.mkdir()
    for step in (2, 4):
        shutil.copytree(reference_run / f"checkpoint-{step}", out / f"checkpoint-{step}")
    shutil.copytree(reference_run / "checkpoint-6", out / "checkpoint-10")  # a later step, as a longer run saves it
    state = json.loads((out / "checkpoint-10" / "trainer_state.json").read_text())
    (out / "checkpoint-10" / "trainer_state.json").write_text(json.dumps({**state, "global_step": 10}))
    steps = {json.loads((p / "trainer_state.json").read_text())["global_step"]: p for p in out.iterdir()}
    assert sorted(steps) == [2, 4, 10] and all(problems(p) == [] for p in steps.values())
    assert latest_complete_checkpoint(out) == (steps[max(steps)], {})


def test_resume_skips_incomplete_checkpoints(tmp_path, qwen2_base, sum_data, reference_run, caplog):
    """A kill while saving leaves checkpoint-6 without trainer_state.json and checkpoint-4 with cut weights; the HF
    Trainer alone would resume from checkpoint-6. The resumed run starts at checkpoint-2 and ends bitwise equal."""
    from transformers.trainer_utils import get_last_checkpoint

    out = tmp_path / "out"
    out.mkdir()
    for step in (2, 4, 6):
        shutil.copytree(reference_run / f"checkpoint-{step}", out / f"checkpoint-{step}")
    (out / "checkpoint-6" / "trainer_state.json").unlink()
    weights = out / "checkpoint-4" / "sfn_trained.safetensors"
    os.truncate(weights, weights.stat().st_size - 1000)
    (out / "tmp-checkpoint-8").mkdir()  # a staging folder of older transformers versions: never a candidate
    (out / "tmp-checkpoint-8" / "trainer_state.json").write_text("{}")

    assert get_last_checkpoint(str(out)) == str(out / "checkpoint-6")  # what the Trainer would have picked
    assert latest_complete_checkpoint(out)[0] == out / "checkpoint-2"

    caplog.set_level(logging.INFO, logger="sfn_train")
    recipe = train_recipe(tmp_path, qwen2_base, sum_data, resume_from_checkpoint="true", **STEPS)
    assert main(["train", "--config", str(recipe)]) == 0
    assert "skipping incomplete checkpoint-6 (trainer_state.json is missing" in caplog.text
    assert "skipping incomplete checkpoint-4 (sfn_trained.safetensors is truncated" in caplog.text
    assert f"resume: from {out / 'checkpoint-2'}" in caplog.text
    steps = json.loads((out / "sfn_manifest.json").read_text())["engine"]["steps"]
    assert steps == {"resumed_at": 2, "run_in_this_process": 4}  # steps 3-6 ran, not 1-6
    assert_same_weights(out, reference_run)
    assert problems(out / "checkpoint-6") == [] and problems(out / "checkpoint-4") == []  # rewritten whole


def test_resume_with_only_incomplete_checkpoints(tmp_path, capsys, qwen2_base, sum_data, reference_run):
    out = tmp_path / "out"
    out.mkdir()
    shutil.copytree(reference_run / "checkpoint-2", out / "checkpoint-2")
    (out / "checkpoint-2" / "optimizer.pt").unlink()
    recipe = train_recipe(tmp_path, qwen2_base, sum_data, resume_from_checkpoint="true", **STEPS)
    assert main(["train", "--config", str(recipe)]) == 2
    line = one_line_error(capsys)
    assert "no complete checkpoint-* folder (1 incomplete: checkpoint-2)" in line
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2"]  # nothing written


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: one line, exit code 2, nothing half-written; --debug shows the traceback
# ---------------------------------------------------------------------------------------------------------------------
def run_bad(tmp_path, capsys, base, data, *flags, **keys) -> str:
    recipe = train_recipe(tmp_path, base, data, **keys)
    assert main(["train", "--config", str(recipe), *flags]) == 2
    return one_line_error(capsys)


@pytest.fixture(scope="module")
def no_chat_base(tmp_path_factory, qwen2_base):
    folder = tmp_path_factory.mktemp("nochat") / "qwen2"
    shutil.copytree(qwen2_base, folder)
    (folder / "chat_template.jinja").unlink()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_messages_need_a_chat_template(tmp_path, capsys, no_chat_base):
    from transformers import AutoTokenizer

    assert not AutoTokenizer.from_pretrained(no_chat_base).chat_template
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "1+1?"},
                                             {"role": "assistant", "content": "2"}]}) + "\n")
    line = run_bad(tmp_path, capsys, no_chat_base, data)
    assert "`messages` conversations but the tokenizer has no chat template" in line
    assert not (tmp_path / "out").exists()
    with pytest.raises(SfnError, match="no chat template"):  # --debug: the exception itself, with its traceback
        main(["train", "--config", str(tmp_path / "recipe.yaml"), "--debug"])


def test_assistant_only_loss_needs_a_chat_template(tmp_path, capsys, no_chat_base, sum_data):
    line = run_bad(tmp_path, capsys, no_chat_base, sum_data, assistant_only_loss=True)
    assert "assistant_only_loss needs a chat template" in line
    assert not (tmp_path / "out").exists()


def test_layer_range_without_the_selected_module(tmp_path, capsys, qwen2_base, sum_data):
    """The module exists only in layer 0, the layers asked for are 2-3: nothing would train."""
    line = run_bad(tmp_path, capsys, qwen2_base, sum_data, trainable_modules=[r"layers\.0\.self_attn\.o_proj"],
                   trainable_layers="2-3")
    assert "match no parameter inside trainable_layers '2-3'" in line or "inside trainable_layers ['2-3']" in line
    assert not (tmp_path / "out").exists()


def test_all_parameters_frozen_is_refused():
    from sfn_train.roles import apply_freeze
    from sfn_train.tiny import tiny_model

    with pytest.raises(SfnError, match="all parameters are frozen"):
        apply_freeze(tiny_model("qwen2"), [])


def test_debug_shows_the_traceback(tmp_path, qwen2_base, sum_data):
    recipe = train_recipe(tmp_path, qwen2_base, sum_data, trainable_modules=["o_prj"])
    with pytest.raises(SfnError, match="'o_prj' matches no parameter"):
        main(["train", "--config", str(recipe), "--debug"])


# --- disk full --------------------------------------------------------------------------------------------------------
def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_while_writing_the_plugin(tmp_path, capsys, qwen2_base, sum_data, monkeypatch):
    """The plugin writer runs out of disk after training: one line naming the disk; no plugin file, no temp file,
    and the manifest is not marked complete."""
    import safetensors.torch

    def half_then_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)  # what a short write leaves
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_full)
    out = tmp_path / "out"
    line = run_bad(tmp_path, capsys, qwen2_base, sum_data, max_steps=1)
    assert f"no space left on the disk holding {out / 'sfn_plugin.safetensors'} (" in line and "GB free" in line
    assert not (out / "sfn_plugin.safetensors").exists() and not list(out.glob(".tmp-*"))
    assert json.loads((out / "sfn_manifest.json").read_text())["status"] == "running"


def test_disk_full_while_saving_a_checkpoint(tmp_path, capsys, qwen2_base, sum_data, monkeypatch):
    """torch.save of optimizer.pt fails at step 2: one line; the half-written checkpoint-2 is not resumable, and
    resuming says so instead of loading it."""
    from transformers.trainer_utils import get_last_checkpoint

    monkeypatch.setattr(torch, "save", enospc)
    out = tmp_path / "out"
    # no progress bar: with partial checkpoints no "Writing model shards" bar ends the step's bar line before the error
    line = run_bad(tmp_path, capsys, qwen2_base, sum_data, disable_tqdm=True, **STEPS)
    assert f"no space left on the disk holding {out}" in line and "skipped when you resume" in line
    assert get_last_checkpoint(str(out)) == str(out / "checkpoint-2")
    assert "optimizer.pt is missing" in problems(out / "checkpoint-2")
    monkeypatch.undo()
    line = run_bad(tmp_path, capsys, qwen2_base, sum_data, resume_from_checkpoint="true", **STEPS)
    assert "no complete checkpoint-* folder (1 incomplete: checkpoint-2)" in line


def test_disk_full_debug_shows_the_traceback(tmp_path, qwen2_base, sum_data, monkeypatch):
    monkeypatch.setattr(torch, "save", enospc)
    recipe = train_recipe(tmp_path, qwen2_base, sum_data, max_steps=1, save_strategy="steps", save_steps=1)
    with pytest.raises(SfnError, match="no space left on the disk holding") as err:
        main(["train", "--config", str(recipe), "--debug"])
    assert isinstance(err.value.__context__, OSError)  # the original error is kept for the traceback


def test_cli_reports_any_disk_full_error_in_one_line(tmp_path, capsys, monkeypatch):
    """A full disk met where no writer converted it (e.g. inside a library) is still one line, exit 2."""
    def delta(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "delta.json"))

    monkeypatch.setattr("sfn_train.gadgets.cli.delta", delta)
    assert main(["delta", "a", "b", "--out", str(tmp_path / "out")]) == 2
    assert f"no space left on the disk holding {tmp_path / 'out' / 'delta.json'}" in one_line_error(capsys)
    with pytest.raises(OSError):
        main(["delta", "a", "b", "--out", str(tmp_path / "out"), "--debug"])


# ---------------------------------------------------------------------------------------------------------------------
# Gadgets: what tests/test_gadgets.py does not cover yet
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gadget_ckpts(tmp_path_factory, qwen2_base):
    from sfn_train.tiny import save_tiny_checkpoint

    root = tmp_path_factory.mktemp("gadgets")
    c = {"qa": qwen2_base, "qb": save_tiny_checkpoint(root / "qb", "qwen2", seed=1),
         "small": save_tiny_checkpoint(root / "small", "qwen2", seed=2, hidden=32, layers=2)}
    c["plugin"] = root / "plugin.safetensors"
    assert main(["plugin", "extract", str(c["qb"]), "--base", str(qwen2_base), "--out", str(c["plugin"])]) == 0
    c["plugin_truncated"] = root / "plugin_truncated.safetensors"
    shutil.copy(c["plugin"], c["plugin_truncated"])
    os.truncate(c["plugin_truncated"], c["plugin"].stat().st_size - 64)
    c["qb_truncated"] = root / "qb_truncated"
    shutil.copytree(c["qb"], c["qb_truncated"])
    os.truncate(c["qb_truncated"] / "model.safetensors", (c["qb"] / "model.safetensors").stat().st_size - 64)
    return c


GADGET_ERRORS = {
    "plugin_apply_truncated_plugin": (lambda c, o: ["plugin", "apply", c["qa"], c["plugin_truncated"], "--out", o],
                                      "is truncated"),
    "plugin_extract_truncated_tuned": (lambda c, o: ["plugin", "extract", c["qb_truncated"], "--base", c["qa"],
                                                     "--out", o + ".safetensors"], "is truncated"),
    "plugin_extract_other_size": (lambda c, o: ["plugin", "extract", c["small"], "--base", c["qa"],
                                                "--out", o + ".safetensors"], "shape"),
    "plugin_apply_other_size": (lambda c, o: ["plugin", "apply", c["small"], c["plugin"], "--out", o], "lacks"),
    "delta_other_size": (lambda c, o: ["delta", c["qa"], c["small"], "--out", o], "share no tensor"),
}


@pytest.mark.parametrize("case", list(GADGET_ERRORS))
def test_gadget_bad_inputs(gadget_ckpts, tmp_path, capsys, case):
    argv, pattern = GADGET_ERRORS[case]
    out = tmp_path / "runs" / "out"
    assert main([str(a) for a in argv(gadget_ckpts, str(out))]) == 2
    assert re.search(pattern, one_line_error(capsys))
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


EXISTING_OUTPUT = {
    "delta": lambda c, o: ["delta", c["qa"], c["qb"], "--no-plots", "--out", o],
    "plugin_apply": lambda c, o: ["plugin", "apply", c["qa"], c["plugin"], "--out", o],
    "plugin_extract": lambda c, o: ["plugin", "extract", c["qb"], "--base", c["qa"], "--out", o + "/p.safetensors"],
}


@pytest.mark.parametrize("case", list(EXISTING_OUTPUT))
def test_gadget_refuses_existing_output_unless_overwrite(gadget_ckpts, tmp_path, capsys, case):
    out = tmp_path / "out"
    out.mkdir()
    keep = out / ("p.safetensors" if case == "plugin_extract" else "keep.txt")
    keep.write_text("a finished result")
    argv = [str(a) for a in EXISTING_OUTPUT[case](gadget_ckpts, str(out))]
    assert main(argv) == 2
    assert "--overwrite" in one_line_error(capsys)
    assert keep.read_text() == "a finished result"
    assert main([*argv, "--overwrite"]) == 0
    assert not keep.exists() or keep.read_bytes() != b"a finished result"


def _full_after(n_bytes: int):
    """A write_shard that writes `n_bytes` of the shard and then finds the disk full."""

    def write_shard(path, shard, progress=None):
        Path(path).write_bytes(b"\0" * n_bytes)
        raise OSError(errno.ENOSPC, "No space left on device")

    return write_shard


DISK_FULL_GADGETS = {
    "merge": lambda c, o: ["merge", c["qa"], c["qb"], "--out", o],
    "destroy": lambda c, o: ["destroy", c["qa"], "--modules", "o_proj", "--out", o],
    "plugin_apply": lambda c, o: ["plugin", "apply", c["qa"], c["plugin"], "--out", o],
}


@pytest.mark.parametrize("case", list(DISK_FULL_GADGETS))
def test_gadget_disk_full_leaves_nothing(gadget_ckpts, tmp_path, capsys, monkeypatch, case):
    from sfn_train import shards

    monkeypatch.setattr(shards, "write_shard", _full_after(4096))
    out = tmp_path / "runs" / "out"
    assert main([str(a) for a in DISK_FULL_GADGETS[case](gadget_ckpts, str(out))]) == 2
    line = one_line_error(capsys)
    assert f"no space left on the disk holding {out}" in line and "nothing that looks complete" in line
    assert not out.exists() and not any((tmp_path / "runs").iterdir())  # no .tmp-* folder either


def test_plugin_extract_disk_full_leaves_no_file(gadget_ckpts, tmp_path, capsys, monkeypatch):
    import safetensors.torch

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = tmp_path / "p.safetensors"
    assert main(["plugin", "extract", str(gadget_ckpts["qb"]), "--base", str(gadget_ckpts["qa"]),
                 "--out", str(out)]) == 2
    assert f"no space left on the disk holding {out}" in one_line_error(capsys)
    assert not out.exists() and not list(tmp_path.glob(".tmp-*"))


# ---------------------------------------------------------------------------------------------------------------------
# No code execution from data
# ---------------------------------------------------------------------------------------------------------------------
def test_trust_remote_code_defaults_false_and_reaches_from_pretrained(tmp_path, qwen2_base, sum_data, monkeypatch):
    import transformers

    from sfn_train.config import parse_recipe
    from sfn_train.train import run_sft

    recipe = train_recipe(tmp_path, qwen2_base, sum_data)
    parsed = parse_recipe(["--config", str(recipe)])
    assert parsed[1].trust_remote_code is False
    assert parse_recipe(["--config", str(recipe), "--trust_remote_code", "true"])[1].trust_remote_code is True

    calls = {}
    for cls_name in ("AutoTokenizer", "AutoModelForCausalLM"):
        cls = getattr(transformers, cls_name)
        original = cls.from_pretrained.__func__

        def spy(klass, *args, _name=cls_name, _original=original, **kwargs):
            calls[_name] = kwargs
            return _original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))

    def stop(*args, **kwargs):
        raise SfnError("stop after loading")

    monkeypatch.setattr("sfn_train.train.freeze", stop)
    with pytest.raises(SfnError, match="stop after loading"):
        run_sft(*parsed)
    assert calls["AutoTokenizer"]["trust_remote_code"] is False
    assert calls["AutoModelForCausalLM"]["trust_remote_code"] is False


SCANNED = ("sfn_train", "bench", "train")  # every Python file shipped or run by users (tests only run themselves)


def test_no_unsafe_deserialization_or_shell_in_the_package():
    """Weights only via safetensors or torch.load(weights_only=True); YAML only via safe_load; no shell."""
    unsafe = []
    files = sorted(path for folder in SCANNED for path in (REPO / folder).rglob("*.py"))
    assert {p.relative_to(REPO).parts[0] for p in files} == set(SCANNED)
    assert REPO / "bench" / "gadgets.py" in files and REPO / "train" / "sft.py" in files
    for path in files:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(r"torch\.load\(", code) and "weights_only=True" not in code:
                unsafe.append(f"{path.relative_to(REPO)}:{number}: torch.load without weights_only=True")
            if re.search(r"\bpickle\.loads?\(|\bdill\.|\bjoblib\.load\(|\bmarshal\.loads?\(", code):
                unsafe.append(f"{path.relative_to(REPO)}:{number}: unpickling")
            if re.search(r"shell\s*=\s*True|os\.system\(|os\.popen\(", code):
                unsafe.append(f"{path.relative_to(REPO)}:{number}: shell")
            if re.search(r"yaml\.(unsafe_)?load\(", code) or "yaml.Loader" in code:
                unsafe.append(f"{path.relative_to(REPO)}:{number}: unsafe YAML")
            if re.search(r"trust_remote_code\s*=\s*True", code):
                unsafe.append(f"{path.relative_to(REPO)}:{number}: trust_remote_code=True")
    assert unsafe == []
