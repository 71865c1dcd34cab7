"""Precision of a training run: the trained tensors in fp32 (master weights), the frozen ones as loaded.

Why. AdamW on bf16 weights at a fine-tuning learning rate loses most updates: a bf16 weight near 0.02 can only move
in steps of 1.2e-4, so an update of 1e-5 rounds away (measured on CPU, N(0, 0.02) weights, lr 1e-5, 10 steps: 15% of
bf16 elements changed, 100% in fp32). DeepSpeed keeps fp32 master weights in its optimizer; plain PyTorch (one
process, DDP, every `quantize_frozen` run) trains the parameters it is given, in their dtype, with Adam moments in
the same dtype. So, outside DeepSpeed, every trained floating-point tensor below 32 bits is upcast to fp32 in the
model before the optimizer is built: the optimizer and its moments hold fp32, and the frozen tensors stay in their
loaded dtype, bitwise (and at half the memory).

The compute path. A module holding an fp32 parameter inside a bf16 model receives bf16 activations. With `bf16: true`
the Trainer runs the forward under autocast (accelerate's `torch.autocast`, on CPU as on GPU), which computes matmuls
in bf16 whatever the weight dtype; without it (the CPU default, or `bf16: false` on a GPU) `F.linear(bf16, fp32)`
raises, and an fp32 norm weight would turn the residual stream fp32 for the next, bf16, layer. So each module that
owns an upcast parameter gets two hooks: floating-point inputs are cast to fp32 on the way in (only when autocast is
off: under autocast the op casts for itself), and floating-point outputs are cast back to the model's dtype on the way
out. Between modules the activations keep the dtype they have in the unmodified model; inside the trained modules the
arithmetic is fp32 without autocast and bf16 with it, as autocast intends.

Saving. The output checkpoint holds the trained tensors in the dtype they were loaded in (cast back after training,
round to nearest), so it has the base's one dtype and loads like it; the plugin `sfn_plugin.safetensors` holds the
fp32 master weights, i.e. the full-precision result (`sfn plugin apply` casts to the base's stored dtype itself, and
gives the same tensors as the checkpoint). `checkpoint-N` folders written during training hold the fp32 masters, so a
resumed run continues from exactly where it stopped.

Engines. DeepSpeed (ZeRO-1/2/3, recipe `deepspeed:` or accelerate's DeepSpeed plugin) keeps fp32 masters itself and
casts the model to its own compute dtype: nothing is upcast here (that would be a second cast, undone by DeepSpeed),
and the plugin is read from DeepSpeed's masters (`safe_get_full_fp32_param`). FSDP: `fully_shard` (FSDP2) shards the
parameters in the dtype they have and casts for compute by its `MixedPrecisionPolicy`; how masters and that policy
combine is the FSDP engine's decision, so `keep_fp32_masters` leaves an FSDP model as it is and says so in the log
and the manifest (`master_weights: "fsdp"`). accelerate's FSDP2 preparation (the path sfn-train runs, see
sfn_train/engine.py) upcasts the trainable tensors, and only those, to fp32 before `fully_shard` when mixed precision
is on (bf16/fp16), and computes in that dtype by its `MixedPrecisionPolicy`; without mixed precision they train as
loaded. The manifest says which happened, read from the live model once training begins: `upcast_from` lists the
loaded dtypes the engine turned into fp32, `left_in_low_precision` the trained tensors it left below 32 bits.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field

logger = logging.getLogger("sfn_train")

LOW_PRECISION = ("bfloat16", "float16")


def engine_in_use(training_args) -> str:
    """`deepspeed`, `fsdp` or `plain` (one process or DDP): the engine that will own the parameters' precision."""
    if getattr(training_args, "deepspeed", None) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return "deepspeed"
    if getattr(training_args, "fsdp", None) or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "fsdp"
    return "plain"


@dataclass
class Masters:
    """What `keep_fp32_masters` did: upcast tensor name -> the dtype it was loaded in, and the hooks it added."""

    engine: str
    loaded_dtypes: dict = field(default_factory=dict)  # name -> torch.dtype, only the tensors that were upcast
    hooks: list = field(default_factory=list)
    left_alone: list = field(default_factory=list)  # trained low-precision tensors that could not be upcast
    # FSDP: the trained low-precision tensors as loaded (name -> dtype), before the engine decides their dtype
    engine_owned: dict = field(default_factory=dict)

    @property
    def master_weights(self) -> str:
        """Where the weights the optimizer updates live (their dtype: `optimizer_param_dtypes` in the record)."""
        return {"deepspeed": "deepspeed optimizer", "fsdp": "fsdp"}.get(self.engine, "model parameters")


def keep_fp32_masters(model, trainable, training_args=None, engine: str | None = None) -> Masters:
    """Upcast the trained low-precision tensors of `model` to fp32 in place and hook their modules (see module doc).

    `trainable`: the parameter names that train. Frozen tensors are not touched. Returns what was done.
    """
    import torch

    engine = engine or engine_in_use(training_args)
    masters = Masters(engine=engine)
    if engine == "fsdp":
        wanted = set(trainable)
        masters.engine_owned = {name: p.dtype for name, p in model.named_parameters()
                                if name in wanted and p.dtype in (torch.bfloat16, torch.float16)}
    if engine != "plain":
        why = ("DeepSpeed keeps fp32 master weights in its optimizer and casts the model itself"
               if engine == "deepspeed" else "the FSDP engine's mixed-precision policy owns parameter dtypes")
        logger.info("precision: trained tensors left as loaded: %s.", why)
        return masters

    wanted = set(trainable)
    low = {name: p for name, p in model.named_parameters() if name in wanted and p.is_floating_point()
           and p.dtype in (torch.bfloat16, torch.float16)}
    if not low:
        return masters
    low_ids = {id(p) for p in low.values()}
    owners = []  # modules that own (directly) an upcast parameter; a tied parameter has two owners
    for _, module in model.named_modules():
        owned = [p for p in module._parameters.values() if p is not None and id(p) in low_ids]
        if owned:
            owners.append((module, owned[0].dtype))
    # A module with children of its own would hand fp32 inputs to its (low-precision) children: leave its parameters
    # in their dtype, and say so, rather than break the forward.
    skip = {id(p) for module, _ in owners if any(True for _ in module.children())
            for p in module._parameters.values() if p is not None and id(p) in low_ids}
    for name, param in low.items():
        if id(param) in skip:
            masters.left_alone.append(name)
            continue
        masters.loaded_dtypes[name] = param.dtype
        param.data = param.data.to(torch.float32)
    for module, dtype in owners:
        if not any(True for _ in module.children()):
            masters.hooks += _cast_hooks(module, dtype)
    if masters.left_alone:
        logger.warning("precision: %d trained tensors stay in their loaded dtype (their modules have submodules, so "
                       "fp32 inputs would reach low-precision children), e.g. %s: their small updates may round "
                       "away.", len(masters.left_alone), masters.left_alone[0])
    dtypes = sorted({str(d).removeprefix("torch.") for d in masters.loaded_dtypes.values()})
    logger.info("precision: %d trained tensors upcast from %s to float32 master weights (optimizer state in fp32); "
                "frozen tensors stay as loaded.", len(masters.loaded_dtypes), "/".join(dtypes))
    return masters


def _cast_hooks(module, activation_dtype) -> list:
    """Forward hooks: floating inputs -> fp32 (when autocast is off), floating outputs -> `activation_dtype`."""
    import torch

    def cast(value, dtype):
        if isinstance(value, torch.Tensor):
            return value.to(dtype) if value.is_floating_point() and value.dtype != dtype else value
        if isinstance(value, tuple):
            return tuple(cast(v, dtype) for v in value)
        if isinstance(value, list):
            return [cast(v, dtype) for v in value]
        if isinstance(value, dict):
            return {k: cast(v, dtype) for k, v in value.items()}
        return value

    def before(mod, args, kwargs):
        device = next((a.device.type for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), "cpu")
        if torch.is_autocast_enabled(device):
            return None
        return cast(args, torch.float32), cast(kwargs, torch.float32)

    def after(mod, args, output):
        return cast(output, activation_dtype)

    return [module.register_forward_pre_hook(before, with_kwargs=True), module.register_forward_hook(after)]


# --------------------------------------------------------------------------------------------------------------------
# After training
# --------------------------------------------------------------------------------------------------------------------
def full_precision_tensors(model, trainable, masters: Masters, keep: bool = True) -> dict | None:
    """The trained tensors in full precision (the masters), on CPU; None if the engine hides them.

    Plain: the live parameters (fp32 where upcast). DeepSpeed: its fp32 masters, gathered tensor by tensor (a
    collective under ZeRO: every rank must call this, in the same order). FSDP: None (the plugin then comes from the
    gathered checkpoint). Only the process that writes the plugin passes `keep=True`; the others take part in the
    gathering and hold nothing (a full fine-tune's masters are 4 bytes per parameter).
    """
    wanted = set(trainable)
    if masters.engine == "fsdp":
        return None
    params = [(n, p) for n, p in model.named_parameters() if n in wanted]
    found = {}
    if masters.engine == "deepspeed":
        from deepspeed.utils import safe_get_full_fp32_param

        for name, param in params:
            value = safe_get_full_fp32_param(param)
            if value is None:
                return None  # not trained by a DeepSpeed optimizer (DeepSpeed without ZeRO): use the checkpoint
            if keep:
                shape = getattr(param, "ds_shape", None) or param.shape
                found[name] = value.detach().to("cpu", copy=True).reshape(shape)
        return found if keep else None
    if not keep:
        return None
    return {name: param.detach().to("cpu", copy=True) for name, param in params}


def restore_loaded_dtypes(model, masters: Masters) -> None:
    """Cast the upcast tensors back to the dtype they were loaded in (round to nearest) and drop the hooks."""
    params = dict(model.named_parameters())
    for name, dtype in masters.loaded_dtypes.items():
        params[name].data = params[name].data.to(dtype)
    for hook in masters.hooks:
        hook.remove()
    masters.hooks.clear()


def precision_record(model, trainable, masters: Masters, training_args, optimizer=None) -> dict:
    """The dtypes in effect, read from the live model (and optimizer) that trains: for the manifest."""
    import torch

    wanted = set(trainable)
    train_dtypes, frozen_dtypes = Counter(), Counter()
    upcast_from = {str(d).removeprefix("torch.") for d in masters.loaded_dtypes.values()}
    left_alone = list(masters.left_alone)
    for name, param in model.named_parameters():
        (train_dtypes if name in wanted else frozen_dtypes)[str(param.dtype).removeprefix("torch.")] += 1
        if name in masters.engine_owned:  # FSDP: did the engine make an fp32 master of it?
            if param.dtype == torch.float32:
                upcast_from.add(str(masters.engine_owned[name]).removeprefix("torch."))
            else:
                left_alone.append(name)
    state = Counter()
    inner, seen = optimizer, 0
    while inner is not None and not state and seen < 5:  # accelerate / DeepSpeed wrap the torch optimizer
        # DeepSpeed ZeRO keeps its fp32 masters as flat partitions: those are what its optimizer updates
        flat = getattr(inner, "fp32_partitioned_groups_flat", None) or getattr(inner, "single_partition_of_fp32_groups",
                                                                              None)
        tensors = list(flat or []) or [p for g in getattr(inner, "param_groups", None) or [] for p in g["params"]]
        for p in tensors:
            if isinstance(p, torch.Tensor):
                state[str(p.dtype).removeprefix("torch.")] += 1
        inner, seen = getattr(inner, "optimizer", None), seen + 1
    if training_args.bf16:
        autocast = "bf16"
    elif training_args.fp16:
        autocast = "fp16"
    else:
        autocast = None
    return {
        "engine": masters.engine,
        "master_weights": masters.master_weights,
        "trainable_dtypes": dict(train_dtypes),
        "frozen_dtypes": dict(frozen_dtypes),
        "optimizer_param_dtypes": dict(state),
        "upcast_from": sorted(upcast_from),
        "left_in_low_precision": left_alone,
        "mixed_precision": autocast,
    }
