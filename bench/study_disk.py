"""Disk a shipped study's fine-tunes need: the kept checkpoint-N folders and the final outputs, computed per recipe.

    .venv/bin/python bench/study_disk.py recipes/studies/freeze_32b.yaml [...]

Parameter counts come from the models' config.json (bench/model_configs/<model>/config.json, built on the meta device)
and the recipe's selection (sfn_train.roles.select_parameters). Bytes per parameter, bf16 training under DeepSpeed
(checked on CPU by bench/checkpoint_size.py, where fp32 makes the module states 4 bytes instead of 2):

- a checkpoint of a run with frozen tensors (sfn_train/partial_checkpoints.py): the optimizer partitions hold the fp32
  masters and Adam's two moments (12 bytes per trained parameter), and under ZeRO-2 the engine's model states the
  trained tensors again (2, bf16; under ZeRO-3 they are placeholders): 14 (ZeRO-2) or 12 (ZeRO-3) bytes per trained
  parameter, nothing per frozen one;
- a checkpoint of a full fine-tune (nothing frozen, the Trainer's own): model.safetensors (2 bytes per parameter)
  + the optimizer partitions (12) + under ZeRO-2 the engine's model states again (2): 14 (ZeRO-3) or 16 (ZeRO-2);
- the final output: the HF checkpoint (2 bytes per parameter, bf16) + the plugin (the fp32 masters of the trained
  tensors, 4 bytes each; none for a full fine-tune).

A run keeps min(save_total_limit, number of saves) checkpoints (save_strategy epoch: one per epoch).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
GB = 1e9


def counts(recipe: dict) -> tuple[int, int]:
    """(all parameters, trained parameters) of the recipe's model and selection, on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from sfn_train.roles import apply_freeze, normalize_modules, select_parameters

    name = recipe["model_name_or_path"].split("/")[-1].lower()
    config = AutoConfig.from_pretrained((REPO / "bench" / "model_configs" if (REPO / "bench" / "model_configs").is_dir() else REPO / "bench" / "model_configs_tmp") / name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    layers = recipe.get("trainable_layers", "all")
    trained = select_parameters(model, normalize_modules(recipe["trainable_modules"]),
                                [str(x) for x in (layers if isinstance(layers, list) else [layers])])
    n_train, n_total = apply_freeze(model, trained)
    return n_total, n_train


def run_disk(recipe_path: str) -> dict:
    recipe = yaml.safe_load((REPO / recipe_path).read_text())
    total, trained = counts(recipe)
    zero = json.loads((REPO / recipe["deepspeed"]).read_text())["zero_optimization"]["stage"] if "deepspeed" in recipe \
        else None
    full = trained == total
    per_checkpoint = (14 if zero == 3 else 16) * total if full else (14 if zero == 2 else 12) * trained
    kept = min(recipe.get("save_total_limit") or 10**9, int(recipe.get("num_train_epochs", 1)))
    output = 2 * total + (0 if full else 4 * trained)
    return {"recipe": recipe_path, "params_b": total / 1e9, "trained_b": trained / 1e9, "zero": zero,
            "checkpoint_gb": per_checkpoint / GB, "kept": kept, "output_gb": output / GB,
            "run_gb": (kept * per_checkpoint + output) / GB,
            "checkpoint_gb_before": before(total, trained, zero) / GB}


def before(total: int, trained: int, zero: int) -> int:
    """The Trainer's own checkpoint, what every run wrote before partial checkpoints: model.safetensors (2 bytes per
    parameter) + the optimizer partitions (12 per trained parameter) + the engine's model states (ZeRO-2: every
    parameter again, 2; ZeRO-3: the frozen ones as frozen_param_fragments, 2)."""
    return 2 * total + 12 * trained + 2 * (total if zero == 2 else total - trained)


def main() -> None:
    sys.path.insert(0, str(REPO))
    for study in sys.argv[1:]:
        spec = yaml.safe_load(Path(study).read_text())
        runs = [run_disk(f["recipe"]) for f in spec["finetune"]]
        for r in runs:
            print(f"  {r['recipe']}: {r['params_b']:.2f}B params, {r['trained_b']:.3f}B trained, ZeRO-{r['zero']}: "
                  f"checkpoint {r['checkpoint_gb']:.1f} GB x {r['kept']} kept + output {r['output_gb']:.1f} GB "
                  f"= {r['run_gb']:.1f} GB")
        print(f"{study}: fine-tunes {sum(r['run_gb'] for r in runs):.0f} GB "
              f"(checkpoints {sum(r['kept'] * r['checkpoint_gb'] for r in runs):.0f} GB of it; the Trainer's own "
              f"checkpoints would take {sum(r['kept'] * r['checkpoint_gb_before'] for r in runs):.0f} GB)")


if __name__ == "__main__":
    main()
