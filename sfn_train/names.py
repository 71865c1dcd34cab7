"""Tensor names in memory and on disk: one translation, transformers' own checkpoint conversion mapping.

transformers 5 can hold a model's weights under other names, and in other shapes, than its checkpoint stores them.
Qwen3-MoE, DeepSeek-V3 and Mixtral keep each layer's routed experts as two fused 3-D parameters in memory
(`mlp.experts.gate_up_proj` [E, H, 2I], `mlp.experts.down_proj` [E, I, H]) while the checkpoint holds one tensor per
expert and projection (`mlp.experts.0.gate_proj.weight`, Mixtral `block_sparse_moe.experts.0.w1.weight`).
`from_pretrained` converts with the rules in `transformers.conversion_mapping` (WeightRenaming / WeightConverter) and
`save_pretrained` applies them in reverse (`core_model_loading.revert_weight_conversion`).

Selections are made on in-memory names (what the trainer can set `requires_grad` on: a fused tensor trains as a
whole). `NameMap` maps each on-disk name to the in-memory name it loads into, with transformers' own loading rule
(`core_model_loading.rename_source_key`, the function `from_pretrained` calls on every checkpoint key), and groups
them back: the gadgets select on `memory_names` and read `to_disk(...)`; the trainer turns its trained parameters
into the tensors of the checkpoint it saved. `disk_tensors` is transformers' saving rule for values, used where the
trainer writes tensors from the live model.

Where transformers has no rule for an architecture (dense models, GPT-OSS and Llama 4, whose checkpoints already hold
fused experts) the names are the same on both sides.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

from .errors import SfnError

logger = logging.getLogger("sfn_train")


class NameMap:
    """On-disk tensor names of one checkpoint <-> the in-memory names they load into."""

    def __init__(self, memory_of: dict[str, str], decoder: str | None = None, translated: bool = True):
        self.memory_of = memory_of  # on-disk name -> in-memory name
        self.disk_of: dict[str, list[str]] = {}  # in-memory name -> its on-disk names, in checkpoint order
        for disk, memory in memory_of.items():
            self.disk_of.setdefault(memory, []).append(disk)
        self.decoder = decoder  # module path of the language model, for `roles.decoder_stack`
        self.translated = translated  # False: transformers could not say, names are taken as they are

    @classmethod
    def identity(cls, disk_names: Iterable[str]) -> "NameMap":
        return cls({n: n for n in disk_names}, translated=False)

    @classmethod
    def from_model(cls, model, disk_names: Iterable[str]) -> "NameMap":
        """The names `disk_names` load into in `model`, by the rule `from_pretrained` applies to checkpoint keys."""
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        from .roles import decoder_path

        conversions = get_model_conversion_mapping(model)
        renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
        converters = [c for c in conversions if isinstance(c, WeightConverter)]
        # Parameter and buffer names, read without touching values (a ZeRO-3 model's state_dict would gather).
        expected = {n: True for n, _ in model.named_parameters(remove_duplicate=False)}
        expected.update({n: True for n, _ in model.named_buffers(remove_duplicate=False)})
        prefix = model.base_model_prefix
        memory_of = {}
        for disk in disk_names:
            # As `convert_and_load_state_dict_in_model` does: the converted key, or the key itself when only that
            # one exists in the model (with the base-model prefix added or removed where needed).
            memory, _ = rename_source_key(disk, renamings, converters, prefix, expected)
            if memory not in expected and disk in expected:
                memory, _ = rename_source_key(disk, [], [], prefix, expected)
            memory_of[disk] = memory
        return cls(memory_of, decoder=decoder_path(model))

    @classmethod
    def for_checkpoint(cls, ckpt) -> "NameMap":
        """The translation for a checkpoint folder, from a weightless (meta-device) model built from its config.

        A config transformers cannot build without running the checkpoint's own code (trust_remote_code) gets the
        identity, said in one log line.
        """
        try:
            model = meta_model(ckpt.path)
        except Exception as exc:  # noqa: BLE001 - any failure means the same: transformers cannot describe the model
            reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            logger.warning("tensor names of %s taken as stored: transformers cannot build its model from config.json "
                           "alone (%s).", ckpt.path, reason)
            return cls.identity(ckpt.names)
        return cls.from_model(model, ckpt.names)

    @property
    def memory_names(self) -> list[str]:
        """Distinct in-memory names, in checkpoint order."""
        return list(self.disk_of)

    def to_disk(self, memory_names: Sequence[str]) -> list[str]:
        """The on-disk tensors holding `memory_names`, in checkpoint order; an unknown name is an error."""
        missing = [n for n in memory_names if n not in self.disk_of]
        if missing:
            raise SfnError(f"no tensor of the checkpoint holds {missing[:3]}: it is not a checkpoint of this model.")
        wanted = set(memory_names)
        return [d for d, m in self.memory_of.items() if m in wanted]

    def disk_names_of(self, memory_name: str) -> list[str]:
        return list(self.disk_of.get(memory_name, []))

    def memory_name(self, disk_name: str) -> str:
        return self.memory_of.get(disk_name, disk_name)


def meta_model(path):
    """A weightless model (meta device) of the checkpoint folder `path`, built from its config.json only."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    architectures = getattr(config, "architectures", None) or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    with torch.device("meta"):
        if model_class is not None:
            return model_class._from_config(config)
        return AutoModelForCausalLM.from_config(config)


def disk_tensors(model, tensors: dict) -> dict:
    """`tensors` ({in-memory name: tensor} of `model`) as `save_pretrained` would store them: {on-disk name: tensor}.

    transformers' own saving rule (`revert_weight_conversion`): a fused expert tensor comes back as one tensor per
    expert and projection, under the checkpoint's names.
    """
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, dict(tensors))


def memory_tensors(model, stored: dict) -> dict:
    """`stored` ({on-disk name: tensor}, e.g. a plugin) as `from_pretrained` would load them: {in-memory name: tensor}.

    transformers' own loading rule (the converters `from_pretrained` applies): one tensor per expert is stacked
    into the fused in-memory tensor. A fused tensor needs all of its stored pieces; those `stored` lacks (a plugin
    that kept only the experts that changed) are taken from the model's current values.
    """
    from copy import deepcopy

    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    names = NameMap.from_model(model, stored)
    current = dict(model.state_dict())
    complete = dict(stored)
    for memory in names.memory_names:
        if names.disk_names_of(memory) != [memory] and memory in current:
            for disk, value in disk_tensors(model, {memory: current[memory].detach()}).items():
                complete.setdefault(disk, value)
    conversions = get_model_conversion_mapping(model)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    names = NameMap.from_model(model, complete)
    result, groups = {}, {}
    for disk in sorted(complete, key=dot_natural_key):  # the order from_pretrained stacks experts in
        memory, pattern = rename_source_key(disk, renamings, converters)
        if pattern is None:
            result[names.memory_name(disk)] = complete[disk]
        else:
            converter = groups.setdefault(memory, deepcopy(by_pattern[pattern]))
            converter.add_tensor(memory, disk, pattern, complete[disk])
    for memory, converter in groups.items():
        for name, value in converter.convert(memory, model=model, config=model.config).items():
            result[name] = value[0] if isinstance(value, list) else value
    return result
