"""tools/gpu_check: its dry run (every step with tiny models on the CPU) passes, its checks can fail, its time caps hold
and its wheel check compares versions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools" / "gpu_check"))
import check as gpu_check  # noqa: E402
import wheels  # noqa: E402


@pytest.mark.slow
def test_dry_run_passes_every_step(tmp_path):
    proc = subprocess.run(
        ["bash", str(REPO / "tools" / "gpu_check" / "run.sh"), "--dry-run", "--python", sys.executable, "--out",
         str(tmp_path)],
        capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    steps = {s["step"]: s for s in json.loads((tmp_path / "gpu_check.json").read_text())["steps"]}
    assert list(steps) == gpu_check.PARTS["quant"] + gpu_check.PARTS["train"][1:]  # cheapest first
    assert {s["status"] for s in steps.values()} == {"PASS"}, {n: s["note"] for n, s in steps.items()}
    for name in ("bf16_oproj", "zero2", "zero3_f2", "fsdp2", "quant_4bit", "quant_8bit"):
        numbers = steps[name]["numbers"]
        assert numbers["oproj_moved_min"] >= 0.9 and numbers["plugin_dtype"] == ["float32"]
        assert numbers["ckpt_dtypes"] == ["bfloat16"] and numbers["optimizer_dtypes"].keys() == {"float32"}
    assert steps["zero3_f2"]["numbers"]["selected"] == 15 and steps["zero3_f2"]["numbers"]["deepspeed_stage"] == 3
    fsdp2 = steps["fsdp2"]["numbers"]  # accelerate launch, 2 CPU processes: really sharded, as the manifest says
    assert fsdp2["engine_in_effect"] == "fsdp2" and fsdp2["processes"] == 2
    assert fsdp2["sharded_dtensor_params"] == fsdp2["parameter_tensors"] > 0
    throughput = steps["throughput"]["numbers"]
    assert throughput["full_tok_s"] > 0 and "oproj/full_tok_s" in throughput
    for variant in ("oproj", "f2", "full"):  # the planner's prediction (sfn memory) beside each variant
        assert throughput[f"{variant}_plan_gib"] > 0
    assert "gpu_check summary:" in proc.stdout
    log = (tmp_path / "steps.log").read_text()  # every launcher's whole output is kept, not a 400-character tail
    assert "===== zero2: torchrun zero2.json (exit 0)" in log and "===== fsdp2: accelerate launch fsdp2 (exit 0)" in log
    assert "gpu_check summary:" in (tmp_path / "console.log").read_text()
    assert len(list(tmp_path.iterdir())) <= 8  # the device tool brings back at most 8 files


def fake_run(tmp_path, base):
    """An output folder as a run leaves it: the base's tensors, o_proj moved in an fp32 plugin, a manifest."""
    import shutil

    from safetensors.torch import load_file, save_file

    out = tmp_path / "out"
    shutil.copytree(base, out)
    tensors = load_file(out / "model.safetensors")
    plugin = {n: t.float() + 1e-3 for n, t in tensors.items() if "o_proj" in n}
    tensors.update({n: t.to(torch.bfloat16) for n, t in plugin.items()})
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    save_file(plugin, out / "sfn_plugin.safetensors")
    (out / "sfn_manifest.json").write_text(json.dumps({"status": "complete"}))
    return out, tensors, plugin


def test_run_checks_catch_what_they_guard(tmp_path, qwen2_bf16_base):
    from safetensors.torch import load_file, save_file

    out, tensors, plugin = fake_run(tmp_path, qwen2_bf16_base)
    assert gpu_check.check_run(qwen2_bf16_base, out, ["o_proj"])["_failed"] == []

    frozen = dict(tensors)
    frozen["model.layers.0.mlp.up_proj.weight"] = frozen["model.layers.0.mlp.up_proj.weight"] * 2
    save_file(frozen, out / "model.safetensors", metadata={"format": "pt"})
    assert any("frozen tensors changed" in f for f in gpu_check.check_run(qwen2_bf16_base, out, ["o_proj"])["_failed"])

    upcast = {n: t.float() for n, t in tensors.items()}  # a checkpoint saved in fp32 instead of the base's bf16
    save_file(upcast, out / "model.safetensors", metadata={"format": "pt"})
    assert any("dtypes differ" in f for f in gpu_check.check_run(qwen2_bf16_base, out, ["o_proj"])["_failed"])

    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    base = load_file(qwen2_bf16_base / "model.safetensors")
    stuck = {n: t.clone() for n, t in plugin.items()}  # as with bf16 weights: half the updates rounded away
    for name in stuck:
        stuck[name].view(-1)[::2] = base[name].view(-1)[::2].float()
    save_file(stuck, out / "sfn_plugin.safetensors")
    failed = gpu_check.check_run(qwen2_bf16_base, out, ["o_proj"])["_failed"]
    assert any("of an o_proj's elements moved" in f for f in failed)


def wheel(folder, name, version, requires=()):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(f"Requires-Dist: {r}\n"
                                                                               for r in requires)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name.replace('-', '_')}-{version}.dist-info/METADATA", meta)
    return path


@pytest.fixture
def no_project_requirements(monkeypatch):
    monkeypatch.setattr(wheels, "project_requirements", lambda: [])


def test_wheel_check_finds_missing_wheels_and_unmet_requirements(tmp_path, monkeypatch, no_project_requirements):
    listing = ({"common": ["trl==1.16.0"], "train": ["deepspeed==0.19.8"], "quant": ["bitsandbytes==0.50.2"]},
               {"torch": "2.11.0", "numpy": None, "packaging": None}, {})
    wheel(tmp_path / "common", "trl", "1.16.0", ["datasets>=4.7.0", "rich; extra == 'rich'"])
    wheel(tmp_path / "train", "deepspeed", "0.19.8", ["torch", "numpy"])
    problems = wheels.check_wheels(tmp_path, listing=listing)
    assert any("no wheel for bitsandbytes==0.50.2" in p for p in problems)
    assert any("trl needs datasets" in p for p in problems)  # extras are not needed
    assert not any("rich" in p for p in problems)

    wheel(tmp_path / "common", "datasets", "5.2.0", ["numpy", 'backports-tarfile; python_version < "3.12"'])
    wheel(tmp_path / "quant", "bitsandbytes", "0.50.2", ["torch<3,>=2.4"])
    listing[0]["common"].append("datasets==5.2.0")
    assert wheels.check_wheels(tmp_path, listing=listing) == []
    monkeypatch.setattr(wheels, "CARRY_LIMIT", 1000)  # as if the wheels were over what a device call carries
    assert any("over the 64 MiB" in p for p in wheels.check_wheels(tmp_path, listing=listing))


def test_wheel_check_compares_versions(tmp_path, no_project_requirements):
    """A bound the node's recorded version fails is a problem; an unrecorded one is listed as unverified; the carried
    wheel's version wins over the node's; `accept` lets a known deviation through."""
    listing = ({"common": ["datasets==5.2.0", "fsspec==2026.9.0"], "train": [], "quant": []},
               {"pyarrow": "21.0.0", "fsspec": "2026.10.0", "regex": None, "torch": "2.11.0"}, {})
    wheel(tmp_path / "common", "datasets", "5.2.0", ["pyarrow>=24.0.0", "fsspec<=2026.9.0,>=2023.1.0",
                                                     "regex>=2025.10.22", "torch>=2.13"])
    wheel(tmp_path / "common", "fsspec", "2026.9.0")
    found = wheels.check_wheels(tmp_path, parts=("train",), listing=listing)
    assert "part train: datasets needs pyarrow>=24.0.0, the node has 21.0.0" in found
    assert "part train: datasets needs torch>=2.13, the node has 2.11.0" in found
    assert not any("fsspec" in p for p in found)  # the carried 2026.9.0 is what the node will import, not its 2026.10
    assert found[-1] == "unverified: part train: datasets needs regex>=2025.10.22; the node's version is not recorded"
    listing[2]["torch"] = "the node's CUDA torch"
    assert not any("torch" in p for p in wheels.check_wheels(tmp_path, parts=("train",), listing=listing))


def test_the_shipped_wheel_list_is_consistent():
    parts, device, accepted = wheels.read_wheel_list()
    assert {"common", "train", "quant"} <= set(parts)
    carried = {wheels.normalize(r.split("==")[0]) for reqs in parts.values() for r in reqs}
    assert {"trl", "deepspeed", "datasets", "bitsandbytes", "math-verify", "transformers", "fsspec", "regex"} <= carried
    assert all("==" in r for reqs in parts.values() for r in reqs)  # pinned: one version each
    assert device["torch"] == "2.11.0" and "pyarrow" in device and set(accepted) == {"torch", "huggingface-hub"}


def test_a_step_past_its_cap_is_stopped_and_the_others_are_kept(tmp_path, monkeypatch):
    """The backstop alarm stops an in-process step, a launched child is killed at the cap with its log kept, and a
    step that would start with too little of the budget left is skipped; every finished step is in the JSON."""
    import time

    monkeypatch.setattr(gpu_check, "ALARM_GRACE", 2)
    monkeypatch.setattr(gpu_check, "STEP_CAP", {"fast": 5, "stuck": 1, "child": 2, "late": 5})
    monkeypatch.setattr(gpu_check, "MIN_START", 3)
    ctx = type("Ctx", (), {"cuda": True, "dry": False, "work": tmp_path, "python": sys.executable})()
    report = ctx.report = gpu_check.Report(tmp_path, "test", budget=7)
    report.run("fast", lambda c: {"x": 1}, ctx)
    report.run("stuck", lambda c: time.sleep(30), ctx)
    child = lambda c: gpu_check.Context.launch(c, [sys.executable, "-c", "print('hello', flush=True); "  # noqa: E731
                                                   "import time; time.sleep(30)"], "sleeper")
    ctx.left = lambda: ctx.step_deadline - time.monotonic()
    report.run("child", child, ctx)
    report.run("late", lambda c: {"ran": True}, ctx)
    steps = {s["step"]: s for s in json.loads((tmp_path / "gpu_check.json").read_text())["steps"]}
    assert steps["fast"]["status"] == "PASS" and steps["fast"]["numbers"] == {"x": 1}
    assert steps["stuck"]["status"] == "FAIL" and "StepTimeout" in steps["stuck"]["note"]
    assert steps["stuck"]["seconds"] < 5
    assert steps["child"]["status"] == "FAIL" and "no result within the step's cap" in steps["child"]["note"]
    assert "===== child: sleeper (killed after" in (tmp_path / "steps.log").read_text()
    assert "hello" in (tmp_path / "steps.log").read_text()
    assert steps["late"]["status"] == "SKIP" and "budget" in steps["late"]["note"]


@pytest.mark.parametrize("args,message", [(["--part", "gpu"], "--part takes quant or train"),
                                          (["--bogus"], "unknown argument --bogus"),
                                          (["--part", "all"], "--part all carries more than one device call may"),
                                          ([], "name the part: --part quant (first, cheapest), then --part train")])
def test_usage_errors_are_one_line(args, message):
    proc = subprocess.run(["bash", str(REPO / "tools" / "gpu_check" / "run.sh"), *args], capture_output=True,
                          text=True)
    assert proc.returncode == 2 and message in proc.stderr
