"""Start-up policy of a training run: every check and decision made once, before a model is loaded or a file written.

Each decision is logged and returned as data for the manifest, so what a run did is read from the run, not inferred
from its recipe.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from .errors import SfnError

logger = logging.getLogger("sfn_train")

FLASH_IMPLEMENTATIONS = ("flash_attention_2", "flash_attention_3")


def resolve_attention(model_args, training_args) -> dict:
    """Pick the attention kernel once, and keep padding-free batching only where the kernel supports it.

    FlashAttention needs a CUDA GPU and the flash-attn package; without them we fall back to sdpa with a logged
    reason instead of a stack trace at the first forward. Padding-free batches (and TRL's BFD packing, which implies
    them) are only correct with a varlen FlashAttention kernel: with sdpa or eager the loss silently mixes sequences
    (trl #2834), so they are switched off with a warning.
    """
    import importlib.util

    import torch

    requested = model_args.attn_implementation
    used, reason = requested, None
    if requested in FLASH_IMPLEMENTATIONS:
        package = "flash_attn_interface" if requested == "flash_attention_3" else "flash_attn"
        if not torch.cuda.is_available():
            used, reason = "sdpa", f"{requested} needs a CUDA GPU and none is visible"
        elif importlib.util.find_spec(package) is None:
            used, reason = "sdpa", f"{requested} needs the {package} package (pip install 'sfn-train[flash]')"
    if reason:
        logger.warning("attention: %s; falling back to sdpa.", reason)
        model_args.attn_implementation = used
    flash = used in FLASH_IMPLEMENTATIONS
    if not flash and training_args.padding_free:
        logger.warning("padding_free needs a FlashAttention kernel (attention is %s): disabled.", used or "default")
        training_args.padding_free = False
    if not flash and training_args.packing and training_args.packing_strategy in ("bfd", "bfd_split"):
        logger.warning(
            "packing with strategy %s makes padding-free batches, which need a FlashAttention kernel "
            "(attention is %s): packing disabled.", training_args.packing_strategy, used or "default")
        training_args.packing = False
    return {"requested": requested, "used": used, "fallback_reason": reason,
            "padding_free": training_args.padding_free, "packing": training_args.packing}


def deepspeed_stage(training_args) -> int | None:
    config = getattr(training_args, "hf_deepspeed_config", None)
    if config is None:
        return None
    return int(config.config.get("zero_optimization", {}).get("stage", 0))


def check_run_setup(training_args, model_args, sfn_args) -> None:
    """Refuse, before any model is loaded, the combinations that would waste a run or fail late."""
    if sfn_args.quantize_frozen != "none":
        # Issue 6: bitsandbytes must be able to quantize and backpropagate on this device (a tiny probe), and the run
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
    _ = training_args.device
    if training_args.deepspeed:
        import deepspeed

        if not deepspeed.comm.is_initialized():
            deepspeed.init_distributed(dist_backend="gloo" if training_args.use_cpu else None)


def check_train_output_dir(training_args, sfn_args, resuming: bool) -> None:
    """Refuse a non-empty output_dir unless the run resumes there or the recipe allows overwriting."""
    out = Path(training_args.output_dir)
    if out.exists() and any(out.iterdir()) and not resuming and not sfn_args.overwrite_output_dir:
        raise SfnError(
            f"output_dir {out} exists and is not empty: choose another output_dir, resume with "
            "`resume_from_checkpoint: true`, or set `overwrite_output_dir: true`."
        )


def setup_logging(training_args) -> None:
    import transformers

    level = logging.INFO if training_args.should_log else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout, level=logging.WARNING)
    logger.setLevel(level)
    transformers.utils.logging.set_verbosity(logging.WARNING)
