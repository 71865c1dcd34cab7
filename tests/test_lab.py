"""The lab end to end at its tiny size (the real pipeline, reduced), and the shipped lab tasks."""

from __future__ import annotations

import json
import re

import pytest

from sfn_train.evaluation.tasks import packaged_task_file
from sfn_train.lab.problems import generate, shipped_tasks


def test_shipped_tasks_are_what_the_generator_makes():
    for name, rows in shipped_tasks().items():
        assert [json.loads(l) for l in packaged_task_file(name).read_text().splitlines()] == rows


def test_problems_are_correct_and_distinct():
    problems = generate(300, (2, 3, 4), seed=7)
    assert len({p.text for p in problems}) == 300
    for p in problems:
        value = p.start
        for op, x in p.steps:
            value = {"add": value + x, "sub": value - x, "mul": value * x}[op] % 10
        assert p.answer == str(value) and p.trace.endswith(f"\\boxed{{{value}}}.")


@pytest.mark.slow
def test_tiny_lab_end_to_end(tmp_path):
    from sfn_train.lab.pipeline import Lab

    lab = Lab(tmp_path / "lab", size="tiny", seed=3)
    report = lab.run()
    text = report.read_text()
    data = tmp_path / "lab" / "data"
    # no held-out problem leaks into training
    train_texts = {json.loads(l)["prompt"] for f in ("pretrain_direct.jsonl", "sft_reasoning.jsonl")
                   for l in (data / f).read_text().splitlines()}
    assert not train_texts & {r["problem"] for rows in shipped_tasks().values() for r in rows}
    # the report's numbers are the eval files' numbers
    for label in ("A", "full", "oproj", "f1", "f2", "f3", "m1_oproj"):
        result = json.loads((tmp_path / "lab" / "evals" / f"{label}__lab_reason.json").read_text())
        s = result["summary"]
        row = next(l for l in text.splitlines() if l.startswith(f"| {label} |"))
        assert f"{s['pass_at_1']:.3f} [{s['ci_low']:.3f}, {s['ci_high']:.3f}]" in row
    manifest = json.loads((tmp_path / "lab" / "runs" / "oproj" / "sfn_manifest.json").read_text())
    row = next(l for l in text.splitlines() if l.startswith("| oproj |"))
    assert f"{manifest['selection']['trainable_params']:,}" in row
    assert "## What this run found" in text and (tmp_path / "lab" / "compare.md").exists()
    assert re.search(r"\| zero \| (I|II|III|IV) \(", text)
    # every stage is cached: a second run redoes nothing
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "lab").rglob("*.safetensors")}
    Lab(tmp_path / "lab", size="tiny", seed=3).run()
    assert before == {p: p.stat().st_mtime_ns for p in (tmp_path / "lab").rglob("*.safetensors")}
