"""The callbacks every training run carries (TRL keeps its own in `trl/trainer/callbacks.py`).

- `PrecisionProbe` reads the dtypes in effect once training begins (after DeepSpeed has cast the model).
- `EngineCheck` reads the engine in effect from the live model at the start of training, refuses one that is not the
  engine asked for, and counts the steps this process ran (a resumed run starts at the checkpoint's step).

Both end in the manifest (`record`). Imported by the training entry points only, after sfn_train/lean_imports.py.
"""

from __future__ import annotations

import logging

from transformers import TrainerCallback

from .engine import EngineRequest, engine_in_effect, mismatch
from .errors import SfnError
from .precision import precision_record

logger = logging.getLogger("sfn_train")


class PrecisionProbe(TrainerCallback):
    """The dtypes of the trained and frozen tensors, the optimizer's and the mixed precision, read at train begin."""

    def __init__(self, model, trainable, masters, training_args):
        self.model, self.trainable, self.masters, self.training_args = model, trainable, masters, training_args
        self.record: dict | None = None

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self.record = precision_record(self.model, self.trainable, self.masters, self.training_args, optimizer)
        logger.info("precision in effect: trained %s, frozen %s, optimizer %s, mixed precision %s",
                    self.record["trainable_dtypes"], self.record["frozen_dtypes"],
                    self.record["optimizer_param_dtypes"], self.record["mixed_precision"] or "off")


class EngineCheck(TrainerCallback):
    """At the start of training: read the engine in effect, refuse a mismatch with `request`; then count steps."""

    def __init__(self, trainer, request: EngineRequest):
        self.trainer, self.request = trainer, request
        self.found: dict | None = None
        self.start_step = 0
        self.steps_run = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.found = engine_in_effect(self.trainer)
        self.start_step = state.global_step
        problem = mismatch(self.request, self.found)
        if problem:
            raise SfnError(f"{problem}: stopped before the first step. Use the engine named, or remove it from the "
                           "recipe/launcher to train as it would.")
        detail = ""
        if "sharded_dtensor_params" in self.found:
            detail = f", {self.found['sharded_dtensor_params']} of {self.found['parameter_tensors']} parameter " \
                     "tensors sharded as DTensors"
        elif "partitioned_params" in self.found:
            detail = f", {self.found['partitioned_params']} of {self.found['parameter_tensors']} parameter " \
                     "tensors partitioned"
        logger.info("engine in effect: %s on %d process(es)%s.", self.found["engine"], self.found["processes"], detail)

    def on_step_end(self, args, state, control, **kwargs):
        self.steps_run += 1

    def record(self) -> dict:
        return {"requested": self.request.to_dict(), "in_effect": self.found,
                "steps": {"resumed_at": self.start_step, "run_in_this_process": self.steps_run}}
