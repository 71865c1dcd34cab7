"""A grading worker process: reads items as JSON lines on stdin, writes results as JSON lines on stdout.

Started by `grading.grade_many` as `python -m sfn_train.evaluation._grade_worker MODULE:FUNCTION`. It imports
math-verify before announcing `{"ready": true}`, so import time never counts against an item's timeout. The grader
runs on this process's main thread, where math-verify's `signal.alarm` timeouts work.
"""

from __future__ import annotations

import json
import sys


def main(grader_spec: str) -> None:
    from sfn_train.evaluation.grading import _load_callable

    grader = _load_callable(grader_spec)
    import math_verify  # noqa: F401

    out = sys.stdout
    sys.stdout = sys.stderr  # a grader that prints must not corrupt the protocol
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        item = json.loads(line)
        try:
            result = grader(item)
        except Exception as exc:  # noqa: BLE001 - any grader failure is "incorrect, with the reason"
            result = {"correct": False, "extracted": None, "reason": f"grader error: {type(exc).__name__}: {exc}"[:300]}
        out.write(json.dumps(result, ensure_ascii=False) + "\n")
        out.flush()


if __name__ == "__main__":
    main(sys.argv[1])
