"""Module roles across architectures, and the pure selection function behind the Freeze gadget.

A *role* names what a weight does, whatever a model family calls it: `o_proj` is the attention output projection in
Llama/Qwen (`self_attn.o_proj`), GPT-2 (`attn.c_proj`), GPT-NeoX (`attention.dense`), Phi (`self_attn.dense`),
Falcon/Bloom (`self_attention.dense`), OPT/GPT-J (`out_proj`). An entry of `trainable_modules` that is not a role is a
regular expression searched in the full parameter name.

`select_names` works on tensor names only, so the trainer (parameters of a live model) and the gadgets (tensor names
of safetensors checkpoints) resolve a selection through the same code.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from .errors import SfnError

# Attention containers seen across families: Llama/Qwen/Mistral/Gemma/Phi `self_attn`, GPT-2/GPT-J `attn`,
# GPT-NeoX `attention`, Falcon/Bloom `self_attention`.
_ATTN = r"(?:self_attn|attn|attention|self_attention)"
_MLP = r"(?:mlp|feed_forward|ffn)"

# The token embedding (position embeddings such as GPT-2's `wpe` are not it) and the output head's weight: a head tied
# to the embedding (`tie_word_embeddings`) is that same matrix, and `save_pretrained` stores it once, under the
# embedding's name (`tied_aliases`).
TOKEN_EMBEDDING = r"(?:^|\.)(?:embed_tokens|wte|embed_in|word_embeddings)\.weight$"
HEAD_WEIGHT = r"(?:^|\.)(?:lm_head|embed_out)\.weight$"
TIED_HEAD_NAME = "lm_head.weight"

ROLE_PATTERNS: dict[str, list[str]] = {
    "q_proj": [rf"\.{_ATTN}\.(?:q_proj|query|wq)\."],
    "k_proj": [rf"\.{_ATTN}\.(?:k_proj|key|wk)\."],
    "v_proj": [rf"\.{_ATTN}\.(?:v_proj|value|wv)\."],
    # Fused query/key/value projections (GPT-2 c_attn, GPT-NeoX/Falcon/Bloom query_key_value, Phi-3 qkv_proj).
    "qkv_proj": [rf"\.{_ATTN}\.(?:qkv_proj|c_attn|query_key_value|Wqkv)\."],
    "o_proj": [rf"\.{_ATTN}\.(?:o_proj|c_proj|dense|out_proj|wo)\."],
    "gate_proj": [rf"\.{_MLP}\.(?:gate_proj|w1)\."],
    "up_proj": [rf"\.{_MLP}\.(?:up_proj|c_fc|dense_h_to_4h|fc1|fc_in|w3)\.", r"\.layers\.\d+\.fc1\."],
    # Phi-3 fuses gate and up projections into one matrix.
    "gate_up_proj": [rf"\.{_MLP}\.gate_up_proj\."],
    "down_proj": [rf"\.{_MLP}\.(?:down_proj|c_proj|dense_4h_to_h|fc2|fc_out|w2)\.", r"\.layers\.\d+\.fc2\."],
    # Every normalisation weight and bias: per-layer norms, q/k norms (Qwen3, Gemma 3) and the final norm.
    "norm": [r"(?:^|\.)[A-Za-z_0-9]*(?:norm|ln_\d+|ln_f)[A-Za-z_0-9]*\.(?:weight|bias)$"],
    "embed": [TOKEN_EMBEDDING, r"(?:^|\.)(?:wpe|embed_positions)\.weight$"],
    "lm_head": [HEAD_WEIGHT, r"(?:^|\.)(?:lm_head|embed_out)\.bias$"],
}
# Groups users think in, and the paper's names for them.
ROLE_GROUPS: dict[str, list[str]] = {
    "attn": ["q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj"],
    "qkv": ["q_proj", "k_proj", "v_proj", "qkv_proj"],
    "mlp": ["gate_proj", "up_proj", "gate_up_proj", "down_proj"],
}
ALL = "all"

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """The decoder-layer index a tensor belongs to, or None for embeddings, final norm and head."""
    match = _LAYER_RE.search(name)
    return int(match.group(1)) if match else None


def with_layer_index(name: str, index: int) -> str:
    """`name` moved to decoder layer `index` (used when layers are removed and the rest renumbered)."""
    match = _LAYER_RE.search(name)
    if not match:
        return name
    return name[: match.start(1)] + str(index) + name[match.end(1) :]


def num_layers(names: Iterable[str]) -> int:
    indices = [i for i in map(layer_index, names) if i is not None]
    return max(indices) + 1 if indices else 0


def normalize_modules(modules: str | Sequence[str] | None) -> list[str]:
    """`"all"`, `"o_proj,q_proj"`, `["o_proj"]` -> a list of entries."""
    if modules is None:
        return ["o_proj"]
    if isinstance(modules, str):
        modules = [modules]
    entries: list[str] = []
    for item in modules:
        entries.extend(part.strip() for part in str(item).split(",") if part.strip())
    if not entries:
        raise SfnError("trainable_modules is empty: name at least one role (e.g. o_proj) or `all`.")
    return entries


def parse_layers(layers: str | int | Sequence[str | int] | None) -> list[int] | None:
    """`"all"` -> None; `"0-11"` -> [0..11]; `[3, 5]`, `"3,5"`, `["8-15"]` -> indices."""
    if layers is None:
        return None
    if isinstance(layers, (str, int)):
        layers = [layers]
    items: list[str] = []
    for item in layers:
        items.extend(part.strip() for part in str(item).split(",") if part.strip())
    if not items or items == [ALL]:
        return None
    indices: set[int] = set()
    for item in items:
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if not match:
            raise SfnError(
                f"trainable_layers entry {item!r} is not a layer index or range: use `all`, `0-11`, or a list like [3, 5]."
            )
        start, end = int(match.group(1)), int(match.group(2) or match.group(1))
        if end < start:
            raise SfnError(f"trainable_layers range {item!r} is reversed: write it as {end}-{start}.")
        indices.update(range(start, end + 1))
    return sorted(indices)


def _compile(entry: str) -> list[re.Pattern]:
    if entry in ROLE_GROUPS:
        return [re.compile(p) for role in ROLE_GROUPS[entry] for p in ROLE_PATTERNS[role]]
    if entry in ROLE_PATTERNS:
        return [re.compile(p) for p in ROLE_PATTERNS[entry]]
    try:
        return [re.compile(entry)]
    except re.error as exc:
        raise SfnError(
            f"trainable_modules entry {entry!r} is neither a role ({', '.join(known_roles())}) nor a valid "
            f"regular expression ({exc}); fix the pattern."
        ) from None


def known_roles() -> list[str]:
    return [*ROLE_PATTERNS, *ROLE_GROUPS]


def module_summary(names: Iterable[str]) -> list[str]:
    """Distinct module paths with layer numbers folded to `*`: what a user needs to write a pattern."""
    seen: dict[str, None] = {}
    for name in names:
        module = name.rsplit(".", 1)[0] if "." in name else name
        seen[_LAYER_RE.sub(lambda m: m.group(0).replace(m.group(1), "*"), module)] = None
    return list(seen)


def select_names(
    names: Sequence[str],
    modules: str | Sequence[str] | None = "o_proj",
    layers: str | int | Sequence[str | int] | None = ALL,
    *,
    arch: str = "this model",
    aliases: dict[str, str] | None = None,
) -> list[str]:
    """The tensor names selected by (modules, layers), in the order of `names`.

    `aliases` maps extra names (a tied `lm_head.weight`) to the canonical name they share storage with, so that a
    role matching only the alias selects the canonical tensor. Tensors outside numbered decoder layers (embeddings,
    final norm, head) are not filtered by `layers`. An entry that matches nothing is an error naming `arch` and
    listing its modules: a typo must never silently train nothing.
    """
    entries = normalize_modules(modules)
    layer_set = parse_layers(layers)
    aliases = aliases or {}
    if layer_set is not None:
        n_layers = num_layers(names)
        out_of_range = [i for i in layer_set if i >= n_layers]
        if out_of_range:
            raise SfnError(
                f"trainable_layers {out_of_range} out of range: {arch} has {n_layers} layers (0-{n_layers - 1})."
            )

    def layer_ok(name: str) -> bool:
        index = layer_index(name)
        return layer_set is None or index is None or index in layer_set

    if ALL in entries:
        return [n for n in names if layer_ok(n)]

    candidates = [(n, n) for n in names] + [(alias, canon) for alias, canon in aliases.items()]
    chosen: set[str] = set()
    for entry in entries:
        patterns = _compile(entry)
        hits = {canon for name, canon in candidates if any(p.search(name) for p in patterns)}
        if not hits:
            modules_list = ", ".join(module_summary(names))
            hint = ""
            if entry in ("q_proj", "k_proj", "v_proj") and select_names_safe(names, "qkv_proj"):
                hint = f" {arch} fuses q, k and v into one matrix: use `qkv_proj`."
            raise SfnError(
                f"trainable_modules entry {entry!r} matches no parameter of {arch}.{hint} "
                f"Its modules are: {modules_list}"
            )
        chosen.update(h for h in hits if layer_ok(h))
    if not chosen:
        raise SfnError(
            f"trainable_modules {entries} match no parameter inside trainable_layers {layers!r} of {arch}: "
            "widen the layer range."
        )
    return [n for n in names if n in chosen]


def tied_aliases(names: Sequence[str], tied: bool) -> dict[str, str]:
    """`{"lm_head.weight": <the token embedding>}` for checkpoint tensor names whose head is tied and not stored.

    The `aliases` of `select_names` for tensors on disk, so that `lm_head` selects the shared matrix there as it does
    on a live model (where `select_parameters` sees the tie as one parameter under two names). Nothing when the head
    is stored, the checkpoint is not tied, or the token embedding is not exactly one tensor.
    """
    head = re.compile(HEAD_WEIGHT)
    if not tied or any(head.search(n) for n in names):
        return {}
    embedding = re.compile(TOKEN_EMBEDDING)
    found = [n for n in names if embedding.search(n)]
    return {TIED_HEAD_NAME: found[0]} if len(found) == 1 else {}


def select_names_safe(names: Sequence[str], entry: str) -> list[str]:
    patterns = _compile(entry)
    return [n for n in names if any(p.search(n) for p in patterns)]


def select_parameters(model, modules="o_proj", layers=ALL) -> list[str]:
    """Names (as `model.named_parameters()` gives them) of the parameters to train.

    Pure: reads names and tied-weight identity only, touches no value. Works on ZeRO-3 partitioned models too.
    """
    canonical: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in canonical:
            aliases[name] = canonical[id(param)]
        else:
            canonical[id(param)] = name
    return select_names(
        list(canonical.values()), modules, layers, arch=type(model).__name__, aliases=aliases
    )


def numel(param) -> int:
    """Element count that stays right under ZeRO-3, where a partitioned parameter's `numel()` is 0."""
    return int(getattr(param, "ds_numel", 0) or param.numel())


def apply_freeze(model, trainable: Sequence[str]) -> tuple[int, int]:
    """Set requires_grad on exactly the `trainable` parameters; return (trainable, total) element counts."""
    wanted = set(trainable)
    n_train = n_total = 0
    for name, param in model.named_parameters():
        param.requires_grad_(name in wanted)
        n_total += numel(param)
        n_train += numel(param) if name in wanted else 0
    if n_train == 0:
        raise SfnError("all parameters are frozen: the selection is empty; name at least one module to train.")
    return n_train, n_total


# --------------------------------------------------------------------------------------------------------------------
# `sfn select`
# --------------------------------------------------------------------------------------------------------------------
def select_cli_main(argv: list[str]) -> int:
    """`sfn select MODEL --modules o_proj --layers 0-3`: the trainable tensors, computed on a meta-device model."""
    import argparse

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    parser = argparse.ArgumentParser(prog="sfn select", description=select_cli_main.__doc__)
    parser.add_argument("model", help="checkpoint folder or hub id (only its config is read)")
    parser.add_argument("--modules", default="o_proj", help="comma-separated roles or regexes, or `all`")
    parser.add_argument("--layers", default="all", help="`all`, a range `0-11`, or `3,5`")
    parser.add_argument("--trust_remote_code", action="store_true")
    ns = parser.parse_args(argv)
    try:
        config = AutoConfig.from_pretrained(ns.model, trust_remote_code=ns.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise SfnError(f"cannot read the config of {ns.model} ({str(exc).splitlines()[0][:160]}).") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=ns.trust_remote_code)
    names = select_parameters(model, ns.modules.split(","), ns.layers.split(","))
    n_train, n_total = apply_freeze(model, names)
    shapes = dict(model.named_parameters())
    for name in names:
        print(f"{name}\t{list(shapes[name].shape)}")
    print(f"trainable: {n_train:,} of {n_total:,} params ({100 * n_train / n_total:.2f}%) in {len(names)} tensors")
    return 0

