"""Attention kernel choice and padding-free batches: decided before loading, and only where they are correct."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from helpers import changed_tensors, one_line_error, train_recipe
from sfn_train import startup
from sfn_train.cli import main
from sfn_train.config import parse_recipe
from sfn_train.errors import SfnError

O_PROJ = {f"model.layers.{i}.self_attn.o_proj.weight" for i in range(4)}


# --- padding-free batches: the same loss and gradients as the same rows padded ---------------------------------------
def rows_of_different_lengths():
    g = torch.Generator().manual_seed(1)
    rows = []
    for length in (5, 17, 9, 30):
        ids = torch.randint(3, 320, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100, -100] + ids[2:]})  # a 2-token prompt, masked
    return rows


def loss_and_grads(model, rows, padding_free: bool, use_cache: bool = False):
    """What SFTTrainer computes on one batch: TRL's collator, the model's loss; plus per-row losses and gradients."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model.zero_grad()
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=padding_free)(rows)
    out = model(**batch, use_cache=use_cache)
    out.loss.backward()
    logits, labels = out.logits.float(), batch["labels"]
    if padding_free:  # one row of concatenated sequences; each starts where position_ids restart at 0
        starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [labels.shape[1]]
        pieces = [(logits[0, a:b - 1], labels[0, a + 1:b]) for a, b in zip(starts[:-1], starts[1:])]
    else:
        pieces = [(logits[i, :-1], labels[i, 1:]) for i in range(len(rows))]
    per_row = torch.stack([torch.nn.functional.cross_entropy(x, y, ignore_index=-100) for x, y in pieces])
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return out.loss.detach(), per_row.detach(), grads


@pytest.mark.parametrize("kernel", startup.PADDING_FREE_VERIFIED)
def test_padding_free_batch_equals_the_padded_batch(kernel):
    """The guard's evidence: on each kernel it allows, a padding-free batch (rows concatenated, position_ids restarting,
    no attention mask) gives the padded batch's per-row losses, whole-batch loss and gradients to float tolerance."""
    from sfn_train.tiny import tiny_model

    model = tiny_model("qwen2")
    model.set_attn_implementation(kernel)
    assert model.config._attn_implementation == kernel
    rows = rows_of_different_lengths()
    loss_pad, rows_pad, grads_pad = loss_and_grads(model, rows, padding_free=False)
    loss_free, rows_free, grads_free = loss_and_grads(model, rows, padding_free=True)
    torch.testing.assert_close(rows_free, rows_pad, rtol=0, atol=1e-6)
    torch.testing.assert_close(loss_free, loss_pad, rtol=0, atol=1e-6)
    for name in grads_pad:
        torch.testing.assert_close(grads_free[name], grads_pad[name], rtol=1e-5, atol=1e-7, msg=name)

    # ... and the check can fail: with a cache, transformers skips the block-diagonal mask and the rows mix
    _, rows_mixed, _ = loss_and_grads(model, rows, padding_free=True, use_cache=True)
    assert (rows_mixed - rows_pad).abs().max() > 1e-3


def test_padding_free_training_on_sdpa(tmp_path, qwen2_base, sum_data, caplog):
    caplog.set_level(logging.INFO, logger="sfn_train")
    recipe = train_recipe(tmp_path, qwen2_base, sum_data, attn_implementation="sdpa", padding_free=True,
                          max_length=None, use_cache=True)
    assert main(["train", "--config", str(recipe)]) == 0
    manifest = json.loads((tmp_path / "out" / "sfn_manifest.json").read_text())
    attention = manifest["attention"]
    assert attention["used"] == "sdpa" and attention["padding_free"] is True
    assert "block-diagonal causal mask" in attention["padding_free_reason"]
    # the Trainer sets model.config.use_cache from this; with a cache the rows would mix (see the test above)
    assert manifest["recipe"]["training"]["use_cache"] is False and "use_cache switched off" in caplog.text
    assert changed_tensors(qwen2_base, tmp_path / "out")[0] == O_PROJ


# --- the kernel decision, before loading -----------------------------------------------------------------------------
def args_for(tmp_path, base, data, **keys):
    script_args, training_args, model_args, sfn_args = parse_recipe(
        ["--config", str(train_recipe(tmp_path, base, data, **keys))])
    return model_args, training_args


@pytest.fixture
def gpu(monkeypatch):
    """Pretend to be a process with a GPU of a given compute capability whose flash kernels load (or fail)."""
    loaded = []

    def set_gpu(capability=(9, 0), load_error: Exception | None = None):
        monkeypatch.setattr(startup, "_cuda_capability", lambda: capability)

        def load(name):
            if load_error is not None:
                raise load_error
            loaded.append(name)

        monkeypatch.setattr(startup, "_load_flash_kernel", load)
        return loaded

    return set_gpu


@pytest.mark.parametrize("name", ["flash_attention_2", "flash_attention_3", "flash_attention_4",
                                  "kernels-community/flash-attn2", "kernels-community/vllm-flash-attn3@v1"])
def test_usable_flash_kernels_are_kept_with_padding_free(tmp_path, qwen2_base, sum_data, gpu, name):
    loaded = gpu((9, 0))
    model_args, training_args = args_for(tmp_path, qwen2_base, sum_data, attn_implementation=name, dtype="bfloat16",
                                         padding_free=True, max_length=None)
    decision = startup.resolve_attention(model_args, training_args)
    assert loaded == [name]  # decided by loading the kernel, as from_pretrained will
    assert decision["used"] == name and decision["flash"] and decision["fallback_reason"] is None
    assert training_args.padding_free and model_args.attn_implementation == name


@pytest.mark.parametrize("name,capability,load_error,reason", [
    ("flash_attention_2", (7, 5), None, "compute capability 8.0 or newer and this one is 7.5"),
    ("flash_attention_4", (8, 0), None, "compute capability 9.0 or newer and this one is 8.0"),
    ("flash_attention_2", (9, 0), ImportError("flash_attn_2_cuda.so: undefined symbol: _ZN3c10"), "undefined symbol"),
    ("kernels-community/flash-attn2", (9, 0), OSError("offline and not in the cache"), "not in the cache"),
    ("flash_attention_2", None, None, "needs a CUDA GPU"),
])
def test_unusable_flash_kernels_fall_back_to_sdpa_with_the_reason(tmp_path, qwen2_base, sum_data, gpu, caplog,
                                                                  name, capability, load_error, reason):
    caplog.set_level(logging.WARNING, logger="sfn_train")
    gpu(capability, load_error)
    model_args, training_args = args_for(tmp_path, qwen2_base, sum_data, attn_implementation=name, dtype="bfloat16")
    decision = startup.resolve_attention(model_args, training_args)
    assert decision["used"] == "sdpa" == model_args.attn_implementation and not decision["flash"]
    assert reason in decision["fallback_reason"] and reason in caplog.text and "falling back to sdpa" in caplog.text


def test_flash_with_fp32_weights_needs_mixed_precision(tmp_path, qwen2_base, sum_data, gpu):
    gpu((9, 0))
    for dtype in ("float32", "auto"):  # auto: the fixture's config.json says float32
        model_args, training_args = args_for(tmp_path, qwen2_base, sum_data, attn_implementation="flash_attention_2",
                                             dtype=dtype, bf16=False)
        with pytest.raises(SfnError, match="computes in fp16/bf16 only, but the weights load in float32"):
            startup.resolve_attention(model_args, training_args)
    model_args, training_args = args_for(tmp_path, qwen2_base, sum_data, attn_implementation="flash_attention_2",
                                         dtype="float32", bf16=True)
    assert startup.resolve_attention(model_args, training_args)["used"] == "flash_attention_2"


def test_padding_free_is_off_where_not_verified(tmp_path, qwen2_base, sum_data, caplog):
    caplog.set_level(logging.WARNING, logger="sfn_train")
    model_args, training_args = args_for(tmp_path, qwen2_base, sum_data, attn_implementation="flex_attention",
                                         padding_free=True, max_length=None)
    decision = startup.resolve_attention(model_args, training_args)
    assert decision["padding_free"] is False and "not verified on flex_attention" in decision["padding_free_reason"]
    model_args, training_args = args_for(tmp_path, qwen2_base, sum_data, attn_implementation="flex_attention",
                                         packing=True, packing_strategy="bfd")
    assert startup.resolve_attention(model_args, training_args)["packing"] is False
    assert "packing with strategy bfd switched off" in caplog.text
    model_args, training_args = args_for(tmp_path, qwen2_base, sum_data, attn_implementation="sdpa",
                                         packing=True, packing_strategy="bfd")
    assert startup.resolve_attention(model_args, training_args)["packing"] is True


def test_padding_free_without_packing_and_with_max_length_is_refused_before_loading(tmp_path, capsys, qwen2_base,
                                                                                    sum_data):
    recipe = train_recipe(tmp_path, qwen2_base, sum_data, padding_free=True, max_length=512)
    assert main(["train", "--config", str(recipe)]) == 2
    line = one_line_error(capsys)
    assert "padding_free: true without packing" in line and "max_length: null" in line
    assert not (tmp_path / "out").exists()
