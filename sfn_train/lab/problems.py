"""The lab's reasoning problems: seeded chains of modular arithmetic with verifiable answers.

A problem is a start digit and 1-5 operations (add, subtract, multiply by a digit), all modulo 10:

    problem:   "Start at 7. Apply +5 *3 -4. Work mod 10."
    direct:    "The answer is \\boxed{2}."
    reasoning: "7+5=2. 2*3=6. 6-4=2. The answer is \\boxed{2}."

One step is a table of 270 facts, easy to learn; several steps answered in one shot ask a small model to compose them
in a single forward pass, which it does poorly; written out step by step, each token needs one fact. Operations are
written compactly (`+5 *3 -4`) so that the k-th one sits at a fixed offset: a model this small learns to copy by
position in a few hundred steps, but not to find "the third sentence" (measured: it did not, in 3 epochs). That gap is what the lab's fine-tunes must close: base model A is
pre-trained on direct text only, B/C/F1-F3 are fine-tuned on reasoning traces.

Train and test splits never share a problem (deduplicated on the problem text before the split).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

OPS = ("add", "sub", "mul")
SYMBOL = {"add": "+", "sub": "-", "mul": "*"}
PROMPT_SUFFIX = ""


@dataclass(frozen=True)
class Problem:
    start: int
    steps: tuple[tuple[str, int], ...]

    @property
    def text(self) -> str:
        ops = " ".join(f"{SYMBOL[op]}{x}" for op, x in self.steps)
        return f"Start at {self.start}. Apply {ops}. Work mod 10."

    def values(self) -> list[int]:
        value, out = self.start, [self.start]
        for op, x in self.steps:
            value = apply(op, value, x)
            out.append(value)
        return out

    @property
    def answer(self) -> str:
        return str(self.values()[-1])

    @property
    def trace(self) -> str:
        values = self.values()
        lines = [f"{a}{SYMBOL[op]}{x}={b}." for (op, x), a, b in zip(self.steps, values, values[1:])]
        return " ".join(lines) + " " + self.direct

    @property
    def direct(self) -> str:
        return f"The answer is \\boxed{{{self.answer}}}."


def apply(op: str, value: int, x: int) -> int:
    return (value + x if op == "add" else value - x if op == "sub" else value * x) % 10


def random_problem(rng: random.Random, n_steps: int) -> Problem:
    steps = []
    for _ in range(n_steps):
        op = rng.choice(OPS)
        steps.append((op, rng.randint(2, 9) if op == "mul" else rng.randint(1, 9)))
    return Problem(rng.randint(0, 9), tuple(steps))


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
    return [{"prompt": p.text, "completion": p.direct if style == "direct" else p.trace} for p in problems]


def fact_rows(n: int, seed: int) -> list[dict]:
    """Single operations written out ("Compute 7*6." -> "7*6=42."): the notation the base model learns in
    pre-training, so that fine-tuning teaches chaining steps, not a new notation."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        p = random_problem(rng, 1)
        (op, x), (a, b) = p.steps[0], p.values()
        rows.append({"prompt": f"Compute {a}{SYMBOL[op]}{x} mod 10.", "completion": f"{a}{SYMBOL[op]}{x}={b}."})
    return rows


def task_rows(problems: list[Problem], prefix: str) -> list[dict]:
    """Rows the evaluator reads: {id, problem, answer, solution}."""
    return [{"id": f"{prefix}-{i}", "problem": p.text, "answer": p.answer, "solution": p.trace}
            for i, p in enumerate(problems)]


# The built-in evaluation tasks. Fixed (not tied to the lab's --seed) so that numbers from different lab runs are
# comparable; every lab run removes these problems from its training data.
TASK_SEED = 20250527
REASON_STEPS = (2, 3, 4)


def shipped_tasks() -> dict[str, list[dict]]:
    """`lab_reason`: 200 held-out multi-step problems; `lab_onestep`: 100 single steps (what pre-training teaches)."""
    reason = generate(200, REASON_STEPS, seed=TASK_SEED)
    onestep = generate(100, (1,), seed=TASK_SEED + 1)
    return {"lab_reason": task_rows(reason, "reason"), "lab_onestep": task_rows(onestep, "onestep")}
