"""Padded batches of rows of similar length, in random order: less padding without a length curriculum.

transformers' `group_by_length` (LengthGroupedSampler) splits a random permutation into mega-batches of up to 50
batches (fewer on a small data set: a quarter of it at most) and sorts each mega-batch by length, longest first: a
run of steps then goes from the longest rows to the shortest, every epoch, which is a length curriculum nobody asked
for. `LengthBucketSampler` sorts mega-batches of 50 batches into length-homogeneous batches and then shuffles the
batches, so no run of steps is ordered by length. Whether a fine-tune learns as well from them as from random
batches is measured on the lab (bench/batch_composition.py, docs/benchmarks.md).

The sampler yields row indices (the DataLoader cuts them into batches of `batch_size`); every chunk of `batch_size`
consecutive indices is one bucket. Its order comes from a generator seeded with `seed + epoch` (as accelerate's
SeedableRandomSampler does for random batches), not from torch's global generator: a resumed run, whose global
generator state at the start of the epoch differs from the original run's, must see the same order to skip the batches
already trained; and every rank of a distributed run sees the same order.
"""

from __future__ import annotations

LENGTH_BUCKETS = "length_buckets"  # the train_sampling_strategy value sfn resolves to (not a transformers value)


def length_bucket_order(lengths: list[int], batch_size: int, generator=None, mega_batch_mult: int = 50) -> list[int]:
    """Indices whose consecutive chunks of `batch_size` are rows of similar length; the chunks in random order."""
    import torch

    n = len(lengths)
    permutation = torch.randperm(n, generator=generator).tolist()
    megabatch = max(1, mega_batch_mult) * batch_size
    full, partial = [], []
    for start in range(0, n, megabatch):
        rows = sorted(permutation[start:start + megabatch], key=lambda i: lengths[i])
        for b in range(0, len(rows), batch_size):
            (full if len(rows[b:b + batch_size]) == batch_size else partial).append(rows[b:b + batch_size])
    order = torch.randperm(len(full), generator=generator).tolist()
    # a short bucket (at most one per mega-batch) goes last, so that it never shifts the later buckets' boundaries
    return [i for k in order for i in full[k]] + [i for bucket in partial for i in bucket]


class LengthBucketSampler:
    """A torch Sampler over `lengths` yielding `length_bucket_order` afresh at every epoch, from `seed + epoch`.

    `current_epoch` (a callable) gives the epoch when the sampler is iterated; the Trainer passes its own state's. Its
    `set_epoch` calls do not reach a sampler under a distributed batch sampler once batches are skipped on resume
    (accelerate wraps it twice), so the sampler does not rely on them.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int = 0, current_epoch=None):
        self.lengths, self.batch_size, self.seed, self.epoch = list(lengths), batch_size, seed, 0
        self.current_epoch = current_epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        import torch

        epoch = self.current_epoch() if self.current_epoch is not None else self.epoch
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = length_bucket_order(self.lengths, self.batch_size, generator)
        self.epoch = epoch + 1  # the next epoch's order differs even where nobody calls set_epoch
        return iter(order)
