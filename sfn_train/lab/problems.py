"""The lab's reasoning problems: seeded chains of arithmetic steps with verifiable answers.

A problem is a start value and 2-4 operations (add, subtract, multiply by a digit), every intermediate kept in 0-99:

    problem:   "Start at 7. Add 5. Multiply by 3. Subtract 4."
    direct:    "32"
    reasoning: "7+5=12. 12*3=36. 36-4=32. The answer is \\boxed{32}."

One step is easy to learn from direct text; several steps answered in one shot are hard for a small model, and easy
once it writes the intermediate results. That gap is what the lab's fine-tunes must close: base model A is
pre-trained on direct text only, B/C/F1-F3 are fine-tuned on reasoning traces.

Train and test splits never share a problem (deduplicated on the problem text before the split).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

OPS = {"add": "Add {}.", "sub": "Subtract {}.", "mul": "Multiply by {}."}
SYMBOL = {"add": "+", "sub": "-", "mul": "*"}
PROMPT_SUFFIX = ""


@dataclass(frozen=True)
class Problem:
    start: int
    steps: tuple[tuple[str, int], ...]

    @property
    def text(self) -> str:
        return " ".join([f"Start at {self.start}."] + [OPS[op].format(x) for op, x in self.steps])

    def values(self) -> list[int]:
        value, out = self.start, [self.start]
        for op, x in self.steps:
            value = value + x if op == "add" else value - x if op == "sub" else value * x
            out.append(value)
        return out

    @property
    def answer(self) -> str:
        return str(self.values()[-1])

    @property
    def trace(self) -> str:
        values = self.values()
        lines = [f"{a}{SYMBOL[op]}{x}={b}." for (op, x), a, b in zip(self.steps, values, values[1:])]
        return " ".join(lines) + f" The answer is \\boxed{{{self.answer}}}."


def random_problem(rng: random.Random, n_steps: int) -> Problem:
    while True:
        value, steps = rng.randint(1, 30), []
        start = value
        for _ in range(n_steps):
            op = rng.choice(list(OPS))
            x = rng.randint(2, 9) if op == "mul" else rng.randint(1, 30)
            new = value + x if op == "add" else value - x if op == "sub" else value * x
            if not 0 <= new <= 99:
                break
            steps.append((op, x))
            value = new
        if len(steps) == n_steps:
            return Problem(start, tuple(steps))


def generate(n: int, steps: tuple[int, ...], seed: int) -> list[Problem]:
    """`n` distinct problems with step counts drawn from `steps`."""
    rng = random.Random(seed)
    seen: dict[str, Problem] = {}
    attempts = 0
    while len(seen) < n:
        attempts += 1
        if attempts > 50 * n:
            raise ValueError(f"cannot draw {n} distinct problems with steps {steps}")
        problem = random_problem(rng, rng.choice(steps))
        seen.setdefault(problem.text, problem)
    return list(seen.values())


def split(problems: list[Problem], n_test: int, seed: int) -> tuple[list[Problem], list[Problem]]:
    shuffled = problems[:]
    random.Random(seed).shuffle(shuffled)
    return shuffled[n_test:], shuffled[:n_test]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def sft_rows(problems: list[Problem], style: str) -> list[dict]:
    """Rows the trainer reads: prompt/completion, the completion in `direct` or `reasoning` style."""
    return [{"prompt": p.text, "completion": p.answer if style == "direct" else p.trace} for p in problems]


def task_rows(problems: list[Problem], prefix: str) -> list[dict]:
    """Rows the evaluator reads: {id, problem, answer, solution}."""
    return [{"id": f"{prefix}-{i}", "problem": p.text, "answer": p.answer, "solution": p.trace}
            for i, p in enumerate(problems)]
