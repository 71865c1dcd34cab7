"""Module roles resolve to the right tensors on every supported family; bad selections fail loudly."""

import pytest

from sfn_train.errors import SfnError
from sfn_train.roles import layer_index, parse_layers, select_names, select_parameters
from sfn_train.tiny import tiny_model

# (family, role) -> the module path each layer must contribute (weights; biases follow where the family has them)
EXPECTED = {
    ("qwen2", "o_proj"): "model.layers.{i}.self_attn.o_proj.weight",
    ("qwen2", "q_proj"): "model.layers.{i}.self_attn.q_proj.weight",
    ("qwen2", "down_proj"): "model.layers.{i}.mlp.down_proj.weight",
    ("llama", "o_proj"): "model.layers.{i}.self_attn.o_proj.weight",
    ("llama", "gate_proj"): "model.layers.{i}.mlp.gate_proj.weight",
    ("qwen3", "o_proj"): "model.layers.{i}.self_attn.o_proj.weight",
    ("gpt_neox", "o_proj"): "gpt_neox.layers.{i}.attention.dense.weight",
    ("gpt_neox", "qkv_proj"): "gpt_neox.layers.{i}.attention.query_key_value.weight",
    ("gpt_neox", "up_proj"): "gpt_neox.layers.{i}.mlp.dense_h_to_4h.weight",
    ("gpt2", "o_proj"): "transformer.h.{i}.attn.c_proj.weight",
    ("gpt2", "down_proj"): "transformer.h.{i}.mlp.c_proj.weight",
    ("gpt2", "up_proj"): "transformer.h.{i}.mlp.c_fc.weight",
    ("phi", "o_proj"): "model.layers.{i}.self_attn.dense.weight",
    ("phi", "up_proj"): "model.layers.{i}.mlp.fc1.weight",
    ("falcon", "o_proj"): "transformer.h.{i}.self_attention.dense.weight",
}
LAYERS = 4


@pytest.fixture(scope="module")
def models():
    return {arch: tiny_model(arch, layers=LAYERS, tie_word_embeddings=arch == "llama")
            for arch in {a for a, _ in EXPECTED}}


@pytest.mark.parametrize("arch,role", sorted(EXPECTED))
def test_role_selects_the_right_module_in_every_layer(models, arch, role):
    selected = select_parameters(models[arch], [role])
    weights = [n for n in selected if n.endswith(".weight")]
    assert weights == [EXPECTED[arch, role].format(i=i) for i in range(LAYERS)]
    # biases, where present, belong to the same modules
    assert {n.rsplit(".", 1)[0] for n in selected} == {w.rsplit(".", 1)[0] for w in weights}


def test_o_proj_never_matches_the_mlp_projection_of_gpt2(models):
    assert not any(".mlp." in n for n in select_parameters(models["gpt2"], ["o_proj"]))


def test_layer_range_and_list(models):
    assert [layer_index(n) for n in select_parameters(models["qwen2"], ["o_proj"], "1-2")] == [1, 2]
    assert [layer_index(n) for n in select_parameters(models["qwen2"], ["o_proj"], ["0", "3"])] == [0, 3]
    assert parse_layers("all") is None
    assert parse_layers(["8-10", 12]) == [8, 9, 10, 12]


def test_layer_filter_leaves_non_layer_tensors_selected(models):
    names = select_parameters(models["qwen2"], ["embed", "lm_head", "norm", "o_proj"], "2")
    assert "model.embed_tokens.weight" in names and "lm_head.weight" in names and "model.norm.weight" in names
    assert [layer_index(n) for n in names if layer_index(n) is not None] == [2, 2, 2]  # input/post norms + o_proj


def test_regex_entries(models):
    assert select_parameters(models["qwen2"], [r"layers\.0\..*_proj\.weight$"]) == [
        n for n, _ in models["qwen2"].named_parameters() if n.startswith("model.layers.0.") and n.endswith("_proj.weight")
    ]


def test_all_selects_every_parameter(models):
    assert select_parameters(models["gpt_neox"], "all") == [n for n, _ in models["gpt_neox"].named_parameters()]


def test_lm_head_on_tied_model_selects_the_shared_embedding(models):
    assert select_parameters(models["llama"], ["lm_head"]) == ["model.embed_tokens.weight"]


def test_tied_aliases_on_checkpoint_names_point_the_head_at_the_token_embedding():
    from sfn_train.roles import tied_aliases

    hub_gpt2 = ["wte.weight", "wpe.weight", "h.0.attn.c_proj.weight", "ln_f.weight"]
    assert tied_aliases(hub_gpt2, tied=True) == {"lm_head.weight": "wte.weight"}
    assert select_names(hub_gpt2, "lm_head", aliases=tied_aliases(hub_gpt2, tied=True)) == ["wte.weight"]
    assert tied_aliases(hub_gpt2, tied=False) == {}
    llama = ["model.embed_tokens.weight", "model.layers.0.self_attn.o_proj.weight", "model.norm.weight"]
    assert tied_aliases(llama, tied=True) == {"lm_head.weight": "model.embed_tokens.weight"}
    assert tied_aliases([*llama, "lm_head.weight"], tied=True) == {}  # a stored head is its own tensor
    neox = ["gpt_neox.embed_in.weight", "embed_out.weight"]
    assert tied_aliases(neox, tied=True) == {}


def test_norm_role_covers_layer_and_final_norms(models):
    names = select_parameters(models["qwen3"], ["norm"])
    assert "model.norm.weight" in names
    assert "model.layers.0.self_attn.q_norm.weight" in names
    assert len([n for n in names if n.startswith("model.layers.0.")]) == 4  # input, post-attn, q_norm, k_norm


def test_no_match_names_the_model_and_lists_its_modules(models):
    with pytest.raises(SfnError) as err:
        select_parameters(models["qwen2"], ["o_porj"])
    message = str(err.value)
    assert "'o_porj'" in message and "Qwen2ForCausalLM" in message
    assert "model.layers.*.self_attn.o_proj" in message and "\n" not in message


def test_fused_qkv_hint(models):
    with pytest.raises(SfnError, match="qkv_proj"):
        select_parameters(models["gpt2"], ["q_proj"])


def test_out_of_range_layers_and_bad_specs(models):
    with pytest.raises(SfnError, match="4 layers"):
        select_parameters(models["qwen2"], ["o_proj"], "2-7")
    for bad in ("x-3", "5-2"):
        with pytest.raises(SfnError):
            parse_layers(bad)
    with pytest.raises(SfnError, match="regular expression"):
        select_names(["a.weight"], ["(unclosed"])


def test_selection_is_pure(models):
    model = models["qwen2"]
    flags = [p.requires_grad for p in model.parameters()]
    select_parameters(model, ["o_proj"])
    assert [p.requires_grad for p in model.parameters()] == flags


def test_select_command_lists_the_tensors_without_loading_weights(qwen2_base, capsys):
    from sfn_train.cli import main

    assert main(["select", str(qwen2_base), "--modules", "o_proj", "--layers", "1-2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[:2] == ["model.layers.1.self_attn.o_proj.weight\t[64, 64]", "model.layers.2.self_attn.o_proj.weight\t[64, 64]"]
    assert lines[2].startswith("trainable: 8,192 of ") and lines[2].endswith("in 2 tensors")
    assert main(["select", str(qwen2_base), "--modules", "o_prj"]) == 2


# ------------------------------------------------------------------------------------ mixture of experts and MLA
# In-memory names (what the trainer selects) of the tiny MoE configs; the gadgets' on-disk names: tests/test_moe.py.
MOE_LAYER_PARTS = {  # arch -> role -> module paths of the last (MoE) layer, relative to its `layers.N.`
    "qwen3_moe": {"experts": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"], "router": ["mlp.gate.weight"],
                  "shared_experts": []},
    "qwen2_moe": {"experts": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"], "router": ["mlp.gate.weight"],
                  "shared_experts": ["mlp.shared_expert.gate_proj.weight", "mlp.shared_expert.up_proj.weight",
                                     "mlp.shared_expert.down_proj.weight", "mlp.shared_expert_gate.weight"]},
    "gpt_oss": {"experts": ["mlp.experts.gate_up_proj", "mlp.experts.gate_up_proj_bias", "mlp.experts.down_proj",
                            "mlp.experts.down_proj_bias"],
                "router": ["mlp.router.weight", "mlp.router.bias"], "shared_experts": []},
    "deepseek_v3": {"experts": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"], "router": ["mlp.gate.weight"],
                    "shared_experts": ["mlp.shared_experts.gate_proj.weight", "mlp.shared_experts.up_proj.weight",
                                       "mlp.shared_experts.down_proj.weight"]},
    "mixtral": {"experts": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"], "router": ["mlp.gate.weight"],
                "shared_experts": []},
    "llama4_text": {"experts": ["feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"],
                    "router": ["feed_forward.router.weight"],
                    "shared_experts": ["feed_forward.shared_expert.gate_proj.weight",
                                       "feed_forward.shared_expert.up_proj.weight",
                                       "feed_forward.shared_expert.down_proj.weight"]},
}


def meta_model(arch, **overrides):
    import torch

    from sfn_train.tiny import tiny_config

    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(tiny_config(arch, hidden=32, layers=2, **overrides))


@pytest.fixture(scope="module")
def moe_models():
    return {arch: meta_model(arch) for arch in MOE_LAYER_PARTS}


@pytest.mark.parametrize("arch", sorted(MOE_LAYER_PARTS))
def test_moe_roles_select_experts_shared_experts_and_router(moe_models, arch):
    model = moe_models[arch]
    parts = MOE_LAYER_PARTS[arch]
    last = "model.layers.1."
    for role in ("experts", "router", "shared_experts"):
        expected = [last + p for p in parts[role]]
        if not expected:  # a family without shared experts: the role names nothing, and says so
            with pytest.raises(SfnError, match=f"'{role}' matches no parameter"):
                select_parameters(model, role, "1")
            continue
        assert select_parameters(model, role, "1") == [n for n, _ in model.named_parameters() if n in expected]
    # `mlp` is the whole feed-forward block of every layer: dense MLP, experts, shared experts and router
    ffn = "feed_forward" if arch == "llama4_text" else "mlp"
    assert select_parameters(model, "mlp") == [n for n, _ in model.named_parameters() if f".{ffn}." in n]
    # the fused expert tensors hold every expert's gate and up halves: gate_up_proj, not gate_proj, selects them
    assert last + parts["experts"][0] in select_parameters(model, "gate_up_proj", "1")
    assert all(".experts." not in n for n in select_names_or_empty(model, "gate_proj"))
    assert last + parts["experts"][-1 if arch != "gpt_oss" else 2] in select_parameters(model, "down_proj", "1")


def select_names_or_empty(model, role):
    try:
        return select_parameters(model, role)
    except SfnError:
        return []


def test_mla_attention_roles(moe_models):
    model = moe_models["deepseek_v3"]
    attn = "model.layers.0.self_attn."
    assert select_parameters(model, "q_proj", "0") == [attn + "q_a_proj.weight", attn + "q_b_proj.weight"]
    assert select_parameters(model, "kv_proj", "0") == [attn + "kv_a_proj_with_mqa.weight", attn + "kv_b_proj.weight"]
    assert select_parameters(model, "qkv", "0") == [attn + p + ".weight" for p in
                                                    ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj")]
    assert select_parameters(model, "o_proj", "0") == [attn + "o_proj.weight"]
    # the latent norms are norms
    assert {attn + "q_a_layernorm.weight", attn + "kv_a_layernorm.weight"} <= set(select_parameters(model, "norm"))
    # keys and values share their projections: k_proj alone means nothing here, and the error says what does
    with pytest.raises(SfnError, match="kv_proj"):
        select_parameters(model, "k_proj")


# ---------------------------------------------------------------------------------------- Falcon, layer stacks, specs
def test_norm_role_covers_falcon_new_decoder_per_layer_norms():
    # Falcon-40B/180B's layout: parallel attention and MLP, each with its own input norm
    model = meta_model_dense("falcon", new_decoder_architecture=True, parallel_attn=True, num_ln_in_parallel_attn=2,
                             num_kv_heads=2)
    names = select_parameters(model, "norm")
    assert names == [n for n, _ in model.named_parameters() if ".ln_" in n]
    assert "transformer.h.0.ln_attn.weight" in names and "transformer.h.1.ln_mlp.bias" in names
    assert "transformer.ln_f.weight" in names


def meta_model_dense(arch, **overrides):
    import torch
    from transformers import AutoModelForCausalLM

    from sfn_train.tiny import tiny_config

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(tiny_config(arch, hidden=32, layers=2, **overrides))


@pytest.fixture(scope="module")
def vision_language_model():
    """A tiny Llava: a 2-layer CLIP vision tower (attention `out_proj`) beside a 3-layer Llama (`o_proj`)."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=16, projection_dim=32)
    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=64)
    with torch.device("meta"):
        return LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_index=63))


def test_layer_range_selects_in_the_language_model_stack_only(vision_language_model):
    model = vision_language_model
    assert select_parameters(model, "o_proj", "0-1") == [
        "model.language_model.layers.0.self_attn.o_proj.weight", "model.language_model.layers.1.self_attn.o_proj.weight"]
    # the layer count is the language model's (3), not the vision tower's (2) nor a mix
    assert [layer_index(n) for n in select_parameters(model, "o_proj", "2")] == [2]
    with pytest.raises(SfnError, match=r"3 layers in model\.language_model\.layers"):
        select_parameters(model, "o_proj", "3")
    # without a layer range a role is a role everywhere: the vision tower's attention output projections too
    assert any("vision_tower" in n for n in select_parameters(model, "o_proj"))


def test_two_unnamed_layer_stacks_are_refused_with_both_named():
    names = [f"{stack}.layers.{i}.self_attn.o_proj.weight" for stack in ("tower_a", "tower_b") for i in range(2)]
    with pytest.raises(SfnError, match=r"tower_a\.layers \(2 layers\), tower_b\.layers \(2 layers\)"):
        select_names(names, "o_proj", "0")
    assert len(select_names(names, "o_proj", "all")) == 4  # no layer range: nothing to disambiguate


def test_empty_trainable_layers_is_an_error_not_all(tmp_path, qwen2_base, sum_data):
    from helpers import train_recipe

    from sfn_train.cli import main

    with pytest.raises(SfnError, match="trainable_layers is empty"):
        parse_layers([])
    with pytest.raises(SfnError, match="trainable_layers is empty"):
        select_names(["model.layers.0.self_attn.o_proj.weight"], "o_proj", [])
    recipe = train_recipe(tmp_path, qwen2_base, sum_data, trainable_layers=[])
    assert main(["train", "--config", str(recipe)]) == 2
    assert not (tmp_path / "out").exists()


def test_regex_with_a_repetition_range_is_one_entry(models, qwen2_base, capsys):
    from sfn_train.cli import main
    from sfn_train.roles import normalize_modules

    regex = r"layers\.[0-9]{1,2}\.self_attn\.o_proj\.weight"
    assert normalize_modules(f"q_proj,{regex}") == ["q_proj", regex]
    assert normalize_modules([regex, "k_proj"]) == [regex, "k_proj"]
    assert select_parameters(models["qwen2"], regex) == [f"model.layers.{i}.self_attn.o_proj.weight" for i in range(4)]
    assert main(["select", str(qwen2_base), "--modules", regex]) == 0
    assert capsys.readouterr().out.count("o_proj.weight\t") == 4


def test_gadgets_on_a_vision_language_checkpoint_number_the_language_model_layers(tmp_path):
    """Stored as `language_model.model.layers.N` next to `vision_tower.vision_model.encoder.layers.N` (transformers'
    Llava layout on disk): removing layer 1 drops the language model's layer 1 only, and the result loads."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from sfn_train.gadgets import destroy

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=16, projection_dim=32)
    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=64)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_index=63))
    model.save_pretrained(tmp_path / "vlm")
    zeroed = destroy(tmp_path / "vlm", tmp_path / "z", modules="o_proj", layers="0", mode="zero")
    assert zeroed["changed_tensors"] == ["language_model.model.layers.0.self_attn.o_proj.weight"]
    destroy(tmp_path / "vlm", tmp_path / "r", layers="1", mode="remove")
    short, info = LlavaForConditionalGeneration.from_pretrained(tmp_path / "r", output_loading_info=True)
    assert not any(info.values()), info
    assert (short.config.text_config.num_hidden_layers, short.config.vision_config.num_hidden_layers) == (2, 2)
    before, after = model.state_dict(), short.state_dict()
    for name, value in after.items():
        old = name.replace("language_model.layers.1.", "language_model.layers.2.")
        assert torch.equal(value, before[old]), name
