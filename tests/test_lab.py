"""The lab end to end at its tiny size (the real pipeline, reduced), its sweep mode, and the shipped lab tasks."""

from __future__ import annotations

import json
import re

import pytest

from sfn_train.evaluation.tasks import packaged_task_file
from sfn_train.lab.problems import all_single_steps, fact_rows, generate, shipped_tasks, sft_rows


def test_shipped_tasks_are_what_the_generator_makes():
    for name, rows in shipped_tasks().items():
        assert [json.loads(line) for line in packaged_task_file(name).read_text().splitlines()] == rows


def test_problems_are_correct_and_distinct():
    problems = generate(300, (2, 3, 4), seed=7)
    assert len({p.text for p in problems}) == 300
    for p in problems:
        value = p.start
        for op, x in p.steps:
            value = {"add": value + x, "sub": value - x, "mul": value * x}[op] % 10
        assert p.answer == str(value) and p.trace.endswith(f"\\boxed{{{value}}}.")


def test_base_model_is_taught_the_steps_in_the_notation_of_the_traces():
    """Facts are written exactly as the traces write a step, every one of the 260 equally often; one-step problems
    are answered with their step, chains directly."""
    assert len({p.text for p in all_single_steps()}) == 260
    rows = fact_rows(520, seed=1)
    written = [step for r in rows for step in r["completion"].split(" ")]
    counts = {step: written.count(step) for step in set(written)}
    assert len(counts) == 260 and max(counts.values()) - min(counts.values()) <= 1
    # several facts a row, so a fact's place varies and A learns to compute it from the `a*x=` written before it
    assert {len(r["completion"].split(" ")) for r in rows} == {1, 2, 3}
    trace_steps = {s for p in generate(200, (2, 3), seed=2) for s in p.trace.split(" ")[:-4]}
    assert trace_steps <= set(counts)  # every step a trace writes is a fact A was taught, verbatim
    one, chain = generate(1, (1,), seed=3)[0], generate(1, (3,), seed=3)[0]
    assert sft_rows([one, chain], "pretrain") == [{"prompt": one.text, "completion": one.trace},
                                                  {"prompt": chain.text, "completion": chain.direct}]


@pytest.fixture(scope="module")
def tiny_lab_root(tmp_path_factory):
    """Data and base model A of a tiny lab, shared by the tests below (stages are cached by their inputs)."""
    from sfn_train.lab.pipeline import Lab

    root = tmp_path_factory.mktemp("lab") / "lab"
    lab = Lab(root, size="tiny", seed=3)
    lab.data()
    lab.base()
    return root


@pytest.mark.slow
def test_tiny_lab_end_to_end(tiny_lab_root):
    from sfn_train.lab.pipeline import Lab

    root = tiny_lab_root
    report = Lab(root, size="tiny", seed=3).run()
    text = report.read_text()
    data = root / "data"
    # no held-out problem leaks into training
    train_texts = {json.loads(line)["prompt"] for f in ("pretrain.jsonl", "sft_reasoning.jsonl")
                   for line in (data / f).read_text().splitlines()}
    assert not train_texts & {r["problem"] for rows in shipped_tasks().values() for r in rows}
    # the report's numbers are the eval files' numbers
    tables = text.split("## Fine-tunes on reasoning traces")[1]
    for label in ("A", "full", "oproj", "f1", "f2", "f3", "m1_oproj"):
        result = json.loads((root / "evals" / f"{label}__lab_reason.json").read_text())
        s = result["summary"]
        row = next(line for line in tables.splitlines() if line.startswith(f"| {label} |"))
        assert f"{s['pass_at_1']:.3f} [{s['ci_low']:.3f}, {s['ci_high']:.3f}]" in row
    onestep = json.loads((root / "evals" / "A__lab_onestep.json").read_text())["summary"]
    assert f"{onestep['pass_at_1']:.3f} [{onestep['ci_low']:.3f}" in text
    manifest = json.loads((root / "runs" / "oproj" / "sfn_manifest.json").read_text())
    row = next(line for line in tables.splitlines() if line.startswith("| oproj |"))
    assert f"{manifest['selection']['trainable_params']:,}" in row
    # each variant at the rate its recipe ships, with the validation loss its run measured on held-out traces
    record = json.loads((root / "lab_run.json").read_text())
    rate_row = next(line for line in text.split("## Learning rates")[1].splitlines() if line.startswith("| oproj |"))
    assert f"| {manifest['recipe']['training']['learning_rate']:g} | recipe | {manifest['metrics']['eval_loss']:.4f}" \
        in rate_row and record["variants"]["oproj"]["chosen_by"] == "recipe"
    assert "## What this run found" in text and "## What the lab can and cannot show" in text
    assert (root / "compare.md").exists() and (root / "compare_accuracy.png").stat().st_size > 0
    assert re.search(r"\| zero \| (I|II|III|IV) \(", text)
    # every stage is cached: a second run redoes nothing
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*.safetensors")}
    Lab(root, size="tiny", seed=3).run()
    assert before == {p: p.stat().st_mtime_ns for p in root.rglob("*.safetensors")}


@pytest.mark.slow
def test_tiny_lab_sweep_mode_uses_the_best_point(tiny_lab_root):
    """`sfn lab --sweep`: the variant's model is the point its own sweep ranked best on validation loss."""
    from sfn_train.lab.pipeline import SIZES, Lab

    lab = Lab(tiny_lab_root, size="tiny", seed=3, sweep=True, variants=("oproj",))
    lab.data()
    lab.base()
    trained = lab.finetunes()["oproj"]
    summary = json.loads((tiny_lab_root / "sweeps" / "oproj" / "sweep.json").read_text())
    losses = {p["learning_rate"]: p["eval_loss"] for p in summary["points"]}
    assert sorted(losses) == sorted(SIZES["tiny"].sweep_rates)
    assert trained["learning_rate"] == min(losses, key=losses.get) and trained["chosen_by"] == "sweep"
    assert json.loads((tiny_lab_root.joinpath(trained["folder"]) / "sfn_sweep.json").read_text())["best"]
    assert trained["recipe_rate"] == lab.trained["oproj"]["recipe_rate"] > 0
    # the report's learning-rate section shows the sweep that chose the rate, with its plot
    from sfn_train.lab.report import _rates_section

    text = "\n".join(_rates_section(tiny_lab_root, {"variants": {"oproj": lab.trained["oproj"]}}))
    row = next(line for line in text.splitlines() if line.startswith("| oproj |"))
    assert f"| {trained['learning_rate']:g} | its sweep (lowest validation loss) |" in row
    assert "### Sweep of `oproj`" in text and text.count("**best**") == 1
    assert (tiny_lab_root / "sweeps.png").stat().st_size > 0
