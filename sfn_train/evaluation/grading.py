"""Answer extraction and grading: math equivalence (math-verify), multiple choice, exact match.

Extraction (`extract_answer`) takes, in order:

1. the content of the LAST `\\boxed{...}` or `\\fbox{...}` (balanced braces; `\\boxed 5` without braces too);
2. else the last final-answer line: "final answer is X", "the answer is X", "Answer: X", "#### X", where X is the
   answer phrase only: it ends at the first clause break outside brackets and `$...$` ("; ", ", since", ", because",
   ", so", ", which", " because ", ". " before a capital letter), so "The answer is 5, since 2+3=5." gives "5";
3. for choice tasks only, else a last line that starts with a letter: "(C)", "C)", "C." or just "C".

There is deliberately no fallback to "the last number in the text": a response that never commits to an answer is
not correct because an intermediate number happens to equal the gold.

Math equivalence uses math-verify: `verify(parse(gold), parse(pred))` -- not symmetric, gold first. Before parsing,
both sides get light normalisation that math-verify does not do by itself on bare strings: `$...$` delimiters are
added, thousands separators in plain numbers are removed ("1,000" -> "1000", "1{,}000" -> "1000"), `\\dfrac`/`\\tfrac`
become `\\frac`, and degree signs / `^\\circ` are dropped.

Units: a trailing unit (`10\\text{ cm}`, `10 \\mbox{m}^2`, or a word after a plain number, "10 cm") is split off both
sides before math-verify sees them. When the gold and the prediction both state a unit, the units must agree
("10 m" against gold "10 cm" is wrong; plural and case of unit words are ignored: "inches" = "inch"). A prediction
without a unit is compared by its number alone (the question usually names the unit), and a unit on the prediction
is ignored when the gold has none. Degrees are not treated as a unit.

Grading runs in worker processes (`grade_many`): math-verify's own timeouts use `signal.alarm`, which only works on a
process's main thread, and a pathological expression can hang sympy for minutes. Each worker is a subprocess with
its own main thread; the parent gives it one item at a time and kills it when the item exceeds its time limit.
A timeout, a crash or an exception makes that item incorrect with a `reason`; the run goes on.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

from ..errors import SfnError
from ..jsonl import iter_jsonl

DEFAULT_GRADER = "sfn_train.evaluation.grading:grade_item"
DEFAULT_TIMEOUT_S = 30.0

# ---------------------------------------------------------------------------------------------------------------
# Extraction


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} / \\fbox{...}, braces balanced; None when there is none or it is unclosed."""
    starts = [m for m in re.finditer(r"\\(?:boxed|fbox)\b", text)]
    for m in reversed(starts):
        i = m.end()
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            depth, j = 0, i
            while j < len(text):
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[i + 1 : j].strip()
                j += 1
            continue  # unclosed: try an earlier box
        bare = re.match(r"\s*([^\s$]+)", text[m.end() :])  # "\boxed 5"
        if bare and m.end() < len(text) and text[m.end()] == " ":
            return bare.group(1).strip()
    return None


_ANSWER_LINE = re.compile(
    r"(?:final\s+answer\s*(?:is|:|=)|the\s+answer\s*(?:is|:|=)|^\s*answer\s*[:=]|####)\s*(.+)",
    re.IGNORECASE | re.MULTILINE,
)


def _clean_answer_text(s: str) -> str:
    """Drop markdown stars, math delimiters and a final period, repeatedly ("$\\frac12$." -> "\\frac12")."""
    previous = None
    while s != previous:
        previous = s
        s = s.strip().strip("*").rstrip(".").strip()
        s = re.sub(r"^\$+|\$+$", "", s)
        s = re.sub(r"^\\[(\[]|\\[)\]]$", "", s)
    return s


_CLAUSE_AFTER_COMMA = re.compile(
    r",\s+(?:since|because|as|so|which|where|therefore|thus|hence|given|when|while|but|by|using|from|i\.e\.|e\.g\.)\b",
    re.IGNORECASE)
_CLAUSE_AFTER_SPACE = re.compile(r"\s+(?:since|because)\b", re.IGNORECASE)
_SENTENCE_END = re.compile(r"\.\s+[A-Z]")


def answer_phrase(s: str) -> str:
    """`s` up to its first clause break outside brackets and `$...$`: "5, since 2+3=5." -> "5".

    A comma alone is not a break ("(1, 2)", "1, 2, 3" and "1,000" are answers); a comma followed by a word that opens a
    clause is, as are a semicolon, " since"/" because", and a full stop followed by a new sentence.
    """
    depth, in_math, i = 0, False, 0
    while i < len(s):
        c = s[i]
        if c == "\\":  # an escaped character ("\\{", "\\,", "\\$") is never a bracket, break or delimiter
            i += 2
            continue
        if c == "$":
            in_math = not in_math
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth = max(0, depth - 1)
        elif depth == 0 and not in_math:
            rest = s[i:]
            if (c == ";" or (c == "," and _CLAUSE_AFTER_COMMA.match(rest)) or (c == "." and _SENTENCE_END.match(rest))
                    or (c.isspace() and _CLAUSE_AFTER_SPACE.match(rest))):
                return s[:i]
        i += 1
    return s


def answer_line(text: str) -> str | None:
    """The answer phrase of the last final-answer line ("The answer is X", "Answer: X", "#### X"), cleaned."""
    matches = list(_ANSWER_LINE.finditer(text.replace("**", "")))
    for m in reversed(matches):
        value = _clean_answer_text(answer_phrase(m.group(1)))
        if value:
            return value
    return None


def choice_letter(s: str, choices: list[str] | None = None) -> str | None:
    """A letter A-D from an answer string: "C", "(C)", "C)", "C.", "\\text{(C)}", "(C) 42", "C) 42", "option C",
    or the full text of one of `choices`; None otherwise (an article "A good..." is not a letter)."""
    t = re.sub(r"\\text(?:bf|rm)?\{([^{}]*)\}", r"\1", str(s)).replace("$", "").replace("*", "").strip()
    m = (re.fullmatch(r"\(?([A-Da-d])\)?[.:]?", t)
         or re.match(r"^\(([A-D])\)|^([A-D])[.:)]\s", t)
         or re.match(r"^(?:option|choice)\s+\(?([A-D])\b", t, re.IGNORECASE))
    if m:
        return next(g for g in m.groups() if g).upper()
    if choices:
        norm = _norm_ws(t).lower()
        for i, c in enumerate(choices):
            if _norm_ws(str(c)).lower() == norm:
                return "ABCD"[i]
    return None


def extract_answer(response: str, answer_type: str = "math", choices: list[str] | None = None) -> str | None:
    """The answer a response commits to (see the module docstring for the order), or None."""
    found = last_boxed(response)
    if found is None:
        found = answer_line(response)
    if answer_type == "choice":
        if found is not None:
            return choice_letter(found, choices) or found
        lines = [ln for ln in response.strip().splitlines() if ln.strip()]
        if lines:
            return choice_letter(lines[-1].strip(), choices)
    return found


# ---------------------------------------------------------------------------------------------------------------
# Equivalence


def _norm_ws(s: str) -> str:
    return " ".join(str(s).split())


_THOUSANDS = re.compile(r"(?<![\d.])-?\d{1,3}(?:(?:,|\{,\}|\\,)\d{3})+(?:\.\d+)?(?![\d,])")


def normalize_math(s: str) -> str:
    """Light clean-up before math-verify (see module docstring); keeps everything math-verify handles itself."""
    s = str(s).strip()
    s = re.sub(r"^\$+|\$+$", "", s).strip()
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\left", "").replace("\\right", "")
    s = _THOUSANDS.sub(lambda m: re.sub(r"\{,\}|\\,|,", "", m.group(0)), s)
    s = re.sub(r"\^\s*\{?\\circ\}?|°|\\degree", "", s)
    s = re.sub(r"\s*(?:\\text\{\s*|\\mbox\{\s*)?\bdegrees?\}?\s*$", "", s)
    s = s.rstrip(".").strip()
    return s


_TEXT_UNIT = re.compile(r"(?<=[\d}])(?:\s|\\[,;! ])*"  # after a number or a brace, spaces or \, \; \! \ allowed
                        r"\\(?:text|mbox|mathrm)\{\s*([A-Za-z][A-Za-z ]*?)\s*\}(\^\{?\d\}?)?\s*\.?$")
_WORD_UNIT = re.compile(r"^(-?\d[\d,.]*)\s+([A-Za-z]{2,}(?:\^\{?\d\}?)?)\.?$")


def split_unit(s: str) -> tuple[str, str | None]:
    """(answer without its trailing unit, the unit as a comparable key or None); degrees are not a unit."""
    s = str(s).strip()
    s = re.sub(r"^\$+|\$+$", "", s).strip()
    m = _TEXT_UNIT.search(s)
    if m:
        value, word, power = s[: m.start()], m.group(1), m.group(2) or ""
    else:
        m = _WORD_UNIT.match(s)
        if not m:
            return s, None
        value, word, power = m.group(1), m.group(2), ""
    if re.fullmatch(r"degrees?", word.strip(), re.IGNORECASE):
        return s, None
    key = "".join(word.split())
    if len(key) > 2:  # unit words: case and plural do not matter ("Inches" = "inch"); symbols do ("m" vs "M")
        key = key.lower()
        key = re.sub(r"(ch|sh)es$", r"\1", key) if re.search(r"(ch|sh)es$", key) else re.sub(r"s$", "", key)
    return value.strip(), key + re.sub(r"[{}\s]", "", power)


def math_equal(gold: str, pred: str, timeout_s: int = 5) -> bool:
    """math-verify equivalence of two answer strings (gold first: verify is not symmetric); units as documented."""
    from math_verify import parse, verify

    gold, gold_unit = split_unit(gold)
    pred, pred_unit = split_unit(pred)
    if gold_unit and pred_unit and gold_unit != pred_unit:
        return False
    g, p = normalize_math(gold), normalize_math(pred)
    if not p:
        return False
    if _norm_ws(g) == _norm_ws(p):
        return True
    gold_parsed = parse(f"${g}$", parsing_timeout=timeout_s)
    pred_parsed = parse(f"${p}$", parsing_timeout=timeout_s)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout_s))


def exact_equal(gold: str, pred: str) -> bool:
    return _norm_ws(gold) == _norm_ws(pred)


def grade_response(response: str, answer: str, answer_type: str = "math", choices: list[str] | None = None) -> dict:
    """{correct, extracted, reason} for one response, in this process (see `grade_many` for the safe way)."""
    if answer_type not in ("math", "choice", "exact"):
        raise SfnError(f"answer type {answer_type!r} is unknown; use math, choice or exact.")
    extracted = extract_answer(response or "", answer_type, choices)
    if extracted is None or extracted == "":
        return {"correct": False, "extracted": None, "reason": "no answer found"}
    if answer_type == "math":
        ok = math_equal(str(answer), extracted)
    elif answer_type == "choice":
        gold = choice_letter(str(answer), choices) or str(answer).strip().upper()
        ok = choice_letter(extracted, choices) == gold
    else:
        ok = exact_equal(str(answer), extracted)
    return {"correct": ok, "extracted": extracted, "reason": "equivalent" if ok else "not equivalent"}


def grade_item(item: dict) -> dict:
    """The worker's grader: an item is {response, answer, type?, choices?}."""
    return grade_response(item.get("response") or "", item["answer"], item.get("type") or "math", item.get("choices"))


# ---------------------------------------------------------------------------------------------------------------
# Worker processes with a per-item timeout


def _load_callable(spec: str):
    module, _, func = spec.partition(":")
    return getattr(importlib.import_module(module), func)


class _Worker:
    """One grading subprocess (`python -m sfn_train.evaluation._grade_worker`), fed one JSON line at a time.

    A plain subprocess rather than `multiprocessing`: spawn/forkserver re-import the parent's `__main__` (which breaks
    scripts without a main guard, stdin scripts and notebooks), and fork copies a parent that holds torch's threads.
    The child gets the parent's `sys.path`, so a grader module importable here is importable there.
    """

    def __init__(self, grader: str):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self.proc = subprocess.Popen([sys.executable, "-m", "sfn_train.evaluation._grade_worker", grader],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True, bufsize=1)
        self.ready = False
        self.index: int | None = None
        self.started = 0.0

    def fileno(self) -> int:
        return self.proc.stdout.fileno()

    def send(self, index: int, item: dict) -> None:
        self.index, self.started = index, time.monotonic()
        self.proc.stdin.write(json.dumps(item, ensure_ascii=False) + "\n")
        self.proc.stdin.flush()

    def receive(self) -> dict | None:
        """The next message, or None when the worker has died.

        Safe with a buffered reader because a worker never has more than one line in flight: "ready", then one
        result per item sent, and the next item is sent only after the result was read.
        """
        line = self.proc.stdout.readline()
        return json.loads(line) if line else None

    def stop(self, kill: bool = False) -> None:
        if not kill:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                stream.close()


def default_workers() -> int:
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def _failed(reason: str) -> dict:
    return {"correct": False, "extracted": None, "reason": reason}


def grade_many(items: list[dict], *, timeout_s: float = DEFAULT_TIMEOUT_S, workers: int | None = None,
               grader: str = DEFAULT_GRADER, progress: bool = False) -> list[dict]:
    """Grade items in worker processes; an item over `timeout_s` of its own grading time is killed with its worker.

    `grader` is a "module:function" taking an item dict and returning {correct, extracted, reason}; it is named by
    path because the workers import it afresh. A worker that dies mid-item fails that item and is replaced.
    """
    if not items:
        return []
    from multiprocessing.connection import wait

    n = max(1, min(workers or default_workers(), len(items)))
    results: list[dict | None] = [None] * len(items)
    pending = deque(range(len(items)))
    pool = [_Worker(grader) for _ in range(n)]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(items), desc=f"grading {progress}" if isinstance(progress, str) else "grading",
                   unit="answer")  # `progress`: True, or the text that names what is graded

    def finish(worker: _Worker, result: dict) -> None:
        results[worker.index] = result
        worker.index = None
        if bar:
            bar.update(1)

    startup_deadline = time.monotonic() + 120.0
    try:
        while pending or any(w.index is not None for w in pool):
            if not any(w.ready for w in pool) and time.monotonic() > startup_deadline:
                raise SfnError("no grading worker became ready within 120 s; check `python -c 'import math_verify'`.")
            for w in pool:
                if w.ready and w.index is None and pending:
                    i = pending.popleft()
                    w.send(i, items[i])
            now = time.monotonic()
            waits = [w.started + timeout_s - now for w in pool if w.index is not None]
            readable = wait(pool, timeout=max(0.01, min(waits, default=1.0)))
            for k, w in enumerate(pool):
                if w in readable:
                    msg = w.receive()
                    if msg is None:  # died: while starting is a broken install, mid-item is that item's fault
                        if not w.ready:
                            raise SfnError(f"a grading worker failed to start (exit code {w.proc.wait()}); see its "
                                           "error above, and check `python -c 'import math_verify'`.")
                        finish(w, _failed("grader process died"))
                        w.stop(kill=True)
                        pool[k] = _Worker(grader)
                    elif msg.get("ready"):
                        w.ready = True
                    else:
                        finish(w, msg)
                elif w.index is not None and time.monotonic() - w.started > timeout_s:
                    finish(w, _failed(f"grading timed out after {timeout_s:g}s"))
                    w.stop(kill=True)
                    pool[k] = _Worker(grader)
    finally:
        for w in pool:
            w.stop()
        if bar:
            bar.close()
    return results  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------------------
# Files


def grade_file(path_in: str | os.PathLike, path_out: str | os.PathLike, *, timeout_s: float = DEFAULT_TIMEOUT_S,
               workers: int | None = None, progress: bool = True) -> dict:
    """Grade a JSONL of {response, answer, type?, choices?} rows; write the rows with `correct` and `extracted`.

    `reason` is added too when an item could not be graded normally (timeout, grader error). Returns a summary.
    """
    path_in, path_out = Path(path_in), Path(path_out)
    rows = []
    for lineno, row in iter_jsonl(path_in, ("response", "answer"), "responses file",
                                  "a JSONL of {response, answer} rows"):
        if row.get("type", "math") not in ("math", "choice", "exact"):
            raise SfnError(f"{path_in}:{lineno}: type {row['type']!r} is unknown; use math, choice or exact.")
        rows.append(row)
    items = [{"response": r["response"], "answer": str(r["answer"]), "type": r.get("type", "math"),
              "choices": r.get("choices")} for r in rows]
    graded = grade_many(items, timeout_s=timeout_s, workers=workers, progress=progress)
    path_out.parent.mkdir(parents=True, exist_ok=True)
    with open(path_out, "w", encoding="utf-8") as f:
        for row, g in zip(rows, graded):
            out = {**row, "correct": g["correct"], "extracted": g["extracted"]}
            if g["reason"] not in ("equivalent", "not equivalent", "no answer found"):
                out["reason"] = g["reason"]
            f.write(json.dumps(out, ensure_ascii=False) + "\n")
    n_correct = sum(g["correct"] for g in graded)
    return {"rows": len(rows), "correct": n_correct, "accuracy": n_correct / len(rows) if rows else 0.0}
