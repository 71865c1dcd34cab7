"""Fixtures: tiny checkpoints built from configs (random weights, local tokenizer) and small datasets. The helpers
the tests share are plain functions in tests/helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def qwen2_base(tmp_path_factory) -> Path:
    from sfn_train.tiny import save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "qwen2", "qwen2", seed=0)


@pytest.fixture(scope="session")
def qwen2_bf16_base(tmp_path_factory) -> Path:
    """The qwen2 fixture's weights stored in bf16, as real bases are."""
    import torch

    from sfn_train.tiny import save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "qwen2-bf16", "qwen2", seed=0, dtype=torch.bfloat16)


@pytest.fixture(scope="session")
def llama_tied_base(tmp_path_factory) -> Path:
    from sfn_train.tiny import save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "llama", "llama", seed=1, tie_word_embeddings=True)


@pytest.fixture(scope="session")
def sum_data(tmp_path_factory) -> Path:
    """32 prompt/completion rows of the lab's reasoning style."""
    from sfn_train.lab.problems import generate, sft_rows, write_jsonl

    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    return write_jsonl(path, sft_rows(generate(32, (2, 3), seed=0), "reasoning"))
