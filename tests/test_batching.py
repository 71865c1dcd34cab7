"""How rows are batched when a recipe leaves it unset: the fastest correct choice for the attention kernel, and on
sdpa/eager padded batches of rows of similar length whose order carries no length curriculum. (That padding-free
batches give the padded batches' loss and gradients is measured in tests/test_attention.py.)"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from helpers import train_recipe
from sfn_train.batching import LENGTH_BUCKETS, LengthBucketSampler, length_bucket_order
from sfn_train.startup import resolve_batching


@pytest.fixture(scope="module")
def mixed_rows(tmp_path_factory):
    """Six rows of very different lengths (1 to 12 steps): a padded batch of them is mostly padding."""
    import random

    from sfn_train.lab.problems import random_problem, write_jsonl

    rng = random.Random(0)
    rows = [{"prompt": p.text, "completion": p.trace} for p in (random_problem(rng, n) for n in (1, 12, 2, 7, 1, 4))]
    return write_jsonl(tmp_path_factory.mktemp("mixed") / "rows.jsonl", rows)


def args(**keys):
    base = dict(padding_free=None, train_sampling_strategy="auto", packing=False, packing_strategy="bfd",
                per_device_train_batch_size=8, gradient_accumulation_steps=1, max_length=None, use_cache=True)
    return SimpleNamespace(**{**base, **keys})


def test_unset_batching_keys_become_the_fastest_correct_choice_per_kernel():
    for kernel in ("sdpa", "eager"):  # padding-free correct but slower here: padded batches of similar rows
        a = args()
        decided = resolve_batching(kernel, a)
        assert (a.padding_free, a.train_sampling_strategy) == (False, LENGTH_BUCKETS)
        assert decided["train_sampling_strategy"] == LENGTH_BUCKETS
        assert any("spans all its rows" in r for r in decided["batching_reasons"])
    for kernel in ("flash_attention_2", "kernels-community/flash-attn2"):  # varlen: padding-free, nothing to group
        a = args()
        resolve_batching(kernel, a)
        assert (a.padding_free, a.train_sampling_strategy, a.use_cache) == (True, "random", False)
    a = args(max_length=1024)  # TRL does not truncate padding-free rows: padded similar rows instead
    decided = resolve_batching("flash_attention_2", a)
    assert (a.padding_free, a.train_sampling_strategy) == (False, LENGTH_BUCKETS)
    assert any("max_length is 1024" in r for r in decided["batching_reasons"])
    a = args(per_device_train_batch_size=1)  # one row per batch: nothing to pad or group
    resolve_batching("sdpa", a)
    assert (a.padding_free, a.train_sampling_strategy) == (False, "random")
    a = args(packing=True)  # packed rows: sampling order has no padding to save
    resolve_batching("sdpa", a)
    assert (a.padding_free, a.train_sampling_strategy, a.packing) == (False, "random", True)


def test_explicit_batching_keys_are_kept():
    a = args(padding_free=True, train_sampling_strategy="random")
    assert resolve_batching("sdpa", a)["batching_reasons"] == []
    assert (a.padding_free, a.train_sampling_strategy) == (True, "random")
    a = args(padding_free=False, train_sampling_strategy="group_by_length")
    resolve_batching("flash_attention_2", a)
    assert (a.padding_free, a.train_sampling_strategy) == (False, "group_by_length")


def test_length_buckets_are_homogeneous_batches_in_random_order():
    import random

    import torch

    rng = random.Random(0)
    lengths = [rng.randint(20, 1000) for _ in range(1000)]
    order = length_bucket_order(lengths, 8, torch.Generator().manual_seed(0))
    assert sorted(order) == list(range(1000))  # every row once per epoch
    buckets = [order[i:i + 8] for i in range(0, 1000, 8)]
    # padding: each bucket holds rows adjacent in length (sorted within its mega-batch of 400 rows)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in buckets)
    shuffled = list(range(1000))
    rng.shuffle(shuffled)
    padded_random = sum(8 * max(lengths[i] for i in shuffled[k:k + 8]) for k in range(0, 1000, 8))
    assert padded < 1.05 * sum(lengths) < 0.7 * padded_random
    # no length curriculum: bucket lengths go up about as often as down (transformers' group_by_length: ~never up)
    means = [sum(lengths[i] for i in b) / len(b) for b in buckets]
    ups = sum(b > a for a, b in zip(means, means[1:])) / (len(means) - 1)
    assert 0.3 < ups < 0.7
    assert order == length_bucket_order(lengths, 8, torch.Generator().manual_seed(0))  # seeded: reproducible
    assert order != length_bucket_order(lengths, 8, torch.Generator().manual_seed(1))


@pytest.mark.parametrize("rows, batch_size, mega_batch_mult", [(10, 4, 50), (1003, 8, 50), (37, 4, 2)])
def test_rows_that_do_not_fill_the_last_batch_are_still_trained(rows, batch_size, mega_batch_mult):
    """Row counts that the batch size (or the mega-batch) does not divide: every row comes once per epoch, also those
    of the short buckets (one per mega-batch that the batch size does not divide)."""
    import torch

    lengths = [(13 * i) % 29 + 1 for i in range(rows)]
    order = length_bucket_order(lengths, batch_size, torch.Generator().manual_seed(0), mega_batch_mult)
    assert sorted(order) == list(range(rows))
    megabatch = batch_size * mega_batch_mult
    short = sum(min(megabatch, rows - start) % batch_size for start in range(0, rows, megabatch))
    assert short > 0  # the case under test
    assert sorted(LengthBucketSampler(lengths, batch_size, seed=1)) == list(range(rows))


def test_length_bucket_order_depends_on_seed_and_epoch_only():
    """A resumed run skips the batches already trained by replaying the epoch's order: that order must not depend on
    the global generator, whose state at the epoch's start differs between the original and the resumed process."""
    import torch

    lengths = [(7 * i) % 23 + 1 for i in range(64)]
    first = LengthBucketSampler(lengths, 4, seed=3)
    first.set_epoch(1)
    torch.manual_seed(0)
    original = list(first)
    resumed = LengthBucketSampler(lengths, 4, seed=3)
    resumed.set_epoch(1)
    torch.manual_seed(12345)  # another global state, as in a process that loaded a checkpoint
    torch.rand(10)
    assert list(resumed) == original
    resumed.set_epoch(2)
    assert list(resumed) != original  # each epoch its own order
    assert sorted(original) == list(range(64))


def test_unset_sampling_on_sdpa_trains_from_length_buckets(tmp_path, qwen2_base, mixed_rows):
    """What a default run's trainer really samples: the live sampler, and batches of similar rows."""
    from sfn_train.batching import LengthBucketSampler
    from sfn_train.config import parse_recipe
    from sfn_train.startup import resolve_attention
    from sfn_train.train import build_trainer, freeze, load_model, load_train_dataset, load_train_tokenizer

    script_args, training_args, model_args, sfn_args = parse_recipe(
        ["--config", str(train_recipe(tmp_path, qwen2_base, mixed_rows, per_device_train_batch_size=2))])
    decided = resolve_attention(model_args, training_args)
    assert decided["train_sampling_strategy"] == LENGTH_BUCKETS
    tokenizer = load_train_tokenizer(model_args)
    model = load_model(model_args)
    freeze(model, sfn_args)
    trainer = build_trainer(model, training_args, load_train_dataset(script_args, training_args, sfn_args, tokenizer),
                            tokenizer)
    assert isinstance(trainer._get_train_sampler(), LengthBucketSampler)
    lengths = sorted(len(ids) for ids in trainer.train_dataset["input_ids"])
    pairs = {tuple(lengths[i:i + 2]) for i in range(0, 6, 2)}  # the three buckets: neighbours in length
    for batch in trainer.get_train_dataloader():
        assert tuple(sorted(batch["attention_mask"].sum(1).tolist())) in pairs
