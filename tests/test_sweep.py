"""`sfn sweep`: grid parsing, the validation split, best-point choice, resumable points and `--plan` commands that
launch (the commands and the sbatch script are run as printed, then `--collect` reads what they trained)."""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys

import pytest

from helpers import train_recipe
from sfn_train.errors import SfnError
from sfn_train.sweep import choose_best, grid_points, parse_grid


def test_grid_is_the_product_in_order():
    grid = parse_grid(["learning_rate=1e-4,3e-4", "trainable_modules=o_proj,q_proj k_proj,all"])
    points = grid_points(grid)
    assert [p.label for p in points] == [
        "learning_rate=1e-4 trainable_modules=o_proj", "learning_rate=1e-4 trainable_modules=q_proj k_proj",
        "learning_rate=1e-4 trainable_modules=all", "learning_rate=3e-4 trainable_modules=o_proj",
        "learning_rate=3e-4 trainable_modules=q_proj k_proj", "learning_rate=3e-4 trainable_modules=all"]
    assert points[1].flags() == ["--learning_rate", "1e-4", "--trainable_modules", "q_proj", "k_proj"]
    assert points[1].name == "learning_rate-1e-4__trainable_modules-q_proj_k_proj"
    assert points[1].variant() == "trainable_modules=q_proj k_proj"  # the learning rate is not part of a variant
    assert len({p.name for p in points}) == 6


@pytest.mark.parametrize("specs, says", [
    (["learning_rate"], "must be KEY=V1,V2"),
    (["learning_rate=1e-4,,3e-4"], "empty value"),
    (["learning_rate=1e-4,1e-4"], "repeats a value"),
    (["learning_rate=1e-4", "learning_rate=3e-4"], "given twice"),
    (["output_dir=a,b"], "sets output_dir itself"),
    (["learning_rate=fast"], "not a number"),
    ([], "no --grid"),
])
def test_bad_grids_are_one_clear_error(specs, says):
    with pytest.raises(SfnError, match=says):
        parse_grid(specs)


def test_best_point_per_variant():
    rows = [{"variant": v, "eval_loss": loss, "eval_mean_token_accuracy": acc, "name": f"{v}{loss}"}
            for v, loss, acc in [("a", math.nan, 0.1), ("a", 0.5, 0.7), ("a", 0.3, 0.6),
                                 ("b", 0.9, 0.9), ("b", None, 0.2), ("b", 0.95, 0.1)]]
    best = choose_best(rows, "eval_loss")
    assert {v: r["eval_loss"] for v, r in best.items()} == {"a": 0.3, "b": 0.9}  # NaN and missing never win
    best = choose_best(rows, "eval_mean_token_accuracy")  # accuracy: higher is better
    assert {v: r["eval_mean_token_accuracy"] for v, r in best.items()} == {"a": 0.7, "b": 0.9}


def test_validation_split_is_disjoint_from_training_and_from_the_test_tasks(tmp_path):
    """The lab's fine-tune data, split as its recipes declare: no row, and no problem, on both sides; none of the
    held-out test problems anywhere; the split ignores row order (so every sweep point validates on the same rows)."""
    import datasets
    import yaml

    from sfn_train.data import split_validation
    from sfn_train.evaluation.tasks import packaged_task_file
    from sfn_train.lab.pipeline import REPO_RECIPES, Lab

    Lab(tmp_path / "lab", size="tiny", seed=3).data()
    rows = [json.loads(line) for line in (tmp_path / "lab" / "data" / "sft_reasoning.jsonl").read_text().splitlines()]
    fraction = yaml.safe_load((REPO_RECIPES / "oproj.yaml").read_text())["validation_fraction"]
    train, val = split_validation(datasets.Dataset.from_list(rows), fraction)
    train_p, val_p = set(train["prompt"]), set(val["prompt"])
    assert val_p and train_p and not train_p & val_p and len(train) + len(val) == len(rows)
    tests = {json.loads(line)["problem"] for task in ("lab_reason", "lab_onestep")
             for line in packaged_task_file(task).read_text().splitlines()}
    assert not (train_p | val_p) & tests
    _, val_shuffled = split_validation(datasets.Dataset.from_list(rows[::-1]), fraction)
    assert set(val_shuffled["prompt"]) == val_p
    with pytest.raises(SfnError, match="no validation"):
        split_validation(datasets.Dataset.from_list(rows[:2]), 1e-9)


def test_sweep_refuses_a_recipe_without_validation_split(tmp_path, qwen2_base, sum_data):
    from sfn_train.sweep import run_sweep

    recipe = train_recipe(tmp_path, qwen2_base, sum_data, max_steps=2)
    with pytest.raises(SfnError, match="declares no validation split"):
        run_sweep(str(recipe), ["learning_rate=1e-3,1e-2"], tmp_path / "sweep")
    with pytest.raises(SfnError, match="learnin_rate"):  # a misspelled grid key fails before anything trains
        run_sweep(str(recipe), ["learnin_rate=1e-3"], tmp_path / "sweep2")
    assert not (tmp_path / "sweep" / "points").exists()


def _manifest(out, name):
    return json.loads((out / "points" / name / "sfn_manifest.json").read_text())


@pytest.mark.slow
def test_sweep_runs_resumes_and_marks_the_best(tmp_path, qwen2_base, sum_data):
    from sfn_train.sweep import run_sweep

    recipe = train_recipe(tmp_path, qwen2_base, sum_data, max_steps=2, validation_fraction=0.25,
                          per_device_eval_batch_size=8)
    out = tmp_path / "sweep"
    said = []
    result = run_sweep(str(recipe), ["learning_rate=1e-3,1e-1"], out, ["--logging_steps", "1"], log=said.append)
    names = ["learning_rate-1e-3", "learning_rate-1e-1"]
    losses = {n: _manifest(out, n)["metrics"]["eval_loss"] for n in names}
    m = _manifest(out, names[0])["metrics"]
    assert m["validation_rows"] > 0 and m["train_rows"] + m["validation_rows"] == 32
    summary = json.loads((out / "sweep.json").read_text())
    best = min(losses, key=losses.get)
    assert [p["name"] for p in summary["points"] if p["best"]] == [best] and summary["best"] == {"": best}
    assert {p["name"]: p["eval_loss"] for p in summary["points"]} == losses
    assert f"| **best** |" in (out / "sweep.md").read_text() and (out / "sweep.png").stat().st_size > 0
    record = json.loads((out / "points" / best / "sfn_sweep.json").read_text())
    assert record["best"] and record["chosen_learning_rate"] == float(best.split("-", 1)[1])
    assert any("2/2" in line and "training" in line for line in said)  # progress: which point, how many left
    assert result["best"][""]["name"] == best

    # Resume: an unfinished point (manifest not complete) trains again, a finished one is skipped, and a value
    # added to the grid trains only its own point.
    manifest_path = out / "points" / names[0] / "sfn_manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "status": "running"}))
    finished = (out / "points" / names[1] / "model.safetensors").stat().st_mtime_ns
    said.clear()
    run_sweep(str(recipe), ["learning_rate=1e-3,1e-1,1e-2"], out, ["--logging_steps", "1"], log=said.append)
    trained = [line for line in said if ": training (" in line]
    assert len(trained) == 2 and "learning_rate=1e-3" in trained[0] and "learning_rate=1e-2" in trained[1]
    assert (out / "points" / names[1] / "model.safetensors").stat().st_mtime_ns == finished
    assert _manifest(out, names[0])["status"] == "complete"
    # ... and a deterministic rerun of the unfinished point gives the same validation loss
    assert _manifest(out, names[0])["metrics"]["eval_loss"] == losses[names[0]]

    # `sfn compare` states each swept model's rate and how it was chosen, next to its test result.
    from sfn_train.evaluation import compare, evaluate
    from sfn_train.evaluation.tasks import write_problems

    task = write_problems(tmp_path / "t.jsonl", [{"id": "1", "problem": "Start at 1. Apply +1 +1. Work mod 10.",
                                                   "answer": "3"}])
    winner = json.loads((out / "sweep.json").read_text())["best"][""]  # of the 3 rates now in the sweep
    loser = next(n for n in names if n != winner)
    files = evaluate([{"path": str(out / "points" / n), "label": n} for n in (winner, loser)], [str(task)],
                     tmp_path / "ev", answer_type="exact", max_new_tokens=4, temperature=0.0, progress=False,
                     grading_workers=1)
    text = compare(files, loser, tmp_path / "cmp.md")["report"].read_text()
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.split("## Learning rates")[1].splitlines()
            if line.startswith("| learning_rate-")}
    assert "lowest validation eval_loss" in rows[winner] and "of 3 rates" in rows[winner]
    assert "did NOT win its sweep" in rows[loser]

    # Another sweep into the same folder with other flags is refused instead of mixing results.
    with pytest.raises(SfnError, match="other flags"):
        run_sweep(str(recipe), ["learning_rate=1e-3"], out, ["--logging_steps", "2"])


@pytest.mark.slow
def test_plan_prints_commands_that_launch_and_collect_reads_them(tmp_path, qwen2_base, sum_data):
    recipe = train_recipe(tmp_path, qwen2_base, sum_data, max_steps=2, validation_fraction=0.25)
    out = tmp_path / "planned"
    sfn = [sys.executable, "-m", "sfn_train.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    plan = subprocess.run([*sfn, "sweep", "--config", str(recipe), "--grid", "learning_rate=1e-3,1e-2",
                           "--out", str(out), "--plan"], capture_output=True, text=True, env=env, check=True)
    commands = [line for line in plan.stdout.splitlines() if not line.startswith("#")]
    assert len(commands) == 2 and all("--output_dir" in c for c in commands)
    memory = [line for line in plan.stdout.splitlines() if ": memory: predicted peak " in line]
    assert [m.split(":")[0] for m in memory] == ["# learning_rate-1e-3", "# learning_rate-1e-2"], plan.stdout
    assert memory[0].split(":", 1)[1] == memory[1].split(":", 1)[1]  # one prediction: the rate changes no memory
    assert not (out / "points").exists()  # nothing trained
    # the first point exactly as printed; the second through the sbatch array script, as slurm would run it
    subprocess.run(commands[0], shell=True, check=True, env=env, capture_output=True)
    script = out / "sweep_array.sbatch"
    assert "#SBATCH --array=0-1" in script.read_text()
    subprocess.run(["bash", str(script)], check=True, env={**env, "SLURM_ARRAY_TASK_ID": "1"}, capture_output=True)
    collected = subprocess.run([*sfn, "sweep", "--collect", str(out)], capture_output=True, text=True, env=env,
                               check=True)
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["finished"] == 2 and not summary["missing"] and sum(p["best"] for p in summary["points"]) == 1
    assert "**best**" in collected.stdout
    for entry in summary["points"]:  # what ran is what was printed
        launched, printed = shlex.split(_manifest(out, entry["name"])["command"]), shlex.split(entry["command"])
        assert launched[launched.index("--config"):] == printed[printed.index("--config"):]


def test_seeded_grid_and_the_best_point_on_the_mean_over_seeds():
    from sfn_train.sweep import parse_seeds, seed_points

    points = grid_points(parse_grid(["learning_rate=1e-3,1e-2"]), parse_seeds("42,7"))
    assert [p.name for p in points] == ["learning_rate-1e-3__seed-42", "learning_rate-1e-3__seed-7",
                                        "learning_rate-1e-2__seed-42", "learning_rate-1e-2__seed-7"]
    assert points[1].flags() == ["--learning_rate", "1e-3", "--seed", "7"] and points[1].point == "learning_rate-1e-3"
    # 1e-2 has the single best run (0.1) but the worse mean; 3e-2 has the best run of all but one seed missing
    losses = {("1e-3", 42): 0.40, ("1e-3", 7): 0.42, ("1e-2", 42): 0.10, ("1e-2", 7): 0.90, ("3e-2", 42): 0.05}
    rows = [{"name": f"lr{lr}__seed-{s}", "point": f"lr{lr}", "seed": s, "settings": {"learning_rate": lr},
             "variant": "", "learning_rate": float(lr), "status": "done", "eval_loss": v,
             "eval_mean_token_accuracy": 0.5, "train_loss": 1.0, "train_runtime_s": 2.0, "validation_rows": 8,
             "train_rows": 24} for (lr, s), v in losses.items()]
    rows.append({**rows[-1], "name": "lr3e-2__seed-7", "seed": 7, "status": "missing", "eval_loss": None})
    ranked = {r["name"]: r for r in seed_points(rows, "eval_loss", [42, 7])}
    assert ranked["lr1e-3"]["eval_loss"] == pytest.approx(0.41) and ranked["lr1e-2"]["eval_loss"] == pytest.approx(0.5)
    assert ranked["lr1e-2"]["eval_loss_sd"] == pytest.approx(0.8 / math.sqrt(2))
    assert (ranked["lr1e-2"]["eval_loss_min"], ranked["lr1e-2"]["eval_loss_max"]) == (0.1, 0.9)
    assert ranked["lr3e-2"]["eval_loss"] is None and ranked["lr3e-2"]["n_seeds"] == 1
    assert choose_best(list(ranked.values()), "eval_loss")[""]["name"] == "lr1e-3"
    with pytest.raises(SfnError, match="repeats a seed"):
        parse_seeds("1,1")
    with pytest.raises(SfnError, match="whole numbers"):
        parse_seeds("1,x")


@pytest.mark.slow
def test_seeded_sweep_trains_each_point_per_seed_and_resumes_per_seed(tmp_path, qwen2_base, sum_data):
    """Three tiny runs: one point on seeds 1 and 2, then seed 3 added (the choice on the mean: the test above)."""
    from sfn_train.sweep import run_sweep

    recipe = train_recipe(tmp_path, qwen2_base, sum_data, max_steps=2, validation_fraction=0.25,
                          per_device_eval_batch_size=8)
    out = tmp_path / "sweep"
    result = run_sweep(str(recipe), ["learning_rate=1e-1"], out, seeds=[1, 2], log=lambda _: None)
    runs = {r["seed"]: r for r in result["rows"]}
    assert sorted(runs) == [1, 2] and all(r["status"] == "done" for r in runs.values())
    for seed, r in runs.items():  # each run trained at its own seed, and its manifest says so
        assert _manifest(out, r["name"])["recipe"]["training"]["seed"] == seed
    assert runs[1]["eval_loss"] != runs[2]["eval_loss"]  # the seed changed the run
    (point,) = result["seed_points"]
    assert point["eval_loss"] == pytest.approx((runs[1]["eval_loss"] + runs[2]["eval_loss"]) / 2)
    assert result["best"][""] is point and point["n_seeds"] == 2
    assert "Each point trained on seeds 1, 2" in (out / "sweep.md").read_text()
    record = json.loads((out / "points" / "learning_rate-1e-1__seed-2" / "sfn_sweep.json").read_text())
    assert record["best"] and record["value"] == pytest.approx(point["eval_loss"]) and record["n_seeds"] == 2
    assert record["run_value"] == runs[2]["eval_loss"]

    # one more seed: only the new (point, seed) run trains
    said = []
    result = run_sweep(str(recipe), ["learning_rate=1e-1"], out, seeds=[1, 2, 3], log=said.append)
    trained = [line for line in said if ": training (" in line]
    assert len(trained) == 1 and "seed=3" in trained[0] and result["seed_points"][0]["n_seeds"] == 3


FAKE_TRAIN = """
import os, time
open(os.environ["FAKE_TRAIN_PID"], "w").write(str(os.getpid()))
try:
    time.sleep(120)  # a long training run
except KeyboardInterrupt:  # what sfn train does on SIGINT: stop as after Ctrl-C (its folder resumable), exit 130
    open(os.environ["FAKE_TRAIN_PID"] + ".stopped", "w").write("SIGINT")
    raise SystemExit(130)
"""


def test_sigint_to_the_sweep_stops_its_training_child(tmp_path, qwen2_base, sum_data):
    """`kill -INT <sweep>` reaches the sweep alone (not its process group, as Ctrl-C would): its child must stop too,
    and by SIGINT, so that `sfn train` ends as after Ctrl-C (manifest `running`, resumed by the same command)."""
    import contextlib
    import signal
    import time

    from helpers import REPO

    fake = tmp_path / "fake_train.py"
    fake.write_text(FAKE_TRAIN)
    pid_file = tmp_path / "child.pid"
    recipe = train_recipe(tmp_path, qwen2_base, sum_data, max_steps=2, validation_fraction=0.25)
    sweep = subprocess.Popen(
        [sys.executable, "-m", "sfn_train.cli", "sweep", "--config", str(recipe), "--grid", "learning_rate=1e-3,1e-2",
         "--out", str(tmp_path / "sweep"), "--launcher", f"{sys.executable} {fake}"],
        env={**os.environ, "PYTHONPATH": str(REPO), "FAKE_TRAIN_PID": str(pid_file)}, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True)
    child = None
    try:
        deadline = time.monotonic() + 120
        while not (pid_file.exists() and pid_file.read_text()):
            assert sweep.poll() is None and time.monotonic() < deadline, sweep.stderr.read()[-2000:]
            time.sleep(0.1)
        child = int(pid_file.read_text())
        sweep.send_signal(signal.SIGINT)
        assert sweep.wait(timeout=60) != 0
        for _ in range(100):  # reaped by the sweep: gone from /proc
            if not os.path.exists(f"/proc/{child}"):
                break
            time.sleep(0.1)
        assert not os.path.exists(f"/proc/{child}"), "the sweep ended but its training child runs on"
        assert (tmp_path / "child.pid.stopped").read_text() == "SIGINT"
    finally:
        for pid in (sweep.pid, child):
            if pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
