"""Recipe keys of TRL and transformers that sfn train does not honour: each is mapped to what sfn does, or refused.

`sfn train --help` lists every key of TRL's `ScriptArguments`, `SFTConfig` and `ModelConfig`, because the recipe is
parsed with them (one schema). Most are honoured by the HF Trainer and TRL's SFTTrainer, which sfn trains with. The ones
below belong to TRL's own scripts (which load the model and build LoRA adapters themselves) and would be silently
ignored by sfn, which loads the model itself and trains real weights: set to anything but their default, a key is
mapped to the sfn key that does the same (with a log line) or refused in one line naming it.
"""

from __future__ import annotations

import dataclasses
import logging

from .errors import SfnError

logger = logging.getLogger("sfn_train")

# TRL ModelConfig keys that map to sfn's quantize_frozen (bitsandbytes NF4 with double quantization / LLM.int8 on the
# frozen linear layers; sfn_train/quantize.py)
QUANTIZE_ALIASES = {"load_in_4bit": "4bit", "load_in_8bit": "8bit"}

# key -> why it is refused (what to use instead); refused when set to anything but its dataclass default
REFUSED = {
    **{key: "a LoRA setting: sfn-train trains the real weights of the named modules (for LoRA use TRL's own sft "
            "script); choose them with trainable_modules" for key in
       ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_target_parameters",
        "lora_modules_to_save", "lora_task_type", "use_rslora", "use_dora")},
    "bnb_4bit_quant_type": "quantize_frozen: 4bit always uses NF4",
    "bnb_4bit_quant_storage": "quantize_frozen: 4bit stores its weights as bitsandbytes packs them (uint8)",
    "model_init_kwargs": "sfn loads the model itself: use the keys dtype, attn_implementation, model_revision and "
                         "trust_remote_code",
    "dataset_streaming": "sfn reads the whole dataset (it hashes rows for the validation split)",
    "ignore_bias_buffers": "a TRL DPO-script setting with no effect on SFT",
    "do_predict": "sfn train runs no prediction pass; evaluate the output with `sfn eval`",
}


def _default(obj, name: str):
    for f in dataclasses.fields(obj):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            return f.default_factory() if f.default_factory is not dataclasses.MISSING else None
    raise KeyError(name)


def apply_recipe_aliases(script_args, training_args, model_args, sfn_args) -> None:
    """Map `load_in_4bit`/`load_in_8bit` to `quantize_frozen` (logged); refuse the REFUSED keys that are set."""
    for args in (script_args, training_args, model_args):
        names = {f.name for f in dataclasses.fields(args)}
        for key, why in REFUSED.items():
            if key in names and getattr(args, key) != _default(args, key):
                raise SfnError(f"{key} is set ({getattr(args, key)!r}), but sfn train does not use it: {why}. "
                               f"Remove {key} from the recipe.")
    asked = [key for key in QUANTIZE_ALIASES if getattr(model_args, key, False)]
    if len(asked) > 1:
        raise SfnError("load_in_4bit and load_in_8bit are both set: keep one (or use quantize_frozen: 4bit/8bit).")
    if asked:
        mode = QUANTIZE_ALIASES[asked[0]]
        if sfn_args.quantize_frozen not in ("none", mode):
            raise SfnError(f"{asked[0]} asks for {mode} but quantize_frozen is {sfn_args.quantize_frozen}: keep one "
                           "of the two keys.")
        sfn_args.quantize_frozen = mode
        logger.info("%s: true means quantize_frozen: %s here (the frozen linear layers held in %s by bitsandbytes; "
                    "the trained modules stay in full precision).", asked[0], mode, mode)
