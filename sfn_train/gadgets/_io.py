"""Helpers shared by the gadgets: per-tensor seeds, the command line, the manifest, and selection on a checkpoint.

The streaming reads and shard writes they build on live one level down, in `sfn_train.shards`.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import sys
import time
from pathlib import Path

from ..checkpoint import Checkpoint, TensorInfo
from ..errors import SfnError
from ..shards import FLOAT_DTYPES

MANIFEST_FILE = "sfn_manifest.json"


def require_float(info: TensorInfo, what: str) -> None:
    if info.dtype not in FLOAT_DTYPES:
        raise SfnError(f"{what} needs floating-point weights but {info.name} is {info.dtype}; leave it out of --modules.")


def seed_for(name: str, seed: int) -> int:
    """A per-tensor seed from (seed, name): the same tensor gets the same noise whatever else is selected."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def command_line(command: str | None) -> str:
    return command if command is not None else shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])


def write_manifest(out: Path, gadget: str, command: str | None, **fields) -> dict:
    """`sfn_manifest.json`: what was done, to what, by which command — enough to redo or audit the folder."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        sfn_version = version("sfn-train")
    except PackageNotFoundError:
        sfn_version = "unknown"
    manifest = {
        "gadget": gadget,
        "command": command_line(command),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "sfn_train_version": sfn_version,
        **fields,
    }
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def tied_aliases(ckpt: Checkpoint) -> dict[str, str]:
    """`lm_head.weight` -> the embedding it is tied to, when the head is not stored: lets `--modules lm_head` work."""
    try:
        tied = bool(ckpt.config().get("tie_word_embeddings", False))
    except SfnError:
        tied = False
    if tied and "lm_head.weight" not in ckpt.tensors:
        embed = next((n for n in ckpt.names if n.endswith("embed_tokens.weight")), None)
        if embed:
            return {"lm_head.weight": embed}
    return {}


def select(ckpt: Checkpoint, modules, layers) -> list[str]:
    from ..roles import select_names

    return select_names(ckpt.names, modules, layers, arch=ckpt.arch(), aliases=tied_aliases(ckpt))
