"""The `sfn` console script: one sub-command per job, each a thin wrapper over a library function.

Every sub-command receives its own argv. A user mistake (`SfnError`, a bad recipe) prints one line and exits 2;
`--debug` anywhere on the command line shows the traceback instead.
"""

from __future__ import annotations

import importlib
import sys

from .errors import SfnError, disk_full_error, is_disk_full

# The one registry of sub-commands: name -> (module, function taking argv and returning an exit code, one-line help).
# Each module is imported only when its command runs (`sfn --help` imports none of them).
COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("sfn_train.train", "cli_main", "fine-tune the named modules (TRL SFT; recipe YAML + flags)"),
    "sweep": ("sfn_train.sweep", "cli_main", "train one recipe over a grid (e.g. learning rates), ranked on validation data"),
    "memory": ("sfn_train.memory", "cli_main", "predict the peak memory per GPU of a recipe's training step, before launching"),
    "select": ("sfn_train.roles", "select_cli_main", "print which tensors a selection trains, without training"),
    "delta": ("sfn_train.gadgets.cli", "delta_main", "per-module weight change between two checkpoints"),
    "merge": ("sfn_train.gadgets.cli", "merge_main", "BASE with the selected modules taken from DONOR"),
    "destroy": ("sfn_train.gadgets.cli", "destroy_main", "zero / reinit / remove / perturb selected modules"),
    "plugin": ("sfn_train.gadgets.cli", "plugin_main", "extract or apply a plugin file of selected tensors"),
    "eval": ("sfn_train.evaluation.cli", "eval_main", "generate and grade checkpoints on tasks"),
    "compare": ("sfn_train.evaluation.cli", "compare_main", "compare eval results against a baseline"),
    "grade": ("sfn_train.evaluation.cli", "grade_main", "grade responses made elsewhere"),
    "lab": ("sfn_train.lab.cli", "cli_main", "the built-in SfN study at small scale, end to end on CPU"),
    "study": ("sfn_train.study", "cli_main", "the SfN workflow on real checkpoints from one YAML (cached stages, --plan)"),
}


def _usage() -> str:
    lines = ["usage: sfn COMMAND [args] [--debug]     sfn --version     sfn COMMAND --help", "", "commands:"]
    lines += [f"  {name:<9} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    return "\n".join(lines)


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("sfn-train")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from .quiet import silence_known_noise

    silence_known_noise()  # DeepSpeed's and bitsandbytes' import-time lines where they say nothing
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if argv[:1] in (["-h"], ["--help"]):
        print(_usage())
        return 0
    if argv[:1] in (["--version"], ["-V"]):
        print(f"sfn {version()}")
        return 0
    if not argv:  # as git and pip: the usage, on stderr, and a failure status
        print(_usage(), file=sys.stderr)
        return 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        from .arguments import did_you_mean

        print(f"sfn: error: unknown command {name!r}{did_you_mean([name], COMMANDS)}; choose one of: "
              f"{', '.join(COMMANDS)} (`sfn --help` says what each does)", file=sys.stderr)
        return 2
    module_name, func_name, _ = COMMANDS[name]
    try:
        func = getattr(importlib.import_module(module_name), func_name)
        return int(func(rest) or 0)
    except SfnError as exc:
        if debug:
            raise
        print(f"sfn {name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sfn {name}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a full disk anywhere (e.g. inside the HF Trainer's checkpoint save) is a user problem
        if debug or not is_disk_full(exc):
            raise
        where = getattr(exc, "filename", None) or "the output folder"
        print(f"sfn {name}: error: {disk_full_error(where, 'check what was written before using it')}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
