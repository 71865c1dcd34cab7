"""Helpers shared by the gadgets: per-tensor seeds, float checks, and selection on a checkpoint.

The streaming reads and shard writes they build on live one level down, in `sfn_train.shards`.
"""

from __future__ import annotations

import hashlib

from ..checkpoint import Checkpoint, TensorInfo
from ..errors import SfnError
from ..shards import FLOAT_DTYPES


def require_float(info: TensorInfo, what: str) -> None:
    if info.dtype not in FLOAT_DTYPES:
        raise SfnError(f"{what} needs floating-point weights but {info.name} is {info.dtype}; leave it out of --modules.")


def seed_for(name: str, seed: int) -> int:
    """A per-tensor seed from (seed, name): the same tensor gets the same noise whatever else is selected."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def is_tied(ckpt: Checkpoint) -> bool:
    """Whether the checkpoint ties its output head to the token embedding.

    A config without `tie_word_embeddings` counts as tied (GPT-2's hub config has no such key, and a checkpoint that
    stores no head loads only by tying it); `tie_word_embeddings: false` does not.
    """
    try:
        return bool(ckpt.config().get("tie_word_embeddings", True))
    except SfnError:
        return False


def select(ckpt: Checkpoint, modules, layers) -> list[str]:
    """The checkpoint's tensors selected by (modules, layers), in checkpoint order; `lm_head` finds a tied head
    stored once.

    Selection happens on the names the model has in memory, the trainer's names (`sfn_train.names`): `experts`
    selects a fused in-memory expert tensor and so every per-expert tensor it is stored as.
    """
    from ..names import NameMap
    from ..roles import select_names, tied_aliases

    names = NameMap.for_checkpoint(ckpt)
    aliases = {alias: names.memory_name(canon) for alias, canon in tied_aliases(ckpt.names, is_tied(ckpt)).items()}
    try:
        chosen = select_names(names.memory_names, modules, layers, arch=ckpt.arch(), aliases=aliases,
                              decoder=names.decoder, keys=("--modules", "--layers"))
    except SfnError:
        _explain_stored_names(names, modules, ckpt.arch())
        raise
    return names.to_disk(chosen)


def _explain_stored_names(names, modules, arch: str) -> None:
    """A regex that matches only stored names of a fused tensor: say which in-memory tensor holds them."""
    import re

    from ..roles import known_roles, normalize_modules

    for entry in normalize_modules(modules):
        if entry in known_roles() or entry == "all":
            continue
        try:
            pattern = re.compile(entry)
        except re.error:
            return
        if any(pattern.search(m) for m in names.memory_names):
            continue
        stored = next((d for d, m in names.memory_of.items() if d != m and pattern.search(d)), None)
        if stored is not None:
            raise SfnError(
                f"--modules entry {entry!r} matches stored tensors such as {stored}, which {arch} holds as part of "
                f"{names.memory_name(stored)} in memory: selections name in-memory tensors, so that training and "
                "the gadgets mean the same; select that tensor (or a role such as `experts`).")
