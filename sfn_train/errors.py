"""One exception type for every mistake a user can fix.

The CLI turns an `SfnError` into one line on stderr and exit code 2 (a traceback only with `--debug`), so every
message must name the thing that is wrong and say how to fix it.
"""


class SfnError(Exception):
    """A user-facing error: bad recipe, bad selection, bad checkpoint, bad data."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its repr when it has none), cut to `limit` characters: what a
    one-line error quotes from a library's multi-line message."""
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else repr(exc))[:limit]


# Disk full -------------------------------------------------------------------------------------------------------------
# Python raises OSError(ENOSPC); the safetensors writer (Rust) raises SafetensorError with the OS error in its text.
_DISK_FULL_TEXT = ("No space left on device", "os error 28", "code: 28,", "Disk quota exceeded", "os error 122")


# torch.save's C++ zip writer reports a short write without the OS error ("unexpected pos 576 vs 534").
_TORCH_WRITE_TEXT = ("inline_container.cc", "PytorchStreamWriter failed writing")
_NEARLY_FULL = 64 << 20


def is_disk_full(exc: BaseException | None, path=None) -> bool:
    """Whether `exc` (or an exception it was raised from) means the disk or the quota is full.

    With `path`, a failed torch.save (whose error names no cause) counts too when that path's disk has under 64 MB
    free.
    """
    import errno
    import shutil

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(exc)
        if any(t in text for t in _DISK_FULL_TEXT):
            return True
        if path is not None and any(t in text for t in _TORCH_WRITE_TEXT):
            try:
                return shutil.disk_usage(path).free < _NEARLY_FULL
            except OSError:
                return False
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)  # `from None` ends it
    return False


def disk_full_error(path, left: str = "nothing that looks complete was left there") -> SfnError:
    """One line naming the full disk (by the path being written and its free space) and what to do."""
    import shutil
    from pathlib import Path

    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = f"{shutil.disk_usage(probe).free / 1e9:.2f} GB free"
    except OSError:
        free = "free space unknown"
    return SfnError(f"no space left on the disk holding {path} ({free}) while writing it: free space there or "
                    f"choose an output path on another disk; {left}.")
