"""`sfn memory`: the peak memory per rank of one optimizer step of a recipe, before launching it.

    sfn memory --config recipes/qwen2.5-32b-instruct/oproj_s1k.yaml --nproc 8 --gpu-memory 80 \
        --model_name_or_path bench/model_configs/qwen2.5-32b-instruct
    sfn memory --config RECIPE --find nproc --gpu-memory 80 --json

What is simulated and what is computed: sfn_train/memory/simulate.py and engines.py. Every number is a prediction.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass

from ..arguments import ArgumentParser
from ..errors import SfnError

GiB = 2**30
# Not modelled: the CUDA context (~0.5-1 GiB per process, outside max_memory_allocated), NCCL buffers (a few hundred
# MiB per communicator), cuBLAS/cuDNN workspaces, and the caching allocator's fragmentation (reserved above
# allocated). The margin below covers them: a fixed 2 GiB for context + NCCL + workspaces, and 10% of the peak for
# fragmentation. Chosen from PyTorch's documented sizes, not measured on a GPU here (none is available): the GPU
# check (tools/gpu_check/check.py) records max_memory_allocated and max_memory_reserved beside the plan to measure it.
MARGIN_FIXED = {"cuda": 2 * GiB, "cpu": 0}
MARGIN_FRACTION = 0.10
NOT_MODELLED = ("allocator fragmentation", "the CUDA context", "NCCL buffers", "kernel workspaces (cuBLAS, attention)")


@dataclass
class PlanInputs:
    spec: object  # simulate.StepSpec
    engine: str  # plain, zero2, zero3, fsdp2
    ds_config: dict | None
    notes: list


def _gpu_defaults() -> dict:
    """TRL's own SFTConfig defaults for the keys `config.platform_defaults` changes on a CPU-only machine: a plan
    for a GPU reads the recipe as a GPU run would."""
    import dataclasses

    from trl import SFTConfig

    fields = {f.name: f for f in dataclasses.fields(SFTConfig)}
    defaults = {k: fields[k].default for k in ("bf16", "gradient_checkpointing")}
    return {**defaults, "use_cpu": True}  # use_cpu only lets TrainingArguments accept bf16 here; the plan ignores it


def parse_for_device(argv: list[str], device: str):
    """The recipe's four dataclasses as `sfn train` parses them on the planned device."""
    from ..config import make_parser, parse_recipe

    if device == "cpu":
        return parse_recipe(argv)
    parser = make_parser()
    parser.set_defaults(**_gpu_defaults())
    import sfn_train.config as config

    original = config.make_parser
    config.make_parser = lambda: parser
    try:
        return parse_recipe(argv)
    finally:
        config.make_parser = original


def _engine(training_args) -> tuple[str, dict | None]:
    from ..engine import effective_deepspeed_config
    from ..precision import engine_in_use

    kind = engine_in_use(training_args)
    if kind == "deepspeed":
        ds = effective_deepspeed_config(training_args) or {}
        stage = int(ds.get("zero_optimization", {}).get("stage", 0))
        if stage not in (2, 3):
            raise SfnError(f"DeepSpeed ZeRO stage {stage} is not modelled by `sfn memory` (2 and 3 are).")
        return f"zero{stage}", ds
    if kind == "fsdp":
        version = int((training_args.fsdp_config or {}).get("version", 1))
        if version != 2:
            raise SfnError("FSDP1 is not modelled by `sfn memory`: use fsdp_config version 2 (ds_configs/fsdp2.json).")
        return "fsdp2", None
    return "plain", None


def _kernel_and_batching(model_args, training_args) -> str:
    from ..startup import is_flash_kernel, resolve_attention, resolve_batching

    kernel = model_args.attn_implementation or "sdpa"
    if is_flash_kernel(kernel):  # usable on the planned GPU: keep it (resolve_attention would drop it on this CPU)
        resolve_batching(kernel, training_args)
        return "flash"
    resolve_attention(model_args, training_args)
    return kernel


def _optimizer(training_args):
    from transformers import Trainer

    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(training_args)
    if "bitsandbytes" in getattr(cls, "__module__", ""):
        raise SfnError(f"optim {training_args.optim} (bitsandbytes) is not modelled by `sfn memory` yet: plan with "
                       "adamw_torch_fused and subtract 6 bytes per trained parameter from the optimizer state.")
    return cls, kwargs


def _load_config(model_args, trust_remote_code: bool):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_args.model_name_or_path, revision=model_args.model_revision,
                                          trust_remote_code=trust_remote_code)
    except OSError:
        raise SfnError(f"no config.json for {model_args.model_name_or_path!r}: give a local folder holding the "
                       "model's config.json (`--model_name_or_path DIR`; bench/model_configs/ has the Qwen2.5 ones) "
                       "or a hub id while the hub is reachable.") from None


def plan_inputs(argv: list[str], device: str = "cuda") -> PlanInputs:
    """The recipe (`--config R` and override flags, as `sfn train` takes them) -> what the simulation needs."""
    script_args, training_args, model_args, sfn_args = parse_for_device(argv, device)
    return inputs_from_args(training_args, model_args, sfn_args, device)


def inputs_from_args(training_args, model_args, sfn_args, device: str, kernel: str | None = None) -> PlanInputs:
    """The parsed recipe -> what the simulation needs. `kernel`: the attention kernel already decided (sfn train),
    else decided here as `sfn train` would on the planned device (the batching keys are resolved in place)."""
    from .simulate import StepSpec

    if not model_args.model_name_or_path:
        raise SfnError("model_name_or_path is not set: give a local folder with config.json or a hub id.")
    engine, ds = _engine(training_args)
    if kernel is None:
        kernel = _kernel_and_batching(model_args, training_args)
    if not training_args.max_length:
        raise SfnError("max_length is null (rows used whole): give `--max_length N`, the longest row to plan for.")
    if getattr(training_args, "activation_offloading", False):
        raise SfnError("activation_offloading is not modelled by `sfn memory` yet: plan without it (an upper bound).")
    cls, kwargs = _optimizer(training_args)
    autocast = None
    if engine not in ("zero2", "zero3") and (training_args.bf16 or training_args.fp16):
        autocast = "bfloat16" if training_args.bf16 else "float16"
    spec = StepSpec(
        config=_load_config(model_args, training_args.trust_remote_code),
        trainable_modules=sfn_args.trainable_modules, trainable_layers=sfn_args.trainable_layers,
        dtype=model_args.dtype if model_args.dtype not in (None, "auto") else "float32",
        engine={"plain": "plain", "fsdp2": "fsdp"}.get(engine, "deepspeed"),
        quantize_frozen=sfn_args.quantize_frozen, checkpointing=bool(training_args.gradient_checkpointing),
        batch=training_args.per_device_train_batch_size, max_length=training_args.max_length,
        padding_free=bool(training_args.padding_free), kernel=kernel, optimizer_cls=cls, optimizer_kwargs=kwargs,
        grad_accum=training_args.gradient_accumulation_steps, max_grad_norm=training_args.max_grad_norm,
        autocast=autocast, device=device)
    notes = [f"every row at max_length {spec.max_length} tokens and every label trained (the worst case)"]
    if kernel == "flash":
        notes.append(f"{model_args.attn_implementation}: simulated as a fused kernel (output + logsumexp, no "
                     "seq^2 matrix), as FlashAttention holds")
    return PlanInputs(spec=spec, engine=engine, ds_config=ds, notes=notes)


def plan_memory(argv: list[str] | None, nproc: int = 1, nnodes: int = 1, gpu_memory_gib: float | None = None,
                device: str = "cuda", trace=None, inputs: PlanInputs | None = None) -> dict:
    """Predict the peak memory per rank of one optimizer step of a recipe (no weights, no data).

    `argv`: what `sfn train` takes (`["--config", "recipe.yaml", "--max_length", "8192", ...]`); the model is built
    from `model_name_or_path`'s config.json. `nproc` x `nnodes` ranks; `gpu_memory_gib`: the memory of one device
    (then `fits` says whether the peak plus the margin fits). `device`: "cuda" (the default: a GPU plan, recipe
    defaults as on a GPU, blocks rounded to 512 bytes) or "cpu" (what the same step holds on this CPU). `trace`: a
    `simulate.StepTrace` of the same recipe to reuse (the simulation does not depend on the rank count). `inputs`:
    a `PlanInputs` already made from parsed arguments (`inputs_from_args`), instead of `argv`.

    Returns a dict: peak_bytes (per rank, without margin), peak_bytes_with_margin, margin_bytes, breakdown
    ({category: bytes} summing to peak_bytes), largest_transient ({bytes, op, phase}), fits (bool, or None without
    gpu_memory_gib), world_size, engine, analytic (the rows computed rather than simulated), not_modelled, notes,
    cpu_offload_bytes, simulate_seconds, and the planned recipe values (max_length, batch, ...).
    """
    from .engines import per_rank
    from .simulate import simulate_step

    inputs = inputs or plan_inputs(argv, device)
    world = nproc * nnodes
    if trace is None:
        trace = simulate_step(inputs.spec)
    hidden = int(getattr(inputs.spec.config.get_text_config(), "hidden_size", 0) or 0)
    rank = per_rank(trace, inputs.engine, world, inputs.ds_config, hidden)
    margin = MARGIN_FIXED[device] + int(MARGIN_FRACTION * rank["peak"])
    with_margin = rank["peak"] + margin
    spec = inputs.spec
    return {
        "peak_bytes": int(rank["peak"]), "peak_bytes_with_margin": int(with_margin), "margin_bytes": margin,
        "breakdown": {k: int(v) for k, v in rank["breakdown"].items() if v},
        "largest_transient": trace.largest_transient,
        "fits": None if gpu_memory_gib is None else with_margin <= gpu_memory_gib * GiB,
        "gpu_memory_gib": gpu_memory_gib, "world_size": world, "nproc": nproc, "nnodes": nnodes,
        "engine": inputs.engine, "device": device, "analytic": rank["analytic"],
        "cpu_offload_bytes": rank["cpu_offload_bytes"], "not_modelled": list(NOT_MODELLED),
        "margin_rule": f"{MARGIN_FIXED[device] / GiB:g} GiB fixed + {MARGIN_FRACTION:.0%} of the peak",
        "notes": inputs.notes, "simulate_seconds": round(trace.seconds, 1),
        "recipe": {"max_length": spec.max_length, "batch": spec.batch, "grad_accum": spec.grad_accum,
                   "checkpointing": spec.checkpointing, "padding_free": spec.padding_free, "kernel": spec.kernel,
                   "quantize_frozen": spec.quantize_frozen, "dtype": spec.dtype,
                   "optimizer": getattr(spec.optimizer_cls, "__name__", str(spec.optimizer_cls)),
                   "trained_params": trace.params["trained_numel"],
                   "frozen_params": trace.params["frozen_numel"]},
        "_trace": trace,
    }


def find(argv: list[str], what: str, nproc: int, nnodes: int, gpu_memory_gib: float, device: str = "cuda") -> dict:
    """The fewest ranks (`nproc`, per node), the longest max_length or the largest per-device batch that fits."""
    if gpu_memory_gib is None:
        raise SfnError("--find needs --gpu-memory GiB (the memory of one device).")
    if what == "nproc":
        plan = plan_memory(argv, 1, nnodes, gpu_memory_gib, device)
        trace = plan["_trace"]
        for n in (*range(1, 17), 24, 32, 48, 64, 96, 128, 256, 512):  # ranks per node
            plan = plan_memory(argv, n, nnodes, gpu_memory_gib, device, trace=trace)
            if plan["fits"]:
                return {"find": "nproc", "value": n, "plan": plan}
        return {"find": "nproc", "value": None, "plan": plan}
    key = {"max_length": "--max_length", "batch": "--per_device_train_batch_size"}[what]
    step, cap = (64, 1 << 20) if what == "max_length" else (1, 4096)
    plans = {}

    def fits(value: int) -> bool:
        plans[value] = plan_memory([*argv, key, str(value)], nproc, nnodes, gpu_memory_gib, device)
        return plans[value]["fits"]

    # exponential search from 1024 tokens (or 1 row) in the direction that matters, then bisection to `step`
    lo, hi = None, None
    value = 1024 if what == "max_length" else 1
    while lo is None or hi is None:
        if fits(value):
            lo = value
            if value >= cap:
                break
            value = min(value * 2, cap)
        else:
            hi = value
            if value <= step:
                break
            value = max(value // 2 // step * step, step)
        if lo is not None and hi is not None and hi < lo:
            break
    while lo is not None and hi is not None and hi - lo > step:
        mid = (lo + hi) // 2 // step * step
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    last = plans[lo] if lo is not None else plans[min(plans)]
    return {"find": what, "value": lo, "plan": last}


def _fmt(n: int) -> str:
    return f"{n / GiB:8.2f} GiB"


def format_plan(plan: dict) -> str:
    r = plan["recipe"]
    lines = [f"sfn memory: PREDICTED peak per rank ({plan['engine']}, {plan['world_size']} rank(s), {plan['device']})",
             f"  recipe: max_length {r['max_length']} x batch {r['batch']} (grad accumulation {r['grad_accum']}), "
             f"checkpointing {'on' if r['checkpointing'] else 'off'}, attention {r['kernel']}, padding-free "
             f"{'on' if r['padding_free'] else 'off'}, quantize_frozen {r['quantize_frozen']}, {r['optimizer']}",
             f"  parameters: {r['trained_params']:,} trained, {r['frozen_params']:,} frozen", ""]
    for name, value in plan["breakdown"].items():
        lines.append(f"  {name:<20}{_fmt(value)}")
    lt = plan["largest_transient"]
    lines += [f"  {'peak':<20}{_fmt(plan['peak_bytes'])}",
              f"  {'+ margin':<20}{_fmt(plan['margin_bytes'])}   ({plan['margin_rule']})",
              f"  {'= with margin':<20}{_fmt(plan['peak_bytes_with_margin'])}",
              f"  largest transient: {lt['bytes'] / GiB:.2f} GiB ({lt['op']}, {lt['phase']}; within the rows above)"]
    if plan["cpu_offload_bytes"]:
        lines.append(f"  CPU memory for offloaded state: {plan['cpu_offload_bytes'] / GiB:.2f} GiB per rank")
    if plan["fits"] is not None:
        left = plan["gpu_memory_gib"] * GiB - plan["peak_bytes_with_margin"]
        verdict = "FITS" if plan["fits"] else "DOES NOT FIT"
        lines.append(f"  {verdict} in {plan['gpu_memory_gib']:g} GiB: {left / GiB:+.2f} GiB left after the margin")
    lines.append("")
    lines += [f"  computed, not simulated: {a}" for a in plan["analytic"]]
    lines += [f"  note: {n}" for n in plan["notes"]]
    lines.append(f"  not modelled (covered by the margin): {', '.join(plan['not_modelled'])}")
    lines.append(f"  simulated in {plan['simulate_seconds']} s (fake tensors: no weights, no data)")
    return "\n".join(lines)


def public(plan: dict) -> dict:
    return {k: v for k, v in plan.items() if not k.startswith("_")}




def cli_main(argv: list[str]) -> int:
    parser = ArgumentParser(prog="sfn memory", description="Predict the peak memory per rank of one training step of a "
                     "recipe (fake tensors: no weights, no data). Other flags are recipe overrides, as `sfn train`.")
    parser.add_argument("--config", required=True, help="the recipe YAML")
    parser.add_argument("--nproc", type=int, default=1, help="processes (GPUs) per node")
    parser.add_argument("--nnodes", type=int, default=1)
    parser.add_argument("--gpu-memory", type=float, default=None, help="memory of one device in GiB (e.g. 80)")
    parser.add_argument("--find", choices=("max_length", "batch", "nproc"))
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="the device planned for")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args, overrides = parser.parse_known_args(argv)
    if args.nproc < 1 or args.nnodes < 1:
        raise SfnError("--nproc and --nnodes take a number of at least 1.")
    logging.getLogger("sfn_train").setLevel(logging.ERROR)
    recipe = ["--config", args.config, *overrides]
    if args.find:
        found = find(recipe, args.find, args.nproc, args.nnodes, args.gpu_memory, args.device)
        plan = found["plan"]
        out = {**public(plan), "find": args.find, "found": found["value"]}
        text = (f"--find {args.find}: {found['value'] if found['value'] is not None else 'none fits'}\n\n"
                + format_plan(plan))
    else:
        out = public(plan_memory(recipe, args.nproc, args.nnodes, args.gpu_memory, args.device))
        text = format_plan(out)
    print(json.dumps(out, default=str) if args.json else text)
    sys.stdout.flush()
    return 0


def plan_run(training_args, model_args, sfn_args, kernel: str) -> dict:
    """`sfn train`'s start-up plan for its own run (this device, its world size): logged, then recorded in the
    manifest beside the measured peak (`run_memory_record`). A recipe the planner does not model is logged and
    recorded as such; the run goes on."""
    import copy

    import torch

    log = logging.getLogger("sfn_train")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        inputs = inputs_from_args(copy.deepcopy(training_args), model_args, sfn_args, device,
                                  kernel="flash" if kernel.startswith("flash") else kernel)
        plan = public(plan_memory(None, nproc=training_args.world_size, device=device, inputs=inputs))
    except Exception as exc:  # noqa: BLE001 - a prediction must never stop a run; the reason is logged and recorded
        log.warning("memory plan: not available for this run (%s: %s); training goes on.", type(exc).__name__,
                    str(exc).splitlines()[0][:200] if str(exc) else "")
        return {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    log.info("memory plan: predicted peak %.2f GiB per rank (%.2f GiB with margin; %s, %d rank(s), %s), "
             "simulated in %.1f s", plan["peak_bytes"] / GiB, plan["peak_bytes_with_margin"] / GiB, plan["engine"],
             plan["world_size"], device, plan["simulate_seconds"])
    return plan


def run_memory_record(plan: dict) -> dict:
    """The manifest's `memory` entry: the start-up prediction and what this process measured."""
    import resource

    import torch

    record = {key: plan.get(key) for key in ("peak_bytes", "peak_bytes_with_margin", "breakdown", "engine",
                                             "world_size", "device", "error")}
    record = {"predicted_" + k if k.startswith("peak") or k == "breakdown" else k: v for k, v in record.items()
              if v is not None}
    if torch.cuda.is_available():
        record["measured_max_memory_allocated"] = torch.cuda.max_memory_allocated()
        record["measured_max_memory_reserved"] = torch.cuda.max_memory_reserved()
    else:  # the whole process (interpreter, libraries, data), so above the prediction of the step's tensors
        record["measured_peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return record


# Recipe flags that change nothing in memory: plans of points differing only in these are computed once.
_NO_MEMORY_EFFECT = {"--learning_rate", "--output_dir", "--seed", "--overwrite_output_dir", "--run_name",
                     "--weight_decay", "--warmup_steps", "--num_train_epochs", "--max_steps", "--lr_scheduler_type"}
DEFAULT_PLAN_GPU_GIB = 80.0  # `--plan` lines check against an H100/A100 80GB unless told otherwise


def plan_line(argv: list[str], nproc: int, nnodes: int, gpu_memory_gib: float | None, cache: dict | None = None) -> str:
    """One line for a `--plan` listing: the predicted peak per GPU of the training command `argv` (what
    `sfn train` takes), flagged when it does not fit; or why there is no prediction (e.g. no config.json here)."""
    key = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in _NO_MEMORY_EFFECT:
            skip = True
            continue
        key.append(a)
    key = (tuple(key), nproc, nnodes, gpu_memory_gib)
    if cache is not None and key in cache:
        return cache[key]
    try:
        plan = plan_memory(argv, nproc=nproc, nnodes=nnodes, gpu_memory_gib=gpu_memory_gib)
    except Exception as exc:  # noqa: BLE001 - a plan listing goes on; the line says why this one has no prediction
        line = f"memory: not predicted ({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''})"
    else:
        where = f"{nnodes} x {nproc} GPU(s), {plan['engine']}"
        line = (f"memory: predicted peak {plan['peak_bytes'] / GiB:.1f} GiB per GPU "
                f"({plan['peak_bytes_with_margin'] / GiB:.1f} with margin; {where}; `sfn memory` for the breakdown)")
        if plan["fits"] is not None:
            line += (f": fits {gpu_memory_gib:g} GiB" if plan["fits"] else
                     f": DOES NOT FIT {gpu_memory_gib:g} GiB GPUs")
    if cache is not None:
        cache[key] = line
    return line
