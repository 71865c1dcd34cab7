"""Tiny models and a local tokenizer, built from configs with no downloads.

Used by the lab (its base model) and by the tests (fixtures for every supported architecture). The tokenizer is
character-level: exact, tiny, and enough for the lab's arithmetic text. Its ChatML template marks assistant turns with
`{% generation %}` so that TRL's `assistant_only_loss` works on it.
"""

from __future__ import annotations

from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{%- else %}{{ message['content'] + '<|im_end|>' }}{%- endif %}"
    "{{ '\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{%- endif %}"
)


def build_tokenizer():
    """A byte-level tokenizer with one token per byte (BPE without merges) plus ChatML specials.

    Byte-level, like GPT-2/Qwen, so that transformers' Qwen2 tokenizer class -- which `AutoTokenizer` picks for a
    qwen2 checkpoint and which re-applies its own byte-level pre-tokenizer -- reads the saved files back exactly.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_chars = sorted(alphabet, key=lambda ch: ord(ch))
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *byte_chars])}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


# Mixture-of-experts families: 4 experts, 2 per token, expert width 16. DeepSeek-V3 has multi-head latent attention
# (q and kv latents of rank 16), one shared expert, and its first layer dense (`first_k_dense_replace`); Llama 4's
# first layer is dense too (`moe_layers`).
MOE_ARCHS = ("qwen3_moe", "qwen2_moe", "gpt_oss", "deepseek_v3", "mixtral", "llama4_text")


def _moe_kwargs(arch: str, hidden: int, layers: int) -> dict:
    kw = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
              num_experts_per_tok=2)
    if arch != "gpt_oss":  # GPT-OSS's YaRN rope is defined against its own (long) context length
        kw["max_position_embeddings"] = 512
    if arch == "qwen3_moe":
        kw.update(head_dim=hidden // 4, intermediate_size=hidden * 2, moe_intermediate_size=16, num_experts=4)
    elif arch == "qwen2_moe":  # with a gated shared expert
        kw.update(intermediate_size=hidden * 2, moe_intermediate_size=16, num_experts=4,
                  shared_expert_intermediate_size=16)
    elif arch == "gpt_oss":
        kw.update(head_dim=hidden // 4, intermediate_size=16, num_local_experts=4,
                  layer_types=["sliding_attention", "full_attention"] * (layers // 2) + ["sliding_attention"] * (layers % 2))
    elif arch == "deepseek_v3":
        kw.update(num_key_value_heads=4, intermediate_size=hidden * 2, moe_intermediate_size=16, n_routed_experts=4,
                  n_shared_experts=1, n_group=1, topk_group=1, first_k_dense_replace=1, q_lora_rank=16,
                  kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)
    elif arch == "mixtral":
        kw.update(intermediate_size=16, num_local_experts=4)
    elif arch == "llama4_text":
        kw.update(head_dim=hidden // 4, intermediate_size=16, intermediate_size_mlp=hidden * 2, num_local_experts=4,
                  num_experts_per_tok=1, moe_layers=list(range(1, layers)))
    return kw


def tiny_config(arch: str = "qwen2", vocab_size: int = 320, hidden: int = 64, layers: int = 4, **overrides):
    """A small config of the named family.

    Dense: qwen2, llama, qwen3, gpt_neox, gpt2, phi, falcon, mistral. Mixture of experts (`MOE_ARCHS`): qwen3_moe,
    qwen2_moe, gpt_oss, deepseek_v3 (with MLA), mixtral, llama4_text.
    """
    from transformers import AutoConfig

    common = dict(vocab_size=vocab_size, **overrides)
    if arch in MOE_ARCHS:
        kw = _moe_kwargs(arch, hidden, layers)
    elif arch == "gpt2":
        kw = dict(n_embd=hidden, n_layer=layers, n_head=4, n_positions=512)
    elif arch == "gpt_neox":
        kw = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=hidden * 2,
                  max_position_embeddings=512)
    elif arch == "falcon":
        kw = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4, new_decoder_architecture=False,
                  multi_query=False, parallel_attn=False, bias=True)
    elif arch == "phi":
        kw = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=hidden * 2,
                  max_position_embeddings=512)
    else:  # llama-like: qwen2, qwen3, llama, mistral
        kw = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=hidden * 2, max_position_embeddings=512)
        if arch == "qwen3":
            kw["head_dim"] = hidden // 4
    kw.update(common)
    return AutoConfig.for_model(arch, **kw)


def tiny_model(arch: str = "qwen2", seed: int = 0, **config_overrides):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(arch, **config_overrides)
    # GPT-OSS's attention sinks need the eager kernel (transformers refuses sdpa for it).
    eager = arch in ("gpt2", "falcon", "gpt_oss")
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager" if eager else None)


def save_tiny_checkpoint(out: str | Path, arch: str = "qwen2", seed: int = 0, dtype=None, max_shard_size=None,
                         **config_overrides) -> Path:
    """Write a complete HF checkpoint folder (weights, config, tokenizer, generation config)."""
    out = Path(out)
    tokenizer = build_tokenizer()
    model = tiny_model(arch, seed=seed, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                       eos_token_id=tokenizer.eos_token_id, **config_overrides)
    if dtype is not None:
        model = model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    tokenizer.save_pretrained(out)
    return out
