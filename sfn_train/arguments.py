"""The argument parser of every `sfn` command: argparse, with the command line held to the rules of a recipe YAML.

- No abbreviations (`allow_abbrev=False`): `--learning-rat 1e-3` is an unknown flag, as the same typo in a recipe is an
  unknown key; a prefix that happens to be unique today would silently change meaning when a key is added.
- Every argparse failure -- an unknown flag, a missing value, a value of the wrong type, a bad choice -- is one
  `SfnError` line naming it and the command's `--help` (sfn's main prints it and exits 2), with a "did you mean" for
  an unknown flag. argparse otherwise prints its usage and exits by itself.
"""

from __future__ import annotations

import argparse
import difflib

from .errors import SfnError


def did_you_mean(unknown: list[str], known, prefix: str = "") -> str:
    """' (did you mean --x, --y?)' for the closest known names, or ''."""
    hints = [prefix + m for u in unknown for m in difflib.get_close_matches(u, list(known), n=1)]
    return f" (did you mean {', '.join(hints)}?)" if hints else ""


def unknown_flags_error(extras: list[str], option_strings, command: str) -> SfnError:
    """The error for command-line words no option took: unknown flags with their closest known flag, or stray values."""
    flags = [e.split("=", 1)[0] for e in extras if e.startswith("-")]
    if flags:
        names = {s.lstrip("-"): s for s in option_strings if s.startswith("--")}
        hints = [names[m] for f in flags for m in difflib.get_close_matches(f.lstrip("-"), list(names), n=1)]
        hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
        return SfnError(f"unknown flag(s) {', '.join(flags)}{hint}: flags are not abbreviated; see `{command} --help`.")
    return SfnError(f"unexpected value(s) {' '.join(extras)}: every value follows its --flag; see `{command} --help`.")


class SfnErrors:
    """Mixin for an argparse parser (also TRL's TrlParser, sfn_train/recipe_parser.py): words no option takes, and
    argparse's own errors, become one SfnError line."""

    def parse_args(self, args=None, namespace=None):
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            raise unknown_flags_error(extras, self._option_string_actions, self.prog)
        return namespace

    def error(self, message):
        raise SfnError(f"{message}; see `{self.prog} --help`.")


class ArgumentParser(SfnErrors, argparse.ArgumentParser):
    """argparse.ArgumentParser without abbreviations, whose every error is one SfnError line."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
