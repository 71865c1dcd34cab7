"""Streaming access to Hugging Face safetensors checkpoints, one tensor at a time.

A checkpoint is a folder (sharded with `model.safetensors.index.json` or a single `model.safetensors`) or a hub id
resolved through the local HF cache. Nothing here loads a whole model: `Checkpoint.tensor(name)` memory-maps one
tensor, and `fingerprint` hashes tensor bytes shard by shard.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import SfnError, disk_full_error, is_disk_full

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: str  # safetensors dtype code: F32, BF16, F16, I64, ...
    shape: tuple[int, ...]
    start: int  # absolute byte offset of the data in `file`
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> tuple[dict, int]:
    """(header dict, data start offset) of a safetensors file; a clear error when the file is damaged."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                raise ValueError("header length points past the end of the file")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as exc:
        raise SfnError(f"{path} is not a readable safetensors file ({exc}); re-download or re-save it.") from None
    data_start = 8 + n
    data_len = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if data_start + data_len > size:
        raise SfnError(
            f"{path} is truncated: its header describes {data_start + data_len} bytes but the file has {size}; "
            "re-download or re-save it."
        )
    return header, data_start


def resolve_path(path_or_id: str | os.PathLike) -> Path:
    """A local checkpoint folder, or a hub id resolved to its snapshot in the HF cache (downloaded when reachable)."""
    path = Path(path_or_id)
    if path.exists():
        if not path.is_dir():
            raise SfnError(f"{path} is a file, not a checkpoint folder: pass the folder holding config.json.")
        return path
    if str(path_or_id).startswith((".", "/")) or str(path_or_id).count("/") != 1:
        raise SfnError(f"checkpoint {str(path_or_id)!r} does not exist: pass a local folder or a hub id (org/name).")
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(str(path_or_id), allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
        )
    except Exception as exc:  # noqa: BLE001 - any hub failure means the same thing to the user
        raise SfnError(
            f"checkpoint {str(path_or_id)!r} is not a local folder and could not be fetched from the hub "
            f"({type(exc).__name__}); download it first or pass a local path."
        ) from None


class Checkpoint:
    """Names, shapes and bytes of the tensors of one checkpoint, without loading them."""

    def __init__(self, path_or_id: str | os.PathLike):
        self.path = resolve_path(path_or_id)
        index = self.path / INDEX_FILE
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (self.path / SINGLE_FILE).exists():
            files = [SINGLE_FILE]
        else:
            found = sorted(p.name for p in self.path.glob("*.safetensors"))
            if not found:
                raise SfnError(
                    f"{self.path} holds no safetensors weights (.bin/.pt pickles are not read): "
                    "re-save the model with save_pretrained(safe_serialization=True)."
                )
            files = found
        self.files = [self.path / f for f in files]
        self.tensors: dict[str, TensorInfo] = {}
        for file in self.files:
            if not file.exists():
                raise SfnError(f"{file} is listed in {INDEX_FILE} but missing; re-download the checkpoint.")
            header, data_start = read_header(file)
            for name, meta in header.items():
                if name == "__metadata__":
                    continue
                begin, end = meta["data_offsets"]
                self.tensors[name] = TensorInfo(
                    name, file, meta["dtype"], tuple(meta["shape"]), data_start + begin, data_start + end
                )

    @property
    def names(self) -> list[str]:
        return list(self.tensors)

    def config(self) -> dict:
        config_file = self.path / "config.json"
        if not config_file.exists():
            raise SfnError(f"{self.path} has no config.json: it is not a Hugging Face checkpoint folder.")
        return json.loads(config_file.read_text())

    def arch(self) -> str:
        config = self.config()
        return (config.get("architectures") or [config.get("model_type", "unknown")])[0]

    def raw(self, name: str) -> bytes:
        info = self.tensors[name]
        with open(info.file, "rb") as f:
            f.seek(info.start)
            return f.read(info.nbytes)

    def tensor(self, name: str):
        """One tensor as torch, memory-mapped from its shard (no other tensor is read)."""
        from safetensors import safe_open

        with safe_open(self.tensors[name].file, framework="pt") as f:
            return f.get_tensor(name)

    def iter_by_file(self) -> Iterator[tuple[Path, list[TensorInfo]]]:
        for file in self.files:
            yield file, [t for t in self.tensors.values() if t.file == file]


def fingerprint(path_or_id: str | os.PathLike, chunk: int = 1 << 24) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order: independent of sharding."""
    ckpt = Checkpoint(path_or_id)
    digest = hashlib.sha256()
    handles: dict[Path, object] = {}
    try:
        for name in sorted(ckpt.tensors):
            info = ckpt.tensors[name]
            digest.update(f"{name}|{info.dtype}|{list(info.shape)}|".encode())
            f = handles.get(info.file) or handles.setdefault(info.file, open(info.file, "rb"))
            f.seek(info.start)
            left = info.nbytes
            while left:
                block = f.read(min(chunk, left))
                digest.update(block)
                left -= len(block)
    finally:
        for f in handles.values():
            f.close()
    return "sha256:" + digest.hexdigest()


def check_output_dir(out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse to write into a non-empty folder unless asked: a finished run must never be clobbered by a typo."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise SfnError(f"output folder {out} exists and is not empty: choose another --out or pass --overwrite.")
    return out


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path to write; rename it to `path` only when the block succeeds.

    Readers never see half a file; a failed or interrupted write leaves no temporary file behind, and a full disk
    is one line naming it.
    """
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        yield tmp
        os.replace(tmp, path)
    except Exception as exc:
        if is_disk_full(exc):
            raise disk_full_error(path) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; rename it to `out` only when the block finishes without error.

    A crash leaves no folder at `out` that looks complete, only a `.tmp-*` folder that is removed; a full disk
    is reported as one `SfnError` line naming it.
    """
    out = check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(exc):
            raise disk_full_error(out) from None
        raise


def copy_side_files(src: Path, dst: Path) -> None:
    """Copy what makes a folder a checkpoint besides weights: config, tokenizer, generation config, templates."""
    for item in src.iterdir():
        if item.is_file() and not item.name.endswith(".safetensors") and item.name != INDEX_FILE:
            if item.suffix in {".json", ".txt", ".model", ".jinja", ".tiktoken"} or item.name.startswith("tokenizer"):
                shutil.copy2(item, dst / item.name)


FINGERPRINT_CACHE_ENV = "SFN_FINGERPRINT_CACHE"


def _fingerprint_cache_file() -> Path | None:
    value = os.environ.get(FINGERPRINT_CACHE_ENV)
    if value in ("0", "off", "none"):
        return None
    return Path(value) if value else Path.home() / ".cache" / "sfn-train" / "fingerprints.json"


def cached_fingerprint(path_or_id: str | os.PathLike) -> str:
    """`fingerprint`, remembered per checkpoint folder while its shard files keep their size, mtime and inode.

    Hashing reads every byte (about 1 s per 2 GB); the gadgets stamp the fingerprints of their inputs on every output,
    and the same base is merged, destroyed and patched many times in a study, so the hash is kept in a small JSON
    file (`$SFN_FINGERPRINT_CACHE`, default ~/.cache/sfn-train/fingerprints.json; `off` disables it). Rewriting a
    shard changes its mtime or inode, which invalidates the entry.
    """
    ckpt = Checkpoint(path_or_id)
    cache_file = _fingerprint_cache_file()
    key = str(ckpt.path.resolve())
    stamp = [[f.name, st.st_size, st.st_mtime_ns, st.st_ino] for f in ckpt.files for st in [f.stat()]]
    if cache_file is None:
        return fingerprint(ckpt.path)
    entry = _read_cache(cache_file).get(key)
    if entry and entry.get("stamp") == stamp:
        return entry["fingerprint"]
    value = fingerprint(ckpt.path)
    with _CACHE_LOCK:  # re-read under the lock: two threads hashing two checkpoints must both be remembered
        cache = _read_cache(cache_file)
        cache[key] = {"stamp": stamp, "fingerprint": value}
        cache = dict(list(cache.items())[-256:])
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_name(f".tmp-{os.getpid()}-{threading.get_ident()}-{cache_file.name}")
            tmp.write_text(json.dumps(cache))
            os.replace(tmp, cache_file)
        except OSError:
            pass  # a read-only home only costs the next call a re-hash
    return value


_CACHE_LOCK = threading.Lock()


def _read_cache(cache_file: Path) -> dict:
    try:
        return json.loads(cache_file.read_text())
    except (OSError, ValueError):
        return {}
