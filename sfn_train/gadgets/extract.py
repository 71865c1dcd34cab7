"""Plugin extract: carry a fine-tune's o_proj tensors to its base as one small file (Conjecture 2).

`plugin_extract` keeps only the selected tensors of TUNED whose bytes differ from BASE (an untouched tensor would add
size and nothing else) and stamps the file with BASE's fingerprint. The file format, its checks and applying it live
in `sfn_train.plugin`, shared with the trainer and the evaluation.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..checkpoint import Checkpoint, TensorInfo, cached_fingerprint
from ..errors import SfnError
from ..plugin import write_plugin
from ..roles import normalize_modules
from ._io import select
from .merge import check_same_arch, check_tensors_match


def _same_bytes(a: TensorInfo, b: TensorInfo, block: int = 1 << 24) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    with open(a.file, "rb") as fa, open(b.file, "rb") as fb:
        fa.seek(a.start)
        fb.seek(b.start)
        left = a.nbytes
        while left:
            n = min(left, block)
            if fa.read(n) != fb.read(n):
                return False
            left -= n
    return True


def plugin_extract(
    tuned: str | os.PathLike,
    base: str | os.PathLike,
    out: str | os.PathLike,
    *,
    modules="o_proj",
    layers="all",
    overwrite: bool = False,
) -> dict:
    """Write the selected tensors of TUNED that differ from BASE to the plugin file `out`; return a summary."""
    tuned_ck, base_ck = Checkpoint(tuned), Checkpoint(base)
    out = Path(out)
    if out.exists() and not overwrite:
        raise SfnError(f"plugin file {out} exists: choose another --out or pass --overwrite.")
    if out.is_dir():
        raise SfnError(f"--out {out} is a folder: name the plugin file, e.g. {out}/oproj.safetensors.")
    check_same_arch(base_ck, tuned_ck, "BASE", "TUNED")
    selected = select(tuned_ck, modules, layers)
    check_tensors_match(tuned_ck, base_ck, selected, "BASE", dtypes=False)
    differing = [n for n in selected if not _same_bytes(tuned_ck.tensors[n], base_ck.tensors[n])]
    if not differing:
        raise SfnError(
            f"none of the {len(selected)} tensors selected by --modules {modules} --layers {layers} differs between "
            "TUNED and BASE: check that TUNED is the fine-tuned checkpoint and the selection is what was trained."
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    write_plugin(
        out,
        {n: tuned_ck.tensor(n) for n in differing},
        base_fingerprint=cached_fingerprint(base_ck.path),
        modules=normalize_modules(modules),
        layers=layers,
        source=str(tuned_ck.path),
    )
    return {"path": str(out), "tensors": differing, "selected": len(selected), "unchanged": len(selected) - len(differing)}
