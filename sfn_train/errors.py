"""One exception type for every mistake a user can fix.

The CLI turns an `SfnError` into one line on stderr and exit code 2 (a traceback only with `--debug`), so every
message must name the thing that is wrong and say how to fix it.
"""


class SfnError(Exception):
    """A user-facing error: bad recipe, bad selection, bad checkpoint, bad data."""
