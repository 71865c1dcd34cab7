"""The predicted peak per GPU of every shipped GPU recipe on the hardware its header assumes, and the 32B questions.

    PYTHONPATH=. python bench/memory_table.py [--only table|32b] > /tmp/memory_table.md

Every number is a prediction of `sfn memory` (fake tensors, no GPU); models come from bench/model_configs/ (the
published config.json of each checkpoint). Prints markdown for docs/memory.md.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from pathlib import Path

from sfn_train.memory import plan_memory
from sfn_train.memory.plan import GiB, find

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "bench" / "model_configs"
HARDWARE = re.compile(r"Hardware assumed: (?:(\d+) nodes? x )?(\d+) (?:H100 |GPUs with >= )(\d+) ?GB")


def header_hardware(recipe: Path) -> tuple[int, int, int]:
    """(nodes, GPUs per node, GiB per GPU) from the recipe's `# Hardware assumed:` line."""
    match = HARDWARE.search(recipe.read_text())
    if not match:
        raise SystemExit(f"{recipe}: no `Hardware assumed: N node(s) x G H100 80GB` line")
    nodes, gpus, gib = match.groups()
    return int(nodes or 1), int(gpus), int(gib)


def model_folder(recipe: Path) -> str:
    import yaml

    name = yaml.safe_load(recipe.read_text())["model_name_or_path"].split("/")[-1].lower()
    return str(CONFIGS / name)


def row(recipe: Path, nodes: int, gpus: int, gib: int, extra=(), label=None) -> str:
    argv = ["--config", str(recipe), "--model_name_or_path", model_folder(recipe), *extra]
    start = time.perf_counter()
    plan = plan_memory(argv, nproc=gpus, nnodes=nodes, gpu_memory_gib=gib)
    b, r = plan["breakdown"], plan["recipe"]
    weights = sum(b.get(k, 0) for k in ("frozen_weights", "trained_weights", "gathered_weights"))
    states = b.get("gradients", 0) + b.get("optimizer_state", 0) + b.get("ddp_buckets", 0)
    dynamic = b.get("activations", 0) + b.get("loss_logits", 0) + b.get("optimizer_step", 0)
    verdict = "fits" if plan["fits"] else "**does not fit**"
    print(f"  {label or recipe} planned in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return (f"| {label or recipe.relative_to(ROOT)} | {nodes}x{gpus} x {gib} GB, {plan['engine']} | "
            f"{r['max_length']} x {r['batch']} | {weights / GiB:.1f} | {states / GiB:.1f} | {dynamic / GiB:.1f} | "
            f"{plan['peak_bytes'] / GiB:.1f} | {plan['peak_bytes_with_margin'] / GiB:.1f} | {verdict} |")


HEAD = ("| recipe | hardware (header), engine | tokens x batch | weights GiB | grads + optimizer GiB | "
        "activations + loss GiB | peak GiB | + margin GiB | on its header |\n|---|---|---|---|---|---|---|---|---|")


def table() -> None:
    print(HEAD)
    for recipe in sorted((ROOT / "recipes").glob("qwen*/*.yaml")):
        print(row(recipe, *header_hardware(recipe)), flush=True)


def questions_32b() -> None:
    folder = ROOT / "recipes" / "qwen2.5-32b-instruct"
    model = str(CONFIGS / "qwen2.5-32b-instruct")
    for name in ("oproj_s1k", "f2_s1k"):
        argv = ["--config", str(folder / f"{name}.yaml"), "--model_name_or_path", model]
        found = find(argv, "nproc", 1, 1, 80)
        print(f"- {name} (ZeRO-3, 32,768 tokens): fewest 80 GB GPUs = {found['value']} "
              f"(peak {found['plan']['peak_bytes'] / GiB:.1f} GiB, {found['plan']['peak_bytes_with_margin'] / GiB:.1f}"
              " GiB with margin)", flush=True)
    print("\nOne 80 GB GPU, o_proj only:\n")
    print(HEAD)
    oproj = folder / "oproj_s1k.yaml"
    options = [
        ("one process, bf16 base", ["--deepspeed", ""]),
        ("one process, 4-bit base", ["--deepspeed", "", "--quantize_frozen", "4bit"]),
        ("one process, 4-bit base, 16k block", ["--deepspeed", "", "--quantize_frozen", "4bit",
                                                "--max_length", "16384"]),
        ("ZeRO-3 + CPU offload (zero3_offload.json)", ["--deepspeed", "ds_configs/zero3_offload.json"]),
    ]
    for label, extra in options:
        print(row(oproj, 1, 1, 80, extra, label=label), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", choices=("table", "32b"))
    args = parser.parse_args()
    logging.getLogger("sfn_train").setLevel(logging.ERROR)
    if args.only != "32b":
        table()
    if args.only != "table":
        print()
        questions_32b()


if __name__ == "__main__":
    main()
