"""Does resident memory grow with training steps?  (long runs must not leak)

Trains the lab-style tiny model (qwen2, hidden 128, 4 layers, o_proj only) for a few hundred steps through
`sfn_train.train.run_sft`, sampling this process's RSS (/proc/self/statm) every `--every` steps from a
TrainerCallback, and fits a least-squares line over the second half of the samples (the first half holds warm-up:
allocator pools, lazily built kernels, dataloader workers). Prints the slope in MB per 100 steps; a leak of even a
few KB per step shows up as a clearly positive slope over 300+ steps.

    python bench/rss_growth.py                      # 400 steps, sample every 10
    python bench/rss_growth.py --steps 1000 --every 20 --json rss.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


def slope_per_100(points: list[tuple[int, float]]) -> float:
    """Least-squares slope of (step, MB), in MB per 100 steps."""
    n = len(points)
    mx = sum(s for s, _ in points) / n
    my = sum(m for _, m in points) / n
    sxx = sum((s - mx) ** 2 for s, _ in points)
    sxy = sum((s - mx) * (m - my) for s, m in points)
    return 100 * sxy / sxx if sxx else 0.0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--every", type=int, default=10, help="sample RSS every N steps")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--save_steps", type=int, default=0, help="also write a checkpoint every N steps (0: never)")
    p.add_argument("--json", help="write the samples and the slope here")
    a = p.parse_args(argv)

    from transformers import TrainerCallback

    from sfn_train.config import parse_recipe
    from sfn_train.lab.problems import generate, sft_rows, write_jsonl
    from sfn_train.tiny import save_tiny_checkpoint
    from sfn_train.train import run_sft

    samples: list[tuple[int, float]] = []

    class RssSampler(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % a.every == 0:
                samples.append((state.global_step, rss_mb()))

    with tempfile.TemporaryDirectory(prefix="rss-growth-") as tmp:
        tmp = Path(tmp)
        base = save_tiny_checkpoint(tmp / "base", "qwen2", seed=0, hidden=128, layers=4)
        data = write_jsonl(tmp / "train.jsonl", sft_rows(generate(512, (2, 3, 4), seed=0), "reasoning"))
        flags = {
            "model_name_or_path": base, "dataset_name": data, "output_dir": tmp / "out", "max_steps": a.steps,
            "per_device_train_batch_size": a.batch, "learning_rate": 1e-3, "logging_steps": 50, "report_to": "none",
            "save_strategy": "steps" if a.save_steps else "no", "save_steps": a.save_steps or 500, "seed": 0,
            "max_length": 256, "trainable_modules": "o_proj", "disable_tqdm": "true",
        }
        argv_ = [x for k, v in flags.items() for x in (f"--{k}", str(v))]
        started = time.perf_counter()
        run_sft(*parse_recipe(argv_), callbacks=[RssSampler()])
        wall = time.perf_counter() - started

    second_half = samples[len(samples) // 2:]
    result = {
        "steps": a.steps, "every": a.every, "batch": a.batch, "wall_s": round(wall, 1),
        "rss_first_mb": round(samples[0][1], 1), "rss_last_mb": round(samples[-1][1], 1),
        "rss_peak_mb": round(max(m for _, m in samples), 1),
        "slope_mb_per_100_steps_second_half": round(slope_per_100(second_half), 3),
        "slope_mb_per_100_steps_all": round(slope_per_100(samples), 3),
        "samples": samples,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
