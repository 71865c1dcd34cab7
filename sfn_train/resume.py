"""Which `checkpoint-N` folder a resumed run may start from: the latest one that is complete.

What the HF Trainer (transformers 5.24) guarantees, and what it does not:

- `Trainer._save_checkpoint` writes straight into `output_dir/checkpoint-N` (no temporary folder, no rename, no
  fsync), in this order: model weights (`save_model`), optimizer (`optimizer.pt`, or DeepSpeed's
  `global_stepN/*_optim_states.pt` on every rank, ending in a barrier), `scheduler.pt`, RNG state (`rng_state.pth`, or
  `rng_state_<rank>.pth` written by each rank *without* a barrier), and last `trainer_state.json` (rank 0).
- `get_last_checkpoint` (used for `resume_from_checkpoint: true`) takes the highest-numbered `checkpoint-N` folder
  whatever its contents. A run killed while saving leaves that folder half-written, and the next resume fails to
  load it -- or, worse, loads it: a missing `rng_state_1.pth` is only logged at INFO and the resumed run silently
  stops reproducing the uninterrupted one; a missing optimizer file restarts Adam from zero.

So `resume_from_checkpoint: true` is resolved here instead: the highest-numbered folder that passes `problems()`
(trainer_state.json parses and names that step; every safetensors file's header and length check out; optimizer,
scheduler and every rank's RNG file are present, and each torch file is a whole zip archive; under FSDP, the model and
optimizer files or distributed-checkpoint folders of every rank), logging each newer
folder it skips and why. Nothing is deleted: an incomplete folder stays for inspection and is overwritten when the
resumed run reaches that step again.
"""

from __future__ import annotations

import json
import logging
import re
import zipfile
from pathlib import Path

from .errors import SfnError

logger = logging.getLogger("sfn_train")

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")  # the HF Trainer's own pattern (trainer_utils._re_checkpoint)


def _torch_file_problem(path: Path) -> str | None:
    """torch.save writes a zip archive whose directory is at the end: a file cut short has none."""
    try:
        with zipfile.ZipFile(path) as archive:
            archive.namelist()
    except (OSError, zipfile.BadZipFile, ValueError) as exc:
        return f"{path.name} is not a complete torch file ({type(exc).__name__})"
    return None


def _weights_problems(folder: Path) -> list[str]:
    from .checkpoint import INDEX_FILE, SINGLE_FILE, read_header
    from .partial_checkpoints import is_partial, partial_problems

    if is_partial(folder):  # only the trained tensors: sfn_train/partial_checkpoints.py
        return partial_problems(folder)

    index = folder / INDEX_FILE
    if index.exists():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return [f"{INDEX_FILE} is unreadable"]
    elif (folder / SINGLE_FILE).exists():
        files = [SINGLE_FILE]
    else:
        return ["no model weights (model.safetensors)"]
    problems = []
    for name in files:
        if not (folder / name).is_file():
            problems.append(f"{name} is missing")
            continue
        try:
            read_header(folder / name)
        except SfnError:
            problems.append(f"{name} is truncated or damaged")
    return problems


def _fsdp_problems(folder: Path, world_size: int) -> list[str]:
    """FSDP (accelerate): `pytorch_model_fsdp.bin` + `optimizer.bin` (FULL_STATE_DICT, written by rank 0), or the
    distributed-checkpoint folders `pytorch_model_fsdp_0/` + `optimizer_0/` (SHARDED_STATE_DICT): one
    `__<rank>_0.distcp` per rank and a `.metadata` file, which torch.distributed.checkpoint writes last."""
    found = []
    for stem in ("pytorch_model_fsdp", "optimizer"):
        full, sharded = folder / f"{stem}.bin", folder / f"{stem}_0"
        if full.is_file():
            continue
        if not sharded.is_dir():
            found.append(f"{stem}.bin / {stem}_0 is missing")
            continue
        ranks = {p.name.split("_")[2] for p in sharded.glob("__*_*.distcp")}
        if not (sharded / ".metadata").is_file():
            found.append(f"{sharded.name} has no .metadata (the save did not finish)")
        if len(ranks) < world_size:
            found.append(f"{sharded.name} holds shards of {len(ranks)} process(es) for {world_size}")
    return found


def problems(folder: str | Path, world_size: int = 1) -> list[str]:
    """Why `folder` (a `checkpoint-N`) cannot be resumed from by a run of `world_size` processes; [] if it can."""
    folder = Path(folder)
    match = CHECKPOINT_RE.match(folder.name)
    found: list[str] = []
    state_file = folder / "trainer_state.json"
    try:
        state = json.loads(state_file.read_text())
        if not isinstance(state, dict) or "global_step" not in state:
            found.append("trainer_state.json has no global_step")
        elif match and int(state["global_step"]) != int(match.group(1)):
            found.append(f"trainer_state.json is for step {state['global_step']}")
    except FileNotFoundError:
        found.append("trainer_state.json is missing (the save did not finish)")
    except (OSError, ValueError, TypeError):
        found.append("trainer_state.json is unreadable")
    fsdp = [p for p in folder.glob("pytorch_model_fsdp*")]
    if fsdp:  # FSDP: the Trainer's own model and optimizer files; model.safetensors only with FULL_STATE_DICT
        found += _fsdp_problems(folder, world_size)  # a partial one's model folder holds the trained tensors only
        if ((folder / "model.safetensors").exists() or (folder / "model.safetensors.index.json").exists()
                or (folder / "sfn_checkpoint.json").exists()):
            found += _weights_problems(folder)
    else:
        found += _weights_problems(folder)

    deepspeed_dirs = [p for p in folder.glob("global_step*") if p.is_dir()]
    if fsdp:
        if not (folder / "scheduler.pt").is_file():
            found.append("scheduler.pt is missing")
    elif deepspeed_dirs:
        for ds_dir in deepspeed_dirs:
            optim = list(ds_dir.glob("*optim_states.pt"))
            if len(optim) < world_size:
                found.append(f"{ds_dir.name} holds {len(optim)} optimizer shard(s) for {world_size} process(es)")
            if not list(ds_dir.glob("*model_states.pt")):
                found.append(f"{ds_dir.name} has no model states")
    else:
        if not (folder / "optimizer.pt").is_file():
            found.append("optimizer.pt is missing")
        if not (folder / "scheduler.pt").is_file():
            found.append("scheduler.pt is missing")
    rng = ["rng_state.pth"] if world_size == 1 else [f"rng_state_{rank}.pth" for rank in range(world_size)]
    found += [f"{name} is missing" for name in rng if not (folder / name).is_file()]
    for path in sorted([*folder.glob("*.pt"), *folder.glob("*.pth"), *folder.glob("*.bin"),
                        *folder.glob("global_step*/*.pt")]):
        problem = _torch_file_problem(path)
        if problem:
            found.append(problem)
    return found


def latest_complete_checkpoint(output_dir: str | Path, world_size: int = 1) -> tuple[Path | None, dict[str, list[str]]]:
    """(the highest-numbered complete `checkpoint-N` in `output_dir` or None, {skipped newer folder: its problems})."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None, {}
    folders = sorted(
        (p for p in output_dir.iterdir() if p.is_dir() and CHECKPOINT_RE.match(p.name)),
        key=lambda p: int(CHECKPOINT_RE.match(p.name).group(1)),
        reverse=True,
    )
    skipped: dict[str, list[str]] = {}
    for folder in folders:
        found = problems(folder, world_size)
        if not found:
            return folder, skipped
        skipped[folder.name] = found
    return None, skipped


def resolve_latest(output_dir: str | Path, world_size: int = 1) -> str:
    """The folder `resume_from_checkpoint: true` means, logging skipped ones; SfnError when there is none."""
    folder, skipped = latest_complete_checkpoint(output_dir, world_size)
    for name, found in skipped.items():
        logger.warning("resume: skipping incomplete %s (%s).", name, "; ".join(found))
    if folder is None:
        detail = f" ({len(skipped)} incomplete: {', '.join(skipped)})" if skipped else ""
        raise SfnError(f"resume_from_checkpoint: true, but {output_dir} holds no complete checkpoint-* folder{detail}: "
                       "drop resume_from_checkpoint (a folder an interrupted run left is then started over; any other "
                       "needs overwrite_output_dir: true).")
    logger.info("resume: from %s", folder)
    return str(folder)
