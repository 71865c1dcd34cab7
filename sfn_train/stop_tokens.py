"""Stop tokens that match the chat template: a fine-tune stops where its training turns ended.

A base model's EOS is often not the token its chat template ends a turn with: Qwen2.5-Math's tokenizer and
generation config stop on `<|endoftext|>` (id 151643), while its ChatML template closes every turn with `<|im_end|>`.
A fine-tune trained on that template learns to write `<|im_end|>` and then keeps going, because nothing told the
generator (transformers' `generate`, `sfn eval`, vLLM: all read `generation_config.json`'s `eos_token_id`) that it
ends a response. `sfn train` therefore finds the template's end-of-turn token by rendering a one-turn conversation and
reading the token that follows the assistant's text, and when it is not an EOS of the generation config, adds it to
the fine-tune's generation config (and says so): the saved checkpoint then stops at the end of its turn.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("sfn_train")

_PROBE = "sfnEndOfTurnProbe"


def template_end_of_turn(tokenizer) -> int | None:
    """The id of the special token the chat template writes right after an assistant turn's text; None if the
    tokenizer has no chat template or the template ends a turn with no special token."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    turns = [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": _PROBE}]
    try:
        text = tokenizer.apply_chat_template(turns, tokenize=False)
    except Exception:  # noqa: BLE001 - a template that refuses this conversation defines no end of turn we can read
        return None
    at = text.rfind(_PROBE)
    if at < 0:
        return None
    after = tokenizer(text[at + len(_PROBE):], add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return after[0] if after and after[0] in special else None


def eos_ids(value) -> list[int]:
    """A generation config's or tokenizer's `eos_token_id` (None, one id or a list) as a list."""
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def match_stop_tokens(model, tokenizer) -> dict:
    """Make the model's generation config stop at the template's end-of-turn token; a record for the manifest.

    Called before training (the generation config is saved with the fine-tune). The tokenizer itself is left as it
    is: its `eos_token` is what TRL appends to plain-text rows, and changing it would change the training data.
    """
    end = template_end_of_turn(tokenizer)
    config = getattr(model, "generation_config", None)
    if end is None or config is None:
        return {}
    configured = eos_ids(config.eos_token_id)
    record = {"end_of_turn_token": tokenizer.convert_ids_to_tokens(end), "end_of_turn_id": end,
              "tokenizer_eos_id": tokenizer.eos_token_id, "generation_eos_ids_loaded": configured}
    if end in configured:
        return {**record, "added_to_generation_config": False}
    fixed = [*configured, *[i for i in eos_ids(tokenizer.eos_token_id) if i not in configured], end]
    config.eos_token_id = fixed
    tokenizer_part = ("is the tokenizer's EOS" if end == tokenizer.eos_token_id else
                      f"is not the tokenizer's EOS ({tokenizer.eos_token})")
    logger.warning(
        "stop tokens: the chat template ends a turn with %s (id %d), which %s and not an EOS of the generation "
        "config (eos_token_id %s): added it, so the fine-tune's generation_config.json has eos_token_id %s and "
        "generation (transformers, sfn eval, vLLM) stops at the end of a turn.",
        record["end_of_turn_token"], end, tokenizer_part, configured or "unset", fixed)
    return {**record, "added_to_generation_config": True, "generation_eos_ids_saved": fixed}
