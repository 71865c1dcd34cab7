"""Checkpoints that hold only what changed: a `checkpoint-N` of a run whose frozen tensors are the base's.

The HF Trainer writes into every `checkpoint-N` the whole model (`model.safetensors`) next to the optimizer, scheduler,
RNG and trainer state; under DeepSpeed it adds the engine's checkpoint, whose model states hold every parameter again
(and, under ZeRO-2/3, the frozen ones a third time as `frozen_param_fragments`). For an o_proj run that is 2-3 copies of
the base per checkpoint, of tensors that never change. Here, when the selection does not train every parameter and the
engine is one process, DDP or DeepSpeed:

- one process / DDP: the checkpoint holds `sfn_trained.safetensors` (the trained tensors, under the model's parameter
  names, in the dtype training keeps them: the fp32 masters) instead of `model.safetensors`; optimizer, scheduler,
  RNG and trainer state as before.
- DeepSpeed: no `model.safetensors`, and the engine's own mechanism for frozen parameters,
  `save_checkpoint(exclude_frozen_parameters=True)` (what the HF Trainer uses for PEFT models): the model states hold
  the trained tensors only; the optimizer partitions (fp32 masters) are the engine's as before. Resuming loads them
  with `load_module_strict=False`, which is what leaves the frozen tensors as the base gave them.
- every partial checkpoint has `sfn_checkpoint.json`: the base's fingerprint and the trained tensor names. A resume
  rebuilds the model from the base named by the recipe, refuses it when its fingerprint differs (one line), and
  loads the trained tensors on top.

FSDP keeps the Trainer's own checkpoints (accelerate's FSDP save has no frozen-parameter filter), and so does a full
fine-tune (nothing is frozen). The run's final output is unchanged: a full HF checkpoint plus the plugin.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from .errors import SfnError

logger = logging.getLogger("sfn_train")

RECORD_FILE = "sfn_checkpoint.json"
TRAINED_FILE = "sfn_trained.safetensors"


@dataclass
class PartialCheckpoints:
    """What a run's partial checkpoints need: the trained tensor names and the base they apply to."""

    trained: list[str]
    base: str
    fingerprint: str | None  # the main process's; None on the other ranks


def partial_checkpoints(selection, model_args, training_args, fingerprint, engine_name: str) -> PartialCheckpoints | None:
    """The run's partial-checkpoint settings, or None where checkpoints stay whole: a full fine-tune, FSDP, and
    `load_best_model_at_end` (the Trainer reloads the best checkpoint's whole model)."""
    if (selection.trainable_params == selection.total_params or engine_name.startswith("fsdp")
            or training_args.load_best_model_at_end):
        return None
    return PartialCheckpoints(list(selection.trainable_tensors), model_args.model_name_or_path, fingerprint)


def write_record(folder: Path, spec: PartialCheckpoints, engine: str) -> None:
    record = {"format": "sfn-partial-checkpoint/1", "engine": engine, "base": spec.base,
              "base_fingerprint": spec.fingerprint, "trained_tensors": spec.trained,
              "frozen_tensors": "not stored: they are the base's, rebuilt from it on resume"}
    (folder / RECORD_FILE).write_text(json.dumps(record, indent=1))


def save_trained(model, spec: PartialCheckpoints, folder: str) -> None:
    """One process / DDP: the trained tensors (live parameters, as training keeps them) and the record."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    params = dict(model.named_parameters())
    tensors = {name: params[name].detach().to("cpu").contiguous() for name in spec.trained}
    save_file(tensors, str(folder / TRAINED_FILE), metadata={"base_fingerprint": spec.fingerprint or ""})
    write_record(folder, spec, "torch")


def check_base(folder: Path, spec: PartialCheckpoints) -> dict:
    """The checkpoint's record, once its base is the run's base (main process: by fingerprint)."""
    record = json.loads((folder / RECORD_FILE).read_text())
    ours, theirs = spec.fingerprint, record.get("base_fingerprint")
    if ours is not None and theirs is not None and ours != theirs:
        raise SfnError(f"cannot resume from {folder}: it holds only the trained tensors of a run on a base with "
                       f"fingerprint {theirs}, and {spec.base} has {ours}; resume with that run's base model.")
    if sorted(record["trained_tensors"]) != sorted(spec.trained):
        raise SfnError(f"cannot resume from {folder}: it holds trained tensors {len(record['trained_tensors'])} "
                       f"that differ from this run's selection ({len(spec.trained)}); resume with the same recipe.")
    return record


def load_trained(model, spec: PartialCheckpoints, folder: str) -> None:
    """One process / DDP resume: the model is the base as loaded; the trained tensors come from the checkpoint."""
    import torch
    from safetensors.torch import load_file

    folder = Path(folder)
    check_base(folder, spec)
    tensors = load_file(str(folder / TRAINED_FILE))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in spec.trained:
            params[name].copy_(tensors[name].to(params[name].device))
    logger.info("resume: model rebuilt from the base %s and the %d trained tensors of %s.", spec.base,
                len(spec.trained), folder.name)


def is_partial(folder: str | Path) -> bool:
    return (Path(folder) / RECORD_FILE).is_file()


def partial_problems(folder: Path) -> list[str]:
    """resume.py's weights check for a partial checkpoint: the record parses, and the trained tensors are whole."""
    from .checkpoint import read_header

    try:
        record = json.loads((folder / RECORD_FILE).read_text())
        engine = record["engine"]
    except (OSError, ValueError, KeyError, TypeError):
        return [f"{RECORD_FILE} is unreadable"]
    if engine == "deepspeed":  # the engine's model states hold the trained tensors (checked with the optimizer's)
        return []
    if not (folder / TRAINED_FILE).is_file():
        return [f"{TRAINED_FILE} is missing"]
    try:
        read_header(folder / TRAINED_FILE)
    except SfnError:
        return [f"{TRAINED_FILE} is truncated or damaged"]
    return []


@contextlib.contextmanager
def deepspeed_without_frozen(engine):
    """While it is open, the DeepSpeed engine's `save_checkpoint` leaves the frozen parameters out."""
    import functools

    engine.save_checkpoint = functools.partial(type(engine).save_checkpoint, engine, exclude_frozen_parameters=True)
    try:
        yield
    finally:
        del engine.save_checkpoint  # the class's method again


class PartialCheckpointsMixin:
    """Trainer methods for partial checkpoints; active when `sfn_partial` (a PartialCheckpoints) is set."""

    sfn_partial: PartialCheckpoints | None = None

    def save_model(self, output_dir=None, _internal_call=False):
        if not (_internal_call and self.sfn_partial) or self.is_fsdp_enabled:  # the final save, or whole checkpoints
            return super().save_model(output_dir, _internal_call)
        if self.is_deepspeed_enabled:  # the engine's checkpoint holds the trained tensors
            if self.args.should_save:
                Path(output_dir).mkdir(parents=True, exist_ok=True)
                write_record(Path(output_dir), self.sfn_partial, "deepspeed")
            return None
        if self.args.should_save:
            save_trained(self.model, self.sfn_partial, output_dir)
        return None

    def _save_optimizer_and_scheduler(self, output_dir):
        if not (self.sfn_partial and self.is_deepspeed_enabled):
            return super()._save_optimizer_and_scheduler(output_dir)
        with deepspeed_without_frozen(self.model_wrapped):
            return super()._save_optimizer_and_scheduler(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if self.sfn_partial and is_partial(resume_from_checkpoint):
            return load_trained(model if model is not None else self.model, self.sfn_partial, resume_from_checkpoint)
        return super()._load_from_checkpoint(resume_from_checkpoint, model)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        import transformers.trainer as hf_trainer

        if not (self.sfn_partial and self.is_deepspeed_enabled and resume_from_checkpoint
                and is_partial(resume_from_checkpoint)):
            return super().train(resume_from_checkpoint, *args, **kwargs)
        check_base(Path(resume_from_checkpoint), self.sfn_partial)
        original = hf_trainer.deepspeed_load_checkpoint  # frozen tensors are not in the checkpoint: load non-strict
        hf_trainer.deepspeed_load_checkpoint = lambda engine, path, load_module_strict=True: original(
            engine, path, load_module_strict=False)
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            hf_trainer.deepspeed_load_checkpoint = original
