"""Generation backends on CPU: budget forcing and context limits (hf, and vLLM through a fake engine module), and the
vLLM engine's life per model (one merge, one engine, shut down, temp folder removed) with its start-up checks.

vLLM cannot be installed here (no GPU): `FakeVllm` stands in for the `vllm` module in `sys.modules`. It keeps what the
real one would check (a request never runs past `max_model_len`) and records every engine built, every generate
call and every shutdown.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch

from conftest import one_line_error
from sfn_train.checkpoint import Checkpoint, fingerprint
from sfn_train.errors import SfnError
from sfn_train.evaluation.context import context_length
from sfn_train.evaluation.forcing import make_rows
from sfn_train.evaluation.hf_backend import generate_hf
from sfn_train.evaluation.settings import GenerationSettings, ModelSpec
from sfn_train.evaluation.vllm_backend import VllmEngine
from sfn_train.plugin import write_plugin

END = "<|im_start|>"  # the tiny tokenizer's one-token delimiter, the one s1 itself uses to close thinking
O_PROJ = "model.layers.1.self_attn.o_proj.weight"


@pytest.fixture(scope="module")
def tok():
    from sfn_train.tiny import build_tokenizer

    return build_tokenizer()


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------------------------------------------
# Scripted models: the continuation is a function of the sequence so far


def scripted(tok, think: str, answer: str = "", close: bool = True):
    """Before END: `think`, then END (or `think` repeated forever when not `close`); after END: `answer`, EOS."""
    end, eos = tok.convert_tokens_to_ids(END), tok.eos_token_id

    def script(seq: list[int]) -> list[int]:
        if end in seq:
            return ids(tok, answer) + [eos]
        return ids(tok, think) + [end] if close else ids(tok, think) * 1000

    return script


class ScriptedHFModel:
    """Stands in for a causal LM's `generate`: follows `script`, stops at the config's stop ids, pads like HF."""

    def __init__(self, script, pad: int, context: int | None = None):
        self.script, self.pad, self.context = script, pad, context
        self.weight = torch.zeros(1)
        self.requests: list[int] = []

    def parameters(self):
        yield self.weight

    def generate(self, input_ids, attention_mask, generation_config):
        n, stops = generation_config.max_new_tokens, set(generation_config.eos_token_id)
        rows = []
        for seq, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            seq = [t for t, m in zip(seq, mask) if m]
            assert self.context is None or len(seq) + n <= self.context, "asked past the context length"
            self.requests.append(len(seq) + n)
            out = self.script(seq)[:n]
            cut = next((i + 1 for i, t in enumerate(out) if t in stops), len(out))
            rows.append(out[:cut] + [self.pad] * (n - cut))
        return torch.cat([input_ids, torch.tensor(rows, dtype=torch.long)], dim=1)


class FakeVllm:
    """The parts of the `vllm` module we use, recording what happens to every engine."""

    def __init__(self, script=None, max_model_len: int = 512, eos: int | None = None, fail_build: bool = False):
        self.events: list[str] = []
        self.engines: list[dict] = []
        fake = self

        class LLM:
            def __init__(self, **kwargs):
                if fail_build:
                    raise RuntimeError("CUDA out of memory (fake)")
                folder = Path(kwargs["model"])
                ck = Checkpoint(folder)
                fake.engines.append({"kwargs": kwargs, "folder": folder,
                                     "files": sorted(p.name for p in folder.iterdir()),
                                     "dtypes": {n: i.dtype for n, i in ck.tensors.items()},
                                     "o_proj": ck.tensor(O_PROJ).clone(), "shutdown": 0})
                fake.events.append(f"build {len(fake.engines)}")
                length = kwargs.get("max_model_len") or max_model_len
                self.llm_engine = types.SimpleNamespace(model_config=types.SimpleNamespace(
                    max_model_len=length, dtype=kwargs["dtype"]))
                self.number = len(fake.engines)

            def generate(self, prompts, params, use_tqdm=True):
                fake.events.append(f"generate {self.number}")
                limit = self.llm_engine.model_config.max_model_len
                outputs = []
                for prompt, p in zip(prompts, params):
                    seq = prompt["prompt_token_ids"]
                    if len(seq) + p.max_tokens > limit:  # what vLLM raises, for the whole batch
                        raise ValueError(f"prompt ({len(seq)}) + max_tokens ({p.max_tokens}) > max_model_len {limit}")
                    out = script(seq)[: p.max_tokens]
                    stop = next((i for i, t in enumerate(out) if t in p.stop_token_ids), None)
                    if stop is None:
                        done = dict(token_ids=out, finish_reason="length", stop_reason=None)
                    elif out[stop] == eos:  # vLLM keeps the EOS in token_ids and reports no stop_reason
                        done = dict(token_ids=out[: stop + 1], finish_reason="stop", stop_reason=None)
                    else:  # a stop_token_ids hit: left out of token_ids, named in stop_reason
                        done = dict(token_ids=out[:stop], finish_reason="stop", stop_reason=out[stop])
                    outputs.append(types.SimpleNamespace(outputs=[types.SimpleNamespace(**done)]))
                return outputs

            def shutdown(self):
                fake.engines[self.number - 1]["shutdown"] += 1
                fake.events.append(f"shutdown {self.number}")

        class SamplingParams:
            def __init__(self, **kwargs):
                self.__dict__.update(kwargs)

        def cleanup_dist_env_and_memory(shutdown_ray: bool = False):
            fake.events.append("cleanup")

        self.module = types.ModuleType("vllm")
        self.module.LLM, self.module.SamplingParams = LLM, SamplingParams
        self.parallel_state = types.ModuleType("vllm.distributed.parallel_state")
        self.parallel_state.cleanup_dist_env_and_memory = cleanup_dist_env_and_memory

    def install(self, monkeypatch, gpus: int = 1):
        monkeypatch.setitem(sys.modules, "vllm", self.module)
        monkeypatch.setitem(sys.modules, "vllm.distributed", types.ModuleType("vllm.distributed"))
        monkeypatch.setitem(sys.modules, "vllm.distributed.parallel_state", self.parallel_state)
        monkeypatch.setattr("sfn_train.evaluation.vllm_backend.visible_gpus", lambda: gpus)
        return self


def run_both(tok, script, settings, prompts, qwen2_base, monkeypatch, context: int | None = None):
    """The same rows through generate_hf and the vLLM engine: (hf rows, vllm rows, hf model, fake vllm)."""
    eos = [tok.eos_token_id]
    hf_rows = make_rows([ids(tok, p) for p in prompts], 1)
    model = ScriptedHFModel(script, tok.pad_token_id, context)
    generate_hf(model, tok, hf_rows, settings, eos, progress=False, context_len=context)
    fake = FakeVllm(script, max_model_len=context or 512, eos=tok.eos_token_id).install(monkeypatch)
    vllm_rows = make_rows([ids(tok, p) for p in prompts], 1)
    with VllmEngine(ModelSpec(str(qwen2_base)), settings) as engine:
        engine.generate(tok, vllm_rows, eos, progress=False)
    return hf_rows, vllm_rows, model, fake


def state(rows):
    return [(r.gen_ids, r.waits, r.finish_reason) for r in rows]


# ---------------------------------------------------------------------------------------------------------------
# Budget forcing, both backends


def test_budget_forcing_suppresses_end_of_thinking_then_answers(tok, qwen2_base, monkeypatch):
    """s1: the first N ends of thinking become "Wait"; the next one is kept and the model answers until EOS."""
    settings = GenerationSettings(budget_forcing=2, end_of_thinking=END, max_new_tokens=100, temperature=0)
    hf, vl, _, _ = run_both(tok, scripted(tok, "ab", "42"), settings, ["1+1=", "2+2=?"], qwen2_base, monkeypatch)
    end = tok.convert_tokens_to_ids(END)
    expected = ids(tok, "abWaitabWaitab") + [end] + ids(tok, "42")
    assert state(hf) == state(vl) == [(expected, 2, "stop")] * 2
    assert tok.decode(hf[0].gen_ids, skip_special_tokens=True) == "abWaitabWaitab42"


def test_budget_forcing_without_delimiter_suppresses_eos(tok, qwen2_base, monkeypatch):
    """No end-of-thinking token: EOS ends the thinking; it is suppressed N times, then ends the response."""
    eos = tok.eos_token_id
    settings = GenerationSettings(budget_forcing=3, max_new_tokens=100, temperature=0)
    hf, vl, _, _ = run_both(tok, lambda seq: ids(tok, "x") + [eos], settings, ["1+1="], qwen2_base, monkeypatch)
    assert state(hf) == state(vl) == [(ids(tok, "xWaitxWaitxWaitx"), 3, "stop")]


def test_thinking_budget_forces_the_end_of_thinking(tok, qwen2_base, monkeypatch):
    """A model that never stops thinking gets END appended at the thinking budget, then answers (s1's maximum)."""
    settings = GenerationSettings(end_of_thinking=END, thinking_budget=5, max_new_tokens=20, temperature=0)
    hf, vl, _, _ = run_both(tok, scripted(tok, "t", "7", close=False), settings, ["q"], qwen2_base, monkeypatch)
    assert state(hf) == state(vl) == [(ids(tok, "ttttt") + [tok.convert_tokens_to_ids(END)] + ids(tok, "7"), 0, "stop")]


def test_requests_stop_cleanly_at_the_context_length(tok, qwen2_base, monkeypatch):
    """Every request fits the context; a row with no room left stops as "context" and is never submitted."""
    prompts = ["1+1=", "x" * 30]  # 4 and 30 tokens; context 12
    settings = GenerationSettings(budget_forcing=5, max_new_tokens=100, temperature=0)
    hf, vl, model, fake = run_both(tok, lambda seq: ids(tok, "z") * 1000, settings, prompts, qwen2_base, monkeypatch,
                                   context=12)
    assert state(hf) == state(vl) == [(ids(tok, "z") * 8, 0, "context"), ([], 0, "context")]
    assert max(model.requests) <= 12  # the fakes raise on a request past the context, as vLLM does
    assert fake.events == ["build 1", "generate 1", "shutdown 1", "cleanup"]  # the long prompt was never sent


def test_wait_that_does_not_fit_the_context_is_not_forced(tok, qwen2_base, monkeypatch):
    eos = tok.eos_token_id
    settings = GenerationSettings(budget_forcing=5, max_new_tokens=100, temperature=0)
    # prompt 4 + "x" 1 + "Wait" 4 + "x" 1 = 10: a second "Wait" (4) would leave no room in a context of 12
    hf, vl, _, _ = run_both(tok, lambda seq: ids(tok, "x") + [eos], settings, ["1+1="], qwen2_base, monkeypatch,
                            context=12)
    assert state(hf) == state(vl) == [(ids(tok, "xWaitx"), 1, "stop")]


# ---------------------------------------------------------------------------------------------------------------
# vLLM engine per model


@pytest.fixture(scope="module")
def bf16_base(tmp_path_factory) -> Path:
    from sfn_train.tiny import save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path_factory.mktemp("bf16") / "base16", "qwen2", seed=3, dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def two_tasks(tmp_path_factory) -> list[str]:
    from sfn_train.evaluation.tasks import write_problems

    root = tmp_path_factory.mktemp("tasks")
    return [str(write_problems(root / f"{name}.jsonl", [{"id": "p1", "problem": f"{name}: 2+3?", "answer": "5"}]))
            for name in ("first", "second")]


def _in_process_grading(monkeypatch):
    """Grading is not what these tests are about: grade in this process instead of starting worker processes."""
    from sfn_train.evaluation.grading import grade_item

    monkeypatch.setattr("sfn_train.evaluation.run.grade_many", lambda items, **kw: [grade_item(i) for i in items])


def test_vllm_merges_once_per_model_builds_one_engine_and_cleans_up(bf16_base, two_tasks, tmp_path, monkeypatch, tok):
    import tempfile

    import sfn_train.plugin
    from sfn_train.evaluation import evaluate

    plugin_value = Checkpoint(bf16_base).tensor(O_PROJ).float() + 0.25  # a float32 plugin for a bfloat16 base
    plugin = write_plugin(tmp_path / "oproj.safetensors", {O_PROJ: plugin_value},
                          base_fingerprint=fingerprint(bf16_base), modules=["o_proj"], layers=[1], source="test")
    merges = []
    real_apply = sfn_train.plugin.plugin_apply
    monkeypatch.setattr(sfn_train.plugin, "plugin_apply", lambda *a, **k: merges.append(a) or real_apply(*a, **k))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    _in_process_grading(monkeypatch)
    eos = tok.eos_token_id
    fake = FakeVllm(lambda seq: ids(tok, "The answer is 5.") + [eos], eos=eos).install(monkeypatch)

    models = [ModelSpec(str(bf16_base), plugin=str(plugin), label="plus"), ModelSpec(str(bf16_base), label="base")]
    files = evaluate(models, two_tasks, tmp_path / "out", backend="vllm", max_new_tokens=32, max_model_len=256,
                     progress=False)

    assert len(files) == 4 and len(merges) == 1  # one merge for the plugin model, used by both of its tasks
    assert fake.events == ["build 1", "generate 1", "generate 1", "shutdown 1", "cleanup",
                           "build 2", "generate 2", "generate 2", "shutdown 2", "cleanup"]
    merged, plain = fake.engines
    stored = {i.dtype for i in Checkpoint(bf16_base).tensors.values()}
    assert stored == {"BF16"} and set(merged["dtypes"].values()) == stored  # the base's stored dtype, not float32
    assert torch.equal(merged["o_proj"], plugin_value.to(torch.bfloat16))
    assert {"config.json", "tokenizer_config.json"} <= set(merged["files"])
    assert merged["kwargs"]["max_model_len"] == 256 and merged["kwargs"]["tensor_parallel_size"] == 1
    assert not merged["folder"].exists() and not any((tmp_path / "tmp").iterdir())  # temp folder removed
    assert plain["folder"] == bf16_base.resolve()  # a model without a plugin is loaded from its own folder
    result = json.loads(files[0].read_text())
    assert result["settings"]["engine"] == {"engine": "vllm", "context_length": 256, "dtype": "bfloat16"}
    assert result["problems"][0]["samples"][0]["correct"] is True


def test_vllm_engine_that_fails_to_start_leaves_no_merged_folder(bf16_base, two_tasks, tmp_path, monkeypatch):
    import tempfile

    from sfn_train.evaluation import evaluate

    plugin = write_plugin(tmp_path / "p.safetensors", {O_PROJ: Checkpoint(bf16_base).tensor(O_PROJ) + 1},
                          base_fingerprint=fingerprint(bf16_base), modules=["o_proj"], layers=[1])
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    FakeVllm(fail_build=True).install(monkeypatch)
    with pytest.raises(RuntimeError, match="out of memory"):
        evaluate([ModelSpec(str(bf16_base), plugin=str(plugin))], two_tasks[:1], tmp_path / "out", backend="vllm",
                 progress=False)
    assert not any((tmp_path / "tmp").iterdir())


@pytest.mark.parametrize("args,gpus,message", [
    (["--tensor-parallel-size", "3"], 4, "--tensor-parallel-size 3 does not divide the 4 attention heads"),
    (["--tensor-parallel-size", "2"], 1, "--tensor-parallel-size 2 needs 2 GPUs but 1 are visible"),
    (["--max-model-len", "4096"], 1, "--max-model-len 4096 exceeds the 512 positions"),
    ([], 0, "needs a CUDA GPU and none is visible"),
])
def test_vllm_start_up_checks_fail_in_one_line_before_loading(qwen2_base, two_tasks, tmp_path, monkeypatch, capsys,
                                                              args, gpus, message):
    from sfn_train.cli import main

    fake = FakeVllm().install(monkeypatch, gpus=gpus)
    rc = main(["eval", str(qwen2_base), "--task", two_tasks[0], "--out", str(tmp_path / "o.json"), "--backend", "vllm",
               *args])
    assert rc == 2 and message in one_line_error(capsys)
    assert fake.events == []  # refused before any engine


def test_vllm_missing_is_one_line_error(qwen2_base, two_tasks, tmp_path, monkeypatch, capsys):
    from sfn_train.cli import main

    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    rc = main(["eval", str(qwen2_base), "--task", two_tasks[0], "--out", str(tmp_path / "o.json"), "--backend", "vllm"])
    assert rc == 2 and "needs vLLM installed" in one_line_error(capsys)


def test_hf_max_model_len_beyond_the_model_is_refused(qwen2_base, two_tasks, tmp_path, capsys):
    from sfn_train.cli import main

    rc = main(["eval", str(qwen2_base), "--task", two_tasks[0], "--out", str(tmp_path / "o.json"),
               "--max-model-len", "513"])
    assert rc == 2 and "--max-model-len 513 exceeds the 512 positions" in one_line_error(capsys)


def test_context_length_follows_vllms_rule():
    assert context_length({"max_position_embeddings": 32768}) == (32768, "max_position_embeddings")
    assert context_length({"max_position_embeddings": 4096, "n_positions": 2048})[0] == 2048  # the smallest key
    assert context_length({"text_config": {"max_position_embeddings": 8192}})[0] == 8192
    assert context_length({"hidden_size": 8}) == (None, "config.json names no context length")
    yarn = {"max_position_embeddings": 131072, "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                                                 "original_max_position_embeddings": 32768}}
    assert context_length(yarn) == (131072, "original_max_position_embeddings x RoPE factor 4")
    linear = {"max_position_embeddings": 4096, "rope_parameters": {"rope_type": "linear", "factor": 2.0}}
    assert context_length(linear)[0] == 8192
    llama3 = {"max_position_embeddings": 131072, "rope_parameters": {"rope_type": "llama3", "factor": 8.0}}
    assert context_length(llama3)[0] == 131072  # already the scaled length
    per_layer = {"max_position_embeddings": 4096, "rope_parameters": {
        "full_attention": {"rope_type": "linear", "factor": 2.0}, "sliding_attention": {"rope_type": "default"}}}
    assert context_length(per_layer)[0] == 8192
    assert context_length({"max_position_embeddings": 4096, "rope_parameters": {"rope_type": "default",
                                                                                 "rope_theta": 1e6}})[0] == 4096


def test_generation_settings_refuse_inconsistent_thinking_options():
    with pytest.raises(SfnError, match="--thinking-budget needs --end-of-thinking"):
        GenerationSettings(thinking_budget=10).check()
    with pytest.raises(SfnError, match="between 1 and max_new_tokens"):
        GenerationSettings(end_of_thinking=END, thinking_budget=200, max_new_tokens=100).check()


@pytest.mark.parametrize("token,message", [("</think>", "is 8 tokens for this tokenizer"),
                                           ("<|im_end|>", "is an EOS token of this model")])
def test_end_of_thinking_must_be_one_non_eos_token(qwen2_base, two_tasks, tmp_path, capsys, token, message):
    from sfn_train.cli import main

    rc = main(["eval", str(qwen2_base), "--task", two_tasks[0], "--out", str(tmp_path / "o.json"),
               "--end-of-thinking", token, "--budget-forcing", "1"])
    assert rc == 2 and message in one_line_error(capsys)
