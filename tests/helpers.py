"""Helpers the tests share (imported as `from helpers import ...`; fixtures stay in conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def write_recipe(path: Path, **keys) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(keys, sort_keys=False))
    return path


def train_recipe(tmp_path: Path, base: Path, data: Path, **overrides) -> Path:
    """A small, fast recipe: 4 steps at a high learning rate so every trained tensor visibly moves."""
    keys = dict(
        model_name_or_path=str(base),
        dataset_name=str(data),
        output_dir=str(tmp_path / "out"),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1.0e-2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=0,
        max_length=256,
        memory_plan=False,  # the start-up memory plan (~1.5 s a run here) is tested in test_train.py/test_memory.py
    )
    keys.update(overrides)
    return write_recipe(tmp_path / "recipe.yaml", **keys)


def load_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        if file.name != "sfn_plugin.safetensors":
            tensors.update(load_file(file))
    return tensors


def changed_tensors(before: Path, after: Path) -> tuple[set[str], set[str]]:
    """(names whose values changed, names bitwise identical) between two checkpoints with the same tensors."""
    import torch

    a, b = load_tensors(before), load_tensors(after)
    assert set(a) == set(b), f"tensor names differ: {set(a) ^ set(b)}"
    changed = {n for n in a if not torch.equal(a[n], b[n])}
    return changed, set(a) - changed


def one_line_error(capsys) -> str:
    """The single `sfn CMD: error: ...` line of a failed command (progress bars may precede it; no traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("sfn ")]
    assert len(lines) == 1, f"expected one error line, got: {lines}"
    assert ": error: " in lines[0]
    return lines[0]


def run_with_callbacks(recipe: Path, *callbacks, flags: tuple[str, ...] = ()) -> Path:
    """`sfn train --config recipe` in this process, with Trainer callbacks that watch what the run does."""
    from sfn_train.config import parse_recipe
    from sfn_train.train import run_sft

    return run_sft(*parse_recipe(["--config", str(recipe), *flags]), callbacks=list(callbacks))


def assert_resumes_from_step_2(tmp_path: Path, base: Path, data: Path, reference: Path, selected: set[str],
                                **save) -> Path:
    """Resume a copy of `reference`'s checkpoint-2 (a 4-step run) in a fresh output folder and check what ran.

    Training is deterministic, so a run that silently restarted from step 0 would end on the same weights: the steps
    that ran (watched from the Trainer's state and read from the run's manifest) are what shows it resumed; it must
    also train only `selected` and end bitwise on the reference run's weights.
    """
    import shutil

    import torch

    out = tmp_path / "resumed" / "out"
    out.mkdir(parents=True)
    shutil.copytree(reference / "checkpoint-2", out / "checkpoint-2")
    watcher = step_watcher()
    run_with_callbacks(train_recipe(tmp_path / "resumed", base, data, resume_from_checkpoint="true", **save), watcher)
    assert (watcher.start_step, watcher.steps) == (2, 2)
    steps = json.loads((out / "sfn_manifest.json").read_text())["engine"]["steps"]
    assert steps == {"resumed_at": 2, "run_in_this_process": 2}  # the run's own record says the same
    resumed, expected = load_tensors(out), load_tensors(reference)
    assert changed_tensors(base, out)[0] == selected
    assert all(torch.equal(resumed[n], expected[n]) for n in expected)
    return out


def step_watcher(names=()):
    """A Trainer callback recording, from the Trainer's own state: the step training started at, the optimizer steps
    it ran, and (at the end) a copy of the live model's parameters named in `names`.

    Independent of what sfn_train records about itself, so a test can hold the run's record against it.
    """
    from transformers import TrainerCallback

    class StepWatcher(TrainerCallback):
        start_step = None
        steps = 0
        final: dict = {}

        def on_train_begin(self, args, state, control, **kwargs):
            self.start_step = state.global_step

        def on_step_end(self, args, state, control, **kwargs):
            self.steps += 1

        def on_train_end(self, args, state, control, model=None, **kwargs):
            self.final = {n: p.detach().to("cpu").clone() for n, p in model.named_parameters() if n in set(names)}

    return StepWatcher()


# What a training run leaves next to its weights besides what defines the model; a checkpoint made from such a folder
# (a 4-bit run's output, a merge, destroy or plugin apply) must carry none of it. Values are what no run here writes.
RUN_RECORDS = {
    "trainer_state.json": '{"global_step": 476, "log_history": [{"loss": 9.99, "step": 476}]}',
    "all_results.json": '{"train_loss": 9.99}',
    "train_results.json": '{"train_loss": 9.99}',
    "README.md": "# model card of another run\n",
    "sfn_manifest.json": '{"status": "complete", "note": "the base run\'s manifest"}',
    "training_args.bin": "not a pickle",
}


def with_run_records(checkpoint: Path, folder: Path) -> Path:
    """A copy of `checkpoint` as a finished training run leaves it: weights, model files and RUN_RECORDS."""
    import shutil

    shutil.copytree(checkpoint, folder)
    for name, text in RUN_RECORDS.items():
        (folder / name).write_text(text)
    return folder
