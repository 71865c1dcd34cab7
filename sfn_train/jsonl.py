"""Reading JSONL files with one-line errors that name the file, the line and the reason."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import SfnError


def iter_jsonl(path: str | os.PathLike, required: tuple[str, ...] = (), what: str = "file",
               expected: str = "a JSONL file"):
    """(line number, row) for each non-blank line of a JSONL file, with one-line errors naming the file and line
    of a row that is not one JSON object holding the `required` fields. Shared by datasets, task files and
    `sfn grade` input."""
    path = Path(path)
    if not path.is_file():
        raise SfnError(f"{what} {path} does not exist; pass {expected}.")
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SfnError(f"{what} {path}:{lineno} is not valid JSON ({exc.msg} at column {exc.colno}); write "
                               "one JSON object a line.") from None
            if not isinstance(row, dict):
                raise SfnError(f"{what} {path}:{lineno} is a JSON {type(row).__name__}, not an object; write one "
                               "JSON object a line.")
            if any(k not in row for k in required):
                raise SfnError(f"{what} {path}:{lineno} needs the fields {' and '.join(repr(k) for k in required)}.")
            yield lineno, row
