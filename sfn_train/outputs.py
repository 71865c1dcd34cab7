"""What a training run leaves in its output folder besides the weights: the plugin and the manifest.

Shared by the plain save (`write_plugin_from_checkpoint`, from the gathered checkpoint) and the quantized save
(`save_full_precision`, from the live model), so both write the same plugin and manifest.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .errors import SfnError
from .startup import deepspeed_stage

logger = logging.getLogger("sfn_train")


@dataclass
class Selection:
    """What a run trains: the recipe's selection and the tensors it resolved to on the loaded model."""

    trainable_modules: list[str]
    trainable_layers: list[str]
    trainable_tensors: list[str]
    trainable_params: int
    total_params: int
    quantize_frozen: dict | None = field(default=None)
    # The trained tensors as the saved checkpoint names them (one per expert where transformers fuses experts in
    # memory), known once the checkpoint is written.
    trainable_tensors_on_disk: list[str] | None = field(default=None)

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_params / self.total_params

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        for key in ("quantize_frozen", "trainable_tensors_on_disk"):
            if data[key] is None:
                del data[key]
        return {**data, "trainable_fraction": self.trainable_fraction}


def base_fingerprint(model_args) -> str | None:
    from .checkpoint import cached_fingerprint

    try:
        return cached_fingerprint(model_args.model_name_or_path)
    except SfnError as exc:
        logger.warning("base fingerprint unavailable: %s", exc)
        return None


def plugin_skip_reason(selection: Selection) -> str | None:
    """Why a run writes no plugin, or None when it writes one.

    A selection that trains every parameter (`trainable_modules: all`) is a full fine-tune: its plugin would be a
    second full copy of the checkpoint beside it, as a full fine-tune in TRL leaves one checkpoint. The checkpoint is
    the result; `sfn plugin extract` still makes a plugin from it when one is wanted.
    """
    if selection.trainable_params == selection.total_params:
        return ("the selection trains every parameter, so a plugin would be a second full copy of the checkpoint; "
                "the checkpoint itself is the result (`sfn plugin extract` makes a plugin from it if needed)")
    return None


def plugin_record(selection: Selection) -> dict:
    """The manifest's `plugin` entry: the file the run writes, or why it writes none."""
    from .plugin import PLUGIN_FILE

    reason = plugin_skip_reason(selection)
    return {"file": None, "skipped": reason} if reason else {"file": PLUGIN_FILE}


def drop_tied_copies(output_dir: Path, model) -> list[str]:
    """Store tied weights in the saved checkpoint as save_pretrained stores them: the source only.

    With tied weights (`tie_word_embeddings`: lm_head.weight is model.embed_tokens.weight) save_pretrained writes
    the source alone, because the two names share storage. A save from a state dict that an engine gathered (FSDP2's
    full state dict) holds separate copies, and both names get written: the checkpoint would then have a tensor the
    base lacks. Each target of `model.all_tied_weights_keys` ({target: source}) stored next to its source with equal
    values is removed from its file (and from the index). Returns the names removed.
    """
    import json

    import torch
    from safetensors.torch import load_file, save_file

    from .checkpoint import INDEX_FILE, Checkpoint, atomic_file

    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    saved = Checkpoint(output_dir)
    pairs = {t: s for t, s in tied.items() if t in saved.tensors and s in saved.tensors}
    if not pairs:
        return []
    dropped = []
    for target, source in sorted(pairs.items()):
        if torch.equal(saved.tensor(target), saved.tensor(source)):
            dropped.append(target)
        else:
            logger.warning("%s is tied to %s but the saved values differ: both are kept.", target, source)
    for file in sorted({saved.tensors[name].file for name in dropped}):
        tensors = load_file(file)
        for name in dropped:
            tensors.pop(name, None)
        with atomic_file(file) as tmp:
            save_file(tensors, tmp, metadata={"format": "pt"})
    index = Path(output_dir) / INDEX_FILE
    if dropped and index.exists():
        data = json.loads(index.read_text())
        for name in dropped:
            data["weight_map"].pop(name, None)
            if "total_size" in data.get("metadata", {}):
                data["metadata"]["total_size"] -= saved.tensors[name].nbytes
        with atomic_file(index) as tmp:
            tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    if dropped:
        logger.info("tied weights saved as the base stores them: dropped the gathered copies %s.", ", ".join(dropped))
    return dropped


def write_plugin_from_checkpoint(output_dir: Path, selection: Selection, fingerprint: str | None,
                                 tensors: dict | None = None, model=None) -> Path | None:
    """Write `sfn_plugin.safetensors` after the checkpoint was saved.

    `tensors`: the trained tensors in full precision (the fp32 master weights, see sfn_train/precision.py), checked
    against the saved checkpoint's names and shapes; without them, the tensors are copied out of the saved (gathered)
    checkpoint as they are. The selection names in-memory parameters; the checkpoint may store one as several
    tensors (a fused expert tensor as one per expert): `model` (the trained model) translates, see `sfn_train.names`.
    None (and a log line) when the selection trains every parameter: see `plugin_skip_reason`.
    """
    from .checkpoint import Checkpoint
    from .names import NameMap, disk_tensors

    saved = Checkpoint(output_dir)
    names = NameMap.from_model(model, saved.names) if model is not None else NameMap.for_checkpoint(saved)
    missing = [n for n in selection.trainable_tensors if not names.disk_names_of(n)]
    if missing:
        raise SfnError(f"the saved checkpoint in {output_dir} lacks trained tensors {missing[:3]}: it is incomplete.")
    selection.trainable_tensors_on_disk = names.to_disk(selection.trainable_tensors)
    reason = plugin_skip_reason(selection)
    if reason:
        logger.info("plugin: not written: %s.", reason)
        return None
    if tensors is None:
        tensors = {name: saved.tensor(name) for name in selection.trainable_tensors_on_disk}
    else:
        if model is not None:  # in the checkpoint's names and layout, by transformers' saving rule
            tensors = disk_tensors(model, {n: tensors[n] for n in selection.trainable_tensors if n in tensors})
        wrong = [n for n in selection.trainable_tensors_on_disk
                 if n not in tensors or list(tensors[n].shape) != list(saved.tensors[n].shape)]
        if wrong:
            raise SfnError(f"internal error: the full-precision tensor {wrong[0]} does not match the saved checkpoint; "
                           "report this.")
        tensors = {name: tensors[name].contiguous() for name in selection.trainable_tensors_on_disk}
    empty = [n for n, t in tensors.items() if t.numel() == 0]
    if empty:
        raise SfnError(f"the saved checkpoint holds empty tensors ({empty[0]}): under ZeRO-3 set "
                       "stage3_gather_16bit_weights_on_model_save: true.")
    return write_run_plugin(output_dir, tensors, selection, fingerprint)


def write_run_plugin(output_dir: Path, tensors: dict, selection: Selection, fingerprint: str | None) -> Path:
    """`output_dir/sfn_plugin.safetensors`: the trained tensors, stamped with the base they were trained from."""
    from .plugin import PLUGIN_FILE, write_plugin

    return write_plugin(Path(output_dir) / PLUGIN_FILE, tensors, base_fingerprint=fingerprint or "",
                        modules=selection.trainable_modules, layers=selection.trainable_layers,
                        source=str(output_dir))


def save_full_precision(model, selection, output_dir: Path, base, fingerprint: str | None,
                        tokenizer=None, tensors: dict | None = None) -> Path:
    """Write the plugin (trained tensors from the live model) and the full checkpoint = base + plugin into output_dir.

    Every file of the checkpoint (weights, index, config, tokenizer, generation config) comes from the base folder
    through `plugin_apply`, written into a temporary folder and then moved in; the trained tensors are cast to the
    base's stored dtype there, as `sfn plugin apply` does, while the plugin keeps them in full precision.
    `tensors`: the trained tensors in full precision (the fp32 master weights, sfn_train/precision.py); without them
    they are read from the live model. `tokenizer` (the run's, as `Trainer.save_model` would save it) replaces the
    base's tokenizer files.
    """
    from .checkpoint import INDEX_FILE, MODEL_DEFINING_FOLDERS, is_model_defining
    from .names import disk_tensors
    from .plugin import plugin_apply

    output_dir = Path(output_dir)
    wanted = set(selection.trainable_tensors)
    if tensors is None:
        tensors = {n: p.detach().to("cpu").clone() for n, p in model.named_parameters() if n in wanted}
    missing = sorted(wanted - set(tensors))
    if missing:
        raise SfnError(f"internal error: trained tensors {missing[:3]} are not in the model; report this.")
    # In the base checkpoint's names and layout (a fused expert tensor as one tensor per expert), as save_pretrained
    # would write them: the plugin applies onto the base's own files.
    tensors = {n: t.contiguous() for n, t in disk_tensors(model, tensors).items()}
    selection.trainable_tensors_on_disk = list(tensors)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-full-", dir=output_dir))
    try:
        skip = plugin_skip_reason(selection)
        if skip:  # the plugin is still how the checkpoint is built, but it is not kept: see plugin_skip_reason
            logger.info("plugin: not written: %s.", skip)
        plugin = write_run_plugin(tmp if skip else output_dir, tensors, selection, fingerprint)
        # force only when the base could not be fingerprinted (then the plugin carries no fingerprint to compare)
        plugin_apply(base, plugin, tmp / "full", force=fingerprint is None, command="sfn train (quantize_frozen)")
        # Only the checkpoint itself moves in: weights, their index and what defines the model. The gadget's manifest
        # stays behind (the run writes its own next), and nothing the run already wrote here (trainer_state.json,
        # the plugin) is replaced.
        for item in (tmp / "full").iterdir():
            if item.name in MODEL_DEFINING_FOLDERS:
                shutil.rmtree(output_dir / item.name, ignore_errors=True)
                os.replace(item, output_dir / item.name)
            elif item.name.endswith(".safetensors") or item.name == INDEX_FILE or is_model_defining(item.name):
                os.replace(item, output_dir / item.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)
    return output_dir


def recipe_record(args) -> dict:
    """The resolved recipe as the manifest records it, by section."""
    script_args, training_args, model_args, sfn_args = args
    return {
        "script": dataclasses.asdict(script_args),
        "training": training_args.to_dict(),
        "model": dataclasses.asdict(model_args),
        "sfn": dataclasses.asdict(sfn_args),
    }


def build_manifest(args, selection, attention, fingerprint, status, metrics=None, precision=None,
                   engine=None) -> dict:
    from .manifest import new_manifest

    script_args, training_args, model_args, sfn_args = args
    return new_manifest(
        "train",
        status=status,
        recipe=recipe_record(args),
        base={"model_name_or_path": model_args.model_name_or_path, "fingerprint": fingerprint},
        selection=selection.to_dict(),
        plugin=plugin_record(selection),
        attention=attention,
        precision=precision,  # dtypes in effect, read from the live model once training began (None before)
        world_size=training_args.world_size,
        # the training seed (data order, anything initialised) and the data-order seed when set apart from it: what
        # tells runs of one recipe apart in a comparison over seeds
        seed=training_args.seed,
        data_seed=training_args.data_seed,
        deepspeed_stage=deepspeed_stage(training_args),
        # requested (recipe or launcher) and in effect (read from the live model: sharded DTensors for FSDP2,
        # partitioned parameters for ZeRO-3), plus the steps this process ran (fewer than max_steps when resumed)
        engine=engine or {},
        metrics=metrics or {},
    )
