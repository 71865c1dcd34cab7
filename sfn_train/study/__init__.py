"""`sfn study`: the whole SfN workflow on a pair of real checkpoints (or one base model), from one YAML file.

    sfn study recipes/studies/table1_1.5b.yaml            # every stage, each skipped when already done
    sfn study recipes/studies/table1_1.5b.yaml --plan     # the commands a cluster user launches, stage by stage
    sfn study recipes/studies/table1_1.5b.yaml --stage train:oproj    # one stage (a Slurm array task)
    sfn study recipes/studies/table1_1.5b.yaml --stage eval           # every stage of one kind

Stages: `train:<finetune>` (the recipe through `sfn train`), `merge:<name>`, `destroy:<mode_module>`,
`delta:<model>`, `eval:<model>` (every task), `report` (`report.md` in the output folder). Each is cached by the
hash of its inputs (checkpoint fingerprints, recipe and task contents, settings) and resumable: a finished stage is
never redone, one killed half-way is redone (`sfn_train.stages`).
"""

from __future__ import annotations

import argparse
import sys

from ..arguments import ArgumentParser
from ..errors import SfnError
from .schema import Study, load_study, schema_help

__all__ = ["Study", "load_study", "run_study", "plan_text", "cli_main"]


def run_study(study_file, *, out=None, stage: str | None = None, log=print, jobs: int = 1) -> dict:
    """Python API of `sfn study`: run the study (or one stage), with up to `jobs` trainings at once; return
    {"ran": [...], "cached": [...], "out": path}."""
    from .pipeline import StudyPipeline

    pipe = StudyPipeline(load_study(study_file), study_file, out, log=log, jobs=jobs)
    result = pipe.run(stage)
    if (pipe.out / "report.md").exists() and "report" in result["ran"] + result["cached"]:
        log(f"report: {pipe.out / 'report.md'}")
    return {**result, "out": pipe.out}


def plan_text(study_file, out=None, gpu_memory_gib: float | None = 80.0, memory: bool = True) -> str:
    """Stage by stage, in waves of independent stages: what runs, on what hardware, with which command; each
    training stage with its predicted peak memory per GPU (`sfn memory`), flagged when it exceeds `gpu_memory_gib`."""
    import shlex

    from ..memory.plan import plan_line

    from .pipeline import StudyPipeline

    pipe = StudyPipeline(load_study(study_file), study_file, out, log=lambda _: None)
    stages = pipe.stages()
    cache: dict = {}
    wave: dict[str, int] = {}
    for s in stages:  # stages come in dependency order
        wave[s.name] = 1 + max((wave[n] for n in s.needs), default=0)
    study = pipe.study
    own = ["sfn", "study", str(study_file)] + (["--out", str(pipe.out)] if out is not None else [])
    lines = [f"# Study {study_file} -> {pipe.out}: {len(stages)} stages in {max(wave.values())} waves",
             f"# A = {study.base}" + (f", B = {study.reasoning}" if study.reasoning else ""),
             "# Each stage runs alone with the `sfn study ... --stage NAME` line below (e.g. one Slurm array task per",
             "# stage of a wave, the next wave after it); it is skipped when already done, and fails in one line",
             "# naming the missing stage when its inputs are not done. `runs:` is the command it executes.",
             "# Run every stage in order on one machine: " + shlex.join(own), ""]
    for number in range(1, max(wave.values()) + 1):
        members = [s for s in stages if wave[s.name] == number]
        lines.append(f"## wave {number}: {len(members)} stage(s), independent of each other")
        for s in members:
            lines.append(f"[{s.name}]  {_hardware(pipe, s)}  -- {s.what}"
                         + (f"; after {', '.join(s.needs)}" if s.needs and s.kind != "report" else ""))
            lines.append("    " + shlex.join([*own, "--stage", s.name]))
            if s.kind != "report":
                lines += [f"    runs: {c}" for c in s.commands]
            if s.kind == "train" and memory:
                name = s.name.split(":", 1)[1]  # the model's name in the study (`oproj@42` with seeds)
                f = pipe.finetunes[name]
                lines.append("    " + plan_line(pipe._train_args(name), f.nproc_per_node, f.nnodes, gpu_memory_gib,
                                                  cache))  # seeds of one fine-tune share one prediction
            lines += [f"    {n}" for n in s.notes]
        lines.append("")
    return "\n".join(lines)


def _hardware(pipe, stage) -> str:
    if stage.kind == "train":
        f = pipe.finetunes[stage.name.split(":", 1)[1]]
        return f"GPU: {f.nnodes} node(s) x {f.nproc_per_node} GPUs"
    if stage.kind == "eval":
        ns, _ = pipe.eval_options(stage.name.split(":", 1)[1])
        if ns.backend == "vllm":
            return f"GPU: {ns.tensor_parallel_size} GPU(s) (vLLM tensor-parallel size)"
        return "GPU: 1 GPU (hf backend; runs on CPU too)" if not ns.device.startswith("cpu") else "CPU"
    return "CPU only"


def cli_main(argv: list[str]) -> int:
    parser = ArgumentParser(
        prog="sfn study", description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog="The study file's keys:\n\n" + schema_help())
    parser.add_argument("study", help="study YAML (recipes/studies/*.yaml are ready ones)")
    parser.add_argument("--plan", action="store_true", help="print the stages and their commands; run nothing")
    parser.add_argument("--stage", help="run one stage (e.g. train:oproj, eval:m1_oproj, report) or every stage of "
                        "a kind (train, merge, destroy, delta, gadgets, eval, report)")
    parser.add_argument("--out", help="output folder (default: the study's `out`)")
    parser.add_argument("--jobs", type=int, default=1, help="training stages run at once on this machine, each in "
                        "its own process with its output in <out>/logs (default 1; CPU only: GPU trainings would "
                        "share the GPUs). The lab uses 2 (one torch thread each on 2 cores)")
    parser.add_argument("--gpu-memory", type=float, default=80.0, help="--plan: memory of one GPU in GiB, to flag a "
                        "training stage whose predicted peak does not fit (default 80)")
    parser.add_argument("--no-memory", action="store_true", help="--plan: skip the memory predictions (each costs "
                        "a simulated step: seconds, ~20-40 s for a 32B model)")
    a = parser.parse_args(argv)
    if a.plan:
        if a.stage:
            raise SfnError("--plan prints every stage; leave out --stage.")
        print(plan_text(a.study, a.out, gpu_memory_gib=a.gpu_memory, memory=not a.no_memory))
        return 0
    run_study(a.study, out=a.out, stage=a.stage, log=lambda line: print(line, flush=True), jobs=a.jobs)
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(sys.argv[1:]))
