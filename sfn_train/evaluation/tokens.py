"""Tokenizer side of generation: loading, EOS ids, the signature two models must share, prompt ids."""

from __future__ import annotations

import hashlib
import json

from ..errors import SfnError


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
