"""The prepared GPU check: every GPU path of sfn-train, PASS/FAIL with numbers, in one short run.

Launched by tools/gpu_check/run.sh (which installs the carried wheels first); docs/development.md says how. Two parts,
run cheapest first, so that each device call carries at most 64 MiB of wheels:

  --part quant   env, quant_4bit, quant_8bit                                        (~1-2 min)
  --part train   env, bf16_oproj (one process), eval (HF backend, base+plugin; vLLM when importable), zero2
                 (torchrun, 1 process), zero3_f2 (torchrun, F2 selection), fsdp2 (accelerate launch,
                 ds_configs/accelerate_fsdp2.yaml), padding_free (per attention kernel), throughput
                 (Qwen2.5-1.5B-shaped, seq 4096, checkpointing: o_proj / F2 / full, each beside `sfn memory`'s plan)

Models are built from configs (random weights, no hub). Each training step trains a bf16 base at lr 1e-5 and checks
that exactly the selected tensors changed, that every other tensor is bitwise the base, that the saved checkpoint has
the base's names, shapes and dtypes, and that >= 90% of the o_proj elements moved in the full-precision plugin.

Time: the run has a budget (--budget, default 390 s for train and 180 s for quant, so that a device command with the
wheel install ends within 7 minutes); each step is capped at min(its own cap, what is left), a step that would start
with under 20 s left is SKIPped, and every finished step's result is saved as soon as it ends. The `env` step checks
every installed requirement first and, when one is unmet, the training steps are SKIPped (--keep-going runs them).

Output (OUT, at most 8 files so that the device tool brings all of them back): gpu_check.json (every step's status,
seconds and numbers), steps.log (the full log of every step: launcher and child output, tracebacks), console.log
(run.sh's tee of stdout).

`--dry-run` runs the same steps on the CPU with tiny models (CI runs it): what is checked there is the check itself.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))
from wheels import check_wheels, read_wheel_list  # noqa: E402  (the wheel list and its check, stdlib + pip only)

PARTS = {"quant": ["env", "quant_4bit", "quant_8bit"],  # cheapest first: the parts, and the steps in each
         "train": ["env", "bf16_oproj", "eval", "zero2", "zero3_f2", "fsdp2", "padding_free", "throughput"]}
BUDGET = {"train": 390, "quant": 180}  # seconds for check.py itself; the wheel install comes on top
STEP_CAP = {"env": 60, "bf16_oproj": 60, "eval": 60, "zero2": 75, "zero3_f2": 75, "fsdp2": 75, "padding_free": 60,
            "throughput": 240, "quant_4bit": 75, "quant_8bit": 75}
MIN_START = 20  # a step that would start with less than this left is skipped
ALARM_GRACE = 15  # the in-process backstop fires this long after a step's cap (launched children stop at the cap)
NEEDS_ENV = {"bf16_oproj", "eval", "zero2", "zero3_f2", "fsdp2", "throughput", "quant_4bit", "quant_8bit"}
F2 = ["embed", "lm_head", "norm", "o_proj"]
LR = 1e-5
MOVED_MIN = 0.9  # fraction of o_proj elements that must move (fp32 masters at lr 1e-5; bf16 weights move ~15%)


# --------------------------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------------------------
class Skip(Exception):
    """A step that cannot run here, with the reason (reported as SKIP, not FAIL)."""


class StepTimeout(Exception):
    """An in-process step ran past its cap (raised by SIGALRM in the main thread)."""


class Report:
    """Runs the steps within the budget; saves gpu_check.json after each step and appends every log to steps.log."""

    def __init__(self, out: Path, device: str, budget: float):
        self.out, self.device, self.steps = out, device, []
        self.deadline = time.monotonic() + budget if budget else None
        self.stop_reason = ""

    def left(self) -> float:
        return self.deadline - time.monotonic() if self.deadline else float("inf")

    def log(self, title: str, text: str) -> None:
        with open(self.out / "steps.log", "a") as f:
            f.write(f"\n===== {title}\n{text.rstrip()}\n")

    def run(self, name: str, func, ctx) -> None:
        started = time.perf_counter()
        cap = min(STEP_CAP.get(name, 60) * (1 if ctx.cuda else 10), self.left())  # dry runs: the CPU, 10x the time
        print(f"--- {name} (cap {cap:.0f}s)", flush=True)
        ctx.step, ctx.step_deadline = name, time.monotonic() + cap
        if self.stop_reason and name in NEEDS_ENV:
            status, numbers, note = "SKIP", {}, self.stop_reason
        elif self.left() < MIN_START:
            status, numbers, note = "SKIP", {}, f"{self.left():.0f}s left of the run's budget (--budget)"
        else:
            status, numbers, note = self._call(name, func, ctx, cap)
        seconds = time.perf_counter() - started
        self.steps.append({"step": name, "status": status, "seconds": round(seconds, 1), "numbers": numbers,
                           "note": note})
        shown = " ".join(f"{k}={_fmt(v)}" for k, v in numbers.items() if not isinstance(v, (dict, list)))
        print(f"{status:<4} {name:<13} {seconds:6.1f}s  {shown}{'  -- ' + note if note else ''}", flush=True)
        self.save()

    def _call(self, name: str, func, ctx, cap: float):
        """(status, numbers, note) of one step; in-process work is stopped by an alarm a little after the cap."""
        previous = signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(max(1, int(cap) + ALARM_GRACE))  # launched children stop at the cap; this is the backstop
        try:
            numbers = func(ctx) or {}
            failed = numbers.pop("_failed", [])
            return ("FAIL", numbers, "; ".join(failed)) if failed else ("PASS", numbers, "")
        except Skip as exc:
            return "SKIP", {}, str(exc)
        except Exception as exc:  # noqa: BLE001 - a failing step is a result, and the next steps still run
            self.log(f"{name}: traceback", traceback.format_exc())
            text = str(exc).strip()
            return "FAIL", {}, f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}"
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)

    def save(self) -> None:
        (self.out / "gpu_check.json").write_text(json.dumps({"device": self.device, "steps": self.steps}, indent=1))

    @property
    def failed(self) -> bool:
        return any(s["status"] == "FAIL" for s in self.steps)


def _alarm(signum, frame):
    raise StepTimeout("the step ran past its cap")


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# --------------------------------------------------------------------------------------------------------------------
# Shared set-up
# --------------------------------------------------------------------------------------------------------------------
class Context:
    def __init__(self, args):
        import torch

        self.dry = args.dry_run
        self.cuda = torch.cuda.is_available() and not self.dry
        if not self.dry and not self.cuda:
            raise SystemExit("gpu_check: no CUDA GPU is visible; use --dry-run on a machine without one.")
        self.work = Path(args.work or tempfile.mkdtemp(prefix="sfn-gpu-check-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.steps = 3 if self.dry else 6
        self.with_7b = args.with_7b and not self.dry
        self.keep_going = args.keep_going
        self.gpu_bytes = torch.cuda.get_device_properties(0).total_memory if self.cuda else 0
        self.python = sys.executable
        self._base = self._data = None
        self.report = None  # set by main: where launch() writes the logs
        self.step, self.step_deadline = "", time.monotonic()

    # a small bf16 Qwen2 (random weights) and reasoning rows: the correctness steps train this
    def base(self) -> Path:
        if self._base is None:
            import torch

            from sfn_train.tiny import save_tiny_checkpoint

            size = {} if self.dry else dict(hidden=256, layers=4, intermediate_size=704)
            self._base = save_tiny_checkpoint(self.work / "base-bf16", "qwen2", seed=0, dtype=torch.bfloat16, **size)
        return self._base

    def data(self) -> Path:
        if self._data is None:
            from sfn_train.lab.problems import generate, sft_rows, write_jsonl

            self._data = write_jsonl(self.work / "rows.jsonl", sft_rows(generate(64, (2, 3), seed=0), "reasoning"))
        return self._data

    def recipe(self, name: str, **keys) -> Path:
        import yaml

        folder = self.work / name
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        recipe = dict(model_name_or_path=str(self.base()), dataset_name=str(self.data()),
                      output_dir=str(folder / "out"), max_steps=self.steps, per_device_train_batch_size=4,
                      learning_rate=LR, logging_steps=1, save_strategy="no", report_to="none", seed=0, max_length=256,
                      dtype="bfloat16", bf16=self.cuda, gradient_checkpointing=self.cuda, disable_tqdm=True)
        recipe.update(keys)
        (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
        return folder / "recipe.yaml"

    def left(self) -> float:
        """Seconds left of the current step's cap."""
        return self.step_deadline - time.monotonic()

    def launch(self, cmd: list[str], title: str, env: dict | None = None) -> str:
        """Run a child (torchrun / accelerate / a measuring child) until the step's cap; returns its output.

        Its whole output goes to steps.log whatever happens; a timeout or a nonzero exit raises with the last lines.
        """
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1" if self.dry else "8"),
               **(env or {})}
        timeout = max(1.0, self.left())
        log = self.work / f"{title.replace(' ', '_').replace('/', '_')}.log"
        with open(log, "w") as f:  # its own process group: a timeout ends the launcher's workers too
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
            finally:
                if proc.poll() is None:  # past the cap, or interrupted (Ctrl-C, the step's alarm)
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    self.report.log(f"{self.step}: {title} (killed after {timeout:.0f}s)", log.read_text())
        text = log.read_text()
        if proc.returncode == -signal.SIGKILL:
            raise RuntimeError(f"{title}: no result within the step's cap ({timeout:.0f}s); log in steps.log")
        self.report.log(f"{self.step}: {title} (exit {proc.returncode})", text)
        if proc.returncode != 0:
            tail = text.strip().splitlines()[-3:]
            raise RuntimeError(f"{title}: exit {proc.returncode}: {' | '.join(tail)[-300:]} (full log in steps.log)")
        return text


def train_in_process(recipe: Path) -> Path:
    from sfn_train.cli import main

    rc = main(["train", "--config", str(recipe)])
    if rc != 0:
        raise RuntimeError(f"sfn train exited {rc}")
    return recipe.parent / "out"


def header(folder: Path) -> dict:
    """name -> (dtype, shape) of every tensor in a checkpoint folder (the plugin excluded)."""
    from safetensors import safe_open

    found = {}
    for file in sorted(folder.glob("*.safetensors")):
        if file.name == "sfn_plugin.safetensors":
            continue
        with safe_open(str(file), "pt") as f:
            for name in f.keys():
                s = f.get_slice(name)
                found[name] = (s.get_dtype(), tuple(s.get_shape()))
    return found


def check_run(base: Path, out: Path, modules: list[str], extra: dict | None = None) -> dict:
    """The checks every training step shares; returns numbers and, under `_failed`, what went wrong."""
    import torch
    from safetensors.torch import load_file

    from sfn_train.roles import select_names

    def load(folder):
        t = {}
        for file in sorted(folder.glob("*.safetensors")):
            if file.name != "sfn_plugin.safetensors":
                t.update(load_file(file))
        return t

    failed = []
    a, b = load(base), load(out)
    plugin = load_file(out / "sfn_plugin.safetensors")
    selected = set(select_names(list(a), modules, ["all"]))
    if set(plugin) != selected:
        failed.append(f"plugin tensors {sorted(set(plugin) ^ selected)[:3]} differ from the selection")
    if header(base) != header(out):
        failed.append("saved names/shapes/dtypes differ from the base's")
    frozen_changed = [n for n in a if n not in selected and not torch.equal(a[n], b[n])]
    if frozen_changed:
        failed.append(f"{len(frozen_changed)} frozen tensors changed, e.g. {frozen_changed[0]}")
    unmoved = [n for n in selected if n in plugin and torch.equal(a[n].float(), plugin[n].float())]
    if unmoved:
        failed.append(f"{len(unmoved)} selected tensors did not move, e.g. {unmoved[0]}")
    moved = [(plugin[n].float() != a[n].float()).float().mean().item() for n in selected if "o_proj" in n]
    if moved and min(moved) < MOVED_MIN:
        failed.append(f"only {min(moved):.1%} of an o_proj's elements moved (need {MOVED_MIN:.0%})")
    rounded = all(torch.equal(b[n], plugin[n].to(b[n].dtype)) for n in selected)
    if not rounded:
        failed.append("the checkpoint's trained tensors are not the plugin's rounded to the checkpoint dtype")
    ckpt_moved = [(b[n].float() != a[n].float()).float().mean().item() for n in selected if "o_proj" in n]
    manifest = json.loads((out / "sfn_manifest.json").read_text())
    precision = manifest.get("precision") or {}
    numbers = {
        "selected": len(selected), "frozen_bitwise": len(a) - len(selected) - len(frozen_changed),
        "oproj_moved_min": round(min(moved), 4) if moved else None,
        "oproj_moved_in_bf16_ckpt": round(statistics.mean(ckpt_moved), 4) if ckpt_moved else None,
        "plugin_dtype": sorted({str(t.dtype).removeprefix("torch.") for t in plugin.values()}),
        "ckpt_dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in b.values()}),
        "engine": precision.get("engine"), "trainable_dtypes": precision.get("trainable_dtypes"),
        "frozen_dtypes": precision.get("frozen_dtypes"), "optimizer_dtypes": precision.get("optimizer_param_dtypes"),
        "mixed_precision": precision.get("mixed_precision"),
        "train_s": round(manifest.get("metrics", {}).get("wall_s", 0.0), 2),
        "final_loss": final_loss(out),
        **(extra or {}),
    }
    if manifest.get("status") != "complete":
        failed.append(f"manifest status {manifest.get('status')}")
    numbers["_failed"] = failed
    return numbers


def final_loss(out: Path) -> float | None:
    state = out / "trainer_state.json"
    if not state.is_file():
        return None
    history = json.loads(state.read_text()).get("log_history", [])
    return next((e["loss"] for e in reversed(history) if "loss" in e), None)


# --------------------------------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------------------------------
def step_env(ctx) -> dict:
    """Versions in use, the GPU, and whether every installed distribution's requirements are met here."""
    import torch

    names = ["torch", "transformers", "trl", "accelerate", "deepspeed", "peft", "datasets", "safetensors",
             "bitsandbytes", "liger-kernel", "flash-attn", "vllm", "huggingface-hub", "tokenizers", "pyarrow",
             "sfn-train"]
    numbers = {n: _version(n) for n in names}
    numbers["python"] = sys.version.split()[0]
    if ctx.cuda:
        numbers["gpu"] = torch.cuda.get_device_name()
        numbers["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        numbers["gpu_mem_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        numbers["cuda"] = torch.version.cuda
    import sfn_train

    numbers["sfn_train_from"] = str(Path(sfn_train.__file__).parent)
    _, _, accepted = read_wheel_list()
    unmet = unmet_requirements(["trl", "datasets", "deepspeed", "bitsandbytes", "math-verify", "liger-kernel",
                                "transformers", "peft", "pydantic", "sfn-train"], skip=set(accepted))
    numbers["unmet_requirements"] = unmet
    if ctx.dry:
        problems = check_wheels(REPO / ".whl") if (REPO / ".whl").is_dir() else []
        numbers["wheel_problems"] = [p for p in problems if not p.startswith("unverified:")]
        if numbers["wheel_problems"]:
            numbers["_failed"] = numbers["wheel_problems"]
    elif unmet:
        print("     unmet requirements:" + "".join(f"\n       {line}" for line in unmet))
        numbers["_failed"] = [f"{len(unmet)} unmet requirement(s), e.g. {unmet[0]}"]
        if not ctx.keep_going:
            ctx.report.stop_reason = "env found unmet requirements (carry the wheels it names; --keep-going runs anyway)"
    return numbers


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def unmet_requirements(dists: list[str], skip: set[str] = frozenset()) -> list[str]:
    """`dist needs REQ, have VERSION` for every Requires-Dist of the installed `dists` that the environment fails
    (requirements on the distributions in `skip`, normalized names, are accepted as they are: wheels.txt `accept`)."""
    from packaging.requirements import Requirement

    from wheels import normalize

    found = []
    for dist in dists:
        try:
            requires = importlib.metadata.requires(dist) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for line in requires:
            req = Requirement(line)
            if (req.marker and not req.marker.evaluate({"extra": ""})) or normalize(req.name) in skip:
                continue
            have = _version(req.name)
            if have is None or (req.specifier and not req.specifier.contains(have, prereleases=True)):
                found.append(f"{dist} needs {req.name}{req.specifier}, have {have or 'none'}")
    return found


def step_bf16_oproj(ctx) -> dict:
    out = train_in_process(ctx.recipe("bf16_oproj"))
    return check_run(ctx.base(), out, ["o_proj"])


def _torchrun(ctx, name: str, modules: list[str], ds_config: str) -> dict:
    if importlib.util.find_spec("deepspeed") is None:
        raise Skip("deepspeed is not installed (carry .whl/train)")
    # bf16 also in a dry run: without it DeepSpeed computes in fp32 and casts the bf16 base, frozen tensors too, to fp32
    recipe = ctx.recipe(name, deepspeed=str(REPO / "ds_configs" / ds_config), trainable_modules=modules, bf16=True)
    ctx.launch([ctx.python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                str(REPO / "train" / "sft.py"), "--config", str(recipe)], f"torchrun {ds_config}")
    numbers = check_run(ctx.base(), recipe.parent / "out", modules)
    manifest = json.loads((recipe.parent / "out" / "sfn_manifest.json").read_text())
    numbers["deepspeed_stage"] = manifest.get("deepspeed_stage")
    if numbers["deepspeed_stage"] != int(ds_config[4]):
        numbers["_failed"].append(f"manifest deepspeed_stage {numbers['deepspeed_stage']}")
    return numbers


def step_zero2(ctx) -> dict:
    return _torchrun(ctx, "zero2", ["o_proj"], "zero2.json")


def step_zero3_f2(ctx) -> dict:
    return _torchrun(ctx, "zero3_f2", F2, "zero3.json")


def step_fsdp2(ctx) -> dict:
    """One FSDP2 bf16 run through accelerate, with the engine's own config (ds_configs/accelerate_fsdp2.yaml).

    On the GPU one process; in a dry run two CPU processes (gloo), since a world of one has nothing to shard. Besides
    the checks every training step shares: the manifest must record FSDP2 in effect, read from the live model (every
    parameter a sharded DTensor), and fp32 masters of the trained tensors only, the frozen ones left as loaded.
    """
    config = REPO / "ds_configs" / "accelerate_fsdp2.yaml"
    if not config.is_file():
        raise Skip("FSDP2 support not on this branch (no ds_configs/accelerate_fsdp2.yaml)")
    processes = 2 if ctx.dry else 1
    # bf16 also in a dry run: accelerate keeps fp32 masters of the trained tensors only under mixed precision
    recipe = ctx.recipe("fsdp2", bf16=True, per_device_train_batch_size=2)
    ctx.launch([ctx.python, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes",
                str(processes), "--main_process_port", str(free_port()), str(REPO / "train" / "sft.py"),
                "--config", str(recipe)], "accelerate launch fsdp2")
    numbers = check_run(ctx.base(), recipe.parent / "out", ["o_proj"])
    manifest = json.loads((recipe.parent / "out" / "sfn_manifest.json").read_text())
    in_effect = (manifest.get("engine") or {}).get("in_effect") or {}
    numbers.update(processes=in_effect.get("processes"), engine_in_effect=in_effect.get("engine"),
                   sharded_dtensor_params=in_effect.get("sharded_dtensor_params"),
                   parameter_tensors=in_effect.get("parameter_tensors"),
                   master_weights=(manifest.get("precision") or {}).get("master_weights"))
    if in_effect.get("engine") != "fsdp2" or in_effect.get("processes") != processes:
        numbers["_failed"].append(f"manifest engine in effect {in_effect.get('engine')} on "
                                  f"{in_effect.get('processes')} process(es), not fsdp2 on {processes}")
    elif in_effect.get("sharded_dtensor_params") != in_effect.get("parameter_tensors"):
        numbers["_failed"].append(f"only {in_effect.get('sharded_dtensor_params')} of "
                                  f"{in_effect.get('parameter_tensors')} parameters sharded")
    if numbers.get("optimizer_dtypes") != {"float32": numbers["selected"]}:
        numbers["_failed"].append(f"optimizer holds {numbers.get('optimizer_dtypes')}, not the "
                                  f"{numbers['selected']} trained tensors in fp32")
    if numbers.get("frozen_dtypes") != {"bfloat16": numbers["frozen_bitwise"]}:
        numbers["_failed"].append(f"frozen tensors in effect {numbers.get('frozen_dtypes')}, not bf16 as loaded")
    upcast = (manifest.get("precision") or {}).get("upcast_from")
    if upcast != ["bfloat16"]:
        numbers["_failed"].append(f"manifest precision upcast_from {upcast}, not the bf16 the engine upcast")
    return numbers


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def step_padding_free(ctx) -> dict:
    """Loss and gradients of a padding-free batch vs the same rows padded, per attention kernel that runs here."""
    import torch

    from sfn_train.startup import PADDING_FREE_VERIFIED
    from sfn_train.tiny import tiny_model

    kernels = ["eager", "sdpa"]
    if ctx.cuda:
        kernels.append("flex_attention")
        if importlib.util.find_spec("flash_attn") is not None:
            kernels.append("flash_attention_2")
    numbers, failed = {}, []
    device = "cuda" if ctx.cuda else "cpu"
    for kernel in kernels:
        dtypes = [torch.float32] if "flash" not in kernel else []
        if ctx.cuda and kernel != "flex_attention":  # flex compiles per dtype: fp32 only, to keep the check short
            dtypes.append(torch.bfloat16)
        for dtype in dtypes:
            model = tiny_model("qwen2").to(device=device, dtype=dtype)
            try:
                model.set_attn_implementation(kernel)
                diff = padding_free_difference(model, device)
            except Exception as exc:  # noqa: BLE001 - a kernel that cannot run here is reported, not fatal
                numbers[f"{kernel}_{str(dtype)[6:]}"] = f"cannot run: {type(exc).__name__}: {str(exc)[:120]}"
                continue
            key = f"{kernel}_{str(dtype)[6:]}"
            numbers.update({f"{key}_{k}": float(f"{v:.3g}") for k, v in diff.items()})
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            if kernel in PADDING_FREE_VERIFIED and diff["row_loss_max_abs"] > tol:
                failed.append(f"{key}: padding-free row losses differ by {diff['row_loss_max_abs']:.2e}")
    numbers["_failed"] = failed
    return numbers


def padding_free_difference(model, device: str) -> dict:
    """Max differences between a padding-free batch and the same rows padded (TRL's collator, as SFTTrainer)."""
    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    g = torch.Generator().manual_seed(1)
    rows = []
    for length in (5, 17, 9, 30):
        ids = torch.randint(3, model.config.vocab_size, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100, -100] + ids[2:]})

    def run(padding_free):
        model.zero_grad()
        batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=padding_free)(rows)
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        out = model(**batch, use_cache=False)
        out.loss.backward()
        logits, labels = out.logits.float(), batch["labels"]
        if padding_free:
            starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [labels.shape[1]]
            pieces = [(logits[0, a:b - 1], labels[0, a + 1:b]) for a, b in zip(starts[:-1], starts[1:])]
        else:
            pieces = [(logits[i, :-1], labels[i, 1:]) for i in range(len(rows))]
        per_row = torch.stack([torch.nn.functional.cross_entropy(x, y, ignore_index=-100) for x, y in pieces])
        return out.loss.detach().float(), per_row.detach(), {n: p.grad.float().clone()
                                                             for n, p in model.named_parameters()}

    (lp, rp, gp), (lf, rf, gf) = run(False), run(True)
    return {"loss_abs": float((lp - lf).abs()), "row_loss_max_abs": float((rp - rf).abs().max()),
            "grad_max_abs": max(float((gp[n] - gf[n]).abs().max()) for n in gp),
            "grad_max_rel": max(float((gp[n] - gf[n]).abs().max() / gp[n].abs().max().clamp_min(1e-30)) for n in gp)}


def step_throughput(ctx) -> dict:
    """tokens/s and peak GPU memory of o_proj-only, F2 and full fine-tuning, measured in this one run."""
    numbers = throughput(ctx, "1.5b")
    if ctx.with_7b:
        seven = throughput(ctx, "7b")
        failed = numbers["_failed"] + seven.pop("_failed")
        numbers.update({f"7b_{k}": v for k, v in seven.items()})
        numbers["_failed"] = failed
    return numbers


def throughput(ctx, size: str) -> dict:
    """Each variant in its own child, one after the other, each beside the memory planner's prediction for it.

    A variant that fails or runs out of the step's time is reported and the others' numbers are kept.
    """
    model_dir, data, shape = throughput_assets(ctx, size)
    variants = {"oproj": ["o_proj"], "f2": F2, "full": ["all"]}
    if shape["params_b"] * 1e9 * 16 > 0.85 * ctx.gpu_bytes and ctx.cuda:  # fp32 weights, grads, Adam moments
        del variants["full"]
    if importlib.util.find_spec("liger_kernel") is not None and ctx.cuda and size == "1.5b":
        variants["oproj_liger"] = ["o_proj"]  # use_liger_kernel: Triton RMSNorm, SwiGLU, RoPE, fused linear-CE
    recipes = {name: throughput_recipe(ctx, size, name, model_dir, data, modules, shape["seq"])
               for name, modules in variants.items()}
    plans = {name: start_plan(ctx, recipe) for name, recipe in recipes.items() if not name.endswith("liger")}
    results, failed, notes = {}, [], {}
    if ctx.cuda:
        notes["parent_reserved_gib"] = free_parent_gpu()  # what this process holds on the GPU while children run
    for name, recipe in recipes.items():
        try:
            if ctx.dry:  # the CPU has no peak-memory counter to isolate: save the child processes' start-up time
                results[name] = throughput_child(str(recipe), ctx.dry)
                continue
            text = ctx.launch([ctx.python, __file__, "throughput-child", str(recipe)], f"throughput {size} {name}")
            results[name] = json.loads([l for l in text.splitlines() if l.startswith("RESULT ")][-1][7:])
        except (RuntimeError, IndexError) as exc:
            if name.endswith("liger"):  # an optional extra: reported, not a failure of the check
                notes[name] = f"failed: {exc}"
            else:
                failed.append(f"{name}: {exc}")
    notes.update(collect_plans(ctx, plans, results))
    if "full" not in variants:
        notes["full"] = f"not run: {shape['params_b']}B parameters x 16 bytes exceed 85% of this GPU's memory"
    numbers = {"model": shape["label"], "params_b": shape["params_b"], "seq": shape["seq"], **notes}
    for n, r in results.items():
        numbers.update({f"{n}_tok_s": round(r["tokens_per_s"], 1), f"{n}_peak_gib": round(r["peak_gib"], 2),
                        f"{n}_reserved_gib": round(r.get("reserved_gib", 0.0), 2)})
    if "full" in results:
        for n in results:
            if n != "full":
                numbers[f"{n}/full_tok_s"] = round(results[n]["tokens_per_s"] / results["full"]["tokens_per_s"], 3)
                if results["full"]["peak_gib"]:
                    numbers[f"{n}/full_peak"] = round(results[n]["peak_gib"] / results["full"]["peak_gib"], 3)
    numbers["details"] = results
    numbers["_failed"] = failed
    return numbers


def free_parent_gpu() -> float:
    """Release what this (parent) process cached on the GPU; returns the GiB it still reserves (its live tensors)."""
    import gc

    import torch

    gc.collect()
    torch.cuda.empty_cache()
    return round(torch.cuda.memory_reserved() / 2**30, 3)


def throughput_recipe(ctx, size, name, model_dir, data, modules, seq) -> Path:
    """The recipe a throughput child trains, written by the parent so that the planner reads the very same file."""
    out = ctx.work / f"tp-{size}-{name}"
    out.mkdir(parents=True, exist_ok=True)
    recipe = out / "recipe.json"
    recipe.write_text(json.dumps({
        "model_name_or_path": str(model_dir), "dataset_name": str(data), "output_dir": str(out / "run"),
        "max_steps": 4 if ctx.dry else 7, "per_device_train_batch_size": 1, "max_length": seq,
        "learning_rate": LR, "logging_steps": 1, "save_strategy": "no", "report_to": "none", "seed": 0,
        "dtype": "bfloat16", "bf16": ctx.cuda, "gradient_checkpointing": True, "attn_implementation": "sdpa",
        "use_liger_kernel": name.endswith("liger"), "disable_tqdm": True, "trainable_modules": modules,
        "overwrite_output_dir": True,
    }))
    return recipe


def start_plan(ctx, recipe: Path):
    """`sfn memory --config RECIPE --json` in the background: fake tensors on the CPU, beside the GPU children."""
    log = recipe.parent / "plan.json"
    with open(log, "w") as f:
        proc = subprocess.Popen([ctx.python, "-m", "sfn_train.cli", "memory", "--config", str(recipe), "--json"],
                                cwd=REPO, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log


def collect_plans(ctx, plans: dict, results: dict) -> dict:
    """The planner's peak per variant beside the measured one: `<v>_plan_gib` and `<v>_plan_err_pct` (vs allocated)."""
    numbers = {}
    for name, (proc, log) in plans.items():
        try:
            proc.wait(timeout=max(1.0, ctx.left()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        text = log.read_text()
        ctx.report.log(f"{ctx.step}: sfn memory {name} (exit {proc.returncode})", text)
        try:
            plan = json.loads(text[text.index("{"):])
        except ValueError:
            last = text.strip().splitlines()[-1][:200] if text.strip() else f"exit {proc.returncode}"
            numbers[f"{name}_plan"] = f"unavailable: {last}"
            continue
        numbers[f"{name}_plan_gib"] = round(plan["peak_bytes"] / 2**30, 3)
        measured = results.get(name, {}).get("peak_gib")
        if measured:
            numbers[f"{name}_plan_err_pct"] = round(100 * (plan["peak_bytes"] / 2**30 - measured) / measured, 1)
    return numbers


def throughput_assets(ctx, size: str = "1.5b"):
    """A Qwen2.5-1.5B- (or 7B-) shaped bf16 checkpoint, random weights, and rows of `seq` tokens (tiny in a dry run)."""
    import torch
    from transformers import AutoModelForCausalLM

    from sfn_train.lab.problems import generate
    from sfn_train.tiny import build_tokenizer, tiny_config

    tokenizer = build_tokenizer()
    if ctx.dry:
        shape = dict(hidden=64, layers=2, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                     vocab_size=len(tokenizer), seq=128)
    elif size == "1.5b":  # Qwen2.5-1.5B's config: 28 layers, hidden 1536, 12 heads, 2 KV heads, MLP 8960, tied
        shape = dict(hidden=1536, layers=28, intermediate_size=8960, num_attention_heads=12, num_key_value_heads=2,
                     vocab_size=151936, tie_word_embeddings=True, seq=4096, max_position_embeddings=32768)
    else:  # Qwen2.5-7B's config: 28 layers, hidden 3584, 28 heads, 4 KV heads, MLP 18944, vocab 152064, untied
        shape = dict(hidden=3584, layers=28, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
                     vocab_size=152064, seq=4096, max_position_embeddings=32768)
    seq = shape.pop("seq")
    folder = ctx.work / f"throughput-model-{size}"
    config = tiny_config("qwen2", pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **shape)
    with torch.device("cuda" if ctx.cuda else "cpu"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    data = ctx.work / f"throughput-rows-{seq}.jsonl"
    with open(data, "w") as f:  # one token per byte: rows of seq - 16 characters fill the context with the template
        for p in generate(64, (3, 4), seed=0):
            text = (p.trace + " ") * (seq // len(p.trace) + 1)
            f.write(json.dumps({"text": text[: seq - 16]}) + "\n")
    label = "tiny" if ctx.dry else f"Qwen2.5-{size.upper()}-shaped"
    return folder, data, {"seq": seq, "params_b": round(params / 1e9, 3), "label": label}


def throughput_child(recipe: str, dry: bool = False) -> dict:
    """In a child process (so that peak memory is this variant's own): train and time the recipe's steps."""
    import torch
    from transformers import TrainerCallback

    from sfn_train.config import parse_recipe
    from sfn_train.train import run_sft

    cuda = torch.cuda.is_available() and not dry
    times, tokens = [], []

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            if cuda:
                torch.cuda.reset_peak_memory_stats()

        def on_step_begin(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.start)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "num_tokens" in logs:
                tokens.append(float(logs["num_tokens"]))

    script_args, training_args, model_args, sfn_args = parse_recipe(["--config", recipe])
    run_sft(script_args, training_args, model_args, sfn_args, callbacks=[Timer()])
    timed = times[2:] or times  # the first two steps warm up (allocator, kernels)
    per_step = tokens[-1] / len(times) if tokens else float(training_args.max_length)
    return {"median_step_s": statistics.median(timed), "tokens_per_step": per_step,
            "tokens_per_s": per_step / statistics.median(timed),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
            "reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else 0.0}


def step_eval(ctx) -> dict:
    """`sfn eval` on the GPU: the trained checkpoint and base + plugin give the same greedy responses."""
    from sfn_train.cli import main

    out = ctx.work / "bf16_oproj" / "out"
    if not (out / "sfn_plugin.safetensors").is_file():
        out = train_in_process(ctx.recipe("bf16_oproj"))
    device = "cuda" if ctx.cuda else "cpu"
    # bf16 (the checkpoint's dtype) in both: base + fp32 plugin cast to bf16 is then the checkpoint, bit for bit
    common = ["--task", "lab_reason", "--limit", "8", "--temperature", "0", "--max-new-tokens", "48",
              "--samples", "1", "--no-progress", "--dtype", "bf16", "--device", device]
    numbers, failed = {}, []
    started = time.perf_counter()
    if main(["eval", str(out), *common, "--out", str(ctx.work / "eval-ckpt.json")]) != 0:
        raise RuntimeError("sfn eval of the trained checkpoint failed")
    if main(["eval", str(ctx.base()), "--plugin", str(out / "sfn_plugin.safetensors"), *common,
             "--out", str(ctx.work / "eval-plugin.json")]) != 0:
        raise RuntimeError("sfn eval of base + plugin failed")
    numbers["hf_s"] = round(time.perf_counter() - started, 1)
    a, b = (json.loads((ctx.work / f).read_text()) for f in ("eval-ckpt.json", "eval-plugin.json"))
    ra, rb = ([s["response"] for p in d["problems"] for s in p["samples"]] for d in (a, b))
    numbers["responses"] = len(ra)
    if ra != rb:
        failed.append(f"{sum(x != y for x, y in zip(ra, rb))} of {len(ra)} greedy responses differ between the "
                      "checkpoint and base + plugin")
    numbers["hf_device"] = a["settings"].get("device")
    try:
        importlib.import_module("vllm")
        vllm = True
    except Exception as exc:  # noqa: BLE001 - not installed, or broken: either way vLLM is not checked here
        vllm, numbers["vllm"] = False, f"SKIP (not importable: {type(exc).__name__})"
    if vllm and ctx.cuda:
        if main(["eval", str(ctx.base()), "--plugin", str(out / "sfn_plugin.safetensors"), *common[:-2],
                 "--backend", "vllm", "--out", str(ctx.work / "eval-vllm.json")]) != 0:
            failed.append("sfn eval --backend vllm of base + plugin failed")
        else:
            numbers["vllm"] = "ran"
    numbers["_failed"] = failed
    return numbers


def _quant(ctx, mode: str) -> dict:
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        raise Skip(f"bitsandbytes is not importable ({type(exc).__name__}; carry .whl/quant)") from None
    out = train_in_process(ctx.recipe(f"quant_{mode}", quantize_frozen=mode))
    numbers = check_run(ctx.base(), out, ["o_proj"])
    summary = json.loads((out / "sfn_manifest.json").read_text())["selection"].get("quantize_frozen") or {}
    numbers["weight_mb_before"] = round(summary.get("weight_bytes_before", 0) / 2**20, 2)
    numbers["weight_mb_after"] = round(summary.get("weight_bytes_after", 0) / 2**20, 2)
    return numbers


def step_quant_4bit(ctx) -> dict:
    return _quant(ctx, "4bit")


def step_quant_8bit(ctx) -> dict:
    return _quant(ctx, "8bit")


# --------------------------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------------------------
def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "throughput-child":
        print("RESULT " + json.dumps(throughput_child(sys.argv[2])), flush=True)
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--part", choices=["quant", "train", "all"], default="all",
                        help="all: both parts in one run, for --dry-run only (on a node the two together carry more "
                        "than a device call may)")
    parser.add_argument("--dry-run", action="store_true", help="tiny models on the CPU: checks the check itself")
    parser.add_argument("--only", default="", help="comma-separated steps to run (default: all of the part)")
    parser.add_argument("--skip", default="", help="comma-separated steps to leave out")
    parser.add_argument("--out", default=str(REPO / "gpu_check_out"), help="where gpu_check.json and logs go")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--with-7b", action="store_true", help="throughput also on a Qwen2.5-7B-shaped model "
                        "(o_proj and F2; full only where fp32 masters and Adam fit: ~2 more minutes)")
    parser.add_argument("--budget", type=float, default=None, help="seconds for the whole run (default: 390 for "
                        "train, 180 for quant, none in a dry run); each step is capped at what is left")
    parser.add_argument("--keep-going", action="store_true", help="run the training steps even when env finds "
                        "unmet requirements")
    args = parser.parse_args()
    if args.part == "all" and not args.dry_run:
        parser.error("--part all carries more than one device call may (64 MiB): run --part quant, then --part train")

    steps = PARTS["quant"] + PARTS["train"][1:] if args.part == "all" else PARTS[args.part]
    only = [s for s in args.only.split(",") if s]
    skip = {s for s in args.skip.split(",") if s}
    unknown = (set(only) | skip) - set(PARTS["train"] + PARTS["quant"])
    if unknown:
        parser.error(f"unknown step(s) {', '.join(sorted(unknown))}; steps: {', '.join(steps)}")
    steps = [s for s in steps if (not only or s in only or s == "env") and s not in skip]

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    ctx = Context(args)
    budget = args.budget if args.budget is not None else (0 if ctx.dry else BUDGET[args.part])
    report = ctx.report = Report(ctx.out, "cpu (dry run)" if ctx.dry else "cuda", budget)
    print(f"gpu_check: part {args.part}, {'dry run on the CPU' if ctx.dry else 'GPU'}, steps {', '.join(steps)}; "
          f"scratch {ctx.work}", flush=True)
    started = time.perf_counter()
    for name in steps:
        report.run(name, globals()[f"step_{name}"], ctx)
    print("\ngpu_check summary:")
    for x in report.steps:
        shown = " ".join(f"{k}={_fmt(v)}" for k, v in x["numbers"].items() if not isinstance(v, (dict, list)))
        print(f"  {x['status']:<4} {x['step']:<13} {x['seconds']:6.1f}s  {shown}{'  -- ' + x['note'] if x['note'] else ''}")
    counts = {s: sum(x["status"] == s for x in report.steps) for s in ("PASS", "FAIL", "SKIP")}
    print(f"gpu_check: {counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped in "
          f"{time.perf_counter() - started:.0f}s; {ctx.out / 'gpu_check.json'}", flush=True)
    if not args.work:
        shutil.rmtree(ctx.work, ignore_errors=True)
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
