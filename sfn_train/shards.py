"""Streaming safetensors I/O: read one tensor in small pieces, write shards tensor by tensor.

Shared by the gadgets and by applying a plugin (`sfn_train.plugin`), which the trainer also does for a quantized run.

Why not `safetensors.torch.save_file`? It needs every tensor of a shard in memory at once, and it re-encodes bytes
that the gadgets mostly want to copy untouched. Here a shard is written header first (names, dtypes and shapes are
known before any byte is read), then tensor by tensor: an untouched tensor is copied byte for byte from its source
file by the kernel (`os.copy_file_range`), a changed one is computed in float32 pieces of `CHUNK` elements and cast
back to its stored dtype. Peak memory is a few pieces, whatever the model size, and untouched tensors are bitwise
identical by construction.

Pieces of 2**20 elements (4 MB in float32) keep the arithmetic in cache: several passes over a piece are ~10x faster
than the same passes over a whole large tensor.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import INDEX_FILE, Checkpoint, TensorInfo
from .errors import SfnError

CHUNK = 1 << 20

TORCH_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
# Dtypes the gadgets compute on (fp8 and integers are only ever copied).
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


def torch_dtype(info: TensorInfo) -> torch.dtype:
    try:
        return TORCH_DTYPES[info.dtype]
    except KeyError:
        raise SfnError(f"tensor {info.name} has dtype {info.dtype}, which the gadgets cannot read; convert the checkpoint.") from None


def numel(info: TensorInfo) -> int:
    return numel_of(info.shape)


def iter_chunks(info: TensorInfo, chunk: int = CHUNK) -> Iterator[torch.Tensor]:
    """The tensor's elements, flat, in pieces of at most `chunk` elements, as float32.

    The yielded tensor is a reused buffer: use it (in place if you like) or copy it before asking for the next piece.
    Reading with plain file reads into buffers allocated once keeps resident memory at one piece however large the
    tensor, charges no page-cache pages to this process, and avoids the page faults of a fresh 4 MB allocation per
    piece (those made delta 3x slower).
    """
    dtype = torch_dtype(info)
    item = torch.empty((), dtype=dtype).element_size()
    size = min(chunk, max(numel(info), 1))
    raw = torch.empty(size * item, dtype=torch.uint8)
    out = None if dtype == torch.float32 else torch.empty(size, dtype=torch.float32)
    with open(info.file, "rb", buffering=0) as f:
        f.seek(info.start)
        left = info.nbytes
        while left:
            n = min(left, raw.numel())
            view = raw[:n]
            got = f.readinto(view.numpy())
            if got != n:
                raise SfnError(f"{info.file} ended early while reading {info.name}; the file is truncated, re-download it.")
            left -= n
            values = view.view(dtype)
            if out is None:
                yield values
            else:
                piece = out[: values.numel()]
                piece.copy_(values)
                yield piece


@contextlib.contextmanager
def torch_threads(n: int):
    """Torch intra-op threads set to `n` in this thread for the block, restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def one_thread(func):
    """Run `func` with one torch intra-op thread.

    The gadgets work on cache-sized pieces where extra threads gain little, and on a shared machine OpenMP threads
    spin-waiting for a busy core made delta 40x slower (0.5 s -> 22 s on a 1 GB pair next to a training job).
    """

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        with torch_threads(1):
            return func(*args, **kwargs)

    return wrapper


# --------------------------------------------------------------------------------------------------------------------
# Writing


@dataclass
class Entry:
    """One tensor of the output: its name there, its dtype and shape, and where its bytes come from.

    `source` alone: copy those bytes verbatim (possibly from another checkpoint or a plugin file).
    `compute`: a function yielding float32 pieces (flat, in order) that are cast to `dtype` and written.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    source: TensorInfo
    compute: Callable[[], Iterator[torch.Tensor]] | None = None

    @property
    def nbytes(self) -> int:
        return numel_of(self.shape) * torch.empty((), dtype=TORCH_DTYPES[self.dtype]).element_size()


def numel_of(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


@dataclass
class Shard:
    file: str
    entries: list[Entry] = field(default_factory=list)
    metadata: dict | None = None


def _copy_range(src: Path, start: int, nbytes: int, dst) -> None:
    """Copy bytes [start, start+nbytes) of `src` to the current position of raw file `dst`, in the kernel if it can."""
    with open(src, "rb", buffering=0) as f:
        left, offset = nbytes, start
        if hasattr(os, "copy_file_range"):
            try:
                while left:
                    n = os.copy_file_range(f.fileno(), dst.fileno(), min(left, 1 << 30), offset)
                    if n == 0:
                        raise SfnError(f"{src} ended early; the file is truncated, re-download it.")
                    left -= n
                    offset += n
                return
            except OSError:  # another filesystem or an old kernel: fall back to read/write
                pass
        f.seek(offset)
        while left:
            block = f.read(min(left, 1 << 24))
            if not block:
                raise SfnError(f"{src} ended early; the file is truncated, re-download it.")
            dst.write(block)
            left -= len(block)


def write_shard(path: Path, shard: Shard, progress=None) -> int:
    """Write one safetensors file (header, then each entry's bytes in order); return its data size."""
    header: dict = {}
    if shard.metadata:
        header["__metadata__"] = shard.metadata
    offset = 0
    for e in shard.entries:
        header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format pads the header so tensor data starts 8-byte aligned
    with open(path, "wb", buffering=0) as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for e in shard.entries:
            if e.compute is None:
                _copy_range(e.source.file, e.source.start, e.source.nbytes, f)
            else:
                dtype, written = TORCH_DTYPES[e.dtype], 0
                cast = None if dtype == torch.float32 else torch.empty(CHUNK, dtype=dtype)
                for piece in e.compute():
                    if cast is not None:
                        piece = cast[: piece.numel()].copy_(piece)
                    data = piece.contiguous().view(torch.uint8).numpy()
                    f.write(data)
                    written += data.nbytes
                if written != e.nbytes:
                    raise RuntimeError(f"internal error: computed {written} bytes for {e.name}, expected {e.nbytes}")
            if progress is not None:
                progress.update(e.nbytes)
    return offset


def layout_like(base: Checkpoint, entries: dict[str, Entry | None]) -> list[Shard]:
    """Shards with the file names and tensor order of `base`; `entries[name]` is None to drop a tensor."""
    from .checkpoint import read_header

    shards = []
    for file, infos in base.iter_by_file():
        metadata = read_header(file)[0].get("__metadata__") or {"format": "pt"}
        kept = [entries[t.name] for t in sorted(infos, key=lambda t: t.start) if entries.get(t.name) is not None]
        if kept:
            shards.append(Shard(file.name, kept, metadata))
    return shards


def write_checkpoint(shards: list[Shard], out: Path, desc: str) -> dict:
    """Write every shard into `out` plus `model.safetensors.index.json`; return the index."""
    from tqdm.auto import tqdm

    total = sum(e.nbytes for s in shards for e in s.entries)
    weight_map: dict[str, str] = {}
    with tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=None) as bar:
        for shard in shards:
            write_shard(out / shard.file, shard, bar)
            weight_map.update({e.name: shard.file for e in shard.entries})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return index
