"""What makes an output folder explain itself: versions, git revision, and an atomic JSON writer."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
from pathlib import Path

MANIFEST_FILE = "sfn_manifest.json"
_PACKAGES = ("sfn-train", "torch", "transformers", "trl", "deepspeed", "accelerate", "datasets", "safetensors",
             "bitsandbytes", "flash-attn")


def versions() -> dict[str, str | None]:
    found = {}
    for name in _PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def git_revision() -> dict[str, str | bool | None]:
    """The sfn-train source revision (and whether it had uncommitted changes), when run from a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return {"revision": None, "dirty": None}
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
        return {"revision": rev.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"revision": None, "dirty": None}


def write_json(path: str | os.PathLike, data: dict) -> Path:
    """Write JSON via a temporary file and rename: readers never see half a file."""
    from .checkpoint import atomic_file

    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return Path(path)
