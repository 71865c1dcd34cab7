"""Response levels I-IV (Shao & Wu 2025): how far a response gets, not only whether it is right.

The paper sorts responses into four levels; here each level is a transparent rule on measurable features, applied in
this order (the first that fires wins):

- IV  correct: the grader accepted the answer. (Correctness wins, so the share of IV always equals accuracy.)
- I   degenerate: any of
      * empty (no non-space character);
      * repetition: the share of repeated word 4-grams (1 - distinct/total over whitespace tokens) exceeds
        REPETITION_THRESHOLD = 0.5 -- for texts of >= 20 words; shorter texts of >= 40 characters use character
        10-grams instead (catches "aaaa..." and short loops without spaces);
      * endless tail loop: the response hit the token limit and its last 200 words repeat 4-grams at a rate of
        >= TAIL_REPETITION_THRESHOLD = 0.8;
      * gibberish: alphanumeric characters are < MIN_ALNUM_SHARE = 0.5 of the non-space characters, or, among the
        >= 5 letter-runs of 2+ letters, < MIN_KNOWN_WORD_SHARE = 0.2 are common English / math words (a built-in
        list of ~250 words). Letter-runs in non-Latin scripts count as known: we cannot judge them.
- II  off task: no answer was extracted and fewer than MIN_PROBLEM_OVERLAP = 0.2 of the problem's key terms appear in
      the response (key terms: numbers, and words of 4+ letters that are not stop words; LaTeX commands removed).
      A problem with no key terms never yields II.
- III on task but wrong: everything else (wrong answer, or reasoning that mentions the problem but never answers).

Limitations: II cannot see a fluent answer to a *different* question that still ends in an answer; very long correct
reasoning that loops near its end but hits the limit is still IV if it boxed the right answer earlier.
The thresholds are recorded in every eval output (`THRESHOLDS`).
"""

from __future__ import annotations

import re

REPETITION_N = 4
REPETITION_MIN_WORDS = 20
REPETITION_CHAR_N = 10
REPETITION_MIN_CHARS = 40
REPETITION_THRESHOLD = 0.5
TAIL_WORDS = 200
TAIL_REPETITION_THRESHOLD = 0.8
MIN_ALNUM_SHARE = 0.5
MIN_KNOWN_WORD_SHARE = 0.2
MIN_WORD_RUNS = 5
MIN_PROBLEM_OVERLAP = 0.2

THRESHOLDS = {
    "repetition_n": REPETITION_N, "repetition_min_words": REPETITION_MIN_WORDS,
    "repetition_char_n": REPETITION_CHAR_N, "repetition_min_chars": REPETITION_MIN_CHARS,
    "repetition_threshold": REPETITION_THRESHOLD, "tail_words": TAIL_WORDS,
    "tail_repetition_threshold": TAIL_REPETITION_THRESHOLD, "min_alnum_share": MIN_ALNUM_SHARE,
    "min_known_word_share": MIN_KNOWN_WORD_SHARE, "min_word_runs": MIN_WORD_RUNS,
    "min_problem_overlap": MIN_PROBLEM_OVERLAP,
}
LEVELS = ("I", "II", "III", "IV")

_COMMON = """
a about above add added adding after again all also although am an and angle another answer any are area as at
b be because been before being below between both but by c calculate can case cases check coefficient compute
consider constant correct could count d defined denominator derivative determine did difference different digit
digits divide divided divisible division do does each either else equal equals equation equations error even every
example expression f factor final find first follows for form formula fraction from function gcd get gives given
go good greater had has have here hmm how however i if in integer integers into is it its itself just know larger
last least left length less let like line list look m make many mathbb maximum may mean means might minimum minus
mod more most multiply must n need negative next no not note now number numbers numerator odd of off on one only
or order other our out over p pair perhaps plus point points positive possible power prime probability problem
product q question r radius rate ratio real remainder result right root roots s same second see set should side
sides simplify since smaller so solution solve solving some square step steps subtract sum t terms than that the
their them then there therefore these they think third this those three thus time times to total triangle true try
two u under units up us use using v value values variable w wait want was way we well were what when where whether
which while why will with without would x y yes yet you z zero sqrt frac cdot times text boxed left right pi sin cos
tan log ln lim int infty
"""
KNOWN_WORDS = frozenset(_COMMON.split())

_STOP = frozenset("""that this with from have what when where which their there these those than then they them
will would could should into about each other such only also some many much more most very your find given let
what how does number""".split())


def repetition_rate(text: str, n: int = REPETITION_N) -> float:
    """1 - distinct/total n-grams of whitespace words, or of characters for short texts without many spaces."""
    words = text.split()
    if len(words) >= REPETITION_MIN_WORDS:
        return _ngram_repeat(words, n)
    if len(text) >= REPETITION_MIN_CHARS:
        return _ngram_repeat(list(text), REPETITION_CHAR_N)
    return 0.0


def _ngram_repeat(seq: list, n: int) -> float:
    grams = [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def alnum_share(text: str) -> float:
    chars = [c for c in text if not c.isspace()]
    return sum(c.isalnum() for c in chars) / len(chars) if chars else 0.0


def known_word_share(text: str) -> tuple[float, int]:
    """(share of 2+-letter runs that are known words or non-Latin script, number of such runs)."""
    runs = [r.lower() for r in re.findall(r"[^\W\d_]{2,}", text)]
    if not runs:
        return 1.0, 0
    known = sum(r in KNOWN_WORDS or not r.isascii() or (r.endswith("s") and r[:-1] in KNOWN_WORDS) for r in runs)
    return known / len(runs), len(runs)


def key_terms(problem: str) -> set[str]:
    text = re.sub(r"\\[A-Za-z]+", " ", problem or "")
    numbers = set(re.findall(r"\d+(?:\.\d+)?", text))
    words = {w.lower() for w in re.findall(r"[A-Za-z]{4,}", text)} - _STOP
    return numbers | words


def problem_overlap(problem: str, response: str) -> float:
    terms = key_terms(problem)
    if not terms:
        return 1.0
    resp = response.lower()
    resp_numbers = set(re.findall(r"\d+(?:\.\d+)?", resp))
    hits = sum((t in resp_numbers) if t[0].isdigit() else (t in resp) for t in terms)
    return hits / len(terms)


def response_features(response: str, problem: str = "", finish_reason: str | None = None) -> dict:
    words = response.split()
    known, runs = known_word_share(response)
    return {
        "chars": len(response),
        "repetition": round(repetition_rate(response), 4),
        "tail_repetition": round(_ngram_repeat(words[-TAIL_WORDS:], REPETITION_N), 4) if len(words) >= 20 else 0.0,
        "alnum_share": round(alnum_share(response), 4),
        "known_word_share": round(known, 4),
        "word_runs": runs,
        "problem_overlap": round(problem_overlap(problem, response), 4),
        "finish_reason": finish_reason,
    }


def classify_level(response: str, *, problem: str = "", correct: bool = False, extracted: str | None = None,
                   finish_reason: str | None = None) -> tuple[str, dict]:
    """(level "I".."IV", the features and the rule that decided it) -- see the module docstring."""
    f = response_features(response or "", problem, finish_reason)
    if correct:
        return "IV", {**f, "rule": "correct"}
    if not (response or "").strip():
        return "I", {**f, "rule": "empty"}
    if f["repetition"] > REPETITION_THRESHOLD:
        return "I", {**f, "rule": "repetition"}
    if finish_reason in ("length", "context") and f["tail_repetition"] >= TAIL_REPETITION_THRESHOLD:
        return "I", {**f, "rule": "tail repetition at the token limit"}
    if f["alnum_share"] < MIN_ALNUM_SHARE:
        return "I", {**f, "rule": "few alphanumeric characters"}
    if f["word_runs"] >= MIN_WORD_RUNS and f["known_word_share"] < MIN_KNOWN_WORD_SHARE:
        return "I", {**f, "rule": "few known words"}
    if extracted is None and f["problem_overlap"] < MIN_PROBLEM_OVERLAP:
        return "II", {**f, "rule": "no answer and little overlap with the problem"}
    return "III", {**f, "rule": "on task, wrong or no answer"}
