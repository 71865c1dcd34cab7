"""The stages of a study and the commands behind them.

Every stage goes through what the single commands use: training is the `sfn train` command line with the variant's
recipe (a subprocess, so that its peak memory is its own; under `torchrun` where the machine has the GPUs the
launch asks for), merges, destruction and delta are `sfn_train.gadgets` calls with the arguments `sfn merge|destroy|
delta` take, and evaluation is `evaluate` with the options `sfn eval` parses. `--plan` prints those same commands.

Folders under `out`: `train/<name>` (the `sfn train` output), `merges/<name>`, `destroy/<name>`, `delta/<name>`,
`evals/<model>` (one `sfn eval` JSON per task), `stages/` (the markers), `study_run.json` and `report.md`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import sys
from pathlib import Path

from ..errors import SfnError
from ..manifest import MANIFEST_FILE
from ..stages import Stage, StageRunner, file_digest
from .schema import BASE, REASONING, Finetune, Merge, Study, seeded

KINDS = ("train", "merge", "destroy", "delta", "eval", "report")
MARKERS = "stages"


class StudyPipeline:
    def __init__(self, study: Study, study_file: str | os.PathLike, out: str | os.PathLike | None = None,
                 log=print, jobs: int = 1):
        self.study = study
        self.jobs = jobs  # training stages run at once on this machine (`sfn study --jobs`)
        self.study_file = Path(study_file)
        self.out = Path(out or study.out)
        self.log = _one_line_at_a_time(log)  # trainings side by side (`jobs`) log from their threads
        from .evalopts import parse_eval_options

        self.eval_ns = parse_eval_options(study.eval, study.tasks)
        self.destroy_eval = {**study.eval, **(study.destroy.eval if study.destroy else {})}
        self.destroy_ns = parse_eval_options(self.destroy_eval, study.tasks, "destroy.eval")
        # Models by the name they have in this study: with `seeds:`, one per seed of each fine-tune and of each
        # model made from one (`oproj@42`), with the seed it was trained at; without, the names of the study file.
        self.seed_of: dict[str, int | None] = {}
        self.finetunes: dict[str, Finetune] = {}
        for f in study.finetune:
            for name, seed in study.per_seed(f.name):
                self.finetunes[name], self.seed_of[name] = f, seed
        self.merges: dict[str, Merge] = {}
        for m in study.merges:
            for name, seed in study.per_seed(m.name):
                donor = seeded(m.donor, seed) if study.depends_on_finetune(m.donor) else m.donor
                self.merges[name], self.seed_of[name] = dataclasses.replace(m, name=name, donor=donor), seed
        self.destroyed: dict[str, tuple[str, str | None]] = {}
        self.destroy_source: dict[str, str] = {}  # destroyed model -> the model it damages
        for base_name, mode, module in study.destroyed():
            for name, seed in study.per_seed(base_name):
                self.destroyed[name], self.seed_of[name] = (mode, module), seed
                self.destroy_source[name] = seeded(study.destroy.model, seed)
        self.model_names = study.seeded_model_names()
        self.baseline = study.baseline or (REASONING if study.reasoning else BASE)

    # -- models ------------------------------------------------------------------------------------------------------
    def model_path(self, name: str) -> str:
        if name == BASE:
            return self.study.base
        if name == REASONING:
            return self.study.reasoning
        if name in self.finetunes:
            return str(self.out / "train" / name)
        if name in self.merges:
            return str(self.out / "merges" / name)
        return str(self.out / "destroy" / name)

    def producer(self, name: str) -> str | None:
        """The stage that makes model `name` (None for the study's inputs A and B)."""
        if name in self.finetunes:
            return f"train:{name}"
        if name in self.merges:
            return f"merge:{name}"
        if name in self.destroyed:
            return f"destroy:{name}"
        return None

    def fingerprint(self, name: str) -> str:
        from ..checkpoint import cached_fingerprint

        return cached_fingerprint(self.model_path(name))

    def _needs(self, *models: str) -> list[str]:
        return [p for p in map(self.producer, models) if p]

    # -- stages ------------------------------------------------------------------------------------------------------
    def stages(self) -> list[Stage]:
        s = self.study
        stages = [self._train_stage(name) for name in self.finetunes]
        stages += [self._merge_stage(name) for name in self.merges]
        stages += [self._destroy_stage(name) for name in self.destroyed]
        if s.delta:
            stages += [self._delta_stage(name) for name in ([REASONING] if s.reasoning else []) + list(self.finetunes)]
        stages += [self._eval_stage(name) for name in self.model_names]
        stages.append(self._report_stage([st.name for st in stages]))
        return stages

    # training
    def _train_args(self, name: str) -> list[str]:
        f, seed = self.finetunes[name], self.seed_of[name]
        return ["--config", f.recipe, "--model_name_or_path", self.study.base, "--output_dir",
                str(self.out / "train" / name), "--overwrite_output_dir", "true",
                *[t for k, v in f.args.items() for t in (f"--{k}", str(v))],
                *(["--seed", str(seed)] if seed is not None else [])]

    def train_launch(self, name: str) -> list[str]:
        """The cluster launch: torchrun (or `accelerate launch` with the fine-tune's accelerate_config) with its
        processes per node and nodes; the recipe carries the engine."""
        f = self.finetunes[name]
        if f.accelerate_config is not None:
            return ["accelerate", "launch", *self._accelerate_flags(name, multinode=f.nnodes > 1),
                    "-m", "sfn_train.cli", "train", *self._train_args(name)]
        launch = ["torchrun"]
        if f.nnodes > 1:  # started on every node; MASTER = the first node's address, RANK = 0..nnodes-1
            launch += ["--nnodes", str(f.nnodes), "--node_rank", "$RANK", "--rdzv_backend", "c10d",
                       "--rdzv_endpoint", "$MASTER:29500"]
        return launch + ["--nproc_per_node", str(f.nproc_per_node), "-m", "sfn_train.cli", "train",
                         *self._train_args(name)]

    def _accelerate_flags(self, name: str, multinode: bool) -> list[str]:
        """Processes and machines on the command line, so they win over the config file's num_processes."""
        f = self.finetunes[name]
        flags = ["--config_file", f.accelerate_config, "--num_processes", str(f.nnodes * f.nproc_per_node),
                 "--num_machines", str(f.nnodes)]
        if multinode:  # started on every node; MASTER = the first node's address, RANK = 0..nnodes-1
            flags += ["--machine_rank", "$RANK", "--main_process_ip", "$MASTER", "--main_process_port", "29500"]
        return flags

    def _local_launch(self, name: str) -> tuple[list[str], str | None, int]:
        """What this machine runs for the finetune, a line saying so when it is not the cluster launch, and the
        number of training processes."""
        import torch

        f = self.finetunes[name]
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        single = [sys.executable, "-m", "sfn_train.cli", "train", *self._train_args(name)]
        if gpus == 0:
            launcher = f"accelerate launch --config_file {f.accelerate_config}" if f.accelerate_config else "torchrun"
            return single, (f"no GPU here: fine-tune {name} trains in one process on the CPU, without {launcher} "
                            f"(the cluster launch, {f.nnodes} node(s) x {f.nproc_per_node}, is in `sfn study "
                            "--plan`)"), 1
        if gpus < f.nproc_per_node:
            raise SfnError(f"fine-tune {name} asks for {f.nproc_per_node} GPUs (nproc_per_node) and this machine has "
                           f"{gpus}: set nproc_per_node: {gpus} in the study (and check the recipe's effective batch) "
                           "or run on a node with enough GPUs.")
        if f.accelerate_config is not None:
            return [sys.executable, "-m", "accelerate.commands.launch", *self._accelerate_flags(name, False),
                    "-m", "sfn_train.cli", "train", *self._train_args(name)], None, f.nproc_per_node
        if f.nproc_per_node == 1:
            return single, None, 1
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(f.nproc_per_node),
                "-m", "sfn_train.cli", "train", *self._train_args(name)], None, f.nproc_per_node

    def _recipe_inputs(self, name: str) -> dict:
        import yaml

        recipe = Path(self.finetunes[name].recipe)
        raw = yaml.safe_load(recipe.read_text(encoding="utf-8")) or {}
        inputs = {"recipe": file_digest(recipe)}
        if self.finetunes[name].args:
            inputs["args"] = dict(self.finetunes[name].args)
        for key in ("dataset_name", "deepspeed", "fsdp_config"):  # files the recipe reads are inputs by content
            value = self.finetunes[name].args.get(key, raw.get(key))
            if isinstance(value, str) and Path(value).is_file():
                inputs[key] = file_digest(value)
            elif isinstance(value, str) and Path(value).is_dir():
                inputs[key] = {str(p.relative_to(value)): file_digest(p) for p in sorted(Path(value).rglob("*"))
                               if p.is_file()}
            elif value is not None:
                inputs[key] = value
        accelerate = self.finetunes[name].accelerate_config
        if accelerate is not None:  # the launcher's config, and the DeepSpeed config it names, by content
            inputs["accelerate_config"] = file_digest(accelerate)
            ds = (yaml.safe_load(Path(accelerate).read_text(encoding="utf-8")) or {}).get("deepspeed_config") or {}
            ds_file = ds.get("deepspeed_config_file") if isinstance(ds, dict) else None
            if isinstance(ds_file, str) and Path(ds_file).is_file():
                inputs["accelerate_deepspeed_config"] = file_digest(ds_file)
        return inputs

    def recipe_notes(self, name: str) -> list[str]:
        import yaml

        f = self.finetunes[name]
        raw = yaml.safe_load(Path(f.recipe).read_text(encoding="utf-8")) or {}
        notes = [engine_of(raw)]
        if f.accelerate_config is not None:
            notes.append(launcher_of(f.accelerate_config))
        named = raw.get("model_name_or_path")
        if named and str(named) != self.study.base:
            notes.append(f"the recipe names model {named}; the study trains from its base {self.study.base}")
        return notes

    def _train_stage(self, name: str) -> Stage:
        folder = self.out / "train" / name

        f = self.finetunes[name]
        multinode = f.nnodes > 1

        def inputs():
            if multinode:
                processes = f"{f.nnodes} x {f.nproc_per_node}"
            else:
                processes = str(self._local_launch(name)[2])
            seed = {"seed": self.seed_of[name]} if self.seed_of[name] is not None else {}
            return {"base": self.fingerprint(BASE), **self._recipe_inputs(name), "processes": processes, **seed}

        def build():
            if multinode:
                return adopt_multinode_run(folder, f, self.study.base, self.fingerprint(BASE), self.train_launch(name))
            command, note, _ = self._local_launch(name)
            if note:
                self.log(f"note: {note}")
            log_file = None
            if self.jobs > 1:  # trainings side by side: each writes its own file
                log_file = self.out / "logs" / f"train_{name}.log"
                log_file.parent.mkdir(parents=True, exist_ok=True)
                self.log(f"{name}: output in {log_file}")
            return run_training(command, folder, name, log_file)

        notes = self.recipe_notes(name)
        if multinode:
            notes.append(f"multi-node: start `runs:` on each of the {f.nnodes} nodes (RANK 0..{f.nnodes - 1}, MASTER = "
                         "node 0's address), then the `--stage` line records the finished run")
        return Stage(f"train:{name}", "train", f"fine-tune {name} from A", [], inputs, build, folder,
                     clear=not multinode, commands=[shell_join(self.train_launch(name))], notes=notes,
                     concurrent=not multinode)

    # gadgets
    def _merge_stage(self, name: str) -> Stage:
        m = self.merges[name]
        folder = self.out / "merges" / name
        args = dict(modules=list(m.modules), layers=list(m.layers), alpha=m.alpha)
        command = ["sfn", "merge", self.study.base, self.model_path(m.donor), "--modules", ",".join(m.modules),
                   "--layers", ",".join(m.layers), "--alpha", str(m.alpha), "--out", str(folder)]

        def build():
            from ..gadgets import merge

            merge(self.study.base, self.model_path(m.donor), folder, **args, command=shlex.join(command))

        return Stage(f"merge:{name}", "merge", f"A + {m.donor}'s {','.join(m.modules)}", self._needs(m.donor),
                     lambda: {"A": self.fingerprint(BASE), "donor": self.fingerprint(m.donor), **args}, build,
                     folder, commands=[shlex.join(command)])

    def _destroy_stage(self, name: str) -> Stage:
        d = self.study.destroy
        mode, module = self.destroyed[name]
        source = self.destroy_source[name]
        folder = self.out / "destroy" / name
        args = dict(modules=module, layers=list(d.layers), mode=mode, seed=d.seed)
        flags = ["--mode", mode, "--layers", ",".join(d.layers), "--seed", str(d.seed)]
        if module is not None:
            flags = ["--modules", module, *flags]
        if mode == "reinit":
            args["std"], flags = d.std, flags + ["--std", str(d.std)]
        elif mode == "noise":
            args["scale"], flags = d.scale, flags + ["--scale", str(d.scale)]
        elif mode == "scale":
            args["factor"], flags = d.factor, flags + ["--factor", str(d.factor)]
        command = ["sfn", "destroy", self.model_path(source), *flags, "--out", str(folder)]

        def build():
            from ..gadgets import destroy

            destroy(self.model_path(source), folder, **args, command=shlex.join(command))

        what = f"{mode} {module or 'whole layers'} of {source} in layers {','.join(d.layers)}"
        return Stage(f"destroy:{name}", "destroy", what, self._needs(source),
                     lambda: {"model": self.fingerprint(source), **args}, build, folder,
                     commands=[shlex.join(command)])

    def _delta_stage(self, name: str) -> Stage:
        folder = self.out / "delta" / name
        command = ["sfn", "delta", self.study.base, self.model_path(name), "--out", str(folder)]

        def build():
            from ..gadgets import delta

            delta(self.study.base, self.model_path(name), folder, quiet=True)

        return Stage(f"delta:{name}", "delta", f"A -> {name}", self._needs(name),
                     lambda: {"A": self.fingerprint(BASE), "B": self.fingerprint(name)}, build, folder,
                     commands=[shlex.join(command)])

    # evaluation
    def eval_options(self, name: str):
        return (self.destroy_ns, self.destroy_eval) if name in self.destroyed else (self.eval_ns, self.study.eval)

    def _eval_stage(self, name: str) -> Stage:
        from .evalopts import eval_flags

        folder = self.out / "evals" / name
        ns, options = self.eval_options(name)
        command = ["sfn", "eval", self.model_path(name), "--label", name,
                   *[x for t in self.study.tasks for x in ("--task", str(t))], "--out", str(folder),
                   *eval_flags(options)]

        def inputs():
            return {"model": self.fingerprint(name), "tasks": self._task_digests(ns),
                    "options": {k: v for k, v in sorted(vars(ns).items())
                                if k not in ("models", "task", "task_file", "out", "label", "no_progress", "overwrite")}}

        def build():
            from ..evaluation import evaluate
            from ..evaluation.cli import evaluate_kwargs

            evaluate([{"path": self.model_path(name), "label": name}], list(self.study.tasks), folder,
                     command=shlex.join(command), **evaluate_kwargs(ns))

        return Stage(f"eval:{name}", "eval", f"model {name} on {', '.join(map(str, self.study.tasks))}",
                     self._needs(name), inputs, build, folder,
                     commands=[shlex.join(command)])

    def _task_digests(self, ns) -> dict:
        """Each task by content (problems, template, answer type), so an edited task file is a new input."""
        import hashlib
        import json

        from ..evaluation.cli import evaluate_kwargs
        from ..evaluation.tasks import load_task

        kwargs = evaluate_kwargs(ns)
        digests = {}
        for t in self.study.tasks:
            task = load_task(str(t), task_files=kwargs["task_files"], answer_type=kwargs["answer_type"],
                             limit=kwargs["limit"])
            blob = json.dumps([task.name, task.answer_type, task.template, task.problems], sort_keys=True, default=str)
            digests[task.name] = "sha256:" + hashlib.sha256(blob.encode()).hexdigest()  # by content, not path
        return digests

    # report
    def _report_stage(self, upstream: list[str]) -> Stage:
        def inputs():
            # run ids, not keys: a stage redone with the same inputs (after a kill) may still give other numbers
            return {"upstream": {n: (self.runner.marker(n) or {}).get("run_id") for n in upstream},
                    "baseline": self.baseline, "study_file": file_digest(self.study_file)}

        def build():
            from .summary import write_report

            write_report(self)

        command = ["sfn", "study", str(self.study_file), "--stage", "report"]
        if self.out != Path(self.study.out):
            command += ["--out", str(self.out)]
        return Stage("report", "report", "report.md from every result", upstream, inputs, build, None,
                     commands=[shlex.join(command)])

    # -- running -----------------------------------------------------------------------------------------------------
    @property
    def runner(self) -> StageRunner:
        if not hasattr(self, "_runner"):
            self._runner = StageRunner(self.stages(), self.out / MARKERS, self.log, prefix="study")
        return self._runner

    def select(self, stage: str | None) -> list[str] | None:
        """`--stage` NAME: one stage (`eval:oproj`) or every stage of a kind (`eval`); None = all."""
        if stage is None:
            return None
        names = self.runner.order
        if stage in names:
            return [stage]
        if stage in KINDS or stage == "gadgets":
            kinds = ("merge", "destroy", "delta") if stage == "gadgets" else (stage,)
            chosen = [n for n in names if self.runner.stages[n].kind in kinds]
            if chosen:
                return chosen
            raise SfnError(f"--stage {stage}: this study has no {stage} stage.")
        raise SfnError(f"--stage {stage!r} is not a stage of this study; the stages are: {', '.join(names)} "
                       f"(or a kind: {', '.join(KINDS)}, gadgets).")

    def run(self, stage: str | None = None) -> dict:
        import torch

        if self.jobs < 1:
            raise SfnError(f"--jobs {self.jobs}: the number of trainings at once must be at least 1.")
        if self.jobs > 1 and torch.cuda.is_available():
            raise SfnError(f"--jobs {self.jobs} runs trainings side by side, which would share this machine's GPUs: "
                           "use --jobs 1 here (sfn study or sfn lab), or give each training stage its own node with "
                           "`sfn study --stage` (see --plan).")
        self.out.mkdir(parents=True, exist_ok=True)
        return self.runner.run(self.select(stage), check_upstream=stage is not None, jobs=self.jobs)


def _one_line_at_a_time(log):
    import threading

    lock = threading.Lock()

    def locked(line: str) -> None:
        with lock:
            log(line)

    return locked


def shell_join(tokens: list[str]) -> str:
    """A command line to paste into a shell: quoted as shlex does, except `$VAR` tokens the shell must expand."""
    return " ".join(t if re.fullmatch(r"\$[A-Z_]+(:\d+)?", t) else shlex.quote(t) for t in tokens)


def engine_of(raw: dict) -> str:
    """The distributed engine a recipe asks for, from its `deepspeed` / `fsdp` keys (what torchrun will run)."""
    import json

    ds = raw.get("deepspeed")
    if ds:
        stage = "?"
        try:
            stage = json.loads(Path(ds).read_text()).get("zero_optimization", {}).get("stage", 0)
        except (OSError, ValueError, TypeError):
            pass
        offload = " with offload" if "offload" in str(ds) else ""
        return f"engine: DeepSpeed ZeRO-{stage}{offload} (recipe key deepspeed: {ds})"
    if raw.get("fsdp"):
        config = raw.get("fsdp_config")
        version = config.get("fsdp_version", config.get("version", 1)) if isinstance(config, dict) else None
        return f"engine: FSDP{version or ''} (recipe keys fsdp: {raw['fsdp']}, fsdp_config: {config})"
    return "engine: DDP (the recipe names no deepspeed or fsdp config)"


def launcher_of(accelerate_config: str) -> str:
    """What an accelerate config file launches (its distributed_type and DeepSpeed stage), for the plan's notes."""
    import yaml

    try:
        config = yaml.safe_load(Path(accelerate_config).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        config = {}
    kind = config.get("distributed_type", "?") if isinstance(config, dict) else "?"
    ds = config.get("deepspeed_config") if isinstance(config, dict) else None
    detail = ""
    if isinstance(ds, dict) and ds.get("deepspeed_config_file"):
        detail = f", DeepSpeed config {ds['deepspeed_config_file']}"
    elif isinstance(ds, dict) and "zero_stage" in ds:
        detail = f", ZeRO-{ds['zero_stage']}"
    return (f"launcher: accelerate launch --config_file {accelerate_config} (distributed_type {kind}{detail}); "
            "--num_processes/--num_machines from the study win over the file's")


def run_training(command: list[str], folder: Path, name: str, log_file: Path | None = None) -> dict:
    """Run one training command (its output to `log_file` when given, else to ours); return its wall time and peak
    memory (the largest process's RSS, and the GPU peak the run recorded), or fail in one line if it did not finish."""
    from ..subprocess_run import complete_manifest, run_command, shown

    result = run_command(command, log_file=log_file)
    if result.exit_code != 0:
        where = "above" if log_file is None else f"in {log_file}"
        raise SfnError(f"training fine-tune {name} failed (exit {result.exit_code}); its output is {where}. Fix it "
                       "and rerun the study: finished stages are kept.")
    if complete_manifest(folder) is None:
        raise SfnError(f"training fine-tune {name} exited without a complete manifest in {folder}; rerun the study.")
    return {"wall_s": result.wall_s, "cpu_s": result.cpu_s, "peak_rss_mb": result.peak_rss_mb,
            "command": shown(command)}


def adopt_multinode_run(folder: Path, finetune, base: str, base_fingerprint: str, launch: list[str]) -> dict:
    """Record a multi-node training run launched outside the study (torchrun on each node), after checking that
    `folder` holds a finished run of this recipe, from this base, with the planned number of processes, made after
    the recipe was last changed; otherwise say in one line what to launch."""
    import json
    from datetime import datetime

    how = (f"fine-tune {finetune.name} trains on {finetune.nnodes} nodes, which one `sfn study` process cannot start: "
           f"run `{shell_join(launch)}` on each node, then this stage again to record the run")
    manifest_file = folder / MANIFEST_FILE
    if not manifest_file.is_file():
        raise SfnError(f"{how} ({folder} holds no run yet).")
    manifest = json.loads(manifest_file.read_text())
    command = manifest.get("command") or ""
    command = shlex.split(command) if isinstance(command, str) else list(command)

    def flag(name):
        return command[command.index(name) + 1] if name in command[:-1] else None

    problems = []
    if manifest.get("status") != "complete":
        problems.append(f"its manifest says status {manifest.get('status')!r}")
    if flag("--config") != finetune.recipe or flag("--model_name_or_path") != base:
        problems.append(f"it was launched with --config {flag('--config')} --model_name_or_path "
                        f"{flag('--model_name_or_path')}")
    if (manifest.get("base") or {}).get("fingerprint") not in (None, base_fingerprint):
        problems.append("it was trained from another base (fingerprint)")
    if manifest.get("world_size") != finetune.nnodes * finetune.nproc_per_node:
        planned = finetune.nnodes * finetune.nproc_per_node
        problems.append(f"it ran {manifest.get('world_size')} processes, not {planned}")
    written = manifest.get("written_at")
    if written and datetime.fromisoformat(written).timestamp() < Path(finetune.recipe).stat().st_mtime:
        problems.append("the recipe changed after it finished")
    if problems:
        raise SfnError(f"{how} ({folder} holds a run that does not match: {'; '.join(problems)}).")
    return {"adopted": True, "command": launch}
