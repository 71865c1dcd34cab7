"""Destroy: damage the selected modules and see what breaks (the paper's ablations).

Modes, applied to each selected tensor w (others are copied byte for byte):

- `zero`: w = 0.
- `reinit`: w ~ N(0, std^2); `std="config"` uses the config's `initializer_range` (what a fresh model would get).
  Every tensor, 1-D norms included, gets the same Gaussian: the point is to erase what was learned.
- `remove`: drop whole decoder layers (`layers` only, `modules` is ignored), renumber the rest contiguously and
  shorten the config (`num_hidden_layers` and every per-layer list such as `layer_types`). Mixture-of-experts configs
  that say which layers are dense keep saying it of the same layers (`first_k_dense_replace`, `mlp_only_layers`,
  `decoder_sparse_step`, `moe_layers`), and the new config is checked against the tensors written: a model built
  from it expects exactly the kept layers' tensors. In a model with a vision tower, only the language model's
  layers are numbered and removed.
- `noise`: w + N(0, (scale * std(w))^2): noise relative to each tensor's own spread, so one `scale` means the same
  damage for a norm vector and for a projection matrix.
- `scale`: w * factor.

Random draws use a `torch.Generator` seeded from (seed, tensor name): results are reproducible and a tensor's noise
does not depend on which other tensors are selected.
"""

from __future__ import annotations

import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import torch

from ..checkpoint import Checkpoint, atomic_output_dir, cached_fingerprint, check_output_dir, copy_side_files
from ..errors import SfnError
from ..manifest import write_manifest
from ..names import NameMap, meta_model
from ..roles import decoder_stack, layer_index, layer_stack, normalize_modules, num_layers, parse_layers, with_layer_index
from ..shards import CHUNK, Entry, iter_chunks, layout_like, numel, one_thread, write_checkpoint
from ._io import require_float, seed_for, select

MODES = ("zero", "reinit", "remove", "noise", "scale")


def _pieces(total: int):
    while total > 0:
        yield min(total, CHUNK)
        total -= CHUNK


def _zero(info):
    zeros = torch.zeros(min(CHUNK, numel(info)))
    for n in _pieces(numel(info)):
        yield zeros[:n]


def _reinit(info, std: float, seed: int):
    g = torch.Generator().manual_seed(seed_for(info.name, seed))
    buf = torch.empty(min(CHUNK, numel(info)))
    for n in _pieces(numel(info)):
        yield torch.randn(n, generator=g, out=buf[:n]).mul_(std)


def _tensor_std(info) -> float:
    """Population std of w from two streaming sums, added up in float64 (one extra read of the tensor)."""
    s = ss = 0.0
    for w in iter_chunks(info):
        s += float(w.sum(dtype=torch.float64))
        ss += float(torch.dot(w, w))
    n = numel(info)
    return math.sqrt(max(ss / n - (s / n) ** 2, 0.0))


def _noise(info, scale: float, seed: int):
    sigma = scale * _tensor_std(info)
    g = torch.Generator().manual_seed(seed_for(info.name, seed))
    buf = torch.empty(min(CHUNK, numel(info)))
    for w in iter_chunks(info):
        yield w.add_(torch.randn(w.numel(), generator=g, out=buf[: w.numel()]).mul_(sigma))


def _scale(info, factor: float):
    for w in iter_chunks(info):
        yield w.mul_(factor)


def _resolve_std(std, ckpt: Checkpoint) -> float:
    if isinstance(std, str) and std == "config":
        value = ckpt.config().get("initializer_range")
        if value is None:
            raise SfnError(f"{ckpt.path}/config.json has no initializer_range: pass a number to --std (e.g. 0.02).")
        return float(value)
    try:
        value = float(std)
    except (TypeError, ValueError):
        raise SfnError(f"--std {std!r} is not a number: pass e.g. 0.02, or `config` for the config's initializer_range.") from None
    if not (math.isfinite(value) and value >= 0):
        raise SfnError(f"--std {std!r} must be a finite number >= 0.")
    return value


def _removal_plan(ckpt: Checkpoint, layers, n: int) -> tuple[list[int], list[int]]:
    drop = parse_layers(layers, "--layers")
    if drop is None:
        raise SfnError("mode remove needs --layers naming the layers to drop (e.g. 5-30), not `all`.")
    outside = [i for i in drop if i >= n]
    if outside:
        raise SfnError(f"--layers {outside} out of range: {ckpt.arch()} has {n} layers (0-{n - 1}).")
    kept = [i for i in range(n) if i not in set(drop)]
    if not kept:
        raise SfnError(f"--layers {layers!r} would remove all {n} layers: keep at least one.")
    return drop, kept


_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
# Lists of layer *indices* (not one value per layer): renumbered, never filtered by position.
_LAYER_INDEX_LISTS = ("mlp_only_layers", "moe_layers")


def shortened_config(config: dict, old_n: int, kept: list[int]) -> dict:
    """The config of the model with only `kept` layers.

    The layer count is whichever of num_hidden_layers / n_layer / num_layers equals the old count (at the top level,
    or in `text_config` for a model with a vision tower); a list there of exactly old_n scalars (`layer_types`,
    per-layer window sizes, ...) is taken as per-layer and filtered. Which layers are dense in an MoE model stays
    true of the same layers: `first_k_dense_replace` (the first k are dense) counts the kept ones below k,
    `mlp_only_layers` and `moe_layers` (indices) are renumbered, and a `decoder_sparse_step` rhythm, which
    renumbering breaks, becomes the explicit list of dense layers.
    """
    config = dict(config)
    target = config
    if not any(config.get(k) == old_n for k in _LAYER_COUNT_KEYS) and isinstance(config.get("text_config"), dict):
        target = config["text_config"] = dict(config["text_config"])
    found = False
    for key in _LAYER_COUNT_KEYS:
        if target.get(key) == old_n:
            target[key] = len(kept)
            found = True
    if not found:
        raise SfnError("config.json has no num_hidden_layers (or n_layer) matching the stored layers; cannot remove layers.")
    for key, value in target.items():
        if (
            key not in ("architectures", *_LAYER_INDEX_LISTS)
            and isinstance(value, list)
            and len(value) == old_n
            and all(not isinstance(v, (list, dict)) for v in value)
        ):
            target[key] = [value[i] for i in kept]
    renumber = {old: new for new, old in enumerate(kept)}
    step = target.get("decoder_sparse_step")
    if isinstance(step, int) and step > 1:
        dense = set(target.get("mlp_only_layers") or []) | {i for i in range(old_n) if (i + 1) % step != 0}
        target["decoder_sparse_step"] = 1
        target["mlp_only_layers"] = sorted(dense)
    for key in _LAYER_INDEX_LISTS:
        if isinstance(target.get(key), list):
            target[key] = [renumber[i] for i in target[key] if i in renumber]
    if isinstance(target.get("first_k_dense_replace"), int):
        target["first_k_dense_replace"] = sum(1 for i in kept if i < target["first_k_dense_replace"])
    return config


def check_layers_match_config(folder, written: list[str], stack_of) -> None:
    """Refuse a shortened config.json that describes other layer tensors than the ones written next to it.

    A model is built (weightless) from `folder/config.json` and the layer tensors it expects are compared with the
    `written` ones (in memory names): a dense layer where experts are stored, or the reverse, would otherwise load with
    randomly initialised weights. `stack_of(memory_name)` tells whether a name is in the decoder's layers.
    """
    try:
        model = meta_model(folder)
    except Exception:  # noqa: BLE001 - without transformers' model class there is nothing to check against
        return
    expected = {n for n, _ in model.named_parameters()}
    expected |= {n for n in model.state_dict() if n not in dict(model.named_parameters(remove_duplicate=False))}
    got = set(NameMap.from_model(model, written).memory_names)
    expected = {n for n in expected if stack_of(n)}
    got = {n for n in got if stack_of(n)}
    if expected != got:
        odd = sorted(expected - got)[:1] + sorted(got - expected)[:1]
        raise SfnError(f"the shortened config.json describes other layers than the tensors kept ({', '.join(odd)} "
                       "differ): this model's layer structure cannot be shortened this way; no output written.")


@one_thread
def destroy(
    model: str | os.PathLike,
    out: str | os.PathLike,
    *,
    modules=None,
    layers="all",
    mode: str = "zero",
    std: float | str = 0.02,
    scale: float = 0.1,
    factor: float = 0.5,
    seed: int = 0,
    overwrite: bool = False,
    command: str | None = None,
) -> dict:
    """Write MODEL with the selected tensors destroyed per `mode` into `out`; return the manifest.

    `modules` defaults to o_proj; `remove` takes whole layers and refuses `modules` rather than ignore it.
    """
    if mode not in MODES:
        raise SfnError(f"--mode {mode!r} is unknown: choose one of {', '.join(MODES)}.")
    if mode == "remove" and modules is not None:
        raise SfnError("--mode remove drops whole layers and takes no --modules: pass only --layers (e.g. 5-30).")
    ckpt = Checkpoint(model)
    check_output_dir(out, overwrite)
    entries: dict[str, Entry | None] = {n: Entry(n, i.dtype, i.shape, i) for n, i in ckpt.tensors.items()}
    settings: dict = {"mode": mode, "seed": seed}
    config, in_stack = None, None
    if mode == "remove":
        changed, config, in_stack = _plan_removal(ckpt, layers, entries, settings)
    else:
        changed = _plan_damage(ckpt, modules, layers, mode, entries, settings, std=std, scale=scale, factor=factor,
                               seed=seed)

    with ThreadPoolExecutor(1) as pool, atomic_output_dir(out, overwrite) as tmp:
        model_fp = pool.submit(cached_fingerprint, ckpt.path)  # hashed while the output is written
        copy_side_files(ckpt.path, tmp)
        if config is not None:
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            check_layers_match_config(tmp, [e.name for e in entries.values() if e is not None], in_stack)
        write_checkpoint(layout_like(ckpt, entries), tmp, f"destroy ({mode})")
        manifest = write_manifest(
            tmp,
            "destroy",
            command,
            model={"path": str(ckpt.path), "fingerprint": model_fp.result()},
            **settings,
            counts={"total": len(ckpt.tensors), "changed": len(changed), "copied": len(ckpt.tensors) - len(changed)},
            changed_tensors=changed,
        )
    return manifest


def _plan_removal(ckpt: Checkpoint, layers, entries: dict, settings: dict):
    """Drop the decoder layers `layers` names and renumber the rest, in `entries`; returns (the tensors dropped,
    the shortened config, whether an in-memory name is in the decoder stack)."""
    # Layers are those of the language model's stack, found on in-memory names (`sfn_train.names`).
    names = NameMap.for_checkpoint(ckpt)
    stack = decoder_stack(names.memory_names, names.decoder, ckpt.arch())
    n_layers = num_layers(names.memory_names, stack)

    def in_stack(memory_name: str) -> bool:
        return layer_stack(memory_name) == stack

    drop, kept = _removal_plan(ckpt, layers, n_layers)
    renumber = {old: new for new, old in enumerate(kept)}
    changed = []
    for name, info in ckpt.tensors.items():
        if not in_stack(names.memory_name(name)):
            continue
        index = layer_index(name)
        if index in drop:
            entries[name] = None
            changed.append(name)
        elif renumber[index] != index:
            entries[name] = Entry(with_layer_index(name, renumber[index]), info.dtype, info.shape, info)
    settings.update(layers_removed=drop, layers_kept=kept)
    return changed, shortened_config(ckpt.config(), n_layers, kept), in_stack


def _plan_damage(ckpt: Checkpoint, modules, layers, mode: str, entries: dict, settings: dict, *, std, scale, factor,
                 seed) -> list[str]:
    """Replace the selected tensors' entries by their zeroed, re-initialised, noised or scaled values (made while
    the output is written); returns the names selected."""
    changed = select(ckpt, modules, layers)
    settings.update(modules=normalize_modules(modules), layers=layers)
    if mode == "reinit":
        settings["std"] = std_value = _resolve_std(std, ckpt)
        make = partial(_reinit, std=std_value, seed=seed)
    elif mode == "noise":
        settings["scale"] = float(scale)
        make = partial(_noise, scale=float(scale), seed=seed)
    elif mode == "scale":
        settings["factor"] = float(factor)
        make = partial(_scale, factor=float(factor))
    else:
        make = _zero
    for name in changed:
        info = ckpt.tensors[name]
        require_float(info, f"--mode {mode}")
        entries[name] = Entry(name, info.dtype, info.shape, info, partial(make, info))
    return changed
