"""The `sfn` command line as git/pip users expect it: --version, "did you mean", usage on a bare command, a short
`sfn train --help`, no abbreviated flags anywhere, and errors that name the flag the user typed."""

from __future__ import annotations

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
