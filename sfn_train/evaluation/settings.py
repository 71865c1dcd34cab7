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
    """How to generate. `protocol` names a preset (PROTOCOLS) that `resolve_settings` fills in; the fields are the
    effective values, recorded in every result."""

    protocol: str = "sampled"
    backend: str = "hf"
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 32768
    samples: int = 1
    seed: int = 0
    chat_template: bool | None = None  # None: on when the tokenizer has one
    prompts: str = "instruct"  # "instruct": the task's instruction template; "bare": the problem alone (s1)
    budget_forcing: int = 0
    wait_text: str = "Wait"
    batch_size: int = 8
    dtype: str = "auto"
    device: str = "auto"
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None  # context length (prompt + response); None: the model's own
    end_of_thinking: str | None = None  # the one token that closes thinking (e.g. "</think>"); None: EOS
    thinking_budget: int | str | None = None  # max thinking tokens, "auto" (s1's rule) or None: max_new_tokens
    thinking_start: str | None = None  # appended to the prompt to open the thinking (s1: "<|im_start|>think")
    answer_start: str | None = None  # replaces the end of thinking and opens the answer (s1: "<|im_start|>answer")
    budget_spent_text: str | None = None  # after answer_start when the thinking budget ran out (s1: "\nFinal Answer:")
    thinking_min_tokens: int = 0  # each thinking request generates at least this many tokens (s1: 1)

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
        if self.protocol not in PROTOCOLS:
            raise SfnError(f"protocol {self.protocol!r} is unknown; use one of {', '.join(PROTOCOLS)}.")
        if self.prompts not in ("instruct", "bare"):
            raise SfnError(f"prompts {self.prompts!r} is unknown; use instruct or bare.")
        if self.thinking_min_tokens < 0:
            raise SfnError(f"thinking_min_tokens must be 0 or more (got {self.thinking_min_tokens}).")
        if (self.answer_start is not None or self.thinking_start is not None) and self.end_of_thinking is None:
            raise SfnError("--answer-start/--thinking-start need --end-of-thinking (the token that closes the "
                           "thinking, '<|im_start|>' for s1).")
        if self.budget_spent_text is not None and self.answer_start is None:
            raise SfnError("--budget-spent-text is appended after --answer-start; set --answer-start too.")
        if self.thinking_budget is not None:
            if self.end_of_thinking is None:
                raise SfnError("--thinking-budget needs --end-of-thinking (the token that closes the model's thinking, "
                               "e.g. '</think>'): without it there is no thinking to end.")
            if self.thinking_budget != "auto" and not (isinstance(self.thinking_budget, int)
                                                       and 1 <= self.thinking_budget <= self.max_new_tokens):
                raise SfnError(f"thinking_budget {self.thinking_budget!r} must be 'auto' or between 1 and "
                               f"max_new_tokens ({self.max_new_tokens}), which also holds the answer.")

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(top_k=0, repetition_penalty=1.0, greedy=self.temperature == 0)
        return d


# Named protocols: the values `resolve_settings` fills in for every field the caller leaves unset (None).
PROTOCOLS: dict[str, dict] = {
    # s1's evaluation (simplescaling/s1, lm-evaluation-harness vllm_causallms.py, "s1 Budget Forcing" commands):
    # greedy, bare prompts, "<|im_start|>think" opens the thinking, the single token "<|im_start|>" (or EOS) ends it,
    # each thinking request generates at least one token, "Wait" replaces the first two ends, "<|im_start|>answer"
    # opens the answer, and a thinking that reaches the budget (s1's "auto" rule) is closed with
    # "\n<|im_start|>answer\nFinal Answer:".
    "s1": dict(temperature=0.0, top_p=1.0, samples=1, max_new_tokens=32768, prompts="bare", budget_forcing=2,
               wait_text="Wait", end_of_thinking="<|im_start|>", thinking_budget="auto",
               thinking_start="<|im_start|>think", answer_start="<|im_start|>answer",
               budget_spent_text="\nFinal Answer:", thinking_min_tokens=1),
    # The common protocol for reasoning models: temperature 0.6, top_p 0.95, the task's instruction
    # ("Please reason step by step, and put your final answer within \\boxed{}"), no forcing unless asked.
    "sampled": dict(temperature=0.6, top_p=0.95, samples=1, max_new_tokens=32768, prompts="instruct",
                    budget_forcing=0, wait_text="Wait", end_of_thinking=None, thinking_budget=None,
                    thinking_start=None, answer_start=None, budget_spent_text=None, thinking_min_tokens=0),
}


def resolve_settings(settings: dict) -> tuple[GenerationSettings, list[str]]:
    """(the effective settings, the protocol keys the caller changed): the named protocol's values for every key the
    caller left out or set to None, the caller's values for the rest."""
    unknown = set(settings) - set(GenerationSettings.__dataclass_fields__)
    if unknown:
        raise SfnError(f"unknown evaluation setting(s) {', '.join(sorted(unknown))}; "
                       f"known: {', '.join(GenerationSettings.__dataclass_fields__)}.")
    protocol = settings.get("protocol") or "sampled"
    if protocol not in PROTOCOLS:
        raise SfnError(f"protocol {protocol!r} is unknown; use one of {', '.join(PROTOCOLS)}.")
    preset = PROTOCOLS[protocol]
    given = {k: v for k, v in settings.items() if v is not None and k != "protocol"}
    changed = sorted(k for k, v in given.items() if k in preset and v != preset[k])
    gen = GenerationSettings(**{**preset, **given, "protocol": protocol})
    gen.check()
    return gen, changed

