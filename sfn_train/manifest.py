"""What makes an output explain itself: one manifest schema for training runs, gadget outputs and evaluation results.

Every output carries the same provenance fields (`PROVENANCE_FIELDS`), then the fields of its kind:

- `schema`: `sfn-manifest/1`
- `kind`: `train`, `merge`, `destroy`, `plugin apply`, `delta`, `eval` or `study`
- `written_at`: when this record was written (UTC, ISO 8601 to the second)
- `command`: the command line that produced it, shell-quoted
- `sfn_train_version`: the running package's version
- `versions`: Python and the installed stack (`null` for a package that is not installed)
- `git`: `{revision, dirty}` of the sfn-train source when it runs from a git checkout, else nulls

and, after them, `runtime`: what else changes numbers on the same versions (`runtime()`): torch's intra- and inter-op
thread counts, the CPU kernel set ATen dispatches to (`cpu_capability`: AVX512, AVX2, ...), OMP_NUM_THREADS and
ATEN_CPU_CAPABILITY as set, the CPU model and count, and the GPU. Measured (docs/reproducibility.md): the same seed
on another CPU kernel set (AVX2 vs AVX512) gives other weights; thread count (1 vs 2) and transformers 5.24 vs 5.25
did not change them.

A training run and each gadget write it as `sfn_manifest.json` in their output folder (`write_manifest`); an
evaluation result file holds the same fields at its top level. docs/outputs.md lists the fields of each kind.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

MANIFEST_FILE = "sfn_manifest.json"
SCHEMA = "sfn-manifest/1"
KINDS = ("train", "merge", "destroy", "plugin apply", "delta", "eval", "study")
PROVENANCE_FIELDS = ("schema", "kind", "written_at", "command", "sfn_train_version", "versions", "git")
_PACKAGES = ("sfn-train", "torch", "transformers", "trl", "deepspeed", "accelerate", "datasets", "safetensors",
             "tokenizers", "bitsandbytes", "flash-attn", "math-verify", "vllm", "numpy")
RUNTIME = "runtime"


def versions() -> dict[str, str | None]:
    found = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def runtime() -> dict:
    """Threads, CPU kernels and devices of this process: the torch figures are null when torch is not imported
    (a process that runs no tensor code, such as `sfn study` itself, whose stages record their own)."""
    info = {"torch_threads": None, "torch_interop_threads": None, "cpu_capability": None, "gpu": None,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "aten_cpu_capability": os.environ.get("ATEN_CPU_CAPABILITY"),
            "machine": platform.machine(), "cpu": _cpu_model(), "cpu_count": os.cpu_count()}
    torch = sys.modules.get("torch")
    if torch is not None:
        info.update(torch_threads=torch.get_num_threads(), torch_interop_threads=torch.get_num_interop_threads(),
                    cpu_capability=torch.backends.cpu.get_cpu_capability(),
                    gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    return info


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


def command_line(command: str | None = None) -> str:
    """`command` as given, else this process's own command line (program name and arguments), shell-quoted."""
    return command if command is not None else shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])


def provenance(kind: str, command: str | None = None) -> dict:
    """The fields every output shares, in schema order."""
    from . import __version__

    if kind not in KINDS:
        raise ValueError(f"internal error: manifest kind {kind!r} is not one of {KINDS}")
    return {
        "schema": SCHEMA,
        "kind": kind,
        "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(command),
        "sfn_train_version": __version__,
        "versions": versions(),
        "git": git_revision(),
        RUNTIME: runtime(),
    }


def new_manifest(kind: str, command: str | None = None, **fields) -> dict:
    """Provenance, then the fields of this kind of output."""
    clash = set(fields) & {*PROVENANCE_FIELDS, RUNTIME}
    if clash:
        raise ValueError(f"internal error: manifest fields {sorted(clash)} are provenance fields")
    return {**provenance(kind, command), **fields}


def write_manifest(folder: str | os.PathLike, kind: str, command: str | None = None, **fields) -> dict:
    """`folder/sfn_manifest.json`: what was done, to what, by which command; enough to redo or audit the folder."""
    manifest = new_manifest(kind, command, **fields)
    write_json(Path(folder) / MANIFEST_FILE, manifest)
    return manifest


def manifest_problems(data) -> list[str]:
    """What is missing or malformed in the provenance fields of `data` (an empty list when it follows the schema)."""
    if not isinstance(data, dict):
        return [f"a manifest is a JSON object, not {type(data).__name__}"]
    problems = [f"no `{key}`" for key in PROVENANCE_FIELDS if key not in data]
    if problems:
        return problems
    if data["schema"] != SCHEMA:
        problems.append(f"`schema` is {data['schema']!r}, not {SCHEMA!r}")
    if data["kind"] not in KINDS:
        problems.append(f"`kind` {data['kind']!r} is not one of {', '.join(KINDS)}")
    try:
        if datetime.fromisoformat(data["written_at"]).utcoffset() is None:
            problems.append("`written_at` has no time zone")
    except (TypeError, ValueError):
        problems.append(f"`written_at` {data['written_at']!r} is not an ISO 8601 time")
    for key in ("command", "sfn_train_version"):
        if not isinstance(data[key], str) or not data[key]:
            problems.append(f"`{key}` is not a non-empty string")
    found = data["versions"]
    if not isinstance(found, dict) or not all(isinstance(v, (str, type(None))) for v in found.values()):
        problems.append("`versions` is not a mapping of package name to version string or null")
    elif not {"python", "sfn-train", "torch"} <= set(found):
        problems.append("`versions` lacks python, sfn-train or torch")
    if not isinstance(data["git"], dict) or set(data["git"]) != {"revision", "dirty"}:
        problems.append("`git` is not {revision, dirty}")
    if RUNTIME in data and not (isinstance(data[RUNTIME], dict) and "torch_threads" in data[RUNTIME]):
        problems.append("`runtime` is not a mapping with torch_threads")
    return problems


def read_json(path: str | os.PathLike) -> dict | None:
    """A JSON record written by write_json, or None when it is missing or unreadable (a run that never wrote it)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_json(path: str | os.PathLike, data: dict, indent: int = 2) -> Path:
    """Write JSON via a temporary file and rename: readers never see half a file, and a failed write leaves none."""
    from .checkpoint import atomic_file

    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=indent, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    return Path(path)
