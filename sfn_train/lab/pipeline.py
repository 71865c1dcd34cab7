"""The lab's stages, each cached by its inputs: data -> base -> finetune -> gadgets -> eval [-> scale] -> report.

Every stage goes through the public paths a real study uses: `sfn train` recipes (`recipes/lab/*.yaml`, run as
subprocesses so that each run's peak memory is its own), `sfn sweep`, `sfn_train.gadgets` and `sfn_train.evaluation`.
Stages run through the study's `StageRunner` (`sfn_train/stages.py`; markers in `<root>/stages`): each is keyed by
the hash of its inputs (settings + upstream keys); a later run skips a stage whose key matches and redoes it (and
everything downstream) otherwise. A sweep stage resumes instead: its finished points are kept when the run is
interrupted. `sfn lab --seeds` runs the lab's data and base, then a shipped study over them (`sfn_train/lab/study.py`).

Learning rates: by default each fine-tune trains at the rate its recipe ships (chosen by an earlier `sfn lab --sweep`,
as the recipe's comment says); with `--sweep` each variant runs its own `sfn sweep` over `LabSize.sweep_rates`, ranked
on the validation rows its recipe holds out (`validation_fraction`), and the variant's model is its best point.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import SfnError
from ..evaluation.tasks import packaged_task_file
from ..manifest import MANIFEST_FILE
from ..subprocess_run import run_command
from .problems import REASON_STEPS, all_single_steps, fact_rows, generate, sft_rows, shipped_tasks, write_jsonl

REPO_RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "lab"
RUN_RECORD = "lab_run.json"
LAB_TASKS = ("lab_reason", "lab_onestep")
ORDER = ["data", "base", "finetune", "gadgets", "eval", "scale", "report"]

# The paper's fine-tune variants (Table 2) plus the user's pure o_proj: recipe name -> what it tunes
VARIANTS = {
    "full": "all (F4 = B)",
    "oproj": "o_proj (C)",
    "f1": "embed + lm_head + norms (F1)",
    "f2": "F1 + o_proj (F2)",
    "f3": "F1 + q,k,v,o_proj (F3)",
    "oproj_4bit": "o_proj over a 4-bit frozen base",
}
# The paper's merges (Table 1): A with B's modules
MERGES = {"m1_oproj": "o_proj", "m2_qkv": "q_proj,k_proj,v_proj", "m3_mlp": "mlp"}
DESTROY_ROLES = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "gate_proj", "down_proj"]
SCALE_VARIANTS = ("full", "oproj")


@dataclass(frozen=True)
class LabSize:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    pretrain_problems: int  # multi-step problems answered directly, in pre-training
    pretrain_onestep_repeats: int  # each one-step problem not held out (160 of 260), written out, this many times
    pretrain_facts: int  # "Compute a+b mod 10." -> "a+b=c." rows (every one of the 260 facts when >= 260)
    pretrain_epochs: float
    pretrain_lr: float
    sft_problems: int  # reasoning traces for the fine-tunes (their recipes hold out validation_fraction of them)
    finetune_epochs: float
    eval_limit: int | None  # problems of each task evaluated (None = all)
    sweep_rates: tuple[float, ...]  # the learning rates `--sweep` tries for every variant
    study_epochs: float | None = None  # `--seeds`: epochs per fine-tune (None: the shipped study's, 6)


SIZES = {
    "tiny": LabSize(64, 2, 4, 2, 300, 1, 300, 1, 1e-3, 200, 1, 40, (1e-3, 1e-2), 1),  # tests: runs, proves nothing
    "small": LabSize(128, 4, 4, 2, 1500, 6, 9000, 3, 1e-3, 2400, 2, None, (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)),
    # Larger models on the same data as small: the scale stage then varies the parameter count alone
    "medium": LabSize(192, 6, 6, 2, 1500, 6, 9000, 3, 1e-3, 2400, 2, None, (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)),
    "large": LabSize(256, 8, 8, 2, 1500, 6, 9000, 3, 1e-3, 2400, 2, None, (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)),
}


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def recipe_learning_rate(text: str) -> float:
    import yaml

    return float(yaml.safe_load(text)["learning_rate"])


def recipe_rate_note(text: str) -> str | None:
    """The comment on the recipe's `learning_rate:` line: which sweep chose the rate the recipe ships."""
    line = next((ln for ln in text.splitlines() if ln.startswith("learning_rate:")), "")
    return line.partition("#")[2].strip() or None


class Lab:
    def __init__(self, root: str | os.PathLike, size: str = "small", seed: int = 42, recipes: Path = REPO_RECIPES,
                 sweep: bool = False, variants: tuple[str, ...] = tuple(VARIANTS), log=print):
        if size not in SIZES:
            raise SfnError(f"lab size {size!r} is unknown: use one of {', '.join(SIZES)}.")
        self.root = Path(root)
        self.size_name, self.size, self.seed = size, SIZES[size], seed
        self.recipes = Path(recipes)
        self.sweep, self.variants = sweep, tuple(variants)
        self.log = log
        self.hashes: dict[str, str] = {}
        self.ran: list[str] = []  # the stages this run built (not cached)
        self.timings: dict[str, float] = {}
        self.trained: dict[str, dict] = {}  # variant -> {folder, learning_rate, chosen_by, ...}
        self.scale: dict | None = None

    # -- caching ---------------------------------------------------------------------------------------------------
    def stage(self, name: str, folder: Path, inputs: dict, build, resumable: bool = False) -> Path:
        """One stage through the study's `StageRunner` (markers in `<root>/stages`): skipped when its inputs (settings
        and the upstream stages' keys) are unchanged, else its folder cleared and rebuilt. A `resumable` stage (a
        sweep) keeps its folder after a kill, so its finished points are kept; inputs that changed clear it."""
        from ..stages import Stage, StageRunner

        def run_build():
            folder.mkdir(parents=True, exist_ok=True)
            build(folder)

        runner = StageRunner([Stage(name, name.split(":")[0], str(folder), [], lambda: inputs, run_build, folder,
                                    clear=not resumable)], self.root / "stages", log=self.log, prefix="lab")
        old = runner.marker(name)
        if resumable and old is not None and old.get("key") != runner.key(name) and folder.exists():
            shutil.rmtree(folder)  # a finished sweep of other inputs: nothing of it to resume
        self.hashes[name] = runner.key(name)[:16]
        result = runner.run()
        self.ran += result["ran"]
        self.timings[name] = runner.marker(name)["seconds"]
        return folder

    # -- stages ----------------------------------------------------------------------------------------------------
    def data(self) -> Path:
        s = self.size

        def build(folder: Path):
            tasks = shipped_tasks()
            held_out = {row["problem"] for rows in tasks.values() for row in rows}
            pool = [p for p in generate(s.pretrain_problems + s.sft_problems + len(held_out), REASON_STEPS,
                                        seed=self.seed) if p.text not in held_out]
            rng = random.Random(self.seed)
            rng.shuffle(pool)
            sft = pool[: s.sft_problems]
            direct = pool[s.sft_problems: s.sft_problems + s.pretrain_problems]
            onestep = [p for p in all_single_steps() if p.text not in held_out] * s.pretrain_onestep_repeats
            rows = sft_rows(direct + onestep, "pretrain") + fact_rows(s.pretrain_facts, self.seed + 1)
            rng.shuffle(rows)
            write_jsonl(folder / "pretrain.jsonl", rows)
            write_jsonl(folder / "sft_reasoning.jsonl", sft_rows(sft, "reasoning"))
            for name in LAB_TASKS:
                shutil.copy(packaged_task_file(name), folder / f"{name}.jsonl")

        return self.stage("data", self.root / "data", {"seed": self.seed, "size": asdict(s),
                                                        "tasks": _hash(shipped_tasks())}, build)

    def base(self) -> Path:
        """A = a small Qwen2 model pre-trained from scratch (all parameters, loss on the answers)."""
        s = self.size

        def build(folder: Path):
            from ..tiny import build_tokenizer, tiny_config

            import torch
            from transformers import AutoModelForCausalLM

            tokenizer = build_tokenizer()
            config = tiny_config("qwen2", vocab_size=len(tokenizer), hidden=s.hidden, layers=s.layers,
                                 num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                                 intermediate_size=s.hidden * 3, tie_word_embeddings=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            torch.manual_seed(self.seed)
            init = self.root / "init"
            shutil.rmtree(init, ignore_errors=True)
            AutoModelForCausalLM.from_config(config).save_pretrained(init)
            tokenizer.save_pretrained(init)
            self.train("base", init, self.root / "data" / "pretrain.jsonl", folder,
                       num_train_epochs=s.pretrain_epochs, learning_rate=s.pretrain_lr)
            shutil.rmtree(init)

        return self.stage("base", self.root / "base", {"up": self.hashes["data"], "size": asdict(s),
                                                        "recipe": self.recipe_settings("base")}, build)

    def finetunes(self) -> dict[str, dict]:
        for variant in self.variants:
            text = self._recipe_text(variant)
            shipped, note = recipe_learning_rate(text), recipe_rate_note(text)
            inputs = self.finetune_inputs(variant)
            if self.sweep:
                folder = self.stage(f"sweep:{variant}", self.root / "sweeps" / variant, inputs,
                                    lambda out, v=variant: self.run_sweep(v, out), resumable=True)
                summary = json.loads((folder / "sweep.json").read_text())
                best = next(p for p in summary["points"] if p["best"])
                self.hashes[f"finetune:{variant}"] = self.hashes[f"sweep:{variant}"]
                self.trained[variant] = {
                    "folder": best["folder"], "learning_rate": best["learning_rate"], "chosen_by": "sweep",
                    "sweep": str(folder / "sweep.json"), "recipe_rate": shipped, "recipe_note": note,
                    "rates": list(self.size.sweep_rates),
                    "validation": {k: best[k] for k in ("eval_loss", "eval_mean_token_accuracy")}}
            else:
                folder = self.stage(f"finetune:{variant}", self.root / "runs" / variant, inputs,
                                    lambda out, v=variant: self.train(v, self.root / "base",
                                                                      self.root / "data" / "sft_reasoning.jsonl", out,
                                                                      num_train_epochs=self.size.finetune_epochs))
                metrics = json.loads((folder / MANIFEST_FILE).read_text())["metrics"]
                self.trained[variant] = {
                    "folder": str(folder), "learning_rate": shipped, "chosen_by": "recipe", "sweep": None,
                    "recipe_rate": shipped, "recipe_note": note,
                    "validation": {k: metrics.get(k) for k in ("eval_loss", "eval_mean_token_accuracy")}}
        return self.trained

    def finetune_inputs(self, variant: str) -> dict:
        """What a fine-tune stage's cache key covers: the recipe's settings as parsed (so an edited comment keeps an
        hour of sweeps valid) without the learning rate when the stage sweeps it, the upstream stages and the epochs."""
        ignored = ("learning_rate",) if self.sweep else ()
        inputs = {"up": [self.hashes["data"], self.hashes["base"]], "recipe": self.recipe_settings(variant, ignored),
                  "epochs": self.size.finetune_epochs}
        return {**inputs, "rates": self.size.sweep_rates} if self.sweep else inputs

    def run_sweep(self, variant: str, out: Path) -> None:
        from ..sweep import run_sweep

        rates = ",".join(f"{r:g}" for r in self.size.sweep_rates)
        flags = {"model_name_or_path": self.root / "base", "dataset_name": self.root / "data" / "sft_reasoning.jsonl",
                 "seed": self.seed, "num_train_epochs": self.size.finetune_epochs}
        run_sweep(str(self.recipes / f"{variant}.yaml"), [f"learning_rate={rates}"], out,
                  [t for k, v in flags.items() for t in (f"--{k}", str(v))], env=TRAIN_ENV,
                  log=lambda line: self.log(f"[lab] {variant}: {line}"))

    def gadgets(self) -> Path:
        from .. import gadgets

        layers = self.middle_layers()

        def build(folder: Path):
            base, full = self.root / "base", Path(self.trained["full"]["folder"])
            gadgets.delta(base, full, folder / "delta", quiet=True)
            for name, modules in MERGES.items():
                gadgets.merge(base, full, folder / "merges" / name, modules=modules)
            for mode in ("zero", "reinit"):
                for role in DESTROY_ROLES:
                    gadgets.destroy(full, folder / "destroy" / f"{mode}_{role}", modules=role, layers=layers,
                                    mode=mode, seed=self.seed)
            gadgets.destroy(full, folder / "destroy" / "remove", layers=layers, mode="remove")

        return self.stage("gadgets", self.root / "gadgets",
                          {"up": [self.hashes["base"], self.hashes["finetune:full"]], "layers": layers}, build)

    def middle_layers(self) -> str:
        """The paper destroyed blocks 5-30 of 64 (early and late layers always broke the model): the middle here."""
        n = self.size.layers
        first, last = max(1, n // 4), min(n - 2, n - 1 - n // 4)
        return f"{first}-{max(first, last)}"

    def models(self) -> dict[str, Path]:
        models = {"A": self.root / "base", **{v: Path(t["folder"]) for v, t in self.trained.items()}}
        g = self.root / "gadgets"
        if (g / "merges").is_dir():
            models.update({m: g / "merges" / m for m in MERGES})
            models.update({p.name: p for p in sorted((g / "destroy").iterdir())})
        return models

    def evaluate(self) -> Path:
        from ..evaluation import evaluate

        def build(folder: Path):
            models = self.models()
            specs = [{"path": str(path), "label": label} for label, path in models.items()]
            evaluate(specs, ["lab_reason"], folder, temperature=0.0, samples=1, max_new_tokens=64, seed=self.seed,
                     batch_size=100, limit=self.size.eval_limit, progress=True)
            evaluate([{"path": str(models["A"]), "label": "A"}], ["lab_onestep"], folder, temperature=0.0,
                     samples=1, max_new_tokens=32, seed=self.seed, batch_size=100, limit=self.size.eval_limit,
                     progress=True)

        return self.stage("eval", self.root / "evals",
                          {"up": [self.hashes[k] for k in sorted(self.hashes) if k not in ("eval", "scale")]}, build)

    def scale_stage(self, sizes: list[str]) -> dict:
        """o_proj vs full at several model sizes: one lab per size (data, base, both fine-tunes, eval), this lab for
        its own size; the gap full - o_proj with its paired-bootstrap CI against the parameter count."""
        from ..evaluation import load_result
        from ..evaluation.tables import paired_test
        from .report import params_of

        points = []
        for size in sizes:
            if size == self.size_name:
                lab = self
            else:
                lab = Lab(self.root / "scale" / size, size, self.seed, self.recipes, self.sweep, SCALE_VARIANTS,
                          log=self.log)
                for step in (lab.data, lab.base, lab.finetunes, lab.evaluate):
                    step()
            res = {v: load_result(lab.root / "evals" / f"{v}__lab_reason.json") for v in ("A", *SCALE_VARIANTS)}
            test = paired_test(res["full"], res["oproj"], seed=self.seed)
            points.append({"size": size, "root": str(lab.root), "params": params_of(lab.root / "base"),
                           "hidden": lab.size.hidden, "layers": lab.size.layers,
                           "rates": {v: lab.trained[v]["learning_rate"] for v in SCALE_VARIANTS},
                           "chosen_by": {v: lab.trained[v]["chosen_by"] for v in SCALE_VARIANTS},
                           "pass_at_1": {v: r["summary"]["pass_at_1"] for v, r in res.items()},
                           "gap": test["delta"], "gap_ci": [test["ci_low"], test["ci_high"]],
                           "p_value": test["p_value"], "n": test["n"],
                           "seconds": sum(t for k, t in lab.timings.items() if k == "base" or
                                          k.split(":")[-1] in SCALE_VARIANTS)})
        self.scale = {"sizes": sizes, "points": points}
        return self.scale

    def report(self) -> Path:
        from .report import write_report

        record = self.record()
        (self.root / RUN_RECORD).write_text(json.dumps(record, indent=1, default=str))
        return write_report(self.root)

    def record(self) -> dict:
        """The plain record of what this run did, which the report reads (with the files the stages wrote)."""
        return {
            "size_name": self.size_name, "size": asdict(self.size), "seed": self.seed, "sweep": self.sweep,
            "reason_steps": list(REASON_STEPS), "variants": {v: {"tuned": VARIANTS[v], **self.trained[v],
                                                                  "recipe": str(self.recipes / f"{v}.yaml")}
                                                              for v in self.variants},
            "merges": MERGES, "destroy_roles": DESTROY_ROLES, "destroy_layers": self.middle_layers(),
            "models": {label: str(path) for label, path in self.models().items()},
            "timings": self.timings, "scale": self.scale,
        }

    # -- training through the recipes, one subprocess per run ---------------------------------------------------------
    def recipe_settings(self, name: str, ignored: tuple[str, ...] = ()) -> dict:
        import yaml

        return {k: v for k, v in yaml.safe_load(self._recipe_text(name)).items() if k not in ignored}

    def _recipe_text(self, name: str) -> str:
        path = self.recipes / f"{name}.yaml"
        if not path.exists():
            raise SfnError(f"lab recipe {path} is missing: run the lab from a checkout that has recipes/lab/.")
        return path.read_text()

    def train(self, recipe: str, model: Path, data: Path, out: Path, **overrides) -> dict:
        """`sfn train --config recipes/lab/<recipe>.yaml` with the lab's paths; returns time and peak memory."""
        flags = {"model_name_or_path": model, "dataset_name": data, "output_dir": out, "seed": self.seed,
                 "overwrite_output_dir": "true", **overrides}
        cmd = [sys.executable, "-m", "sfn_train.cli", "train", "--config", str(self.recipes / f"{recipe}.yaml")]
        for key, value in flags.items():
            cmd += [f"--{key}", str(value)]
        run = run_command(cmd, env=TRAIN_ENV)
        if run.exit_code != 0:
            raise SfnError(f"lab training run {recipe} failed (exit {run.exit_code}); its output is above.")
        stats = {"wall_s": run.wall_s, "cpu_s": run.cpu_s, "peak_rss_mb": run.peak_rss_mb}
        (out / "lab_train_stats.json").write_text(json.dumps(stats))
        return stats

    def run(self, stages: list[str] | None = None, scale: list[str] | None = None) -> Path:
        wanted = stages or [s for s in ORDER if s != "scale" or scale]
        if "scale" in wanted and not scale:
            raise SfnError("the scale stage needs the sizes to compare: pass --scale small,medium.")
        last = max(wanted, key=ORDER.index)
        steps = {"data": self.data, "base": self.base, "finetune": self.finetunes, "gadgets": self.gadgets,
                 "eval": self.evaluate, "scale": lambda: self.scale_stage(scale), "report": self.report}
        started = time.perf_counter()
        # every stage up to the last one asked for runs (cached when unchanged): their hashes key the stages below
        for name in ORDER[: ORDER.index(last) + 1]:
            if name == "scale" and not scale:
                continue
            steps[name]()
        where = self.root / "report.md" if last == "report" else self.root
        self.log(f"[lab] done up to stage {last} in {time.perf_counter() - started:.0f} s: {where}")
        return self.root / "report.md"


# One torch thread per training run: at this model size a second thread costs more in synchronisation than it gains
# (measured: 0.32 vs 0.37 s per step on 2 cores), and a single thread does not collapse when another process shares
# the CPU.
TRAIN_ENV = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def run_lab(root="lab", size="small", seed=42, stages=None, sweep=False, scale=None) -> Path:
    """Python API of `sfn lab`: returns the report path."""
    return Lab(root, size, seed, sweep=sweep).run(stages, scale)
