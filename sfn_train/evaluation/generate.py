"""Generation: prompts -> responses, with the Hugging Face `generate` backend (default, CPU ok) or vLLM.

Why every sampling setting is explicit: a checkpoint's `generation_config.json` carries defaults (top_k=20,
repetition_penalty=1.05, ...) that differ between models; a comparison must sample every model the same way. The hf
backend therefore replaces the model's generation config with an empty one and passes a complete `GenerationConfig`
(temperature, top_p, top_k=0 i.e. off, repetition_penalty=1.0, max_new_tokens, EOS ids); vLLM gets
`generation_config="vllm"` and a `SamplingParams` with every knob set. Only the EOS ids are taken from the checkpoint
(tokenizer EOS plus `generation_config.json`'s eos_token_id), because they define where a response ends.

Temperature 0 means greedy decoding. Each (problem, sample) is one row; rows are batched with left padding.

Budget forcing (s1, Muennighoff et al. 2025): a response is thinking until the model emits its end-of-thinking token
(`end_of_thinking`, e.g. `</think>`; for a model without one, EOS ends the thinking and the response). With
`budget_forcing=N`, the first N times a row stops while thinking, the stop token is suppressed (not kept) and
`wait_text` ("Wait") is appended instead, and the row continues thinking. After that a stop is kept: the end-of-thinking
token opens the answer, which runs until EOS; an EOS ends the row. `thinking_budget` caps the thinking tokens
(forced "Wait"s included): a row that reaches it gets the end-of-thinking token appended, so it answers (s1's way of
enforcing a maximum). `max_new_tokens` caps everything a row generates; a row that reaches it stops there
(finish_reason "length"). `waits` records how many "Wait"s were used.

Context length: every request is checked against the model's context length (prompt + everything generated so far +
the tokens asked for): a row is asked for at most what fits, and a row with no room left stops cleanly with
finish_reason "context" instead of being submitted (vLLM would raise for the whole batch). The length is
`max_model_len` when given, else the model's own (config.json's max_position_embeddings or equivalent, times the RoPE
scaling factor, as vLLM derives it); with vLLM it is read back from the live engine.

A model is a folder or hub id, or a base plus a plugin file, which the evaluation checks before anything loads with the
check `sfn plugin apply` makes (`sfn_train.plugin.check_plugin`: names, shapes, and the base fingerprint unless
`force_plugin`). With the hf backend the base is loaded with `from_pretrained` and the plugin's tensors overwrite the
matching state-dict entries. vLLM loads weights from a folder, so for a base + plugin the merged checkpoint is written once per
model by the streaming `plugin_apply` (tensor by tensor, in the base's stored dtype) into a temporary folder
(`$TMPDIR`; it needs the model's size on disk), one engine is built for all of that model's tasks, shut down
explicitly, and the folder removed. Before anything loads, `check_vllm` refuses in one line a tensor-parallel size
that does not divide the attention heads or exceeds the visible GPUs, and a `max_model_len` beyond the model's context
length -- the checks vLLM itself makes after minutes of start-up.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
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


@dataclass
class Row:
    """One (problem, sample) generation and its state across budget-forcing rounds."""

    problem_index: int
    sample_index: int
    prompt_ids: list[int]
    gen_ids: list[int] = field(default_factory=list)
    waits: int = 0
    finish_reason: str | None = None
    thinking: bool = True  # before the end-of-thinking token (always, for a model without one)
    rounds: int = 0  # requests made for this row


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer, EOS ids, signature


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    from ..checkpoint import resolve_path

    try:
        return AutoTokenizer.from_pretrained(str(resolve_path(path)))
    except SfnError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise SfnError(f"could not load the tokenizer of {path} ({type(exc).__name__}: {exc}); "
                       "the folder needs tokenizer files.") from None


def eos_token_ids(path: str, tokenizer) -> list[int]:
    """EOS ids: the tokenizer's plus generation_config.json's (instruct models often stop on several)."""
    from ..checkpoint import resolve_path

    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_file = resolve_path(path) / "generation_config.json"
    if gen_file.is_file():
        eos = json.loads(gen_file.read_text()).get("eos_token_id")
        ids.update(int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None)
    if not ids:
        raise SfnError(f"{path} defines no EOS token (tokenizer or generation_config.json); generation would never stop.")
    return sorted(ids)


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def tokenizer_signature(tokenizer, eos_ids: list[int]) -> dict:
    """What must match for two models' responses to be comparable: vocab, chat template, EOS ids."""
    vocab = tokenizer.get_vocab()
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else json.dumps(tokenizer.chat_template)
    parts = {
        "vocab_size": len(vocab),
        "vocab_sha256": _sha(sorted(vocab.items())),
        "chat_template_sha256": _sha(template or ""),
        "eos_token_ids": list(eos_ids),
    }
    return {**parts, "signature": _sha(parts)[:16]}


def signature_differences(a: dict, b: dict) -> list[str]:
    names = {"vocab_sha256": "vocab", "chat_template_sha256": "chat template", "eos_token_ids": "EOS ids"}
    return [label for key, label in names.items() if a.get(key) != b.get(key)]


def build_prompt_ids(tokenizer, text: str, use_chat: bool) -> tuple[str, list[int]]:
    """(the exact prompt string, its token ids): the chat template with a generation prompt, or the raw text."""
    if use_chat:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                               add_generation_prompt=True)
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    else:
        prompt = text
        ids = tokenizer(prompt)["input_ids"]
    return prompt, list(ids)


# ---------------------------------------------------------------------------------------------------------------
# Models


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


# ---------------------------------------------------------------------------------------------------------------
# Context length (as vLLM derives it, so that a bad --max-model-len fails before an engine starts)

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


def _read_config(path: str) -> dict:
    from ..checkpoint import resolve_path

    file = resolve_path(path) / "config.json"
    if not file.is_file():
        raise SfnError(f"{path} has no config.json; pass a Hugging Face checkpoint folder.")
    return json.loads(file.read_text())


def check_max_model_len(spec: ModelSpec, settings: GenerationSettings) -> int | None:
    """The context length a run of `spec` will use; a --max-model-len beyond the model's is one clear error."""
    limit, source = context_length(_read_config(spec.path))
    wanted = settings.max_model_len
    if wanted is None:
        return limit
    if limit is not None and wanted > limit and not os.environ.get("VLLM_ALLOW_LONG_MAX_MODEL_LEN"):
        raise SfnError(f"--max-model-len {wanted} exceeds the {limit} positions {spec.path} handles ({source}); "
                       f"use at most {limit} (positions beyond it give garbage or NaN).")
    return wanted


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def import_vllm():
    try:
        import vllm
    except ImportError:
        raise SfnError("--backend vllm needs vLLM installed (pip install 'sfn-train[vllm]' on a GPU machine); "
                       "or use --backend hf.") from None
    return vllm


def check_vllm(specs: list[ModelSpec], settings: GenerationSettings) -> None:
    """Everything vLLM would refuse after minutes of start-up, refused now in one line."""
    import_vllm()
    tp, gpus = settings.tensor_parallel_size, visible_gpus()
    if gpus == 0:
        raise SfnError("--backend vllm needs a CUDA GPU and none is visible; use --backend hf on this machine.")
    if tp > gpus:
        raise SfnError(f"--tensor-parallel-size {tp} needs {tp} GPUs but {gpus} are visible "
                       f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); use at most {gpus}.")
    for spec in specs:
        cfg = text_config(_read_config(spec.path))
        heads = cfg.get("num_attention_heads")
        if isinstance(heads, int):
            fits = [d for d in range(1, gpus + 1) if heads % d == 0]
            if heads % tp:
                raise SfnError(f"--tensor-parallel-size {tp} does not divide the {heads} attention heads of "
                               f"{spec.path}; use one of {', '.join(map(str, fits))}.")
            kv = cfg.get("num_key_value_heads") or heads
            if (kv >= tp and kv % tp) or (kv < tp and tp % kv):
                raise SfnError(f"--tensor-parallel-size {tp} cannot split the {kv} key/value heads of {spec.path} "
                               f"(it must divide them, or be a multiple of them); use one of "
                               f"{', '.join(str(d) for d in fits if (kv % d == 0 if kv >= d else d % kv == 0))}.")
        check_max_model_len(spec, settings)


# ---------------------------------------------------------------------------------------------------------------
# Rows and budget forcing (backend-independent)


def make_rows(prompt_ids: list[list[int]], samples: int) -> list[Row]:
    return [Row(p, s, ids) for p, ids in enumerate(prompt_ids) for s in range(samples)]


def end_of_thinking_id(tokenizer, text: str | None, eos_ids: list[int]) -> int | None:
    """The id of the end-of-thinking token; it must be exactly one token and not an EOS."""
    if text is None:
        return None
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise SfnError(f"--end-of-thinking {text!r} is {len(ids)} tokens for this tokenizer; it must be the one token "
                       "that closes the model's thinking (e.g. '</think>' for R1-style models, '<|im_start|>' for s1).")
    if ids[0] in eos_ids:
        raise SfnError(f"--end-of-thinking {text!r} is an EOS token of this model; name the token that closes the "
                       "thinking (without --end-of-thinking, EOS already ends thinking and response).")
    return ids[0]


class Forcing:
    """What each row may generate next, and what a round's output does to it (budgets, context, budget forcing).

    Both backends use it the same way: `request(row)` gives the tokens to ask for (0: the row is finished, with its
    finish_reason set), `stop_ids(row)` the tokens that end the request, and `advance(row, new_ids, asked, stop)`
    takes the output and says whether the row needs another request.
    """

    def __init__(self, settings: GenerationSettings, eos_ids: list[int], wait_ids: list[int],
                 end_think: int | None = None, context_len: int | None = None):
        self.eos = set(eos_ids)
        self.end_think = end_think
        self.wait_ids = list(wait_ids)
        self.waits = settings.budget_forcing
        self.max_new = settings.max_new_tokens
        self.thinking_budget = settings.thinking_budget or settings.max_new_tokens
        self.context_len = context_len

    def _limit(self, row: Row) -> int:
        """Tokens the row may have generated at the end of its current phase."""
        if row.thinking and self.end_think is not None:
            return min(self.max_new, self.thinking_budget)
        return self.max_new

    def room(self, row: Row) -> int:
        if self.context_len is None:
            return self.max_new - len(row.gen_ids)
        return self.context_len - len(row.prompt_ids) - len(row.gen_ids)

    def _fits(self, row: Row, ids: list[int], limit: int) -> bool:
        """Can `ids` be appended and still leave room for one generated token?"""
        return len(row.gen_ids) + len(ids) < limit and self.room(row) > len(ids)

    def stop_ids(self, row: Row) -> list[int]:
        return sorted(self.eos | ({self.end_think} if row.thinking and self.end_think is not None else set()))

    def request(self, row: Row) -> int:
        if row.finish_reason is not None:
            return 0
        left, room = self._limit(row) - len(row.gen_ids), self.room(row)
        if room <= 0:
            row.finish_reason = "context"
            return 0
        if left <= 0:
            row.finish_reason = "length"
            return 0
        return min(left, room)

    def advance(self, row: Row, new_ids: list[int], asked: int, stop: int | None = None) -> bool:
        """Add one round's output (at most `asked` tokens count); True when the row must generate again.

        `stop` is the token that ended the request when the backend does not include it in `new_ids` (vLLM).
        """
        row.rounds += 1
        new_ids = list(new_ids[:asked])
        for i, tok in enumerate(new_ids):
            if tok in self.eos or tok == self.end_think:
                if tok == self.end_think and not row.thinking:  # already answering: an ordinary token
                    row.gen_ids += new_ids[: i + 1]
                    return True
                new_ids, stop = new_ids[:i], tok
                break
        row.gen_ids += new_ids
        if stop is not None:
            if row.thinking and row.waits < self.waits and self._fits(row, self.wait_ids, self._limit(row)):
                row.gen_ids += self.wait_ids  # suppress the stop and make the model think on
                row.waits += 1
                return True
            if stop == self.end_think and row.thinking:  # the model closed its thinking: now the answer
                row.gen_ids.append(stop)
                row.thinking = False
                return True
            row.finish_reason = "stop"
            return False
        if row.thinking and self.end_think is not None and len(row.gen_ids) >= self.thinking_budget:
            if self._fits(row, [self.end_think], self.max_new):  # thinking budget spent: close it so the model answers
                row.gen_ids.append(self.end_think)
                row.thinking = False
                return True
            row.finish_reason = "length"
            return False
        return True  # `request` decides: the budget or context is used up, or the backend stopped short of `asked`


def _rounds(rows: list[Row], forcing: Forcing, submit, bar=None) -> None:
    """Request, generate and advance until every row is finished; `submit([(row, asked)])` -> [(new_ids, stop)]."""
    todo = list(rows)
    while todo:
        live = []
        for row in todo:
            asked = forcing.request(row)
            if asked:
                live.append((row, asked))
            elif bar:
                bar.update(1)
        outputs = submit(live) if live else []
        todo = [row for (row, asked), (new_ids, stop) in zip(live, outputs)
                if forcing.advance(row, new_ids, asked, stop)]
        if bar:
            bar.update(len(live) - len(todo))


def _timed_rounds(rows: list[Row], forcing: Forcing, submit, progress: bool) -> float:
    """`_rounds` with a progress bar when asked; the generation time in seconds."""
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(rows), desc="generating", unit="response")
    start = time.perf_counter()
    _rounds(rows, forcing, submit, bar)
    if bar:
        bar.close()
    return time.perf_counter() - start


def _forcing(tokenizer, settings: GenerationSettings, eos_ids: list[int], context_len: int | None) -> Forcing:
    wait_ids = tokenizer(settings.wait_text, add_special_tokens=False)["input_ids"] if settings.budget_forcing else []
    end_think = end_of_thinking_id(tokenizer, settings.end_of_thinking, eos_ids)
    return Forcing(settings, eos_ids, wait_ids, end_think, context_len)


# ---------------------------------------------------------------------------------------------------------------
# hf backend


def hf_context_length(model, settings: GenerationSettings) -> int | None:
    """--max-model-len, else the loaded model's own context length (read from its live config)."""
    if settings.max_model_len is not None:
        return settings.max_model_len
    config = getattr(model, "config", None)
    return context_length(config.to_dict())[0] if config is not None else None


def generate_hf(model, tokenizer, rows: list[Row], settings: GenerationSettings, eos_ids: list[int],
                progress: bool = True, context_len: int | None = None) -> float:
    """Fill every row's gen_ids; returns the generation wall time in seconds."""
    import torch
    from transformers import GenerationConfig

    greedy = settings.temperature == 0
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    forcing = _forcing(tokenizer, settings, eos_ids, context_len)
    device = next(model.parameters()).device

    def submit(live: list[tuple[Row, int]]) -> list[tuple[list[int], None]]:
        order = sorted(range(len(live)), key=lambda i: len(live[i][0].prompt_ids) + len(live[i][0].gen_ids))
        out: list = [None] * len(live)
        for b in range(0, len(order), settings.batch_size):  # similar lengths together: less padding
            batch = [live[i] for i in order[b : b + settings.batch_size]]
            inputs = [r.prompt_ids + r.gen_ids for r, _ in batch]
            width = max(map(len, inputs))
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for i, seq in enumerate(inputs):
                ids[i, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
                mask[i, width - len(seq) :] = 1
            # One length for the batch: what the hungriest row asked for, but never past any row's context (a row
            # that wanted more goes on in the next round).
            new = min(max(asked for _, asked in batch), min(forcing.room(r) for r, _ in batch))
            stops = sorted({t for r, _ in batch for t in forcing.stop_ids(r)})
            config = GenerationConfig(
                do_sample=not greedy, temperature=None if greedy else settings.temperature,
                top_p=None if greedy else settings.top_p, top_k=None if greedy else 0, min_p=None,
                repetition_penalty=1.0, num_beams=1, max_new_tokens=new, eos_token_id=stops, pad_token_id=pad_id,
            )
            with torch.no_grad():
                result = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                        generation_config=config)
            for k, i in enumerate(order[b : b + settings.batch_size]):
                out[i] = (result[k, width:].tolist(), None)
        return out

    return _timed_rounds(rows, forcing, submit, progress)


# ---------------------------------------------------------------------------------------------------------------
# vllm backend

_VLLM_DTYPES = {"auto": "bfloat16", "bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16",
                "float16": "float16", "fp32": "float32", "float32": "float32"}


@contextlib.contextmanager
def merged_checkpoint(spec: ModelSpec):
    """A folder vLLM can load: the model's own, or base + plugin written once by the streaming `plugin_apply`.

    The merged folder is in the base's stored dtype (plugin tensors are cast to it, the rest copied byte for byte) and
    is removed when the block ends. `plugin_apply` checks the plugin against the base by the same rule as the hf
    backend (fingerprint included unless `force_plugin`); `evaluate` already ran that check before anything loaded.
    """
    from ..checkpoint import resolve_path

    if not spec.plugin:
        yield str(resolve_path(spec.path))
        return
    from ..plugin import plugin_apply

    tmp = Path(tempfile.mkdtemp(prefix="sfn-eval-merged-"))
    try:
        plugin_apply(spec.path, spec.plugin, tmp / "model", force=spec.force_plugin,
                     command=f"sfn eval --backend vllm (merged {spec.label} for the engine)")
        yield str(tmp / "model")
    finally:
        try:
            shutil.rmtree(tmp)
        except OSError as exc:
            print(f"warning: could not remove the merged checkpoint {tmp} ({exc}); delete it by hand.", file=sys.stderr)


class VllmEngine:
    """One vLLM engine for one model, used for all of its tasks: built once, shut down explicitly by `close`.

    Why one engine per model and an explicit shutdown: building an engine costs minutes, and a second engine in one
    process while the first still holds its GPU memory runs out of memory.
    """

    def __init__(self, spec: ModelSpec, settings: GenerationSettings):
        self.vllm = import_vllm()
        self.settings = settings
        self.expected_context = check_max_model_len(spec, settings)
        self._stack = contextlib.ExitStack()
        try:
            path = self._stack.enter_context(merged_checkpoint(spec))
            kwargs = dict(model=path, tokenizer=path, tensor_parallel_size=settings.tensor_parallel_size,
                          seed=settings.seed, dtype=_VLLM_DTYPES.get(settings.dtype, settings.dtype),
                          generation_config="vllm", gpu_memory_utilization=settings.gpu_memory_utilization)
            if settings.max_model_len is not None:
                kwargs["max_model_len"] = settings.max_model_len
            self.llm = self.vllm.LLM(**kwargs)
        except BaseException:
            self._stack.close()
            raise
        self.info = self._read_info()

    def _read_info(self) -> dict:
        """Engine facts read from the live engine: context length and dtype in effect."""
        config = getattr(getattr(self.llm, "llm_engine", None), "model_config", None)
        length = getattr(config, "max_model_len", None)
        if length is None:
            print(f"note: could not read max_model_len from the vLLM engine; using {self.expected_context} "
                  "(derived from config.json).", file=sys.stderr)
            length = self.expected_context
        return {"engine": "vllm", "context_length": length, "dtype": str(getattr(config, "dtype", None))}

    def generate(self, tokenizer, rows: list[Row], eos_ids: list[int], progress: bool = True) -> float:
        """Fill every row's gen_ids; returns the generation wall time in seconds."""
        settings, vllm = self.settings, self.vllm
        forcing = _forcing(tokenizer, settings, eos_ids, self.info["context_length"])

        def submit(live: list[tuple[Row, int]]) -> list[tuple[list[int], int | None]]:
            params = [
                vllm.SamplingParams(
                    n=1, temperature=settings.temperature, top_p=settings.top_p if settings.temperature else 1.0,
                    top_k=-1, min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
                    max_tokens=asked, min_tokens=0,
                    seed=settings.seed * 1_000_003 + r.problem_index * 1009 + r.sample_index + 7919 * r.rounds,
                    stop_token_ids=forcing.stop_ids(r), ignore_eos=False, skip_special_tokens=True,
                )
                for r, asked in live
            ]
            prompts = [{"prompt_token_ids": r.prompt_ids + r.gen_ids} for r, _ in live]
            out = []
            for result in self.llm.generate(prompts, params, use_tqdm=False):
                done = result.outputs[0]
                stop = None
                if done.finish_reason == "stop":  # stop_reason: the stop token id; None for the model's EOS
                    stop = done.stop_reason if isinstance(done.stop_reason, int) else eos_ids[0]
                out.append((list(done.token_ids), stop))
            return out

        return _timed_rounds(rows, forcing, submit, progress)

    def close(self) -> None:
        """Shut the engine down, free its GPU memory and distributed state, remove the merged folder."""
        llm, self.llm = getattr(self, "llm", None), None
        try:
            if llm is not None:
                _shutdown_vllm(llm)
                del llm
                gc.collect()
        finally:
            self._stack.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _shutdown_vllm(llm) -> str:
    """Stop a vLLM engine now rather than at garbage collection; returns how.

    vLLM versions differ: newer ones have `LLM.shutdown()`; current V1 ones stop the engine core (its process or
    in-process executor) with `llm.llm_engine.engine_core.shutdown()`. Then the distributed groups are destroyed and
    the CUDA cache emptied (`vllm.distributed.parallel_state.cleanup_dist_env_and_memory`), as vLLM's own tests do
    between engines.
    """
    if callable(getattr(llm, "shutdown", None)):
        llm.shutdown()
        how = "LLM.shutdown()"
    else:
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None and callable(getattr(core, "shutdown", None)):
            core.shutdown()
            how = "llm_engine.engine_core.shutdown()"
        else:
            how = "garbage collection"
            print("note: this vLLM offers no engine shutdown; relying on garbage collection to free the GPU.",
                  file=sys.stderr)
    try:
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory
    except ImportError:
        cleanup_dist_env_and_memory = None
    if cleanup_dist_env_and_memory is not None:
        cleanup_dist_env_and_memory()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return how


__all__ = ["ModelSpec", "GenerationSettings", "Row", "load_tokenizer", "eos_token_ids", "tokenizer_signature",
           "build_prompt_ids", "load_hf_model", "generate_hf", "VllmEngine", "check_vllm",
           "check_max_model_len", "context_length", "make_rows", "Forcing"]
