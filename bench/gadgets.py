"""Benchmark the streaming gadgets against plain file I/O on a multi-GB random checkpoint.

    python bench/gadgets.py --size-gb 2 --out /tmp/sfn-bench

Writes two random bf16 Qwen2-shaped checkpoints A and B (several shards, straight to safetensors: no model object),
then, with the files warm in the page cache, times (median of --repeat runs):

- read:  `dd if=SHARD of=/dev/null bs=16M` over A's and B's shards (what delta must at least read). `cat files >
  /dev/null` is printed too, but GNU cat may splice into /dev/null without copying a byte, so it is no read time.
- copy:  `cp A/*.safetensors NEW/` (what merge must at least read and write)
- merge: `merge(A, B, modules="o_proj")` and delta: `delta(A, B, plots=False)`, each in a fresh process under
  `/usr/bin/time -v` for peak RSS; the gadget's own time (without interpreter and torch start-up) is printed too.
  Merge stamps both inputs' fingerprints on its manifest: the first run hashes them (printed separately), later
  runs find them in the fingerprint cache (a bench-local file).

Targets: merge <= 1.5x copy, delta <= 2x read, peak RSS <= largest shard + 1 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

RUNNER = r"""
import json, sys, time
from sfn_train.gadgets import delta, merge
what, a, b, out = sys.argv[1:5]
t = time.perf_counter()
if what == "merge":
    merge(a, b, out, modules="o_proj", overwrite=True, command="bench")
else:
    delta(a, b, out, plots=False, overwrite=True, quiet=True)
print("GADGET_SECONDS", time.perf_counter() - t)
"""


def qwen2_config(hidden: int, layers: int, vocab: int, intermediate: int) -> dict:
    return {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": hidden // 128,
        "num_key_value_heads": 2, "vocab_size": vocab, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "initializer_range": 0.02,
        "layer_types": ["full_attention"] * layers, "use_sliding_window": False,
    }


def tensor_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * 128
    shapes = [("model.embed_tokens.weight", (v, h))]
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes += [
            (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.q_proj.bias", (h,)),
            (p + "self_attn.k_proj.weight", (kv, h)), (p + "self_attn.k_proj.bias", (kv,)),
            (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.v_proj.bias", (kv,)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)), (p + "mlp.down_proj.weight", (h, i)),
        ]
    return shapes + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def write_random_checkpoint(out: Path, cfg: dict, seed: int, shard_bytes: int) -> None:
    """Random N(0, 0.02) bf16 weights, one tensor in memory at a time, greedy shards of <= shard_bytes."""
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    shards, current, size = [], [], 0
    for name, shape in tensor_shapes(cfg):
        nbytes = 2 * int(torch.Size(shape).numel())
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += nbytes
    shards.append(current)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards, 1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for n, s in shard}
        save_file(tensors, out / file, metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
        weight_map.update({n: file for n in tensors})
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(cfg, indent=2))


def run_quiet(argv: list[str]) -> None:
    """Run one command with its output discarded (`> /dev/null` without a shell)."""
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)


def timed(commands: list[list[str]], repeat: int, before=None) -> float:
    """Median over `repeat` runs of the wall time of `commands`, run one after the other (no shell)."""
    times = []
    for _ in range(repeat):
        if before:
            before()
        os.sync()  # the previous run's dirty pages must not be written back during this one
        t = time.perf_counter()
        for argv in commands:
            run_quiet(argv)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def run_gadget(what: str, a: Path, b: Path, out: Path, repeat: int) -> dict:
    """Median wall time, gadget time and max peak RSS over `repeat` fresh processes."""
    time_bin = shutil.which("time") or ("/usr/bin/time" if os.path.exists("/usr/bin/time") else None)
    walls, inner, rss = [], [], []
    env = {**os.environ, "SFN_FINGERPRINT_CACHE": str(out.parent / "fingerprints.json")}
    (out.parent / "fingerprints.json").unlink(missing_ok=True)
    for _ in range(repeat):
        shutil.rmtree(out, ignore_errors=True)  # like the copy baseline, start from no output
        os.sync()
        cmd = [sys.executable, "-c", RUNNER, what, str(a), str(b), str(out)]
        if time_bin:
            cmd = [time_bin, "-v", *cmd]
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        walls.append(time.perf_counter() - t)
        if proc.returncode:
            sys.exit(f"{what} failed:\n{proc.stderr[-3000:]}")
        inner.append(float(re.search(r"GADGET_SECONDS (\S+)", proc.stdout).group(1)))
        match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
        if match:
            rss.append(int(match.group(1)) * 1024)
        else:  # no GNU time: children's peak RSS so far (a maximum over runs, good enough for one gadget)
            import resource

            rss.append(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
    return {"wall_s": statistics.median(walls), "gadget_s": statistics.median(inner), "peak_rss": max(rss),
            "first_gadget_s": inner[0]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-gb", type=float, default=2.0, help="size of each checkpoint (default 2)")
    p.add_argument("--out", default="/tmp/sfn-bench", help="work folder (default /tmp/sfn-bench)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--keep", action="store_true", help="keep the checkpoints for the next run")
    args = p.parse_args(argv)

    work = Path(args.out)
    hidden, vocab, inter = 2048, 32000, 5632
    per_layer = 2 * (2 * hidden * hidden + 2 * 256 * hidden + 3 * hidden * inter + 2 * hidden + 2 * 256 + hidden * 3)
    layers = max(1, round((args.size_gb * 1e9 - 2 * 2 * vocab * hidden) / per_layer))
    cfg = qwen2_config(hidden, layers, vocab, inter)
    shard_bytes = int(max(args.size_gb * 1e9 / 5, 1e8))
    a, b = work / "A", work / "B"
    stamp = work / "stamp.json"
    want = {"cfg": cfg, "shard_bytes": shard_bytes}
    if not (stamp.exists() and json.loads(stamp.read_text()) == want):
        shutil.rmtree(work, ignore_errors=True)
        t = time.perf_counter()
        write_random_checkpoint(a, cfg, 0, shard_bytes)
        write_random_checkpoint(b, cfg, 1, shard_bytes)
        stamp.write_text(json.dumps(want))
        print(f"generated 2 checkpoints in {time.perf_counter() - t:.1f}s")
    shard_files = sorted(a.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in shard_files)
    largest = max(f.stat().st_size for f in shard_files)
    print(f"checkpoint: {layers} layers, {len(shard_files)} shards, {size / 1e9:.2f} GB, largest shard {largest / 1e9:.2f} GB")

    a_files = [str(f) for f in shard_files]
    b_files = [str(f) for f in sorted(b.glob("*.safetensors"))]
    run_quiet(["cat", *a_files, *b_files])  # warm the page cache
    copy_dir = work / "copy"
    cat_ab = timed([["cat", *a_files, *b_files]], args.repeat)

    def dd(files):
        return [["dd", f"if={f}", "of=/dev/null", "bs=16M", "status=none"] for f in files]

    read_a = timed(dd(a_files), args.repeat)
    read_ab = timed(dd(a_files + b_files), args.repeat)
    copy = timed([["cp", *a_files, f"{copy_dir}/"]], args.repeat,
                 before=lambda: (shutil.rmtree(copy_dir, ignore_errors=True), copy_dir.mkdir()))
    shutil.rmtree(copy_dir, ignore_errors=True)
    m = run_gadget("merge", a, b, work / "merged", args.repeat)
    shutil.rmtree(work / "merged", ignore_errors=True)
    d = run_gadget("delta", a, b, work / "delta", args.repeat)

    gb = 1e9
    print(f"read A (dd) {read_a:6.2f}s   read A+B (dd) {read_ab:6.2f}s   cat A+B >/dev/null {cat_ab:6.2f}s   "
          f"copy A (cp) {copy:6.2f}s")
    for name, r, ref, ref_name, target in (("merge", m, copy, "copy", 1.5), ("delta", d, read_ab, "read A+B", 2.0)):
        print(
            f"{name:<6} wall {r['wall_s']:6.2f}s  in-process {r['gadget_s']:6.2f}s (first run {r['first_gadget_s']:.2f}s)  "
            f"ratio {name}/{ref_name} {r['gadget_s'] / ref:5.2f} (wall {r['wall_s'] / ref:5.2f}, target <= {target})  "
            f"peak RSS {r['peak_rss'] / gb:5.2f} GB (largest shard + 1 GB = {(largest + gb) / gb:.2f} GB)"
        )
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
