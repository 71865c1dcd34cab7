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
    """The checkpoint's tensor names selected by (modules, layers); `lm_head` finds a tied head stored once."""
    from ..roles import select_names, tied_aliases

    return select_names(ckpt.names, modules, layers, arch=ckpt.arch(), aliases=tied_aliases(ckpt.names, is_tied(ckpt)))
