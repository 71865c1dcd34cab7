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

from helpers import REPO, changed_tensors, load_tensors, train_recipe

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


@pytest.mark.parametrize("engine", ["fsdp2", "zero3"])
def test_tied_embeddings_are_saved_as_the_base_stores_them(tmp_path, llama_tied_base, sum_data, engine):
    """A tied-embedding base stores model.embed_tokens.weight only. Engines that gather the weights for the save
    (FSDP2: a full state dict of separate copies; ZeRO-3: a consolidated one) must not add lm_head.weight."""
    keys = {"per_device_train_batch_size": 2}
    if engine == "fsdp2":
        keys.update(fsdp=True, fsdp_config=str(REPO / "ds_configs" / "fsdp2.json"))
    else:
        keys["deepspeed"] = str(REPO / "ds_configs" / "zero3.json")
    torchrun(train_recipe(tmp_path, llama_tied_base, sum_data, **keys))
    out = tmp_path / "out"
    base, saved = load_tensors(llama_tied_base), load_tensors(out)
    assert "lm_head.weight" not in base and sorted(saved) == sorted(base)
    assert changed_tensors(llama_tied_base, out)[0] == O_PROJ
    manifest = json.loads((out / "sfn_manifest.json").read_text())
    assert manifest["engine"]["in_effect"]["engine"] == {"fsdp2": "fsdp2", "zero3": "deepspeed_zero3"}[engine]


# `sfn train` under torchrun, with each rank recording what `load_model` (from_pretrained) handed back.
LOAD_PROBE = r"""
import json, os, sys
import sfn_train.train as train

load_model = train.load_model

def recording_load_model(*args, **kwargs):
    model = load_model(*args, **kwargs)
    params = list(model.parameters())
    record = {"local_numel": sum(p.numel() for p in params),
              "ds_numel": sum(getattr(p, "ds_numel", 0) for p in params),
              "partition_numel": sum(p.ds_tensor.numel() for p in params if hasattr(p, "ds_tensor"))}
    with open(os.path.join(sys.argv[1], f"loaded_rank{os.environ['RANK']}.json"), "w") as f:
        json.dump(record, f)
    return model

train.load_model = recording_load_model
from sfn_train.cli import main
sys.exit(main(["train", *sys.argv[2:]]))
"""


def test_zero3_with_activation_checkpointing_and_frozen_params(tmp_path, qwen2_base, sum_data):
    """Non-reentrant checkpointing + frozen parameters under ZeRO-3 (transformers #47254, trl #2514); and the model
    is partitioned while it loads: no rank ever holds it whole."""
    recipe = train_recipe(tmp_path, qwen2_base, sum_data, per_device_train_batch_size=2,
                          deepspeed=str(REPO / "ds_configs" / "zero3.json"), gradient_checkpointing=True)
    (tmp_path / "probe.py").write_text(LOAD_PROBE)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(tmp_path / "probe.py"), str(tmp_path), "--config", str(recipe)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert changed_tensors(qwen2_base, tmp_path / "out")[0] == O_PROJ

    total = sum(t.numel() for t in load_tensors(qwen2_base).values())
    for rank in (0, 1):
        loaded = json.loads((tmp_path / f"loaded_rank{rank}.json").read_text())
        assert loaded["local_numel"] == 0 and loaded["ds_numel"] == total, loaded
        # each rank holds its half of every parameter (rounded up), not the model
        assert total / 2 <= loaded["partition_numel"] < total / 2 + 2 * len(load_tensors(qwen2_base)), loaded


def test_zero3_without_gathered_save_is_refused(tmp_path, capsys, qwen2_base, sum_data):
    from helpers import one_line_error
    from sfn_train.cli import main

    config = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = False
    (tmp_path / "z3.json").write_text(json.dumps(config))
    recipe = train_recipe(tmp_path, qwen2_base, sum_data, deepspeed=str(tmp_path / "z3.json"))
    assert main(["train", "--config", str(recipe)]) == 2
    assert "stage3_gather_16bit_weights_on_model_save" in one_line_error(capsys)
