"""The real step's peak memory on this CPU, measured without the planner: the CPU allocator's running total during
the step (torch.profiler `profile_memory`, its "Total Allocated" counter) plus the bytes live when the step starts.

Used to validate `sfn memory` (tests/test_memory.py): `allocator_peak` around a step, and `StepPeak`, a Trainer
callback that measures one optimizer step of a real `sfn train` run.
"""

from __future__ import annotations

import contextlib
import gc
import json
import tempfile


def live_bytes(*groups, by_dtype: dict | None = None) -> int:
    """Bytes of the distinct CPU storages behind the tensors in `groups` (views and shared storages counted once);
    `by_dtype` (a dict) also gets the bytes per tensor dtype."""
    import torch

    seen, total = set(), 0
    for group in groups:
        for t in group:
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            try:
                storage = t.untyped_storage()
                pointer = storage.data_ptr()
            except (RuntimeError, NotImplementedError):  # wrapper subclasses (DTensor): their local tensor counts
                continue
            if pointer and pointer not in seen:
                seen.add(pointer)
                total += storage.nbytes()
                if by_dtype is not None:
                    key = str(t.dtype).replace("torch.", "")
                    by_dtype[key] = by_dtype.get(key, 0) + storage.nbytes()
    return total


def all_live_tensor_bytes(by_dtype: dict | None = None) -> int:
    """Bytes of every CPU tensor the Python heap holds right now (the model, the optimizer, the batch, the engine's
    buffers: whatever the Trainer keeps, whether or not the planner models it)."""
    import torch

    gc.collect()
    return live_bytes((o for o in gc.get_objects() if isinstance(o, torch.Tensor)), by_dtype=by_dtype)


@contextlib.contextmanager
def allocator_peak(found: dict):
    """Sets found["during"]: the highest number of bytes the CPU allocator held above its level at entry. The
    profiler's counter is process-wide and not reset between profiles, so the level at the first event is the base."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        yield
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        with open(f.name) as handle:
            events = [e["args"] for e in json.load(handle)["traceEvents"] if e.get("name") == "[memory]"]
    if not events:
        found["during"] = 0
        return
    base = events[0]["Total Allocated"] - events[0]["Bytes"]
    found["during"] = max(0, max(e["Total Allocated"] for e in events) - base)


def step_peak_callback(step: int = 1):
    """A TrainerCallback measuring optimizer step `step` (0-based; 1 = the second, with the optimizer state there):
    `.result` = {"before": bytes live at its start, "during": the allocator's peak above that, "peak": the sum}."""
    from transformers import TrainerCallback

    class StepPeak(TrainerCallback):
        def __init__(self):
            self.result, self._profile = {}, None

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == step and self._profile is None:
                self.result["before_by_dtype"] = {}
                self.result["before"] = all_live_tensor_bytes(self.result["before_by_dtype"])
                self._profile = allocator_peak(self.result)
                self._profile.__enter__()

        def on_step_end(self, args, state, control, **kw):
            if self._profile is not None and "peak" not in self.result:
                self._profile.__exit__(None, None, None)
                self.result["peak"] = self.result["before"] + self.result["during"]
                self.result["step"] = step

    return StepPeak()
