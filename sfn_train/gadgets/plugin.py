"""Plugin extract / apply: carry a fine-tune's o_proj tensors to its base as one small file (Conjecture 2).

`extract` keeps only the selected tensors of TUNED whose bytes differ from BASE (an untouched tensor would add size
and nothing else) and stamps the file with BASE's fingerprint. `apply` refuses a base with another fingerprint unless
forced: a plugin is a set of weights trained against one exact base, and on another base it silently means
something else. Applying is a byte copy, so apply(BASE, extract(TUNED, BASE)) reproduces TUNED's selected tensors
bit for bit.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..checkpoint import (
    Checkpoint,
    TensorInfo,
    atomic_output_dir,
    cached_fingerprint,
    check_output_dir,
    copy_side_files,
    read_header,
)
from ..errors import SfnError
from ..plugin import read_plugin_metadata, write_plugin
from ..roles import normalize_modules
from ..shards import Entry, iter_chunks, layout_like, one_thread, write_checkpoint
from ._io import select, write_manifest
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


def _plugin_tensors(path: Path) -> dict[str, TensorInfo]:
    header, data_start = read_header(path)
    return {
        name: TensorInfo(name, path, m["dtype"], tuple(m["shape"]), data_start + m["data_offsets"][0], data_start + m["data_offsets"][1])
        for name, m in header.items()
        if name != "__metadata__"
    }


@one_thread
def plugin_apply(
    base: str | os.PathLike,
    plugin: str | os.PathLike,
    out: str | os.PathLike,
    *,
    force: bool = False,
    overwrite: bool = False,
    command: str | None = None,
) -> dict:
    """Write BASE with the plugin's tensors in place of its own into `out`; return the manifest.

    A plugin tensor stored in another dtype than BASE's (a float32 plugin trained on a bf16 base) is cast to BASE's
    dtype, so the output stays one dtype; same-dtype tensors are copied byte for byte.
    """
    meta = read_plugin_metadata(plugin)
    base_ck = Checkpoint(base)
    check_output_dir(out, overwrite)
    tensors = _plugin_tensors(Path(plugin))
    unknown = [n for n in tensors if n not in base_ck.tensors]
    if unknown:
        raise SfnError(
            f"plugin {plugin} holds {len(unknown)} tensor(s) that BASE {base_ck.path} lacks (e.g. {unknown[0]}): "
            "it was made for another model family."
        )
    for name, info in tensors.items():
        if info.shape != base_ck.tensors[name].shape:
            raise SfnError(
                f"plugin tensor {name} has shape {list(info.shape)} but BASE's is {list(base_ck.tensors[name].shape)}: "
                "the plugin was made for another model size."
            )
    base_fp = cached_fingerprint(base_ck.path)
    if base_fp != meta.get("base_fingerprint"):
        if not force:
            raise SfnError(
                f"BASE {base_ck.path} is not the checkpoint plugin {plugin} was extracted against (fingerprint "
                f"{base_fp[:19]}... vs {str(meta.get('base_fingerprint'))[:19]}...): use that base, or pass --force."
            )
        print("warning: BASE fingerprint differs from the plugin's; applying anyway (--force).", file=sys.stderr)

    entries = {n: Entry(n, i.dtype, i.shape, i) for n, i in base_ck.tensors.items()}
    cast = []
    for name, info in tensors.items():
        target = base_ck.tensors[name]
        if info.dtype == target.dtype:
            entries[name] = Entry(name, target.dtype, target.shape, info)
        else:
            entries[name] = Entry(name, target.dtype, target.shape, info, lambda info=info: iter_chunks(info))
            cast.append(name)
    if cast:
        print(f"note: {len(cast)} plugin tensor(s) cast to BASE's dtype ({base_ck.tensors[cast[0]].dtype}).", file=sys.stderr)

    with atomic_output_dir(out, overwrite) as tmp:
        copy_side_files(base_ck.path, tmp)
        write_checkpoint(layout_like(base_ck, entries), tmp, "plugin apply")
        manifest = write_manifest(
            tmp,
            "plugin apply",
            command,
            base={"path": str(base_ck.path), "fingerprint": base_fp},
            plugin={"path": str(Path(plugin).resolve()), "base_fingerprint": meta.get("base_fingerprint"),
                    "source": meta.get("source"), "modules": meta.get("modules"), "layers": meta.get("layers")},
            forced=bool(force and base_fp != meta.get("base_fingerprint")),
            counts={"total": len(entries), "from_plugin": len(tensors), "from_base": len(entries) - len(tensors)},
            plugin_tensors=list(tensors),
            cast_tensors=cast,
        )
    return manifest
