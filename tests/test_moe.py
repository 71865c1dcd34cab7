"""Mixture-of-experts and MLA models: names in memory vs on disk, training, plugins and the gadgets.

Tiny checkpoints (2 layers, hidden 32, 4 experts) of Qwen3-MoE, GPT-OSS, DeepSeek-V3 (MLA, shared experts, dense
first layer), Mixtral and Llama 4. In memory transformers 5 fuses the routed experts of Qwen3-MoE, DeepSeek-V3 and
Mixtral into 3-D parameters; their checkpoints hold one tensor per expert (Mixtral's also under other names). GPT-OSS
and Llama 4 store the fused tensors as they are. Every test compares what was written on disk.
"""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch

from helpers import changed_tensors, load_tensors, train_recipe
from sfn_train.checkpoint import Checkpoint
from sfn_train.cli import main
from sfn_train.names import NameMap, disk_tensors
from sfn_train.roles import select_parameters

TRAINED_ARCHS = ["qwen3_moe", "gpt_oss", "deepseek_v3", "mixtral"]
ALL_ARCHS = [*TRAINED_ARCHS, "llama4_text"]  # Llama 4 does not train under TRL 1.16 (docs/training.md): no training tests


@pytest.fixture(scope="session")
def moe_bases(tmp_path_factory):
    """arch -> a tiny checkpoint folder, built on first use and shared by every test of the session."""
    from sfn_train.tiny import save_tiny_checkpoint

    root = tmp_path_factory.mktemp("moe")
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = save_tiny_checkpoint(root / arch, arch, seed=0, hidden=32, layers=2)
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def moe_runs(tmp_path_factory, moe_bases, sum_data):
    """(arch, modules) -> the output folder of a 4-step `sfn train`, trained on first use and then shared."""
    root = tmp_path_factory.mktemp("moe_runs")
    cache = {}

    def get(arch, modules, **keys):
        key = (arch, modules, *sorted(keys.items()))
        if key not in cache:
            folder = root / f"{arch}-{modules}-{len(cache)}"
            folder.mkdir()
            recipe = train_recipe(folder, moe_bases(arch), sum_data, trainable_modules=modules, **keys)
            assert main(["train", "--config", str(recipe)]) == 0
            cache[key] = folder / "out"
        return cache[key]

    return get


def load_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def on_disk(arch, memory_selection, base):
    """The on-disk tensors of an in-memory selection, by the translation under test."""
    return set(NameMap.for_checkpoint(Checkpoint(base)).to_disk(memory_selection))


# Independent of the translation: which stored names hold routed experts, by the layout each family saves.
STORED_EXPERT = {
    "qwen3_moe": r"\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight$",
    "deepseek_v3": r"\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight$",
    "mixtral": r"\.block_sparse_moe\.experts\.\d+\.w[123]\.weight$",
    "gpt_oss": r"\.mlp\.experts\.(gate_up|down)_proj(_bias)?$",
    "llama4_text": r"\.feed_forward\.experts\.(gate_up|down)_proj$",
}


# -------------------------------------------------------------------------------------------- names, both ways
@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_names_translate_both_ways_as_transformers_loads_and_saves(moe_bases, arch):
    base = moe_bases(arch)
    ckpt = Checkpoint(base)
    names = NameMap.for_checkpoint(ckpt)
    model = load_model(base)
    # disk -> memory: every stored tensor lands in a parameter or buffer from_pretrained fills, and all are filled
    in_memory = set(model.state_dict()) - {"lm_head.weight"} if model.config.tie_word_embeddings else set(model.state_dict())
    assert set(names.memory_names) == in_memory
    fused = {n for n in names.memory_names if len(names.disk_names_of(n)) > 1}
    assert bool(fused) == (arch in ("qwen3_moe", "deepseek_v3", "mixtral"))
    stored = {n for n in ckpt.names if re.search(STORED_EXPERT[arch], n)}
    assert {d for n in fused for d in names.disk_names_of(n)} == (stored if fused else set())
    # memory -> disk: transformers' saving rule gives, per parameter, exactly those names and the stored bytes
    for name, param in model.named_parameters():
        converted = disk_tensors(model, {name: param.detach()})
        assert sorted(converted) == sorted(names.disk_names_of(name))
        for disk_name, tensor in converted.items():
            assert torch.equal(tensor.contiguous(), ckpt.tensor(disk_name)), disk_name


@pytest.mark.parametrize("arch, experts", [("qwen3_moe", {"num_experts": 12}), ("mixtral", {"num_local_experts": 12})])
def test_twelve_experts_stack_in_expert_order_both_ways(tmp_path, arch, experts):
    """Past 10 experts the string order of the stored names (experts.10 before experts.2) is not the expert order:
    the stored tensors must stack into exactly the fused tensors from_pretrained builds, and split back into them."""
    from sfn_train.names import memory_tensors
    from sfn_train.tiny import save_tiny_checkpoint

    base = save_tiny_checkpoint(tmp_path / arch, arch, seed=0, hidden=32, layers=2, **experts)
    model, stored = load_model(base), load_tensors(base)
    names = NameMap.from_model(model, stored)
    fused = {n: p.detach() for n, p in model.named_parameters() if len(names.disk_names_of(n)) > 1}
    assert len(fused) == 4 and all(len(names.disk_names_of(n)) >= 12 for n in fused)  # 2 layers x 2 fused tensors
    rebuilt = memory_tensors(model, stored)
    for name, value in fused.items():
        assert torch.equal(rebuilt[name], value), f"{name}: stored experts stacked in another order"
        for disk_name, tensor in disk_tensors(model, {name: value}).items():
            assert torch.equal(tensor.contiguous(), stored[disk_name]), disk_name


# ---------------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("modules", ["o_proj", "mlp", "experts", "all"])
@pytest.mark.parametrize("arch", TRAINED_ARCHS)
def test_training_changes_exactly_the_selection_and_the_plugin_rebuilds_it(moe_runs, moe_bases, arch, modules):
    from safetensors.torch import load_file

    base = moe_bases(arch)
    out = moe_runs(arch, modules)
    trained_in_memory = select_parameters(load_model(base), modules)
    expected = on_disk(arch, trained_in_memory, base)
    changed, unchanged = changed_tensors(base, out)
    assert changed == expected  # every selected stored tensor moved, every other one is bitwise the base's
    if modules == "experts":
        assert expected == {n for n in load_tensors(base) if re.search(STORED_EXPERT[arch], n)}
    record = json.loads((out / "sfn_manifest.json").read_text())
    if modules == "all":  # a full fine-tune writes no plugin: it would be a second full copy of the checkpoint
        assert not (out / "sfn_plugin.safetensors").exists() and record["plugin"]["file"] is None
    else:
        plugin = load_file(out / "sfn_plugin.safetensors")
        assert set(plugin) == changed  # exactly the trained tensors, in the checkpoint's names
        rebuilt = {**load_tensors(base), **plugin}
        tuned = load_tensors(out)
        assert set(rebuilt) == set(tuned) and all(torch.equal(rebuilt[n], tuned[n]) for n in tuned)
    manifest = record["selection"]
    assert manifest["trainable_tensors"] == trained_in_memory
    assert set(manifest["trainable_tensors_on_disk"]) == changed


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss", "mixtral"])
def test_router_aux_loss_is_added_and_a_frozen_router_does_not_move(moe_runs, moe_bases, arch):
    """TRL adds router_aux_loss_coef * aux_loss (the config's coefficient) to the loss and logs it; training the
    experts leaves the router bitwise frozen, training the router moves it."""
    from transformers import AutoConfig

    coef = AutoConfig.from_pretrained(moe_bases(arch)).router_aux_loss_coef
    assert coef > 0
    out = moe_runs(arch, "experts")
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert all(step["aux_loss"] > 0 for step in history if "loss" in step)
    base = Checkpoint(moe_bases(arch))
    router = {n for n in base.names if re.search(r"\.(gate|router)\.(weight|bias)$", n)}
    assert router and not router & changed_tensors(moe_bases(arch), out)[0]
    assert changed_tensors(moe_bases(arch), moe_runs(arch, "router"))[0] == router
    # TRL switches output_router_logits on to train; the fine-tune's config keeps the base's setting (on, every
    # forward would compute the loss, and batched generation fails in transformers' load-balancing function)
    base_config = json.loads((moe_bases(arch) / "config.json").read_text())
    assert json.loads((out / "config.json").read_text())["output_router_logits"] == base_config["output_router_logits"]
    metrics = json.loads((out / "sfn_manifest.json").read_text())["metrics"]
    assert metrics["router_aux_loss_coef"] == coef


# ----------------------------------------------------------------------------------------------------- gadgets
@pytest.mark.parametrize("modules", ["mlp", "experts", "router", "gate_up_proj"])
@pytest.mark.parametrize("arch", TRAINED_ARCHS)
def test_merge_takes_the_same_tensors_the_trainer_selects(moe_runs, moe_bases, tmp_path, arch, modules):
    """Merged checkpoint, loaded: the parameters `select_parameters` picks on the live model are the donor's, every
    other one the base's -- the gadget's selection (on disk) and the trainer's (in memory) are the same. On disk
    `gate_up_proj` names no Qwen3-MoE/DeepSeek-V3/Mixtral tensor; in memory it is the fused experts' gate and up."""
    from sfn_train.gadgets import merge

    base, donor = moe_bases(arch), moe_runs(arch, "all")
    manifest = merge(base, donor, tmp_path / "m", modules=modules)
    merged, a, b = load_model(tmp_path / "m"), load_model(base), load_model(donor)
    chosen = set(select_parameters(merged, modules))
    params_a, params_b = dict(a.named_parameters()), dict(b.named_parameters())
    for name, param in merged.named_parameters():
        assert torch.equal(param, (params_b if name in chosen else params_a)[name]), name
    assert set(manifest["donor_tensors"]) == on_disk(arch, sorted(chosen), base) | (
        {n for n in Checkpoint(base).names if n.endswith("e_score_correction_bias")} if modules in ("mlp", "router")
        else set())


@pytest.mark.parametrize("arch", TRAINED_ARCHS)
def test_delta_reports_each_expert_and_the_pooled_experts_role(moe_runs, moe_bases, tmp_path, arch):
    """Per expert: sqrt(sum ||B-A||^2 / sum ||A||^2) over that expert's gate, up and down (and biases), whether the
    checkpoint stores one tensor per expert (Qwen3-MoE, DeepSeek-V3, Mixtral under its own names) or all experts
    fused along dim 0 (GPT-OSS). DeepSeek-V3's layer 0 is dense: its experts are layer 1's only."""
    from sfn_train.gadgets import delta

    base, tuned = moe_bases(arch), moe_runs(arch, "experts")
    result = delta(base, tuned, tmp_path / "d", plots=False, quiet=True)
    a, b = load_model(base), load_model(tuned)
    pa, pb = {n: p.detach() for n, p in a.named_parameters()}, {n: p.detach() for n, p in b.named_parameters()}
    fused = [n for n in pa if ".mlp.experts." in n]
    got = {(e["layer"], e["expert"]): e for e in result["experts"]}
    moe_layers = (1,) if arch == "deepseek_v3" else (0, 1)
    assert sorted(got) == [(layer, e) for layer in moe_layers for e in range(4)]
    for (layer, e), row in got.items():
        mine = [n for n in fused if f".layers.{layer}." in n]
        dd = sum(float((pb[n][e] - pa[n][e]).double().pow(2).sum()) for n in mine)
        aa = sum(float(pa[n][e].double().pow(2).sum()) for n in mine)
        assert row["rel_change"] == pytest.approx((dd / aa) ** 0.5, rel=1e-5)
        assert row["numel"] == sum(pa[n][e].numel() for n in mine)
    pooled_dd = sum(float((pb[n] - pa[n]).double().pow(2).sum()) for n in fused)
    pooled_aa = sum(float(pa[n].double().pow(2).sum()) for n in fused)
    experts = result["roles"]["experts"]
    assert experts["pooled_rel_change"] == pytest.approx((pooled_dd / pooled_aa) ** 0.5, rel=1e-5)
    assert experts["n_tensors"] == len({n for n in Checkpoint(base).names if re.search(STORED_EXPERT[arch], n)})
    for role, summary in result["roles"].items():  # nothing else was trained
        assert role == "experts" or summary["pooled_rel_change"] == 0.0, role
    assert (tmp_path / "d" / "delta_experts.csv").read_text().count("\n") == 1 + 4 * len(moe_layers)


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_destroy_by_role_and_layer(moe_bases, tmp_path, arch):
    """Re-initialising the experts of layer 1 (GPT-OSS's zero-initialised expert biases included): exactly their
    stored tensors change, and loaded, exactly the parameters the trainer's `experts` selection names."""
    from sfn_train.gadgets import destroy

    base = moe_bases(arch)
    manifest = destroy(base, tmp_path / "z", modules="experts", layers="1", mode="reinit")
    changed, _ = changed_tensors(base, tmp_path / "z")
    stored_experts = {n for n in Checkpoint(base).names if re.search(STORED_EXPERT[arch], n) and ".layers.1." in n}
    assert changed == stored_experts == set(manifest["changed_tensors"])
    destroyed, original = load_model(tmp_path / "z"), dict(load_model(base).named_parameters())
    chosen = set(select_parameters(destroyed, "experts", "1"))
    assert {n for n, p in destroyed.named_parameters() if not torch.equal(p, original[n])} == chosen


# Removing layer 0 turns the tiny models' first MoE-or-dense pattern around: DeepSeek-V3's and Llama 4's dense first
# layer, Qwen3-MoE with `decoder_sparse_step` 2 (layer 1 sparse, layers 0 and 2 dense), GPT-OSS's layer_types.
REMOVAL_CASES = {
    "deepseek_v3": dict(layers=3),
    "llama4_text": dict(layers=3),
    "qwen3_moe": dict(layers=3, decoder_sparse_step=2),
    "gpt_oss": dict(layers=3),
    "mixtral": dict(layers=3),
}


@pytest.mark.parametrize("arch", sorted(REMOVAL_CASES))
@pytest.mark.parametrize("drop", ["0", "1"])
def test_remove_renumbers_moe_layers_and_keeps_the_config_consistent(tmp_path, arch, drop):
    from sfn_train.gadgets import destroy
    from sfn_train.tiny import save_tiny_checkpoint
    from transformers import AutoModelForCausalLM

    base = save_tiny_checkpoint(tmp_path / "base", arch, hidden=32, **REMOVAL_CASES[arch])
    destroy(base, tmp_path / "r", layers=drop, mode="remove")
    short, info = AutoModelForCausalLM.from_pretrained(tmp_path / "r", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert short.config.num_hidden_layers == 2
    full = dict(load_model(base).named_parameters())
    kept = [i for i in range(3) if str(i) != drop]
    for name, param in short.named_parameters():
        match = re.search(r"\.layers\.(\d+)\.", name)
        old = name if not match else name.replace(f".layers.{match.group(1)}.", f".layers.{kept[int(match.group(1))]}.")
        assert torch.equal(param, full[old]), name
    if arch == "deepseek_v3":
        assert short.config.first_k_dense_replace == (0 if drop == "0" else 1)


def test_remove_refuses_a_config_it_cannot_keep_consistent(tmp_path, moe_bases, monkeypatch):
    """A layer-kind rule shortened_config does not know: the check against a model built from the new config
    refuses, and nothing is written."""
    import importlib

    from sfn_train.errors import SfnError

    destroy_mod = importlib.import_module("sfn_train.gadgets.destroy")  # the package exports the function by that name

    original = destroy_mod.shortened_config
    # As if DeepSeek's dense-first rule lived under a key shortened_config does not know: it stays 1 while the
    # dense layer 0 is removed, so the config describes a dense layer 0 where experts are stored.
    monkeypatch.setattr(destroy_mod, "shortened_config",
                        lambda config, n, kept: {**original(config, n, kept), "first_k_dense_replace": 1})
    with pytest.raises(SfnError, match="describes other layers than the tensors kept"):
        destroy_mod.destroy(moe_bases("deepseek_v3"), tmp_path / "r", layers="0", mode="remove")
    assert not (tmp_path / "r").exists()


def test_a_stored_name_regex_says_what_to_select_instead(moe_bases, tmp_path):
    from sfn_train.errors import SfnError
    from sfn_train.gadgets import destroy

    with pytest.raises(SfnError, match=r"mlp\.experts\.gate_up_proj.*in memory"):
        destroy(moe_bases("qwen3_moe"), tmp_path / "x", modules=r"experts\.3\.gate_proj", mode="zero")


# ---------------------------------------------------------------------------------------------- quantize_frozen
@pytest.mark.parametrize("arch,modules", [("qwen3_moe", "o_proj"), ("deepseek_v3", "experts"), ("gpt_oss", "o_proj"),
                                          ("mixtral", "o_proj")])
def test_quantize_frozen_on_moe_keeps_fused_experts_in_full_precision_and_says_so(moe_runs, moe_bases, arch, modules,
                                                                                   caplog):
    """bitsandbytes quantizes nn.Linear layers (attention, shared experts, dense MLPs); the fused 3-D expert tensors
    and the routers are other modules: frozen, they stay in full precision, said in one line and in the manifest.
    Trained fused experts come back as the checkpoint's per-expert tensors in the plugin."""
    caplog.set_level(logging.INFO, logger="sfn_train")
    out = moe_runs(arch, modules, quantize_frozen="4bit")
    base = moe_bases(arch)
    trained = select_parameters(load_model(base), modules)
    not_linear = [n for n, _ in load_model(base).named_parameters()
                  if re.search(r"\.mlp\.(experts\.\w+|gate\.weight|router\.weight)$", n) and n not in trained]
    lines = [r.getMessage() for r in caplog.records if "stay in full precision" in r.getMessage()]
    assert len(lines) == 1, lines
    assert all(re.sub(r"layers\.\d+", "layers.*", n) in lines[0] for n in not_linear), lines
    summary = json.loads((out / "sfn_manifest.json").read_text())["selection"]["quantize_frozen"]
    assert summary["full_precision_frozen"]["tensors"] == len(not_linear) > 0
    assert summary["quantized_linears"] > 0
    changed, _ = changed_tensors(base, out)
    assert changed == on_disk(arch, trained, base)
    from safetensors.torch import load_file

    assert set(load_file(out / "sfn_plugin.safetensors")) == changed


# ----------------------------------------------------------------------------------------------- the whole path
@pytest.mark.slow
def test_moe_study_end_to_end(moe_runs, moe_bases, tmp_path):
    """The lab's path on a tiny Qwen3-MoE base: fine-tunes (all, experts), delta, the paper's merges (o_proj, qkv,
    mlp) plus experts and router, destruction (zero, reinit, remove) and an evaluation of the checkpoints and of
    base + the experts plugin (stored per expert, fused in memory) on the lab task."""
    from sfn_train.evaluation import evaluate
    from sfn_train.gadgets import delta, destroy, merge

    base, full, experts = moe_bases("qwen3_moe"), moe_runs("qwen3_moe", "all"), moe_runs("qwen3_moe", "experts")
    result = delta(base, full, tmp_path / "delta", plots=False, quiet=True)
    assert {"experts", "router", "o_proj", "q_proj"} <= set(result["ranking"]) and len(result["experts"]) == 8
    models = {"A": base, "full": full, "experts": experts}
    for name, modules in {"m1_oproj": "o_proj", "m2_qkv": "qkv", "m3_mlp": "mlp", "m_experts": "experts",
                          "m_router": "router"}.items():
        merge(base, full, tmp_path / name, modules=modules)
    models["m3_mlp"] = tmp_path / "m3_mlp"
    for mode, modules in (("zero", "experts"), ("reinit", "o_proj"), ("remove", None)):
        destroy(full, tmp_path / f"destroy_{mode}", modules=modules, layers="1", mode=mode)
    models.update(destroy_zero=tmp_path / "destroy_zero", destroy_remove=tmp_path / "destroy_remove")
    specs = [{"path": str(p), "label": label} for label, p in models.items()]
    specs.append({"path": str(base), "plugin": str(experts / "sfn_plugin.safetensors"), "label": "A+plugin"})
    evaluate(specs, ["lab_reason"], tmp_path / "evals", temperature=0.0, samples=1, max_new_tokens=12, limit=4,
             batch_size=4, progress=False, grading_workers=1)
    results = {s["label"]: json.loads((tmp_path / "evals" / f"{s['label']}__lab_reason.json").read_text())
               for s in specs}
    assert all(r["summary"]["n_problems"] == 4 for r in results.values()), results["A"]["summary"]

    def responses(label):
        return [s["response"] for p in results[label]["problems"] for s in p["samples"]]

    # base + plugin is the experts fine-tune, bit for bit, so greedy decoding says the same
    assert responses("A+plugin") == responses("experts")
