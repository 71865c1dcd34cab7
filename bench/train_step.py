"""Training-step cost of o_proj-only vs full fine-tuning, and ours vs the plain way, measured in one run.

    .venv/bin/python bench/train_step.py                 # ~55M-parameter Qwen2, CPU, a few minutes
    .venv/bin/python bench/train_step.py --hidden 1024 --layers 16 --steps 20
    .venv/bin/python bench/train_step.py --quantize_frozen 4bit   # adds the variant oproj_4bit

Every variant trains the same model on the same batches through TRL's SFTTrainer, each in its own process (so peak
RSS is that variant's own), alternating variants over `--rounds` to spread machine noise:

- full:        sfn_train.run_sft with trainable_modules: all
- oproj:       sfn_train.run_sft with trainable_modules: [o_proj]
- oproj_plain: TRL's SFTTrainer on a model whose non-o_proj parameters were frozen by hand (the plain way)
- oproj_4bit / oproj_8bit (with --quantize_frozen): oproj with the frozen linear layers quantized by bitsandbytes

Step time: median over the timed steps (after warm-up) of every round. Memory: peak RSS of the process minus its RSS
once the model is loaded, i.e. what training adds on top of the weights (gradients, optimizer state, activations).
Step peak: the peak RSS of the training steps alone (the mark is reset once the model is loaded, so a quantized
variant's brief full-precision load does not count).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def build_assets(folder: Path, hidden: int, layers: int, vocab: int, seq: int, rows: int) -> tuple[Path, Path]:
    """A random-weight Qwen2 checkpoint (with a local tokenizer) and a dataset of fixed-length rows."""
    import torch
    from transformers import AutoModelForCausalLM

    from sfn_train.lab.problems import generate
    from sfn_train.tiny import build_tokenizer, tiny_config

    tokenizer = build_tokenizer()
    config = tiny_config("qwen2", vocab_size=vocab, hidden=hidden, layers=layers, intermediate_size=hidden * 11 // 4,
                         num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256),
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    # Long rows: repeat a reasoning trace up to `seq` characters (the tokenizer is character-level).
    data = folder / "data.jsonl"
    with open(data, "w") as f:
        for p in generate(rows, (3, 4), seed=0):
            text = (p.trace + " ") * (seq // len(p.trace) + 1)
            f.write(json.dumps({"text": text[: seq - 8]}) + "\n")
    n_params = sum(p.numel() for p in model.parameters())
    return folder / "model", data, n_params


class StepTimer:
    """Trainer callback recording the wall time of every optimizer step."""

    def __init__(self):
        from transformers import TrainerCallback

        timer = self

        class _Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                timer.rss_at_start = rss_mb()  # weights loaded; no gradients or Adam moments exist yet
                timer.load_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the reset
                reset_peak_rss()

            def on_step_begin(self, args, state, control, **kw):
                timer.start = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                timer.times.append(time.perf_counter() - timer.start)
                timer.step_peak = max(timer.step_peak, peak_rss_mb())

        self.times: list[float] = []
        self.rss_at_start = 0.0
        self.step_peak = self.load_peak = 0.0
        self.callback = _Callback()


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # then the step peak includes loading


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))


def run_variant(variant: str, model_dir: str, data: str, steps: int, batch: int, seq: int, out: str) -> dict:
    """Runs in a child process: train `steps` steps, report step times and memory."""
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    from trl import SFTTrainer

    from sfn_train import train as sfn
    from sfn_train.config import parse_recipe

    timer = StepTimer()
    recipe = Path(out) / "recipe.yaml"
    recipe.write_text(json.dumps({
        "model_name_or_path": model_dir, "dataset_name": data, "output_dir": str(Path(out) / "run"),
        "max_steps": steps, "per_device_train_batch_size": batch, "max_length": seq, "learning_rate": 1e-4,
        "logging_steps": 1000, "save_strategy": "no", "report_to": "none", "seed": 0, "bf16": False,
        "gradient_checkpointing": False, "dataloader_num_workers": 0, "disable_tqdm": True,
        "trainable_modules": "all" if variant == "full" else ["o_proj"],
        "quantize_frozen": variant.split("_")[1] if variant in ("oproj_4bit", "oproj_8bit") else "none",
    }))
    script_args, training_args, model_args, sfn_args = parse_recipe(["--config", str(recipe)])
    if variant == "oproj_plain":
        # The plain way: load, freeze by hand, hand the model to TRL.
        import datasets
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        for name, param in model.named_parameters():
            param.requires_grad_(".o_proj." in name)
        trainer = SFTTrainer(model=model, args=training_args, processing_class=AutoTokenizer.from_pretrained(model_dir),
                             train_dataset=datasets.load_dataset("json", data_files=data, split="train"),
                             callbacks=[timer.callback])
        trainer.train()
    else:
        # Ours: exactly what `sfn train` runs.
        sfn_args.overwrite_output_dir = True
        sfn.run_sft(script_args, training_args, model_args, sfn_args, callbacks=[timer.callback])
    # the step-peak reset also lowers ru_maxrss, so the loading peak recorded before it is folded back in
    peak = max(timer.load_peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"variant": variant, "step_s": timer.times, "rss_model_mb": timer.rss_at_start, "peak_rss_mb": peak,
            "train_added_mb": peak - timer.rss_at_start, "step_peak_mb": timer.step_peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000, help="a real-LLM-sized vocabulary (the model's, not "
                        "the tokenizer's: extra rows are never looked up, but their lm_head cost is real)")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12, help="steps per round (the first 2 are warm-up)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variants", default="full,oproj,oproj_plain")
    parser.add_argument("--quantize_frozen", choices=["none", "4bit", "8bit"], default="none",
                        help="also run oproj with the frozen linears quantized (variant oproj_4bit / oproj_8bit)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        spec = json.loads(args.child)
        print("RESULT " + json.dumps(run_variant(**spec)))
        return

    variants = args.variants.split(",")
    if args.quantize_frozen != "none" and f"oproj_{args.quantize_frozen}" not in variants:
        variants.append(f"oproj_{args.quantize_frozen}")
    with tempfile.TemporaryDirectory(prefix="sfn-bench-") as tmp:
        tmp = Path(tmp)
        model_dir, data, n_params = build_assets(tmp, args.hidden, args.layers, args.vocab, args.seq, 64)
        print(f"model: Qwen2 hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}: {n_params / 1e6:.1f}M "
              f"params; batch {args.batch} x {args.seq} tokens; {args.steps} steps x {args.rounds} rounds; "
              f"torch threads {os.cpu_count()}")
        results: dict[str, list[dict]] = {v: [] for v in variants}
        for round_ in range(args.rounds):
            for variant in variants:
                out = tmp / f"{variant}-{round_}"
                out.mkdir()
                spec = dict(variant=variant, model_dir=str(model_dir), data=str(data), steps=args.steps,
                            batch=args.batch, seq=args.seq, out=str(out))
                proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                                      text=True)
                line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
                if proc.returncode != 0 or not line:
                    sys.exit(f"{variant} failed:\n{proc.stderr[-3000:]}")
                results[variant].append(json.loads(line[0][7:]))

    summary = {}
    for variant, runs in results.items():
        times = [t for r in runs for t in r["step_s"][2:]]
        summary[variant] = {
            "median_step_s": statistics.median(times),
            "train_added_mb": statistics.median(r["train_added_mb"] for r in runs),
            "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs),
            "step_peak_mb": statistics.median(r["step_peak_mb"] for r in runs),
        }
    print(f"\n{'variant':<12} {'median step (s)':>16} {'peak RSS (MB)':>14} {'added by training (MB)':>22} "
          f"{'step peak (MB)':>15}")
    for variant, s in summary.items():
        print(f"{variant:<12} {s['median_step_s']:>16.3f} {s['peak_rss_mb']:>14.0f} {s['train_added_mb']:>22.0f} "
              f"{s['step_peak_mb']:>15.0f}")
    if "full" in summary and "oproj" in summary:
        f, o = summary["full"], summary["oproj"]
        print(f"\noproj / full      step time {o['median_step_s'] / f['median_step_s']:.2f}x   "
              f"peak RSS {o['peak_rss_mb'] / f['peak_rss_mb']:.2f}x   "
              f"training memory {o['train_added_mb'] / f['train_added_mb']:.2f}x")
    if "oproj" in summary and "oproj_plain" in summary:
        o, p = summary["oproj"], summary["oproj_plain"]
        print(f"ours / plain      step time {o['median_step_s'] / p['median_step_s']:.2f}x   "
              f"peak RSS {o['peak_rss_mb'] / p['peak_rss_mb']:.2f}x   "
              f"training memory {o['train_added_mb'] / p['train_added_mb']:.2f}x")
    for q in ("oproj_4bit", "oproj_8bit"):
        if "oproj" in summary and q in summary:
            o, s = summary["oproj"], summary[q]
            print(f"{q} / oproj  step time {s['median_step_s'] / o['median_step_s']:.2f}x   "
                  f"step peak RSS {s['step_peak_mb'] / o['step_peak_mb']:.2f}x")


if __name__ == "__main__":
    main()
