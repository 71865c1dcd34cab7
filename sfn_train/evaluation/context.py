"""Context length as vLLM derives it, so that a bad --max-model-len fails before an engine starts.

Every request is checked against the model's context length (prompt + everything generated so far + the tokens asked
for). The length is `max_model_len` when given, else the model's own (config.json's max_position_embeddings or
equivalent, times the RoPE scaling factor, as vLLM derives it); with vLLM it is read back from the live engine.
"""

from __future__ import annotations

import json
import os

from ..errors import SfnError
from .settings import GenerationSettings, ModelSpec

# config.json keys that bound the positions a model was trained for; vLLM takes the smallest one present.
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_sequence_length",
                "max_seq_length", "seq_len")


def text_config(config: dict) -> dict:
    """The language model's part of a config.json (multimodal checkpoints nest it)."""
    return config.get("text_config") or config


def context_length(config: dict) -> tuple[int | None, str]:
    """(positions the model handles, where that number comes from), from config.json; (None, ...) when it says none.

    Same rule as vLLM's check of `max_model_len`: the smallest of CONTEXT_KEYS (`model_max_length` wins when
    present), times the RoPE scaling factor (rope types other than su/longrope/llama3; yarn scales
    original_max_position_embeddings; Gemma 3 states the scaled length already).
    """
    cfg = text_config(config)
    if isinstance(cfg.get("model_max_length"), int):
        length, source = cfg["model_max_length"], "model_max_length"
    else:
        found = sorted((cfg[k], k) for k in CONTEXT_KEYS if isinstance(cfg.get(k), int))
        if not found:
            return None, "config.json names no context length"
        length, source = found[0]
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling")
    if isinstance(rope, dict) and "gemma3" not in str(cfg.get("model_type", "")):
        per_layer_type = rope and all(isinstance(v, dict) for v in rope.values())
        factor = 1.0
        for params in (rope.values() if per_layer_type else [rope]):
            kind = params.get("rope_type") or params.get("type") or "default"
            if kind not in ("su", "longrope", "llama3"):
                factor = params.get("factor") or factor
                if kind == "yarn" and isinstance(params.get("original_max_position_embeddings"), int):
                    length = params["original_max_position_embeddings"]
                    source = "original_max_position_embeddings"
        if factor != 1.0:
            length, source = int(length * factor), f"{source} x RoPE factor {factor:g}"
    return int(length), source


def read_config(path: str) -> dict:
    from ..checkpoint import resolve_path

    file = resolve_path(path) / "config.json"
    if not file.is_file():
        raise SfnError(f"{path} has no config.json; pass a Hugging Face checkpoint folder.")
    return json.loads(file.read_text())


def check_max_model_len(spec: ModelSpec, settings: GenerationSettings) -> int | None:
    """The context length a run of `spec` will use; a --max-model-len beyond the model's is one clear error."""
    limit, source = context_length(read_config(spec.path))
    wanted = settings.max_model_len
    if wanted is None:
        return limit
    if limit is not None and wanted > limit and not os.environ.get("VLLM_ALLOW_LONG_MAX_MODEL_LEN"):
        raise SfnError(f"--max-model-len {wanted} exceeds the {limit} positions {spec.path} handles ({source}); "
                       f"use at most {limit} (positions beyond it give garbage or NaN).")
    return wanted
