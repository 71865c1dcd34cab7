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
            parsed = tuple(parser.parse_args_and_config(argv))
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
        raise SfnError(f"invalid recipe value{_culprit(config)}: {message}") from None
    except TypeError as exc:
        raise SfnError(f"invalid recipe value{_culprit(config)}: {_first_line(exc)}") from None
    except SystemExit as exc:  # argparse exits on its own options (e.g. a stray --help value); never exit silently
        raise SfnError(f"the recipe or flags made the argument parser exit (status {exc.code}): check them "
                       "against `sfn train --help`.") from None
    except Exception as exc:  # noqa: BLE001 - parsing reads only the recipe, so any failure is a recipe problem
        raise SfnError(f"invalid recipe{f' {config}' if config else ''}{_culprit(config)}: {type(exc).__name__}: "
                       f"{_first_line(exc)}; check the keys and values against `sfn train --help`.") from None
    if len(parsed) != 4:  # HfArgumentParser appends a namespace of values no dataclass took
        raise SfnError(f"the recipe sets values no recipe key takes ({_first_line(parsed[4:])}): remove them.")
    return parsed


def _culprit(config: str | None) -> str:
    """` (key `x`)` when parsing the recipe's key `x` alone already fails: names the key an error message does not."""
    import os
    import tempfile

    import yaml

    if config is None:
        return ""
    try:
        with open(config) as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return ""
    for key, value in data.items():
        fd, path = tempfile.mkstemp(suffix=".yaml")
        try:
            with os.fdopen(fd, "w") as f:
                yaml.safe_dump({key: value}, f)
            parser = make_parser()
            parser.error = _raise
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                parser.parse_args_and_config(["--config", path])
        except KeyboardInterrupt:
            raise
        except BaseException:  # noqa: BLE001 - this key alone fails: it is the one to name
            return f" (key `{key}`)"
        finally:
            os.unlink(path)
    return ""


def _raise(message):
    raise ValueError(message)


def _first_line(exc) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else repr(exc))[:300]


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
    _check_value_types(path, data)
    reserved = sorted(set(data) & _RESERVED_KEYS)
    if reserved:  # argparse's own options: as recipe keys they would corrupt the parser instead of setting a value
        raise SfnError(f"recipe {path} uses {', '.join(reserved)}, which is a command-line option, not a recipe key: "
                       "remove it.")


_RESERVED_KEYS = {"help", "config"}
_BOOL_AS_TEXT = {"resume_from_checkpoint"}  # text fields where `true` is meaningful (the latest checkpoint)
_WORDS = {str: "a string", dict: "a mapping", list: "a list", int: "an integer", float: "a number", bool: "true/false"}


def _field_types() -> dict[str, set]:
    """Recipe key -> the plain types its dataclass field accepts (str, int, float, bool, list, dict)."""
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

    found: dict[str, set] = {}
    for cls in (ScriptArguments, SFTConfig, ModelConfig, SfnArguments):
        try:
            hints = typing.get_type_hints(cls)
        except Exception:  # noqa: BLE001 - an unresolvable annotation only skips this check
            continue
        for f in dataclasses.fields(cls):
            if f.name in hints:
                found[f.name] = flatten(hints[f.name])
    return found


def _check_value_types(path: str, data: dict) -> None:
    """Refuse true/false or a number for a key that takes only text, a list or a mapping.

    Not only tidiness: keys such as `accelerator_config`, `deepspeed` and `fsdp_config` are opened as JSON files by
    TrainingArguments, and `open(True)` opens file descriptor 1 -- the recipe would close the process's stdout.
    """
    types = _field_types()
    for key, value in data.items():
        allowed = types.get(key)
        if not allowed or object in allowed:
            continue
        wrong_bool = isinstance(value, bool) and bool not in allowed and key not in _BOOL_AS_TEXT
        wrong_number = (isinstance(value, (int, float)) and not isinstance(value, bool)
                        and not allowed & {int, float, list})  # a list key takes one item too (`trainable_layers: 3`)
        if wrong_bool or wrong_number:
            want = " or ".join(_WORDS.get(t, t.__name__) for t in sorted(allowed - {type(None)}, key=str))
            hint = " (quote it if it is text)" if str in allowed else ""
            raise SfnError(f"recipe {path}: `{key}` takes {want}, not {value!r}{hint}; fix that value.")


def print_help() -> None:
    make_parser().print_help(sys.stdout)
