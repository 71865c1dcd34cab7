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

from helpers import one_line_error
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


def suppress_early_stops(out: list[int], stops: set, least: int) -> list[int]:
    """What `min_tokens` does to a scripted continuation: a stop among the first `least` tokens cannot be sampled,
    so the model goes on with the script's next token."""
    kept: list[int] = []
    for t in out:
        if t in stops and len(kept) < least:
            continue
        kept.append(t)
    return kept


class ScriptedHFModel:
    """Stands in for a causal LM's `generate`: follows `script`, stops at the config's stop ids, pads like HF."""

    def __init__(self, script, pad: int, context: int | None = None):
        self.script, self.pad, self.context = script, pad, context
        self.weight = torch.zeros(1)
        self.requests: list[int] = []
        self.calls: list[tuple] = []  # (input ids, max new tokens, min new tokens, stop ids) per row and request

    def parameters(self):
        yield self.weight

    def generate(self, input_ids, attention_mask, generation_config):
        n, stops = generation_config.max_new_tokens, set(generation_config.eos_token_id)
        least = generation_config.min_new_tokens or 0
        rows = []
        for seq, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            seq = [t for t, m in zip(seq, mask) if m]
            assert self.context is None or len(seq) + n <= self.context, "asked past the context length"
            self.requests.append(len(seq) + n)
            self.calls.append((seq, n, least, sorted(stops)))
            out = suppress_early_stops(self.script(seq), stops, least)[:n]
            cut = next((i + 1 for i, t in enumerate(out) if t in stops), len(out))
            rows.append(out[:cut] + [self.pad] * (n - cut))
        return torch.cat([input_ids, torch.tensor(rows, dtype=torch.long)], dim=1)


class FakeVllm:
    """The parts of the `vllm` module we use, recording what happens to every engine."""

    def __init__(self, script=None, max_model_len: int = 512, eos: int | None = None, fail_build: bool = False):
        self.events: list[str] = []
        self.engines: list[dict] = []
        self.calls: list[tuple] = []  # (prompt ids, max_tokens, min_tokens, stop_token_ids) per request
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
                    fake.calls.append((list(seq), p.max_tokens, p.min_tokens, sorted(p.stop_token_ids)))
                    out = suppress_early_stops(script(seq), set(p.stop_token_ids) | {eos}, p.min_tokens)[: p.max_tokens]
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
# s1's protocol, both backends: the exact token-level sequence and the sequence of requests


def s1_settings(**changes):
    from sfn_train.evaluation.settings import resolve_settings

    return resolve_settings({"protocol": "s1", **changes})[0]


def has(seq: list[int], sub: list[int]) -> bool:
    return any(seq[i : i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


def s1_script(tok, think: list[int], after_wait: list[int], answer: str = "\nAnswer: 42"):
    """An s1-trained model: thinks `think` (then `after_wait` after a "Wait"), answers after <|im_start|>answer."""
    def script(seq: list[int]) -> list[int]:
        if has(seq, ids(tok, "<|im_start|>answer")):
            return ids(tok, answer) + [tok.eos_token_id]
        return after_wait if seq[-len(ids(tok, "Wait")):] == ids(tok, "Wait") else think

    return script


def test_s1_protocol_token_sequence_and_calls(tok, qwen2_base, monkeypatch):
    """prompt + "<|im_start|>think" -> think -> stop on <|im_start|> (dropped) -> "Wait" -> ... twice -> the next stop
    becomes "<|im_start|>answer" -> the answer until EOS; min_tokens=1 keeps a stop right after "Wait" from ending the
    thinking at once. Both backends make the same requests and produce the same tokens."""
    end, eos = tok.convert_tokens_to_ids(END), tok.eos_token_id
    # after each "Wait" the model would close its thinking at once: min_tokens=1 makes it think "cd" first
    script = s1_script(tok, ids(tok, "ab") + [end], [end] + ids(tok, "cd") + [end])
    prompt = ids(tok, "1+1=<|im_start|>think")
    settings = s1_settings(max_new_tokens=200)
    hf, vl, model, fake = run_both(tok, script, settings, ["1+1=<|im_start|>think"], qwen2_base, monkeypatch)
    think = ids(tok, "abWaitcdWaitcd")
    answer_marker = ids(tok, "<|im_start|>answer")
    expected = think + answer_marker + ids(tok, "\nAnswer: 42")
    assert state(hf) == state(vl) == [(expected, 2, "stop")]
    assert hf[0].answer_from == vl[0].answer_from == len(think) + len(answer_marker) and not hf[0].budget_spent
    budget = 200 - 4 - 6 - len(ids(tok, "<|im_start|>answer\nFinal Answer:")) - 100  # s1's "auto": 69 tokens
    wait = ids(tok, "Wait")
    after = [prompt, prompt + ids(tok, "ab") + wait, prompt + ids(tok, "abWaitcd") + wait, prompt + think + answer_marker]
    assert fake.calls == [  # (request, max_tokens, min_tokens, stop_token_ids): 3 thinking rounds, then the answer
        (after[0], budget, 1, sorted([end, eos])),
        (after[1], budget - 2 - len(wait), 1, sorted([end, eos])),
        (after[2], budget - 4 - 2 * len(wait), 1, sorted([end, eos])),
        (after[3], 200 - len(think) - len(answer_marker), 0, [eos]),
    ]
    assert model.calls == fake.calls
    assert tok.decode(hf[0].gen_ids) == "abWaitcdWaitcd<|im_start|>answer\nAnswer: 42"


@pytest.mark.parametrize("think,closing", [("t", "\n<|im_start|>answer\nFinal Answer:"),
                                           ("t\n", "<|im_start|>answer\nFinal Answer:")])
def test_s1_thinking_budget_forces_final_answer(tok, qwen2_base, monkeypatch, think, closing):
    """A model that never stops thinking is cut at the budget (forced "Wait"s count) and gets s1's closing: "\n"
    (unless the thinking ends in one) + "<|im_start|>answer\nFinal Answer:", then answers."""
    script = s1_script(tok, ids(tok, think) * 100, ids(tok, think) * 100, answer=" 7")
    settings = s1_settings(max_new_tokens=100, thinking_budget=6)
    hf, vl, _, fake = run_both(tok, script, settings, ["q<|im_start|>think"], qwen2_base, monkeypatch)
    thinking = (ids(tok, think) * 100)[:6]
    expected = thinking + ids(tok, closing) + ids(tok, " 7")
    assert state(hf) == state(vl) == [(expected, 0, "stop")]
    assert hf[0].budget_spent and vl[0].budget_spent
    assert [c[1:3] for c in fake.calls] == [(6, 1), (100 - len(thinking) - len(ids(tok, closing)), 0)]


def test_s1_auto_thinking_budget_is_s1s_rule(tok):
    """max_new_tokens - longest prompt (before "<|im_start|>think") - len("<|im_start|>think")
    - len("<|im_start|>answer\nFinal Answer:") - 100, over all the task's prompts (a shorter context replaces
    max_new_tokens); too little is one clear error."""
    from sfn_train.evaluation.forcing import auto_thinking_budget

    rows = make_rows([ids(tok, "x" * n + "<|im_start|>think") for n in (3, 17, 9)], 2)
    closing = len(ids(tok, "<|im_start|>answer\nFinal Answer:"))
    assert auto_thinking_budget(s1_settings(max_new_tokens=32768), tok, rows) == 32768 - 17 - 6 - closing - 100
    assert auto_thinking_budget(s1_settings(max_new_tokens=32768, thinking_budget=500), tok, rows) == 500
    assert auto_thinking_budget(s1_settings(max_new_tokens=32768), tok, rows, 4096) == 4096 - 17 - 6 - closing - 100
    with pytest.raises(SfnError, match="leaves no thinking"):
        auto_thinking_budget(s1_settings(max_new_tokens=120), tok, rows)


def test_protocols_are_presets_and_record_what_was_changed():
    from sfn_train.evaluation.settings import resolve_settings

    s1, changed = resolve_settings({"protocol": "s1", "budget_forcing": None})
    assert (s1.temperature, s1.budget_forcing, s1.thinking_min_tokens, s1.prompts) == (0.0, 2, 1, "bare")
    assert (s1.end_of_thinking, s1.answer_start, s1.budget_spent_text) == (END, "<|im_start|>answer", "\nFinal Answer:")
    assert changed == []
    sampled, _ = resolve_settings({})
    assert (sampled.protocol, sampled.temperature, sampled.top_p, sampled.prompts) == ("sampled", 0.6, 0.95, "instruct")
    _, changed = resolve_settings({"protocol": "s1", "budget_forcing": 4, "temperature": 0.0})
    assert changed == ["budget_forcing"]
    with pytest.raises(SfnError, match="protocol 'r1' is unknown"):
        resolve_settings({"protocol": "r1"})


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


def test_sfn_eval_protocol_s1_records_bare_prompt_and_grades_the_answer(qwen2_base, tmp_path, monkeypatch, tok):
    """`sfn eval --protocol s1`: bare prompt (GPQA's choices as s1 lists them) + "<|im_start|>think", the protocol and
    its changed keys in the result, and only the answer after "<|im_start|>answer" graded (the thinking's
    \\boxed{A} is not the answer)."""
    from sfn_train.cli import main
    from sfn_train.evaluation.tasks import write_problems

    task = write_problems(tmp_path / "gpqa_like.jsonl", [{"id": "g1", "problem": "2+3?", "answer": "B",
                                                          "choices": ["3", "5", "7", "9"]}])
    end = tok.convert_tokens_to_ids(END)
    _in_process_grading(monkeypatch)
    FakeVllm(s1_script(tok, ids(tok, "\\boxed{A} no") + [end], ids(tok, "ok") + [end], answer="\nAnswer: B"),
             eos=tok.eos_token_id).install(monkeypatch)
    out = tmp_path / "r.json"
    assert main(["eval", str(qwen2_base), "--task", str(task), "--answer-type", "choice", "--out", str(out),
                 "--backend", "vllm", "--protocol", "s1", "--max-new-tokens", "300", "--max-model-len", "512",
                 "--no-progress"]) == 0
    result = json.loads(out.read_text())
    s, problem = result["settings"], result["problems"][0]
    assert (s["protocol"], s["temperature"], s["budget_forcing"], s["protocol_changes"]) == ("s1", 0.0, 2,
                                                                                             ["max_new_tokens"])
    assert problem["prompt"].endswith("2+3?\n\nA) 3\nB) 5\nC) 7\nD) 9<|im_end|>\n<|im_start|>assistant\n"
                                      "<|im_start|>think")
    sample = problem["samples"][0]
    assert sample["response"] == "\\boxed{A} noWaitokWaitok<|im_start|>answer\nAnswer: B"
    assert (sample["extracted"], sample["correct"], sample["waits"]) == ("B", True, 2)


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
