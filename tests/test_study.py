"""`sfn study` end to end on two tiny checkpoints (B = a short full fine-tune of A, made here): one fine-tune, two
merges, a 2 x 2 destruction grid and a layer removal, delta and one task. One study run is shared by the tests of the
report, the cached rerun, the kill during evaluation and `--stage`; the schema and `--plan` tests need no models.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import REPO, one_line_error, write_recipe
from sfn_train.cli import main
from sfn_train.manifest import manifest_problems

STAGES = ["train:oproj", "merge:m1_oproj", "merge:m2_qkv", "destroy:zero_o_proj", "destroy:zero_up_proj",
          "destroy:reinit_o_proj", "destroy:reinit_up_proj", "destroy:remove", "delta:reasoning", "delta:oproj",
          "eval:base", "eval:reasoning", "eval:oproj", "eval:m1_oproj", "eval:m2_qkv", "eval:zero_o_proj",
          "eval:zero_up_proj", "eval:reinit_o_proj", "eval:reinit_up_proj", "eval:remove", "report"]
MODELS = ["base", "reasoning", "oproj", "m1_oproj", "m2_qkv", "zero_o_proj", "zero_up_proj", "reinit_o_proj",
          "reinit_up_proj", "remove"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """One torch thread (the training subprocess inherits it) and a fingerprint cache of the module's own."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        mp.setenv("SFN_FINGERPRINT_CACHE", str(tmp_path_factory.mktemp("fp") / "fingerprints.json"))
        yield


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, sum_data, env) -> dict:
    """A, B (4 full fine-tuning steps of A), the fine-tune's recipe, a 3-problem task and the study file."""
    from sfn_train.config import parse_recipe
    from sfn_train.lab.problems import generate, write_jsonl
    from sfn_train.tiny import save_tiny_checkpoint
    from sfn_train.train import run_sft

    root = tmp_path_factory.mktemp("study")
    a = save_tiny_checkpoint(root / "A", "qwen2", seed=0)
    common = dict(model_name_or_path=str(a), dataset_name=str(sum_data), per_device_train_batch_size=4,
                  learning_rate=1.0e-2, logging_steps=1, save_strategy="no", report_to="none", seed=0, max_length=256)
    b_recipe = write_recipe(root / "b.yaml", **common, output_dir=str(root / "B"), max_steps=4,
                            trainable_modules="all")
    run_sft(*parse_recipe(["--config", str(b_recipe)]))
    oproj = write_recipe(root / "oproj.yaml", **common, output_dir=str(root / "unused"), max_steps=2)
    problems = [{"id": str(i), "problem": p.text, "answer": str(p.answer)} for i, p in enumerate(generate(3, (2,), 5))]
    task = write_jsonl(root / "sums.jsonl", problems)
    study = {
        "base": str(a), "reasoning": str(root / "B"),
        "finetune": [{"name": "oproj", "recipe": str(oproj)}],
        "merges": [{"name": "m1_oproj", "modules": ["o_proj"]},
                   {"name": "m2_qkv", "modules": ["q_proj", "k_proj", "v_proj"], "layers": "0-1"}],
        "destroy": {"model": "reasoning", "modes": ["zero", "reinit", "remove"], "modules": ["o_proj", "up_proj"],
                    "layers": "1-2"},
        "delta": True,
        "tasks": [str(task)],
        "eval": {"limit": 3, "max_new_tokens": 8, "temperature": 0, "batch_size": 16, "grading_workers": 1,
                 "no_progress": True},
        "baseline": "reasoning",
        "out": str(root / "out"),
    }
    path = root / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return {"root": root, "study": path, "out": root / "out", "raw": study}


@pytest.fixture(scope="module")
def first_run(inputs) -> dict:
    from sfn_train.study import run_study

    lines: list[str] = []
    result = run_study(inputs["study"], log=lines.append)
    return {**result, "lines": lines}


def _before_run_section(report: Path) -> str:
    return report.read_text().split("\n## Run\n")[0]


def _markers(out: Path) -> dict[str, tuple[int, str]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_text()) for p in sorted((out / "stages").glob("*.json"))}


# ---------------------------------------------------------------------------------------------------------------
# One run


@pytest.mark.slow
def test_study_runs_every_stage_and_reports_every_model(first_run, inputs):
    out = first_run["out"]
    assert first_run["ran"] == STAGES and first_run["cached"] == []
    progress = [line for line in first_run["lines"] if line.startswith("[study ")]
    assert any("[study 13/21 |" in line and "eval:oproj (model oproj" in line and "8 after it" in line
               for line in progress), progress
    report = (out / "report.md").read_text()
    sections = {s.split("\n", 1)[0]: s for s in report.split("\n## ")[1:]}
    # the protocol and the settings its runs used, not the options' unset values
    assert ("Evaluation: protocol sampled (docs/evaluation.md), backend hf, 1 sample(s) per problem, temperature 0.0, "
            "top_p 0.95, at most 8 new tokens") in report

    def rows(title_start: str) -> list[str]:
        section = next(v for k, v in sections.items() if k.startswith(title_start))
        return [line.split("|")[1].strip() for line in section.splitlines() if line.startswith("| ")][1:]

    assert rows("Fine-tunes from A against reasoning") == ["base", "reasoning", "oproj"]
    assert rows("Merges: A with modules of B") == ["base", "m1_oproj", "m2_qkv", "reasoning"]
    assert rows("Destruction of reasoning in layers 1-2") == ["zero", "reinit", "remove layers"]
    assert "| destroyed | o_proj | up_proj |" in report
    assert "### A -> B" in report and "### A -> oproj" in report
    for model in MODELS:
        assert f"| {model} | sums |" in (out / "compare.md").read_text()
    # the numbers are the files' numbers: o_proj's trainable share from its manifest, m1's pass@1 from its eval
    manifest = json.loads((out / "train" / "oproj" / "sfn_manifest.json").read_text())
    share = manifest["selection"]["trainable_fraction"]
    assert f"{manifest['selection']['trainable_params']:,} ({share:.1%})" in sections[
        "Fine-tunes from A against reasoning (the paper's Table 2)"]
    assert 0 < share < 0.2
    m1 = json.loads((out / "evals" / "m1_oproj" / "m1_oproj__sums.json").read_text())["summary"]
    assert f"| m1_oproj | o_proj | {m1['pass_at_1']:.3f} [{m1['ci_low']:.3f}, {m1['ci_high']:.3f}]" in report
    findings = [line for line in sections["What this study found"].splitlines() if line.startswith("- ")]
    assert any(line.startswith("- sums: B (reasoning) scores") for line in findings)
    assert any(line.startswith("- Delta A -> oproj: the largest mean relative change is in o_proj")
               for line in findings)
    for image in ("compare_accuracy.png", "delta/reasoning/delta_l2_by_role.png"):
        assert f"]({image})" in report and (out / image).is_file()
    # the folder explains itself: the run record in the one manifest schema, each result with the command it ran
    record = json.loads((out / "study_run.json").read_text())
    assert manifest_problems(record) == [] and record["kind"] == "study" and len(record["models"]) == len(MODELS)
    m1 = json.loads((out / "evals" / "m1_oproj" / "m1_oproj__sums.json").read_text())
    assert m1["command"].startswith(f"sfn eval {out / 'merges' / 'm1_oproj'} --label m1_oproj --task ")


@pytest.mark.slow
def test_second_run_runs_nothing(first_run, inputs, monkeypatch, capsys):
    """Every stage is skipped: the functions that do the work would fail if called, and no marker is rewritten."""
    import sfn_train.evaluation
    import sfn_train.gadgets
    import sfn_train.study.pipeline
    import sfn_train.study.summary

    out = first_run["out"]
    before, report_mtime = _markers(out), (out / "report.md").stat().st_mtime_ns

    def must_not_run(*args, **kwargs):
        raise AssertionError("a done stage ran again")

    for module, name in [(sfn_train.study.pipeline, "run_training"), (sfn_train.gadgets, "merge"),
                         (sfn_train.gadgets, "destroy"), (sfn_train.gadgets, "delta"),
                         (sfn_train.evaluation, "evaluate"), (sfn_train.study.summary, "write_report")]:
        monkeypatch.setattr(module, name, must_not_run)
    assert main(["study", str(inputs["study"])]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[study ")]
    assert len(lines) == len(STAGES) and all(line.endswith("done before, skipped") for line in lines), lines
    assert _markers(out) == before
    assert (out / "report.md").stat().st_mtime_ns == report_mtime


@pytest.mark.slow
def test_kill_during_evaluation_then_rerun_gives_the_same_report(first_run, inputs):
    """A copy of the study without its evaluation; `sfn study` SIGKILLed while it evaluates; a rerun redoes only the
    evaluation that did not finish and writes the first run's report."""
    from sfn_train.study import run_study

    out = inputs["root"] / "killed"
    shutil.copytree(first_run["out"], out)
    for path in [*(out / "stages").glob("eval__*.json"), out / "stages" / "report.json", out / "report.md"]:
        path.unlink()
    shutil.rmtree(out / "evals")
    proc = subprocess.Popen([sys.executable, "-m", "sfn_train.cli", "study", str(inputs["study"]), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            # eval:base is done and eval:reasoning has started
            if "eval:reasoning (" in line and line.rstrip().endswith("after it"):
                os.killpg(proc.pid, signal.SIGKILL)
                break
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(seen)
    assert (out / "stages" / "eval__base.json").is_file()
    assert not (out / "stages" / "eval__reasoning.json").exists() and not (out / "report.md").exists()
    base_marker = (out / "stages" / "eval__base.json").read_text()

    result = run_study(inputs["study"], out=out, log=lambda _: None)
    assert result["ran"] == [s for s in STAGES if s.startswith("eval:") and s != "eval:base"] + ["report"]
    assert (out / "stages" / "eval__base.json").read_text() == base_marker
    assert _before_run_section(out / "report.md") == _before_run_section(first_run["out"] / "report.md")


@pytest.mark.slow
def test_stage_runs_one_stage_or_names_the_missing_one(first_run, inputs, tmp_path, capsys):
    fresh = tmp_path / "fresh"
    assert main(["study", str(inputs["study"]), "--out", str(fresh), "--stage", "eval:oproj"]) == 2
    assert one_line_error(capsys).endswith("stage eval:oproj needs stage train:oproj, which has not finished: run "
                                           "it first (`--stage train:oproj`), or run the study without --stage.")
    assert main(["study", str(inputs["study"]), "--out", str(fresh), "--stage", "report"]) == 2
    assert "stage report needs stage train:oproj" in one_line_error(capsys)
    assert main(["study", str(inputs["study"]), "--out", str(fresh), "--stage", "merge:m1_oproj"]) == 0
    assert [p.name for p in (fresh / "stages").iterdir()] == ["merge__m1_oproj.json"]
    assert sorted(p.name for p in fresh.iterdir()) == ["merges", "stages"]
    assert main(["study", str(inputs["study"]), "--out", str(fresh), "--stage", "eval:m1_oproj"]) == 0
    assert (fresh / "evals" / "m1_oproj" / "m1_oproj__sums.json").is_file()
    assert main(["study", str(inputs["study"]), "--out", str(fresh), "--stage", "evaluate"]) == 2
    assert "--stage 'evaluate' is not a stage of this study" in one_line_error(capsys)


@pytest.mark.slow
def test_multinode_finetune_is_recorded_once_launched_on_the_nodes(first_run, inputs, tmp_path, capsys):
    """One process cannot start a 2-node run: the stage says what to launch, and records a matching finished run."""
    raw = {**inputs["raw"], "finetune": [{**inputs["raw"]["finetune"][0], "nnodes": 2, "nproc_per_node": 1}]}
    study, fresh = tmp_path / "two_nodes.yaml", tmp_path / "fresh"
    study.write_text(yaml.safe_dump(raw))
    argv = ["study", str(study), "--out", str(fresh), "--stage", "train:oproj"]
    assert main(argv) == 2
    line = one_line_error(capsys)
    assert ("fine-tune oproj trains on 2 nodes, which one `sfn study` process cannot start: run `torchrun --nnodes 2 "
            "--node_rank $RANK --rdzv_backend c10d --rdzv_endpoint $MASTER:29500 --nproc_per_node 1 -m sfn_train.cli "
            f"train --config {inputs['root'] / 'oproj.yaml'}") in line and line.endswith("holds no run yet).")
    run = fresh / "train" / "oproj"
    shutil.copytree(first_run["out"] / "train" / "oproj", run)  # the planned command's output, from one process
    assert main(argv) == 2
    assert "holds a run that does not match: it ran 1 processes, not 2" in one_line_error(capsys)
    manifest = json.loads((run / "sfn_manifest.json").read_text())
    (run / "sfn_manifest.json").write_text(json.dumps({**manifest, "world_size": 2}))  # as the 2-node launch writes
    assert main(argv) == 0
    assert json.loads((fresh / "stages" / "train__oproj.json").read_text())["adopted"] is True
    assert (run / "model.safetensors").is_file()  # recorded, not cleared
    capsys.readouterr()
    assert main(argv) == 0
    assert capsys.readouterr().out.splitlines()[0].endswith("done before, skipped")


@pytest.mark.slow
def test_inputs_by_content_key_the_stages(first_run, inputs, tmp_path):
    """The recipe's and the task file's contents, and the fine-tune's output, are inputs: changing one makes the
    stages that read it (and only those) not done."""
    from sfn_train.study import load_study
    from sfn_train.study.pipeline import StudyPipeline

    recipe, task = tmp_path / "oproj.yaml", tmp_path / "sums.jsonl"
    shutil.copy(inputs["root"] / "oproj.yaml", recipe)
    shutil.copy(inputs["raw"]["tasks"][0], task)
    raw = {**inputs["raw"], "finetune": [{"name": "oproj", "recipe": str(recipe)}], "tasks": [str(task)]}
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump(raw))

    def done() -> dict[str, bool]:
        runner = StudyPipeline(load_study(study), study, first_run["out"], log=lambda _: None).runner
        return {name: runner.is_done(name) for name in ("train:oproj", "merge:m1_oproj", "eval:base", "eval:oproj")}

    assert done() == dict.fromkeys(["train:oproj", "merge:m1_oproj", "eval:base", "eval:oproj"], True)
    recipe.write_text(recipe.read_text().replace("learning_rate: 0.01", "learning_rate: 0.02"))
    assert done() == {"train:oproj": False, "merge:m1_oproj": True, "eval:base": True, "eval:oproj": False}
    shutil.copy(inputs["root"] / "oproj.yaml", recipe)
    task.write_text(task.read_text().replace('"answer": "', '"answer": "1'))
    assert done() == {"train:oproj": True, "merge:m1_oproj": True, "eval:base": False, "eval:oproj": False}
    # an accelerate launcher's config file (and the DeepSpeed file it names) is an input of the training stage too
    shutil.copy(inputs["raw"]["tasks"][0], task)
    accelerate, zero3 = tmp_path / "accelerate.yaml", tmp_path / "zero3.json"
    shutil.copy(REPO / "ds_configs" / "zero3.json", zero3)
    accelerate.write_text((REPO / "ds_configs" / "accelerate_zero3.yaml").read_text().replace(
        "ds_configs/zero3.json", str(zero3)))
    launched = {**raw["finetune"][0], "accelerate_config": str(accelerate)}
    study.write_text(yaml.safe_dump({**raw, "finetune": [launched]}))

    def keys() -> dict[str, str]:
        runner = StudyPipeline(load_study(study), study, first_run["out"], log=lambda _: None).runner
        return {name: runner.key(name) for name in ("train:oproj", "merge:m1_oproj")}

    before = keys()
    accelerate.write_text(accelerate.read_text().replace("zero3_init_flag: true", "zero3_init_flag: false"))
    after_config = keys()
    zero3.write_text(zero3.read_text().replace('"stage": 3', '"stage": 3 '))
    after_zero3 = keys()
    assert len({before["train:oproj"], after_config["train:oproj"], after_zero3["train:oproj"]}) == 3
    assert before["merge:m1_oproj"] == after_config["merge:m1_oproj"] == after_zero3["merge:m1_oproj"]


# ---------------------------------------------------------------------------------------------------------------
# --plan


def test_plan_prints_every_stage_with_its_command_and_hardware(inputs, capsys):
    assert main(["study", str(inputs["study"]), "--plan"]) == 0
    plan = capsys.readouterr().out
    for stage in STAGES:
        assert f"[{stage}]" in plan and f"--stage {stage}\n" in plan
    study, out = inputs["study"], inputs["out"]
    assert (f"[train:oproj]  GPU: 1 node(s) x 8 GPUs" in plan and
            f"runs: torchrun --nproc_per_node 8 -m sfn_train.cli train --config {inputs['root'] / 'oproj.yaml'} "
            f"--model_name_or_path {inputs['root'] / 'A'} --output_dir {out / 'train' / 'oproj'}" in plan)
    assert "engine: DDP (the recipe names no deepspeed or fsdp config)" in plan
    memory = [line.strip() for line in plan.splitlines() if line.strip().startswith("memory:")]
    assert memory and all(" GiB per GPU " in m and m.endswith(": fits 80 GiB") for m in memory), memory
    assert f"[merge:m2_qkv]  CPU only" in plan and (
        f"runs: sfn merge {inputs['root'] / 'A'} {inputs['root'] / 'B'} --modules q_proj,k_proj,v_proj --layers 0-1"
        in plan)
    assert (f"runs: sfn eval {out / 'train' / 'oproj'} --label oproj --task {inputs['root'] / 'sums.jsonl'} --out "
            f"{out / 'evals' / 'oproj'} --limit 3 --max-new-tokens 8" in plan)
    waves = [line for line in plan.splitlines() if line.startswith("## wave")]
    assert waves == ["## wave 1: 11 stage(s), independent of each other",
                     "## wave 2: 9 stage(s), independent of each other",
                     "## wave 3: 1 stage(s), independent of each other"]


def test_plan_flags_a_training_stage_that_does_not_fit_its_gpus(inputs, capsys):
    assert main(["study", str(inputs["study"]), "--plan", "--gpu-memory", "0.01"]) == 0
    plan = capsys.readouterr().out
    assert ": DOES NOT FIT 0.01 GiB GPUs" in plan
    assert main(["study", str(inputs["study"]), "--plan", "--no-memory"]) == 0
    assert "memory:" not in capsys.readouterr().out


def test_plan_launches_with_accelerate_when_the_finetune_names_its_config(tmp_path, capsys):
    config = REPO / "ds_configs" / "accelerate_zero3.yaml"
    path = _study(tmp_path, finetune=[{"name": "oproj", "recipe": str(tmp_path / "r.yaml"), "nnodes": 2,
                                       "nproc_per_node": 4, "accelerate_config": str(config)}])
    assert main(["study", str(path), "--plan"]) == 0
    plan = capsys.readouterr().out
    assert ("[train:oproj]  GPU: 2 node(s) x 4 GPUs" in plan and
            f"runs: accelerate launch --config_file {config} --num_processes 8 --num_machines 2 --machine_rank $RANK "
            f"--main_process_ip $MASTER --main_process_port 29500 -m sfn_train.cli train --config {tmp_path / 'r.yaml'}"
            " --model_name_or_path org/base --output_dir studies/study/train/oproj" in plan), plan
    assert (f"launcher: accelerate launch --config_file {config} (distributed_type DEEPSPEED, DeepSpeed config "
            "ds_configs/zero3.json)" in plan)
    assert "torchrun" not in plan


def test_plan_of_the_table1_study_launches_deepspeed_and_vllm(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    assert main(["study", "recipes/studies/table1_1.5b.yaml", "--plan", "--out", "/tmp/nowhere"]) == 0
    plan = capsys.readouterr().out
    assert ("runs: torchrun --nproc_per_node 8 -m sfn_train.cli train --config recipes/qwen2.5-math-1.5b/"
            "oproj_s1k.yaml --model_name_or_path Qwen/Qwen2.5-Math-1.5B" in plan)
    assert "engine: DeepSpeed ZeRO-2 (recipe key deepspeed: ds_configs/zero2.json)" in plan
    assert "[eval:m1_oproj]  GPU: 1 GPU(s) (vLLM tensor-parallel size)" in plan
    assert "--backend vllm" in plan and "--tensor-parallel-size 1" in plan
    assert not Path("/tmp/nowhere").exists()


# ---------------------------------------------------------------------------------------------------------------
# The study file


def _study(tmp_path: Path, **changes) -> Path:
    recipe = write_recipe(tmp_path / "r.yaml", model_name_or_path="org/model")
    data = {"base": "org/base", "reasoning": "org/reasoning", "finetune": [{"name": "oproj", "recipe": str(recipe)}],
            "merges": [{"name": "m1", "modules": ["o_proj"]}],
            "destroy": {"modes": ["zero"], "modules": ["o_proj"], "layers": "1-2"}, "tasks": ["aime24"],
            "eval": {"samples": 2}}
    for key, value in changes.items():
        if value is None:
            data.pop(key)
        else:
            data[key] = value
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("changes, message", [
    ({"merge": [{"name": "x", "modules": ["o_proj"]}]}, "the study has unknown key(s) merge (did you mean merges?): the keys are base, tasks,"),
    ({"merges": [{"name": "m1", "module": ["o_proj"]}]}, "merges[0] has unknown key(s) module (did you mean modules?): the keys are name,"),
    ({"merges": [{"name": "m1", "modules": ["o_proj"], "alpha": "half"}]},
     "merges[0].alpha takes a number, not 'half'"),
    ({"merges": [{"name": "m1", "modules": ["o_proj"], "layers": "5-2"}]}, "merges[0] (m1): trainable_layers range "),
    ({"merges": [{"name": "oproj", "modules": ["o_proj"]}]}, "two models of the study are named 'oproj'"),
    ({"merges": [{"name": "m1", "modules": ["o_proj"], "donor": "f9"}]}, "donor 'f9' is neither `reasoning` nor"),
    ({"destroy": {"modes": ["smash"], "modules": ["o_proj"]}}, "destroy.modes ['smash']: use one or more of zero,"),
    ({"destroy": {"model": "f9", "modules": ["o_proj"]}}, "destroy.model 'f9' must be `base`, `reasoning`"),
    ({"eval": {"sampels": 4}}, "eval has unknown key `sampels` (did you mean samples?): the keys are the `sfn eval` options ("),
    ({"eval": {"samples": "many"}}, "eval: argument --samples: invalid int value: 'many'"),
    ({"eval": {"temperature": -1}}, "eval: temperature -1.0 is negative"),
    ({"eval": {"out": "x"}}, "eval.out: the study sets --out itself"),
    ({"delta": "yes"}, "delta takes true or false, not 'yes'"),
    ({"base": None}, "lacks the required key `base` (A: checkpoint folder or hub id)"),
    ({"base": "./no/such/folder"}, "base './no/such/folder' is neither an existing folder nor a hub id"),
    ({"tasks": []}, "tasks is empty"),
    ({"baseline": "nobody"}, "baseline 'nobody' is not a model of the study (base, reasoning, oproj, m1, zero_o_proj)"),
    ({"finetune": [{"name": "oproj", "recipe": "no/such.yaml"}]}, "finetune[0] (oproj): recipe no/such.yaml does not"),
    ({"finetune": [{"name": "base", "recipe": "r.yaml"}]}, "model name 'base' is reserved"),
    ({"finetune": [{"name": "oproj", "recipe": "r.yaml", "accelerate_config": "no/acc.yaml"}]},
     "accelerate_config no/acc.yaml does not exist"),
])
def test_bad_study_file_is_one_line(tmp_path, capsys, changes, message):
    path = _study(tmp_path, **changes)
    assert main(["study", str(path), "--plan"]) == 2
    line = one_line_error(capsys)
    assert line.startswith(f"sfn study: error: study {path}: ") and message in line, line


def test_good_study_file_reads(tmp_path):
    from sfn_train.study import load_study

    study = load_study(_study(tmp_path))
    assert study.out == "studies/study" and study.destroy.layers == ["1-2"] and study.merges[0].layers == ["all"]
    assert study.model_names() == ["base", "reasoning", "oproj", "m1", "zero_o_proj"]


# ---------------------------------------------------------------------------------------------------------------
# The shipped studies

STUDIES = sorted((REPO / "recipes" / "studies").glob("*.yaml"))


def test_shipped_studies_exist():
    assert {p.stem for p in STUDIES} >= {"table1_1.5b", "table1_7b", "freeze_14b", "freeze_32b"}


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.stem)
def test_shipped_study_parses_and_plans(path, monkeypatch):
    from sfn_train.config import parse_recipe
    from sfn_train.study import load_study, plan_text

    monkeypatch.chdir(REPO)  # studies name recipes relative to the repository root, as users launch them
    study = load_study(path.relative_to(REPO))
    header = path.read_text().split("\nbase:")[0]
    for word in ("Hardware", "Estimate", "Launch", "sfn study " + str(path.relative_to(REPO))):
        assert word in header, f"{path.name} header lacks {word!r}"
    for f in study.finetune:
        assert parse_recipe(["--config", f.recipe])[2].model_name_or_path == study.base
    assert "[report]" in plan_text(path.relative_to(REPO))


def test_the_training_stage_is_keyed_by_the_dataset_content(tmp_path, qwen2_base, monkeypatch):
    """The dataset file a recipe names is an input by content: the same path with one row edited is a new key for the
    fine-tune's training stage, and the same content again is the old key."""
    from sfn_train.study import load_study
    from sfn_train.study.pipeline import StudyPipeline

    monkeypatch.setenv("SFN_FINGERPRINT_CACHE", "off")
    data = tmp_path / "rows.jsonl"
    rows = '{"prompt": "1+1=", "completion": "2"}\n{"prompt": "2+2=", "completion": "4"}\n'
    data.write_text(rows)
    recipe = write_recipe(tmp_path / "oproj.yaml", model_name_or_path=str(qwen2_base), dataset_name=str(data))
    study = _study(tmp_path, base=str(qwen2_base), finetune=[{"name": "oproj", "recipe": str(recipe)}])

    def key() -> str:
        return StudyPipeline(load_study(study), study, tmp_path / "out", log=lambda _: None).runner.key("train:oproj")

    before = key()
    data.write_text(rows.replace('"4"', '"5"'))
    edited = key()
    data.write_text(rows)
    assert edited != before and key() == before


# ---------------------------------------------------------------------------------------------------------------
# The stage runner itself


def test_stage_runner_redoes_changed_and_half_done_stages_only(tmp_path):
    from sfn_train.stages import Stage, StageRunner

    settings = {"a": 1}
    calls: list[str] = []
    fail_in = set()

    def build_a():
        calls.append("a")
        (tmp_path / "a").mkdir()
        (tmp_path / "a" / "part.txt").write_text("half")
        if "a" in fail_in:
            raise KeyboardInterrupt  # killed half-way
        (tmp_path / "a" / "done.txt").write_text(str(settings["a"]))

    def runner() -> StageRunner:
        a = Stage("make:a", "make", "a", [], lambda: dict(settings), build_a, tmp_path / "a")
        b = Stage("use:a", "use", "b", ["make:a"], lambda: {"a": r.marker("make:a")["run_id"]},
                  lambda: calls.append("b"))
        r = StageRunner([a, b], tmp_path / "stages", log=lambda _: None)
        return r

    assert runner().run() == {"ran": ["make:a", "use:a"], "cached": []}
    assert runner().run() == {"ran": [], "cached": ["make:a", "use:a"]} and calls == ["a", "b"]
    settings["a"] = 2  # a changed input: a is redone, and b because it reads a's output
    assert runner().run()["ran"] == ["make:a", "use:a"] and (tmp_path / "a" / "done.txt").read_text() == "2"
    settings["a"], fail_in = 3, {"a"}
    with pytest.raises(KeyboardInterrupt):
        runner().run()
    assert not (tmp_path / "stages" / "make__a.json").exists()  # no marker: not done, and b did not start
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["part.txt"] and calls[-1] == "a"
    fail_in.clear()
    assert runner().run()["ran"] == ["make:a", "use:a"]  # redone, on a cleared folder (build_a's mkdir insists)
    assert (tmp_path / "a" / "done.txt").read_text() == "3"


def test_stage_runner_jobs_run_concurrent_stages_together_and_the_rest_alone(tmp_path):
    """`--jobs 2`: two trainings that need nothing of each other run at once (a barrier only both can pass), a stage
    that is not concurrent runs alone after them; a failed one leaves the other's marker, and a rerun redoes it alone."""
    import threading

    from sfn_train.stages import Stage, StageRunner

    together = threading.Barrier(2, timeout=10)
    running, fail = [], {"t2"}

    def train(name):
        def build():
            running.append(name)
            together.wait()  # BrokenBarrierError (after 10 s) when the other training is not running beside this one
            if name in fail:
                raise RuntimeError(f"{name} failed")
        return build

    def runner(jobs):
        stages = [Stage(f"train:{n}", "train", n, [], dict, train(n), concurrent=True) for n in ("t1", "t2")]
        stages.append(Stage("eval", "eval", "e", ["train:t1", "train:t2"], dict,
                            lambda: running.append("eval")))
        return StageRunner(stages, tmp_path / "stages", log=lambda _: None).run(jobs=jobs)

    with pytest.raises(RuntimeError, match="t2 failed"):
        runner(2)
    assert sorted(running) == ["t1", "t2"] and (tmp_path / "stages" / "train__t1.json").exists()
    assert not (tmp_path / "stages" / "train__t2.json").exists()
    fail.clear()
    together = threading.Barrier(1)  # the rerun has only t2 left to train
    assert runner(2) == {"ran": ["train:t2", "eval"], "cached": ["train:t1"]} and running[-2:] == ["t2", "eval"]


def test_sigterm_to_the_study_stops_its_trainings_and_starts_no_more(tmp_path):
    """`kill -TERM` to `sfn study --jobs 2` alone (not its process group) while two trainings run and a third waits:
    the one still running is stopped, one that ends on its own meanwhile frees no slot (the third never starts), and
    the study ends with the interruption."""
    import threading
    import time

    from sfn_train.stages import Stage, StageRunner
    from sfn_train.subprocess_run import run_command

    results = {}

    def train(name, seconds):  # the child marks that it started, then runs for `seconds`; fails unless it ends well
        code = f"import time, pathlib; pathlib.Path({str(tmp_path / name)!r}).touch(); time.sleep({seconds})"

        def build():
            results[name] = run_command([sys.executable, "-c", code])
            if results[name].exit_code != 0:
                raise RuntimeError(f"{name} exited with {results[name].exit_code}")

        return build

    # b ends by itself 1.5 s in, inside the 2 s a child is given before SIGINT: its thread is then free for c
    stages = [Stage(f"train:{n}", "train", n, [], dict, train(n, t), concurrent=True)
              for n, t in (("a", 120), ("b", 1.5), ("c", 120))]
    runner = StageRunner(stages, tmp_path / "stages", log=lambda _: None)

    def terminate_once_both_run():
        while not ((tmp_path / "a").exists() and (tmp_path / "b").exists()):
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=terminate_once_both_run, daemon=True).start()
    started = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        runner.run(jobs=2)
    # a was stopped, not waited out (it sleeps 120 s; a child that ignored SIGINT would be killed after 30 s), and c,
    # which would run 120 s unstopped had it started after the stop began, never ran
    assert time.perf_counter() - started < 100
    assert sorted(results) == ["a", "b"] and results["a"].exit_code != 0, results
    assert not (tmp_path / "c").exists()
    assert {p.name for p in (tmp_path / "stages").glob("*.json")} <= {"train__b.json"}  # only what finished


# ---------------------------------------------------------------------------------------------------------------
# Findings chosen by the numbers


def _result(correct: list[bool], level: str = "III", tokens: float = 100.0) -> dict:
    n, k = len(correct), sum(correct)
    return {"summary": {"pass_at_1": k / n, "ci_low": 0.0, "ci_high": 1.0, "n_problems": n, "mean_tokens": tokens,
                        "level_shares": {level: 1.0}},
            "problems": [{"id": str(i), "samples": [{"correct": c, "level": "IV" if c else level}]}
                         for i, c in enumerate(correct)]}


def test_findings_follow_the_numbers():
    from sfn_train.evaluation.tables import ModelEntry, findings

    n = 40

    def entry(name, group, k, level="III", tokens=100.0, training=None, destroy=None):
        return ModelEntry(name, group, name, {"t": _result([i < k for i in range(n)], level, tokens)}, training,
                          destroy)

    full = {"trainable_fraction": 1.0, "steps_per_s": 1.0, "peak_memory_mb": 1000.0}
    oproj = {"trainable_fraction": 0.08, "steps_per_s": 2.0, "peak_memory_mb": 600.0}
    entries = [entry("base", "base", 4), entry("reasoning", "reasoning", 36),
               entry("full", "finetune", 30, training=full), entry("oproj", "finetune", 17, training=oproj),
               entry("m1", "merge", 20, tokens=300.0), entry("m2", "merge", 4),
               entry("zero_o_proj", "destroy", 0, "III", destroy=("zero", "o_proj")),
               entry("zero_q_proj", "destroy", 0, "I", destroy=("zero", "q_proj")),
               entry("zero_up_proj", "destroy", 0, "I", destroy=("zero", "up_proj"))]
    said = findings(entries, ["t"], "full")
    assert said[0] == "t: B (reasoning) scores 0.900 and A (base) 0.100: B is better than A (Δ +0.800, p<0.001)."
    assert not any(s.startswith("Fine-tune full") for s in said)  # the baseline is not compared with itself
    oproj_line = next(s for s in said if s.startswith("Fine-tune oproj"))
    assert "t 0.425, worse than full (Δ -0.325, p<0.001)" in oproj_line
    assert "recovers 50% of full's significant gain over A on t" in oproj_line  # (17 - 4) / (30 - 4)
    assert "it trained at 2.00x the steps/s and 0.60x the peak memory of full" in oproj_line
    merges = next(s for s in said if s.startswith("t: merges into A"))
    assert "significantly better than A: m1" in merges and "writes 300 tokens per response vs A's 100" in merges
    destruction = next(s for s in said if s.startswith("t, zero:"))
    assert ("stay on task (level III/IV) with o_proj damaged and degrade to level I/II with q_proj, up_proj"
            in destruction)
    assert "As in the paper, damaging o_proj is milder" in destruction
    # the same study where B gained nothing: no share of a gain is claimed
    entries[1] = entry("reasoning", "reasoning", 4)
    entries[2] = entry("full", "finetune", 4, training=full)
    said = findings(entries, ["t"], "full")
    assert "no significant difference (p=1.000), so nothing below can show" in said[0]
    assert not any("recovers" in s for s in said)


# ---------------------------------------------------------------------------------------------------------------
# Training seeds


@pytest.mark.slow
def test_study_seeds_train_per_seed_and_a_new_seed_trains_only_itself(inputs, tmp_path, monkeypatch):
    """`seeds: [1]`: the fine-tune, the merge whose donor it is and its destruction exist once per seed, each run at
    its seed (manifest), the report compares the variants over seeds; then `seeds: [1, 2]` runs only the stages of
    seed 2 (what ran, and the training commands launched) and the report again."""
    import sfn_train.study.pipeline
    from sfn_train.study import run_study

    raw = {**inputs["raw"], "reasoning": None, "baseline": "base", "delta": False, "seeds": [1],
           "merges": [{"name": "m_oproj", "modules": ["o_proj"], "donor": "oproj"}],
           "destroy": {"model": "oproj", "modes": ["zero"], "modules": ["o_proj"], "layers": "1"},
           "out": str(tmp_path / "out")}
    study = tmp_path / "seeds.yaml"
    study.write_text(yaml.safe_dump(raw))
    trained = []
    real = sfn_train.study.pipeline.run_training
    monkeypatch.setattr(sfn_train.study.pipeline, "run_training",
                        lambda command, folder, name, log_file: trained.append(name) or real(command, folder, name,
                                                                                             log_file))

    def per_seed(seeds):
        return [f"{kind}:{model}@{s}" for kind, model in (("train", "oproj"), ("merge", "m_oproj"),
                                                           ("destroy", "zero_o_proj")) for s in seeds]

    first = run_study(study, log=lambda _: None)
    evals = ["eval:base"] + [f"eval:{m}@1" for m in ("oproj", "m_oproj", "zero_o_proj")]
    assert first["ran"] == per_seed([1]) + evals + ["report"] and trained == ["oproj@1"]
    out = tmp_path / "out"
    report = (out / "report.md").read_text()
    assert "## Fine-tunes from A against base (training seed 1)" in report and "## Variants over seeds" in report
    assert "| oproj | 1 |" in report and "| m_oproj | 1 |" in report

    trained.clear()
    study.write_text(yaml.safe_dump({**raw, "seeds": [1, 2]}))
    second = run_study(study, log=lambda _: None)
    assert second["ran"] == per_seed([2]) + [f"eval:{m}@2" for m in ("oproj", "m_oproj", "zero_o_proj")] + ["report"]
    assert trained == ["oproj@2"]
    manifests = {s: json.loads((out / "train" / f"oproj@{s}" / "sfn_manifest.json").read_text()) for s in (1, 2)}
    assert [manifests[s]["seed"] for s in (1, 2)] == [1, 2]
    assert json.loads((out / "destroy" / "zero_o_proj@2" / "sfn_manifest.json").read_text())["model"]["path"] == \
        str(out / "train" / "oproj@2")
    report = (out / "report.md").read_text()
    assert "## Fine-tunes from A against base (training seed 2)" in report and "| oproj | 2 |" in report
    assert "oproj over 2 seeds" in report  # the findings use the seed-aware test
