"""The plugin file format: a small safetensors file holding only selected tensors, plus where they belong.

The paper's Conjecture 2 "Output Projection Plugin": the trained o_proj tensors of a fine-tune, applied onto the base
they were trained from. The trainer writes `sfn_plugin.safetensors` in this format and `sfn plugin extract` writes
the same thing from two checkpoints. Metadata (safetensors string map):

- `format`: `sfn-plugin/1`
- `base_fingerprint`: `checkpoint.fingerprint` of the base the tensors apply to
- `modules`, `layers`: the selection, JSON
- `source`: free text (the run or checkpoint it came from)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .checkpoint import atomic_file, read_header
from .errors import SfnError

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


def read_plugin_metadata(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise SfnError(f"plugin file {path} does not exist; pass the .safetensors file a run or `sfn plugin extract` wrote.")
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
