"""What to evaluate and how to generate: `ModelSpec` (a checkpoint, optionally with a plugin) and `GenerationSettings`.

Why every sampling setting is explicit: a checkpoint's `generation_config.json` carries defaults (top_k=20,
repetition_penalty=1.05, ...) that differ between models; a comparison must sample every model the same way. The hf
backend therefore replaces the model's generation config with an empty one and passes a complete `GenerationConfig`
(temperature, top_p, top_k=0 i.e. off, repetition_penalty=1.0, max_new_tokens, EOS ids); vLLM gets
`generation_config="vllm"` and a `SamplingParams` with every knob set. Only the EOS ids are taken from the checkpoint
(tokenizer EOS plus `generation_config.json`'s eos_token_id), because they define where a response ends.

Temperature 0 means greedy decoding.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import SfnError


@dataclass
class ModelSpec:
    """What to evaluate: a checkpoint (folder or hub id), optionally with a plugin file applied on top.

    `force_plugin` applies the plugin even to a base whose fingerprint is not the one it was made against.
    """

    path: str
    plugin: str | None = None
    label: str | None = None
    force_plugin: bool = False

    def __post_init__(self):
        if self.label is None:
            name = Path(str(self.path).rstrip("/")).name or str(self.path)
            self.label = name + (f"+{Path(self.plugin).stem}" if self.plugin else "")


@dataclass
class GenerationSettings:
    backend: str = "hf"
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 32768
    samples: int = 1
    seed: int = 0
    chat_template: bool | None = None  # None: on when the tokenizer has one
    budget_forcing: int = 0
    wait_text: str = "Wait"
    batch_size: int = 8
    dtype: str = "auto"
    device: str = "auto"
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None  # context length (prompt + response); None: the model's own
    end_of_thinking: str | None = None  # the one token that closes thinking (e.g. "</think>"); None: EOS
    thinking_budget: int | None = None  # max thinking tokens before end_of_thinking is forced; None: max_new_tokens

    def check(self) -> None:
        if self.backend not in ("hf", "vllm"):
            raise SfnError(f"backend {self.backend!r} is unknown; use --backend hf or --backend vllm.")
        if self.temperature < 0:
            raise SfnError(f"temperature {self.temperature} is negative; use 0 (greedy) or a positive value.")
        if not 0 < self.top_p <= 1:
            raise SfnError(f"top_p {self.top_p} is outside (0, 1]; use e.g. --top-p 0.95.")
        for name in ("max_new_tokens", "samples", "batch_size", "tensor_parallel_size"):
            if getattr(self, name) < 1:
                raise SfnError(f"{name} must be at least 1 (got {getattr(self, name)}).")
        if self.budget_forcing < 0:
            raise SfnError(f"budget_forcing must be 0 (off) or a number of 'Wait's (got {self.budget_forcing}).")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise SfnError(f"max_model_len must be at least 2 tokens (got {self.max_model_len}).")
        if self.thinking_budget is not None:
            if self.end_of_thinking is None:
                raise SfnError("--thinking-budget needs --end-of-thinking (the token that closes the model's thinking, "
                               "e.g. '</think>'): without it there is no thinking to end.")
            if not 1 <= self.thinking_budget <= self.max_new_tokens:
                raise SfnError(f"thinking_budget {self.thinking_budget} must be between 1 and max_new_tokens "
                               f"({self.max_new_tokens}), which also holds the answer.")

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(top_k=0, repetition_penalty=1.0, greedy=self.temperature == 0)
        return d
