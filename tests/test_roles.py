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
