"""The recipe parser: TRL's `TrlParser` over the recipe dataclasses (the schema: sfn_train/config.py), with sfn's
errors. Built by `config.make_parser`, which imports this module (and so TRL) on first use.
"""

from __future__ import annotations

import dataclasses
import re
import warnings

from trl import TrlParser

from .arguments import SfnErrors, did_you_mean
from .errors import SfnError, first_line


class RecipeParser(SfnErrors, TrlParser):
    """TrlParser over the four recipe dataclasses that reports every problem as data, never as message text.

    A recipe key no dataclass field has is a set difference; a value of the wrong kind is caught per key before
    parsing (`_check_value_types`); a flag no option takes, a flag's value that does not convert and a flag without
    its value are argparse's, made one SfnError line as in every sfn command (sfn_train/arguments.py); and a value
    that a dataclass's `__post_init__` refuses is traced to its key by building that dataclass with that key alone.
    """

    def __init__(self, dataclass_types: tuple, defaults: dict, reserved: set[str], usage: str | None = None):
        super().__init__(dataclass_types, prog="sfn train", usage=usage, allow_abbrev=False)
        self.set_defaults(**defaults)
        for action in self._actions:  # argparse formats help with %: a lone % in a key's help (`1% of the rows`)
            if action.help:              # would break `--help-all`
                action.help = re.sub(r"%(?![%(])", "%%", action.help)
        self.reserved = set(reserved)  # argparse's own options (help, config): never recipe keys

    def recipe_keys(self) -> dict:
        """Recipe key -> its argparse action (the `--no_x` twin of a boolean shares its dest and comes second)."""
        keys = {}
        for action in self._actions:
            if action.dest not in self.reserved:
                keys.setdefault(action.dest, action)
        return keys

    def parse_recipe(self, recipe: dict, flags: list[str], source: str | None) -> tuple:
        """(script_args, training_args, model_args, sfn_args) from the recipe mapping and command-line flags."""
        import os

        where = f"recipe {source}" if source else "recipe"
        actions = self.recipe_keys()
        unknown = [k for k in recipe if k not in actions and k != "env"]
        if unknown:
            raise SfnError(f"{where} has unknown key(s) {', '.join(map(_shown, unknown))}"
                           f"{did_you_mean(unknown, actions)}: fix the spelling or remove them (`sfn train --help-all` "
                           "lists every key).")
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
        values = vars(self.parse_args(flags))
        return tuple(self._build(dtype, values, before, where) for dtype in self.dataclass_types)

    def _build(self, dtype, values: dict, before: dict, where: str):
        names = [f.name for f in dataclasses.fields(dtype) if f.init]
        inputs = {n: values[n] for n in names if n in values}
        try:
            return _construct(dtype, inputs)
        except SfnError:
            raise
        except Exception as exc:  # noqa: BLE001 - any refusal of a dataclass is a recipe problem
            culprit = self._culprit(dtype, inputs, before)
            key = f" (key `{culprit}`)" if culprit else ""
            raise SfnError(f"invalid {where} value{key}: {type(exc).__name__}: {first_line(exc, 300)}; check it "
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


def _construct(dtype, inputs: dict):
    with warnings.catch_warnings():
        # TrainingArguments warns that SFTConfig's own `gradient_checkpointing` default is a deprecated alias.
        warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*deprecated", category=FutureWarning)
        return dtype(**inputs)


def _shown(key) -> str:
    """A key as a message shows it: quoted when it is empty, padded or spans lines (a YAML key can be any text)."""
    return key if key and key.isprintable() and key.strip() == key else repr(key)


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
