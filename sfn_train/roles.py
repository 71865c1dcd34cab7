"""Module roles across architectures, and the pure selection function behind training only the named modules (the
paper's Freeze stethoscope; docs/gadgets.md maps the paper's terms to sfn's).

A *role* names what a weight does, whatever a model family calls it: `o_proj` is the attention output projection in
Llama/Qwen (`self_attn.o_proj`), GPT-2 (`attn.c_proj`), GPT-NeoX (`attention.dense`), Phi (`self_attn.dense`),
Falcon/Bloom (`self_attention.dense`), OPT/GPT-J (`out_proj`). An entry of `trainable_modules` that is not a role is a
regular expression searched in the full parameter name.

Mixture-of-experts blocks and DeepSeek's multi-head latent attention (MLA) have roles of their own (`experts`,
`shared_experts`, `router`, `kv_proj`), and the `mlp` group covers the whole feed-forward block, router included.

`select_names` works on tensor names only, in the names a live model gives its parameters. The gadgets read
checkpoints whose tensor names can differ (transformers 5 fuses the experts of Qwen3-MoE, DeepSeek-V3 and Mixtral
into one 3-D parameter in memory but saves one tensor per expert); they translate with `sfn_train.names` first, so a
selection means the same tensors in the trainer and in the gadgets.

Layer numbers name the layers of the decoder: in a model with several layer stacks (a vision tower next to the
language model), a layer range selects in the language model's stack only.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from .errors import SfnError

# Attention containers seen across families: Llama/Qwen/Mistral/Gemma/Phi `self_attn`, GPT-2/GPT-J `attn`,
# GPT-NeoX `attention`, Falcon/Bloom `self_attention`. Feed-forward containers: `mlp`, Llama 4 `feed_forward`, `ffn`,
# and Mixtral's on-disk `block_sparse_moe` (what an untranslated Mixtral checkpoint calls its MoE block).
_ATTN = r"(?:self_attn|attn|attention|self_attention)"
_MLP = r"(?:mlp|feed_forward|ffn|block_sparse_moe)"
# The projections of shared experts (DeepSeek `shared_experts`, Qwen2-MoE/Llama 4 `shared_expert`) and of routed
# experts stored one module per expert (`experts.3.gate_proj`) count for the per-projection roles too.
_PART = r"(?:shared_experts?\.|experts\.\d+\.)?"

# The token embedding (position embeddings such as GPT-2's `wpe` are not it) and the output head's weight: a head tied
# to the embedding (`tie_word_embeddings`) is that same matrix, and `save_pretrained` stores it once, under the
# embedding's name (`tied_aliases`).
TOKEN_EMBEDDING = r"(?:^|\.)(?:embed_tokens|wte|embed_in|word_embeddings)\.weight$"
HEAD_WEIGHT = r"(?:^|\.)(?:lm_head|embed_out)\.weight$"
TIED_HEAD_NAME = "lm_head.weight"

ROLE_PATTERNS: dict[str, list[str]] = {
    # MLA (DeepSeek-V2/V3): the query goes through a low-rank latent (q_a_proj, then q_b_proj), so both are q_proj.
    "q_proj": [rf"\.{_ATTN}\.(?:q_proj|query|wq|q_a_proj|q_b_proj)\."],
    "k_proj": [rf"\.{_ATTN}\.(?:k_proj|key|wk)\."],
    "v_proj": [rf"\.{_ATTN}\.(?:v_proj|value|wv)\."],
    # Fused query/key/value projections (GPT-2 c_attn, GPT-NeoX/Falcon/Bloom query_key_value, Phi-3 qkv_proj).
    "qkv_proj": [rf"\.{_ATTN}\.(?:qkv_proj|c_attn|query_key_value|Wqkv)\."],
    # MLA's key/value path: one latent shared by keys and values (kv_a_proj_with_mqa, which also makes the shared
    # rotary key) expanded per head into both (kv_b_proj). Neither is a key-only or value-only projection, so k_proj
    # and v_proj do not select them.
    "kv_proj": [rf"\.{_ATTN}\.(?:kv_a_proj_with_mqa|kv_b_proj|kv_proj)\."],
    "o_proj": [rf"\.{_ATTN}\.(?:o_proj|c_proj|dense|out_proj|wo)\."],
    # Mixture of experts. Listed before the per-projection roles: `sfn delta` files each tensor under the first role
    # that matches, so an expert's down projection is counted with the experts.
    # Routed experts: fused 3-D parameters in transformers 5 (`mlp.experts.gate_up_proj` [E, H, 2I], GPT-OSS
    # `..._bias`), or one module per expert (`mlp.experts.0.gate_proj.weight`, Mixtral `experts.0.w1.weight`).
    "experts": [rf"\.{_MLP}\.experts\."],
    # Always-active experts (DeepSeek `shared_experts`, Qwen2-MoE/Llama 4 `shared_expert`) and Qwen2-MoE's gate that
    # scales the shared expert's output.
    "shared_experts": [rf"\.{_MLP}\.(?:shared_experts?|shared_expert_gate)\."],
    # The router: the linear map from hidden state to expert scores (Qwen/DeepSeek/Mixtral `mlp.gate`, GPT-OSS
    # `mlp.router`, Llama 4 `feed_forward.router`), with DeepSeek's `e_score_correction_bias` buffer in checkpoints.
    "router": [rf"\.{_MLP}\.(?:gate|router)\."],
    "gate_proj": [rf"\.{_MLP}\.{_PART}(?:gate_proj|w1)\."],
    "up_proj": [rf"\.{_MLP}\.{_PART}(?:up_proj|c_fc|dense_h_to_4h|fc1|fc_in|w3)\.", r"\.layers\.\d+\.fc1\."],
    # Phi-3 fuses gate and up projections into one matrix; so does transformers 5 for routed experts
    # (`mlp.experts.gate_up_proj`, no `.weight`), whose gate and up halves cannot be trained apart.
    "gate_up_proj": [rf"\.{_MLP}\.{_PART}gate_up_proj\.", rf"\.{_MLP}\.experts\.gate_up_proj(?:_bias)?$"],
    "down_proj": [
        rf"\.{_MLP}\.{_PART}(?:down_proj|c_proj|dense_4h_to_h|fc2|fc_out|w2)\.",
        rf"\.{_MLP}\.experts\.down_proj(?:_bias)?$",
        r"\.layers\.\d+\.fc2\.",
    ],
    # Every normalisation weight and bias: per-layer norms, q/k norms (Qwen3, Gemma 3), MLA's latent norms, Falcon's
    # `ln_attn`/`ln_mlp` and GPT-2's `ln_1`/`ln_2`, and the final norm.
    "norm": [r"(?:^|\.)(?:ln_[A-Za-z0-9_]+|[A-Za-z_0-9]*norm[A-Za-z_0-9]*)\.(?:weight|bias)$"],
    "embed": [TOKEN_EMBEDDING, r"(?:^|\.)(?:wpe|embed_positions)\.weight$"],
    "lm_head": [HEAD_WEIGHT, r"(?:^|\.)(?:lm_head|embed_out)\.bias$"],
}
# Groups users think in, and the paper's names for them. `mlp` is the whole feed-forward block: a dense MLP, or an
# MoE block's routed experts, shared experts and router (the paper's MLP merge transplants the block).
ROLE_GROUPS: dict[str, list[str]] = {
    "attn": ["q_proj", "k_proj", "v_proj", "qkv_proj", "kv_proj", "o_proj"],
    "qkv": ["q_proj", "k_proj", "v_proj", "qkv_proj", "kv_proj"],
    "mlp": ["gate_proj", "up_proj", "gate_up_proj", "down_proj", "experts", "shared_experts", "router"],
}
ALL = "all"

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)\.")
# Path components that mark a stack as the language model's, or as an encoder beside it (vision, audio).
_DECODER_WORDS = {"language_model", "text_model", "llm", "decoder", "text"}
_ENCODER_WORDS = {"vision_tower", "vision_model", "visual", "vision", "vit", "image_encoder", "audio_tower",
                  "audio_model", "audio", "speech_encoder", "encoder"}


def layer_index(name: str) -> int | None:
    """The index of the layer a tensor belongs to in its stack, or None for embeddings, final norm and head."""
    match = _LAYER_RE.search(name)
    return int(match.group(1)) if match else None


def layer_stack(name: str) -> str | None:
    """The layer stack a tensor belongs to (`model.layers`, `model.vision_tower.encoder.layers`), or None."""
    match = _LAYER_RE.search(name)
    return name[: match.start(1) - 1].lstrip(".") if match else None


def layer_stacks(names: Iterable[str]) -> dict[str, int]:
    """Each layer stack among `names` -> its number of layers, in order of appearance."""
    stacks: dict[str, int] = {}
    for name in names:
        stack, index = layer_stack(name), layer_index(name)
        if stack is not None:
            stacks[stack] = max(stacks.get(stack, 0), index + 1)
    return stacks


def decoder_stack(names: Sequence[str], decoder: str | None = None, arch: str = "this model") -> str | None:
    """The stack whose layers `trainable_layers` numbers: the only one, or the language model's among several.

    `decoder` is the language model's module path when a live model tells it (`get_decoder()`); without it the stack
    is recognised by its path (`language_model`, `text_model` vs `vision_tower`, `audio_tower`, ...). None when
    the names hold no layer stack. Several stacks and no way to tell which one decodes is an error naming them.
    """
    stacks = layer_stacks(names)
    if len(stacks) <= 1:
        return next(iter(stacks), None)
    if decoder is not None:
        inside = [s for s in stacks if decoder == "" or s.startswith(decoder + ".")]
        if len(inside) == 1:
            return inside[0]
    words = {s: set(s.split(".")) for s in stacks}
    for pick in ([s for s in stacks if words[s] & _DECODER_WORDS], [s for s in stacks if not words[s] & _ENCODER_WORDS]):
        if len(pick) == 1:
            return pick[0]
    listed = ", ".join(f"{s} ({n} layers)" for s, n in stacks.items())
    raise SfnError(f"{arch} has several layer stacks ({listed}) and none is recognisably the language model's: "
                   "select layers with a regex naming the stack (e.g. 'model\\.language_model\\.layers\\.(0|1)\\.').")


def with_layer_index(name: str, index: int) -> str:
    """`name` moved to decoder layer `index` (used when layers are removed and the rest renumbered)."""
    match = _LAYER_RE.search(name)
    if not match:
        return name
    return name[: match.start(1)] + str(index) + name[match.end(1) :]


def num_layers(names: Iterable[str], stack: str | None = None) -> int:
    """Layers in `stack` (default: in any stack, the highest index + 1)."""
    indices = [layer_index(n) for n in names if layer_stack(n) is not None and (stack is None or layer_stack(n) == stack)]
    return max(indices) + 1 if indices else 0


def split_entries(text: str) -> list[str]:
    """`text` split at its top-level commas: a regex's `{1,3}` or `[a,b]` stays one entry."""
    parts, depth, current, escaped = [], 0, [], False
    for ch in text:
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch in "{[(":
            depth += 1
        elif ch in "}])":
            depth = max(depth - 1, 0)
        elif ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(ch)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def normalize_modules(modules: str | Sequence[str] | None) -> list[str]:
    """`"all"`, `"o_proj,q_proj"`, `["o_proj"]` -> a list of entries."""
    if modules is None:
        return ["o_proj"]
    if isinstance(modules, str):
        modules = [modules]
    entries: list[str] = []
    for item in modules:
        entries.extend(split_entries(str(item)))
    if not entries:
        raise SfnError("trainable_modules is empty: name at least one role (e.g. o_proj) or `all`.")
    return entries


def parse_layers(layers: str | int | Sequence[str | int] | None, key: str = "trainable_layers") -> list[int] | None:
    """`"all"` (or None) -> None; `"0-11"` -> [0..11]; `[3, 5]`, `"3,5"`, `["8-15"]` -> indices.

    An empty list is an error, not "all": a recipe that names no layer must not train every layer. `key`: the recipe
    key or flag the layers came from, as errors name it (`--layers` for the gadgets).
    """
    if layers is None:
        return None
    if isinstance(layers, (str, int)):
        layers = [layers]
    items: list[str] = []
    for item in layers:
        items.extend(part.strip() for part in str(item).split(",") if part.strip())
    if not items:
        raise SfnError(f"{key} is empty: name the layers to train (`all`, a range `0-11`, or [3, 5]).")
    if items == [ALL]:
        return None
    indices: set[int] = set()
    for item in items:
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if not match:
            raise SfnError(
                f"{key} entry {item!r} is not a layer index or range: use `all`, `0-11`, or a list like [3, 5]."
            )
        start, end = int(match.group(1)), int(match.group(2) or match.group(1))
        if end < start:
            raise SfnError(f"{key} range {item!r} is reversed: write it as {end}-{start}.")
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
    return fold_layers(name.rsplit(".", 1)[0] if "." in name else name for name in names)


def fold_layers(names: Iterable[str]) -> list[str]:
    """Distinct names with layer numbers folded to `*` (`model.layers.*.mlp.gate.weight`), in order."""
    return list(dict.fromkeys(_LAYER_RE.sub(lambda m: m.group(0).replace(m.group(1), "*"), n) for n in names))


def select_names(
    names: Sequence[str],
    modules: str | Sequence[str] | None = "o_proj",
    layers: str | int | Sequence[str | int] | None = ALL,
    *,
    arch: str = "this model",
    aliases: dict[str, str] | None = None,
    decoder: str | None = None,
    keys: tuple[str, str] = ("trainable_modules", "trainable_layers"),
) -> list[str]:
    """The tensor names selected by (modules, layers), in the order of `names`.

    `aliases` maps extra names (a tied `lm_head.weight`) to the canonical name they share storage with, so that a
    role matching only the alias selects the canonical tensor. Tensors outside numbered layers (embeddings, final
    norm, head) are not filtered by `layers`. `layers` numbers the decoder's stack (`decoder_stack`; `decoder` is the
    language model's module path when known): with a layer range, tensors of other stacks (a vision tower) are not
    selected. An entry that matches nothing is an error naming `arch` and listing its modules: a typo must never
    silently train nothing. `keys`: what errors call the modules and the layers (the recipe keys, or the gadgets'
    flags `--modules` / `--layers`).
    """
    modules_key, layers_key = keys
    entries = normalize_modules(modules)
    layer_set = parse_layers(layers, layers_key)
    aliases = aliases or {}
    stack = None
    if layer_set is not None:
        stack = decoder_stack(names, decoder, arch)
        n_layers = num_layers(names, stack)
        out_of_range = [i for i in layer_set if i >= n_layers]
        if out_of_range:
            where = f" in {stack}" if len(layer_stacks(names)) > 1 else ""
            raise SfnError(
                f"{layers_key} {out_of_range} out of range: {arch} has {n_layers} layers{where} (0-{n_layers - 1})."
            )

    def layer_ok(name: str) -> bool:
        if layer_set is None or layer_stack(name) is None:
            return True
        return layer_stack(name) == stack and layer_index(name) in layer_set

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
            if entry in ("k_proj", "v_proj") and select_names_safe(names, "kv_proj"):
                hint = (f" {arch} has latent attention (MLA): keys and values share kv_a_proj_with_mqa and kv_b_proj; "
                        "use `kv_proj` (or `qkv`).")
            elif entry in ("q_proj", "k_proj", "v_proj") and select_names_safe(names, "qkv_proj"):
                hint = f" {arch} fuses q, k and v into one matrix: use `qkv_proj`."
            elif entry in ("gate_proj", "up_proj") and select_names_safe(names, "gate_up_proj"):
                hint = f" {arch} holds gate and up projections as one fused tensor: use `gate_up_proj` (or `experts`)."
            raise SfnError(
                f"{modules_key} entry {entry!r} matches no parameter of {arch}.{hint} "
                f"Its modules are: {modules_list}"
            )
        chosen.update(h for h in hits if layer_ok(h))
    if not chosen:
        raise SfnError(
            f"{modules_key} {entries} match no parameter inside {layers_key} {layers!r} of {arch}: "
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


def select_parameters(model, modules="o_proj", layers=ALL, keys=("trainable_modules", "trainable_layers")) -> list[str]:
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
        list(canonical.values()), modules, layers, arch=type(model).__name__, aliases=aliases,
        decoder=decoder_path(model), keys=keys,
    )


def decoder_path(model) -> str | None:
    """The module path of the model's language model (`get_decoder()`), or None when the model does not say."""
    get_decoder = getattr(model, "get_decoder", None)
    try:
        decoder = get_decoder() if get_decoder is not None else None
    except (AttributeError, NotImplementedError, TypeError):
        return None
    if decoder is None:
        return None
    return next((name for name, module in model.named_modules() if module is decoder), None)


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
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .arguments import ArgumentParser

    parser = ArgumentParser(prog="sfn select", description=select_cli_main.__doc__)
    parser.add_argument("model", help="checkpoint folder or hub id (only its config is read)")
    parser.add_argument("--modules", default="o_proj", help="comma-separated roles or regexes, or `all`")
    parser.add_argument("--layers", default="all", help="`all`, a range `0-11`, or `3,5`")
    parser.add_argument("--trust_remote_code", action="store_true")
    ns = parser.parse_args(argv)
    from .preflight import check_model_source

    check_model_source(ns.model, "model")  # a mistyped folder or an unreachable hub: at once, not after retries
    try:
        config = AutoConfig.from_pretrained(ns.model, trust_remote_code=ns.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise SfnError(f"cannot read the config of {ns.model} ({str(exc).splitlines()[0][:160]}).") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=ns.trust_remote_code)
    names = select_parameters(model, ns.modules, ns.layers, keys=("--modules", "--layers"))
    n_train, n_total = apply_freeze(model, names)
    shapes = dict(model.named_parameters())
    for name in names:
        print(f"{name}\t{list(shapes[name].shape)}")
    print(f"trainable: {n_train:,} of {n_total:,} params ({100 * n_train / n_total:.2f}%) in {len(names)} tensors")
    return 0

