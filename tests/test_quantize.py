"""`quantize_frozen: 4bit | 8bit`: frozen linears through bitsandbytes, trained modules in full precision.

bitsandbytes 0.50.2 runs both modes on this x86_64 CPU (its torch/native CPU kernels), so the runs below train for
real; the start-up error path is tested by making the probe fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import (
    REPO,
    RUN_RECORDS,
    assert_resumes_from_step_2,
    changed_tensors,
    load_tensors,
    one_line_error,
    run_with_callbacks,
    step_watcher,
    train_recipe,
    with_run_records,
)
from sfn_train.cli import main

O_PROJ = {f"model.layers.{i}.self_attn.o_proj.weight" for i in range(4)}


def train(tmp_path, base, data, **keys):
    assert main(["train", "--config", str(train_recipe(tmp_path, base, data, **keys))]) == 0
    return tmp_path / "out"


def meta_model(**config):
    from transformers import AutoModelForCausalLM

    from sfn_train.tiny import tiny_config

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(tiny_config("qwen2", **config))


# --- selection -> what is quantized ------------------------------------------------------------------------------------
def test_plan_keeps_the_trained_linears_and_the_head_in_full_precision():
    from sfn_train.quantize import quantization_plan
    from sfn_train.roles import select_parameters

    model = meta_model()
    quantize, keep = quantization_plan(model, select_parameters(model, ["o_proj"], ["1"]))
    assert keep == ["model.layers.1.self_attn.o_proj", "lm_head"]
    assert len(quantize) == 4 * 7 - 1 and "model.layers.0.self_attn.o_proj" in quantize

    # a linear with any trainable parameter (here only q_proj's bias) stays whole; norms/embeddings are not linears
    quantize, keep = quantization_plan(model, select_parameters(model, [r"q_proj\.bias", "norm", "embed"], ["all"]))
    assert keep == [f"model.layers.{i}.self_attn.q_proj" for i in range(4)] + ["lm_head"]
    assert len(quantize) == 4 * 7 - 4

    quantize, keep = quantization_plan(model, select_parameters(model, ["all"]))
    assert quantize == [] and len(keep) == 4 * 7 + 1


def test_tied_head_is_never_quantized():
    from sfn_train.quantize import quantization_plan
    from sfn_train.roles import select_parameters

    model = meta_model(tie_word_embeddings=True)
    _, keep = quantization_plan(model, select_parameters(model, ["o_proj"]))
    assert "lm_head" in keep


# --- training ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_base(tmp_path_factory, qwen2_base):
    """The base as a finished run leaves it: its own trainer_state.json (step 476), results, manifest, model card."""
    return with_run_records(qwen2_base, tmp_path_factory.mktemp("trained") / "base")


@pytest.mark.parametrize("mode", ["4bit", "8bit"])
def test_quantized_run_trains_the_selection_and_saves_the_full_precision_base(tmp_path, trained_base, sum_data, mode):
    from safetensors.torch import load_file

    watcher = step_watcher(O_PROJ)
    out = run_with_callbacks(train_recipe(tmp_path, trained_base, sum_data, quantize_frozen=mode), watcher)

    # exactly the selection changed; every other tensor is bitwise the base's (re-read from its files, not dequantized)
    changed, unchanged = changed_tensors(trained_base, out)
    assert changed == O_PROJ and len(unchanged) == 47
    tensors = load_tensors(out)
    assert all(t.dtype == torch.float32 for t in tensors.values())  # nothing saved as uint8/int8 + quant stats

    # the plugin and the checkpoint hold the live model's trained tensors at the end of training, in full precision
    plugin = load_file(out / "sfn_plugin.safetensors")
    assert set(plugin) == O_PROJ and all(plugin[n].dtype == torch.float32 for n in plugin)
    assert all(torch.equal(plugin[n], watcher.final[n]) and torch.equal(tensors[n], watcher.final[n]) for n in O_PROJ)

    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    manifest = json.loads((out / "sfn_manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["recipe"]["sfn"]["quantize_frozen"] == mode
    summary = manifest["selection"]["quantize_frozen"]
    assert summary["quantized_linears"] == 4 * 7 - 4 and summary["full_precision_linears"][-1] == "lm_head"
    assert summary["weight_bytes_after"] < summary["weight_bytes_before"]

    # the output is rebuilt from the base's folder: it takes the model's files from there, and none of the base
    # run's records -- the loss curve is this run's (4 steps), not the base's (476)
    assert (out / "tokenizer.json").exists() and (out / "chat_template.jinja").exists()
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2, 3, 4]
    for name in RUN_RECORDS:
        assert not (out / name).exists() or (out / name).read_text() != RUN_RECORDS[name], name


def test_any_selection_trains_through_8bit(tmp_path, qwen2_base, sum_data):
    from sfn_train.roles import select_names

    out = train(tmp_path, qwen2_base, sum_data, quantize_frozen="8bit", trainable_modules=["q_proj", "down_proj"],
                trainable_layers=[0, 3])
    changed, _ = changed_tensors(qwen2_base, out)
    assert changed == set(select_names(list(load_tensors(qwen2_base)), ["q_proj", "down_proj"], [0, 3]))


def test_resume_runs_only_the_remaining_steps_and_gives_the_same_weights(tmp_path, qwen2_base, sum_data):
    """checkpoint-N folders hold the quantized model (for resuming only); resuming re-quantizes the same base and runs
    steps 3-4 only (a run that restarted from step 0 would end on the same weights; `assert_resumes_from_step_2`)."""
    save = dict(max_steps=4, save_strategy="steps", save_steps=2, quantize_frozen="4bit")
    (tmp_path / "full").mkdir()
    reference = train(tmp_path / "full", qwen2_base, sum_data, **save)
    out = assert_resumes_from_step_2(tmp_path, qwen2_base, sum_data, reference, O_PROJ, **save)
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 4


LOAD_WITHOUT_BNB = r"""
import sys
class NoBitsandbytes:  # any attempt to import bitsandbytes fails, as on a machine without it
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "bitsandbytes":
            raise ImportError("bitsandbytes is blocked in this test")
sys.meta_path.insert(0, NoBitsandbytes())
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
assert getattr(model, "hf_quantizer", None) is None
assert all(p.dtype == torch.float32 for p in model.parameters())
model(torch.tensor([[5, 6, 7]]))
print("LOADED")
"""


def test_saved_checkpoint_loads_without_bitsandbytes(tmp_path, qwen2_base, sum_data):
    out = train(tmp_path, qwen2_base, sum_data, quantize_frozen="4bit", max_steps=1)
    proc = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_BNB, str(out)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert "LOADED" in proc.stdout, proc.stderr[-3000:]


def test_trainer_takes_the_model_and_optimizes_only_the_selection(tmp_path, qwen2_base, sum_data):
    """No hf_quantizer is attached, so the Trainer's quantized-model check does not apply; no quantized weight trains."""
    import bitsandbytes as bnb
    import datasets
    from trl import SFTTrainer

    from sfn_train.config import parse_recipe
    from sfn_train.quantize import quantize_frozen
    from sfn_train.train import freeze, load_model

    _, training_args, model_args, sfn_args = parse_recipe(
        ["--config", str(train_recipe(tmp_path, qwen2_base, sum_data, quantize_frozen="4bit"))])
    model = load_model(model_args)
    selection = freeze(model, sfn_args)
    quantize_frozen(model, selection.trainable_tensors, "4bit", torch.device("cpu"))
    assert getattr(model, "hf_quantizer", None) is None
    trainer = SFTTrainer(model=model, args=training_args,
                         train_dataset=datasets.Dataset.from_list([{"prompt": "a", "completion": "b"}]))
    optimizer = trainer.create_optimizer()
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for n, p in model.named_parameters() if n in O_PROJ}
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if n in O_PROJ)  # not cast to bf16
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    assert type(model.model.layers[0].self_attn.o_proj) is torch.nn.Linear


def test_transformers_still_refuses_a_from_pretrained_quantized_model(qwen2_base, tmp_path):
    """Why we do not load through BitsAndBytesConfig: the Trainer refuses such a model without PEFT adapters.

    If a transformers release drops this check, this test fails, and sfn_train/quantize.py could load through
    `from_pretrained(quantization_config=...)` instead.
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Trainer, TrainingArguments

    model = AutoModelForCausalLM.from_pretrained(
        qwen2_base, quantization_config=BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=["lm_head"]))
    with pytest.raises(ValueError, match="purely quantized"):
        Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none"))


PEAK = r"""
import json, sys
from transformers import TrainerCallback
from sfn_train.config import parse_recipe
from sfn_train.train import run_sft

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

class Peak(TrainerCallback):
    peak = 0
    def on_train_begin(self, args, state, control, **kw):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS mark: what loading (and quantizing) needed is not the step
    def on_step_end(self, args, state, control, **kw):
        self.peak = max(self.peak, status("VmHWM:"))

peak = Peak()
run_sft(*parse_recipe(sys.argv[1:]), callbacks=[peak])
print("RESULT " + json.dumps({"peak": peak.peak}))
"""


def step_peak(tmp_path, base, data, mode) -> int:
    (tmp_path / mode).mkdir()
    recipe = train_recipe(tmp_path / mode, base, data, quantize_frozen=mode, max_steps=2,
                          per_device_train_batch_size=2, max_length=128)
    proc = subprocess.run([sys.executable, "-c", PEAK, "--config", str(recipe)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=REPO, timeout=600)
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    return json.loads(line[0][7:])["peak"]


@pytest.mark.slow
def test_4bit_lowers_the_peak_memory_of_a_training_step(tmp_path, sum_data):
    """Peak RSS of training steps (the mark reset once the model is loaded), same model, none vs 4bit.

    8 layers, hidden 1024: the frozen linears are 252 MB in fp32 and ~35 MB in NF4, but importing bitsandbytes
    alone adds ~115 MB of RSS on this CPU, so the expected gain is ~100 MB (measured: 995 vs 896 MB); demand 40 MB.
    """
    from sfn_train.tiny import save_tiny_checkpoint

    base = save_tiny_checkpoint(tmp_path / "base", "qwen2", hidden=1024, layers=8)
    none, nf4 = step_peak(tmp_path, base, sum_data, "none"), step_peak(tmp_path, base, sum_data, "4bit")
    print(f"peak RSS of a training step: none {none / 2**20:.0f} MB, 4bit {nf4 / 2**20:.0f} MB")
    assert nf4 < none - 40 * 2**20, (none, nf4)


@pytest.mark.slow
def test_two_process_ddp_run(tmp_path, qwen2_base, sum_data):
    from test_distributed import torchrun

    torchrun(train_recipe(tmp_path, qwen2_base, sum_data, per_device_train_batch_size=2, quantize_frozen="4bit"))
    changed, unchanged = changed_tensors(qwen2_base, tmp_path / "out")
    assert changed == O_PROJ and len(unchanged) == 47


# --- start-up errors: one line, before any model loads ---------------------------------------------------------------
def run_bad(tmp_path, capsys, base, data, **keys) -> str:
    recipe = train_recipe(tmp_path, base, data, **keys)
    assert main(["train", "--config", str(recipe)]) == 2
    assert not (tmp_path / "out").exists()
    return one_line_error(capsys)


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the start-up check failed")

    monkeypatch.setattr("sfn_train.train.load_model", refuse)
    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", refuse)


def test_no_bitsandbytes_backend_is_one_line_at_start_up(tmp_path, capsys, qwen2_base, sum_data, monkeypatch,
                                                         no_model_load):
    def no_backend(mode, device):
        raise NotImplementedError("No kernel registered for bitsandbytes::quantize_4bit on cpu")

    monkeypatch.setattr("sfn_train.quantize.probe", no_backend)
    line = run_bad(tmp_path, capsys, qwen2_base, sum_data, quantize_frozen="4bit")
    assert "quantize_frozen: 4bit cannot run on cpu with bitsandbytes 0." in line
    assert "No kernel registered" in line and "quantize_frozen: none" in line


def test_missing_bitsandbytes_is_one_line_at_start_up(tmp_path, capsys, qwen2_base, sum_data, monkeypatch,
                                                      no_model_load):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError
    line = run_bad(tmp_path, capsys, qwen2_base, sum_data, quantize_frozen="8bit")
    assert "quantize_frozen: 8bit needs bitsandbytes" in line


def test_quantize_under_deepspeed_is_refused(tmp_path, capsys, qwen2_base, sum_data, no_model_load):
    line = run_bad(tmp_path, capsys, qwen2_base, sum_data, quantize_frozen="4bit",
                   deepspeed=str(REPO / "ds_configs" / "zero2.json"))
    assert "not under DeepSpeed" in line


def test_the_probe_runs_both_modes_here():
    from sfn_train.quantize import probe

    for mode in ("4bit", "8bit"):
        probe(mode, torch.device("cpu"))


@pytest.mark.parametrize("key, mode", [("load_in_4bit", "4bit"), ("load_in_8bit", "8bit")])
def test_load_in_nbit_means_quantize_frozen(tmp_path, capsys, caplog, qwen2_base, sum_data, monkeypatch,
                                            no_model_load, key, mode):
    """TRL's load_in_4bit/8bit (listed by `sfn train --help`) is quantize_frozen, said in a log line: here the probe
    refuses the backend, so the run stops at start-up with quantize_frozen's own error (before: it trained an
    unquantized model without a word)."""
    import logging

    def no_backend(mode, device):
        raise NotImplementedError("no backend in this test")

    monkeypatch.setattr("sfn_train.quantize.probe", no_backend)
    caplog.set_level(logging.INFO, logger="sfn_train")
    line = run_bad(tmp_path, capsys, qwen2_base, sum_data, **{key: True})
    assert f"quantize_frozen: {mode} cannot run on cpu" in line
    assert f"{key}: true means quantize_frozen: {mode} here" in caplog.text


@pytest.mark.parametrize("keys, named", [
    ({"lora_r": 8}, "lora_r is set (8), but sfn train does not use it: a LoRA setting"),
    ({"model_init_kwargs": {"device_map": "auto"}}, "model_init_kwargs is set ({'device_map': 'auto'}), but sfn train"),
    ({"bnb_4bit_quant_type": "fp4"}, "bnb_4bit_quant_type is set ('fp4'), but sfn train does not use it"),
    ({"dataset_streaming": True}, "dataset_streaming is set (True)"),
    ({"do_predict": True}, "do_predict is set (True)"),
    ({"load_in_4bit": True, "quantize_frozen": "8bit"}, "load_in_4bit asks for 4bit but quantize_frozen is 8bit"),
])
def test_trl_keys_sfn_does_not_use_are_refused(tmp_path, capsys, qwen2_base, sum_data, no_model_load, keys, named):
    assert named in run_bad(tmp_path, capsys, qwen2_base, sum_data, **keys)
