"""The lab's stages, each cached by its inputs: data -> base -> finetune -> gadgets -> eval -> report.

Every stage goes through the public paths a real study uses: `sfn train` recipes (`recipes/lab/*.yaml`, run as
subprocesses so that each run's peak memory is its own), `sfn_train.gadgets` and `sfn_train.evaluation`. A stage
folder holds `.sfn_stage.json` with the hash of its inputs (settings + upstream hashes); a later run skips a stage
whose hash matches and redoes it (and everything downstream) otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ..errors import SfnError
from . import LAB_TASKS
from .problems import (REASON_STEPS, fact_rows, generate, sft_rows, shipped_tasks, write_jsonl)

REPO_RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "lab"
STAGE_FILE = ".sfn_stage.json"

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


@dataclass(frozen=True)
class LabSize:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    pretrain_problems: int  # direct-style problems (1-4 steps) in pre-training
    pretrain_facts: int  # "Compute a+b mod 10." rows in pre-training
    pretrain_epochs: float
    pretrain_lr: float
    sft_problems: int  # reasoning traces for the fine-tunes
    finetune_epochs: float
    eval_limit: int | None  # problems of lab_reason evaluated (None = all 200)


SIZES = {
    "tiny": LabSize(64, 2, 4, 2, 600, 400, 1, 1e-3, 200, 1, 40),  # for the test suite: runs, proves nothing
    "small": LabSize(128, 4, 4, 2, 1600, 6000, 2, 1e-3, 3000, 2, None),
    "medium": LabSize(192, 6, 6, 2, 8000, 3000, 4, 1e-3, 6000, 3, None),
    "large": LabSize(256, 8, 8, 2, 20000, 5000, 5, 7e-4, 12000, 3, None),
}


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Lab:
    def __init__(self, root: str | os.PathLike, size: str = "small", seed: int = 42, recipes: Path = REPO_RECIPES,
                 log=print):
        if size not in SIZES:
            raise SfnError(f"lab size {size!r} is unknown: use one of {', '.join(SIZES)}.")
        self.root = Path(root)
        self.size_name, self.size, self.seed = size, SIZES[size], seed
        self.recipes = Path(recipes)
        self.log = log
        self.hashes: dict[str, str] = {}
        self.timings: dict[str, float] = {}

    # -- caching ---------------------------------------------------------------------------------------------------
    def stage(self, name: str, folder: Path, inputs: dict, build) -> Path:
        key = _hash({"stage": name, **inputs})
        self.hashes[name] = key
        marker = folder / STAGE_FILE
        if marker.exists() and json.loads(marker.read_text()).get("key") == key:
            self.log(f"[lab] {name}: cached ({folder})")
            self.timings[name] = json.loads(marker.read_text()).get("seconds", 0.0)
            return folder
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        self.log(f"[lab] {name}: running -> {folder}")
        started = time.perf_counter()
        build(folder)
        seconds = time.perf_counter() - started
        self.timings[name] = seconds
        marker.write_text(json.dumps({"key": key, "inputs": inputs, "seconds": seconds}, default=str))
        return folder

    # -- stages ----------------------------------------------------------------------------------------------------
    def data(self) -> Path:
        s = self.size

        def build(folder: Path):
            held_out = {row["problem"] for rows in shipped_tasks().values() for row in rows}
            pool = [p for p in generate(s.pretrain_problems + s.sft_problems + len(held_out), (1, 2, 3, 4),
                                        seed=self.seed) if p.text not in held_out]
            rng = random.Random(self.seed)
            rng.shuffle(pool)
            multi = [p for p in pool if len(p.steps) in REASON_STEPS]
            sft = multi[: s.sft_problems]
            sft_texts = {p.text for p in sft}
            pretrain = [p for p in pool if p.text not in sft_texts][: s.pretrain_problems]
            rows = sft_rows(pretrain, "direct") + fact_rows(s.pretrain_facts, self.seed + 1)
            rng.shuffle(rows)
            write_jsonl(folder / "pretrain_direct.jsonl", rows)
            write_jsonl(folder / "sft_reasoning.jsonl", sft_rows(sft, "reasoning"))
            for name, path in LAB_TASKS.items():
                shutil.copy(path, folder / f"{name}.jsonl")

        return self.stage("data", self.root / "data", {"seed": self.seed, "size": asdict(s),
                                                        "tasks": _hash(shipped_tasks())}, build)

    def base(self) -> Path:
        """A = a small Qwen2 model pre-trained from scratch (all parameters, loss on whole sequences) on direct text."""
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
            self.train("base", init, self.root / "data" / "pretrain_direct.jsonl", folder,
                       num_train_epochs=s.pretrain_epochs, learning_rate=s.pretrain_lr)
            shutil.rmtree(init)

        return self.stage("base", self.root / "base", {"up": self.hashes["data"], "size": asdict(s),
                                                        "recipe": self._recipe_text("base")}, build)

    def finetunes(self) -> dict[str, Path]:
        out = {}
        for variant in VARIANTS:
            out[variant] = self.stage(
                f"finetune:{variant}", self.root / "runs" / variant,
                {"up": [self.hashes["data"], self.hashes["base"]], "recipe": self._recipe_text(variant),
                 "epochs": self.size.finetune_epochs},
                lambda folder, v=variant: self.train(v, self.root / "base", self.root / "data" / "sft_reasoning.jsonl",
                                                     folder, num_train_epochs=self.size.finetune_epochs))
        return out

    def gadgets(self) -> Path:
        from .. import gadgets

        layers = self.middle_layers()

        def build(folder: Path):
            base, full = self.root / "base", self.root / "runs" / "full"
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
        g = self.root / "gadgets"
        models = {"A": self.root / "base", **{v: self.root / "runs" / v for v in VARIANTS}}
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
                          {"up": [self.hashes[k] for k in sorted(self.hashes) if k != "eval"]}, build)

    def report(self) -> Path:
        from .report import write_report

        return write_report(self)

    # -- training through the recipes, one subprocess per run ---------------------------------------------------------
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
        # One torch thread: at this model size a second thread costs more in synchronisation than it gains (measured:
        # 0.32 vs 0.37 s per step on 2 cores), and a single thread does not collapse when another process shares the CPU.
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise SfnError(f"lab training run {recipe} failed (exit {proc.returncode}); its output is above.")
        stats = {"wall_s": time.perf_counter() - started, "peak_rss_mb": usage.ru_maxrss / 1024}
        (out / "lab_train_stats.json").write_text(json.dumps(stats))
        return stats

    def run(self, stages: list[str] | None = None) -> Path:
        order = ["data", "base", "finetune", "gadgets", "eval", "report"]
        last = max(stages or order, key=order.index)
        steps = {"data": self.data, "base": self.base, "finetune": self.finetunes, "gadgets": self.gadgets,
                 "eval": self.evaluate, "report": self.report}
        started = time.perf_counter()
        # every stage up to the last one asked for runs (cached when unchanged): their hashes key the stages below
        for name in order[: order.index(last) + 1]:
            steps[name]()
        where = self.root / "report.md" if last == "report" else self.root
        self.log(f"[lab] done up to stage {last} in {time.perf_counter() - started:.0f} s: {where}")
        return self.root / "report.md"


def run_lab(root="lab", size="small", seed=42, stages=None) -> Path:
    """Python API of `sfn lab`: returns the report path."""
    return Lab(root, size, seed).run(stages)


def cli_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="sfn lab", description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=list(SIZES), default="small",
                        help="small (default, <15 min on 2 cores), medium, large; tiny is for tests")
    parser.add_argument("--root", default="lab", help="folder for everything the lab writes (default ./lab)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--stage", action="append", choices=["data", "base", "finetune", "gadgets", "eval", "report"],
                        help="run up to these stages only (repeatable); default all")
    ns = parser.parse_args(argv)
    report = run_lab(ns.root, ns.size, ns.seed, ns.stage)
    print(f"report: {report}")
    return 0
