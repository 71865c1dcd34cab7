"""The Hugging Face `generate` backend (default, CPU ok): load a model (plugin applied), generate rows in batches.

Each (problem, sample) is one row; rows are batched with left padding, similar lengths together. The base is loaded
with `from_pretrained` and a plugin's tensors overwrite the matching state-dict entries (after the check `sfn plugin
apply` makes: names, shapes, and the base fingerprint unless `force_plugin`).
"""

from __future__ import annotations

import gc

from ..errors import SfnError
from .context import context_length
from .forcing import Row, make_forcing, timed_rounds
from .settings import GenerationSettings, ModelSpec
from .tokens import load_tokenizer


def _torch_dtype(name: str, device: str):
    import torch

    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        return {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
                "fp32": torch.float32, "float32": torch.float32}[name]
    except KeyError:
        raise SfnError(f"dtype {name!r} is unknown; use auto, bf16, fp16 or fp32.") from None


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_hf_model(spec: ModelSpec, settings: GenerationSettings, plugin_check: dict | None = None):
    """(model in eval mode with the plugin applied, tokenizer with left padding).

    `plugin_check`: the record of `check_plugin` already run on this spec's plugin and base (else it is run here).
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from ..checkpoint import resolve_path

    device = resolve_device(settings.device)
    path = resolve_path(spec.path)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=_torch_dtype(settings.dtype, device))
    except Exception as exc:  # noqa: BLE001
        raise SfnError(f"could not load {spec.path} as a causal LM ({type(exc).__name__}: {exc}).") from None
    if spec.plugin:
        from ..plugin import apply_plugin_to_model

        apply_plugin_to_model(model, spec.plugin, path, force=spec.force_plugin, check=plugin_check)
    model.generation_config = GenerationConfig()  # nothing from generation_config.json may leak into sampling
    model.to(device).eval()
    tokenizer = load_tokenizer(spec.path)
    tokenizer.padding_side = "left"
    torch.manual_seed(settings.seed)
    return model, tokenizer


def free_model(model) -> None:
    import torch

    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def hf_context_length(model, settings: GenerationSettings) -> int | None:
    """--max-model-len, else the loaded model's own context length (read from its live config)."""
    if settings.max_model_len is not None:
        return settings.max_model_len
    config = getattr(model, "config", None)
    return context_length(config.to_dict())[0] if config is not None else None


def generate_hf(model, tokenizer, rows: list[Row], settings: GenerationSettings, eos_ids: list[int],
                progress: bool = True, context_len: int | None = None) -> float:
    """Fill every row's gen_ids; returns the generation wall time in seconds."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    forcing = make_forcing(tokenizer, settings, eos_ids, context_len, rows)

    def submit(live: list[tuple[Row, int]]) -> list[tuple[list[int], None]]:
        # Batches of one `min_tokens` (a request's minimum is the batch's) and similar lengths (less padding).
        order = sorted(range(len(live)), key=lambda i: (forcing.min_tokens(live[i][0]),
                                                        len(live[i][0].prompt_ids) + len(live[i][0].gen_ids)))
        out: list = [None] * len(live)
        start = 0
        while start < len(order):
            least = forcing.min_tokens(live[order[start]][0])
            stop = start + 1
            while stop < len(order) and stop - start < settings.batch_size and \
                    forcing.min_tokens(live[order[stop]][0]) == least:
                stop += 1
            batch = order[start:stop]
            for i, new_ids in zip(batch, _generate_batch(model, [live[i] for i in batch], forcing, settings,
                                                         pad_id, least)):
                out[i] = (new_ids, None)
            start = stop
        return out

    return timed_rounds(rows, forcing, submit, progress)


def _generate_batch(model, batch: list[tuple[Row, int]], forcing, settings: GenerationSettings, pad_id: int,
                    min_tokens: int) -> list[list[int]]:
    """One left-padded `model.generate` call for rows of one phase; each row's new token ids."""
    import torch
    from transformers import GenerationConfig

    greedy = settings.temperature == 0
    inputs = [r.prompt_ids + r.gen_ids for r, _ in batch]
    width = max(map(len, inputs))
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, seq in enumerate(inputs):
        ids[i, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[i, width - len(seq) :] = 1
    # One length for the batch: what the hungriest row asked for, but never past any row's context (a row that
    # wanted more goes on in the next round).
    new = min(max(asked for _, asked in batch), min(forcing.room(r) for r, _ in batch))
    stops = sorted({t for r, _ in batch for t in forcing.stop_ids(r)})
    config = GenerationConfig(
        do_sample=not greedy, temperature=None if greedy else settings.temperature,
        top_p=None if greedy else settings.top_p, top_k=None if greedy else 0, min_p=None,
        repetition_penalty=1.0, num_beams=1, max_new_tokens=new, eos_token_id=stops, pad_token_id=pad_id,
        min_new_tokens=min(min_tokens, new) or None,
    )
    device = next(model.parameters()).device
    with torch.no_grad():
        result = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
    return [result[k, width:].tolist() for k in range(len(batch))]
