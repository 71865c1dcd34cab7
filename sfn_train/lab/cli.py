"""`sfn lab`: the command line of the built-in SfN study (the single-seed lab, or `--seeds` for the lab as a study)."""

from __future__ import annotations

import os
from pathlib import Path

from ..arguments import ArgumentParser
from ..errors import SfnError
from . import pipeline
from .pipeline import ORDER, SIZES, run_lab
from .study import parse_seeds, run_lab_study


def cli_main(argv: list[str]) -> int:
    parser = ArgumentParser(prog="sfn lab", description=pipeline.__doc__.split("\n")[0])
    parser.add_argument("--size", choices=list(SIZES), default="small",
                        help="small (default; the single-seed lab took 13 min here, docs/benchmarks.md), medium, large; "
                             "tiny is for tests")
    parser.add_argument("--root", default="lab", help="folder for everything the lab writes (default ./lab)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--sweep", action="store_true",
                        help="sweep each fine-tune's learning rate on validation data and use the best point "
                             "(instead of the rates the recipes ship); longer")
    parser.add_argument("--scale", help="comma-separated sizes for the o_proj-vs-full scale stage, e.g. small,medium")
    parser.add_argument("--stage", action="append", choices=ORDER,
                        help="run up to these stages only (repeatable); default all")
    parser.add_argument("--seeds", help="the lab as a study over fine-tuning seeds: a count (3 = --seed, --seed+1, "
                        "--seed+2) or a list (42,43,44); data and base are built once (at --seed), each fine-tune "
                        "trains once per seed for 6 epochs, and lab/study/report.md compares the variants over seeds "
                        "and problems (o_proj vs full). `make demo` runs --seeds 3: 11 min 55 s from an empty folder on a 2-core CPU "
                        "(docs/lab.md)")
    parser.add_argument("--jobs", type=int, help="with --seeds: fine-tunes trained at once, one torch thread each, "
                        "their output in <root>/study/logs (default 2 on a CPU-only machine with 2+ cores, else 1)")
    parser.add_argument("--full", action="store_true", help="with --seeds: every fine-tune variant, the merges and "
                        "the destruction grid (recipes/studies/lab_full.yaml) instead of o_proj vs full")
    ns = parser.parse_args(argv)
    if ns.seeds is not None:
        return _seeds_main(ns)
    for flag, value in (("--full", ns.full), ("--jobs", ns.jobs is not None)):
        if value:
            raise SfnError(f"{flag} belongs to the lab as a study over seeds: add --seeds (e.g. --seeds 3).")
    scale = [s.strip() for s in ns.scale.split(",")] if ns.scale else None
    for size in scale or []:
        if size not in SIZES:
            raise SfnError(f"--scale size {size!r} is unknown: use sizes from {', '.join(SIZES)}.")
    if scale is not None and len(scale) < 2:
        raise SfnError("--scale needs at least two sizes to compare, e.g. --scale small,medium.")
    report = run_lab(ns.root, ns.size, ns.seed, ns.stage, ns.sweep, scale)
    if Path(report).is_file():
        print(f"report: {report}")
    else:  # --stage stopped before the report stage: name what was run, not a file that is not there
        print(f"done: stages {', '.join(ns.stage)} in {ns.root}; `sfn lab` (or --stage report) writes the report.")
    return 0


def _seeds_main(ns) -> int:
    for flag, value in (("--sweep", ns.sweep), ("--scale", ns.scale), ("--stage", ns.stage)):
        if value:
            raise SfnError(f"{flag} belongs to the single-seed lab; leave it out with --seeds (the study over seeds "
                           "trains each variant at its recipe's rate).")
    jobs = default_jobs() if ns.jobs is None else ns.jobs
    run_lab_study(ns.root, ns.size, ns.seed, parse_seeds(ns.seeds, ns.seed), ns.full,
                  log=lambda line: print(line, flush=True), jobs=jobs)  # its last line names the report
    return 0


def default_jobs() -> int:
    """Two trainings at once on a CPU-only machine with two or more cores (one torch thread each); one where GPUs
    are (they would share them) or on one core."""
    import torch

    return 1 if torch.cuda.is_available() else min(2, os.cpu_count() or 1)
