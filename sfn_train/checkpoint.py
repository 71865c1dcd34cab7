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
import re
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
SHARD_NAME = re.compile(r"^(.*)-(\d+)-of-(\d+)\.safetensors$")  # model-00001-of-00004.safetensors


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
        weight_map = None
        if index.exists():
            weight_map = _read_weight_map(index)
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
                if name in self.tensors:
                    raise SfnError(f"{self.path}: tensor {name} is stored twice, in {self.tensors[name].file.name} and "
                                   f"{file.name}; re-save the checkpoint.")
                begin, end = meta["data_offsets"]
                self.tensors[name] = TensorInfo(
                    name, file, meta["dtype"], tuple(meta["shape"]), data_start + begin, data_start + end
                )
        if weight_map is not None:
            _check_index_matches_shards(index, weight_map, self.tensors)

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


def _read_weight_map(index: Path) -> dict[str, str]:
    """The index's tensor -> shard map; shard names must stay inside the checkpoint folder."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SfnError(f"{index} is not a readable safetensors index ({type(exc).__name__}); re-download the "
                       "checkpoint.") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise SfnError(f"{index}: weight_map is not a map of tensor names to shard file names; re-download the "
                       "checkpoint.")
    for shard in sorted(set(weight_map.values())):
        # The index is data: a shard name like `../other/x.safetensors` or `/etc/x` would read (and copy into every
        # gadget output) a file outside the checkpoint.
        if Path(shard).is_absolute() or ".." in Path(shard).parts or not shard:
            raise SfnError(f"{index} names shard {shard!r}, which is outside the checkpoint folder; shard names must "
                           "be relative file names inside it.")
    return weight_map


def _check_index_matches_shards(index: Path, weight_map: dict[str, str], tensors: dict[str, TensorInfo]) -> None:
    """Every index entry is in the shard it names, and every stored tensor is in the index: else one line."""
    problems = []
    for name, shard in weight_map.items():
        info = tensors.get(name)
        if info is None:
            problems.append(f"{name} is listed in {shard} but no shard holds it")
        elif info.file != index.parent / shard:
            problems.append(f"{name} is listed in {shard} but stored in {info.file.name}")
    problems += [f"{name} is stored in {info.file.name} but not listed in the index"
                 for name, info in tensors.items() if name not in weight_map]
    # A shard of the same numbered series that no entry names: its tensors would be silently left out. (Only that
    # series: other safetensors files, e.g. a plugin or Mistral's consolidated.safetensors, may share the folder.)
    listed = {Path(shard).name for shard in weight_map.values()}
    series = {(m.group(1), m.group(3)) for m in map(SHARD_NAME.match, listed) if m}
    for path in sorted(index.parent.glob("*.safetensors")):
        match = SHARD_NAME.match(path.name)
        if path.name not in listed and match and (match.group(1), match.group(3)) in series:
            problems.append(f"shard {path.name} is in the folder but the index lists none of its tensors")
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise SfnError(f"{index} and its shards disagree: {problems[0]}{more}; the checkpoint is incomplete or "
                       "mixed up, re-download or re-save it.")


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
        _replace_keeping_old_until_done(tmp, out)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(exc):
            raise disk_full_error(out) from None
        raise


def _replace_keeping_old_until_done(new: Path, out: Path) -> None:
    """Put folder `new` at `out`; an existing `out` is moved aside first and deleted only once `new` is in place.

    A failure between the two renames moves the old `out` back, so `out` is always either the old result or the new
    one, never missing.
    """
    if not out.exists() and not out.is_symlink():
        os.replace(new, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".old-{out.name}-", dir=out.parent))
    os.rmdir(old)  # only the unique name is wanted: rename needs a free target
    os.replace(out, old)
    try:
        os.replace(new, out)
    except BaseException:
        os.replace(old, out)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)


# What defines a model besides its weights: architecture, tokenizer, generation defaults, chat template. Everything
# else a folder may hold (trainer_state.json, all_results.json, README.md, an sfn manifest or plugin, optimizer
# files) belongs to the run that wrote it and must not reappear in a new checkpoint built from it. The safetensors
# index is not copied either: the writer produces its own.
MODEL_DEFINING_FILES = frozenset({
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model",
    "chat_template.jinja", "chat_template.json", "preprocessor_config.json", "processor_config.json",
    "tekken.json",  # Mistral's tokenizer
})
MODEL_DEFINING_FOLDERS = frozenset({"additional_chat_templates"})  # transformers 5: named chat template variants


def is_model_defining(name: str) -> bool:
    return name in MODEL_DEFINING_FILES or name.endswith(".tiktoken") or (
        name.startswith("tokenizer") and not name.endswith(".safetensors"))


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copy what makes a folder a checkpoint besides weights (config, tokenizer, generation config, chat templates).

    Only those files (`is_model_defining`): a run's own records in `src` stay there. A file already in `dst` is
    never overwritten. Returns the names copied.
    """
    copied = []
    for item in sorted(src.iterdir()):
        target = dst / item.name
        if target.exists():
            continue
        if item.is_file() and is_model_defining(item.name):
            shutil.copy2(item, target)
        elif item.is_dir() and item.name in MODEL_DEFINING_FOLDERS:
            shutil.copytree(item, target)
        else:
            continue
        copied.append(item.name)
    return copied


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
