"""`sfn lab --seeds`: the lab as a study over training seeds.

The lab's data and its base A are built once (`Lab`'s data and base stages, at the lab's `--seed`); then a shipped
study -- `recipes/studies/lab.yaml` (o_proj against full fine-tuning) or `lab_full.yaml` with `--full`
(every fine-tune variant, the merges and the destruction grid) -- runs over them through `sfn study`: one training
subprocess per fine-tune and seed, stages cached per seed (adding a seed trains only that seed), and the study's
report with the seed-aware comparison. Only the fine-tuning seeds vary.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from ..errors import SfnError
from .pipeline import REPO_RECIPES, SIZES, TRAIN_ENV, Lab

STUDIES = REPO_RECIPES.parent / "studies"
STUDY_FILE = "lab_study.yaml"


def parse_seeds(text: str, first: int) -> list[int]:
    """`--seeds 3` -> [first, first+1, first+2]; `--seeds 42,43,44` -> those seeds."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SfnError(f"--seeds {text!r}: give a count (3) or a comma-separated list of integers "
                       "(42,43,44).") from None
    if len(values) == 1 and "," not in text:
        if values[0] < 1:
            raise SfnError(f"--seeds {text}: the number of seeds must be at least 1.")
        return list(range(first, first + values[0]))
    if len(set(values)) != len(values) or not values:
        raise SfnError(f"--seeds {text!r}: list each seed once.")
    return values


def write_lab_study(lab: Lab, seeds: list[int], full: bool) -> Path:
    """The shipped study with its `lab/` paths under the lab's root, the seeds, the size's epochs, evaluation limit
    and middle layers; written to `<root>/lab_study.yaml` (what `sfn study` then runs, and a user can rerun)."""
    import yaml

    shipped = STUDIES / ("lab_full.yaml" if full else "lab.yaml")
    raw = yaml.safe_load(shipped.read_text(encoding="utf-8"))
    root = lab.root
    raw.update(base=str(root / "base"), out=str(root / "study"), seeds=list(seeds))
    for f in raw["finetune"]:
        f["recipe"] = str(REPO_RECIPES.parents[1] / f["recipe"])
        f["args"] = {**f.get("args", {}), "dataset_name": str(root / "data" / "sft_reasoning.jsonl")}
        if lab.size.study_epochs is not None:
            f["args"]["num_train_epochs"] = lab.size.study_epochs
    if raw.get("destroy"):
        raw["destroy"]["layers"] = lab.middle_layers()
    if lab.size.eval_limit:
        raw["eval"]["limit"] = lab.size.eval_limit
    path = root / STUDY_FILE
    path.write_text(f"# written by sfn lab from {shipped.name}\n" + yaml.safe_dump(raw, sort_keys=False))
    return path


def run_lab_study(root="lab", size: str = "small", seed: int = 42, seeds: list[int] | None = None,
                  full: bool = False, log=print, jobs: int = 1) -> Path:
    """Python API of `sfn lab --seeds`: data and base once, then the lab study over `seeds`; returns the report."""
    from ..study import run_study

    if size not in SIZES:
        raise SfnError(f"lab size {size!r} is unknown: use one of {', '.join(SIZES)}.")
    if jobs < 1:
        raise SfnError(f"--jobs {jobs}: the number of trainings at once must be at least 1.")
    lab = Lab(root, size, seed, log=log)
    lab.run(["base"])
    study = write_lab_study(lab, seeds or [seed], full)
    with _environment(TRAIN_ENV):  # the training subprocesses: one thread each, as the lab's own runs
        result = run_study(study, log=log, jobs=jobs)
    return Path(result["out"]) / "report.md"


@contextlib.contextmanager
def _environment(values: dict):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
