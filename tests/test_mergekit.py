"""Our o_proj merge is bitwise the merge mergekit makes with the configuration users would write for it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from helpers import load_tensors
from sfn_train.gadgets import merge
from sfn_train.tiny import save_tiny_checkpoint


def mergekit_o_proj(a: Path, b: Path, out: Path, dtype: str) -> None:
    """mergekit's linear merge with A weighted 1 everywhere but o_proj, B weighted 1 on o_proj only."""
    config = {
        "merge_method": "linear",
        "models": [
            {"model": str(a), "parameters": {"weight": [{"filter": "o_proj", "value": 0}, {"value": 1}]}},
            {"model": str(b), "parameters": {"weight": [{"filter": "o_proj", "value": 1}, {"value": 0}]}},
        ],
        "dtype": dtype,
    }
    (out.parent / "mergekit.yaml").write_text(yaml.safe_dump(config))
    script = Path(sys.executable).parent / "mergekit-yaml"
    proc = subprocess.run([str(script), str(out.parent / "mergekit.yaml"), str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("arch,dtype", [("qwen2", None), ("llama", torch.bfloat16)])
def test_o_proj_merge_matches_mergekit_bitwise(tmp_path, arch, dtype):
    extra = {"tie_word_embeddings": True} if arch == "llama" else {}
    a = save_tiny_checkpoint(tmp_path / "A", arch, seed=0, dtype=dtype, **extra)
    b = save_tiny_checkpoint(tmp_path / "B", arch, seed=1, dtype=dtype, **extra)
    mergekit_o_proj(a, b, tmp_path / "mergekit", "bfloat16" if dtype == torch.bfloat16 else "float32")
    merge(a, b, tmp_path / "ours", modules="o_proj")
    theirs, ours = load_tensors(tmp_path / "mergekit"), load_tensors(tmp_path / "ours")
    assert set(theirs) == set(ours)
    for name in ours:
        assert ours[name].dtype == theirs[name].dtype and torch.equal(ours[name], theirs[name]), name
    # and the merge really mixed the two: o_proj from B, everything else from A
    a_t, b_t = load_tensors(a), load_tensors(b)
    assert all(torch.equal(ours[n], b_t[n] if ".o_proj." in n else a_t[n]) for n in ours)
