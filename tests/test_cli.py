"""The `sfn` command line as git/pip users expect it: --version, "did you mean", usage on a bare command, a short
`sfn train --help`, no abbreviated flags anywhere, and errors that name the flag the user typed."""

from __future__ import annotations

import re

import pytest

from helpers import one_line_error, train_recipe
from sfn_train.cli import main


def test_version_and_a_mistyped_command(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("sfn ")
    assert main(["trian"]) == 2
    assert "unknown command 'trian' (did you mean train?)" in capsys.readouterr().err
    assert main([]) == 2  # a bare `sfn`: the usage on stderr and a failure status
    assert "usage: sfn COMMAND" in capsys.readouterr().err


def test_train_usage_and_help(capsys):
    assert main(["train"]) == 2
    err = capsys.readouterr().err
    assert "usage: sfn train --config RECIPE.yaml [--key value ...]" in err and "--help-all" in err
    assert main(["train", "--help"]) == 0
    short = capsys.readouterr().out
    assert short.startswith("usage: sfn train --config RECIPE.yaml")
    assert "--trainable_modules" in short and "--learning_rate" in short and "sfn train --help-all" in short
    assert len(short.splitlines()) < 60
    assert main(["train", "--help-all"]) == 0
    full = capsys.readouterr().out
    assert full.startswith("usage: sfn train --config RECIPE.yaml") and len(full.splitlines()) > 300


@pytest.mark.parametrize("flags, expected", [
    (["--learning-rat", "1e-3"], "unknown flag(s) --learning-rat (did you mean --learning-rate?)"),
    (["--max_step", "2"], "unknown flag(s) --max_step (did you mean --max_steps?)"),
])
def test_train_flags_are_not_abbreviated(tmp_path, capsys, qwen2_base, sum_data, flags, expected):
    recipe = train_recipe(tmp_path, qwen2_base, sum_data)
    assert main(["train", "--config", str(recipe), *flags]) == 2
    assert expected in one_line_error(capsys)
    assert not (tmp_path / "out").exists()


def test_other_commands_refuse_abbreviations_in_one_line(tmp_path, capsys, qwen2_base):
    assert main(["lab", "--siz", "tiny", "--root", str(tmp_path / "lab")]) == 2
    assert "unknown flag(s) --siz (did you mean --size?)" in one_line_error(capsys)
    assert main(["merge", str(qwen2_base), str(qwen2_base), "--out", str(tmp_path / "m"), "--layer", "0"]) == 2
    assert "unknown flag(s) --layer (did you mean --layers?)" in one_line_error(capsys)
    assert main(["select", str(qwen2_base), "--modules", "o_proj", "--layers"]) == 2  # argparse's own error, one line
    assert "argument --layers: expected one argument; see `sfn select --help`" in one_line_error(capsys)
    assert not (tmp_path / "lab").exists() and not (tmp_path / "m").exists()


def test_gadget_layer_errors_name_the_flag(tmp_path, capsys, qwen2_base):
    assert main(["merge", str(qwen2_base), str(qwen2_base), "--out", str(tmp_path / "m"), "--layers", "0-13"]) == 2
    line = one_line_error(capsys)
    assert "--layers [4, 5, 6, 7, 8, 9, 10, 11, 12, 13] out of range" in line and "trainable_layers" not in line


def test_a_missing_model_fails_at_once(tmp_path, capsys, monkeypatch, qwen2_base, sum_data):
    """A path-looking name that does not exist is not looked up on the hub (56 s of retries before); offline, a hub
    id not in the cache says HF_HUB_OFFLINE=1 and how to pass a local folder."""
    import time

    monkeypatch.chdir(tmp_path)
    (tmp_path / "lab" / "base").mkdir(parents=True)
    recipe = train_recipe(tmp_path, qwen2_base, sum_data, model_name_or_path="lab/bse")
    started = time.monotonic()
    assert main(["train", "--config", str(recipe)]) == 2
    assert "model_name_or_path lab/bse does not exist (did you mean base?)" in one_line_error(capsys)
    assert time.monotonic() - started < 10 and not (tmp_path / "out").exists()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["select", "no-such-org/no-such-model"]) == 2
    line = one_line_error(capsys)
    assert "neither a local folder nor in the hub cache, and HF_HUB_OFFLINE=1" in line and "local checkpoint folder" \
        in line


def test_a_training_run_prints_decisions_and_its_validation_loss_without_library_noise(tmp_path, qwen2_base,
                                                                                        sum_data):
    """The console of `sfn train` (a real process: the libraries' import-time lines are printed once per process):
    no DeepSpeed "Setting accelerator to CPU" nor bitsandbytes "Failed to load CPU gemm_4bit_forward" on a CPU run
    that uses neither, the batching decisions one short line each, and the validation eval_loss at the end."""
    import os
    import subprocess
    import sys

    from helpers import REPO

    recipe = train_recipe(tmp_path, qwen2_base, sum_data, max_steps=1, validation_fraction=0.25, disable_tqdm=True)
    proc = subprocess.run([sys.executable, "-m", "sfn_train.cli", "train", "--config", str(recipe)], text=True,
                          capture_output=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert "Setting accelerator to CPU" not in output and "gemm_4bit_forward" not in output
    batching = [line for line in output.splitlines() if "sfn_train: batching" in line]
    assert len(batching) >= 2 and all(len(line) < 250 for line in batching), batching
    assert re.search(r"sfn_train: validation \(\d+ rows, final weights\): eval_loss \d", output)


def test_lab_stopped_before_its_report_names_no_report(tmp_path, capsys):
    assert main(["lab", "--size", "tiny", "--root", str(tmp_path / "lab"), "--stage", "data"]) == 0
    out = capsys.readouterr().out
    assert "report:" not in out and not (tmp_path / "lab" / "report.md").exists()
    assert f"done: stages data in {tmp_path / 'lab'}" in out
