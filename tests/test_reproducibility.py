"""Same seed, same numbers: two `sfn train` processes with one recipe and seed give bitwise-identical weights, and
their greedy evaluations the same responses and pass@1; another seed gives other weights (so the comparison can
fail). Every manifest records the versions and torch's thread count it ran with. Why and what else moves numbers
(CPU kernel set, versions, threads): docs/reproducibility.md."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import REPO, train_recipe


def test_manifest_records_versions_threads_and_cpu_kernels():
    import torch

    from sfn_train.manifest import manifest_problems, new_manifest

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        manifest = new_manifest("eval", "sfn eval x")
    finally:
        torch.set_num_threads(before)
    runtime = manifest["runtime"]
    assert runtime["torch_threads"] == 1 and runtime["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert {"torch_interop_threads", "omp_num_threads", "aten_cpu_capability", "cpu", "gpu"} <= set(runtime)
    assert manifest["versions"]["transformers"] and manifest["versions"]["tokenizers"]
    assert manifest_problems(manifest) == []
    assert "torch_threads" in manifest_problems({**manifest, "runtime": {}})[0]


def _train(tmp_path, base, data, name: str, seed: int):
    recipe = train_recipe(tmp_path / name, base, data, seed=seed, output_dir=str(tmp_path / name / "out"),
                          trainable_modules="all", max_steps=3)
    subprocess.run([sys.executable, "-m", "sfn_train.cli", "train", "--config", str(recipe)], check=True, cwd=REPO,
                   capture_output=True)
    return tmp_path / name / "out"


@pytest.mark.slow
def test_same_seed_gives_identical_weights_and_numbers(tmp_path, qwen2_base, sum_data):
    from sfn_train.evaluation import evaluate

    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
    a, b = (_train(tmp_path, qwen2_base, sum_data, name, 42) for name in ("a", "b"))
    other = _train(tmp_path, qwen2_base, sum_data, "c", 43)
    weights = {run: (run / "model.safetensors").read_bytes() for run in (a, b, other)}
    assert weights[a] == weights[b], "two runs with seed 42 wrote different weights"
    assert weights[a] != weights[other], "seed 43 wrote seed 42's weights: the seed does not reach training"
    manifest = json.loads((a / "sfn_manifest.json").read_text())
    assert manifest["runtime"]["torch_threads"] >= 1 and manifest["recipe"]["training"]["seed"] == 42

    files = evaluate([str(a), str(b)], ["lab_reason"], tmp_path / "ev", labels=["a", "b"], limit=8,
                     temperature=0.0, samples=1, max_new_tokens=16, progress=False, grading_workers=1)
    ra, rb = (json.loads(f.read_text()) for f in files)
    assert [s["response"] for p in ra["problems"] for s in p["samples"]] == \
           [s["response"] for p in rb["problems"] for s in p["samples"]]
    assert ra["summary"]["pass_at_1"] == rb["summary"]["pass_at_1"]
    assert ra["summary"]["level_shares"] == rb["summary"]["level_shares"]
