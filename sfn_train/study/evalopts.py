"""A study's `eval:` block is `sfn eval` options: read with `sfn eval`'s own parser, so names, types and defaults
are that command's and never a second list.
"""

from __future__ import annotations

import argparse

from ..errors import SfnError

# `sfn eval` options that the study sets itself, per model
EVAL_OWN_OPTIONS = ("models", "task", "out", "label", "plugin", "force", "overwrite")


def _option_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}


def eval_flags(options: dict, where: str = "eval") -> list[str]:
    """`{samples: 4, backend: vllm}` -> `["--samples", "4", "--backend", "vllm"]` (the flags `sfn eval` takes)."""
    from ..evaluation.cli import eval_parser

    actions = _option_actions(eval_parser())
    flags: list[str] = []
    for key, value in options.items():
        dest = str(key).replace("-", "_")
        if dest in EVAL_OWN_OPTIONS:
            raise SfnError(f"{where}.{key}: the study sets --{dest.replace('_', '-')} itself (per model and task); "
                           "remove it.")
        action = actions.get(dest)
        if action is None:
            known = ", ".join(sorted(d for d in actions if d not in EVAL_OWN_OPTIONS))
            from ..arguments import did_you_mean

            hint = did_you_mean([dest], [d for d in actions if d not in EVAL_OWN_OPTIONS])
            raise SfnError(f"{where} has unknown key `{key}`{hint}: the keys are the `sfn eval` options ({known}).")
        flag = action.option_strings[0]
        if isinstance(action, argparse._StoreTrueAction):
            if not isinstance(value, bool):
                raise SfnError(f"{where}.{key} takes true or false, not {value!r}.")
            flags += [flag] if value else []
        elif value is None:
            continue
        elif isinstance(action, argparse._AppendAction):
            for item in value if isinstance(value, list) else [value]:
                flags += [flag, str(item)]
        else:
            if isinstance(value, (list, dict)):
                raise SfnError(f"{where}.{key} takes one value, not {value!r}.")
            flags += [flag, str(value).lower() if isinstance(value, bool) else str(value)]
    return flags


def parse_eval_options(options: dict, tasks: list[str], where: str = "eval") -> argparse.Namespace:
    """The `sfn eval` namespace these options give (defaults filled in), checked as `sfn eval` checks them."""
    from ..evaluation.cli import eval_parser, evaluate_kwargs
    from ..evaluation.settings import GenerationSettings, resolve_settings

    argv = ["MODEL", *[x for t in tasks for x in ("--task", str(t))], "--out", "OUT", *eval_flags(options, where)]
    try:
        ns = eval_parser().parse_args(argv)
        kwargs = evaluate_kwargs(ns)
        resolve_settings({k: v for k, v in kwargs.items() if k in GenerationSettings.__dataclass_fields__})
    except SfnError as exc:
        raise SfnError(f"{where}: {exc}") from None
    return ns
