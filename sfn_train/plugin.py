"""Plugins: a small safetensors file holding only selected tensors, plus where they belong, and applying one.

The paper's Conjecture 2 "Output Projection Plugin": the trained o_proj tensors of a fine-tune, applied onto the base
they were trained from. The trainer writes `sfn_plugin.safetensors` in this format and `sfn plugin extract` writes
the same thing from two checkpoints. Metadata (safetensors string map):

- `format`: `sfn-plugin/1`
- `base_fingerprint`: `checkpoint.fingerprint` of the base the tensors apply to
- `modules`, `layers`: the selection, JSON
- `source`: free text (the run or checkpoint it came from)

Everything that applies a plugin goes through `check_plugin` here, so `sfn plugin apply`, the quantized trainer's
save and `sfn eval BASE --plugin` refuse the same plugins with the same words: `plugin_apply` writes BASE + plugin
as a new checkpoint folder, streaming tensor by tensor (a plugin tensor is a byte copy, so
apply(BASE, extract(TUNED, BASE)) reproduces TUNED's selected tensors bit for bit); `apply_plugin_to_model` patches a
model already loaded from BASE.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from .checkpoint import (
    Checkpoint,
    TensorInfo,
    atomic_file,
    atomic_output_dir,
    cached_fingerprint,
    check_output_dir,
    copy_side_files,
    read_header,
)
from .errors import SfnError
from .manifest import MANIFEST_FILE, write_manifest
from .shards import Entry, iter_chunks, layout_like, one_thread, write_checkpoint

PLUGIN_FORMAT = "sfn-plugin/1"
PLUGIN_FILE = "sfn_plugin.safetensors"


def write_plugin(path: str | os.PathLike, tensors: dict, *, base_fingerprint: str, modules, layers, source: str = "") -> Path:
    """Write atomically (temp file + rename) so a crash never leaves a plugin that looks whole."""
    from safetensors.torch import save_file

    if not tensors:
        raise SfnError("the plugin would be empty: no tensor was selected; check --modules and --layers.")
    path = Path(path)
    metadata = {
        "format": PLUGIN_FORMAT,
        "base_fingerprint": base_fingerprint,
        "modules": json.dumps(modules),
        "layers": json.dumps(layers),
        "source": str(source),
    }
    with atomic_file(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    return path


def _no_plugin_written(path: Path) -> str | None:
    """The reason the training run next to `path` wrote no plugin (its manifest says why), if that is the case."""
    try:
        record = json.loads((path.parent / MANIFEST_FILE).read_text()).get("plugin") or {}
    except (OSError, ValueError, AttributeError):
        return None
    if record.get("file") is None and record.get("skipped"):
        return f"the run in {path.parent} wrote none because {record['skipped']}."
    return None


def read_plugin_metadata(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        hint = _no_plugin_written(path) or "pass the .safetensors file a run or `sfn plugin extract` wrote."
        raise SfnError(f"plugin file {path} does not exist; {hint}")
    header, _ = read_header(path)
    metadata = header.get("__metadata__") or {}
    if metadata.get("format") != PLUGIN_FORMAT:
        raise SfnError(f"{path} is a safetensors file but not an sfn plugin (no `format: {PLUGIN_FORMAT}` metadata).")
    return {
        **metadata,
        "modules": json.loads(metadata.get("modules", "null")),
        "layers": json.loads(metadata.get("layers", "null")),
        "tensor_names": [k for k in header if k != "__metadata__"],
    }


def plugin_tensors(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """Names, dtypes, shapes and byte ranges of the plugin's tensors, read from its header only."""
    path = Path(path)
    header, data_start = read_header(path)
    return {
        name: TensorInfo(name, path, m["dtype"], tuple(m["shape"]), data_start + m["data_offsets"][0], data_start + m["data_offsets"][1])
        for name, m in header.items()
        if name != "__metadata__"
    }


def check_plugin(plugin: str | os.PathLike, base: Checkpoint, *, force: bool = False) -> dict:
    """Refuse a plugin that does not belong to `base`; return what was checked, for the output's record.

    Refused in one line each: a plugin tensor BASE lacks (another model family), a shape that differs (another size),
    and -- unless `force` -- a BASE whose fingerprint is not the one the plugin was made against. The last is the check
    that matters most: a fine-tune or another seed of the same model has every name and shape right, and a plugin
    applied to it silently means something else. `forced` in the record is true when `force` overrode a mismatch.
    """
    meta = read_plugin_metadata(plugin)
    tensors = plugin_tensors(plugin)
    unknown = [n for n in tensors if n not in base.tensors]
    if unknown:
        raise SfnError(
            f"plugin {plugin} holds {len(unknown)} tensor(s) that BASE {base.path} lacks (e.g. {unknown[0]}): "
            "it was made for another model family."
        )
    for name, info in tensors.items():
        if info.shape != base.tensors[name].shape:
            raise SfnError(
                f"plugin tensor {name} has shape {list(info.shape)} but BASE's is {list(base.tensors[name].shape)}: "
                "the plugin was made for another model size."
            )
    base_fp = cached_fingerprint(base.path)
    expected = meta.get("base_fingerprint")
    mismatch = base_fp != expected
    if mismatch:
        if not force:
            raise SfnError(
                f"BASE {base.path} is not the checkpoint plugin {plugin} was extracted against (fingerprint "
                f"{base_fp[:19]}... vs {str(expected)[:19]}...): use that base, or pass --force."
            )
        print("warning: BASE fingerprint differs from the plugin's; applying anyway (--force).", file=sys.stderr)
    return {
        "path": str(Path(plugin).resolve()),
        "base_fingerprint": expected,
        "applied_to_fingerprint": base_fp,
        "force": bool(force),
        "forced": mismatch,
        "source": meta.get("source"),
        "modules": meta.get("modules"),
        "layers": meta.get("layers"),
        "tensors": list(tensors),
    }


def apply_plugin_to_model(model, plugin: str | os.PathLike, base: str | os.PathLike, *, force: bool = False,
                          check: dict | None = None) -> dict:
    """Overwrite the tensors of `model`, loaded from checkpoint `base`, with the plugin's; return the check's record.

    The plugin is checked against BASE's files exactly as `plugin_apply` checks it (`check`: that check's record when
    the caller already ran it, e.g. before a long evaluation starts), then its tensors are copied into the model's
    state dict, cast to the model's dtype.
    """
    import torch
    from safetensors.torch import load_file

    from .names import memory_tensors

    record = check if check is not None else check_plugin(plugin, Checkpoint(base), force=force)
    state = model.state_dict()
    # The plugin holds the checkpoint's tensors; an MoE model holds its experts fused in memory (sfn_train/names.py)
    tensors = memory_tensors(model, load_file(str(plugin)))
    missing = [n for n in tensors if n not in state]
    if missing:
        raise SfnError(f"plugin tensor {missing[0]!r} is in BASE's files but not among the loaded model's parameters "
                       f"({type(model).__name__} names it differently); write the merged checkpoint with "
                       "`sfn plugin apply` and load that instead.")
    with torch.no_grad():
        for name, value in tensors.items():
            state[name].copy_(value.to(dtype=state[name].dtype, device=state[name].device))
    return record


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
    read_plugin_metadata(plugin)  # a missing or foreign file is named first
    base_ck = Checkpoint(base)
    check_output_dir(out, overwrite)
    check = check_plugin(plugin, base_ck, force=force)
    tensors = plugin_tensors(plugin)
    base_fp = check["applied_to_fingerprint"]

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
            plugin={k: check[k] for k in ("path", "base_fingerprint", "source", "modules", "layers")},
            forced=check["forced"],
            counts={"total": len(entries), "from_plugin": len(tensors), "from_base": len(entries) - len(tensors)},
            plugin_tensors=list(tensors),
            cast_tensors=cast,
        )
    return manifest
