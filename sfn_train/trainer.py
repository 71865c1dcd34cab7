"""The trainer: TRL's SFTTrainer, with FSDP2 on CPU kept and batches of rows of similar length when asked for.

One class, as TRL has one per method (`trl/trainer/sft_trainer.py`). What it adds to SFTTrainer:

- FSDP2 on CPU: accelerate drops an FSDP request on a gloo (CPU) process group; `SfnTrainer` switches the state to
  FSDP after the accelerator is built, so CPU runs and tests take the path GPU runs take (sfn_train/engine.py).
- Length buckets: when `train_sampling_strategy` resolved to LENGTH_BUCKETS, the training sampler is a
  `LengthBucketSampler` (sfn_train/batching.py) instead of the Trainer's random one.
- Checkpoints that hold only what changed (`PartialCheckpointsMixin`, sfn_train/partial_checkpoints.py): with
  `sfn_partial` set, checkpoint-N holds the trained tensors and the training state, not the frozen weights.

Training is imported lazily by the entry points (sfn_train/lean_imports.py), so this module imports TRL at the top.
"""

from __future__ import annotations

import math

from trl import SFTTrainer

from .batching import LENGTH_BUCKETS, LengthBucketSampler
from . import engine
from .partial_checkpoints import PartialCheckpointsMixin


class SfnTrainer(PartialCheckpointsMixin, SFTTrainer):
    """TRL's SFTTrainer, taking FSDP2 on CPU instead of dropping it, and sampling length buckets on request."""

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        engine.enable_fsdp2_on_cpu(self)  # looked up at call time: tests/observed_run.py --drop-fsdp replaces it

    def _get_train_sampler(self, train_dataset=None):
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if self.args.train_sampling_strategy != LENGTH_BUCKETS:
            return super()._get_train_sampler(train_dataset)
        lengths = [len(ids) for ids in dataset["input_ids"]]
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        # the epoch being started: state.epoch is k exactly at the end of epoch k-1, and within epoch k (from the
        # checkpoint's trainer_state) when a run resumes there
        return LengthBucketSampler(lengths, self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                   seed, current_epoch=lambda: math.floor(self.state.epoch or 0))
