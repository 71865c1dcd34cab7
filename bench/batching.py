"""Throughput of the ways of batching a realistic length mix, o_proj-only vs full, and ours vs the plain way.

    .venv/bin/python bench/batching.py --data length-mix --variants oproj --batching padded,grouped,auto,padding_free,bfd
    .venv/bin/python bench/batching.py --data length-mix --variants oproj,full --batching padded,auto \
        --attn flash_attention_2 --bf16 --liger --hidden 1536 --layers 28 --heads 12 --kv_heads 2 \
        --intermediate 8960 --vocab 151936 --seq 4096 --rounds 1       # on a GPU: Qwen2.5-1.5B's shape

bench/train_step.py's single-process measurement (that script also measures the distributed engines), with a
length-mix data set and a choice of batchings; bench/peers/run.py builds its job with `build_assets` from here. Every variant trains
the same model on the same batches through TRL's SFTTrainer, each in its own process (so peak RSS is that variant's
own), alternating variants over `--rounds` to spread machine noise:

- full:        sfn_train.run_sft with trainable_modules: all
- oproj:       sfn_train.run_sft with trainable_modules: [o_proj]
- oproj_plain: TRL's SFTTrainer on a model whose non-o_proj parameters were frozen by hand (the plain way)
- oproj_4bit / oproj_8bit (with --quantize_frozen): oproj with the frozen linear layers quantized by bitsandbytes

`--data length-mix` trains one epoch over rows whose lengths follow s1K's shape scaled to `--seq`
(bench/length_mix.py) instead of fixed-length rows, and `--batching` runs each variant once per way of batching them:

- padded:               padded batches of randomly sampled rows (TRL's default)
- grouped:              padded batches of rows of similar length (`train_sampling_strategy: group_by_length`)
- buckets:              sfn's length buckets (`train_sampling_strategy: length_buckets`, sfn_train/batching.py)
- padding_free:         rows concatenated, no padding, no attention mask (`padding_free: true`, `max_length: null`)
- padding_free_grouped: both
- bfd:                  TRL's best-fit-decreasing packing into `--seq`-token packs (`packing: true`)
- auto:                 the recipe leaves both unset: what sfn chooses for the attention kernel (the default)

Throughput: real (non-padding) input tokens per second of training (transformers' `num_input_tokens_seen` over the
trainer's own train time), median over rounds; with the length mix every way of batching sees the same tokens.
Tokens per CPU-second (the process's CPU time over the same span, all threads) is the steadier measure of the work
itself on a shared machine, where wall time depends on what else runs; with BENCH_THREADS=1 it is the work of one
core.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/length_mix.py, bench/train_step.py

from train_step import peak_rss_mb, reset_peak_rss, rss_mb  # noqa: E402 - the same memory readings as train_step


def build_assets(folder: Path, hidden: int, layers: int, vocab: int, seq: int, rows: int,
                 data_kind: str = "fixed", seed: int = 0, heads: int | None = None, kv_heads: int | None = None,
                 intermediate: int | None = None) -> tuple[Path, Path, int]:
    """A random-weight Qwen2 checkpoint (with a local tokenizer) and a dataset: fixed-length rows or the length mix."""
    import torch
    from transformers import AutoModelForCausalLM

    from sfn_train.lab.problems import generate
    from sfn_train.tiny import build_tokenizer, tiny_config

    tokenizer = build_tokenizer()
    config = tiny_config("qwen2", vocab_size=vocab, hidden=hidden, layers=layers,
                         intermediate_size=intermediate or hidden * 11 // 4, num_attention_heads=heads or hidden // 64,
                         num_key_value_heads=kv_heads or max(1, hidden // 256),
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         max_position_embeddings=max(512, seq))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    n_params = sum(p.numel() for p in model.parameters())
    data = folder / "data.jsonl"
    if data_kind == "length-mix":
        from length_mix import write_length_mix

        return folder / "model", write_length_mix(data, rows, seq, seed), n_params
    # Long rows: repeat a reasoning trace up to `seq` characters (the tokenizer is character-level).
    with open(data, "w") as f:
        for p in generate(rows, (3, 4), seed=0):
            text = (p.trace + " ") * (seq // len(p.trace) + 1)
            f.write(json.dumps({"text": text[: seq - 8]}) + "\n")
    return folder / "model", data, n_params


class StepTimer:
    """Trainer callback recording the wall time and the real input tokens of every optimizer step."""

    def __init__(self):
        from transformers import TrainerCallback

        timer = self

        class _Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                timer.rss_at_start = rss_mb()  # weights loaded; no gradients or Adam moments exist yet
                timer.load_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the reset
                reset_peak_rss()
                timer.train_start, timer.cpu_start = time.perf_counter(), time.process_time()

            def on_step_begin(self, args, state, control, **kw):
                timer.start = time.perf_counter()
                timer.tokens_before = state.num_input_tokens_seen

            def on_step_end(self, args, state, control, **kw):
                timer.times.append(time.perf_counter() - timer.start)
                timer.tokens.append(state.num_input_tokens_seen - timer.tokens_before)
                timer.step_peak = max(timer.step_peak, peak_rss_mb())

            def on_train_end(self, args, state, control, **kw):
                timer.train_s = time.perf_counter() - timer.train_start
                timer.cpu_s = time.process_time() - timer.cpu_start  # all threads; robust to a shared machine

        self.times: list[float] = []
        self.tokens: list[int] = []
        self.rss_at_start = 0.0
        self.step_peak = self.load_peak = self.train_s = self.cpu_s = 0.0
        self.callback = _Callback()


# recipe keys of each way of batching; `auto` sets nothing and lets sfn choose
BATCHING = {
    "padded": {"padding_free": False, "train_sampling_strategy": "random"},
    "grouped": {"padding_free": False, "train_sampling_strategy": "group_by_length"},
    # padding-free rows are not truncated (TRL), so max_length is lifted: the length mix stays inside the context
    "padding_free": {"padding_free": True, "train_sampling_strategy": "random", "max_length": None},
    "padding_free_grouped": {"padding_free": True, "train_sampling_strategy": "group_by_length", "max_length": None},
    "buckets": {"padding_free": False, "train_sampling_strategy": "length_buckets"},
    "bfd": {"packing": True, "packing_strategy": "bfd", "train_sampling_strategy": "random"},
    "auto": {},
}


def run_variant(variant: str, model_dir: str, data: str, steps: int, batch: int, seq: int, out: str,
                batching: str | None = None, attn: str | None = None, bf16: bool = False, liger: bool = False,
                epochs: float | None = None) -> dict:
    """Runs in a child process: train `steps` steps (or `epochs`), report step times, tokens and memory."""
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    if variant != "oproj_plain":
        # what `sfn train` does first: keep packages training never uses out of the process
        from sfn_train.lean_imports import keep_unused_packages_out

        keep_unused_packages_out()
    from trl import SFTTrainer

    from sfn_train import train as sfn
    from sfn_train.config import parse_recipe

    timer = StepTimer()
    recipe = Path(out) / "recipe.yaml"
    keys = {
        "model_name_or_path": model_dir, "dataset_name": data, "output_dir": str(Path(out) / "run"),
        "per_device_train_batch_size": batch, "max_length": seq, "learning_rate": 1e-4,
        "logging_steps": 1000, "save_strategy": "no", "report_to": "none", "seed": 0, "bf16": bf16,
        "gradient_checkpointing": False, "dataloader_num_workers": 0, "disable_tqdm": True,
        "trainable_modules": "all" if variant == "full" else ["o_proj"],
        "quantize_frozen": variant.split("_")[1] if variant in ("oproj_4bit", "oproj_8bit") else "none",
        **({"num_train_epochs": epochs} if epochs else {"max_steps": steps}),
        **({"attn_implementation": attn} if attn else {}),
        **({"use_liger_kernel": True} if liger else {}),
        **BATCHING[batching or "padded" if variant == "oproj_plain" else batching or "auto"],
    }
    recipe.write_text(json.dumps(keys))
    script_args, training_args, model_args, sfn_args = parse_recipe(["--config", str(recipe)])
    training_args.include_num_input_tokens_seen = "non_padding"  # a bool to the recipe parser; the mode is a string
    if variant == "oproj_plain":
        # The plain way: load, freeze by hand, hand the model to TRL.
        import datasets
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attn)
        for name, param in model.named_parameters():
            param.requires_grad_(".o_proj." in name)
        trainer = SFTTrainer(model=model, args=training_args, processing_class=AutoTokenizer.from_pretrained(model_dir),
                             train_dataset=datasets.load_dataset("json", data_files=data, split="train"),
                             callbacks=[timer.callback])
        trainer.train()
        decided = {"padding_free": bool(training_args.padding_free),
                   "train_sampling_strategy": training_args.train_sampling_strategy}
    else:
        # Ours: exactly what `sfn train` runs.
        sfn_args.overwrite_output_dir = True
        run = sfn.run_sft(script_args, training_args, model_args, sfn_args, callbacks=[timer.callback])
        decided = json.loads((run / "sfn_manifest.json").read_text())["attention"]
    # the step-peak reset also lowers ru_maxrss, so the loading peak recorded before it is folded back in
    peak = max(timer.load_peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    gpu_peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return {"variant": variant, "batching": batching, "step_s": timer.times, "step_tokens": timer.tokens,
            "train_s": timer.train_s, "cpu_s": timer.cpu_s, "tokens": sum(timer.tokens), "rss_model_mb": timer.rss_at_start,
            "peak_rss_mb": peak, "train_added_mb": peak - timer.rss_at_start, "step_peak_mb": timer.step_peak,
            "gpu_peak_mb": gpu_peak, "decided": {k: decided.get(k) for k in ("padding_free", "packing",
                                                                               "train_sampling_strategy")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, help="attention heads (default hidden/64)")
    parser.add_argument("--kv_heads", type=int, help="key/value heads (default hidden/256)")
    parser.add_argument("--intermediate", type=int, help="MLP width (default 11/4 hidden)")
    parser.add_argument("--vocab", type=int, default=32000, help="a real-LLM-sized vocabulary (the model's, not "
                        "the tokenizer's: extra rows are never looked up, but their lm_head cost is real)")
    parser.add_argument("--seq", type=int, default=256, help="row length (fixed data) or context (length mix)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12, help="steps per round (the first 2 are warm-up); with "
                        "--data length-mix the default is one epoch instead")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variants", default="full,oproj,oproj_plain")
    parser.add_argument("--quantize_frozen", choices=["none", "4bit", "8bit"], default="none",
                        help="also run oproj with the frozen linears quantized (variant oproj_4bit / oproj_8bit)")
    parser.add_argument("--data", choices=["fixed", "length-mix"], default="fixed")
    parser.add_argument("--rows", type=int, default=None, help="dataset rows (default 64 fixed, 256 length mix)")
    parser.add_argument("--batching", default=None, help=f"comma list of {', '.join(BATCHING)}: every variant runs "
                        "once per way of batching (default: padded for fixed rows, auto for the length mix)")
    parser.add_argument("--attn", default=None, help="attn_implementation (sdpa, eager, flash_attention_2, ...)")
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision (a GPU)")
    parser.add_argument("--liger", action="store_true", help="use_liger_kernel: true (needs liger-kernel, a GPU)")
    parser.add_argument("--json", help="also write every round's raw numbers here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        spec = json.loads(args.child)
        print("RESULT " + json.dumps(run_variant(**spec)))
        return

    mix = args.data == "length-mix"
    variants = args.variants.split(",")
    if args.quantize_frozen != "none" and f"oproj_{args.quantize_frozen}" not in variants:
        variants.append(f"oproj_{args.quantize_frozen}")
    batchings = (args.batching or ("auto" if mix else "padded")).split(",")
    unknown = [b for b in batchings if b not in BATCHING]
    if unknown:
        sys.exit(f"unknown --batching {', '.join(unknown)}: choose from {', '.join(BATCHING)}")
    runs = [(v, b) for v in variants for b in batchings]
    label = {run: run[0] if len(batchings) == 1 else f"{run[0]}+{run[1]}" for run in runs}
    rows = args.rows or (256 if mix else 64)
    with tempfile.TemporaryDirectory(prefix="sfn-bench-") as tmp:
        tmp = Path(tmp)
        model_dir, data, n_params = build_assets(tmp, args.hidden, args.layers, args.vocab, args.seq, rows, args.data,
                                                 heads=args.heads, kv_heads=args.kv_heads,
                                                 intermediate=args.intermediate)
        shape = (f"one epoch over {rows} length-mix rows, context {args.seq}" if mix
                 else f"{args.steps} steps of rows of {args.seq} tokens")
        print(f"model: Qwen2 hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}: {n_params / 1e6:.1f}M "
              f"params; batch {args.batch}, {shape}; {args.rounds} rounds; torch threads "
              f"{os.environ.get('BENCH_THREADS', os.cpu_count())}; load average "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        if mix:
            from length_mix import describe, token_lengths
            from sfn_train.tiny import build_tokenizer

            print("data: " + describe(token_lengths([json.loads(l) for l in open(data)], build_tokenizer()),
                                      args.batch))
        results: dict[tuple, list[dict]] = {run: [] for run in runs}
        for round_ in range(args.rounds):
            for run in runs:
                out = tmp / f"{label[run]}-{round_}"
                out.mkdir()
                spec = dict(variant=run[0], batching=run[1], model_dir=str(model_dir), data=str(data),
                            steps=args.steps, batch=args.batch, seq=args.seq, out=str(out), attn=args.attn,
                            bf16=args.bf16, liger=args.liger, epochs=1 if mix else None)
                proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                                      text=True)
                line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
                if proc.returncode != 0 or not line:
                    sys.exit(f"{label[run]} failed:\n{proc.stderr[-3000:]}")
                results[run].append(json.loads(line[0][7:]))
        print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        Path(args.json).write_text(json.dumps({label[r]: v for r, v in results.items()}, indent=1))

    summary = {}
    for run, rounds in results.items():
        times = [t for r in rounds for t in (r["step_s"][2:] or r["step_s"])]  # short packed epochs: all steps
        summary[label[run]] = {
            "median_step_s": statistics.median(times),
            "tokens_per_s": statistics.median(r["tokens"] / r["train_s"] for r in rounds),
            "tokens_per_cpu_s": statistics.median(r["tokens"] / r["cpu_s"] for r in rounds),
            "train_s": statistics.median(r["train_s"] for r in rounds),
            "train_added_mb": statistics.median(r["train_added_mb"] for r in rounds),
            "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in rounds),
            "step_peak_mb": statistics.median(r["step_peak_mb"] for r in rounds),
            "gpu_peak_mb": rounds[0]["gpu_peak_mb"] and statistics.median(r["gpu_peak_mb"] for r in rounds),
            "decided": rounds[0]["decided"], "tokens": rounds[0]["tokens"],
        }
    gpu = any(s["gpu_peak_mb"] for s in summary.values())
    width = max(12, *(len(k) for k in summary))
    print(f"\n{'variant':<{width}} {'tokens/s':>9} {'tokens/CPU-s':>12} {'train (s)':>9} {'median step (s)':>16} "
          f"{'peak RSS (MB)':>14} "
          f"{'added by training (MB)':>22} {'step peak (MB)':>15}" + (f" {'GPU peak (MB)':>14}" if gpu else "")
          + "  batching in effect")
    for name, s in summary.items():
        d = s["decided"]
        how = (f"padding_free={d['padding_free']} packing={d.get('packing')} "
               f"sampling={d['train_sampling_strategy']} tokens={s['tokens']}")
        print(f"{name:<{width}} {s['tokens_per_s']:>9.0f} {s['tokens_per_cpu_s']:>12.0f} {s['train_s']:>9.1f} "
              f"{s['median_step_s']:>16.3f} "
              f"{s['peak_rss_mb']:>14.0f} {s['train_added_mb']:>22.0f} {s['step_peak_mb']:>15.0f}"
              + (f" {s['gpu_peak_mb'] or 0:>14.0f}" if gpu else "") + "  " + how)
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
    if len(batchings) > 1:
        for v in variants:
            base = summary.get(f"{v}+padded")
            if base:
                for key, what in (("tokens_per_s", "tokens/s"), ("tokens_per_cpu_s", "tokens/CPU-s")):
                    print(f"{v}: {what} vs padded random batches: " + ", ".join(
                        f"{b} {summary[f'{v}+{b}'][key] / base[key]:.2f}x" for b in batchings if b != "padded"))


if __name__ == "__main__":
    main()
