"""bench/gpu_check.sh: its dry run (every step with tiny models on the CPU) passes, and its checks can fail."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import pytest
import torch

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import gpu_check  # noqa: E402


@pytest.mark.slow
def test_dry_run_passes_every_step(tmp_path):
    proc = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry-run", "--python", sys.executable, "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    steps = {s["step"]: s for s in json.loads((tmp_path / "gpu_check.json").read_text())["steps"]}
    assert list(steps) == gpu_check.PARTS["train"] + gpu_check.PARTS["quant"][1:]
    assert {s["status"] for s in steps.values()} == {"PASS"}, {n: s["note"] for n, s in steps.items()}
    for name in ("bf16_oproj", "zero2", "zero3_f2", "fsdp2", "quant_4bit", "quant_8bit"):
        numbers = steps[name]["numbers"]
        assert numbers["oproj_moved_min"] >= 0.9 and numbers["plugin_dtype"] == ["float32"]
        assert numbers["ckpt_dtypes"] == ["bfloat16"] and numbers["optimizer_dtypes"].keys() == {"float32"}
    assert steps["zero3_f2"]["numbers"]["selected"] == 15 and steps["zero3_f2"]["numbers"]["deepspeed_stage"] == 3
    fsdp2 = steps["fsdp2"]["numbers"]  # accelerate launch, 2 CPU processes: really sharded, as the manifest says
    assert fsdp2["engine_in_effect"] == "fsdp2" and fsdp2["processes"] == 2
    assert fsdp2["sharded_dtensor_params"] == fsdp2["parameter_tensors"] > 0
    assert steps["throughput"]["numbers"]["full_tok_s"] > 0 and "oproj/full_tok_s" in steps["throughput"]["numbers"]
    assert "gpu_check summary:" in proc.stdout


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


def test_wheel_check_finds_missing_wheels_and_unmet_requirements(tmp_path, monkeypatch):
    listing = ({"common": ["trl==1.16.0"], "train": ["deepspeed==0.19.8"], "quant": ["bitsandbytes==0.50.2"]},
               {"torch", "numpy", "packaging"})
    wheel(tmp_path / "common", "trl", "1.16.0", ["datasets>=4.7.0", "rich; extra == 'rich'"])
    wheel(tmp_path / "train", "deepspeed", "0.19.8", ["torch", "numpy"])
    problems = gpu_check.check_wheels(tmp_path, listing=listing)
    assert any("no wheel for bitsandbytes==0.50.2" in p for p in problems)
    assert any("trl needs datasets" in p for p in problems)  # extras are not needed
    assert not any("rich" in p for p in problems)

    wheel(tmp_path / "common", "datasets", "5.2.0", ["numpy", 'backports-tarfile; python_version < "3.12"'])
    wheel(tmp_path / "quant", "bitsandbytes", "0.50.2", ["torch<3,>=2.4"])
    listing[0]["common"].append("datasets==5.2.0")
    assert gpu_check.check_wheels(tmp_path, listing=listing) == []
    monkeypatch.setattr(gpu_check, "CARRY_LIMIT", 1000)  # as if the wheels were over what a device call carries
    assert any("over the 64 MiB" in p for p in gpu_check.check_wheels(tmp_path, listing=listing))


def test_the_wheel_list_covers_every_carried_requirement():
    parts, device = gpu_check.read_wheel_list()
    assert {"common", "train", "quant"} <= set(parts)
    carried = {gpu_check.normalize(r.split("==")[0]) for reqs in parts.values() for r in reqs}
    assert {"trl", "deepspeed", "datasets", "bitsandbytes", "math-verify", "transformers"} <= carried
    assert all("==" in r for reqs in parts.values() for r in reqs)  # pinned: one version each


@pytest.mark.parametrize("args,message", [(["--part", "gpu"], "--part takes train, quant or all"),
                                          (["--bogus"], "unknown argument --bogus")])
def test_usage_errors_are_one_line(args, message):
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), *args], capture_output=True, text=True)
    assert proc.returncode == 2 and message in proc.stderr
