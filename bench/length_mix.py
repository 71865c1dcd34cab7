"""A seeded training set whose row lengths follow s1K's shape, scaled to the bench's context length.

    .venv/bin/python bench/length_mix.py --out /tmp/mix.jsonl                  # 256 rows for a 1024-token context
    .venv/bin/python bench/length_mix.py --out /tmp/mix.jsonl --context 4096 --rows 1000

Why this shape. s1K (1,000 reasoning traces) is trained with a 32,768-token block; the s1 paper's ablation (Table 8)
reports that a 4,096-token block cuts off 74% of its rows and the 32,768 block none. So a row's length L in units of
the block C satisfies P(L > C/8) = 0.74 and, over 1,000 rows, max L <= C. A log-normal matches both with
sigma = ln 8 / (z(0.999) + z(0.74)) = 0.557 and median = C/8 * exp(z(0.74) * sigma) = 0.179 C: a long right tail (the
99th percentile is 3.6x the median, the longest row ~5.6x), which is what makes a padded batch mostly padding.
s1K-1.1 (the same questions with DeepSeek-R1 traces) is trained with the same block. The bench scales C to its own
context (`--context`), so a 1,024-token bench sees the same shape as a 32k run: median 183 tokens, mean ~215.

What is in a row. A lab problem (modular arithmetic, `sfn_train.lab.problems`) with as many steps as make its chat
sequence L tokens long under the lab's byte-level tokenizer: real, verifiable text, so that the rows also serve as a
training set whose result can be checked (held-out accuracy), not only timed. Lengths are drawn with `--seed`; the
same seed always gives the same file.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

S1K_BLOCK = 32768
S1K_CUT_AT_EIGHTH = 0.74       # share of s1K rows longer than 4,096 tokens (s1 paper, Table 8)
Z_0999 = 3.0902                # standard normal quantiles: no row of 1,000 beyond the block
Z_074 = 0.6433
SIGMA = math.log(8) / (Z_0999 + Z_074)
MEDIAN_FRACTION = math.exp(Z_074 * SIGMA) / 8

# Chat overhead and per-step cost of a lab row under the lab tokenizer (one token per byte, ChatML specials one each):
# "<|im_start|>user\n" + prompt + "<|im_end|>\n<|im_start|>assistant\n" + completion + "<|im_end|>\n".
CHAT_OVERHEAD = 1 + 5 + 1 + 1 + 1 + 10 + 1 + 1
PROMPT_FIXED, PROMPT_PER_STEP = len("Start at 7. Apply . Work mod 10.") - 1, 3     # " +5" per step, minus one space
TRACE_FIXED, TRACE_PER_STEP = len("The answer is \\boxed{7}."), 7                  # "7+5=2. " per step


def draw_lengths(rows: int, context: int, seed: int) -> list[int]:
    """`rows` sequence lengths (tokens) from the scaled s1K log-normal, clipped to [one step, context]."""
    rng = random.Random(seed)
    mu = math.log(MEDIAN_FRACTION * context)
    shortest = CHAT_OVERHEAD + PROMPT_FIXED + TRACE_FIXED + PROMPT_PER_STEP + TRACE_PER_STEP
    return [min(context, max(shortest, round(math.exp(rng.gauss(mu, SIGMA))))) for _ in range(rows)]


def steps_for(length: int) -> int:
    fixed = CHAT_OVERHEAD + PROMPT_FIXED + TRACE_FIXED
    return max(1, round((length - fixed) / (PROMPT_PER_STEP + TRACE_PER_STEP)))


def length_mix_rows(rows: int = 256, context: int = 1024, seed: int = 0) -> list[dict]:
    """Prompt/completion rows (lab problems) whose chat lengths follow `draw_lengths`; distinct problems."""
    from sfn_train.lab.problems import random_problem

    rng = random.Random(seed + 1)
    out, seen = [], set()
    for length in draw_lengths(rows, context, seed):
        while True:
            problem = random_problem(rng, steps_for(length))
            if problem.text not in seen:
                seen.add(problem.text)
                break
        out.append({"prompt": problem.text, "completion": problem.trace})
    return out


def token_lengths(rows: list[dict], tokenizer) -> list[int]:
    """Chat-template token count of every row (what the trainer sees before truncation)."""
    return [len(tokenizer.apply_chat_template(
        [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}],
        tokenize=True, return_dict=False)) for r in rows]


def describe(lengths: list[int], batch: int) -> str:
    """Percentiles, and the share of a randomly composed padded batch that is padding."""
    s = sorted(lengths)
    q = lambda p: s[min(len(s) - 1, int(p * len(s)))]  # noqa: E731
    rng = random.Random(0)
    real = padded = 0
    for _ in range(2000):
        b = rng.sample(lengths, batch)
        real, padded = real + sum(b), padded + batch * max(b)
    return (f"{len(s)} rows: min {s[0]}, p25 {q(0.25)}, median {q(0.5)}, mean {statistics.mean(s):.0f}, p90 {q(0.9)}, "
            f"p99 {q(0.99)}, max {s[-1]} tokens; random batches of {batch}: {1 - real / padded:.0%} padding")


def write_length_mix(path: Path, rows: int = 256, context: int = 1024, seed: int = 0) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in length_mix_rows(rows, context, seed):
            f.write(json.dumps(row) + "\n")
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="the .jsonl file to write")
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--context", type=int, default=1024, help="the bench's max_length; s1K's block maps onto it")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=8, help="batch size for the padding estimate")
    args = parser.parse_args(argv)
    path = write_length_mix(Path(args.out), args.rows, args.context, args.seed)
    from sfn_train.tiny import build_tokenizer

    rows = [json.loads(line) for line in open(path)]
    print(f"{path}: {describe(token_lengths(rows, build_tokenizer()), args.batch)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
