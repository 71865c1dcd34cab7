"""What a study costs on CPU, and what rerunning it costs: the test suite's study, timed by hand.

    python bench/study.py --out /tmp/sfn-bench-study

Builds the inputs `tests/test_study.py` builds (a tiny Qwen2 A, B = 4 full fine-tuning steps of A, an o_proj recipe of
2 steps, a 3-problem task) and a study over them with one fine-tune, two merges, a 2 x 2 destruction grid and a layer
removal, two deltas and 10 models evaluated; then runs `sfn study` twice in fresh processes: the first run does every
stage, the second finds every stage done. Prints each run's wall time and CPU time (user + system, the run and its
subprocesses).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path


def build_inputs(root: Path) -> Path:
    import yaml

    from sfn_train.config import parse_recipe
    from sfn_train.lab.problems import generate, sft_rows, write_jsonl
    from sfn_train.tiny import save_tiny_checkpoint
    from sfn_train.train import run_sft

    a = save_tiny_checkpoint(root / "A", "qwen2", seed=0)
    data = write_jsonl(root / "train.jsonl", sft_rows(generate(32, (2, 3), seed=0), "reasoning"))
    common = dict(model_name_or_path=str(a), dataset_name=str(data), per_device_train_batch_size=4,
                  learning_rate=1.0e-2, logging_steps=1, save_strategy="no", report_to="none", seed=0, max_length=256)
    (root / "b.yaml").write_text(yaml.safe_dump({**common, "output_dir": str(root / "B"), "max_steps": 4,
                                                 "trainable_modules": "all"}))
    run_sft(*parse_recipe(["--config", str(root / "b.yaml")]))
    (root / "oproj.yaml").write_text(yaml.safe_dump({**common, "output_dir": str(root / "unused"), "max_steps": 2}))
    problems = [{"id": str(i), "problem": p.text, "answer": str(p.answer)} for i, p in enumerate(generate(3, (2,), 5))]
    task = write_jsonl(root / "sums.jsonl", problems)
    study = {
        "base": str(a), "reasoning": str(root / "B"),
        "finetune": [{"name": "oproj", "recipe": str(root / "oproj.yaml")}],
        "merges": [{"name": "m1_oproj", "modules": ["o_proj"]},
                   {"name": "m2_qkv", "modules": ["q_proj", "k_proj", "v_proj"], "layers": "0-1"}],
        "destroy": {"model": "reasoning", "modes": ["zero", "reinit", "remove"], "modules": ["o_proj", "up_proj"],
                    "layers": "1-2"},
        "delta": True, "tasks": [str(task)],
        "eval": {"limit": 3, "max_new_tokens": 8, "temperature": 0, "batch_size": 16, "grading_workers": 1,
                 "no_progress": True},
        "baseline": "reasoning", "out": str(root / "out"),
    }
    path = root / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def timed(command: list[str]) -> tuple[float, float]:
    """(wall s, CPU s of the command and everything it waited for)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="/tmp/sfn-bench-study", help="scratch folder (replaced)")
    args = parser.parse_args()
    root = Path(args.out)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["SFN_FINGERPRINT_CACHE"] = str(root / "fingerprints.json")
    study = build_inputs(root)
    command = [sys.executable, "-m", "sfn_train.cli", "study", str(study)]
    load = os.getloadavg()[0]
    first = timed(command)
    second = timed(command)
    if not (root / "out" / "report.md").is_file():
        raise SystemExit("the study wrote no report.md")
    print(f"load average (1 min) before the first run: {load:.1f} on {os.cpu_count()} CPUs")
    print(f"first run (21 stages):         {first[0]:6.1f} s wall, {first[1]:6.1f} s CPU")
    print(f"second run (every stage done): {second[0]:6.1f} s wall, {second[1]:6.1f} s CPU")
    print(f"report: {root / 'out' / 'report.md'}")


if __name__ == "__main__":
    main()
