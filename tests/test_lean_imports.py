"""A training process loads only what it uses: peft, bitsandbytes and scipy stay out unless the run needs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import REPO, changed_tensors, train_recipe

O_PROJ = {f"model.layers.{i}.self_attn.o_proj.weight" for i in range(4)}

# Two `sfn train` runs in one fresh process, as the console script starts them: no quantization, then 4bit.
TWO_RUNS = """
import json, sys
from sfn_train.train import cli_main

def loaded():
    return sorted(n for n in ("peft", "bitsandbytes", "scipy") if sys.modules.get(n) is not None)

assert cli_main(["--config", sys.argv[1]]) == 0
after_plain = loaded()
assert cli_main(["--config", sys.argv[2]]) == 0
print("RESULT " + json.dumps({"plain": after_plain, "4bit": loaded()}))
"""


@pytest.mark.slow
def test_unused_packages_stay_out_and_4bit_still_trains(tmp_path, qwen2_base, sum_data):
    recipes = []
    for mode in ("none", "4bit"):
        (tmp_path / mode).mkdir()
        recipes.append(train_recipe(tmp_path / mode, qwen2_base, sum_data, quantize_frozen=mode, max_steps=2))
    env = {k: v for k, v in os.environ.items() if k != "SFN_KEEP_IMPORTS"}
    proc = subprocess.run([sys.executable, "-c", TWO_RUNS, *map(str, recipes)], capture_output=True, text=True,
                          env={**env, "OMP_NUM_THREADS": "1"}, cwd=REPO, timeout=600)
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    loaded = json.loads(line[0][7:])
    assert loaded["plain"] == []  # nothing quantized: no peft, no bitsandbytes, no scipy in the process
    assert loaded["4bit"] == ["bitsandbytes"]  # quantize_frozen imports what it needs, and only that
    for mode in ("none", "4bit"):
        assert changed_tensors(qwen2_base, tmp_path / mode / "out")[0] == O_PROJ
