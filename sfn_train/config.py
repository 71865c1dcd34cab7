"""The recipe schema: TRL's `ScriptArguments`, `SFTConfig`, `ModelConfig` plus `SfnArguments`, parsed by `TrlParser`.

A recipe YAML and command-line flags are the same keys (flags override YAML); a key no dataclass knows is an error.
"""

from __future__ import annotations

import functools
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
    """The recipe parser (a `TrlParser`); built on first use so that importing this module does not import TRL."""
    return _recipe_parser_class()()


@functools.lru_cache(maxsize=1)
def _recipe_parser_class():
    from trl import TrlParser

    class RecipeParser(TrlParser):
        """TrlParser over the four recipe dataclasses that reports every problem as data, never as message text.

        A recipe key no dataclass field has is a set difference; a flag no option takes is what `parse_known_args`
        leaves over; a value of the wrong kind is caught per key before parsing (`_check_value_types`); argparse's
        own conversion of a flag fails with its `ArgumentError` (`exit_on_error=False`); and a value that a
        dataclass's `__post_init__` refuses is traced to its key by building that dataclass with that key alone.
        """

        def __init__(self):
            from trl import ModelConfig, ScriptArguments, SFTConfig

            super().__init__((ScriptArguments, SFTConfig, ModelConfig, SfnArguments), exit_on_error=False)
            self.set_defaults(**platform_defaults(), **BATCHING_DEFAULTS)

        def error(self, message):  # argparse's remaining exits (a flag without its value, ...): one line instead
            raise SfnError(f"{message}; see `sfn train --help` for the valid keys.")

        def recipe_keys(self) -> dict:
            """Recipe key -> its argparse action (the `--no_x` twin of a boolean shares its dest and comes second)."""
            keys = {}
            for action in self._actions:
                if action.dest not in _RESERVED_KEYS:
                    keys.setdefault(action.dest, action)
            return keys

        def parse_recipe(self, recipe: dict, flags: list[str], source: str | None) -> tuple:
            """(script_args, training_args, model_args, sfn_args) from the recipe mapping and command-line flags."""
            import argparse
            import os

            where = f"recipe {source}" if source else "recipe"
            actions = self.recipe_keys()
            unknown = [k for k in recipe if k not in actions and k != "env"]
            if unknown:
                raise SfnError(f"{where} has unknown key(s) {', '.join(map(_shown, unknown))}{_did_you_mean(unknown, actions)}: fix "
                               "the spelling or remove them (`sfn train --help` lists every key).")
            for key, value in recipe.items():
                if key != "env":
                    _check_text_value(where, key, value, actions[key])
            env = recipe.get("env", {})
            if not isinstance(env, dict):  # TrlParser's `env:` mapping: variables set before the run starts
                raise SfnError(f"{where}: `env` takes a mapping of environment variable names to values.")

            before = vars(self.parse_known_args([])[0])  # the values with no recipe and no flag
            for name, value in env.items():
                os.environ[str(name)] = str(value)
            self.set_defaults_with_config(**{k: v for k, v in recipe.items() if k != "env"})
            try:
                namespace, rest = self.parse_known_args(flags)
            except argparse.ArgumentError as exc:
                raise SfnError(f"flag {exc.argument_name}: {exc.message}; see `sfn train --help`.") from None
            stray = [r for r in rest if r.startswith("-")]
            if stray:
                hint = _did_you_mean([s.lstrip("-") for s in stray], actions, prefix="--")
                raise SfnError(f"unknown flag(s) {', '.join(map(_shown, stray))}{hint}: fix the spelling (`sfn train --help` lists "
                               "every key).")
            if rest:
                raise SfnError(f"unexpected value(s) {' '.join(rest)} on the command line: every value follows its "
                               "--key (see `sfn train --help`).")
            values = vars(namespace)
            return tuple(self._build(dtype, values, before, where) for dtype in self.dataclass_types)

        def _build(self, dtype, values: dict, before: dict, where: str):
            import dataclasses

            names = [f.name for f in dataclasses.fields(dtype) if f.init]
            inputs = {n: values[n] for n in names if n in values}
            try:
                return _construct(dtype, inputs)
            except SfnError:
                raise
            except Exception as exc:  # noqa: BLE001 - any refusal of a dataclass is a recipe problem
                culprit = self._culprit(dtype, inputs, before)
                key = f" (key `{culprit}`)" if culprit else ""
                raise SfnError(f"invalid {where} value{key}: {type(exc).__name__}: {_first_line(exc)}; check it "
                               "against `sfn train --help`.") from None

        @staticmethod
        def _culprit(dtype, inputs: dict, before: dict) -> str | None:
            """The first key set by the recipe or a flag that `dtype` refuses on its own, all else left as it was."""
            baseline = {k: before[k] for k in inputs if k in before}
            for key, value in inputs.items():
                if key in baseline and value == baseline[key]:
                    continue
                try:
                    _construct(dtype, {**baseline, key: value})
                except Exception:  # noqa: BLE001 - this key alone fails: it is the one to name
                    return key
            return None

    return RecipeParser


def _construct(dtype, inputs: dict):
    with warnings.catch_warnings():
        # TrainingArguments warns that SFTConfig's own `gradient_checkpointing` default is a deprecated alias.
        warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*deprecated", category=FutureWarning)
        return dtype(**inputs)


def _shown(key) -> str:
    """A key as a message shows it: quoted when it is empty, padded or spans lines (a YAML key can be any text)."""
    return key if key and key.isprintable() and key.strip() == key else repr(key)


def _did_you_mean(unknown: list[str], known, prefix: str = "") -> str:
    import difflib

    hints = [prefix + m for u in unknown for m in difflib.get_close_matches(u, list(known), n=1)]
    return f" (did you mean {', '.join(hints)}?)" if hints else ""


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
    try:
        return make_parser().parse_recipe(recipe, argv, config)
    except SfnError:
        raise
    except SystemExit as exc:  # argparse exits on its own options (e.g. a stray --help value); never exit silently
        raise SfnError(f"the recipe or flags made the argument parser exit (status {exc.code}): check them "
                       "against `sfn train --help`.") from None


def _first_line(exc) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else repr(exc))[:300]


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


def _check_text_value(where: str, key: str, value, action) -> None:
    """A text value is converted by the key's own argparse type, as argparse does for a default: check it here."""
    import argparse

    if not isinstance(value, str) or not callable(action.type):
        return
    try:
        converted = action.type(value)
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        name = getattr(action.type, "__name__", "the key's type")
        raise SfnError(f"{where}: `{key}` is {value!r}, which is not a valid {name} value; fix that value.") from None
    if action.choices is not None and converted not in action.choices:
        choices = [str(c) for c in action.choices]
        listed = ", ".join(choices[:12]) + (f", ... ({len(choices)} in all, see `sfn train --help`)"
                                             if len(choices) > 12 else "")
        raise SfnError(f"{where}: `{key}` is {value!r}; use one of {listed}.")


def print_help() -> None:
    make_parser().print_help(sys.stdout)
