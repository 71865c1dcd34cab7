"""`sfn memory`: the planner's CPU prediction against the same step run for real, measured by the allocator.

The measurement is independent of the planner's tracker: torch.profiler's memory events carry the CPU allocator's
running total ("Total Allocated", counted from the profiler's start), and the bytes live before the step (weights,
optimizer state, gradients, inputs) are summed from the real objects' storages.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import pytest
import yaml

from helpers import REPO, write_recipe
from sfn_train.tiny import tiny_config

TOLERANCE = 0.03  # the issue asks for 10%; measured here: within 0.1% (see the test ids in docs/memory.md)


def _checkpoint_folder(tmp_path, **overrides):
    folder = tmp_path / "model"
    folder.mkdir()
    tiny_config(**overrides).save_pretrained(folder)  # config.json only: the planner loads no weights
    return folder


def _recipe(tmp_path, model, **keys):
    recipe = {"model_name_or_path": str(model), "dtype": "bfloat16", "attn_implementation": "sdpa",
              "trainable_modules": ["o_proj"], "max_length": 256, "per_device_train_batch_size": 1,
              "gradient_accumulation_steps": 1, "gradient_checkpointing": False, "bf16": False,
              "output_dir": str(tmp_path / "out"), "report_to": "none", **keys}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def measured_peak(spec) -> int:
    """The planner's own step run on real tensors, measured by the allocator (`sfn_train.memory.measure`)."""
    from sfn_train.memory.measure import allocator_peak, live_bytes
    from sfn_train.memory.simulate import simulate_step

    found = {}

    @contextlib.contextmanager
    def around(model, optimizer, inputs):
        state = [v for s in optimizer.state.values() for v in s.values()]
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        found["before"] = live_bytes(model.parameters(), model.buffers(), state, grads, inputs.values())
        with allocator_peak(found):
            yield

    simulate_step(spec, fake=False, around=around)
    return found["before"] + found["during"]


CASES = {
    "oproj": {},
    "f2": {"trainable_modules": ["embed", "lm_head", "norm", "o_proj"]},
    "full_checkpointed_batch2": {"trainable_modules": ["all"], "gradient_checkpointing": True,
                                 "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2},
}


@pytest.mark.parametrize("case", [c if c == "oproj" else pytest.param(c, marks=pytest.mark.slow) for c in CASES])
def test_cpu_prediction_matches_the_allocator(tmp_path, case):
    import torch

    from sfn_train.memory import plan_memory
    from sfn_train.memory.plan import plan_inputs

    torch.manual_seed(0)
    model = _checkpoint_folder(tmp_path, vocab_size=8000, hidden=256, layers=4, intermediate_size=704)
    argv = ["--config", str(_recipe(tmp_path, model, **CASES[case]))]
    plan = plan_memory(argv, device="cpu")
    assert sum(plan["breakdown"].values()) == plan["peak_bytes"]
    real = measured_peak(plan_inputs(argv, device="cpu").spec)
    error = plan["peak_bytes"] / real - 1
    print(f"{case}: predicted {plan['peak_bytes']:,} B, measured {real:,} B, error {error:+.1%}")
    assert abs(error) <= TOLERANCE, (case, plan["breakdown"], real)


def test_engines_partition_and_fit(tmp_path):
    from sfn_train.memory import plan_memory

    model = _checkpoint_folder(tmp_path, vocab_size=2000, hidden=128, layers=3)
    argv = ["--config", str(_recipe(tmp_path, model, trainable_modules=["all"]))]
    one = plan_memory(argv, device="cpu", gpu_memory_gib=64)
    trace = one["_trace"]
    zero3 = plan_memory([*argv, "--deepspeed", "ds_configs/zero3.json"], nproc=4, device="cpu", gpu_memory_gib=64)
    zero3_8 = plan_memory([*argv, "--deepspeed", "ds_configs/zero3.json"], nproc=8, device="cpu", trace=zero3["_trace"])
    assert zero3["world_size"] == 4 and zero3["engine"] == "zero3" and one["engine"] == "plain"
    assert zero3["breakdown"]["optimizer_state"] == 2 * zero3_8["breakdown"]["optimizer_state"]
    assert zero3["breakdown"]["optimizer_state"] < one["breakdown"]["optimizer_state"]
    assert any("1/N" in a for a in zero3["analytic"]) and one["fits"] is True
    tight = plan_memory(argv, device="cpu", gpu_memory_gib=one["peak_bytes_with_margin"] / 2**30 * 0.99, trace=trace)
    assert tight["fits"] is False


def test_cli_json_contract(tmp_path, capsys):
    from sfn_train.cli import main

    model = _checkpoint_folder(tmp_path, vocab_size=500, hidden=64, layers=2)
    recipe = _recipe(tmp_path, model)
    capsys.readouterr()
    assert main(["memory", "--config", str(recipe), "--json", "--gpu-memory", "80", "--nproc", "2",
                 "--max_length", "128"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert isinstance(plan["peak_bytes"], int) and plan["peak_bytes_with_margin"] > plan["peak_bytes"]
    assert plan["fits"] is True and plan["world_size"] == 2 and plan["recipe"]["max_length"] == 128
    assert sum(plan["breakdown"].values()) == plan["peak_bytes"]


def test_find_max_length_is_the_longest_that_fits(tmp_path):
    from sfn_train.memory import plan_memory
    from sfn_train.memory.plan import find

    model = _checkpoint_folder(tmp_path, vocab_size=2000, hidden=128, layers=2)
    argv = ["--config", str(_recipe(tmp_path, model, attn_implementation="eager", per_device_train_batch_size=8))]
    found = find(argv, "max_length", 1, 1, 0.5, device="cpu")
    assert found["value"] and found["value"] % 64 == 0 and found["plan"]["fits"], found["value"]
    longer = plan_memory([*argv, "--max_length", str(found["value"] + 64)], device="cpu", gpu_memory_gib=0.5)
    assert longer["fits"] is False


# ---- the planner against the step `sfn train` really runs -------------------------------------------------------
# A ~100M-parameter qwen2 (12 layers of hidden 768, vocab 16,000), rows longer than max_length kept cut so every row
# is max_length tokens (the plan's worst case is then the real case). `sfn train` runs in a subprocess with a Trainer
# callback (sfn_train.memory.measure.step_peak_callback) measuring its second optimizer step: the bytes of every live
# CPU tensor at the step's start (gc) + the CPU allocator's peak above that during the step (torch.profiler).
REAL_TOLERANCE = 0.10
REAL_CASES = {
    "oproj": {},
    "f2": {"trainable_modules": ["embed", "lm_head", "norm", "o_proj"]},
    "full": {"trainable_modules": ["all"], "gradient_checkpointing": True},
}


@pytest.fixture(scope="module")
def base_100m(tmp_path_factory):
    import torch
    from transformers import AutoModelForCausalLM

    from sfn_train.tiny import build_tokenizer

    folder = tmp_path_factory.mktemp("base_100m")
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = tiny_config(vocab_size=16000, hidden=768, layers=12, intermediate_size=2048,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    data = folder / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"row {i}: " + "the quick brown fox " * 40}) + "\n"
                            for i in range(16)))
    return folder, data


def real_recipe(tmp_path, base, data, **keys):
    return write_recipe(tmp_path / "recipe.yaml", **{
        "model_name_or_path": str(base), "dataset_name": str(data), "output_dir": str(tmp_path / "out"),
        "dtype": "bfloat16", "attn_implementation": "sdpa", "trainable_modules": ["o_proj"], "max_length": 256,
        "truncation": "keep_head", "per_device_train_batch_size": 1, "gradient_accumulation_steps": 1,
        "gradient_checkpointing": False, "bf16": False, "max_steps": 2, "learning_rate": 1e-5, "logging_steps": 1,
        "save_strategy": "no", "report_to": "none", "seed": 0, "memory_plan": False, "dataloader_num_workers": 0,
        **keys})


def run_measured(recipe, out, launcher=(), timeout=900) -> dict:
    """`sfn train RECIPE` (tests/measured_run.py: sfn's own CLI plus the measuring callback) -> {rank: result}."""
    cmd = [*(launcher or [sys.executable]), str(REPO / "tests" / "measured_run.py"), "--config", str(recipe)]
    env = {**os.environ, "SFN_MEASURE_DIR": str(out), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return {int(f.stem[4:]): json.loads(f.read_text()) for f in sorted(out.glob("rank*.json"))}


@pytest.mark.parametrize("case", [c if c == "oproj" else pytest.param(c, marks=pytest.mark.slow) for c in REAL_CASES])
def test_plan_matches_the_real_sfn_train_step(tmp_path, base_100m, case):
    from sfn_train.memory import plan_memory

    base, data = base_100m
    recipe = real_recipe(tmp_path, base, data, **REAL_CASES[case])
    plan = plan_memory(["--config", str(recipe)], device="cpu")
    real = run_measured(recipe, tmp_path / "measured")[0]
    error = plan["peak_bytes"] / real["peak"] - 1
    print(f"{case}: predicted {plan['peak_bytes']:,} B, measured {real['peak']:,} B (live at start "
          f"{real['before']:,} + step {real['during']:,}), error {error:+.1%}; plan {plan['breakdown']}")
    assert abs(error) <= REAL_TOLERANCE, (case, plan["breakdown"], real)


@pytest.mark.slow
def test_plan_matches_the_real_zero3_step_on_two_ranks(tmp_path, base_100m, bf16=True):
    """2 ranks under torchrun (gloo), ZeRO-3 (ds_configs/zero3.json, as tests/test_distributed.py runs it), bf16 as
    the GPU recipes run it: rank 0. (bf16 off: DeepSpeed keeps fp32 partitions, which the planner does not model.)"""
    from sfn_train.memory import plan_memory

    base, data = base_100m
    recipe = real_recipe(tmp_path, base, data, deepspeed=str(REPO / "ds_configs" / "zero3.json"), bf16=bf16)
    plan = plan_memory(["--config", str(recipe)], nproc=2, device="cpu")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    measured = run_measured(recipe, tmp_path / "measured", launcher=launcher)
    assert set(measured) == {0, 1}
    real = measured[0]
    error = plan["peak_bytes"] / real["peak"] - 1
    # The real peak moves between runs (measured during the step: 381,447,032, 356,871,068 and 331,115,408 B): DeepSpeed
    # frees gathered parameters on its own schedule, so 0, 1 or 2 vocabulary-sized matrices are still gathered at the
    # peak. The plan counts every reusable parameter gathered (an upper bound), so it is held to: not more than 10%
    # below the real peak, and not more than 10% above it once the gathered-weights row is set aside.
    gathered = plan["breakdown"]["gathered_weights"]
    print(f"zero3 x2 rank 0 bf16={bf16}: predicted {plan['peak_bytes']:,} B, measured {real['peak']:,} B (live at start "
          f"{real['before']:,} + step {real['during']:,}), error {error:+.1%}; plan {plan['breakdown']}")
    assert plan["peak_bytes"] >= (1 - REAL_TOLERANCE) * real["peak"], (plan["breakdown"], real)
    assert plan["peak_bytes"] - gathered <= (1 + REAL_TOLERANCE) * real["peak"], (plan["breakdown"], real)
