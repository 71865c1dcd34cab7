"""Merge: BASE with the selected modules taken from DONOR (the paper's transplant experiments).

`sfn merge BASE REASONING --modules o_proj` builds "the base model with the reasoning model's output projections",
the checkpoint behind the claim that o_proj carries most of the reasoning. With `--alpha` the selected tensors are
interpolated instead: w = (1 - alpha) * A + alpha * B, in float32, cast back to the stored dtype; alpha = 1 (the
default) copies DONOR's bytes exactly.

Everything is checked before the output folder is created (architecture, names, shapes, dtypes), so a mistake costs
nothing and leaves nothing behind. Writing streams tensor by tensor in BASE's shard layout; untouched tensors are
copied byte for byte.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from ..checkpoint import Checkpoint, atomic_output_dir, cached_fingerprint, check_output_dir, copy_side_files
from ..errors import SfnError
from ..roles import normalize_modules
from ..shards import FLOAT_DTYPES, Entry, iter_chunks, layout_like, one_thread, write_checkpoint
from ..manifest import write_manifest
from ._io import select


def check_same_arch(a: Checkpoint, b: Checkpoint, a_label: str, b_label: str) -> None:
    arch_a, arch_b = a.arch(), b.arch()
    if arch_a != arch_b:
        raise SfnError(
            f"{a_label} {a.path} is {arch_a} but {b_label} {b.path} is {arch_b}: both must be the same architecture."
        )


def check_tensors_match(a: Checkpoint, b: Checkpoint, names: list[str], b_label: str, *, dtypes: bool = True) -> None:
    """Every name in `b` with the same shape (and dtype): else one line naming the first offenders."""
    missing = [n for n in names if n not in b.tensors]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise SfnError(
            f"{b_label} {b.path} lacks {len(missing)} selected tensor(s) ({', '.join(missing[:3])}{more}): "
            "pick checkpoints of the same model family or narrow --modules/--layers."
        )
    for n in names:
        ta, tb = a.tensors[n], b.tensors[n]
        if ta.shape != tb.shape:
            raise SfnError(
                f"tensor {n} has shape {list(ta.shape)} in {a.path} but {list(tb.shape)} in {b_label} {b.path}: "
                "the checkpoints are different model sizes."
            )
        if dtypes and ta.dtype != tb.dtype:
            raise SfnError(
                f"tensor {n} is {ta.dtype} in {a.path} but {tb.dtype} in {b_label} {b.path}: "
                "save both checkpoints in the same dtype first."
            )


def _interpolate(a_info, b_info, alpha: float):
    for a, b in zip(iter_chunks(a_info), iter_chunks(b_info)):  # in place on the reused read buffers
        yield a.mul_(1.0 - alpha).add_(b.mul_(alpha))


@one_thread
def merge(
    base: str | os.PathLike,
    donor: str | os.PathLike,
    out: str | os.PathLike,
    *,
    modules="o_proj",
    layers="all",
    alpha: float = 1.0,
    overwrite: bool = False,
    command: str | None = None,
) -> dict:
    """Write BASE with the (modules, layers) tensors from DONOR into `out`; return the manifest.

    Integer tensors that are selected come from DONOR unchanged whatever alpha (interpolating them means nothing).
    Fingerprints of both inputs for the manifest are hashed in background threads while the output is written.
    """
    base_ck, donor_ck = Checkpoint(base), Checkpoint(donor)
    check_output_dir(out, overwrite)
    alpha = float(alpha)
    if not math.isfinite(alpha):
        raise SfnError(f"--alpha {alpha} is not a finite number: use a value such as 0.5 (1.0 copies DONOR).")
    check_same_arch(base_ck, donor_ck, "BASE", "DONOR")
    selected = select(base_ck, modules, layers)
    check_tensors_match(base_ck, donor_ck, selected, "DONOR")

    chosen = set(selected)
    entries = {}
    for name, info in base_ck.tensors.items():
        if name not in chosen:
            entries[name] = Entry(name, info.dtype, info.shape, info)
            continue
        d = donor_ck.tensors[name]
        if alpha == 1.0 or info.dtype not in FLOAT_DTYPES:
            entries[name] = Entry(name, info.dtype, info.shape, d)
        else:
            entries[name] = Entry(name, info.dtype, info.shape, d, partial(_interpolate, info, d, alpha))

    with ThreadPoolExecutor(2) as pool:
        base_fp, donor_fp = pool.submit(cached_fingerprint, base_ck.path), pool.submit(cached_fingerprint, donor_ck.path)
        with atomic_output_dir(out, overwrite) as tmp:
            copy_side_files(base_ck.path, tmp)
            write_checkpoint(layout_like(base_ck, entries), tmp, "merge")
            manifest = write_manifest(
                tmp,
                "merge",
                command,
                base={"path": str(base_ck.path), "fingerprint": base_fp.result()},
                donor={"path": str(donor_ck.path), "fingerprint": donor_fp.result()},
                modules=normalize_modules(modules),
                layers=layers,
                alpha=alpha,
                counts={"total": len(entries), "from_base": len(entries) - len(selected), "from_donor": len(selected)},
                donor_tensors=selected,
            )
    return manifest
