"""Generation: prompts -> responses, with the Hugging Face `generate` backend (default, CPU ok) or vLLM.

Why every sampling setting is explicit: a checkpoint's `generation_config.json` carries defaults (top_k=20,
repetition_penalty=1.05, ...) that differ between models; a comparison must sample every model the same way. The hf
backend therefore replaces the model's generation config with an empty one and passes a complete `GenerationConfig`
(temperature, top_p, top_k=0 i.e. off, repetition_penalty=1.0, max_new_tokens, EOS ids); vLLM gets
`generation_config="vllm"` and a `SamplingParams` with every knob set. Only the EOS ids are taken from the checkpoint
(tokenizer EOS plus `generation_config.json`'s eos_token_id), because they define where a response ends.

Temperature 0 means greedy decoding. Each (problem, sample) is one row; rows are batched with left padding.

Budget forcing (s1, Muennighoff et al. 2025), `budget_forcing=N`: when a row ends with EOS, its EOS is dropped and
`wait_text` ("Wait") is appended to its tokens, and generation continues from there -- at most N times per row. The
token budget is `max_new_tokens` for everything the row generates, forced "Wait" tokens included; a row that reaches
it stops there (finish_reason "length") and no end-of-thinking string is forced. `waits` records how many were used.

A model is a folder or hub id, or a base plus a plugin file: the base is loaded with `from_pretrained` and the
plugin's tensors overwrite the matching state-dict entries (every plugin name must exist with the same shape).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import SfnError


@dataclass
class ModelSpec:
    """What to evaluate: a checkpoint (folder or hub id), optionally with a plugin file applied on top."""

    path: str
    plugin: str | None = None
    label: str | None = None

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


def apply_plugin(model, plugin_path: str) -> list[str]:
    """Overwrite the model's tensors with the plugin's; every plugin name must exist with the same shape."""
    import torch
    from safetensors.torch import load_file

    from ..plugin import read_plugin_metadata

    read_plugin_metadata(plugin_path)  # checks that it is a plugin file
    tensors = load_file(str(plugin_path))
    state = model.state_dict()
    missing = [n for n in tensors if n not in state]
    if missing:
        raise SfnError(f"plugin {plugin_path} holds {len(missing)} tensor(s) the base model lacks (e.g. {missing[0]!r}); "
                       "apply it to the base it was extracted from.")
    for name, value in tensors.items():
        if tuple(state[name].shape) != tuple(value.shape):
            raise SfnError(f"plugin tensor {name!r} has shape {tuple(value.shape)} but the base has "
                           f"{tuple(state[name].shape)}; apply it to the base it was extracted from.")
    with torch.no_grad():
        for name, value in tensors.items():
            state[name].copy_(value.to(dtype=state[name].dtype, device=state[name].device))
    return sorted(tensors)


def load_hf_model(spec: ModelSpec, settings: GenerationSettings):
    """(model in eval mode with the plugin applied, tokenizer with left padding)."""
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
        apply_plugin(model, spec.plugin)
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
# Rows and budget forcing (backend-independent)


def make_rows(prompt_ids: list[list[int]], samples: int) -> list[Row]:
    return [Row(p, s, ids) for p, ids in enumerate(prompt_ids) for s in range(samples)]


def advance(row: Row, new_ids: list[int], eos_ids: set[int], settings: GenerationSettings, wait_ids: list[int],
            stopped: bool = False) -> bool:
    """Add one round's output to a row; return True when the row must generate again (a forced "Wait").

    `stopped` says the backend saw an EOS even if it is not among `new_ids` (vLLM may leave it out).
    """
    for i, tok in enumerate(new_ids):
        if tok in eos_ids:
            new_ids, stopped = new_ids[:i], True
            break
    budget = settings.max_new_tokens - len(row.gen_ids)
    if len(new_ids) >= budget:
        row.gen_ids += new_ids[:budget]
        row.finish_reason = "length"
        return False
    row.gen_ids += new_ids
    if not stopped:
        row.finish_reason = "length"
        return False
    if row.waits < settings.budget_forcing and len(row.gen_ids) + len(wait_ids) < settings.max_new_tokens:
        row.gen_ids += wait_ids
        row.waits += 1
        row.finish_reason = None
        return True
    row.finish_reason = "stop"
    return False


# ---------------------------------------------------------------------------------------------------------------
# hf backend


def generate_hf(model, tokenizer, rows: list[Row], settings: GenerationSettings, eos_ids: list[int],
                progress: bool = True) -> float:
    """Fill every row's gen_ids; returns the generation wall time in seconds."""
    import torch
    from transformers import GenerationConfig

    greedy = settings.temperature == 0
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    wait_ids = tokenizer(settings.wait_text, add_special_tokens=False)["input_ids"] if settings.budget_forcing else []
    eos_set = set(eos_ids)
    device = next(model.parameters()).device
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(rows), desc="generating", unit="response")
    start = time.perf_counter()
    todo = list(rows)
    while todo:
        todo.sort(key=lambda r: len(r.prompt_ids) + len(r.gen_ids))  # similar lengths together: less padding
        again: list[Row] = []
        for b in range(0, len(todo), settings.batch_size):
            batch = todo[b : b + settings.batch_size]
            inputs = [r.prompt_ids + r.gen_ids for r in batch]
            width = max(map(len, inputs))
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for i, seq in enumerate(inputs):
                ids[i, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
                mask[i, width - len(seq) :] = 1
            budget = max(settings.max_new_tokens - len(r.gen_ids) for r in batch)
            config = GenerationConfig(
                do_sample=not greedy, temperature=None if greedy else settings.temperature,
                top_p=None if greedy else settings.top_p, top_k=None if greedy else 0, min_p=None,
                repetition_penalty=1.0, num_beams=1, max_new_tokens=budget, eos_token_id=eos_ids,
                pad_token_id=pad_id,
            )
            with torch.no_grad():
                out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
            for i, row in enumerate(batch):
                if advance(row, out[i, width:].tolist(), eos_set, settings, wait_ids):
                    again.append(row)
                elif bar:
                    bar.update(1)
        todo = again
    if bar:
        bar.close()
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------------------------
# vllm backend


@contextlib.contextmanager
def _merged_folder(spec: ModelSpec, settings: GenerationSettings):
    """vLLM loads weights from a folder: a plugin is applied by writing a temporary merged checkpoint."""
    from ..checkpoint import copy_side_files, resolve_path

    if not spec.plugin:
        yield str(resolve_path(spec.path))
        return
    model, _ = load_hf_model(spec, GenerationSettings(dtype=settings.dtype, device="cpu"))
    with tempfile.TemporaryDirectory(prefix="sfn-eval-merged-") as tmp:
        model.save_pretrained(tmp)
        copy_side_files(resolve_path(spec.path), Path(tmp))
        free_model(model)
        yield tmp


def generate_vllm(spec: ModelSpec, tokenizer, rows: list[Row], settings: GenerationSettings, eos_ids: list[int],
                  progress: bool = True) -> float:
    """Fill every row's gen_ids with vLLM (GPU only); returns the generation wall time in seconds."""
    try:
        import vllm
    except ImportError:
        raise SfnError("--backend vllm needs vLLM installed (pip install 'sfn-train[vllm]' on a GPU machine); "
                       "or use --backend hf.") from None
    import torch

    if not torch.cuda.is_available():
        raise SfnError("--backend vllm needs a CUDA GPU and none is visible; use --backend hf on this machine.")
    wait_ids = tokenizer(settings.wait_text, add_special_tokens=False)["input_ids"] if settings.budget_forcing else []
    eos_set = set(eos_ids)
    dtype = {"auto": "bfloat16", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(settings.dtype,
                                                                                                  settings.dtype)
    with _merged_folder(spec, settings) as path:
        llm = vllm.LLM(model=path, tokenizer=path, tensor_parallel_size=settings.tensor_parallel_size,
                       seed=settings.seed, dtype=dtype, generation_config="vllm",
                       gpu_memory_utilization=settings.gpu_memory_utilization)
        start = time.perf_counter()
        todo = list(rows)
        while todo:
            params = [
                vllm.SamplingParams(
                    n=1, temperature=settings.temperature, top_p=settings.top_p if settings.temperature else 1.0,
                    top_k=-1, min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
                    max_tokens=settings.max_new_tokens - len(r.gen_ids), min_tokens=0,
                    seed=settings.seed * 1_000_003 + r.problem_index * 1009 + r.sample_index + 7919 * r.waits,
                    stop_token_ids=eos_ids, ignore_eos=False, skip_special_tokens=True,
                )
                for r in todo
            ]
            prompts = [{"prompt_token_ids": r.prompt_ids + r.gen_ids} for r in todo]
            outputs = llm.generate(prompts, params, use_tqdm=progress)
            again = []
            for row, out in zip(todo, outputs):
                done = out.outputs[0]
                if advance(row, list(done.token_ids), eos_set, settings, wait_ids, done.finish_reason == "stop"):
                    again.append(row)
            todo = again
        seconds = time.perf_counter() - start
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    return seconds


def library_versions() -> dict:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("sfn-train", "torch", "transformers", "math-verify", "vllm", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


__all__ = ["ModelSpec", "GenerationSettings", "Row", "load_tokenizer", "eos_token_ids", "tokenizer_signature",
           "build_prompt_ids", "load_hf_model", "apply_plugin", "generate_hf", "generate_vllm", "make_rows",
           "advance", "library_versions"]
