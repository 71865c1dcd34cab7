"""The recipe schema: TRL's `ScriptArguments`, `SFTConfig`, `ModelConfig` plus `SfnArguments`, parsed by `TrlParser`.

A recipe YAML and command-line flags are the same keys (flags override YAML); a key no dataclass knows is an error.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass, field

from .errors import SfnError

QUANTIZE_CHOICES = ("none", "8bit", "4bit")


@dataclass
class SfnArguments:
    """What sfn-train adds to a TRL SFT recipe."""

    trainable_modules: list[str] = field(
        default_factory=lambda: ["o_proj"],
        metadata={
            "help": "Module roles (o_proj, q_proj, k_proj, v_proj, qkv_proj, kv_proj, gate_proj, up_proj, down_proj, "
            "experts, shared_experts, router, norm, embed, lm_head; groups attn, qkv, mlp) or regexes searched in "
            "parameter names; `all` = full fine-tune."
        },
    )
    trainable_layers: list[str] = field(
        default_factory=lambda: ["all"],
        metadata={"help": "Decoder layers whose selected modules train: `all`, a range `0-11`, or indices `3 5`."},
    )
    quantize_frozen: str = field(
        default="none",
        metadata={"help": "Load frozen linear layers quantized: none, 8bit, 4bit.", "choices": list(QUANTIZE_CHOICES)},
    )
    dataset_format: str = field(
        default="none",
        metadata={"help": "Build prompt/completion from a known dataset: none, or s1 (s1K / s1K-1.1 rows in s1's "
                  "training text, <|im_start|>think ... <|im_start|>answer; see sfn_train/formats.py).",
                  "choices": ["none", "s1"]},
    )
    prompt_template: str | None = field(
        default=None,
        metadata={"help": "Build a `prompt` column from each row with str.format, e.g. '{question}'."},
    )
    completion_template: str | None = field(
        default=None,
        metadata={"help": "Build a `completion` column from each row with str.format, e.g. '{solution}'."},
    )
    use_chat_template: bool = field(
        default=True,
        metadata={"help": "Wrap plain-text prompt/completion rows as a user/assistant conversation when the "
                  "tokenizer has a chat template."},
    )
    validation_fraction: float = field(
        default=0.0,
        metadata={"help": "Hold out this fraction of the training rows as the validation split (picked by a hash of "
                  "each row's content: independent of row order and seed, identical rows on the same side); it is "
                  "evaluated when training ends (and per eval_strategy) and `sfn sweep` ranks runs on it. 0 = none, "
                  "unless eval_strategy is set and the dataset has a `dataset_test_split` split (TRL's convention)."},
    )
    truncation: str | None = field(
        default=None,
        metadata={"help": "Rows longer than max_length (counted at start-up): `drop` them, `keep_head` (TRL's cut to "
                  "the first max_length tokens), or `error`. Unset: drop when they are at most 1% of the rows, "
                  "error above (sfn_train/truncation.py says why).", "choices": ["drop", "keep_head", "error"]},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Replace a non-empty output_dir as a whole (its old contents are kept in "
                  "output_dir/.replaced-run until the new run is complete). Without it, a folder an interrupted run "
                  "left is resumed (or started over when it has no complete checkpoint) and any other is refused."},
    )
    memory_plan: bool = field(
        default=True,
        metadata={"help": "Log the predicted peak memory per rank at start-up (`sfn memory`'s simulation of one step, "
                  "seconds for small models) and record it in the manifest beside the measured peak; false skips it."},
    )
    allow_fsdp1: bool = field(
        default=False,
        metadata={"help": "Run FSDP1 (fsdp_config version 1) although part of the model is frozen; it then keeps "
                  "gradient memory for the frozen tensors too (pytorch #104690). FSDP2 has no such cost."},
    )

    def __post_init__(self):
        from .roles import normalize_modules, parse_layers

        self.trainable_modules = normalize_modules(self.trainable_modules)
        if isinstance(self.trainable_layers, (str, int)):
            self.trainable_layers = [str(self.trainable_layers)]
        self.trainable_layers = [str(x) for x in self.trainable_layers]
        parse_layers(self.trainable_layers)  # validate early, before any model is loaded
        if not 0.0 <= self.validation_fraction < 1.0:
            raise SfnError(f"validation_fraction {self.validation_fraction} must be at least 0 and below 1 (e.g. 0.1).")
        if self.truncation not in (None, "drop", "keep_head", "error"):
            raise SfnError(f"truncation {self.truncation!r} is invalid: use drop, keep_head or error.")
        if self.quantize_frozen not in QUANTIZE_CHOICES:
            raise SfnError(f"quantize_frozen {self.quantize_frozen!r} is invalid: use one of {', '.join(QUANTIZE_CHOICES)}.")


def platform_defaults() -> dict:
    """Defaults that depend on the machine, applied below the recipe (a recipe or flag still wins).

    TRL's SFTConfig defaults to bf16 and activation checkpointing, right for GPUs and wrong on a CPU-only machine,
    where the HF Trainer also needs `use_cpu` for multi-process (gloo) runs.
    """
    import torch

    if torch.cuda.is_available():
        return {}
    return {"use_cpu": True, "bf16": False, "gradient_checkpointing": False}


# Batching keys a recipe may leave unset: the run then picks the fastest correct choice for its attention kernel
# (sfn_train.startup.resolve_batching), instead of TRL's fixed padded, randomly sampled batches.
BATCHING_DEFAULTS = {"padding_free": None, "train_sampling_strategy": "auto"}


def make_parser():
    """The recipe parser (a `TrlParser`, sfn_train/recipe_parser.py) over this schema, imported on first use:
    importing this module does not import TRL."""
    from trl import ModelConfig, ScriptArguments, SFTConfig

    from .recipe_parser import RecipeParser

    return RecipeParser((ScriptArguments, SFTConfig, ModelConfig, SfnArguments),
                        {**platform_defaults(), **BATCHING_DEFAULTS}, reserved=_RESERVED_KEYS, usage=USAGE)


def parse_recipe(argv: list[str]):
    """argv (`--config recipe.yaml --key value ...`) -> (script_args, training_args, model_args, sfn_args).

    Every failure is one `SfnError` line naming the key, the flag or the recipe file.
    """
    argv = list(argv)
    config, recipe = None, {}
    if "--config" in argv:
        at = argv.index("--config")
        if at + 1 >= len(argv):
            raise SfnError("--config needs the path of a YAML recipe.")
        config = argv[at + 1]
        del argv[at : at + 2]
        recipe = _check_recipe_file(config)
    return make_parser().parse_recipe(recipe, argv, config)


def _check_recipe_file(path: str) -> dict:
    """The recipe's mapping, once it is known to be one, with string keys, of values of the right kinds."""
    import os

    import yaml

    if not os.path.isfile(path):
        raise SfnError(f"recipe file {path} does not exist: pass --config with the path of a YAML recipe.")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise SfnError(f"recipe {path} is not valid YAML{where}: fix the syntax.") from None
    if not isinstance(data, dict):
        raise SfnError(f"recipe {path} must be a YAML mapping of keys to values, not {type(data).__name__}.")
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise SfnError(f"recipe {path} has non-string key(s) {bad}: every key must be a recipe key name.")
    _check_value_types(path, data)
    reserved = sorted(set(data) & _RESERVED_KEYS)
    if reserved:  # argparse's own options: as recipe keys they would corrupt the parser instead of setting a value
        raise SfnError(f"recipe {path} uses {', '.join(reserved)}, which is a command-line option, not a recipe key: "
                       "remove it.")
    return data


_RESERVED_KEYS = {"help", "config"}
_BOOL_AS_TEXT = {"resume_from_checkpoint", "fsdp"}  # text fields where `true` is meaningful (latest checkpoint; FSDP on)
_WORDS = {str: "a string", dict: "a mapping", list: "a list", int: "an integer", float: "a number", bool: "true/false"}


@functools.lru_cache(maxsize=1)
def _field_types() -> dict[str, frozenset]:
    """Recipe key -> the plain types its dataclass field accepts (str, int, float, bool, list, dict, NoneType)."""
    import dataclasses
    import typing

    from trl import ModelConfig, ScriptArguments, SFTConfig

    def flatten(tp) -> set:
        origin = typing.get_origin(tp)
        if origin in (list, tuple, set):
            return {list}
        if origin is dict:
            return {dict}
        if origin is typing.Literal:
            return {type(a) for a in typing.get_args(tp)}
        if typing.get_args(tp):  # Union / Optional
            return set().union(*(flatten(a) for a in typing.get_args(tp)))
        return {tp} if isinstance(tp, type) else {object}

    found: dict[str, frozenset] = {}
    for cls in (ScriptArguments, SFTConfig, ModelConfig, SfnArguments):
        try:
            hints = typing.get_type_hints(cls)
        except Exception:  # noqa: BLE001 - an unresolvable annotation only skips this check
            continue
        for f in dataclasses.fields(cls):
            if f.name in hints:
                found[f.name] = frozenset(flatten(hints[f.name]) | ({type(None)} if f.default is None else set()))
    return found


def _kind_error(value, allowed) -> bool:
    """Whether a YAML value of this kind can never be right for a field of these types."""
    if value is None:
        return type(None) not in allowed
    if isinstance(value, bool):
        return bool not in allowed
    if isinstance(value, int):
        return not allowed & {int, float, list}  # a list key takes one item too (`trainable_layers: 3`)
    if isinstance(value, float):
        return not allowed & {float, list} and not (int in allowed and value.is_integer())
    if isinstance(value, list):
        return list not in allowed or not all(isinstance(v, (str, int, float)) and not isinstance(v, bool)
                                              for v in value)
    if isinstance(value, dict):
        return dict not in allowed
    return False  # text: converted by the key's own parser (`_check_text_value`)


def _check_value_types(path: str, data: dict) -> None:
    """Refuse a value of a kind its key never takes: true/false, a number, null, a list or a mapping.

    Not only tidiness: keys such as `accelerator_config`, `deepspeed` and `fsdp_config` are opened as JSON files by
    TrainingArguments, and `open(True)` opens file descriptor 1 -- the recipe would close the process's stdout.
    """
    types = _field_types()
    for key, value in data.items():
        allowed = types.get(key)
        if not allowed or object in allowed or (isinstance(value, bool) and key in _BOOL_AS_TEXT):
            continue
        if _kind_error(value, allowed):
            want = " or ".join(_WORDS.get(t, t.__name__) for t in sorted(allowed - {type(None)}, key=str))
            if list in allowed and isinstance(value, list):
                want = "a list of text or numbers"
            hint = " (quote it if it is text)" if str in allowed and not isinstance(value, (list, dict)) else ""
            shown = "null" if value is None else repr(value)
            raise SfnError(f"recipe {path}: `{key}` takes {want}, not {shown}{hint}; fix that value.")


USAGE = "sfn train --config RECIPE.yaml [--key value ...]"
# The TRL / transformers keys most recipes set, in the order a recipe is read (`sfn train --help`; every key:
# --help-all)
COMMON_KEYS = ("model_name_or_path", "dataset_name", "output_dir", "learning_rate", "max_steps", "num_train_epochs",
               "per_device_train_batch_size", "gradient_accumulation_steps", "max_length", "lr_scheduler_type",
               "warmup_steps", "dtype", "bf16", "gradient_checkpointing", "attn_implementation", "deepspeed",
               "save_strategy", "save_steps", "eval_strategy", "logging_steps", "seed", "report_to",
               "resume_from_checkpoint")


def print_help(full: bool = False) -> None:
    """`sfn train --help`: the keys sfn adds and the most-used TRL keys; `full`: every key (`--help-all`)."""
    import dataclasses
    import re

    parser = make_parser()
    if full:
        parser.print_help(sys.stdout)
        return
    actions = parser.recipe_keys()

    def line(key: str) -> str:
        text = " ".join(str(actions[key].help or "").split()).replace("%%", "%")
        first = re.split(r"(?<=[a-z0-9)`])\. (?=[A-Z`])", text)[0].rstrip(".")
        shown = f"  --{key:<28} {first}"
        return shown if len(shown) <= 118 else shown[:114].rsplit(" ", 1)[0] + " ..."

    sfn_keys = [f.name for f in dataclasses.fields(SfnArguments)]
    lines = [f"usage: {USAGE}", "", "Every recipe key is also a flag (a flag overrides the recipe); keys are never "
             "abbreviated.", "", "keys sfn-train adds:", *map(line, sfn_keys), "",
             "most-used TRL / transformers keys:", *map(line, [k for k in COMMON_KEYS if k in actions]), "",
             f"all {len(actions)} keys with their defaults: sfn train --help-all"]
    print("\n".join(lines))
