"""What makes an output folder explain itself: versions, git revision, and an atomic JSON writer."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shlex
import subprocess
import sys
import time
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
