"""One training step under `FakeTensorMode`: every tensor has a shape, dtype and device but no memory, and a
dispatch-mode tracker counts the bytes of every live storage as the step runs.

What runs is what `sfn train` runs on one process: the model class built from config.json alone, the project's own
selection (`roles.select_parameters`, `roles.apply_freeze`), its precision rule (`precision.keep_fp32_masters`),
bitsandbytes storage for `quantize_frozen` (a stand-in layer of the same byte size that dequantizes a transient weight in
forward and backward, as bitsandbytes does), non-reentrant activation checkpointing, TRL's fused LM head
(`trl.trainer.utils.add_fused_lm_head`, with the outputs SFTTrainer asks for) and its loss, gradient clipping and the
Trainer's optimizer class with its arguments. The optimizer state is created before the measured step (steady state:
step 2 onwards), and with gradient accumulation the gradients exist for the whole step (its second micro-batch).

The tracker's series (bytes per category at every allocation) is what `engines.py` turns into a per-rank peak.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field

CATEGORIES = ("frozen_weights", "trained_weights", "gradients", "optimizer_state", "activations", "loss_logits",
              "optimizer_step")


@dataclass
class StepSpec:
    """Everything the simulated step depends on (filled from the recipe by `plan.spec_from_recipe`)."""

    config: object  # a transformers PretrainedConfig
    trainable_modules: list
    trainable_layers: list
    dtype: str = "bfloat16"  # the weights as loaded
    engine: str = "plain"  # plain (one process / DDP), deepspeed, fsdp: who owns the trained tensors' precision
    quantize_frozen: str = "none"
    checkpointing: bool = True
    batch: int = 1
    max_length: int = 1024
    padding_free: bool = False
    kernel: str = "sdpa"  # the attention kernel `sfn train` would use (flash kernels are simulated as sdpa, fused)
    optimizer_cls: object = None
    optimizer_kwargs: dict = field(default_factory=dict)
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    autocast: str | None = None  # "bfloat16"/"float16" when the Trainer runs the forward under autocast
    device: str = "cuda"  # the device being planned for: cuda rounds every block to 512 bytes (caching allocator)


@dataclass
class StepTrace:
    series: list  # [(category totals tuple at an allocation), ...]
    peak: int
    peak_index: int
    largest_transient: dict
    params: dict  # summary of the model's parameters (counts and bytes per kind) for engines.py
    seconds: float = 0.0


class _Tracker:
    """Counts live storages by category; a weakref callback takes a storage off when it is freed."""

    def __init__(self, round_to: int):
        self.round_to = round_to
        self.live: dict[int, tuple] = {}  # id(storage) -> (weakref, bytes, category)
        self.totals = dict.fromkeys(CATEGORIES, 0)
        self.phase = "activations"
        self.series: list[tuple] = []
        self.largest = {"bytes": 0, "op": None, "phase": None}

    def size(self, storage) -> int:
        n = storage.nbytes()
        return -(-n // self.round_to) * self.round_to if self.round_to > 1 and n else n

    def add(self, storage, category: str, op=None) -> None:
        key = id(storage)
        if key in self.live:
            return
        nbytes = self.size(storage)
        ref = weakref.ref(storage, lambda _r, k=key: self._free(k))
        self.live[key] = (ref, nbytes, category)
        self.totals[category] += nbytes
        if op is not None:
            self.series.append(tuple(self.totals[c] for c in CATEGORIES))
            if category in ("activations", "loss_logits", "optimizer_step") and nbytes > self.largest["bytes"]:
                self.largest = {"bytes": nbytes, "op": str(op), "phase": category}

    def move(self, storage, category: str) -> None:
        entry = self.live.get(id(storage))
        if entry is None:
            self.add(storage, category)
            return
        ref, nbytes, old = entry
        self.totals[old] -= nbytes
        self.totals[category] += nbytes
        self.live[id(storage)] = (ref, nbytes, category)

    def _free(self, key) -> None:
        entry = self.live.pop(key, None)
        if entry is not None:
            self.totals[entry[2]] -= entry[1]


def _dispatch_mode(tracker: _Tracker):
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class _Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    tracker.add(t.untyped_storage(), tracker.phase, op=func)
            return out

    return _Mode()


def _quantized_stand_in(linear, mode: str, compute_dtype):
    """A frozen linear holding bitsandbytes' storage sizes: NF4 with double quantization (4 bits per weight, one uint8
    absmax per 64 weights, one fp32 per 256 absmax) or LLM.int8 (1 byte per weight, one fp32 scale per row). Forward
    and backward dequantize a transient weight in the compute dtype, like bitsandbytes' matmul."""
    import torch

    out_f, in_f = linear.weight.shape
    n = out_f * in_f
    if mode == "4bit":
        sizes = {"weight_packed": (n + 1) // 2, "absmax": -(-n // 64), "absmax2": 4 * -(-n // (64 * 256))}
    else:
        sizes = {"weight_int8": n, "row_scale": 4 * out_f}

    class _Dequant(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            w = torch.empty((out_f, in_f), dtype=x.dtype, device=x.device)
            return torch.nn.functional.linear(x, w)

        @staticmethod
        def backward(ctx, grad):
            w = torch.empty((out_f, in_f), dtype=grad.dtype, device=grad.device)
            return grad @ w

    class _Stand(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for name, nbytes in sizes.items():
                self.register_buffer(name, torch.empty(nbytes, dtype=torch.uint8, device=linear.weight.device))
            self.bias = linear.bias

        def forward(self, x):
            y = _Dequant.apply(x.to(compute_dtype))
            return y + self.bias if self.bias is not None else y

    return _Stand()


def _build_model(spec: StepSpec):
    import torch
    from transformers import AutoModelForCausalLM

    attn = "eager" if spec.kernel == "eager" else "sdpa"
    dtype = getattr(torch, spec.dtype) if spec.dtype not in (None, "auto") else torch.float32
    return AutoModelForCausalLM.from_config(spec.config, dtype=dtype, attn_implementation=attn)


@contextlib.contextmanager
def _without_zero3_init():
    """The simulated step is the one-process step (engines.py partitions it): while a ZeRO-3 TrainingArguments is
    alive in this process (`sfn train`'s start-up plan, a test), transformers would build the model under
    deepspeed.zero.Init (which needs a process group) and TRL's fused head would look for ZeRO-3 partitions. Run
    the step as one whole process instead."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def _select(model, spec: StepSpec):
    import torch

    from ..precision import keep_fp32_masters
    from ..quantize import quantization_plan
    from ..roles import apply_freeze, select_parameters

    trainable = select_parameters(model, spec.trainable_modules, spec.trainable_layers)
    apply_freeze(model, trainable)
    if spec.quantize_frozen != "none":
        compute = torch.bfloat16 if spec.device == "cuda" else torch.float32
        for name in quantization_plan(model, trainable)[0]:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, _quantized_stand_in(getattr(parent, child), spec.quantize_frozen, compute))
    keep_fp32_masters(model, trainable, engine=spec.engine)
    return trainable


def _param_summary(model, trainable) -> dict:
    """Counts and bytes per kind, the decoder layers' sizes (ZeRO-3/FSDP2 gather one unit at a time)."""
    from ..roles import layer_index

    wanted = set(trainable)
    out = {"trained_numel": 0, "trained_bytes": 0, "frozen_bytes": 0, "frozen_numel": 0, "layer_bytes": {},
           "layer_trained_numel": {}, "outside_layer_bytes": 0, "small_numels": []}
    for name, p in model.named_parameters():
        nbytes = p.numel() * p.element_size()
        kind = "trained" if name in wanted else "frozen"
        out[f"{kind}_numel"] += p.numel()
        out[f"{kind}_bytes"] += nbytes
        layer = layer_index(name)
        if layer is None:
            out["outside_layer_bytes"] += nbytes
        else:
            out["layer_bytes"][layer] = out["layer_bytes"].get(layer, 0) + nbytes
            if name in wanted:
                out["layer_trained_numel"][layer] = out["layer_trained_numel"].get(layer, 0) + p.numel()
        out["small_numels"].append((p.numel(), nbytes))
    for name, b in model.named_buffers():
        out["frozen_bytes"] += b.numel() * b.element_size()
    return out


def _inputs(spec: StepSpec):
    """Worst-case inputs: every row max_length tokens long, every label trained (`completion_only_loss` can only
    lower the loss's memory on a GPU, where TRL scores only the trained positions). A padded batch of several rows
    carries a padding mask (so sdpa and eager get a materialised mask, as with real padding); a padding-free batch is
    one row with restarting position_ids (sdpa and eager get the block-diagonal mask; FlashAttention's varlen kernel
    needs none, so its rows are simulated as one causal sequence of the same length)."""
    import torch

    rows, length = (1, spec.batch * spec.max_length) if spec.padding_free else (spec.batch, spec.max_length)
    ids = torch.zeros((rows, length), dtype=torch.long)
    inputs = {"input_ids": ids, "labels": torch.zeros_like(ids), "use_cache": False}
    if spec.padding_free:
        restart = spec.max_length if spec.kernel in ("sdpa", "eager") else length
        inputs["position_ids"] = torch.arange(restart).repeat(length // restart).unsqueeze(0)
    elif spec.batch > 1:
        inputs["attention_mask"] = torch.ones((rows, length), dtype=torch.long)
    return inputs


def _packed(spec: StepSpec) -> bool:
    return spec.padding_free and spec.batch > 1 and spec.kernel in ("sdpa", "eager")


@contextlib.contextmanager
def _mask_decisions_as_on_real_tensors(packed: bool):
    """transformers never skips the causal mask for a fake tensor (it reads one as tracing, and the skip may need
    the mask's values). On real tensors it skips it exactly when no padding mask is given and the position_ids do not
    restart (`packed`: a padding-free batch of several rows, whose block-diagonal mask is built): decide that way."""
    from transformers import masking_utils

    original = masking_utils._ignore_causal_mask_sdpa
    original_packed = masking_utils.find_packed_sequence_indices

    def decide(padding_mask, q_length, kv_length, q_offset, kv_offset, local_attention_size=None):
        if padding_mask is not None or (local_attention_size is not None and kv_length >= local_attention_size):
            return False
        return q_length == 1 or kv_length == q_length

    masking_utils._ignore_causal_mask_sdpa = decide
    if not packed:
        masking_utils.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking_utils._ignore_causal_mask_sdpa = original
        masking_utils.find_packed_sequence_indices = original_packed


def simulate_step(spec: StepSpec, fake: bool = True, around=None) -> StepTrace:
    """Run one optimizer step of `spec` on fake tensors; return the tracker's series and the peak.

    `fake=False` runs the same step on real tensors (this CPU; the validation test measures it with the allocator),
    `around(model, optimizer, inputs)`: returns a context manager entered for the measured step only (e.g. a
    torch.profiler profile).
    """
    import time

    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from trl.trainer.utils import add_fused_lm_head

    start = time.perf_counter()
    tracker = _Tracker(512 if spec.device == "cuda" else 1)
    with FakeTensorMode(allow_non_fake_inputs=False) if fake else contextlib.nullcontext(), \
            _mask_decisions_as_on_real_tensors(_packed(spec)) if fake else contextlib.nullcontext(), \
            _without_zero3_init():
        model = _build_model(spec)
        trainable = _select(model, spec)
        summary = _param_summary(model, trainable)
        wanted = set(trainable)
        for name, p in model.named_parameters():
            tracker.add(p.untyped_storage(), "trained_weights" if name in wanted else "frozen_weights")
        for b in model.buffers():
            tracker.add(b.untyped_storage(), "frozen_weights")
        model.train()
        if spec.checkpointing:
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            if enable.__name__ == "activation_checkpointing_enable":
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
        params = [p for n, p in model.named_parameters() if n in wanted]
        optimizer = spec.optimizer_cls(params, **spec.optimizer_kwargs)
        _warm_up_optimizer(optimizer, params, tracker, keep_grads=spec.grad_accum > 1)
        inputs = _inputs(spec)
        for p in params:
            p.register_post_accumulate_grad_hook(lambda q: tracker.move(q.grad.untyped_storage(), "gradients"))
        _phase_hooks(model, tracker)
        with (around(model, optimizer, inputs) if around else contextlib.nullcontext()), _dispatch_mode(tracker):
            tracker.series.clear()
            _forward_backward(model, inputs, spec, tracker)
            tracker.phase = "optimizer_step"
            if spec.max_grad_norm and spec.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    totals = [sum(row) for row in tracker.series]
    index = max(range(len(totals)), key=totals.__getitem__)
    return StepTrace(series=tracker.series, peak=totals[index], peak_index=index,
                     largest_transient=tracker.largest, params=summary, seconds=time.perf_counter() - start)


def _phase_hooks(model, tracker: _Tracker) -> None:
    """Allocations after the decoder's forward and before the gradient reaches its output are the LM head's and the
    loss's (TRL's fused head never calls the head module, so the decoder's boundary is the mark)."""

    def back_to_activations(grad):
        tracker.phase = "activations"

    def after_decoder(module, args, output):
        tracker.phase = "loss_logits"
        hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
        if hidden.requires_grad:
            hidden.register_hook(back_to_activations)

    model.get_decoder().register_forward_hook(after_decoder)


def _warm_up_optimizer(optimizer, params, tracker: _Tracker, keep_grads: bool) -> None:
    """Create the optimizer state (step 2 onwards holds it for the whole step); keep zero gradients when the step
    accumulates (its later micro-batches run with the gradients already there)."""
    import torch

    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                tracker.add(value.untyped_storage(), "optimizer_state")
    if keep_grads:
        for p in params:
            tracker.add(p.grad.untyped_storage(), "gradients")
    else:
        optimizer.zero_grad(set_to_none=True)


def _forward_backward(model, inputs, spec: StepSpec, tracker: _Tracker) -> None:
    """TRL SFTTrainer.compute_loss (the fused LM head path) and the Trainer's backward of loss / accumulation."""
    import contextlib

    import torch

    labels = inputs.pop("labels")
    autocast = (torch.autocast("cpu", dtype=getattr(torch, spec.autocast)) if spec.autocast
                else contextlib.nullcontext())
    tracker.phase = "activations"
    with autocast:
        outputs = model(**inputs, labels=labels, fused_lm_head=True)
        loss = (-outputs.log_probs).sum() / outputs.label_mask.sum().clamp(min=1)
    # the metrics SFTTrainer logs from the same outputs
    outputs.entropy.detach().sum()
    outputs.is_top1.sum()
    (loss / spec.grad_accum).backward()
    tracker.phase = "activations"
