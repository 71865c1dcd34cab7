"""The same o_proj-only job through sfn-train, ms-swift, axolotl and LLaMA-Factory, side by side.

    .venv/bin/python bench/peers/run.py                      # set up what is missing, then 3 interleaved rounds
    .venv/bin/python bench/peers/run.py --setup-only         # only install the peers
    .venv/bin/python bench/peers/run.py --configs default,best --rounds 3 --json /tmp/peers.json

Not part of CI: it installs packages from PyPI. Each peer gets its own virtual environment under `--home`
(default ~/.cache/sfn-bench-peers, outside the repository), with torch pinned to the CPU build the Makefile uses
(`constraints.txt`: an unpinned torch pulls a 5 GB CUDA build) and the peer pinned to the release measured here
(PEERS below; the newest that installs on Python 3.11 at the time of writing).

The job, identical for every system: a random-weight Qwen2 built from a config (bench/batching.py's builder) with
the lab's byte-level tokenizer and its ChatML template; the length-mix rows of bench/length_mix.py (s1K's length
shape scaled to the context) as single-turn `messages` conversations, rendered with the same ChatML template by every
system (sfn: the tokenizer's own; swift: `--template chatml`; axolotl: `chat_template: chatml`; LLaMA-Factory:
`template: chatml`), loss on the assistant turn only; one epoch, batch 8, context 1024, AdamW at lr 1e-4 with a linear
schedule, no warm-up and no weight decay, fp32, sdpa attention, no activation checkpointing, no dataloader workers,
and the same number of torch threads (`--threads`, OMP_NUM_THREADS, default 1: axolotl's launcher, accelerate, sets 1
on its own when it is unset, and on a shared 2-core machine one thread is also the faster setting).

What is measured, per run: train time (the HF Trainer's own `train_runtime`, which every system prints),
tokens/s (the epoch's real tokens -- the rows' ChatML token counts, the same for every system -- over that time),
wall time of the whole command, peak RSS of the largest process the command started (`wait4`), and which tensors
changed, read from the saved weights against the base (bitwise), and the CPU time of the whole command (all its
processes: start-up, tokenization, training, saving) -- on a shared machine wall times move with the load, CPU time
much less. Each system's own count of the epoch's tokens is shown where it reports one, as a check that every system
trained the same tokens.

Selections: sfn `trainable_modules: [o_proj]`; swift `--freeze_parameters_ratio 1 --trainable_parameters_regex`;
axolotl `unfrozen_parameters` (its documented `.*o_proj.*` form matches nothing; the anchored layer regex does);
LLaMA-Factory cannot name o_proj alone (`freeze_trainable_modules` takes a layer's direct children), so it runs its
nearest selection, `self_attn` (q, k, v, o), and the table says so.

Configurations: `default` is each system's default way of batching (padded batches of randomly sampled rows; sfn:
whatever it chooses for the kernel); `best` is the fastest option each offers on this backend (listed in BEST
below; options that need FlashAttention -- swift's padding_free/packing, axolotl's sample packing with varlen,
LLaMA-Factory's neat_packing -- cannot run on a CPU and are noted as such).

LLaMA-Factory needs torchvision and torchaudio, which PyPI has only as CUDA builds that cannot load next to the CPU
torch: they are removed after its install, and its runs import an empty stand-in `torchaudio` (see
REMOVE_AFTER_INSTALL / STAND_INS below; the text job never touches audio).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE.parent))  # bench/: batching.build_assets, length_mix

PEERS = {  # venv name -> (pip requirement, packages whose versions the table reports)
    "swift": ("ms-swift==4.6.0", ["ms-swift", "transformers", "trl", "peft", "torch"]),
    "axolotl": ("axolotl==0.19.0", ["axolotl", "transformers", "trl", "peft", "torch"]),
    "llamafactory": ("llamafactory==0.9.5", ["llamafactory", "transformers", "trl", "peft", "torch"]),
}
SYSTEMS = ["sfn", "swift", "axolotl", "llamafactory"]
# LLaMA-Factory requires torchvision and torchaudio, and PyPI has them only as CUDA builds, which cannot load next to
# the CPU torch (torchvision: "operator torchvision::nms does not exist", which breaks transformers' import probes;
# torchaudio: "libc10_cuda.so: cannot open shared object file"; no torchaudio release is built for torch 2.13 at all).
# So both are removed after the install, and since LLaMA-Factory imports torchaudio at start-up (for audio inputs of
# its multimodal plugin, never used by a text job), its runs get an empty stand-in module of that name.
REMOVE_AFTER_INSTALL = {"llamafactory": ["torchvision", "torchaudio"]}
STAND_INS = {"llamafactory": {"torchaudio": '"""Stand-in for torchaudio (bench/peers/run.py): text-only jobs never use it."""\n'
                                            "def __getattr__(name):\n"
                                            "    raise ImportError(f'torchaudio.{name}: torchaudio is a stand-in here')\n"}}
O_PROJ = re.compile(r"model\.layers\.\d+\.self_attn\.o_proj\.weight$")
SELF_ATTN = re.compile(r"model\.layers\.\d+\.self_attn\.[qkvo]_proj\.(weight|bias)$")
# the fastest batching option each system offers on this backend (CPU, sdpa), used by `--configs best`
BEST = {  # sfn is not run again: on this backend its default (rows grouped by length) is its fastest option
    "sfn": "its default: padded batches of rows grouped by length (padding_free measured slower with sdpa)",
    "swift": "--group_by_length true (padding_free and packing need FlashAttention)",
    "axolotl": "group_by_length: true (sample_packing needs FlashAttention for cross-row isolation)",
    "llamafactory": "train_sampling_strategy: group_by_length (packing/neat_packing need FlashAttention)",
}
ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "USE_HF": "1",
       "DO_NOT_TRACK": "1", "AXOLOTL_DO_NOT_TRACK": "1", "WANDB_DISABLED": "true", "DISABLE_VERSION_CHECK": "1"}


# --------------------------------------------------------------------------------------------------------------------
# Set-up: one virtual environment per peer
# --------------------------------------------------------------------------------------------------------------------
def setup(home: Path, peers: list[str]) -> dict[str, dict]:
    """Create the missing peer environments; return {peer: {package: version}}."""
    home.mkdir(parents=True, exist_ok=True)
    versions = {}
    for peer in peers:
        venv = home / peer
        requirement, report = PEERS[peer]
        marker = venv / ".installed"
        if not marker.exists() or marker.read_text().strip() != requirement:
            print(f"[peers] installing {requirement} into {venv} (torch pinned: {HERE / 'constraints.txt'})",
                  flush=True)
            shutil.rmtree(venv, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "-c", str(HERE / "constraints.txt")]
            subprocess.run(pip + ["--upgrade", "pip"], check=True)
            subprocess.run(pip + ["torch==2.13.0", requirement], check=True)
            if REMOVE_AFTER_INSTALL.get(peer):
                subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "uninstall", "-q", "-y",
                                *REMOVE_AFTER_INSTALL[peer]], check=True)
            marker.write_text(requirement + "\n")
        probe = ("import importlib.metadata as m, json; "
                 f"print(json.dumps({{p: m.version(p) for p in {report!r}}}))")
        out = subprocess.run([str(venv / "bin" / "python"), "-c", probe], capture_output=True, text=True, check=True)
        versions[peer] = json.loads(out.stdout)
        if not versions[peer]["torch"].startswith("2.13.0"):
            sys.exit(f"[peers] {peer} has torch {versions[peer]['torch']}, not 2.13.0: rerun after removing {venv}")
    return versions


def sfn_versions() -> dict:
    import importlib.metadata as m

    return {p: m.version(p) for p in ("sfn-train", "transformers", "trl", "torch")}


# --------------------------------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------------------------------
def build_job(work: Path, hidden: int, layers: int, rows: int, seq: int) -> dict:
    from length_mix import token_lengths
    from batching import build_assets

    from sfn_train.tiny import build_tokenizer

    model, data, n_params = build_assets(work, hidden, layers, vocab=320, seq=seq, rows=rows, data_kind="length-mix")
    rows_ = [json.loads(line) for line in open(data)]
    messages = work / "messages.jsonl"
    with open(messages, "w") as f:
        for r in rows_:
            f.write(json.dumps({"messages": [{"role": "user", "content": r["prompt"]},
                                             {"role": "assistant", "content": r["completion"]}]}) + "\n")
    (work / "dataset_info.json").write_text(json.dumps({"mix": {
        "file_name": "messages.jsonl", "formatting": "sharegpt", "columns": {"messages": "messages"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}}))
    lengths = [min(n, seq) for n in token_lengths(rows_, build_tokenizer())]
    return {"model": model, "messages": messages, "dataset_dir": work, "n_params": n_params, "rows": len(rows_),
            "tokens": sum(lengths), "seq": seq}


COMMON = dict(batch=8, lr=1e-4, seed=42)


def command(system: str, config: str, job: dict, out: Path, home: Path) -> tuple[list[str], Path]:
    """(argv, folder the final weights land in) for one system and configuration."""
    best = config == "best"
    b, lr, seed, seq = COMMON["batch"], COMMON["lr"], COMMON["seed"], job["seq"]
    if system == "sfn":
        keys = {"model_name_or_path": str(job["model"]), "dataset_name": str(job["messages"]),
                "output_dir": str(out), "trainable_modules": ["o_proj"], "num_train_epochs": 1,
                "per_device_train_batch_size": b, "learning_rate": lr, "lr_scheduler_type": "linear",
                "warmup_steps": 0, "weight_decay": 0.0, "max_length": seq, "bf16": False,
                "gradient_checkpointing": False, "attn_implementation": "sdpa", "dataloader_num_workers": 0,
                "logging_steps": 5, "save_strategy": "no", "report_to": "none", "seed": seed}
        recipe = out.parent / f"{out.name}.yaml"
        recipe.write_text(json.dumps(keys))
        return [sys.executable, "-m", "sfn_train.cli", "train", "--config", str(recipe)], out
    if system == "swift":
        argv = [str(home / "swift" / "bin" / "swift"), "sft", "--model", str(job["model"]), "--model_type", "qwen2",
                "--template", "chatml", "--dataset", str(job["messages"]), "--split_dataset_ratio", "0",
                "--tuner_type", "full", "--freeze_parameters_ratio", "1",
                "--trainable_parameters_regex", r"model\.layers\.\d+\.self_attn\.o_proj\.",
                "--num_train_epochs", "1", "--per_device_train_batch_size", str(b), "--learning_rate", str(lr),
                "--lr_scheduler_type", "linear", "--warmup_ratio", "0", "--weight_decay", "0",
                "--max_length", str(seq), "--torch_dtype", "float32", "--attn_impl", "sdpa",
                "--gradient_checkpointing", "false", "--dataloader_num_workers", "0", "--logging_steps", "5",
                "--save_only_model", "true", "--report_to", "none", "--seed", str(seed), "--output_dir", str(out),
                "--add_version", "false", *(["--group_by_length", "true"] if best else [])]
        return argv, out
    if system == "axolotl":
        cfg = {"base_model": str(job["model"]),
               "datasets": [{"path": str(job["messages"]), "ds_type": "json", "type": "chat_template",
                             "field_messages": "messages", "chat_template": "chatml",
                             "roles_to_train": ["assistant"]}],
               "chat_template": "chatml", "dataset_prepared_path": str(out.parent / f"{out.name}-prepared"),
               "val_set_size": 0, "output_dir": str(out), "sequence_len": seq, "sample_packing": False,
               "micro_batch_size": b, "gradient_accumulation_steps": 1, "num_epochs": 1, "optimizer": "adamw_torch",
               "lr_scheduler": "linear", "learning_rate": lr, "weight_decay": 0.0, "warmup_ratio": 0.0,
               "bf16": False, "fp16": False, "tf32": False, "gradient_checkpointing": False, "sdp_attention": True,
               "unfrozen_parameters": [r"model.layers.[0-9]+.self_attn.o_proj"], "logging_steps": 5,
               "save_strategy": "no", "seed": seed, "dataloader_num_workers": 0, "group_by_length": best}
        path = out.parent / f"{out.name}.yml"
        path.write_text(json.dumps(cfg))
        return [str(home / "axolotl" / "bin" / "axolotl"), "train", str(path)], out
    if system == "llamafactory":
        cfg = {"model_name_or_path": str(job["model"]), "stage": "sft", "do_train": True,
               "finetuning_type": "freeze", "freeze_trainable_layers": 1000, "freeze_trainable_modules": "self_attn",
               "dataset": "mix", "dataset_dir": str(job["dataset_dir"]), "template": "chatml", "cutoff_len": seq,
               "overwrite_cache": True, "preprocessing_num_workers": 1, "output_dir": str(out),
               "per_device_train_batch_size": b, "gradient_accumulation_steps": 1, "num_train_epochs": 1,
               "learning_rate": lr, "lr_scheduler_type": "linear", "warmup_ratio": 0.0, "weight_decay": 0.0,
               "bf16": False, "fp16": False, "flash_attn": "sdpa", "gradient_checkpointing": False,
               "disable_gradient_checkpointing": True, "dataloader_num_workers": 0, "logging_steps": 5,
               "save_strategy": "no", "report_to": "none", "seed": seed, "plot_loss": False,
               "include_effective_tokens_per_second": True,
               **({"train_sampling_strategy": "group_by_length"} if best else {})}
        path = out.parent / f"{out.name}.yaml"
        path.write_text(json.dumps(cfg))
        return [str(home / "llamafactory" / "bin" / "llamafactory-cli"), "train", str(path)], out
    raise ValueError(system)


def changed_tensors(base: Path, tuned: Path) -> list[str]:
    import torch
    from safetensors.torch import load_file

    def load(folder):
        tensors = {}
        for f in sorted(folder.glob("*.safetensors")):
            if f.name != "sfn_plugin.safetensors":
                tensors.update(load_file(f))
        return tensors

    a, b = load(base), load(tuned)
    if not b:
        raise RuntimeError(f"no safetensors weights in {tuned}")
    return sorted(n for n in a if n in b and not torch.equal(a[n], b[n].to(a[n].dtype)))


def weights_folder(out: Path) -> Path:
    """Where a run left its final weights (swift writes into checkpoint-N)."""
    if any(out.glob("*.safetensors")):
        return out
    checkpoints = sorted(out.glob("**/checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    if checkpoints:
        return checkpoints[-1]
    raise RuntimeError(f"no weights under {out}")


def run_one(system: str, config: str, job: dict, work: Path, home: Path, tag: str, timeout: float,
            threads: int) -> dict:
    out = work / f"{system}-{config}-{tag}"
    argv, _ = command(system, config, job, out, home)
    env = {**os.environ, **ENV, "OMP_NUM_THREADS": str(threads)}
    if system != "sfn":
        env["PATH"] = f"{home / system / 'bin'}{os.pathsep}{env['PATH']}"  # as with the peer's venv activated
        env.pop("PYTHONPATH", None)
        if system in STAND_INS:
            shims = work / f"stand-ins-{system}"
            for name, code in STAND_INS[system].items():
                (shims / name).mkdir(parents=True, exist_ok=True)
                (shims / name / "__init__.py").write_text(code)
            env["PYTHONPATH"] = str(shims)
    log = work / f"{out.name}.log"
    started = time.perf_counter()
    with open(log, "w") as f:
        # its own process group, so that a run that hangs (a telemetry thread at exit, say) is killed whole
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=work, start_new_session=True)
        timer = threading.Timer(timeout, os.killpg, (proc.pid, signal.SIGKILL))
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
    wall = time.perf_counter() - started
    text = log.read_text(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{system} ({config}) failed; its output is in {log}:\n{text[-3000:]}")
    runtime = [float(x) for x in re.findall(r"'train_runtime': '?([0-9.]+)", text)]
    if not runtime:
        raise RuntimeError(f"{system} ({config}) printed no train_runtime; see {log}")
    changed = changed_tensors(job["model"], weights_folder(out))
    return {"system": system, "config": config, "train_s": runtime[-1], "wall_s": wall,
            "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mb": usage.ru_maxrss / 1024,
            "tokens_per_s": job["tokens"] / runtime[-1],
            "changed": changed, "own_token_count": own_token_count(system, text, job)}


def own_token_count(system: str, text: str, job: dict) -> int | None:
    """The epoch's real tokens as the system itself reports them (None where it reports none)."""
    if system == "sfn":
        found = re.findall(r"'num_tokens': '?([0-9.e+]+)", text)
        return int(float(found[-1])) if found else None
    if system == "swift":
        found = re.findall(r"Dataset Token Length: ([0-9.]+)±[0-9.]+, min=[0-9.]+, max=[0-9.]+, size=(\d+)", text)
        return round(float(found[-1][0]) * int(found[-1][1])) if found else None
    if system == "axolotl":
        found = re.findall(r"'total_tokens': '?([0-9.e+]+)", text)
        return int(float(found[-1])) if found else None
    return None


def selection_note(system: str, changed: list[str]) -> str:
    if changed and all(O_PROJ.search(n) for n in changed):
        return f"o_proj only ({len(changed)} tensors)"
    if changed and all(SELF_ATTN.search(n) for n in changed):
        return f"NOT o_proj alone: q,k,v,o of self_attn ({len(changed)} tensors; nearest it can express)"
    return f"unexpected: {len(changed)} tensors changed, e.g. {changed[:3]}"


# --------------------------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, default=Path(os.environ.get("SFN_PEERS_HOME",
                                                                           Path.home() / ".cache" / "sfn-bench-peers")))
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--configs", default="default,best")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--work", type=Path, help="keep runs here (default: a temporary folder)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds before a run is killed")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every run (torch's CPU threads)")
    parser.add_argument("--setup-only", action="store_true")
    parser.add_argument("--json", type=Path, help="also write every run's numbers here")
    args = parser.parse_args(argv)

    systems = args.systems.split(",")
    configs = args.configs.split(",")
    versions = setup(args.home, [s for s in systems if s != "sfn"])
    versions["sfn"] = sfn_versions()
    if args.setup_only:
        print(json.dumps(versions, indent=1))
        return 0
    work = args.work or Path(tempfile.mkdtemp(prefix="sfn-peers-"))
    work.mkdir(parents=True, exist_ok=True)
    job = build_job(work, args.hidden, args.layers, args.rows, args.seq)
    load_before = os.getloadavg()
    print(f"[peers] {date.today()}: Qwen2 hidden {args.hidden}, {args.layers} layers ({job['n_params'] / 1e6:.2f}M "
          f"params), {job['rows']} length-mix rows ({job['tokens']} tokens), context {args.seq}, batch "
          f"{COMMON['batch']}, one epoch, fp32, sdpa, {args.threads} torch thread(s); {args.rounds} interleaved rounds; "
          f"load average "
          f"{' '.join(f'{x:.2f}' for x in load_before)}; runs in {work}", flush=True)
    results = []
    for round_ in range(args.rounds):
        for config in configs:
            for system in systems:
                if system == "sfn" and config == "best":
                    continue  # its default is its best here (BEST)
                r = run_one(system, config, job, work, args.home, f"r{round_}", args.timeout, args.threads)
                results.append(r)
                print(f"[peers] round {round_} {system:<12} {config:<7} train {r['train_s']:7.1f} s  "
                      f"{r['tokens_per_s']:7.0f} tokens/s  wall {r['wall_s']:6.1f} s  CPU {r['cpu_s']:6.1f} s  peak RSS "
                      f"{r['peak_rss_mb']:6.0f} MB  {selection_note(system, r['changed'])}", flush=True)
                if args.json:
                    args.json.write_text(json.dumps({"versions": versions, "job": {k: str(v) for k, v in job.items()},
                                                     "results": results}, indent=1))
    load_after = os.getloadavg()

    print(f"\n{date.today()}, {args.rounds} rounds, medians; load average before {load_before[0]:.2f}, after "
          f"{load_after[0]:.2f} (2-core machine)")
    print("| system | version | config | train time (s) | tokens/s | wall (s) | CPU time (s) | peak RSS (MB) "
          "| tensors that changed |")
    print("|---|---|---|---|---|---|---|---|---|")
    medians = {}
    for config in configs:
        for system in systems:
            runs = [r for r in results if r["system"] == system and r["config"] == config]
            if not runs:
                continue
            m = {k: statistics.median(r[k] for r in runs) for k in ("train_s", "tokens_per_s", "wall_s", "cpu_s",
                                                                     "peak_rss_mb")}
            medians[(system, config)] = m
            v = versions[system]
            name = "sfn-train" if system == "sfn" else {"swift": "ms-swift", "axolotl": "axolotl",
                                                         "llamafactory": "LLaMA-Factory"}[system]
            own = runs[0]["own_token_count"]
            print(f"| {name} | {v.get(system if system != 'swift' else 'ms-swift', v.get('sfn-train'))} "
                  f"(transformers {v['transformers']}) | {config if config == 'default' else BEST[system]} | "
                  f"{m['train_s']:.1f} | {m['tokens_per_s']:.0f} | {m['wall_s']:.1f} | {m['cpu_s']:.1f} | "
                  f"{m['peak_rss_mb']:.0f} | "
                  f"{selection_note(system, runs[0]['changed'])}"
                  f"{'' if own is None else f'; own token count {own}'} |")
    peers = [s for s in systems if s != "sfn"]
    if "sfn" in systems and peers and "default" in configs:
        sfn = medians[("sfn", "default")]
        best_default = max(peers, key=lambda s: medians[(s, "default")]["tokens_per_s"])
        print(f"\nsfn default vs the fastest peer default ({best_default}): tokens/s "
              f"{sfn['tokens_per_s'] / medians[(best_default, 'default')]['tokens_per_s']:.2f}x (target >= 1.3x)")
        if "best" in configs:
            best_best = max(peers, key=lambda s: medians[(s, "best")]["tokens_per_s"])
            print(f"sfn default vs the fastest peer configuration ({best_best}, {BEST[best_best]}): tokens/s "
                  f"{sfn['tokens_per_s'] / medians[(best_best, 'best')]['tokens_per_s']:.2f}x (target >= 1.0x)")
        lowest = min(peers, key=lambda s: medians[(s, "default")]["peak_rss_mb"])
        print(f"sfn default vs the lowest peer peak RSS ({lowest}): "
              f"{sfn['peak_rss_mb'] / medians[(lowest, 'default')]['peak_rss_mb']:.2f}x (target <= 1.0x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
