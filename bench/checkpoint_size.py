"""Size and save time of an o_proj run's intermediate checkpoints (checkpoint-N folders), as `sfn train` writes them.

    .venv/bin/python bench/checkpoint_size.py                                  # tiny (64 wide, 4 layers) and 512x8
    .venv/bin/python bench/checkpoint_size.py --sizes 1024x16 --saves 5
    .venv/bin/python bench/checkpoint_size.py --processes 2 --deepspeed ds_configs/zero2.json
    .venv/bin/python bench/checkpoint_size.py --processes 2 --fsdp2

For each model size (HIDDENxLAYERS of a Qwen2 config, vocabulary 32,000 except the tiny one, fp32 on CPU) it trains
o_proj for `--saves` checkpoints (one every step) and reports, as medians over the checkpoints: the folder's bytes, the
bytes of model weights in it (model.safetensors, the DeepSpeed model states, FSDP's `pytorch_model_fsdp_0/`), and the
seconds the Trainer spent in `_save_checkpoint` (timed around the call in the main process). One JSON line per size.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def folder_bytes(folder: Path) -> tuple[int, int]:
    """(all bytes, bytes of model weights: model*.safetensors, DeepSpeed *model_states.pt, FSDP's model folder)."""
    total = weights = 0
    for path in folder.rglob("*"):
        if path.is_file():
            size = path.stat().st_size
            total += size
            if (path.name.startswith("model") and path.suffix == ".safetensors"
                    or path.name.endswith("model_states.pt") or path.parent.name.startswith("pytorch_model_fsdp")):
                weights += size
    return total, weights


def child(args) -> None:
    """One run in this process: sfn train with the Trainer's _save_checkpoint timed."""
    sys.path.insert(0, str(REPO))
    from transformers import Trainer

    from sfn_train.config import parse_recipe
    from sfn_train.train import run_sft

    times = []
    original = Trainer._save_checkpoint

    def timed(self, *a, **kw):
        start = time.perf_counter()
        original(self, *a, **kw)
        if self.args.process_index == 0:
            times.append(time.perf_counter() - start)

    Trainer._save_checkpoint = timed
    out = run_sft(*parse_recipe(["--config", args.recipe]))
    if int(os.environ.get("RANK", "0")) == 0:
        Path(args.times).write_text(json.dumps(times))
        print(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="64x4,512x8")
    parser.add_argument("--saves", type=int, default=5)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--deepspeed", default=None)
    parser.add_argument("--fsdp2", action="store_true", help="FSDP2 (ds_configs/fsdp2.json); needs --processes")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--recipe", help=argparse.SUPPRESS)
    parser.add_argument("--times", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    import yaml

    sys.path.insert(0, str(REPO))
    from sfn_train.lab.problems import generate, sft_rows, write_jsonl
    from sfn_train.tiny import build_tokenizer, tiny_model

    for size in args.sizes.split(","):
        hidden, layers = map(int, size.split("x"))
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            tokenizer = build_tokenizer()
            vocab = len(tokenizer) if hidden <= 64 else 32000
            model = tiny_model("qwen2", vocab_size=vocab, hidden=hidden, layers=layers,
                               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            model.save_pretrained(tmp / "base")
            tokenizer.save_pretrained(tmp / "base")
            params = sum(p.numel() for p in model.parameters())
            del model
            data = write_jsonl(tmp / "rows.jsonl", sft_rows(generate(64, (2, 3), seed=0), "reasoning"))
            engine = ({"deepspeed": args.deepspeed} if args.deepspeed else
                      {"fsdp": True, "fsdp_config": str(REPO / "ds_configs" / "fsdp2.json")} if args.fsdp2 else {})
            recipe = dict(model_name_or_path=str(tmp / "base"), dataset_name=str(data), output_dir=str(tmp / "out"),
                          max_steps=args.saves, save_strategy="steps", save_steps=1, per_device_train_batch_size=4,
                          learning_rate=1e-3, report_to="none", logging_steps=1000, disable_tqdm=True,
                          max_length=256, memory_plan=False, **engine)
            (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe))
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--recipe", str(tmp / "recipe.yaml"),
                   "--times", str(tmp / "times.json")]
            if args.processes > 1:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                       str(args.processes), *cmd[1:]]
            env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(proc.stdout[-2000:] + proc.stderr[-4000:])
            folders = sorted((tmp / "out").glob("checkpoint-*"))
            sizes = [folder_bytes(f) for f in folders]
            times = json.loads((tmp / "times.json").read_text())
            print(json.dumps({
                "model": f"qwen2 {hidden}x{layers}, {params / 1e6:.1f}M params, fp32", "processes": args.processes,
                "deepspeed": args.deepspeed, "fsdp2": args.fsdp2, "checkpoints": len(folders),
                "checkpoint_mb": round(statistics.median(s[0] for s in sizes) / 1e6, 2),
                "weights_mb": round(statistics.median(s[1] for s in sizes) / 1e6, 2),
                "final_output_mb": round(sum(p.stat().st_size for p in (tmp / "out").iterdir() if p.is_file()) / 1e6, 2),
                "save_s_median": round(statistics.median(times), 3), "save_s_all": [round(t, 3) for t in times],
                "files": sorted(str(p.relative_to(folders[-1])) for p in folders[-1].rglob("*") if p.is_file()),
            }), flush=True)


if __name__ == "__main__":
    main()
