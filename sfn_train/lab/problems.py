"""The lab's reasoning problems: seeded chains of modular arithmetic with verifiable answers.

A problem is a start digit and 1-5 operations (add, subtract, multiply by a digit), all modulo 10:

    problem:   "Start at 7. Apply +5 *3 -4. Work mod 10."
    direct:    "The answer is \\boxed{2}."
    reasoning: "7+5=2. 2*3=6. 6-4=2. The answer is \\boxed{2}."

What base model A is taught (pre-training), so that it has the knowledge and lacks the reasoning:

- the facts, in the very notation the reasoning traces use: "Compute 7+5 mod 10." -> "7+5=2." (all 260 facts);
- single-step problems answered by writing that one step: "Start at 7. Apply +5. Work mod 10." ->
  "7+5=2. The answer is \\boxed{2}." (a one-step problem's reasoning IS one fact);
- multi-step problems answered directly: "Start at 7. Apply +5 *3 -4. Work mod 10." -> "The answer is \\boxed{2}.".

So A writes a step right when a problem has one (`lab_onestep`, whose problems it never saw in that form: it must
use the facts it learned as "Compute ..." rows), and answers chains in one shot, which a small model does poorly
(`lab_reason`). Fine-tuning on reasoning traces must teach the chaining: carry each result into the next step and
read the next operation. Operations are written compactly (`+5 *3 -4`) so that the k-th one sits at a fixed offset: a
model this small learns to copy by position in a few hundred steps, but not to find "the third sentence" (measured:
it did not, in 3 epochs).

Train and test splits never share a problem (deduplicated on the problem text before the split).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

OPS = ("add", "sub", "mul")
SYMBOL = {"add": "+", "sub": "-", "mul": "*"}


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


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def sft_rows(problems: list[Problem], style: str) -> list[dict]:
    """Rows the trainer reads: prompt/completion, the completion in `direct` or `reasoning` style; `pretrain` is how
    base model A learns to answer: one step written out for a one-step problem, a direct answer for a chain."""
    if style not in ("direct", "reasoning", "pretrain"):
        raise ValueError(f"style {style!r}: use direct, reasoning or pretrain")
    return [{"prompt": p.text,
             "completion": p.trace if style == "reasoning" or (style == "pretrain" and len(p.steps) == 1) else p.direct}
            for p in problems]


def all_single_steps() -> list[Problem]:
    """Every one-step problem: 10 starts x (9 additions + 9 subtractions + 8 multiplications) = 260."""
    return [Problem(start, ((op, x),)) for start in range(10) for op in OPS
            for x in (range(2, 10) if op == "mul" else range(1, 10))]


def fact_rows(n: int, seed: int, max_facts: int = 3) -> list[dict]:
    """`n` rows of 1..max_facts independent facts each, drawn evenly from all 260 ("Compute 6*2, 3+4 mod 10." ->
    "6*2=2. 3+4=7."): the notation of the reasoning traces, learned in pre-training, so that fine-tuning teaches
    chaining, not facts. Why several facts a row: the k-th fact then sits at a different place in every row, so the
    model learns to compute a result from the `a*x=` written just before it -- which is where the traces need it --
    instead of from fixed positions of one prompt format (measured: with one fact a row A computed 17% of single-step
    problems right in the problem format although it had seen every fact)."""
    rng = random.Random(seed)
    facts = all_single_steps()
    counts = [rng.randint(1, max_facts) for _ in range(n)]
    pool: list[Problem] = []
    while len(pool) < sum(counts):
        pool += rng.sample(facts, len(facts))  # every fact equally often
    rows, i = [], 0
    for k in counts:
        chosen = pool[i: i + k]
        i += k
        written = [(f"{a}{SYMBOL[op]}{x}", b) for p in chosen for (op, x), (a, b) in [(p.steps[0], p.values())]]
        rows.append({"prompt": f"Compute {', '.join(w for w, _ in written)} mod 10.",
                     "completion": " ".join(f"{w}={b}." for w, b in written)})
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
    """`lab_reason`: 200 held-out multi-step problems; `lab_onestep`: 100 of the 260 one-step problems, held out of
    pre-training in that form (their facts are taught as "Compute ..." rows)."""
    reason = generate(200, REASON_STEPS, seed=TASK_SEED)
    onestep = generate(100, (1,), seed=TASK_SEED + 1)
    return {"lab_reason": task_rows(reason, "reason"), "lab_onestep": task_rows(onestep, "onestep")}
