"""Training-step cost of o_proj-only vs full fine-tuning, and ours vs the plain way, measured in one run.

    .venv/bin/python bench/train_step.py                 # ~55M-parameter Qwen2, CPU, a few minutes
    .venv/bin/python bench/train_step.py --hidden 1024 --layers 16 --steps 20
    .venv/bin/python bench/train_step.py --quantize_frozen 4bit   # adds the variant oproj_4bit
    .venv/bin/python bench/train_step.py --engine fsdp2,zero3 --variants full,oproj   # 2 processes per engine

Every variant trains the same model on the same batches through TRL's SFTTrainer, each in its own process (so peak
RSS is that variant's own), alternating variants over `--rounds` to spread machine noise:

- full:        sfn_train.run_sft with trainable_modules: all
- oproj:       sfn_train.run_sft with trainable_modules: [o_proj]
- oproj_plain: TRL's SFTTrainer on a model whose non-o_proj parameters were frozen by hand (the plain way)
- oproj_4bit / oproj_8bit (with --quantize_frozen): oproj with the frozen linear layers quantized by bitsandbytes

With `--engine fsdp2|zero3` (comma-separated for both), each variant also runs as one `torchrun --nproc_per_node 2`
launch under that engine (FSDP2: ds_configs/fsdp2.json; ZeRO-3: ds_configs/zero3.json; gloo on CPU), and the
memory of every rank is reported next to the single-process run's, together with the bytes of gradients and
optimizer state each rank holds, summed from the live tensors after the first step (what "frozen tensors get no
gradient and no optimizer state" means, counted).

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
    """Trainer callback recording the wall time of every optimizer step, and (first step) the bytes of gradients and
    optimizer state held by this process, summed from the live tensors."""

    def __init__(self):
        from transformers import TrainerCallback

        timer = self

        class _Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                timer.rss_at_start = rss_mb()  # weights loaded (and sharded); no gradients or Adam moments yet
                timer.load_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the reset
                reset_peak_rss()

            def on_step_begin(self, args, state, control, **kw):
                timer.start = time.perf_counter()

            def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
                if timer.grad_mb is None:
                    timer.grad_mb = sum(local_bytes(p.grad) for p in model.parameters() if p.grad is not None) / 2**20
                    timer.frozen_grads = sum(p.grad is not None for p in model.parameters() if not p.requires_grad)

            def on_step_end(self, args, state, control, optimizer=None, **kw):
                timer.times.append(time.perf_counter() - timer.start)
                timer.step_peak = max(timer.step_peak, peak_rss_mb())
                if timer.optimizer_mb is None and optimizer is not None:
                    timer.optimizer_mb = optimizer_state_bytes(optimizer) / 2**20

        self.times: list[float] = []
        self.rss_at_start = 0.0
        self.step_peak = self.load_peak = 0.0
        self.grad_mb = self.optimizer_mb = None
        self.frozen_grads = None
        self.callback = _Callback()


def local_bytes(tensor) -> int:
    """Bytes this process holds for `tensor` (its shard, for an FSDP2 DTensor)."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        tensor = tensor.to_local()
    return tensor.numel() * tensor.element_size()


def optimizer_state_bytes(optimizer) -> int:
    """Adam moments held by this process: the torch optimizer's state, under accelerate's and DeepSpeed's wrappers
    (ZeRO's inner optimizer steps this rank's flat fp32 partition, whose state is counted the same way)."""
    import torch

    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return sum(local_bytes(t) for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim())


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


ENGINE_KEYS = {
    "none": {},
    "fsdp2": {"fsdp": True, "fsdp_config": str(Path(__file__).resolve().parent.parent / "ds_configs" /
                                                      "fsdp2.json")},
    "zero3": {"deepspeed": str(Path(__file__).resolve().parent.parent / "ds_configs" / "zero3.json")},
}


def run_variant(variant: str, model_dir: str, data: str, steps: int, batch: int, seq: int, out: str,
                engine: str = "none") -> dict:
    """Runs in a child process (each rank of a torchrun launch, with an engine): train `steps` steps, report step
    times and memory."""
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
        **ENGINE_KEYS[engine],
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
    return {"variant": variant, "engine": engine, "rank": int(os.environ.get("RANK", "0")), "step_s": timer.times,
            "rss_model_mb": timer.rss_at_start, "peak_rss_mb": peak, "train_added_mb": peak - timer.rss_at_start,
            "step_peak_mb": timer.step_peak, "step_added_mb": timer.step_peak - timer.rss_at_start,
            # ZeRO keeps gradients in its own partitioned buffers, not in `.grad`: not counted there
            "grad_mb": None if engine == "zero3" else timer.grad_mb, "optimizer_mb": timer.optimizer_mb,
            "frozen_grads": None if engine == "zero3" else timer.frozen_grads}


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
    parser.add_argument("--engine", default="none",
                        help="also run full and oproj as 2-process torchrun launches under fsdp2 and/or zero3 "
                        "(comma-separated), next to the single-process runs")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        spec = json.loads(args.child)
        result = run_variant(**spec)
        (Path(spec["out"]) / f"result_rank{result['rank']}.json").write_text(json.dumps(result))
        return

    variants = args.variants.split(",")
    if args.quantize_frozen != "none" and f"oproj_{args.quantize_frozen}" not in variants:
        variants.append(f"oproj_{args.quantize_frozen}")
    engines = [e for e in args.engine.split(",") if e != "none"]
    unknown = set(engines) - set(ENGINE_KEYS)
    if unknown:
        sys.exit(f"--engine {','.join(sorted(unknown))}: choose from fsdp2, zero3")
    runs = [("none", v) for v in variants] + [(e, v) for e in engines for v in ("full", "oproj")]
    with tempfile.TemporaryDirectory(prefix="sfn-bench-") as tmp:
        tmp = Path(tmp)
        model_dir, data, n_params = build_assets(tmp, args.hidden, args.layers, args.vocab, args.seq, 64)
        print(f"model: Qwen2 hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}: {n_params / 1e6:.1f}M "
              f"params; batch {args.batch} x {args.seq} tokens per process; {args.steps} steps x {args.rounds} "
              f"rounds; cpus {os.cpu_count()}; engines: single process{''.join(', ' + e for e in engines)}")
        results: dict[tuple[str, str], list[list[dict]]] = {run: [] for run in runs}
        for round_ in range(args.rounds):
            for engine, variant in runs:
                out = tmp / f"{engine}-{variant}-{round_}"
                out.mkdir()
                spec = dict(variant=variant, model_dir=str(model_dir), data=str(data), steps=args.steps,
                            batch=args.batch, seq=args.seq, out=str(out), engine=engine)
                launcher = [sys.executable] if engine == "none" else [
                    sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
                env = {**os.environ, "OMP_NUM_THREADS": "1"} if engine != "none" else None
                proc = subprocess.run([*launcher, __file__, "--child", json.dumps(spec)], capture_output=True,
                                      text=True, env=env)
                ranks = [json.loads(p.read_text()) for p in sorted(out.glob("result_rank*.json"))]
                if proc.returncode != 0 or len(ranks) != (1 if engine == "none" else 2):
                    sys.exit(f"{engine}/{variant} failed:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
                results[(engine, variant)].append(ranks)

    summary = {}
    for (engine, variant), rounds in results.items():
        per_rank = list(zip(*rounds))  # rank -> that rank's result in every round
        times = [t for r in rounds for t in r[0]["step_s"][2:]]
        summary[(engine, variant)] = {
            "median_step_s": statistics.median(times),
            "train_added_mb": statistics.median(r[0]["train_added_mb"] for r in rounds),
            "peak_rss_mb": statistics.median(r[0]["peak_rss_mb"] for r in rounds),
            "step_peak_mb": statistics.median(r[0]["step_peak_mb"] for r in rounds),
            "ranks": [{key: statistics.median(x[key] for x in results_of_rank)
                       for key in ("rss_model_mb", "step_peak_mb", "step_added_mb", "grad_mb", "optimizer_mb")
                       if all(x[key] is not None for x in results_of_rank)}
                      | {"frozen_grads": results_of_rank[0]["frozen_grads"]}
                      for results_of_rank in per_rank],
        }
    single = {v: s for (e, v), s in summary.items() if e == "none"}
    print(f"\n{'variant':<12} {'median step (s)':>16} {'peak RSS (MB)':>14} {'added by training (MB)':>22} "
          f"{'step peak (MB)':>15}")
    for variant, s in single.items():
        print(f"{variant:<12} {s['median_step_s']:>16.3f} {s['peak_rss_mb']:>14.0f} {s['train_added_mb']:>22.0f} "
              f"{s['step_peak_mb']:>15.0f}")
    if "full" in single and "oproj" in single:
        f, o = single["full"], single["oproj"]
        print(f"\noproj / full      step time {o['median_step_s'] / f['median_step_s']:.2f}x   "
              f"peak RSS {o['peak_rss_mb'] / f['peak_rss_mb']:.2f}x   "
              f"training memory {o['train_added_mb'] / f['train_added_mb']:.2f}x")
    if "oproj" in single and "oproj_plain" in single:
        o, p = single["oproj"], single["oproj_plain"]
        print(f"ours / plain      step time {o['median_step_s'] / p['median_step_s']:.2f}x   "
              f"peak RSS {o['peak_rss_mb'] / p['peak_rss_mb']:.2f}x   "
              f"training memory {o['train_added_mb'] / p['train_added_mb']:.2f}x")
    for q in ("oproj_4bit", "oproj_8bit"):
        if "oproj" in single and q in single:
            o, s = single["oproj"], single[q]
            print(f"{q} / oproj  step time {s['median_step_s'] / o['median_step_s']:.2f}x   "
                  f"step peak RSS {s['step_peak_mb'] / o['step_peak_mb']:.2f}x")
    if engines:
        print_engine_memory(summary, engines)


def print_engine_memory(summary: dict, engines: list[str]) -> None:
    """Per rank: RSS once the model is loaded and sharded, the step peak, what training adds, and the gradient and
    optimizer bytes of the live tensors; then o_proj / full per rank against the single-process ratio."""
    rows = [("none", "single process")] + [(e, e) for e in engines]
    print(f"\n{'engine':<15} {'variant':<6} {'rank':>4} {'RSS loaded':>11} {'step peak':>10} {'added':>8} "
          f"{'grads':>8} {'optimizer':>10} {'frozen grads':>13}   (MB)")
    for engine, label in rows:
        for variant in ("full", "oproj"):
            s = summary.get((engine, variant))
            if s is None:
                continue
            for rank, r in enumerate(s["ranks"]):
                grads = f"{r['grad_mb']:.1f}" if "grad_mb" in r else "n/a"
                print(f"{label:<15} {variant:<6} {rank:>4} {r['rss_model_mb']:>11.0f} {r['step_peak_mb']:>10.0f} "
                      f"{r['step_added_mb']:>8.0f} {grads:>8} {r.get('optimizer_mb', float('nan')):>10.1f} "
                      f"{r['frozen_grads'] if r['frozen_grads'] is not None else 'n/a':>13}")
    base = summary.get(("none", "full")), summary.get(("none", "oproj"))
    if None in base:
        return
    single = base[1]["step_peak_mb"] / base[0]["step_peak_mb"]
    print(f"\no_proj / full step-peak RSS: single process {single:.2f}x", end="")
    for engine in engines:
        full, oproj = summary[(engine, "full")], summary[(engine, "oproj")]
        ratios = [o["step_peak_mb"] / f["step_peak_mb"] for o, f in zip(oproj["ranks"], full["ranks"])]
        print(f"; {engine} per rank " + ", ".join(f"{x:.2f}x" for x in ratios), end="")
    print()
    # What o_proj-only saves against what the frozen tensors' gradients and Adam moments would have cost (the live
    # bytes of the full run minus those of the o_proj run): near 100% means no memory is kept for frozen tensors.
    print("step-peak saving of o_proj vs full / gradient+optimizer bytes of the frozen tensors:", end="")
    for engine, label in rows:
        full, oproj = summary.get((engine, "full")), summary.get((engine, "oproj"))
        if full is None or oproj is None or "grad_mb" not in full["ranks"][0]:
            continue
        shares = []
        for f, o in zip(full["ranks"], oproj["ranks"]):
            frozen = f["grad_mb"] + f["optimizer_mb"] - o["grad_mb"] - o["optimizer_mb"]
            shares.append(f"{f['step_peak_mb'] - o['step_peak_mb']:.0f}/{frozen:.0f} MB = "
                          f"{(f['step_peak_mb'] - o['step_peak_mb']) / frozen:.0%}")
        print(f"  {label}: " + ", ".join(shares), end="")
    print()


if __name__ == "__main__":
    main()
