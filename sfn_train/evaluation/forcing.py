"""Rows and budget forcing, shared by both backends: what each row may generate next and what its output does.

A response is thinking until the model stops: on its end-of-thinking token (`end_of_thinking`: `<|im_start|>` for
s1, `</think>` for R1-style models) or on EOS. With `budget_forcing=N`, the first N times a row stops while thinking,
the stop token is dropped, `wait_text` ("Wait") is appended and the row thinks on. The next stop ends the thinking:

- s1 (`answer_start` set, as simplescaling/s1's lm-evaluation-harness does): the stop token is dropped and
  `answer_start` ("<|im_start|>answer") appended; the answer runs until EOS.
- otherwise an end-of-thinking token is kept and opens the answer (which runs until EOS); an EOS ends the row.

`thinking_budget` caps the thinking tokens, forced "Wait"s included ("auto" is s1's rule: max_new_tokens minus the
longest prompt, minus the thinking-start and budget-spent markers, minus 100 tokens left for the answer; a shorter
context takes max_new_tokens' place). A row that
reaches it is closed for it: s1 appends "\n" (unless the thinking already ends in a newline) +
`answer_start` + `budget_spent_text` ("\nFinal Answer:"); without `answer_start` the end-of-thinking token is
appended. One deliberate difference from s1's code: s1 asks every forcing round for the whole budget and cuts the
joined thinking afterwards; here each round asks only for what is left of it, so no token is generated to be thrown
away. The kept tokens are the same under greedy decoding; a thinking cut by the budget always gets "Final Answer:",
as the s1 paper describes, where s1's code omits it when the last round happened to stop on its own.

`thinking_min_tokens` (s1: 1) makes every thinking request generate at least that many tokens, so a forced "Wait" is
never followed by an immediate stop. `max_new_tokens` caps everything a row generates (finish_reason "length").
Context: a row is asked for at most what fits, and a row with no room left stops cleanly with finish_reason "context"
instead of being submitted (vLLM would raise for the whole batch).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..errors import SfnError
from .settings import GenerationSettings


@dataclass
class Row:
    """One (problem, sample) generation and its state across budget-forcing rounds."""

    problem_index: int
    sample_index: int
    prompt_ids: list[int]
    gen_ids: list[int] = field(default_factory=list)
    waits: int = 0
    finish_reason: str | None = None
    thinking: bool = True  # before the end-of-thinking token (always, for a model without one)
    rounds: int = 0  # requests made for this row
    answer_from: int | None = None  # index in gen_ids where the answer starts (after the forced markers)
    budget_spent: bool = False  # the thinking was closed by the thinking budget



def make_rows(prompt_ids: list[list[int]], samples: int) -> list[Row]:
    return [Row(p, s, ids) for p, ids in enumerate(prompt_ids) for s in range(samples)]


def end_of_thinking_id(tokenizer, text: str | None, eos_ids: list[int]) -> int | None:
    """The id of the end-of-thinking token; it must be exactly one token and not an EOS."""
    if text is None:
        return None
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise SfnError(f"--end-of-thinking {text!r} is {len(ids)} tokens for this tokenizer; it must be the one token "
                       "that closes the model's thinking (e.g. '</think>' for R1-style models, '<|im_start|>' for s1).")
    if ids[0] in eos_ids:
        raise SfnError(f"--end-of-thinking {text!r} is an EOS token of this model; name the token that closes the "
                       "thinking (without --end-of-thinking, EOS already ends thinking and response).")
    return ids[0]


@dataclass
class Markers:
    """The token ids forcing inserts, from one tokenizer (see `make_forcing`)."""

    wait: list[int]
    end_think: int | None = None
    answer: list[int] | None = None  # s1: "<|im_start|>answer"
    spent: list[int] | None = None  # s1: "<|im_start|>answer\nFinal Answer:"; else [end_think]
    newline: list[int] = field(default_factory=list)
    ends_with_newline: object = None  # gen_ids -> bool (s1 adds "\n" before `spent` unless the thinking ends in one)


class Forcing:
    """What each row may generate next, and what a round's output does to it (budgets, context, budget forcing).

    Both backends use it the same way: `request(row)` gives the tokens to ask for (0: the row is finished, with its
    finish_reason set), `stop_ids(row)` the tokens that end the request, `min_tokens(row)` the least it must generate,
    and `advance(row, new_ids, asked, stop)` takes the output and says whether the row needs another request.
    """

    def __init__(self, settings: GenerationSettings, eos_ids: list[int], markers: Markers,
                 context_len: int | None = None, thinking_budget: int | None = None):
        self.eos = set(eos_ids)
        self.m = markers
        self.end_think = markers.end_think
        self.waits = settings.budget_forcing
        self.max_new = settings.max_new_tokens
        self.budget = thinking_budget
        self.min_think = settings.thinking_min_tokens
        self.context_len = context_len

    def _limit(self, row: Row) -> int:
        """Tokens the row may have generated at the end of its current phase."""
        if row.thinking and self.budget is not None:
            return min(self.max_new, self.budget)
        return self.max_new

    def room(self, row: Row) -> int:
        if self.context_len is None:
            return self.max_new - len(row.gen_ids)
        return self.context_len - len(row.prompt_ids) - len(row.gen_ids)

    def _fits(self, row: Row, ids: list[int], limit: int) -> bool:
        """Can `ids` be appended and still leave room for one generated token?"""
        return len(row.gen_ids) + len(ids) < limit and self.room(row) > len(ids)

    def stop_ids(self, row: Row) -> list[int]:
        return sorted(self.eos | ({self.end_think} if row.thinking and self.end_think is not None else set()))

    def min_tokens(self, row: Row) -> int:
        return self.min_think if row.thinking else 0

    def request(self, row: Row) -> int:
        if row.finish_reason is not None:
            return 0
        left, room = self._limit(row) - len(row.gen_ids), self.room(row)
        if room <= 0:
            row.finish_reason = "context"
            return 0
        if left <= 0:
            row.finish_reason = "length"
            return 0
        return min(left, room)

    def advance(self, row: Row, new_ids: list[int], asked: int, stop: int | None = None) -> bool:
        """Add one round's output (at most `asked` tokens count); True when the row must generate again.

        `stop` is the token that ended the request when the backend does not include it in `new_ids` (vLLM).
        """
        row.rounds += 1
        new_ids, stops = list(new_ids[:asked]), set(self.stop_ids(row))
        for i, tok in enumerate(new_ids):
            if tok in stops:
                new_ids, stop = new_ids[:i], tok
                break
        row.gen_ids += new_ids
        if stop is not None:
            if not row.thinking:
                row.finish_reason = "stop"
                return False
            if row.waits < self.waits and self._fits(row, self.m.wait, self._limit(row)):
                row.gen_ids += self.m.wait  # drop the stop and make the model think on
                row.waits += 1
                return True
            return self._end_thinking(row, stop)
        if row.thinking and self.budget is not None and len(row.gen_ids) >= self.budget:
            return self._spend_budget(row)
        return True  # `request` decides: the budget or context is used up, or the backend stopped short of `asked`

    def _open_answer(self, row: Row, ids: list[int]) -> bool:
        if not self._fits(row, ids, self.max_new):
            row.finish_reason = "length"
            return False
        row.gen_ids += ids
        row.thinking, row.answer_from = False, len(row.gen_ids)
        return True

    def _end_thinking(self, row: Row, stop: int) -> bool:
        """The model stopped thinking and no "Wait" is left: open the answer, or end the row on EOS (R1 style)."""
        if self.m.answer is not None:  # s1: the stop is dropped and "<|im_start|>answer" opens the answer
            return self._open_answer(row, self.m.answer)
        if stop == self.end_think:  # the model's own end of thinking opens the answer
            return self._open_answer(row, [stop])
        row.finish_reason = "stop"
        return False

    def _spend_budget(self, row: Row) -> bool:
        """The thinking budget is spent: close the thinking for the model so that it answers."""
        ids = list(self.m.spent)
        if self.m.answer is not None and not self.m.ends_with_newline(row.gen_ids):
            ids = self.m.newline + ids
        row.budget_spent = True
        return self._open_answer(row, ids)


def _rounds(rows: list[Row], forcing: Forcing, submit, bar=None) -> None:
    """Request, generate and advance until every row is finished; `submit([(row, asked)])` -> [(new_ids, stop)]."""
    todo = list(rows)
    while todo:
        live = []
        for row in todo:
            asked = forcing.request(row)
            if asked:
                live.append((row, asked))
            elif bar:
                bar.update(1)
        outputs = submit(live) if live else []
        todo = [row for (row, asked), (new_ids, stop) in zip(live, outputs)
                if forcing.advance(row, new_ids, asked, stop)]
        if bar:
            bar.update(len(live) - len(todo))


def timed_rounds(rows: list[Row], forcing: Forcing, submit, progress: bool) -> float:
    """`_rounds` with a progress bar when asked (`progress`: True, or the text that names what is generated, e.g.
    "base on math500"); the generation time in seconds."""
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(rows), desc=f"generating {progress}" if isinstance(progress, str) else "generating",
                   unit="response")
    start = time.perf_counter()
    _rounds(rows, forcing, submit, bar)
    if bar:
        bar.close()
    return time.perf_counter() - start


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def auto_thinking_budget(settings: GenerationSettings, tokenizer, rows: list[Row],
                         context_len: int | None = None) -> int | None:
    """The thinking budget in tokens: the number given, s1's "auto" rule, or None (no budget).

    s1's rule counts from its generation budget (max_gen_toks 32768, its models' context); a context shorter than
    max_new_tokens takes its place, so that the answer's 100 tokens still fit (Qwen2.5-Math: 4096)."""
    if settings.thinking_budget != "auto":
        return settings.thinking_budget
    start = len(_ids(tokenizer, settings.thinking_start)) if settings.thinking_start else 0
    end = len(_ids(tokenizer, (settings.answer_start or settings.end_of_thinking) + (settings.budget_spent_text or "")))
    longest = max((len(r.prompt_ids) - start for r in rows), default=0)  # s1 measures prompts before "think"
    total = min(settings.max_new_tokens, context_len or settings.max_new_tokens)
    budget = total - longest - start - end - 100  # s1: "Leave 100 tokens for answer"
    if budget < 1:
        raise SfnError(f"thinking budget 'auto' leaves no thinking: {total} tokens (max_new_tokens or context) minus "
                       f"the longest prompt ({longest} tokens) and 100 tokens for the answer; raise --max-new-tokens.")
    return budget


def make_forcing(tokenizer, settings: GenerationSettings, eos_ids: list[int], context_len: int | None,
                 rows: list[Row]) -> Forcing:
    end_think = end_of_thinking_id(tokenizer, settings.end_of_thinking, eos_ids)
    answer = _ids(tokenizer, settings.answer_start) if settings.answer_start is not None else None
    spent = [end_think] if answer is None else _ids(tokenizer, settings.answer_start + (settings.budget_spent_text or ""))
    markers = Markers(
        wait=_ids(tokenizer, settings.wait_text) if settings.budget_forcing else [], end_think=end_think,
        answer=answer, spent=spent, newline=_ids(tokenizer, "\n"),
        ends_with_newline=lambda gen: bool(gen) and tokenizer.decode(gen[-1:]).endswith("\n"))
    return Forcing(settings, eos_ids, markers, context_len, auto_thinking_budget(settings, tokenizer, rows, context_len))
