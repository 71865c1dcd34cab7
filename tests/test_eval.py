"""Evaluation: grading table, worker timeouts, levels, statistics, and end to end on tiny random models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from helpers import one_line_error
from sfn_train.errors import SfnError
from sfn_train.manifest import manifest_problems
from sfn_train.evaluation import grading
from sfn_train.evaluation.grading import extract_answer, grade_many, grade_response
from sfn_train.evaluation.levels import classify_level
from sfn_train.evaluation.stats import bootstrap_ci, paired_bootstrap

# (response, gold, answer type, expected verdict) in the answer styles of MATH-500, AIME, GSM8K and GPQA.
CASES = [
    # math: boxed fractions and equivalent forms
    (r"So the probability is $\boxed{\frac{1}{2}}$.", r"\frac{1}{2}", "math", True),
    (r"Thus $\boxed{\dfrac{1}{2}}$", r"\frac12", "math", True),
    (r"The answer is $\boxed{0.5}$.", r"\frac{1}{2}", "math", True),
    (r"Final: \boxed{\frac12}", "0.5", "math", True),
    (r"\boxed{\tfrac{3}{4}}", r"\frac{3}{4}", "math", True),
    (r"\boxed{-\frac{3}{4}}", "-0.75", "math", True),
    (r"\boxed{\frac{-3}{4}}", r"-\frac{3}{4}", "math", True),
    (r"$\boxed{\frac{1}{2}}$", "2", "math", False),
    (r"$\boxed{2}$", r"\frac{1}{2}", "math", False),
    (r"\boxed{\frac{2}{1}}", r"\frac{1}{2}", "math", False),
    # integers, negatives, thousands separators (AIME / GSM8K style)
    (r"Therefore the answer is $\boxed{204}$.", "204", "math", True),
    (r"\boxed{033}", "33", "math", True),
    (r"\boxed{-3}", "-3", "math", True),
    (r"\boxed{3}", "-3", "math", False),
    (r"\boxed{-3}", "3", "math", False),
    (r"The total is \boxed{1,000} dollars.", "1000", "math", True),
    (r"\boxed{1{,}000}", "1000", "math", True),
    (r"\boxed{1,000}", "1000.5", "math", False),
    (r"\boxed{1,000,000}", "1000000", "math", True),
    (r"\boxed{\$18}", "18", "math", True),
    ("Janet makes 16 - 3 - 4 = 9 eggs, 9 * 2 = 18.\n#### 18", "18", "math", True),
    ("She sells 1,200 cups.\n#### 1,200", "1200", "math", True),
    ("The answer is 72.", "72", "math", True),
    ("Answer: 5", "5", "math", True),
    ("**Final Answer:** $\\frac{7}{2}$", "3.5", "math", True),
    # the answer phrase ends at the first clause break
    ("The answer is 5, since 2+3=5.", "5", "math", True),
    ("The answer is 5 because 2+3=5", "5", "math", True),
    ("The answer is $(1, 2)$, since both points satisfy it.", "(1,2)", "math", True),
    ("The answer is 7. Since 2+3=5, that settles it.", "5", "math", False),
    # degrees, units, percent, radicals, expressions
    (r"\boxed{30^\circ}", "30", "math", True),
    (r"\boxed{30}", r"30^\circ", "math", True),
    (r"\boxed{30^{\circ}}", "150", "math", False),
    (r"The angle is \boxed{45 \text{ degrees}}", "45", "math", True),
    (r"\boxed{10\text{ cm}}", "10", "math", True),
    (r"\boxed{12 \text{ inches}}", "10", "math", False),
    # units count when gold and prediction both state one; a bare number is judged by its value
    (r"\boxed{10\text{ m}}", r"10\text{ cm}", "math", False),
    (r"\boxed{10\,\text{cm}^2}", r"10\text{ cm}", "math", False),
    (r"\boxed{10\text{ cm}}", r"10\text{ cm}", "math", True),
    (r"\boxed{12 \text{ inches}}", r"12\text{ inch}", "math", True),
    ("The answer is 10 cm.", r"10\text{ cm}", "math", True),
    (r"\boxed{10}", r"10\text{ cm}", "math", True),
    (r"\boxed{3\sqrt{13}}", r"\sqrt{117}", "math", True),
    (r"\boxed{\sqrt{2}}", "1.414", "math", False),
    (r"\boxed{x^2+2x}", "x(x+2)", "math", True),
    (r"\boxed{(-\infty, 3)}", r"(-\infty,3)", "math", True),
    (r"\boxed{[1,2]}", "(1,2)", "math", False),
    (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)", "math", True),
    (r"\boxed{\pi}", "3.14159", "math", False),
    # last box wins, nested braces, fbox
    (r"First guess \boxed{5}, but correcting: \boxed{7}", "7", "math", True),
    (r"First guess \boxed{7}, but correcting: \boxed{5}", "7", "math", False),
    (r"\fbox{42}", "42", "math", True),
    (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt3}{2}", "math", True),
    # no committed answer: intermediate numbers must not count
    ("We compute 6*7 = 42 and then add more terms.", "42", "math", False),
    ("Let x = 12. Then 2x = 24, so we need", "24", "math", False),
    ("", "1", "math", False),
    (r"\boxed{", "1", "math", False),
    # multiple choice (GPQA)
    (r"The correct option is therefore \boxed{C}.", "C", "choice", True),
    (r"\boxed{C}", "B", "choice", False),
    ("After analysis, the answer is (C).", "C", "choice", True),
    ("Reasoning...\n(C) 4.5 eV", "C", "choice", True),
    ("Reasoning...\nC)", "C", "choice", True),
    (r"\boxed{\text{(B)}}", "B", "choice", True),
    ("Answer: D", "A", "choice", False),
    ("A good guess would be the second one.", "A", "choice", False),
    # exact (lab tasks): whitespace-normalised only
    ("Answer: 3 5  7", "3 5 7", "exact", True),
    (r"\boxed{abc}", "abd", "exact", False),
    (r"\boxed{ABC}", "abc", "exact", False),
]


@pytest.mark.parametrize("response,gold,kind,expected", CASES)
def test_grading_table(response, gold, kind, expected):
    out = grade_response(response, gold, kind)
    assert out["correct"] is expected, out


def test_grading_table_through_worker_processes():
    """The same verdicts when graded the production way: worker processes with a timeout."""
    items = [{"response": r, "answer": g, "type": k} for r, g, k, _ in CASES]
    results = grade_many(items, workers=2, timeout_s=60)
    assert [r["correct"] for r in results] == [e for *_, e in CASES]


def test_extraction_details():
    assert extract_answer(r"a \boxed{\frac{a}{\sqrt{b}}} b") == r"\frac{a}{\sqrt{b}}"
    assert extract_answer(r"\boxed{1} then \fbox{2}") == "2"
    assert extract_answer("The answer is $\\frac{1}{2}$.") == r"\frac{1}{2}"
    assert extract_answer("no answer here 42") is None
    assert extract_answer("Analysis done.\n(B) is right", "choice") == "B"
    assert extract_answer("#### 1,234") == "1,234"


SLOW_GRADER = '''
import time
from sfn_train.evaluation.grading import grade_item

def grade(item):
    if item["response"] == "slow":
        time.sleep(120)
    if item["response"] == "boom":
        raise ValueError("cannot parse")
    return grade_item(item)
'''


def test_grading_timeout_and_errors_are_incorrect_not_fatal(tmp_path, monkeypatch):
    (tmp_path / "slow_grader_mod.py").write_text(SLOW_GRADER)
    monkeypatch.syspath_prepend(str(tmp_path))  # workers get the parent's sys.path
    items = [{"response": r"\boxed{2}", "answer": "2"}, {"response": "slow", "answer": "2"},
             {"response": "boom", "answer": "2"}, {"response": r"\boxed{3}", "answer": "3"}]
    results = grade_many(items, workers=1, timeout_s=3, grader="slow_grader_mod:grade")
    assert [r["correct"] for r in results] == [True, False, False, True]
    assert "timed out after 3s" in results[1]["reason"]
    assert results[2]["reason"].startswith("grader error: ValueError")


def test_grade_cli_writes_correct_and_extracted(tmp_path):
    from sfn_train.cli import main

    rows = [{"response": r"so \boxed{\dfrac{1}{2}}", "answer": "0.5", "id": "x"},
            {"response": "The answer is (C).", "answer": "C", "type": "choice"},
            {"response": "Answer: blue", "answer": "red", "type": "exact"},
            {"response": "I think 7", "answer": "7"}]
    src = tmp_path / "responses.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["grade", str(src), "--out", str(tmp_path / "graded.jsonl"), "--workers", "1", "--no-progress"]) == 0
    graded = [json.loads(line) for line in (tmp_path / "graded.jsonl").read_text().splitlines()]
    assert [g["correct"] for g in graded] == [True, True, False, False]
    assert [g["extracted"] for g in graded] == [r"\dfrac{1}{2}", "C", "blue", None]
    assert graded[0]["id"] == "x"


def test_grade_cli_bad_row_is_one_line_error(tmp_path, capsys):
    from sfn_train.cli import main

    src = tmp_path / "r.jsonl"
    src.write_text(json.dumps({"response": "x"}) + "\n")
    assert main(["grade", str(src), "--out", str(tmp_path / "g.jsonl")]) == 2
    assert "r.jsonl:1 needs the fields 'response' and 'answer'" in one_line_error(capsys)


# ---------------------------------------------------------------------------------------------------------------
# Levels

PROBLEM = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
           "How many clips did Natalia sell altogether in April and May?")


def test_level_iv_correct():
    text = "In May she sold 48 / 2 = 24 clips, so 48 + 24 = 72 in total.\nThe answer is \\boxed{72}."
    assert classify_level(text, problem=PROBLEM, correct=True, extracted="72")[0] == "IV"


def test_level_iii_on_task_but_wrong():
    text = "In April Natalia sold 48 clips. In May she sold half as many, 48 / 2 = 24. Altogether 48 + 24 = 70.\n" \
           "The answer is \\boxed{70}."
    level, f = classify_level(text, problem=PROBLEM, correct=False, extracted="70")
    assert level == "III" and f["problem_overlap"] > 0.5


def test_level_ii_fluent_off_task():
    text = ("The weather in Paris is lovely in spring. Many tourists visit the museums and enjoy the cafes along "
            "the river, where the light is soft in the evening.")
    level, f = classify_level(text, problem=PROBLEM, correct=False, extracted=None)
    assert level == "II" and f["problem_overlap"] < 0.2 and f["repetition"] == 0


@pytest.mark.parametrize("text,rule", [
    ("Let me think. " + "I need to check this again. " * 40, "repetition"),
    ("qzx vbnk wrtp lkjh mnbv zxcv poiu yhgt frds wqaz", "few known words"),
    ("#@!~ &^%$ )(*& ][}{ +=-_ ?></ ;;:: '''' ~~~~", "few alphanumeric characters"),
    ("   ", "empty"),
])
def test_level_i_degenerate(text, rule):
    level, f = classify_level(text, problem=PROBLEM, correct=False, extracted=None)
    assert (level, f["rule"]) == ("I", rule)


# ---------------------------------------------------------------------------------------------------------------
# Statistics


def test_bootstrap_ci_contains_mean_and_narrows_with_more_problems():
    values = [1, 0, 1, 1, 0, 1, 0, 1, 1, 1] * 3
    mean, low, high = bootstrap_ci(values, seed=1)
    assert mean == pytest.approx(0.7) and low < mean < high
    _, low_big, high_big = bootstrap_ci(values * 10, seed=1)
    assert high_big - low_big < high - low
    assert bootstrap_ci(values, seed=1) == (mean, low, high)  # seeded


def test_summary_of_known_correctness():
    """pass@1 is the mean over problems of each problem's share of right samples; its CI has a width here."""
    from sfn_train.evaluation.stats import summarize

    correct = [[True, False], [True, True], [False, False], [True, False]]  # per problem: 1/2, 1, 0, 1/2
    summary = summarize(correct, tokens=[4] * 8, seconds=2.0, levels=["I"] * 6 + ["IV"] * 2)
    assert summary["pass_at_1"] == 0.5
    assert summary["ci_low"] < 0.5 < summary["ci_high"]
    assert (summary["n_problems"], summary["n_responses"], summary["mean_tokens"], summary["tokens_per_s"]) == \
        (4, 8, 4.0, 16.0)
    assert summary["level_shares"] == {"I": 0.75, "II": 0.0, "III": 0.0, "IV": 0.25}


def test_paired_bootstrap_small_p_for_different_large_for_identical():
    import numpy as np

    rng = np.random.default_rng(0)
    base = (rng.random(100) < 0.4).astype(float)
    better = np.maximum(base, (rng.random(100) < 0.5).astype(float))  # solves everything base solves, and more
    test = paired_bootstrap(better, base)
    assert test["delta"] > 0.2 and test["p_value"] < 0.01
    same = paired_bootstrap(base, base)
    assert same["delta"] == 0 and same["p_value"] == 1.0
    noisy = paired_bootstrap(rng.permutation(base), base)  # same accuracy, shuffled per problem
    assert noisy["p_value"] > 0.3


def test_zero_and_full_scores_get_a_wilson_interval_with_width():
    from sfn_train.evaluation.stats import summarize

    z2 = 1.959963984540054 ** 2
    none = summarize([[False, False]] * 20, [5] * 40, 1.0, ["III"] * 40)
    assert none["ci_method"] == "wilson" and none["ci_low"] == 0.0
    assert none["ci_high"] == pytest.approx(z2 / (20 + z2))  # Wilson's upper bound for 0/20: 0.161
    full = summarize([[True]] * 20, [5] * 20, 1.0, ["IV"] * 20)
    assert full["ci_method"] == "wilson" and full["ci_high"] == 1.0
    assert full["ci_low"] == pytest.approx(20 / (20 + z2))
    mixed = summarize([[True], [False]] * 10, [5] * 20, 1.0, ["IV"] * 20)
    assert mixed["ci_method"] == "bootstrap" and mixed["ci_low"] < 0.5 < mixed["ci_high"]


def _result_file(path, label, correct, task="t"):
    """A minimal `sfn eval` result for `compare`: one sample per problem with the given correctness."""
    from sfn_train.evaluation.run import FORMAT
    from sfn_train.evaluation.stats import summarize

    problems = [{"id": str(i), "samples": [{"correct": c}]} for i, c in enumerate(correct)]
    result = {"format": FORMAT, "model": {"label": label, "tokenizer_signature": {}}, "task": {"name": task},
              "settings": {}, "problems": problems,
              "summary": summarize([[c] for c in correct], [1] * len(correct), 1.0, ["IV"] * len(correct))}
    path.write_text(json.dumps(result))
    return path


def test_compare_prints_p_below_resolution_as_a_bound_and_states_wilson(tmp_path):
    from sfn_train.evaluation import compare

    files = [_result_file(tmp_path / "a.json", "base", [False] * 40), _result_file(tmp_path / "b.json", "tuned", [True] * 40)]
    result = compare(files, "base", tmp_path / "compare.md")
    tuned = next(r for r in result["rows"] if r["model"] == "tuned")
    assert tuned["p_value"] == pytest.approx(1 / 2001)  # no resample is as extreme as the observed difference
    text = result["report"].read_text()
    assert "p<0.001" in text and "p=0.000" not in text
    assert "| base | t | 0.0 ± 4.4 [0.0, 8.8] W |" in text  # Wilson 0/40: [0, 0.088]
    assert "Wilson score interval" in text


def test_no_p_value_is_printed_with_a_fixed_format():
    """Every report prints p through `format_p`; a `p={...:.3f}` anywhere would print p=0.000 again."""
    import re

    from helpers import REPO

    offenders = [f"{path.relative_to(REPO)}: {m.group(0)}" for path in (REPO / "sfn_train").rglob("*.py")
                 for m in re.finditer(r"p=\{[^}]*p_value[^}]*\}", path.read_text())]
    assert not offenders, offenders


# ---------------------------------------------------------------------------------------------------------------
# Budget forcing, without a model


class _StopAtOnceModel:
    """A stand-in model whose every generation is the EOS token at once: budget forcing must re-open it N times."""

    def __init__(self, eos):
        import torch

        self.eos = eos
        self.calls = 0
        self.weight = torch.zeros(1)

    def parameters(self):
        yield self.weight

    def generate(self, input_ids, attention_mask, generation_config):
        import torch

        self.calls += 1
        eos = torch.full((input_ids.shape[0], 1), self.eos, dtype=torch.long)
        return torch.cat([input_ids, eos], dim=1)


def test_budget_forcing_appends_wait_n_times():
    from sfn_train.evaluation.forcing import make_rows
    from sfn_train.evaluation.hf_backend import generate_hf
    from sfn_train.evaluation.settings import GenerationSettings
    from sfn_train.tiny import build_tokenizer

    tok = build_tokenizer()
    tok.padding_side = "left"
    wait = tok("Wait", add_special_tokens=False)["input_ids"]
    rows = make_rows([tok("1+1=")["input_ids"], tok("2+2=?")["input_ids"]], samples=1)
    model = _StopAtOnceModel(tok.eos_token_id)
    settings = GenerationSettings(budget_forcing=3, max_new_tokens=100, temperature=0)
    generate_hf(model, tok, rows, settings, [tok.eos_token_id], progress=False)
    assert model.calls == 4  # first try + 3 forced continuations (both rows in one batch)
    for row in rows:
        assert row.waits == 3 and row.finish_reason == "stop" and row.gen_ids == wait * 3
        assert tok.decode(row.gen_ids) == "WaitWaitWait"
    # the budget caps forced tokens too: room for one "Wait" only
    rows = make_rows([tok("1+1=")["input_ids"]], samples=1)
    generate_hf(_StopAtOnceModel(tok.eos_token_id), tok, rows, GenerationSettings(budget_forcing=3, max_new_tokens=6,
                temperature=0), [tok.eos_token_id], progress=False)
    assert rows[0].waits == 1 and rows[0].finish_reason == "stop"


# ---------------------------------------------------------------------------------------------------------------
# End to end on tiny random models

PROBLEMS = [
    {"id": "p1", "problem": "What is 2+3?", "answer": "5"},
    {"id": "p2", "problem": "What is 10-4?", "answer": "6"},
    {"id": "p3", "problem": "What is 3*3?", "answer": "9", "solution": "3*3=9"},
]


@pytest.fixture(scope="module")
def task_file(tmp_path_factory) -> Path:
    from sfn_train.evaluation.tasks import write_problems

    return write_problems(tmp_path_factory.mktemp("task") / "arith.jsonl", PROBLEMS)


@pytest.fixture(scope="module")
def second_model(tmp_path_factory) -> Path:
    from sfn_train.tiny import save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt2") / "other", "qwen2", seed=5)


@pytest.fixture(scope="module")
def two_results(qwen2_base, second_model, task_file, tmp_path_factory):
    from sfn_train.evaluation import evaluate

    out = tmp_path_factory.mktemp("evals")
    files = evaluate([qwen2_base, second_model], [str(task_file)], out, labels=["base", "other"], samples=2,
                     max_new_tokens=8, batch_size=4, grading_workers=1, progress=False)
    return files


def test_evaluate_writes_every_field(two_results, task_file):
    assert [f.name for f in two_results] == ["base__arith.json", "other__arith.json"]
    r = json.loads(two_results[0].read_text())
    assert r["format"] == "sfn-eval/1"
    assert manifest_problems(r) == [] and r["kind"] == "eval"
    assert not list(two_results[0].parent.glob(".tmp-*"))
    assert r["model"]["label"] == "base" and r["model"]["plugin"] is None
    sig = r["model"]["tokenizer_signature"]
    assert set(sig) >= {"vocab_size", "vocab_sha256", "chat_template_sha256", "eos_token_ids", "signature"}
    math_template = "{problem}\nPlease reason step by step, and put your final answer within \\boxed{}."
    import hashlib

    problems = [json.loads(line) for line in task_file.read_text().splitlines()]
    sha = hashlib.sha256(json.dumps(problems, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
    assert r["task"] == {"name": "arith", "answer_type": "math", "template": math_template,
                         "source": str(task_file), "revision": None, "resolved_revision": None, "n_problems": 3,
                         "problems_sha256": sha}
    s = r["settings"]
    assert (s["protocol"], s["protocol_changes"], s["prompts"]) == ("sampled", ["max_new_tokens", "samples"],
                                                                    "instruct")
    assert (s["backend"], s["temperature"], s["top_p"], s["max_new_tokens"], s["samples"], s["seed"]) == \
           ("hf", 0.6, 0.95, 8, 2, 0)
    assert s["chat_template"] is True and s["budget_forcing"] == 0 and s["repetition_penalty"] == 1.0
    assert r["level_thresholds"]["repetition_threshold"] == 0.5
    assert r["versions"]["torch"] and r["versions"]["transformers"]
    assert [p["id"] for p in r["problems"]] == ["p1", "p2", "p3"]
    p1 = r["problems"][0]
    assert p1["prompt"].startswith("<|im_start|>user\nWhat is 2+3?\nPlease reason step by step")
    assert p1["prompt"].endswith("<|im_start|>assistant\n")
    assert len(p1["samples"]) == 2
    for sample in p1["samples"]:
        assert set(sample) >= {"response", "extracted", "correct", "reason", "level", "tokens", "finish_reason", "waits"}
        assert 0 < sample["tokens"] <= 8 and sample["level"] in ("I", "II", "III", "IV")
    summary = r["summary"]
    assert summary["n_problems"] == 3 and summary["n_responses"] == 6
    # pass@1 recounted from the graded samples (the CI itself: the bootstrap tests above)
    per_problem = [sum(s["correct"] for s in p["samples"]) / len(p["samples"]) for p in r["problems"]]
    assert summary["pass_at_1"] == pytest.approx(sum(per_problem) / 3)
    assert math.isclose(sum(summary["level_shares"].values()), 1.0)
    assert summary["tokens_per_s"] > 0 and 0 < summary["mean_tokens"] <= 8


def test_compare_writes_report_and_plots(two_results, tmp_path):
    from sfn_train.evaluation import compare

    result = compare(two_results, "base", tmp_path / "reports" / "compare.md")
    text = result["report"].read_text()
    assert "| base | arith |" in text and "| other | arith |" in text
    assert "Δ vs baseline" in text and "## Verdicts" in text
    other = next(r for r in result["rows"] if r["model"] == "other")
    accuracy = [sum(s["correct"] for p in json.loads(f.read_text())["problems"] for s in p["samples"]) / 6
                for f in two_results]  # both models answered the same 3 problems twice
    assert other["delta"] == pytest.approx(accuracy[1] - accuracy[0]) and other["p_value"] is not None
    for png in result["plots"]:
        assert png.parent == result["report"].parent and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SfnError, match="baseline 'full' matches no model label"):
        compare(two_results, "full", tmp_path / "x.md")


def _with_correctness(result_file: Path, correct: list[bool], out: Path) -> Path:
    """A copy of an eval result whose problems were all answered right (or all wrong), per `correct`."""
    r = json.loads(result_file.read_text())
    for problem, right in zip(r["problems"], correct):
        for sample in problem["samples"]:
            sample["correct"] = right
    accuracy = sum(correct) / len(correct)
    r["summary"].update(pass_at_1=accuracy, ci_low=accuracy, ci_high=accuracy)  # the table's numbers; not tested here
    out.write_text(json.dumps(r))
    return out


@pytest.mark.parametrize("base_correct, other_correct, verdict, delta", [
    ([False] * 3, [True] * 3, "better", 1.0),
    ([True] * 3, [False] * 3, "worse", -1.0),
    ([True, False, True], [True, False, True], "no significant difference", 0.0),
])
def test_compare_verdicts_on_known_outcomes(two_results, tmp_path, base_correct, other_correct, verdict, delta):
    """Three problems, every sample right or wrong: the paired bootstrap of a constant difference of 1 never
    resamples a difference at 0, so p = 1/2001 < 0.05; equal results have p = 1."""
    from sfn_train.evaluation import compare

    files = [_with_correctness(two_results[0], base_correct, tmp_path / "base__arith.json"),
             _with_correctness(two_results[1], other_correct, tmp_path / "other__arith.json")]
    result = compare(files, "base", tmp_path / "compare.md")
    other = next(r for r in result["rows"] if r["model"] == "other")
    assert (other["verdict"], other["delta"]) == (verdict, delta)
    assert (other["p_value"] < 0.01) if delta else (other["p_value"] == 1.0)
    line = f"**other** on arith: {verdict} than base" if delta else "**other** on arith: no significant difference"
    assert line in result["report"].read_text()


def test_base_plus_plugin(qwen2_base, task_file, tmp_path):
    import torch

    from sfn_train.checkpoint import Checkpoint, fingerprint
    from sfn_train.cli import main
    from sfn_train.evaluation.hf_backend import load_hf_model
    from sfn_train.evaluation.settings import GenerationSettings, ModelSpec
    from sfn_train.plugin import write_plugin

    name = "model.layers.1.self_attn.o_proj.weight"
    modified = Checkpoint(qwen2_base).tensor(name).clone() + 0.5
    plugin = write_plugin(tmp_path / "oproj.safetensors", {name: modified}, base_fingerprint=fingerprint(qwen2_base),
                          modules=["o_proj"], layers=[1], source="test")
    model, _ = load_hf_model(ModelSpec(str(qwen2_base), plugin=str(plugin)), GenerationSettings(device="cpu"))
    assert torch.equal(model.state_dict()[name], modified)
    other = "model.layers.0.self_attn.o_proj.weight"
    assert torch.equal(model.state_dict()[other], Checkpoint(qwen2_base).tensor(other))

    out = tmp_path / "plug.json"
    assert main(["eval", str(qwen2_base), "--plugin", str(plugin), "--task", str(task_file), "--out", str(out),
                 "--max_new_tokens", "4", "--temperature", "0", "--grading-workers", "1", "--no-progress"]) == 0
    r = json.loads(out.read_text())
    assert r["command"].startswith("sfn eval ") and "--plugin" in r["command"]
    assert r["model"]["label"] == "qwen2+oproj" and r["model"]["plugin"] == str(plugin)
    assert r["model"]["plugin_metadata"]["tensor_names"] == [name]
    assert r["model"]["plugin_check"]["forced"] is False and r["model"]["plugin_check"]["tensors"] == [name]
    assert r["settings"]["greedy"] is True


def test_plugin_with_unknown_tensor_is_refused(qwen2_base, tmp_path):
    import torch

    from sfn_train.evaluation.hf_backend import load_hf_model
    from sfn_train.evaluation.settings import GenerationSettings, ModelSpec
    from sfn_train.plugin import write_plugin

    plugin = write_plugin(tmp_path / "bad.safetensors", {"model.layers.9.self_attn.o_proj.weight": torch.zeros(2, 2)},
                          base_fingerprint="x", modules=["o_proj"], layers=[9])
    with pytest.raises(SfnError, match="lacks"):
        load_hf_model(ModelSpec(str(qwen2_base), plugin=str(plugin)), GenerationSettings(device="cpu"))


def test_eval_refuses_a_plugin_made_for_another_base_unless_forced(qwen2_base, second_model, task_file, tmp_path,
                                                                   capsys):
    """Same names and shapes, another checkpoint: only the base fingerprint tells them apart, as in `sfn plugin apply`."""
    from sfn_train.checkpoint import fingerprint
    from sfn_train.cli import main
    from sfn_train.gadgets import plugin_extract

    plugin = tmp_path / "oproj.safetensors"
    plugin_extract(second_model, qwen2_base, plugin)  # made against qwen2_base
    out = tmp_path / "evals" / "r.json"
    argv = ["eval", str(second_model), "--plugin", str(plugin), "--task", str(task_file), "--out", str(out),
            "--max_new_tokens", "4", "--temperature", "0", "--grading-workers", "1", "--no-progress"]
    assert main(argv) == 2
    line = one_line_error(capsys)
    assert "fingerprint" in line and "--force" in line
    assert not (tmp_path / "evals").exists()

    assert main([*argv, "--force"]) == 0
    assert "warning: BASE fingerprint differs" in capsys.readouterr().err
    check = json.loads(out.read_text())["model"]["plugin_check"]
    assert check["force"] is True and check["forced"] is True
    assert check["base_fingerprint"] == fingerprint(qwen2_base)
    assert check["applied_to_fingerprint"] == fingerprint(second_model)

    # the same command again does not replace the result (issue 23: a 10-problem result was replaced by a 2-problem
    # one); --overwrite does
    written = out.read_text()
    assert main([*argv, "--force"]) == 2
    assert f"{out} already holds a result: choose another --out or pass --overwrite" in one_line_error(capsys)
    assert out.read_text() == written
    assert main([*argv, "--force", "--overwrite", "--label", "again"]) == 0
    assert json.loads(out.read_text())["model"]["label"] == "again"


def test_missing_task_file_is_one_line_error(qwen2_base, tmp_path, capsys):
    from sfn_train.cli import main

    rc = main(["eval", str(qwen2_base), "--task", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o.json")])
    assert rc == 2
    assert "nope.jsonl does not exist" in one_line_error(capsys)
    rc = main(["eval", str(qwen2_base), "--task", "math500", "--out", str(tmp_path / "o.json")])  # hub is offline
    assert rc == 2
    assert "--task-file math500=PATH.jsonl" in one_line_error(capsys)


def test_tokenizer_mismatch_is_refused(qwen2_base, task_file, tmp_path):
    import shutil

    from sfn_train.evaluation import evaluate

    changed = tmp_path / "changed"
    shutil.copytree(qwen2_base, changed)
    cfg = json.loads((changed / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{{ messages[0]['content'] }}"
    (changed / "tokenizer_config.json").write_text(json.dumps(cfg))
    (changed / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(SfnError, match="differ in chat template"):
        evaluate([qwen2_base, changed], [str(task_file)], tmp_path / "out", progress=False)


def test_registered_task_and_builtin_file(tmp_path, monkeypatch):
    from sfn_train.evaluation.tasks import gpqa_choices, gsm8k_answer, load_task, register_task, write_problems

    path = write_problems(tmp_path / "lab.jsonl", [{"id": "1", "problem": "Sort 3 1 2", "answer": "1 2 3"}])
    register_task("lab_sort_test", path, "exact", "Task: {problem}\nAnswer:")
    task = load_task("lab_sort_test")
    assert task.answer_type == "exact" and task.prompt(task.problems[0]) == "Task: Sort 3 1 2\nAnswer:"
    monkeypatch.setenv("SFN_TASK_GSM8K", str(path))
    assert load_task("gsm8k").source == str(path)
    assert gsm8k_answer("She has 3 + 4 = <<3+4=7>>7 ...\n#### 1,007") == "1007"
    row = {"Correct Answer": "right", "Incorrect Answer 1": "w1", "Incorrect Answer 2": "w2", "Incorrect Answer 3": "w3"}
    letters = set()
    for i in range(12):
        choices, letter = gpqa_choices(row, i)
        assert choices["ABCD".index(letter)] == "right" and sorted(choices) == ["right", "w1", "w2", "w3"]
        letters.add(letter)
        assert gpqa_choices(row, i) == (choices, letter)  # seeded
    assert len(letters) > 1  # the correct answer is not always A


def test_checkpoint_generation_defaults_do_not_leak(qwen2_base, tmp_path):
    """A generation_config.json with top_k=1 / repetition_penalty=3 must not change sampling; its EOS ids count."""
    import shutil

    from sfn_train.evaluation.hf_backend import load_hf_model
    from sfn_train.evaluation.settings import GenerationSettings, ModelSpec
    from sfn_train.evaluation.tokens import eos_token_ids

    ckpt = tmp_path / "with_defaults"
    shutil.copytree(qwen2_base, ckpt)
    (ckpt / "generation_config.json").write_text(json.dumps({"top_k": 1, "repetition_penalty": 3.0,
                                                             "eos_token_id": [0, 2], "do_sample": True}))
    model, tok = load_hf_model(ModelSpec(str(ckpt)), GenerationSettings(device="cpu"))
    assert model.generation_config.top_k is None and model.generation_config.repetition_penalty is None
    assert eos_token_ids(str(ckpt), tok) == sorted({0, 2, tok.eos_token_id})


def test_compare_plot_rows_are_grouped_and_sorted(two_results, tmp_path):
    """One labelled row per model: groups in the order given, each sorted by pass@1, best first."""
    from sfn_train.evaluation.plots import ordered_rows

    rows = [{"model": m, "task": "t", "pass_at_1": v} for m, v in
            [("A", 0.2), ("full", 0.6), ("oproj", 0.4), ("m1", 0.1), ("m2", 0.3), ("zero_q", 0.0)]]
    groups = {"A": "fine-tunes", "full": "fine-tunes", "oproj": "fine-tunes", "m1": "merges", "m2": "merges",
              "zero_q": "destruction"}
    assert [(g, [r["model"] for r in rs]) for g, rs in ordered_rows(rows, "t", groups)] == [
        ("fine-tunes", ["full", "oproj", "A"]), ("merges", ["m2", "m1"]), ("destruction", ["zero_q"])]
    from sfn_train.evaluation import compare

    result = compare(two_results, "base", tmp_path / "c.md", groups={"base": "g1", "other": "g2"})
    assert all(p.stat().st_size > 0 for p in result["plots"])


def _fake_hub(monkeypatch, tmp_path, rows: list[dict], calls: list, error: Exception | None = None):
    """`datasets.load_dataset` for hub ids served from a local JSONL file (no hub here), recording each call."""
    import datasets

    real = datasets.load_dataset
    data = tmp_path / "hub_copy.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def load_dataset(path, *args, **kwargs):
        if path in ("json", "parquet"):
            return real(path, *args, **kwargs)
        calls.append((path, args, kwargs))
        if error is not None:
            raise error
        return real("json", data_files=str(data), split="train")

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)


def test_builtin_task_loads_the_revision_asked_for_and_records_it(tmp_path, monkeypatch, capsys):
    """s1's AIME copy at a pinned revision: the revision reaches `load_dataset`, the result records it with a hash
    of the problems; a copy whose commit cannot be told records null and says so in one line; a copy without the
    benchmark's 30 problems is refused."""
    from sfn_train.evaluation.tasks import load_task

    rows = [{"problem": f"p{i}", "answer": i, "solution": "s", "url": "u"} for i in range(30)]
    calls: list = []
    _fake_hub(monkeypatch, tmp_path, rows, calls)  # a local JSON copy: its cache folder names no commit
    task = load_task("aime24_nofigures", revisions={"aime24_nofigures": "0123abc"}, bare=True)
    assert calls == [("simplescaling/aime24_nofigures", (), {"split": "train", "revision": "0123abc"})]
    described = task.describe()
    assert (described["revision"], described["resolved_revision"], described["n_problems"], described["source"]) == (
        "0123abc", None, 30, "hub:simplescaling/aime24_nofigures")
    assert len(described["problems_sha256"]) == 64 and task.prompt(task.problems[3]) == "p3"
    assert capsys.readouterr().err.splitlines()[-1] == (
        "warning: task 'aime24_nofigures': the hub commit of simplescaling/aime24_nofigures at 0123abc could not be "
        "told (datasets kept no cached copy naming it), so its result records resolved_revision null; pin a commit "
        "with --task-revision aime24_nofigures=SHA.")
    _fake_hub(monkeypatch, tmp_path, rows[:29], calls)
    with pytest.raises(SfnError, match="gave 29 problems, not the benchmark's 30; pass --task-revision"):
        load_task("aime24_nofigures")


def _cached_hub_copy(monkeypatch, tmp_path, repo: str, rows: list[dict], commit: str) -> None:
    """Serve `repo` through the real `datasets.load_dataset` from a cache laid out as datasets lays out a hub copy it
    resolved to `commit` (`<cache>/<ns>___<name>/<config>/<version>/<commit>/`), read back as datasets does when it
    cannot reach the hub: the newest cached copy, whatever the revision asked for."""
    import shutil

    import datasets

    real = datasets.load_dataset
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    built = real("json", data_files=str(data), split="train", cache_dir=str(tmp_path / "build"))
    namespace, name = repo.split("/")
    copy = tmp_path / "hf" / f"{namespace}___{name.lower()}" / "default" / "0.0.0" / commit
    shutil.copytree(Path(built.cache_files[0]["filename"]).parent, copy)
    (copy / "json-train.arrow").rename(copy / f"{name.lower()}-train.arrow")

    def load_dataset(path, *args, **kwargs):
        return real(path, *args, cache_dir=str(tmp_path / "hf"), **kwargs)

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):  # sfn refuses these; datasets alone is kept off the hub
        monkeypatch.setenv(var, "0")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)


def test_builtin_task_records_the_commit_it_was_loaded_at(qwen2_base, tmp_path, monkeypatch, capsys):
    """An unpinned built-in: the result names the hub commit its problems came from, and one line says how to pin
    it; the pinned commit is confirmed, and a copy at another commit than the one pinned is refused."""
    import datasets

    from sfn_train.cli import main
    from sfn_train.evaluation.tasks import load_task, loaded_commit

    sha, other = "0f" * 20, "c" * 40
    rows = [{"problem": f"What is {i}+1?", "answer": i + 1} for i in range(30)]
    _cached_hub_copy(monkeypatch, tmp_path, "simplescaling/aime24_nofigures", rows, sha)
    assert main(["eval", str(qwen2_base), "--task", "aime24_nofigures", "--out", str(tmp_path / "r.json"),
                 "--limit", "1", "--max_new_tokens", "1", "--temperature", "0", "--grading-workers", "1"]) == 0
    task = json.loads((tmp_path / "r.json").read_text())["task"]
    assert (task["revision"], task["resolved_revision"], task["n_problems"]) == (None, sha, 1)
    assert (f"note: task 'aime24_nofigures': loaded simplescaling/aime24_nofigures at commit {sha} (asked for the "
            f"default branch); to load this copy again pass --task-revision aime24_nofigures={sha}.\n"
            ) in capsys.readouterr().err
    assert load_task("aime24_nofigures", revisions={"aime24_nofigures": sha}).resolved_revision == sha
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"note: task 'aime24_nofigures': loaded simplescaling/aime24_nofigures at the pinned commit {sha}.")
    with pytest.raises(SfnError, match=f"asked for commit {other} of simplescaling/aime24_nofigures, but datasets "
                                       f"loaded commit {sha}"):
        load_task("aime24_nofigures", revisions={"aime24_nofigures": other})
    in_memory = datasets.Dataset.from_list(rows)  # keeps no cache file: only a full commit asked for is known
    assert (loaded_commit(in_memory), loaded_commit(in_memory, "main"), loaded_commit(in_memory, other)) == (
        None, None, other)


def test_gated_gpqa_says_how_to_get_access(tmp_path, monkeypatch, capsys):
    from sfn_train.cli import main

    gated = type("DatasetNotFoundError", (Exception,), {})(
        "Dataset 'Idavidrein/gpqa' is a gated dataset on the Hub. You must be authenticated to access it.")
    _fake_hub(monkeypatch, tmp_path, [], [], error=gated)
    assert main(["eval", str(tmp_path / "no-model"), "--task", "gpqa_diamond", "--out", str(tmp_path / "o")]) == 2
    assert one_line_error(capsys) == (
        "sfn eval: error: task 'gpqa_diamond': Idavidrein/gpqa is gated: accept its terms at https://huggingface.co/datasets/"
        "Idavidrein/gpqa, then log in (huggingface-cli login, or set HF_TOKEN); or pass --task-file "
        "gpqa_diamond=PATH.jsonl.")


def test_progress_bars_name_the_model_and_task(qwen2_base, task_file, tmp_path, capsys):
    from sfn_train.cli import main

    assert main(["eval", str(qwen2_base), "--task", str(task_file), "--out", str(tmp_path / "r.json"), "--limit", "2",
                 "--max_new_tokens", "2", "--temperature", "0", "--grading-workers", "1"]) == 0
    err = capsys.readouterr().err
    name = json.loads((tmp_path / "r.json").read_text())["task"]["name"]
    assert f"generating qwen2 on {name}" in err and f"grading qwen2 on {name}" in err
