"""The gadgets (delta, merge, destroy, plugin) on tiny checkpoints: exact numbers, exact bytes, clean failures."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from sfn_train.checkpoint import INDEX_FILE, Checkpoint, cached_fingerprint, fingerprint
from sfn_train.cli import main as sfn_main
from sfn_train.errors import SfnError
from sfn_train.gadgets import delta, destroy, merge, plugin_apply, plugin_extract
from sfn_train.gadgets.delta import EDGES, Moments, symlog
from sfn_train.manifest import manifest_problems
from sfn_train.plugin import read_plugin_metadata, write_plugin
from sfn_train.tiny import save_tiny_checkpoint

BF16 = torch.bfloat16


# ---------------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def fingerprint_cache(tmp_path, monkeypatch):
    """Keep the fingerprint cache out of the home folder."""
    monkeypatch.setenv("SFN_FINGERPRINT_CACHE", str(tmp_path / "fingerprints.json"))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    c = {
        "qa": save_tiny_checkpoint(root / "qwen_a", "qwen2", seed=0),
        "qb": save_tiny_checkpoint(root / "qwen_b", "qwen2", seed=1),
        # Llama with tied embeddings, bf16, split over many shards.
        "la": save_tiny_checkpoint(root / "llama_a", "llama", seed=0, dtype=BF16, max_shard_size="20KB",
                                   tie_word_embeddings=True),
        "lb": save_tiny_checkpoint(root / "llama_b", "llama", seed=1, dtype=BF16, max_shard_size="20KB",
                                   tie_word_embeddings=True),
        "q_small": save_tiny_checkpoint(root / "qwen_small", "qwen2", seed=2, hidden=32),
    }
    # A donor lacking one tensor.
    missing = root / "qwen_missing"
    shutil.copytree(c["qb"], missing)
    tensors = load_file(missing / "model.safetensors")
    del tensors["model.layers.1.self_attn.o_proj.weight"]
    save_file(tensors, missing / "model.safetensors", metadata={"format": "pt"})
    c["q_missing"] = missing
    # A donor whose shard is cut short.
    truncated = root / "qwen_truncated"
    shutil.copytree(c["qb"], truncated)
    os.truncate(truncated / "model.safetensors", (truncated / "model.safetensors").stat().st_size - 100)
    c["q_truncated"] = truncated
    return c


def tensors_of(path) -> dict[str, torch.Tensor]:
    ck = Checkpoint(path)
    return {n: ck.tensor(n) for n in ck.names}


def raw_of(path) -> dict[str, bytes]:
    ck = Checkpoint(path)
    return {n: ck.raw(n) for n in ck.names}


def load_and_run(path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        logits = model(torch.tensor([[3, 4, 5, 6]])).logits
    assert torch.isfinite(logits).all()
    return model


# ------------------------------------------------------------------------------------------------------------- delta


def test_delta_numbers_match_numpy(ckpts, tmp_path):
    result = delta(ckpts["qa"], ckpts["qb"], tmp_path / "d", quiet=True)
    out = tmp_path / "d"
    for f in ["delta.json", "delta.csv", "delta_l2_by_role.png", "delta_rel_by_layer.png", "delta_hist_by_role.png"]:
        assert (out / f).stat().st_size > 0, f
    a, b = load_file(ckpts["qa"] / "model.safetensors"), load_file(ckpts["qb"] / "model.safetensors")
    rows = {r["name"]: r for r in result["tensors"]}
    assert set(rows) == set(a)
    for name in a:
        x, y = a[name].double().numpy(), b[name].double().numpy()
        l2_diff, l2_base = np.linalg.norm(y - x), np.linalg.norm(x)
        assert rows[name]["l2_diff"] == pytest.approx(l2_diff, rel=1e-5, abs=1e-6)
        assert rows[name]["l2_base"] == pytest.approx(l2_base, rel=1e-5)
        expected_rel = l2_diff / l2_base if l2_base else (0.0 if l2_diff == 0 else math.inf)  # zero-init biases
        assert rows[name]["rel_change"] == pytest.approx(expected_rel, rel=1e-5, abs=1e-6)
        assert rows[name]["eps"] == pytest.approx(max(1e-6 * np.abs(x).mean(), 1e-12), rel=1e-5)
    assert rows["model.layers.2.self_attn.o_proj.weight"]["role"] == "o_proj"
    assert rows["model.layers.2.self_attn.o_proj.weight"]["layer"] == 2
    assert rows["model.norm.weight"]["role"] == "norm" and rows["model.norm.weight"]["layer"] is None

    # CSV: one row per tensor, same numbers.
    with open(out / "delta.csv") as f:
        csv_rows = {r["name"]: r for r in csv.DictReader(f)}
    assert len(csv_rows) == len(a)
    assert float(csv_rows["lm_head.weight"]["l2_diff"]) == pytest.approx(rows["lm_head.weight"]["l2_diff"])

    # Per role: mean over layers of per-layer relative change; histogram covers every element (tiny tensors: exact).
    o = result["roles"]["o_proj"]
    per_layer = []
    for i in range(4):
        x = a[f"model.layers.{i}.self_attn.o_proj.weight"].double().numpy()
        y = b[f"model.layers.{i}.self_attn.o_proj.weight"].double().numpy()
        per_layer.append(np.linalg.norm(y - x) / np.linalg.norm(x))
    assert o["mean_rel_change"] == pytest.approx(np.mean(per_layer), rel=1e-5)
    assert sum(o["histogram_counts"]) == pytest.approx(4 * 64 * 64)
    # Histogram equals numpy's on the documented variable.
    ts = []
    for i in range(4):
        x = a[f"model.layers.{i}.self_attn.o_proj.weight"].numpy().ravel()
        y = b[f"model.layers.{i}.self_attn.o_proj.weight"].numpy().ravel()
        r = (y - x) / np.maximum(np.abs(x), 1e-6 * np.abs(x).mean())
        ts.append(np.clip(np.sign(r) * np.log10(1 + np.abs(r) / 1e-6), EDGES[0], EDGES[-1]))
    expected, _ = np.histogram(np.concatenate(ts), bins=EDGES)
    assert np.abs(np.array(o["histogram_counts"]) - expected).sum() <= 0.01 * expected.sum()
    # Norms identical in both models (the tiny models init norms to 1): zero change, no NaN.
    assert result["roles"]["norm"]["mean_rel_change"] == 0.0
    saved = json.loads((out / "delta.json").read_text())
    assert saved["settings"]["EPS_REL"] == 1e-6 and saved["ranking"] == result["ranking"]


def test_delta_bf16_sharded_and_sampling(ckpts, tmp_path):
    result = delta(ckpts["la"], ckpts["lb"], tmp_path / "d", sample=100, plots=False, quiet=True)
    a, b = tensors_of(ckpts["la"]), tensors_of(ckpts["lb"])
    row = next(r for r in result["tensors"] if r["name"] == "model.embed_tokens.weight")
    x, y = a["model.embed_tokens.weight"].double(), b["model.embed_tokens.weight"].double()
    assert row["l2_diff"] == pytest.approx(float((y - x).norm()), rel=1e-5)
    assert row["dtype"] == "BF16"
    # Sampled histograms still weigh each tensor by its size.
    assert sum(result["roles"]["embed"]["histogram_counts"]) == pytest.approx(x.numel())


def test_moments_streaming_matches_direct():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(-3, 1, 5000), rng.normal(3, 1, 5000)])
    m = Moments()
    for piece in np.array_split(x, 7):
        m.add(torch.from_numpy(piece))
    s = m.summary()
    c = x - x.mean()
    g1 = (c**3).mean() / (c**2).mean() ** 1.5
    g2 = (c**4).mean() / (c**2).mean() ** 2 - 3
    n = x.size
    bc = (g1**2 + 1) / (g2 + 3 * (n - 1) ** 2 / ((n - 2) * (n - 3)))
    assert s["skewness"] == pytest.approx(g1, abs=1e-9)
    assert s["excess_kurtosis"] == pytest.approx(g2, rel=1e-9)
    assert s["bimodality_coefficient"] == pytest.approx(bc, rel=1e-9)
    assert s["bimodality_coefficient"] > 5 / 9  # two well separated modes
    unimodal = Moments()
    unimodal.add(torch.from_numpy(rng.normal(0, 1, 10000)))
    assert unimodal.summary()["bimodality_coefficient"] < 5 / 9


def _bc_of_change(tmp_path, a: torch.Tensor, b: torch.Tensor) -> float:
    """Bimodality coefficient delta reports for one tensor pair (A -> B), through the real per-tensor code."""
    from sfn_train.gadgets.delta import tensor_delta

    for name, t in (("a", a), ("b", b)):
        (tmp_path / name).mkdir(exist_ok=True)
        save_file({"w": t.contiguous()}, str(tmp_path / name / "model.safetensors"))
    _, _, moments = tensor_delta(Checkpoint(tmp_path / "a").tensors["w"], Checkpoint(tmp_path / "b").tensors["w"])
    return moments.summary()["bimodality_coefficient"]


def test_bimodality_separates_few_moved_from_all_moved_a_little(tmp_path):
    """Unimodal changes come out below 5/9, "most untouched, a few moved" and two separated modes above."""
    g = torch.Generator().manual_seed(0)
    n = 1 << 16
    a = torch.randn(n, generator=g) * 0.02
    noise = {
        "gaussian dW": torch.randn(n, generator=g) * 1e-4,
        "laplace dW": torch.distributions.Laplace(0.0, 1e-4).sample((n,)),
        "uniform dW": (torch.rand(n, generator=g) * 2 - 1) * 1e-4,
        "gaussian r": a.abs() * torch.randn(n, generator=g) * 1e-3,
        "laplace r": a.abs() * torch.distributions.Laplace(0.0, 1e-3).sample((n,)),
    }
    for label, d in noise.items():
        assert _bc_of_change(tmp_path, a, a + d) < 5 / 9, label
    few = torch.zeros(n)
    moved = torch.rand(n, generator=g) < 0.05
    few[moved] = torch.randn(int(moved.sum()), generator=g) * 1e-3
    assert _bc_of_change(tmp_path, a, a + few) > 5 / 9  # 95% untouched, 5% moved
    two = a.abs() * torch.where(torch.rand(n, generator=g) < 0.5, 1e-6, 1e-1) * torch.randn(n, generator=g).sign()
    assert _bc_of_change(tmp_path, a, a + two) > 5 / 9  # half moved by ~1e-6, half by ~1e-1 (relative)
    # bf16: a small update leaves most elements bitwise unchanged (lr 1e-5 rounds away): two groups
    a16 = a.to(BF16)
    b16 = (a16.float() + torch.randn(n, generator=g) * 2e-5).to(BF16)
    assert 0.05 < (a16 != b16).float().mean() < 0.95
    assert _bc_of_change(tmp_path, a16, b16) > 5 / 9


def test_symlog_is_symmetric_and_zero_centred():
    r = torch.tensor([-1.0, 0.0, 1e-4, 1.0])
    t = symlog(r)
    assert t[1] == 0 and t[0] == -t[3] and t[2] == pytest.approx(math.log10(101))


# ------------------------------------------------------------------------------------------------------------- merge


def test_merge_takes_selected_from_donor_bitwise(ckpts, tmp_path):
    out = tmp_path / "m"
    manifest = merge(ckpts["qa"], ckpts["qb"], out, modules="o_proj")
    a, b, m = raw_of(ckpts["qa"]), raw_of(ckpts["qb"]), raw_of(out)
    assert set(m) == set(a)
    donors = {n for n in a if ".self_attn.o_proj." in n}
    assert len(donors) == 4
    for name in a:
        assert m[name] == (b[name] if name in donors else a[name]), name
    assert a["model.layers.0.self_attn.o_proj.weight"] != b["model.layers.0.self_attn.o_proj.weight"]
    assert sorted(manifest["donor_tensors"]) == sorted(donors)
    saved = json.loads((out / "sfn_manifest.json").read_text())
    assert saved == manifest and manifest_problems(saved) == [] and saved["kind"] == "merge"
    assert saved["counts"] == {"total": len(a), "from_base": len(a) - 4, "from_donor": 4}
    assert saved["base"]["fingerprint"] == fingerprint(ckpts["qa"])
    assert saved["donor"]["fingerprint"] == fingerprint(ckpts["qb"])
    assert (out / INDEX_FILE).exists() and (out / "tokenizer.json").exists() and (out / "config.json").exists()
    load_and_run(out)


def test_merge_alpha_interpolates_in_float32(ckpts, tmp_path):
    out = tmp_path / "m"
    merge(ckpts["qa"], ckpts["qb"], out, modules="q_proj,k_proj,v_proj", layers="0-1", alpha=0.25)
    a, b, m = tensors_of(ckpts["qa"]), tensors_of(ckpts["qb"]), tensors_of(out)
    changed = 0
    for name in a:
        if any(f"layers.{i}.self_attn.{p}_proj." in name for i in (0, 1) for p in "qkv"):
            expected = 0.75 * a[name].numpy() + 0.25 * b[name].numpy()
            np.testing.assert_allclose(m[name].numpy(), expected, rtol=1e-6, atol=1e-7)
            changed += 1
        else:
            assert torch.equal(m[name], a[name]), name
    assert changed == 12  # q, k, v weight and bias, 2 layers


def test_merge_bf16_sharded_tied(ckpts, tmp_path):
    out = tmp_path / "m"
    merge(ckpts["la"], ckpts["lb"], out, modules="o_proj,lm_head", alpha=0.5)
    a, b, m = tensors_of(ckpts["la"]), tensors_of(ckpts["lb"]), tensors_of(out)
    assert "lm_head.weight" not in m  # tied: the head is the embedding, selected through the alias
    assert len(Checkpoint(out).files) == len(Checkpoint(ckpts["la"]).files) > 1
    for name in a:
        assert m[name].dtype == BF16
        if ".o_proj." in name or name == "model.embed_tokens.weight":
            expected = (a[name].float() * 0.5 + b[name].float() * 0.5).to(BF16)
            assert torch.equal(m[name], expected), name
        else:
            assert torch.equal(m[name], a[name]), name
    model = load_and_run(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_merge_lm_head_on_a_gpt2_style_tied_checkpoint(tmp_path, capsys):
    """GPT-2 stores its tied head once, as `transformer.wte.weight`: `--modules lm_head` must take that matrix."""
    base = save_tiny_checkpoint(tmp_path / "gpt2_a", "gpt2", seed=0, layers=2)
    donor = save_tiny_checkpoint(tmp_path / "gpt2_b", "gpt2", seed=1, layers=2)
    assert "lm_head.weight" not in Checkpoint(base).tensors  # stored once, under the embedding's name
    out = tmp_path / "m"
    assert sfn_main(["merge", str(base), str(donor), "--modules", "lm_head", "--out", str(out)]) == 0
    manifest = json.loads((out / "sfn_manifest.json").read_text())
    assert manifest["donor_tensors"] == ["transformer.wte.weight"]  # not the position embedding `wpe`
    a, b, m = raw_of(base), raw_of(donor), raw_of(out)
    for name in a:
        assert m[name] == (b[name] if name == "transformer.wte.weight" else a[name]), name
    model = load_and_run(out)
    assert torch.equal(model.lm_head.weight, tensors_of(donor)["transformer.wte.weight"])


def test_merge_alpha_one_is_donor_bytes_in_bf16(ckpts, tmp_path):
    merge(ckpts["la"], ckpts["lb"], tmp_path / "m", modules="mlp", layers="2-3")
    a, b, m = raw_of(ckpts["la"]), raw_of(ckpts["lb"]), raw_of(tmp_path / "m")
    for name in a:
        take = ".mlp." in name and any(f"layers.{i}." in name for i in (2, 3))
        assert m[name] == (b[name] if take else a[name]), name


# ----------------------------------------------------------------------------------------------------------- destroy


def test_destroy_zero_touches_only_selected(ckpts, tmp_path):
    manifest = destroy(ckpts["qa"], tmp_path / "d", modules="o_proj", layers="1-2", mode="zero")
    a, d = raw_of(ckpts["qa"]), tensors_of(tmp_path / "d")
    raw_d = raw_of(tmp_path / "d")
    chosen = {f"model.layers.{i}.self_attn.o_proj.weight" for i in (1, 2)}
    assert set(manifest["changed_tensors"]) == chosen
    for name in a:
        if name in chosen:
            assert not d[name].any()
        else:
            assert raw_d[name] == a[name], name
    load_and_run(tmp_path / "d")


def test_destroy_reinit_std_and_determinism(ckpts, tmp_path):
    destroy(ckpts["qa"], tmp_path / "r1", modules="mlp", mode="reinit", std=0.05, seed=3)
    destroy(ckpts["qa"], tmp_path / "r2", modules="mlp", mode="reinit", std=0.05, seed=3)
    destroy(ckpts["qa"], tmp_path / "r3", modules="mlp", mode="reinit", std="config", seed=4)
    a, r1, r2, r3 = (raw_of(p) for p in (ckpts["qa"], tmp_path / "r1", tmp_path / "r2", tmp_path / "r3"))
    t1, t3 = tensors_of(tmp_path / "r1"), tensors_of(tmp_path / "r3")
    mlp = [n for n in a if ".mlp." in n]
    values = torch.cat([t1[n].flatten() for n in mlp])
    assert values.std().item() == pytest.approx(0.05, rel=0.05)
    assert abs(values.mean().item()) < 0.005
    assert torch.cat([t3[n].flatten() for n in mlp]).std().item() == pytest.approx(0.02, rel=0.05)
    assert r1 == r2
    assert all(r1[n] != r3[n] for n in mlp)
    assert all(r1[n] == a[n] for n in a if n not in mlp)


def test_destroy_noise_and_scale(ckpts, tmp_path):
    destroy(ckpts["qa"], tmp_path / "n", modules="gate_proj", mode="noise", scale=0.1)
    destroy(ckpts["qa"], tmp_path / "s", modules="o_proj", layers="3", mode="scale", factor=0.5)
    a, n, s = tensors_of(ckpts["qa"]), tensors_of(tmp_path / "n"), tensors_of(tmp_path / "s")
    for i in range(4):
        name = f"model.layers.{i}.mlp.gate_proj.weight"
        ratio = ((n[name] - a[name]).std() / a[name].std()).item()
        assert ratio == pytest.approx(0.1, rel=0.1)
    name = "model.layers.3.self_attn.o_proj.weight"
    assert torch.equal(s[name], a[name] * 0.5)
    assert all(torch.equal(s[k], a[k]) for k in a if k != name)
    assert all(torch.equal(n[k], a[k]) for k in a if ".gate_proj." not in k)


@pytest.mark.parametrize("which", ["qa", "la"])
def test_destroy_remove_layers(ckpts, tmp_path, which):
    out = tmp_path / "rm"
    destroy(ckpts[which], out, layers="1-2", mode="remove")
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 2
    if "layer_types" in config:
        assert len(config["layer_types"]) == 2
    a, r = raw_of(ckpts[which]), raw_of(out)
    renumber = {0: 0, 3: 1}
    expected = {}
    for name, data in a.items():
        if ".layers." not in name:
            expected[name] = data
        else:
            i = int(name.split(".layers.")[1].split(".")[0])
            if i in renumber:
                expected[name.replace(f".layers.{i}.", f".layers.{renumber[i]}.")] = data
    assert r == expected
    model = load_and_run(out)
    assert len(model.model.layers) == 2


def test_destroy_remove_rejects_all_layers(ckpts, tmp_path):
    with pytest.raises(SfnError, match="remove all"):
        destroy(ckpts["qa"], tmp_path / "x", layers="0-3", mode="remove")
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------------------------ plugin


def test_plugin_round_trip(ckpts, tmp_path):
    # TUNED: base with o_proj of layers 0-1 changed, and an MLP change the plugin must not carry.
    tuned = tmp_path / "tuned"
    merge(ckpts["qa"], ckpts["qb"], tmp_path / "t0", modules="o_proj", layers="0-1")
    merge(tmp_path / "t0", ckpts["qb"], tuned, modules="up_proj", layers="2")
    plugin = tmp_path / "p" / "oproj.safetensors"
    summary = plugin_extract(tuned, ckpts["qa"], plugin)  # default: o_proj, all layers
    assert sorted(summary["tensors"]) == [f"model.layers.{i}.self_attn.o_proj.weight" for i in (0, 1)]
    assert summary["unchanged"] == 2
    meta = read_plugin_metadata(plugin)
    assert meta["base_fingerprint"] == fingerprint(ckpts["qa"])
    assert meta["modules"] == ["o_proj"]

    plugin_apply(ckpts["qa"], plugin, tmp_path / "applied")
    a, t, p = raw_of(ckpts["qa"]), raw_of(tuned), raw_of(tmp_path / "applied")
    for name in a:
        if ".o_proj." in name:
            assert p[name] == t[name], name
        else:
            assert p[name] == a[name], name
    assert p["model.layers.2.mlp.up_proj.weight"] != t["model.layers.2.mlp.up_proj.weight"]
    load_and_run(tmp_path / "applied")


def test_plugin_bf16_sharded_round_trip(ckpts, tmp_path):
    plugin = tmp_path / "p.safetensors"
    plugin_extract(ckpts["lb"], ckpts["la"], plugin, modules="o_proj,q_proj", layers="1,3")
    plugin_apply(ckpts["la"], plugin, tmp_path / "applied")
    a, b, p = raw_of(ckpts["la"]), raw_of(ckpts["lb"]), raw_of(tmp_path / "applied")
    for name in a:
        take = (".o_proj." in name or ".q_proj." in name) and any(f"layers.{i}." in name for i in (1, 3))
        assert p[name] == (b[name] if take else a[name]), name


def test_plugin_fingerprint_mismatch(ckpts, tmp_path, capsys):
    plugin = tmp_path / "p.safetensors"
    plugin_extract(ckpts["qb"], ckpts["qa"], plugin)
    with pytest.raises(SfnError, match="--force") as err:
        plugin_apply(ckpts["qb"], plugin, tmp_path / "x")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "x").exists()
    manifest = plugin_apply(ckpts["qb"], plugin, tmp_path / "forced", force=True)
    assert manifest["forced"] is True
    assert "warning" in capsys.readouterr().err
    b, f = raw_of(ckpts["qb"]), raw_of(tmp_path / "forced")
    assert f == b  # the plugin holds qb's own o_proj tensors


def test_plugin_foreign_tensors_refused(ckpts, tmp_path):
    base_fp = fingerprint(ckpts["qa"])
    unknown = tmp_path / "unknown.safetensors"
    write_plugin(unknown, {"model.layers.9.self_attn.o_proj.weight": torch.zeros(64, 64)},
                 base_fingerprint=base_fp, modules=["o_proj"], layers="all")
    wrong_shape = tmp_path / "shape.safetensors"
    write_plugin(wrong_shape, {"model.layers.0.self_attn.o_proj.weight": torch.zeros(32, 64)},
                 base_fingerprint=base_fp, modules=["o_proj"], layers="all")
    with pytest.raises(SfnError, match="lacks"):
        plugin_apply(ckpts["qa"], unknown, tmp_path / "x")
    with pytest.raises(SfnError, match="shape"):
        plugin_apply(ckpts["qa"], wrong_shape, tmp_path / "x")
    with pytest.raises(SfnError, match="differs"):
        plugin_extract(ckpts["qa"], ckpts["qa"], tmp_path / "same.safetensors")
    assert not (tmp_path / "x").exists() and not (tmp_path / "same.safetensors").exists()


# ------------------------------------------------------------------------------------------------------------ errors


ERROR_CASES = {
    "architecture": (lambda c, o: merge(c["qa"], c["la"], o), "architecture"),
    "missing": (lambda c, o: merge(c["qa"], c["q_missing"], o), "lacks 1 selected"),
    "shape": (lambda c, o: merge(c["qa"], c["q_small"], o, modules="o_proj"), "shape"),
    "truncated": (lambda c, o: merge(c["qa"], c["q_truncated"], o), "truncated"),
    "truncated_delta": (lambda c, o: delta(c["q_truncated"], c["qa"], o), "truncated"),
    "truncated_destroy": (lambda c, o: destroy(c["q_truncated"], o), "truncated"),
    "bad_module": (lambda c, o: merge(c["qa"], c["qb"], o, modules="nope_proj"), "matches no parameter"),
    "bad_layers": (lambda c, o: destroy(c["qa"], o, layers="7"), "out of range"),
    "bad_std": (lambda c, o: destroy(c["qa"], o, mode="reinit", std="big"), "--std"),
    "bad_mode": (lambda c, o: destroy(c["qa"], o, mode="melt"), "--mode"),
    "remove_with_modules": (lambda c, o: destroy(c["qa"], o, mode="remove", modules="o_proj", layers="1"), "--modules"),
    "plugin_not_a_plugin": (lambda c, o: plugin_apply(c["qa"], c["qa"] / "model.safetensors", o), "not an sfn plugin"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_errors_are_one_line_and_leave_nothing(ckpts, tmp_path, case):
    run, pattern = ERROR_CASES[case]
    out = tmp_path / "runs" / "out"
    with pytest.raises(SfnError, match=pattern) as err:
        run(ckpts, out)
    assert "\n" not in str(err.value)
    assert not out.exists()
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_cached_fingerprint_follows_file_changes(ckpts, tmp_path):
    folder = tmp_path / "q"
    shutil.copytree(ckpts["qa"], folder)
    first = cached_fingerprint(folder)
    assert first == fingerprint(folder) == cached_fingerprint(folder)
    assert str(folder.resolve()) in json.loads((tmp_path / "fingerprints.json").read_text())
    tensors = load_file(folder / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 2
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    assert cached_fingerprint(folder) == fingerprint(folder) != first


def test_existing_output_needs_overwrite(ckpts, tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(SfnError, match="--overwrite"):
        merge(ckpts["qa"], ckpts["qb"], out)
    assert (out / "keep.txt").exists()
    merge(ckpts["qa"], ckpts["qb"], out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "sfn_manifest.json").exists()


CLI_ERRORS = {
    "merge_arch": lambda c, o: ["merge", str(c["qa"]), str(c["la"]), "--out", o],
    "merge_missing": lambda c, o: ["merge", str(c["qa"]), str(c["q_missing"]), "--modules", "o_proj", "--out", o],
    "merge_shape": lambda c, o: ["merge", str(c["qa"]), str(c["q_small"]), "--out", o],
    "merge_truncated": lambda c, o: ["merge", str(c["qa"]), str(c["q_truncated"]), "--out", o],
    "delta_truncated": lambda c, o: ["delta", str(c["qa"]), str(c["q_truncated"]), "--out", o],
    "destroy_remove_all": lambda c, o: ["destroy", str(c["qa"]), "--mode", "remove", "--layers", "0-3", "--out", o],
    "plugin_missing_file": lambda c, o: ["plugin", "apply", str(c["qa"]), o + ".safetensors", "--out", o],
}


@pytest.mark.parametrize("case", list(CLI_ERRORS))
def test_cli_errors_exit_2_with_one_line(ckpts, tmp_path, capsys, case):
    out = str(tmp_path / "out")
    assert sfn_main(CLI_ERRORS[case](ckpts, out)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sfn ") and "error:" in err
    assert len(err.splitlines()) == 1, err
    assert not Path(out).exists()


def test_cli_fingerprint_mismatch_and_force(ckpts, tmp_path, capsys):
    plugin = str(tmp_path / "p.safetensors")
    assert sfn_main(["plugin", "extract", str(ckpts["qb"]), "--base", str(ckpts["qa"]), "--out", plugin]) == 0
    out = str(tmp_path / "applied")
    capsys.readouterr()
    assert sfn_main(["plugin", "apply", str(ckpts["qb"]), plugin, "--out", out]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "fingerprint" in err
    assert not Path(out).exists()
    assert sfn_main(["plugin", "apply", str(ckpts["qb"]), plugin, "--out", out, "--force"]) == 0
    manifest = json.loads((Path(out) / "sfn_manifest.json").read_text())
    assert manifest["forced"] is True and manifest["kind"] == "plugin apply" and manifest_problems(manifest) == []
    assert manifest["command"].startswith("sfn plugin apply ") and manifest["command"].endswith(" --force")


def test_cli_commands_end_to_end(ckpts, tmp_path, capsys):
    qa, qb = str(ckpts["qa"]), str(ckpts["qb"])
    assert sfn_main(["delta", qa, qb, "--out", str(tmp_path / "delta"), "--no-plots"]) == 0
    manifest = json.loads((tmp_path / "delta" / "sfn_manifest.json").read_text())
    assert manifest["kind"] == "delta" and manifest_problems(manifest) == []
    table = capsys.readouterr().out
    assert table.splitlines()[0].startswith("role") and "o_proj" in table
    assert sfn_main(["merge", qa, qb, "--modules", "q_proj,k_proj,v_proj", "--layers", "0-1", "--alpha", "0.5",
                     "--out", str(tmp_path / "m")]) == 0
    manifest = json.loads((tmp_path / "m" / "sfn_manifest.json").read_text())
    assert manifest["alpha"] == 0.5 and manifest["counts"]["from_donor"] == 12
    assert manifest["command"].startswith("sfn merge ")
    assert sfn_main(["destroy", qa, "--modules", "o_proj", "--layers", "1-2", "--mode", "reinit", "--std", "config",
                     "--out", str(tmp_path / "d")]) == 0
    manifest = json.loads((tmp_path / "d" / "sfn_manifest.json").read_text())
    assert manifest["std"] == 0.02 and manifest["kind"] == "destroy" and manifest_problems(manifest) == []
    # --overwrite is needed a second time.
    assert sfn_main(["destroy", qa, "--out", str(tmp_path / "d")]) == 2
    assert sfn_main(["destroy", qa, "--out", str(tmp_path / "d"), "--overwrite"]) == 0


# ------------------------------------------------------------------------------- what an output takes from its base


@pytest.fixture(scope="module")
def trained_qa(ckpts, tmp_path_factory):
    """qa as a finished training run leaves it: weights, model files, and the run's own records."""
    from helpers import with_run_records

    return with_run_records(ckpts["qa"], tmp_path_factory.mktemp("run") / "qa_run")


def _plugin_against(base, tuned, folder) -> Path:
    path = folder / "p.safetensors"
    plugin_extract(tuned, base, path)
    return path


GADGET_OUTPUTS = {
    "merge": lambda base, c, out: merge(base, c["qb"], out),
    "destroy": lambda base, c, out: destroy(base, out, modules="o_proj", mode="zero"),
    "plugin_apply": lambda base, c, out: plugin_apply(base, _plugin_against(base, c["qb"], out.parent), out),
}


@pytest.mark.parametrize("gadget", list(GADGET_OUTPUTS))
def test_outputs_take_the_model_files_and_none_of_the_base_runs_records(ckpts, trained_qa, tmp_path, gadget):
    from helpers import RUN_RECORDS

    out = tmp_path / "out"
    GADGET_OUTPUTS[gadget](trained_qa, ckpts, out)
    model_files = {p.name for p in ckpts["qa"].iterdir()} - {"model.safetensors"}  # what save_pretrained wrote
    assert model_files == {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                           "chat_template.jinja"}
    assert {p.name for p in out.iterdir()} == model_files | {"model.safetensors", INDEX_FILE, "sfn_manifest.json"}
    assert all((out / f).read_bytes() == (ckpts["qa"] / f).read_bytes() for f in model_files)
    assert json.loads((out / "sfn_manifest.json").read_text())["kind"] == gadget.replace("_", " ")
    assert not (set(RUN_RECORDS) - {"sfn_manifest.json"}) & {p.name for p in out.iterdir()}


def test_copy_side_files_never_overwrites(ckpts, tmp_path):
    from sfn_train.checkpoint import copy_side_files

    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "config.json").write_text("written by the run")
    copied = copy_side_files(ckpts["qa"], dst)
    assert (dst / "config.json").read_text() == "written by the run"
    assert sorted(copied) == ["chat_template.jinja", "generation_config.json", "tokenizer.json",
                              "tokenizer_config.json"]


# ---------------------------------------------------------------------------- sharded index against its shards


def _edit_index(src: Path, folder: Path, edit) -> Path:
    shutil.copytree(src, folder)
    index = json.loads((folder / INDEX_FILE).read_text())
    edit(index["weight_map"], folder)
    (folder / INDEX_FILE).write_text(json.dumps(index))
    return folder


def _drop_from_its_shard(weight_map, folder, name="model.layers.1.self_attn.o_proj.weight"):
    """The shard loses a tensor the index still lists (what a bad re-save or partial download leaves)."""
    shard = folder / weight_map[name]
    tensors = load_file(shard)
    del tensors[name]
    save_file(tensors, shard, metadata={"format": "pt"})


def _move_to_other_shard(weight_map, folder):
    name = "model.norm.weight"
    weight_map[name] = next(f for f in sorted(set(weight_map.values())) if f != weight_map[name])


INDEX_CASES = {
    "listed_not_stored": (_drop_from_its_shard, "model.layers.1.self_attn.o_proj.weight is listed in "
                                                "model-.*but no shard holds it"),
    "stored_not_listed": (lambda wm, f: wm.pop("model.layers.2.input_layernorm.weight"),
                          "model.layers.2.input_layernorm.weight is stored in model-.* but not listed in the index"),
    "shard_not_listed": (lambda wm, f: wm.pop("model.layers.0.self_attn.o_proj.weight"),  # alone in its shard
                         "shard model-00003-of-00021.safetensors is in the folder but the index lists none of its "
                         "tensors"),
    "wrong_shard": (_move_to_other_shard, "model.norm.weight is listed in model-.* but stored in model-"),
    "shard_with_dotdot": (lambda wm, f: wm.update({"model.norm.weight": _shard_outside(wm, f, relative=True)}),
                          "names shard '../outside.safetensors', which is outside the checkpoint folder"),
    "absolute_shard": (lambda wm, f: wm.update({"model.norm.weight": _shard_outside(wm, f, relative=False)}),
                       "names shard '/.*/outside.safetensors', which is outside the checkpoint folder"),
}


def _shard_outside(weight_map, folder, relative: bool) -> str:
    """A real shard file next to (not in) the checkpoint folder, named the way the index would reach it."""
    outside = folder.parent / "outside.safetensors"
    shutil.copy(folder / weight_map["model.norm.weight"], outside)
    return "../outside.safetensors" if relative else str(outside)


@pytest.mark.parametrize("case", list(INDEX_CASES))
def test_index_and_shards_must_agree(ckpts, tmp_path, case):
    edit, pattern = INDEX_CASES[case]
    Checkpoint(ckpts["la"])  # the unedited sharded checkpoint is accepted
    folder = _edit_index(ckpts["la"], tmp_path / "la", edit)
    with pytest.raises(SfnError, match=pattern) as err:
        Checkpoint(folder)
    assert "\n" not in str(err.value)


def test_tensor_stored_twice_is_refused(ckpts, tmp_path):
    folder = tmp_path / "twice"
    folder.mkdir()
    shutil.copy(ckpts["qa"] / "config.json", folder)
    save_file({"a": torch.zeros(2), "b": torch.ones(2)}, folder / "part1.safetensors")
    save_file({"b": torch.zeros(2)}, folder / "part2.safetensors")
    with pytest.raises(SfnError, match="tensor b is stored twice, in part1.safetensors and part2.safetensors"):
        Checkpoint(folder)


def test_destroy_refuses_a_checkpoint_missing_an_indexed_tensor(ckpts, tmp_path, capsys):
    """The index lists every tensor, a shard lacks one: writing the rest would let from_pretrained initialise the
    missing weight at random."""
    folder = _edit_index(ckpts["la"], tmp_path / "la", _drop_from_its_shard)
    out = tmp_path / "runs" / "d"
    assert sfn_main(["destroy", str(folder), "--modules", "o_proj", "--layers", "0", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "and its shards disagree" in err and "no shard holds it" in err
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------ atomic output with overwrite


def test_overwrite_keeps_the_old_output_until_the_new_one_is_in_place(tmp_path, monkeypatch):
    """The new folder cannot be renamed in: the old one is still there, whole, and nothing else is left behind."""
    import errno

    from sfn_train.checkpoint import atomic_output_dir

    out = tmp_path / "out"
    out.mkdir()
    (out / "result.txt").write_text("old")
    rename = os.replace

    def new_cannot_move_in(src, dst):
        if Path(src).name.startswith(".tmp-out-"):
            assert not Path(dst).exists()  # renamed in only once the old folder is out of the way ...
            assert [p for p in tmp_path.iterdir() if p.name.startswith(".old-out-")]  # ... kept aside, not deleted
            raise OSError(errno.EIO, "Input/output error")
        return rename(src, dst)

    monkeypatch.setattr(os, "replace", new_cannot_move_in)
    with pytest.raises(OSError, match="Input/output error"):
        with atomic_output_dir(out, overwrite=True) as tmp:
            (tmp / "result.txt").write_text("new")
    assert (out / "result.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]

    monkeypatch.undo()
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "result.txt").write_text("new")
    assert (out / "result.txt").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
