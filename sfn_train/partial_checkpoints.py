"""Checkpoints that hold only what changed: a `checkpoint-N` of a run whose frozen tensors are the base's.

The HF Trainer writes into every `checkpoint-N` the whole model (`model.safetensors`) next to the optimizer, scheduler,
RNG and trainer state; under DeepSpeed it adds the engine's checkpoint, whose model states hold every parameter again
(and, under ZeRO-2/3, the frozen ones a third time as `frozen_param_fragments`). For an o_proj run that is 2-3 copies of
the base per checkpoint, of tensors that never change. Under FSDP2 accelerate's `save_fsdp_model` writes every
parameter's shards. Here, when the selection does not train every parameter and the engine is one process, DDP,
DeepSpeed or FSDP2:

- one process / DDP: the checkpoint holds `sfn_trained.safetensors` (the trained tensors, under the model's parameter
  names, in the dtype training keeps them: the fp32 masters) instead of `model.safetensors`; optimizer, scheduler,
  RNG and trainer state as before.
- DeepSpeed: no `model.safetensors`, and the engine's own mechanism for frozen parameters,
  `save_checkpoint(exclude_frozen_parameters=True)` (what the HF Trainer uses for PEFT models): the model states hold
  the trained tensors only; the optimizer partitions (fp32 masters) are the engine's as before. Resuming loads them
  with `load_module_strict=False`, which is what leaves the frozen tensors as the base gave them.
- FSDP2: `pytorch_model_fsdp_0/` (accelerate's folder and format, torch.distributed.checkpoint) holds the trained
  tensors only (`get_model_state_dict(ignore_frozen_params=True)`), still sharded: each rank writes its shard of the
  fp32 masters, nothing is gathered to rank 0, whatever the plugin's `state_dict_type`. The optimizer (`optimizer_0/`,
  which covers only trained tensors anyway), scheduler and RNG are accelerate's and the Trainer's as before. Resuming
  loads that folder into the trained tensors of the model rebuilt from the base (`set_model_state_dict`, non-strict
  only about the frozen tensors). Sharded rather than gathered into one `sfn_trained.safetensors`: the optimizer
  state is sharded DCP anyway, so the checkpoint resumes under FSDP2 only either way, and a gather would put every
  trained tensor (6.7 GB of fp32 o_proj at 32B) through rank 0 at every save.
- every partial checkpoint has `sfn_checkpoint.json`: the base's fingerprint and the trained tensor names. A resume
  rebuilds the model from the base named by the recipe, refuses it when its fingerprint differs (one line), and
  loads the trained tensors on top.

FSDP1 keeps the Trainer's own checkpoints (its flat parameters mix frozen and trained tensors, and it runs only on
GPUs, so no test could show a partial one resumes bitwise), and so does a full fine-tune (nothing is frozen). The
run's final output is unchanged: a full HF checkpoint plus the plugin.
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
FSDP_TRAINED_DIR = "pytorch_model_fsdp_0"  # accelerate's name: resume.py's FSDP checks apply as they are
TRAINED_FILE = "sfn_trained.safetensors"


@dataclass
class PartialCheckpoints:
    """What a run's partial checkpoints need: the trained tensor names and the base they apply to."""

    trained: list[str]
    base: str
    fingerprint: str | None  # the main process's; None on the other ranks


def partial_checkpoints(selection, model_args, training_args, fingerprint, engine_name: str) -> PartialCheckpoints | None:
    """The run's partial-checkpoint settings, or None where checkpoints stay whole: a full fine-tune, FSDP1, and
    `load_best_model_at_end` (the Trainer reloads the best checkpoint's whole model)."""
    if selection.trainable_params == selection.total_params or training_args.load_best_model_at_end:
        return None
    if engine_name == "fsdp1":
        logger.info("checkpoints: FSDP1 keeps whole checkpoints (partial ones are for one process, DDP, DeepSpeed "
                    "and FSDP2).")
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


def fsdp_trained_state(model):
    """FSDP2: the trained tensors' state dict, as sharded DTensors (this rank's shards; no gather)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=True))


def save_trained_fsdp(model, spec: PartialCheckpoints, folder: str, should_save: bool) -> None:
    """FSDP2, on every rank: each writes its shards of the trained tensors; the main process writes the record."""
    import torch.distributed.checkpoint as dcp

    folder = Path(folder)
    state = fsdp_trained_state(model)
    if sorted(state) != sorted(spec.trained):
        raise SfnError(f"FSDP2 trains {len(state)} tensors where the selection names {len(spec.trained)}: "
                       "cannot write a partial checkpoint; report this with the recipe.")
    dcp.save({"model": state}, storage_writer=dcp.FileSystemWriter(str(folder / FSDP_TRAINED_DIR)))
    if should_save:
        write_record(folder, spec, "fsdp2")


def load_trained_fsdp(model, spec: PartialCheckpoints, folder: str) -> None:
    """FSDP2 resume, on every rank: the model is the base as loaded and sharded; each rank reads its shards of the
    trained tensors into it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    folder = Path(folder)
    check_base(folder, spec)
    state = fsdp_trained_state(model)
    dcp.load({"model": state}, storage_reader=dcp.FileSystemReader(str(folder / FSDP_TRAINED_DIR)))
    result = set_model_state_dict(model, state, options=StateDictOptions(ignore_frozen_params=True, strict=False))
    if result.unexpected_keys:
        raise SfnError(f"cannot resume from {folder}: it holds tensors the model does not have "
                       f"({', '.join(result.unexpected_keys[:3])}); resume with that run's base and recipe.")
    logger.info("resume: model rebuilt from the base %s and the %d trained tensors (FSDP2 shards) of %s.",
                spec.base, len(spec.trained), folder.name)


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
    if engine in ("deepspeed", "fsdp2"):  # the engine's own files hold the trained tensors (resume.py checks them)
        return []
    if not (folder / TRAINED_FILE).is_file():
        return [f"{TRAINED_FILE} is missing"]
    try:
        read_header(folder / TRAINED_FILE)
    except SfnError:
        return [f"{TRAINED_FILE} is truncated or damaged"]
    return []


@contextlib.contextmanager
def fsdp_model_save_skipped():
    """While it is open, the Trainer's FSDP checkpoint writes no model (save_model wrote the trained tensors)."""
    import transformers.trainer as hf_trainer

    original = hf_trainer.save_fsdp_model
    hf_trainer.save_fsdp_model = lambda *args, **kwargs: None
    try:
        yield
    finally:
        hf_trainer.save_fsdp_model = original


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
        if not (_internal_call and self.sfn_partial):  # the final save, or whole checkpoints
            return super().save_model(output_dir, _internal_call)
        if self.is_fsdp_enabled:  # every rank writes its shards of the trained tensors
            return save_trained_fsdp(self.model, self.sfn_partial, output_dir, self.args.should_save)
        if self.is_deepspeed_enabled:  # the engine's checkpoint holds the trained tensors
            if self.args.should_save:
                Path(output_dir).mkdir(parents=True, exist_ok=True)
                write_record(Path(output_dir), self.sfn_partial, "deepspeed")
            return None
        if self.args.should_save:
            save_trained(self.model, self.sfn_partial, output_dir)
        return None

    def _save_optimizer_and_scheduler(self, output_dir):
        if not (self.sfn_partial and (self.is_deepspeed_enabled or self.is_fsdp_enabled)):
            return super()._save_optimizer_and_scheduler(output_dir)
        with (deepspeed_without_frozen(self.model_wrapped) if self.is_deepspeed_enabled
              else fsdp_model_save_skipped()):
            return super()._save_optimizer_and_scheduler(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if not is_partial(resume_from_checkpoint):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        if not self.sfn_partial:
            raise SfnError(f"cannot resume from {resume_from_checkpoint}: it holds only the trained tensors of a run "
                           "that froze the rest, and this run keeps whole checkpoints (it trains every parameter, runs "
                           "FSDP1 or sets load_best_model_at_end); resume with that run's recipe.")
        load = load_trained_fsdp if self.is_fsdp_enabled else load_trained
        return load(model if model is not None else self.model, self.sfn_partial, resume_from_checkpoint)

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
