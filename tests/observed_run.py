"""`sfn train` exactly as train/sft.py runs it, plus an observer that writes, per rank, what the live model, its
gradients and the optimizer hold during training (`$SFN_OBSERVE_DIR/rank<R>.json`). Used by the engine tests:

    torchrun ... tests/observed_run.py --config RECIPE.yaml [--key value ...]
    python tests/observed_run.py --drop-fsdp --config RECIPE.yaml    # FSDP dropped, as accelerate alone does on CPU

The observer looks at the objects directly (DTensor shards, ZeRO-3 partitions, `.grad`, optimizer state), so the
tests do not rely on what sfn-train reports about itself.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def observer(out: Path):
    import torch
    from torch.distributed.tensor import DTensor
    from transformers import TrainerCallback

    def local_numel(p) -> int:
        if isinstance(p, DTensor):
            return p.to_local().numel()
        if hasattr(p, "ds_tensor"):  # ZeRO-3: this rank's partition
            return p.ds_tensor.numel()
        return p.numel()

    def full_numel(p) -> int:
        return int(getattr(p, "ds_numel", 0) or p.numel())

    class Observer(TrainerCallback):
        record: dict = {"steps": 0}

        def on_train_begin(self, args, state, control, model=None, **kw):
            self.record["params"] = {
                name: {"dtensor": isinstance(p, DTensor), "zero3_partitioned": hasattr(p, "ds_tensor"),
                       "local_numel": local_numel(p), "numel": full_numel(p), "requires_grad": p.requires_grad,
                       "dtype": str(p.dtype).replace("torch.", "")}
                for name, p in model.named_parameters()}
            self.record["model_class"] = type(model).__name__
            self.record["start_step"] = state.global_step

        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            if "grads" not in self.record:  # after the first backward: which tensors hold a gradient, and how much
                grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
                self.record["grads"] = {n: (g.to_local() if isinstance(g, DTensor) else g).numel()
                                        for n, g in grads.items()}

        def on_step_end(self, args, state, control, model=None, optimizer=None, **kw):
            self.record["steps"] += 1
            if "optimizer" in self.record or optimizer is None or not hasattr(optimizer, "param_groups"):
                return
            inner = getattr(optimizer, "optimizer", optimizer)
            names = {id(p): n for n, p in model.named_parameters()}
            params = [p for group in inner.param_groups for p in group["params"]]
            self.record["optimizer"] = {
                "params": sorted(names.get(id(p), "?") for p in params),
                "state": {names.get(id(p), "?"): sum(t.to_local().numel() if isinstance(t, DTensor) else t.numel()
                                                      for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
                          for p, s in inner.state.items()},
            }

        def on_train_end(self, args, state, control, **kw):
            rank = int(os.environ.get("RANK", "0"))
            out.mkdir(parents=True, exist_ok=True)
            (out / f"rank{rank}.json").write_text(json.dumps(self.record, indent=1))

    return Observer()


def main() -> int:
    argv = sys.argv[1:]
    import sfn_train.engine as engine
    import sfn_train.train as train
    from sfn_train.cli import main as sfn_main

    if "--drop-fsdp" in argv:
        argv.remove("--drop-fsdp")
        engine.enable_fsdp2_on_cpu = lambda trainer: False  # what accelerate 1.15 does with FSDP on CPU by itself
    if os.environ.get("SFN_OBSERVE_DIR"):
        run_sft = train.run_sft
        train.run_sft = lambda *args, callbacks=None: run_sft(*args, callbacks=[observer(Path(
            os.environ["SFN_OBSERVE_DIR"]))])
    return sfn_main(["train", *argv])


if __name__ == "__main__":
    sys.exit(main())
