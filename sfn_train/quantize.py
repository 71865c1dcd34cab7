"""`quantize_frozen: 4bit | 8bit`: the frozen linear layers held by bitsandbytes, the trained modules in full precision.

What is quantized. Every `nn.Linear` none of whose parameters trains, except the output head: with 4bit NF4 weights
with double quantization (compute in bf16 on a GPU, fp32 on a CPU), with 8bit LLM.int8 weights (outlier threshold
6.0, as transformers' `BitsAndBytesConfig` defaults). The trained modules, embeddings, norms and lm_head stay in the
training dtype. `quantization_plan` makes that split from the selection; it is the `llm_int8_skip_modules` list a
`BitsAndBytesConfig` would need, computed by the same rule.

How the model gets into the HF Trainer. Loading through `from_pretrained(quantization_config=BitsAndBytesConfig(...))`
attaches an `hf_quantizer` to the model, and `Trainer.__init__` then refuses it (`validate_quantization_for_training`
in transformers/trainer_utils.py: "You cannot perform fine-tuning on purely quantized models") unless PEFT adapters are
attached. The only ways past that check are private state (`model._hf_peft_config_loaded = True`, or replacing the
quantizer's `is_qat_trainable`), which a transformers release can change without notice, and there is no Trainer hook
to override: the check is a module-level function called inside `__init__`. So we do not ask transformers to quantize.
We load the model as usual (full precision, on the CPU), select and freeze, and then swap each frozen linear for the
documented bitsandbytes module (`bnb.nn.Linear4bit` / `bnb.nn.Linear8bitLt`, quantized by `.to(device)` exactly as
their docstrings show), directly on the training device. transformers never sees a quantizer, so the model is an
ordinary trainable model to the Trainer and to TRL (whose QLoRA path would otherwise cast the trained tensors to
bf16); the invariant the Trainer's check protects -- no gradient ever reaches a quantized weight -- we assert
ourselves (`check_nothing_quantized_trains`). The cost: CPU memory briefly holds the full-precision model while it
is quantized module by module (the accelerator only ever holds the quantized one).

How the result is saved. The live model holds 4/8-bit frozen weights, so it is never saved as the output. The trained
tensors are taken from it in full precision into `sfn_plugin.safetensors`, and the output checkpoint is the base
re-read tensor by tensor from its own safetensors files with those tensors in place (`sfn_train.plugin.plugin_apply`,
called by `sfn_train.outputs.save_full_precision`):
every frozen tensor is bitwise the base's, and config.json is the base's (no `quantization_config`), so the output
loads with plain `from_pretrained`, without bitsandbytes.

Mixture-of-experts models. transformers 5 holds routed experts as fused 3-D parameters of an experts module
(`mlp.experts.gate_up_proj` [E, H, 2I]), and routers as their own small modules: neither is an `nn.Linear`, and
bitsandbytes quantizes linear layers only. They stay in full precision, frozen; `quantize_frozen` says so in one log
line (count, size, names) and in the manifest (`full_precision_frozen`). Attention projections, shared experts and
dense MLP layers are linear layers and are quantized as usual.

Where bitsandbytes cannot run (not installed, or no backend for the device), `check_quantize_setup` says so in one
line at start-up, before any model is loaded: it quantizes a 64x64 layer and runs a forward and backward pass on the
training device.
"""

from __future__ import annotations

import logging
import os

from .errors import SfnError, first_line

logger = logging.getLogger("sfn_train")

INT8_THRESHOLD = 6.0  # LLM.int8 outlier threshold, BitsAndBytesConfig's default


# --------------------------------------------------------------------------------------------------------------------
# Start-up
# --------------------------------------------------------------------------------------------------------------------
def training_device(training_args):
    """The device this process trains on, known without starting torch.distributed (checks run before that)."""
    import torch

    if training_args.use_cpu or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def check_quantize_setup(training_args, mode: str) -> None:
    """One clear `SfnError` line, before any model loads, when `quantize_frozen: mode` cannot run in this setup."""
    if training_args.deepspeed:
        raise SfnError(f"quantize_frozen: {mode} runs single-process or with DDP (torchrun), not under DeepSpeed: "
                       "remove `deepspeed` from the recipe or set quantize_frozen: none.")
    from .quiet import keep_bitsandbytes_warnings

    keep_bitsandbytes_warnings()
    try:
        import bitsandbytes as bnb
    except Exception as exc:  # noqa: BLE001 - a broken install fails here in many ways; all mean the same to the user
        raise SfnError(f"quantize_frozen: {mode} needs bitsandbytes, which cannot be imported ({first_line(exc)}): "
                       "pip install 'bitsandbytes>=0.50.2', or set quantize_frozen: none.") from None
    device = training_device(training_args)
    try:
        probe(mode, device)
    except Exception as exc:  # noqa: BLE001 - any failure of the probe means this backend cannot train here
        raise SfnError(f"quantize_frozen: {mode} cannot run on {device.type} with bitsandbytes {bnb.__version__} "
                       f"({type(exc).__name__}: {first_line(exc)}): set quantize_frozen: none, or train on a "
                       "device bitsandbytes supports (a CUDA GPU).") from None


def probe(mode: str, device) -> None:
    """Quantize a 64x64 linear layer on `device` and run forward and backward through it; raise if that fails."""
    import torch

    layer = quantized_linear(torch.nn.Linear(64, 64), mode, device)
    x = torch.randn(4, 64, device=device, requires_grad=True)
    layer(x).square().sum().backward()
    if x.grad is None or not torch.isfinite(x.grad).all():
        raise RuntimeError("no finite input gradient through the quantized layer")


# --------------------------------------------------------------------------------------------------------------------
# Selection -> what is quantized
# --------------------------------------------------------------------------------------------------------------------
def quantization_plan(model, trainable) -> tuple[list[str], list[str]]:
    """(linear modules to quantize, linear modules kept in full precision) for the trainable parameter names.

    A linear stays in full precision when any of its parameters trains, and the output head always does (it is often
    tied to the embedding). The second list is what `BitsAndBytesConfig(llm_int8_skip_modules=...)` would take.
    Works on a meta-device model: reads names and types only.
    """
    import torch

    trainable = set(trainable)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    quantize, keep = [], []
    for name, module in model.named_modules():
        if type(module) is not torch.nn.Linear:  # Conv1D (GPT-2) and bnb layers are left as they are
            continue
        trains = any(f"{name}.{p}" in trainable for p, _ in module.named_parameters())
        (keep if trains or module is head else quantize).append(name)
    return quantize, keep


def frozen_outside_linears(model, trainable) -> list[str]:
    """Frozen weight matrices (2-D or more) that are neither a linear layer's nor an embedding's: fused expert tensors
    and routers of MoE models. bitsandbytes has no layer for them, so they stay in full precision."""
    import torch

    trainable = set(trainable)
    covered = set()
    for name, module in model.named_modules():
        if type(module) is torch.nn.Linear or isinstance(module, torch.nn.Embedding):  # as quantization_plan sees them
            covered.update(f"{name}.{p}" if name else p for p, _ in module.named_parameters(recurse=False))
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        covered.update(n for n, p in model.named_parameters() if any(p is q for q in head.parameters()))
    return [n for n, p in model.named_parameters() if n not in trainable and n not in covered and p.dim() >= 2]


def quantized_linear(linear, mode: str, device):
    """A bitsandbytes layer holding `linear`'s weight quantized on `device` (and its bias as it is, frozen)."""
    import bitsandbytes as bnb
    import torch

    if mode == "4bit":
        compute = torch.bfloat16 if device.type == "cuda" else torch.float32
        new = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                compute_dtype=compute, compress_statistics=True, quant_type="nf4", device="meta")
        new.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, compress_statistics=True,
                                       quant_type="nf4", module=new).to(device)
    elif mode == "8bit":
        new = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  has_fp16_weights=False, threshold=INT8_THRESHOLD, device="meta")
        new.weight = bnb.nn.Int8Params(linear.weight.data.to("cpu"), requires_grad=False,
                                       has_fp16_weights=False).to(device)
    else:
        raise SfnError(f"quantize_frozen {mode!r} is invalid: use none, 8bit or 4bit.")
    if linear.bias is not None:
        new.bias = torch.nn.Parameter(linear.bias.data.to(device), requires_grad=False)
    return new


def quantize_frozen(model, trainable, mode: str, device) -> dict:
    """Swap every frozen linear of `model` (see `quantization_plan`) for a bitsandbytes layer on `device`, in place.

    Module by module, so the accelerator never holds a frozen layer in full precision. Returns a summary for the
    manifest.
    """
    from .roles import fold_layers

    quantize, keep = quantization_plan(model, trainable)
    full_precision = frozen_outside_linears(model, trainable)
    params = dict(model.named_parameters())
    full_precision_bytes = sum(params[n].numel() * params[n].element_size() for n in full_precision)
    if full_precision:
        logger.info("quantize_frozen %s: %d frozen tensors outside nn.Linear layers stay in full precision (%.1f MB; "
                    "bitsandbytes quantizes linear layers only): %s", mode, len(full_precision),
                    full_precision_bytes / 2**20, ", ".join(fold_layers(full_precision)))
    before = _param_bytes(model)
    for name in quantize:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, quantized_linear(getattr(parent, child), mode, device))
    check_nothing_quantized_trains(model)
    release_checkpoint_mapping(model, device)
    after = _param_bytes(model)
    logger.info("quantize_frozen %s: %d frozen linear layers quantized (%d kept in full precision); weights %.1f MB "
                "-> %.1f MB", mode, len(quantize), len(keep), before / 2**20, after / 2**20)
    return {"mode": mode, "quantized_linears": len(quantize), "full_precision_linears": keep,
            "full_precision_frozen": {"tensors": len(full_precision), "bytes": full_precision_bytes,
                                      "names": fold_layers(full_precision)},
            "weight_bytes_before": before, "weight_bytes_after": after}


def release_checkpoint_mapping(model, device) -> None:
    """Give every full-precision parameter its own memory on `device`, so the checkpoint's memory map can close.

    `from_pretrained` maps the safetensors files and its CPU tensors are views of that map. Quantizing reads every
    frozen weight, and while any tensor (an embedding, a norm) still views the map, all the pages read stay mapped
    and counted in the process's memory: on a CPU the quantized run would use more memory than the plain one.
    """
    import bitsandbytes as bnb

    for _, param in model.named_parameters():
        if not isinstance(param, (bnb.nn.Params4bit, bnb.nn.Int8Params)):
            param.data = param.data.to(device, copy=True)


def check_nothing_quantized_trains(model) -> None:
    """The invariant transformers' Trainer protects for quantized models: no quantized weight takes a gradient."""
    import bitsandbytes as bnb

    for name, param in model.named_parameters():
        if isinstance(param, (bnb.nn.Params4bit, bnb.nn.Int8Params)) and param.requires_grad:
            raise SfnError(f"internal error: quantized weight {name} requires grad; report this.")


def _param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())
