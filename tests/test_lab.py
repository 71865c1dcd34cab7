"""The lab end to end at its tiny size (the real pipeline, reduced), its sweep mode, and the shipped lab tasks."""

from __future__ import annotations

import json
import re
import shutil

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
    from sfn_train.lab.pipeline import REPO_RECIPES, Lab, recipe_rate_note

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
    note = recipe_rate_note((REPO_RECIPES / "oproj.yaml").read_text())
    assert note.startswith("chosen by `sfn lab --sweep`")  # the row names the sweep that chose the shipped rate
    assert f"| {manifest['recipe']['training']['learning_rate']:g} | the recipe: {note} | " \
        f"{manifest['metrics']['eval_loss']:.4f}" in rate_row and record["variants"]["oproj"]["chosen_by"] == "recipe"
    assert "## What this run found" in text and "## What the lab can and cannot show" in text
    assert (root / "compare.md").exists() and (root / "compare_accuracy.png").stat().st_size > 0
    assert re.search(r"\| zero \| (I|II|III|IV) \(", text)
    # every stage is cached: a second run redoes nothing (the report is rewritten from the record)
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*.safetensors")}
    again = Lab(root, size="tiny", seed=3)
    again.run()
    assert again.ran == [] and before == {p: p.stat().st_mtime_ns for p in root.rglob("*.safetensors")}


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


@pytest.mark.slow
def test_tiny_lab_sweep_is_kept_when_only_the_recipes_rate_or_comments_change(tiny_lab_root, tmp_path):
    """Shipping the rate a sweep chose (and a comment naming that sweep) edits the recipe: the sweep that chose it
    must stay cached, while a recipe-rate run must train again at the new rate."""
    from sfn_train.lab.pipeline import REPO_RECIPES, Lab

    Lab(tiny_lab_root, size="tiny", seed=3, sweep=True, variants=("oproj",)).run(["finetune"])
    recipes = tmp_path / "recipes"
    shutil.copytree(REPO_RECIPES, recipes)
    text = (recipes / "oproj.yaml").read_text()
    edited = re.sub(r"(?m)^learning_rate: .*$", "learning_rate: 0.5   # chosen by a sweep", "# a new comment\n" + text)
    assert edited != text
    (recipes / "oproj.yaml").write_text(edited)
    weights = {p: p.stat().st_mtime_ns for p in (tiny_lab_root / "sweeps").rglob("*.safetensors")}
    assert weights
    lines = []
    lab = Lab(tiny_lab_root, size="tiny", seed=3, recipes=recipes, sweep=True, variants=("oproj",), log=lines.append)
    lab.run(["finetune"])
    assert lab.ran == [] and any(line.endswith("sweep:oproj (" + str(tiny_lab_root / "sweeps" / "oproj")
                                                + "): done before, skipped") for line in lines)
    assert lab.trained["oproj"]["recipe_rate"] == 0.5
    assert weights == {p: p.stat().st_mtime_ns for p in (tiny_lab_root / "sweeps").rglob("*.safetensors")}
    # without --sweep the rate is what the stage trains at: a new rate is a new stage, a new comment is not
    shipped, rerated = (Lab(tiny_lab_root, size="tiny", seed=3, recipes=r) for r in (REPO_RECIPES, recipes))
    for lab in (shipped, rerated):
        lab.hashes.update(data="d", base="b")
    assert shipped.finetune_inputs("oproj") != rerated.finetune_inputs("oproj")
    (recipes / "oproj.yaml").write_text("# only a comment changed\n" + text)
    assert shipped.finetune_inputs("oproj") == rerated.finetune_inputs("oproj")


def test_report_limits_quote_the_widest_interval_and_name_variants_at_the_ceiling():
    """A variant at 1.000 has a narrow interval: the resolution must not be quoted from it alone, and the report must
    say the test cannot rank variants that solve everything."""
    from sfn_train.lab.report import _limits

    def result(p, lo, hi):
        return {"summary": {"pass_at_1": p, "ci_low": lo, "ci_high": hi, "n_problems": 200}}

    results = {"A": result(0.17, 0.12, 0.22), "full": result(1.0, 0.981, 1.0), "f3": result(1.0, 0.981, 1.0),
               "oproj": result(0.465, 0.395, 0.535)}
    run = {"sweep": True, "variants": {v: {} for v in ("full", "oproj", "f3")}}
    lines = _limits(results, result(1.0, 0.963, 1.0), run, 854912, 42)
    resolution = next(line for line in lines if line.startswith("Resolution:"))
    assert "±0.07 (oproj at 0.465)" in resolution and "±0.01 (full at 1.000)" in resolution
    assert any(line.startswith("Ceiling: full, f3 solve every test problem") for line in lines)
    results["f3"] = result(0.9, 0.85, 0.94)
    results["full"] = result(0.95, 0.92, 0.98)
    assert not any(line.startswith("Ceiling:") for line in _limits(results, results["A"], run, 854912, 42))


@pytest.mark.slow
def test_tiny_lab_scale_stage_compares_sizes_from_their_own_labs(tiny_lab_root, monkeypatch):
    """`sfn lab --scale`: one lab per size; each point's numbers are that lab's eval files, the gap their paired
    difference, and the report shows the table and the plot."""
    from dataclasses import replace

    from sfn_train.evaluation import load_result
    from sfn_train.lab import pipeline
    from sfn_train.evaluation.tables import per_problem

    monkeypatch.setitem(pipeline.SIZES, "tiny_wide", replace(pipeline.SIZES["tiny"], hidden=96))
    report = pipeline.Lab(tiny_lab_root, size="tiny", seed=3).run(scale=["tiny", "tiny_wide"])
    points = {p["size"]: p for p in json.loads((tiny_lab_root / "lab_run.json").read_text())["scale"]["points"]}
    assert points["tiny_wide"]["params"] > points["tiny"]["params"]
    for size, root in (("tiny", tiny_lab_root), ("tiny_wide", tiny_lab_root / "scale" / "tiny_wide")):
        res = {v: load_result(root / "evals" / f"{v}__lab_reason.json") for v in ("A", "full", "oproj")}
        assert points[size]["pass_at_1"] == {v: r["summary"]["pass_at_1"] for v, r in res.items()}
        full, oproj = per_problem(res["full"]), per_problem(res["oproj"])
        assert points[size]["gap"] == pytest.approx(sum(full[i] - oproj[i] for i in full) / len(full))
    assert not (tiny_lab_root / "scale" / "tiny_wide" / "runs" / "f1").exists()  # the scale labs train full and oproj
    text = report.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| tiny_wide |"))
    assert f"| {points['tiny_wide']['params']:,} |" in row and (tiny_lab_root / "scale_gap.png").stat().st_size > 0


def test_scale_section_says_which_side_moved_and_flags_a_size_that_did_not_learn(tmp_path):
    from sfn_train.lab.report import _scale_section

    def point(size, params, a, full, oproj):
        return {"size": size, "params": params, "pass_at_1": {"A": a, "full": full, "oproj": oproj},
                "rates": {"full": 1e-3, "oproj": 1e-2}, "chosen_by": {"full": "sweep", "oproj": "sweep"},
                "gap": full - oproj, "gap_ci": [full - oproj - 0.05, full - oproj + 0.05], "p_value": 0.01,
                "seconds": 1.0}

    collapsed = "\n".join(_scale_section(tmp_path, {"points": [point("small", 1e6, 0.17, 1.0, 0.465),
                                                               point("medium", 3e6, 0.17, 0.24, 0.35)]}))
    assert "Most of the change is full fine-tuning's: full 1.000 -> 0.240, o_proj 0.465 -> 0.350." in collapsed
    assert "At medium, full fine-tuning gains only +0.070 over its A (vs +0.830 at small)" in collapsed
    caught_up = "\n".join(_scale_section(tmp_path, {"points": [point("small", 1e6, 0.17, 0.9, 0.4),
                                                               point("medium", 3e6, 0.17, 0.92, 0.85)]}))
    assert "Most of the change is o_proj-only tuning's" in caught_up and "gains only" not in caught_up
    assert (tmp_path / "scale_gap.png").stat().st_size > 0


@pytest.mark.slow
def test_tiny_lab_seeds_builds_data_and_base_once_and_trains_each_seed(tiny_lab_root, monkeypatch):
    """`sfn lab --seeds 2`: the lab's data and base (cached from the fixture: not rebuilt), then the lab study trains
    o_proj and full once per fine-tuning seed (3 and 4, from the one base), and its report compares them over seeds."""
    import sfn_train.study.pipeline
    from sfn_train.cli import main

    root = tiny_lab_root
    base = {p: p.stat().st_mtime_ns for p in (root / "base").rglob("*")}
    trained = []
    real = sfn_train.study.pipeline.run_training
    monkeypatch.setattr(sfn_train.study.pipeline, "run_training",
                        lambda command, folder, name, log_file: trained.append(name) or real(command, folder, name,
                                                                                             log_file))
    monkeypatch.setattr("sfn_train.lab.cli.default_jobs", lambda: 2)
    assert main(["lab", "--size", "tiny", "--seed", "3", "--root", str(root), "--seeds", "2"]) == 0
    assert base == {p: p.stat().st_mtime_ns for p in (root / "base").rglob("*")}
    assert sorted(trained) == ["full@3", "full@4", "oproj@3", "oproj@4"]  # 2 at a time (--jobs): in either order
    assert sorted(p.name for p in (root / "study" / "logs").iterdir()) == [f"train_{n}.log" for n in sorted(trained)]
    for name in trained:
        manifest = json.loads((root / "study" / "train" / name / "sfn_manifest.json").read_text())
        assert manifest["seed"] == int(name.split("@")[1])
        assert manifest["base"]["model_name_or_path"] == str(root / "base")
        assert manifest["recipe"]["script"]["dataset_name"] == str(root / "data" / "sft_reasoning.jsonl")
    report = (root / "study" / "report.md").read_text()
    assert "## Variants over seeds" in report and "| oproj | 2 |" in report and "| full | 2 |" in report
    assert "lab_reason: oproj over 2 seeds" in report
