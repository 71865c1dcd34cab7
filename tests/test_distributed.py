"""2-process runs on CPU (gloo) under torchrun: plain DDP, DeepSpeed ZeRO-2 and ZeRO-3.

After each run the saved checkpoint must hold the full, gathered weights, with exactly the selected tensors changed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, changed_tensors, load_tensors, train_recipe

pytestmark = pytest.mark.slow

O_PROJ = {f"model.layers.{i}.self_attn.o_proj.weight" for i in range(4)}


def torchrun(recipe: Path, *flags: str, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "train" / "sft.py"), "--config", str(recipe), *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.mark.parametrize("ds_config", [None, "zero2.json", "zero3.json"])
def test_two_process_run_changes_only_the_selection(tmp_path, qwen2_base, sum_data, ds_config):
    keys = {"per_device_train_batch_size": 2}
    if ds_config:
        keys["deepspeed"] = str(REPO / "ds_configs" / ds_config)
    proc = torchrun(train_recipe(tmp_path, qwen2_base, sum_data, **keys))
    out = tmp_path / "out"
    changed, unchanged = changed_tensors(qwen2_base, out)
    assert changed == O_PROJ
    assert len(unchanged) == 47
    manifest = json.loads((out / "sfn_manifest.json").read_text())
    assert manifest["world_size"] == 2
    assert manifest["deepspeed_stage"] == (int(ds_config[4]) if ds_config else None)
    # ZeRO-3 partitions parameters; counts must come from ds_numel, not the empty local shards
    total = sum(t.numel() for t in load_tensors(qwen2_base).values())
    assert manifest["selection"]["trainable_params"] == 16384 and manifest["selection"]["total_params"] == total
    assert f"trainable: 16,384 of {total:,} params" in proc.stdout + proc.stderr


def test_zero3_with_activation_checkpointing_and_frozen_params(tmp_path, qwen2_base, sum_data):
    """Non-reentrant checkpointing + frozen parameters under ZeRO-3 (transformers #47254, trl #2514)."""
    recipe = train_recipe(tmp_path, qwen2_base, sum_data, per_device_train_batch_size=2,
                          deepspeed=str(REPO / "ds_configs" / "zero3.json"), gradient_checkpointing=True)
    torchrun(recipe)
    assert changed_tensors(qwen2_base, tmp_path / "out")[0] == O_PROJ


def test_zero3_without_gathered_save_is_refused(tmp_path, capsys, qwen2_base, sum_data):
    from conftest import one_line_error
    from sfn_train.cli import main

    config = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = False
    (tmp_path / "z3.json").write_text(json.dumps(config))
    recipe = train_recipe(tmp_path, qwen2_base, sum_data, deepspeed=str(tmp_path / "z3.json"))
    assert main(["train", "--config", str(recipe)]) == 2
    assert "stage3_gather_16bit_weights_on_model_save" in one_line_error(capsys)
