"""What a training run does with the output folder it is given: start, resume, start over or replace.

The rule (the same command, rerun, does the sensible thing):

- an empty or missing folder: a new run;
- `resume_from_checkpoint: true` or a folder: resume from the newest complete `checkpoint-N` (sfn_train/resume.py);
- a folder left by an interrupted or crashed run of sfn train (its manifest says `running`): resume from its newest
  complete checkpoint, or, when it has none, start over in it -- one logged line says which;
- a folder holding a finished run (manifest `complete`) or anything else: refused, unless `overwrite_output_dir: true`,
  which replaces the folder as a whole.

Starting over and replacing never mix two runs in one folder: when the new run writes its first file, everything the
folder held is moved into `output_dir/.replaced-run/`, and that is deleted only once the new run's manifest says
`complete`. A replacing run that is itself interrupted leaves the old run there, whole; rerunning it moves the
half-written new run out instead (the kept run is the older, complete one).

A resume refuses a checkpoint written under another recipe: the manifest of the run that wrote it must match the
current recipe in every key but the step budget (`max_steps`, `num_train_epochs`) and the keys that only say where and
how to start (`RESTART_KEYS`); the message names the keys that differ.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .errors import SfnError
from .manifest import MANIFEST_FILE

logger = logging.getLogger("sfn_train")

REPLACED = ".replaced-run"  # the previous contents of output_dir while the run replacing them is not complete
BUDGET_KEYS = {"max_steps", "num_train_epochs"}
# Keys that say where and how this process starts, not what it trains; activation checkpointing's kwargs are filled
# in by the run itself (train.configure_activation_checkpointing), after this check.
RESTART_KEYS = {"resume_from_checkpoint", "overwrite_output_dir", "output_dir", "gradient_checkpointing_kwargs",
                "activation_checkpointing_kwargs"}


@dataclass
class OutputPlan:
    """The decision: `resume` (a checkpoint folder or None) and `replace` (move the folder's contents aside first)."""

    output_dir: Path
    resume: str | None = None
    replace: bool = False


def read_manifest(folder: Path) -> dict | None:
    try:
        data = json.loads((Path(folder) / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _contents(out: Path) -> list[Path]:
    return [p for p in out.iterdir() if p.name != REPLACED] if out.is_dir() else []


def plan_output_dir(training_args, sfn_args) -> OutputPlan:
    """Decide, before anything is loaded or written, how this run uses `output_dir` (see the module docstring)."""
    from .resume import latest_complete_checkpoint
    from .startup import resume_target

    out = Path(training_args.output_dir)
    explicit = resume_target(training_args)
    if explicit is not None:
        return OutputPlan(out, resume=explicit)
    if not _contents(out):
        return OutputPlan(out)
    if sfn_args.overwrite_output_dir:
        logger.info("output_dir %s: overwrite_output_dir is set: the new run replaces it (the old contents are kept "
                    "in %s until the new run is complete).", out, out / REPLACED)
        return OutputPlan(out, replace=True)
    manifest = read_manifest(out)
    status = manifest.get("status") if manifest and manifest.get("kind") == "train" else None
    if status == "running":  # interrupted (Ctrl-C, a kill, a crash): the same command carries on
        folder, skipped = latest_complete_checkpoint(out, training_args.world_size)
        for name, found in skipped.items():
            logger.warning("resume: skipping incomplete %s (%s).", name, "; ".join(found))
        if folder is not None:
            logger.info("output_dir %s holds an interrupted run: resuming from %s (overwrite_output_dir: true "
                        "starts over instead).", out, folder.name)
            return OutputPlan(out, resume=str(folder))
        logger.info("output_dir %s holds an interrupted run with no complete checkpoint: starting over in it.", out)
        return OutputPlan(out, replace=True)
    what = ("a finished run" if status == "complete" else
            f"files of something other than an interrupted sfn train run ({MANIFEST_FILE} {'says ' + repr(status) if status else 'is missing'})")
    raise SfnError(f"output_dir {out} holds {what}: choose another output_dir, or set `overwrite_output_dir: true` "
                   "to replace it.")


def check_resume_recipe(checkpoint: str, recipe: dict) -> None:
    """Refuse to resume `checkpoint` when the run that wrote it had another recipe (its folder's manifest)."""
    run_dir = Path(checkpoint).parent
    manifest = read_manifest(run_dir)
    if manifest is None or manifest.get("kind") != "train" or not isinstance(manifest.get("recipe"), dict):
        logger.info("resume: %s has no sfn train manifest beside it; its recipe cannot be compared with this one.",
                    Path(checkpoint).name)
        return
    differ = sorted(_differing_keys(manifest["recipe"], recipe) - BUDGET_KEYS - RESTART_KEYS)
    if differ:
        shown = ", ".join(differ[:8]) + (f" (and {len(differ) - 8} more)" if len(differ) > 8 else "")
        raise SfnError(f"cannot resume from {checkpoint}: it was written under another recipe (differs in {shown}; "
                       "only max_steps / num_train_epochs may change on resume): rerun with that recipe, or set "
                       "`overwrite_output_dir: true` to start over.")


def _differing_keys(old: dict, new: dict) -> set[str]:
    """The recipe keys whose values differ, over the recipe's sections (script, training, model, sfn)."""
    found = set()
    for section in set(old) | set(new):
        a, b = old.get(section) or {}, new.get(section) or {}
        # Compared as JSON, as the manifest stores them (tuples become lists, enums their values).
        a, b = json.loads(json.dumps(a, default=str)), json.loads(json.dumps(b, default=str))
        found |= {k for k in set(a) | set(b) if a.get(k) != b.get(k)}
    return found


def take_output_dir(plan: OutputPlan) -> None:
    """Main process, just before the run writes its first file: move the old contents aside when replacing."""
    out = plan.output_dir
    out.mkdir(parents=True, exist_ok=True)
    if not plan.replace:
        return
    aside = out / REPLACED
    if aside.exists():  # an earlier replacement was interrupted: the kept run is the complete one; drop the partial
        for item in _contents(out):
            shutil.rmtree(item) if item.is_dir() and not item.is_symlink() else item.unlink()
        return
    tmp = out / (REPLACED + ".partial")  # filled first and renamed last: a kill half-way is finished by the rerun
    tmp.mkdir(exist_ok=True)
    for item in _contents(out):
        if item != tmp:
            os.replace(item, tmp / item.name)
    os.replace(tmp, aside)


def release_replaced(plan: OutputPlan) -> None:
    """Main process, once the new run's manifest says complete: the run it replaced is no longer needed."""
    aside = plan.output_dir / REPLACED
    if aside.exists():
        shutil.rmtree(aside)
        logger.info("output_dir %s: the replaced run is removed.", plan.output_dir)
