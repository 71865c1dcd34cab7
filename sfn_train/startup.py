"""Start-up policy of a training run: every check and decision made once, before a model is loaded or a file written.

Each decision is logged and returned as data for the manifest, so what a run did is read from the run, not inferred
from its recipe.
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

from .errors import SfnError, first_line

logger = logging.getLogger("sfn_train")

# --------------------------------------------------------------------------------------------------------------------
# Attention kernel and padding-free batches
# --------------------------------------------------------------------------------------------------------------------
# transformers' own rule (`is_flash_attention_requested`): any implementation whose name contains "flash" is a
# FlashAttention kernel: `flash_attention_2/3/4` (the flash-attn packages) and hub kernels such as
# `kernels-community/flash-attn2` or `kernels-community/vllm-flash-attn3` (the `kernels` package).
FLASH_VERSION = re.compile(r"^flash_attention_(\d+)$")
HUB_KERNEL = re.compile(r"^[^/:]+/[^/:]+(?:@[^/:]+)?(?::[^/:]+)?$")  # org/repo[@revision][:function], as transformers
# Oldest GPU each kernel runs on (CUDA compute capability): FlashAttention-2 and -3 need Ampere (8.0) or newer, the
# CuTe FlashAttention-4 Hopper (9.0); transformers' FLASH_ATTENTION_COMPATIBILITY_MATRIX says the same for 3 and 4.
MIN_CAPABILITY = {2: (8, 0), 3: (8, 0), 4: (9, 0)}
# Kernels on which a padding-free batch (rows concatenated, position_ids restarting at 0 per row, no attention mask)
# gives the same loss and gradients as the same rows padded. FlashAttention: its varlen kernel, by construction.
# sdpa and eager: transformers (>= 5) builds a block-diagonal causal mask from the restarting position_ids
# (`masking_utils.find_packed_sequence_indices`); measured equal to the padded batch in fp32 per row and for the
# whole batch, loss and every gradient, by tests/test_attention.py. Not verified, so not allowed: flex_attention
# (no backward on CPU; the GPU check measures it) and any other kernel.
PADDING_FREE_VERIFIED = ("sdpa", "eager")


def is_flash_kernel(name: str | None) -> bool:
    return bool(name) and "flash" in name


def _cuda_capability() -> tuple[int, int] | None:
    """The compute capability of this process's GPU, or None when no CUDA GPU is visible."""
    import torch

    if not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability())


def _load_flash_kernel(name: str) -> None:
    """Import the kernel exactly as `from_pretrained` will (a broken flash-attn install passes `find_spec` and fails
    only here, at import: missing symbols, an ABI built for another torch); hub kernels are fetched by `kernels`."""
    from transformers.modeling_flash_attention_utils import lazy_import_flash_attention

    lazy_import_flash_attention(name)


def flash_unusable_reason(name: str) -> str | None:
    """Why the FlashAttention kernel `name` cannot run in this process, or None when it can."""
    capability = _cuda_capability()
    if capability is None:
        return f"{name} needs a CUDA GPU and none is visible"
    version = FLASH_VERSION.match(name)
    need = MIN_CAPABILITY.get(int(version.group(1)), (8, 0)) if version else (8, 0)
    if capability < need:
        return (f"{name} needs a GPU of compute capability {need[0]}.{need[1]} or newer and this one is "
                f"{capability[0]}.{capability[1]}")
    try:
        _load_flash_kernel(name)
    except Exception as exc:  # noqa: BLE001 - any import/load failure means the same thing: this kernel is unusable
        hint = "pip install 'sfn-train[flash]'" if version else "pip install kernels, and reach the hub or its cache"
        return f"{name} cannot be loaded ({type(exc).__name__}: {first_line(exc)}; {hint})"
    return None


def loaded_dtype(model_args) -> str | None:
    """The dtype the weights will load in (`dtype` resolved as `from_pretrained` does), read before loading."""
    dtype = model_args.dtype
    if dtype is None:
        return "float32"
    if dtype != "auto":
        return str(dtype).removeprefix("torch.")
    from transformers import PretrainedConfig

    try:
        config, _ = PretrainedConfig.get_config_dict(model_args.model_name_or_path, revision=model_args.model_revision)
    except Exception:  # noqa: BLE001 - an unreadable config fails later with its own message; here it is unknown
        return None
    found = config.get("dtype") or config.get("torch_dtype")
    return str(found).removeprefix("torch.") if found else None


def mixed_precision_on(training_args) -> bool:
    """bf16/fp16 autocast (the Trainer's) or a DeepSpeed config that computes in bf16/fp16."""
    if training_args.bf16 or training_args.fp16:
        return True
    config = getattr(training_args, "hf_deepspeed_config", None)
    if config is not None:
        return any(config.config.get(k, {}).get("enabled") is True for k in ("bf16", "fp16"))
    return False


def resolve_attention(model_args, training_args) -> dict:
    """Pick the attention kernel and the batching once, before loading, and return the decision for the manifest.

    - A FlashAttention kernel (`flash_attention_2/3/4` or a hub kernel such as `kernels-community/flash-attn2`) is
      kept when it is usable here: a CUDA GPU of a new enough compute capability, and the kernel actually imports.
      Otherwise sdpa, with the reason in one logged line (not a stack trace at the first forward).
    - FlashAttention computes in fp16/bf16 only: fp32 weights without bf16/fp16 mixed precision are an error here.
    - Padding-free batches (`padding_free`, or TRL's BFD packing, which implies them) stay on with FlashAttention
      and with the kernels in PADDING_FREE_VERIFIED; elsewhere they are switched off with the reason logged.
      They need `use_cache: false` during training (a cache makes transformers skip the block-diagonal mask and the
      rows' attention mixes -- measured), so the cache is switched off with a logged line.
    - TRL refuses `padding_free: true` without packing while `max_length` is set (it would not truncate): refused
      here, before anything is loaded.
    """
    if training_args.padding_free and not training_args.packing and training_args.max_length is not None:
        raise SfnError(f"padding_free: true without packing does not truncate rows, and max_length is "
                       f"{training_args.max_length} (TRL refuses that combination): set `max_length: null` (rows are "
                       "used whole) or `packing: true` (BFD packing: padding-free batches truncated to max_length).")
    requested = model_args.attn_implementation
    used, reason = requested, None
    if is_flash_kernel(requested):
        reason = flash_unusable_reason(requested)
        if reason:
            used = "sdpa"
            logger.warning("attention: %s; falling back to sdpa.", reason)
            model_args.attn_implementation = used
    flash = is_flash_kernel(used)
    if flash:
        dtype = loaded_dtype(model_args)
        if dtype == "float32" and not mixed_precision_on(training_args):
            raise SfnError(f"attn_implementation {used} computes in fp16/bf16 only, but the weights load in float32 "
                           "and mixed precision is off: set `dtype: bfloat16` (or `bf16: true` for autocast), or use "
                           "attn_implementation: sdpa.")

    bfd = training_args.packing and training_args.packing_strategy in ("bfd", "bfd_split")
    kernel = used or "sdpa"  # transformers' default
    padding_free_reason = None
    if training_args.padding_free or bfd:
        if flash or (kernel in PADDING_FREE_VERIFIED and not training_args.trust_remote_code):
            padding_free_reason = (f"{used} runs them with its varlen kernel" if flash else
                                   f"{kernel} gets a block-diagonal causal mask from the restarting position_ids "
                                   "(transformers >= 5), verified equal to padded batches")
            logger.info("padding-free batches: %s.", padding_free_reason)
            if training_args.use_cache:
                logger.warning("use_cache switched off for training: with a cache transformers does not separate "
                               "the rows of a padding-free batch.")
                training_args.use_cache = False
        else:
            why = ("a model with remote code may build its own attention mask" if training_args.trust_remote_code
                   else f"padding-free batches are not verified on {kernel} (verified: FlashAttention, "
                        f"{', '.join(PADDING_FREE_VERIFIED)})")
            if training_args.padding_free:
                logger.warning("padding_free switched off: %s.", why)
                training_args.padding_free = False
            if bfd:
                logger.warning("packing with strategy %s switched off (it makes padding-free batches): %s.",
                               training_args.packing_strategy, why)
                training_args.packing = False
            padding_free_reason = f"off: {why}"
    batching = resolve_batching(kernel, training_args)
    return {"requested": requested, "used": used, "fallback_reason": reason, "flash": flash,
            "padding_free": training_args.padding_free, "packing": training_args.packing,
            "padding_free_reason": padding_free_reason, **batching}


# Which batching is fastest where padding-free batches are correct (measured with bench/batching.py --data
# length-mix, docs/benchmarks.md): with a FlashAttention kernel a padding-free batch does exactly its rows' own work,
# so it is the default there. With sdpa and eager the block-diagonal mask spans the whole concatenated batch
# (attention costs (sum of lengths)^2 instead of the sum of length^2, plus the mask), and padded batches of rows of
# similar length (sfn_train/batching.py) measured faster than padding-free batches on the length mix; so a recipe
# that leaves the keys unset gets those on sdpa and eager.
AUTO_SAMPLING = "auto"  # train_sampling_strategy left unset by the recipe (config.BATCHING_DEFAULTS)


def resolve_batching(kernel: str, training_args) -> dict:
    """The batching keys the recipe left unset (`padding_free: None`, `train_sampling_strategy: auto`) become the
    fastest correct choice for `kernel`; a value the recipe set is kept (resolve_attention has already refused the
    incorrect ones). Returns the decision and its reasons for the manifest, and logs them in one line."""
    from .batching import LENGTH_BUCKETS

    reasons = []
    batch = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
    if training_args.padding_free is None:
        why_not = ("packing decides the batches" if training_args.packing else
                   "batches of one row have no padding" if batch == 1 else
                   f"with {kernel} the mask of a padding-free batch spans all its rows: padded batches of similar "
                   "rows measured faster" if not is_flash_kernel(kernel) else
                   f"max_length is {training_args.max_length} and padding-free rows are not truncated (TRL); "
                   "`max_length: null` allows them" if training_args.max_length is not None else None)
        training_args.padding_free = why_not is None
        reasons.append(f"padding_free off by default: {why_not}" if why_not else
                       f"padding_free on by default: {kernel} runs the rows with its varlen kernel, no padding")
        if training_args.padding_free and training_args.use_cache:
            training_args.use_cache = False  # a cache makes transformers mix the rows (see resolve_attention)
    if training_args.train_sampling_strategy in (None, AUTO_SAMPLING):
        no_grouping = ("packed rows" if training_args.packing else "padding-free batches have no padding"
                       if training_args.padding_free else "batches of one row" if batch == 1 else None)
        training_args.train_sampling_strategy = "random" if no_grouping else LENGTH_BUCKETS
        reasons.append(f"random sampling by default ({no_grouping})" if no_grouping else
                       "padded batches of rows of similar length, in random order, by default (less padding, "
                       "measured faster; unlike group_by_length no length-sorted runs of steps)")
    decided = {"train_sampling_strategy": training_args.train_sampling_strategy, "batching_reasons": reasons}
    logger.info("batching (attention %s): padding_free %s, packing %s, sampling %s%s", kernel,
                bool(training_args.padding_free), training_args.packing_strategy if training_args.packing else "off",
                training_args.train_sampling_strategy, "" if reasons else ", as the recipe sets")
    for reason in reasons:  # one line per decision the run made for the recipe
        logger.info("batching: %s.", reason)
    return decided


def deepspeed_stage(training_args) -> int | None:
    config = getattr(training_args, "hf_deepspeed_config", None)
    if config is None:
        return None
    return int(config.config.get("zero_optimization", {}).get("stage", 0))


def check_run_setup(training_args, model_args, sfn_args) -> None:
    """Refuse, before any model is loaded, the combinations that would waste a run or fail late."""
    from .preflight import check_model_source, check_outside_needs

    check_outside_needs(training_args)  # report_to integrations installed, the hub reachable for push_to_hub
    check_model_source(model_args.model_name_or_path, revision=model_args.model_revision)  # not after hub retries
    if sfn_args.quantize_frozen != "none":
        # bitsandbytes must be able to quantize and backpropagate on this device (a tiny probe), and the run
        # must be single-process or DDP; otherwise one line now, not a traceback after the model has loaded.
        from .quantize import check_quantize_setup

        check_quantize_setup(training_args, sfn_args.quantize_frozen)
    if getattr(model_args, "use_peft", False):
        raise SfnError("use_peft is set, but sfn-train trains the real weights of the named modules: remove use_peft "
                       "(for LoRA use TRL's own sft script).")
    if deepspeed_stage(training_args) == 3:
        zero = training_args.hf_deepspeed_config.config["zero_optimization"]
        if not zero.get("stage3_gather_16bit_weights_on_model_save", False):
            raise SfnError(
                "DeepSpeed ZeRO-3 config lacks `stage3_gather_16bit_weights_on_model_save: true`: the saved "
                "checkpoint would hold empty tensors; set it in the DeepSpeed config (ds_configs/zero3.json does)."
            )


def resume_target(training_args) -> str | None:
    """`resume_from_checkpoint: true` means the latest *complete* checkpoint in output_dir.

    Resolved here to an explicit folder rather than handed to the Trainer as `True`: the Trainer would take the
    highest-numbered `checkpoint-N` even when a kill during saving left it half-written (see sfn_train/resume.py).
    """
    from .resume import resolve_latest

    value = training_args.resume_from_checkpoint
    if value is None or str(value).lower() in ("", "false", "none"):
        return None
    if str(value).lower() == "true":
        return resolve_latest(training_args.output_dir, training_args.world_size)
    if not Path(value).is_dir():
        raise SfnError(f"resume_from_checkpoint {value} is not a checkpoint folder: pass one, or `true` for the latest.")
    return value


def init_distributed(training_args) -> None:
    """Set up the process group before the model is loaded, so that ZeRO-3 partitions it in `from_pretrained`.

    `training_args.device` starts torch.distributed (gloo with `use_cpu`). On GPU the HF Trainer also starts
    DeepSpeed's communication layer there; with `use_cpu` it does not, and ZeRO-3 would then see a world of one, so
    we start it ourselves on top of the existing group.
    """
    from .engine import effective_deepspeed_config, needs_world_of_one, set_world_of_one

    if needs_world_of_one(training_args):
        # DeepSpeed/FSDP without a launcher: rank 0 of 1, and the device set-up that ran while parsing (with no
        # world) runs again -- TrainingArguments caches it in `_setup_devices` -- so the Trainer sees a process group.
        set_world_of_one()
        training_args.__dict__.pop("_setup_devices", None)
    _ = training_args.device
    if effective_deepspeed_config(training_args) is not None:  # the recipe's, or the accelerate launcher's
        import deepspeed

        if not deepspeed.comm.is_initialized():
            deepspeed.init_distributed(dist_backend="gloo" if training_args.use_cpu else None)


def setup_logging(training_args) -> None:
    import transformers

    level = logging.INFO if training_args.should_log else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout, level=logging.WARNING)
    logger.setLevel(level)
    transformers.utils.logging.set_verbosity(logging.WARNING)
