"""`sfn memory`: the planner's CPU prediction against the same step run for real, measured by the allocator.

The measurement is independent of the planner's tracker: torch.profiler's memory events carry the CPU allocator's
running total ("Total Allocated", counted from the profiler's start), and the bytes live before the step (weights,
optimizer state, gradients, inputs) are summed from the real objects' storages.
"""

from __future__ import annotations

import contextlib
import json
import pytest
import yaml

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


def _live_bytes(*groups) -> int:
    import torch

    seen, total = set(), 0
    for group in groups:
        for t in group:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                total += t.untyped_storage().nbytes()
    return total


def measured_peak(spec) -> int:
    """The real step's peak bytes on this CPU: live before the step + the allocator's highest running total."""
    import tempfile

    import torch
    from torch.profiler import ProfilerActivity, profile

    from sfn_train.memory.simulate import simulate_step

    found = {}

    @contextlib.contextmanager
    def around(model, optimizer, inputs):
        state = [v for s in optimizer.state.values() for v in s.values()]
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        found["before"] = _live_bytes(model.parameters(), model.buffers(), state, grads,
                                      [v for v in inputs.values() if isinstance(v, torch.Tensor)])
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            yield
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            prof.export_chrome_trace(f.name)
            events = json.load(open(f.name))["traceEvents"]
        found["during"] = max(e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]")

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
