"""The recipe schema: TRL's `ScriptArguments`, `SFTConfig`, `ModelConfig` plus `SfnArguments`, parsed by `TrlParser`.

A recipe YAML and command-line flags are the same keys (flags override YAML); a key no dataclass knows is an error.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, field

from .errors import SfnError

QUANTIZE_CHOICES = ("none", "8bit", "4bit")


@dataclass
class SfnArguments:
    """What sfn-train adds to a TRL SFT recipe."""

    trainable_modules: list[str] = field(
        default_factory=lambda: ["o_proj"],
        metadata={
            "help": "Module roles (o_proj, q_proj, k_proj, v_proj, qkv_proj, gate_proj, up_proj, down_proj, norm, "
            "embed, lm_head; groups attn, qkv, mlp) or regexes searched in parameter names; `all` = full fine-tune."
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
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Allow writing into a non-empty output_dir that is not being resumed."},
    )

    def __post_init__(self):
        from .roles import normalize_modules, parse_layers

        self.trainable_modules = normalize_modules(self.trainable_modules)
        if isinstance(self.trainable_layers, (str, int)):
            self.trainable_layers = [str(self.trainable_layers)]
        self.trainable_layers = [str(x) for x in self.trainable_layers]
        parse_layers(self.trainable_layers)  # validate early, before any model is loaded
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


def make_parser():
    from trl import ModelConfig, ScriptArguments, SFTConfig, TrlParser

    parser = TrlParser((ScriptArguments, SFTConfig, ModelConfig, SfnArguments))
    parser.set_defaults(**platform_defaults())
    return parser


class _ParseError(SfnError):
    pass


def parse_recipe(argv: list[str]):
    """argv (`--config recipe.yaml --key value ...`) -> (script_args, training_args, model_args, sfn_args).

    Every failure is one `SfnError` line: argparse's own exit is turned into an exception, and unknown keys name
    the recipe file.
    """
    import argparse

    parser = make_parser()

    def fail(message):  # argparse would print usage and exit; we want one clean line
        raise _ParseError(f"{message}; see `sfn train --help` for the valid keys.")

    parser.error = fail
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                sub.error = fail
    config = argv[argv.index("--config") + 1] if "--config" in argv and argv.index("--config") + 1 < len(argv) else None
    if config is not None:
        _check_recipe_file(config)
    try:
        with warnings.catch_warnings():
            # TrainingArguments warns that SFTConfig's own `gradient_checkpointing` default is a deprecated alias.
            warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*deprecated", category=FutureWarning)
            return tuple(parser.parse_args_and_config(argv))
    except SfnError:
        raise
    except ValueError as exc:
        message = str(exc).splitlines()[0]
        if message.startswith("Unknown arguments from config file"):
            keys = [s[2:] for s in message.split("[", 1)[1].rsplit("]", 1)[0].replace("'", "").split(", ")
                    if s.startswith("--")]
            raise SfnError(
                f"recipe {config} has unknown key(s) {', '.join(keys)}: fix the spelling or remove them "
                "(`sfn train --help` lists every key)."
            ) from None
        if message.startswith("Some specified arguments are not used"):
            flags = [s for s in message.split("[", 1)[1].rsplit("]", 1)[0].replace("'", "").split(", ") if s.startswith("--")]
            raise SfnError(
                f"unknown flag(s) {', '.join(flags)}: fix the spelling (`sfn train --help` lists every key)."
            ) from None
        raise SfnError(f"invalid recipe value: {message}") from None
    except TypeError as exc:
        raise SfnError(f"invalid recipe value: {exc}") from None


def _check_recipe_file(path: str) -> None:
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


def print_help() -> None:
    make_parser().print_help(sys.stdout)
