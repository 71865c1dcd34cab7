"""Rows and budget forcing, shared by both backends: what each row may generate next and what its output does.

Budget forcing (s1, Muennighoff et al. 2025): a response is thinking until the model emits its end-of-thinking token
(`end_of_thinking`, e.g. `</think>`; for a model without one, EOS ends the thinking and the response). With
`budget_forcing=N`, the first N times a row stops while thinking, the stop token is suppressed (not kept) and
`wait_text` ("Wait") is appended instead, and the row continues thinking. After that a stop is kept: the end-of-thinking
token opens the answer, which runs until EOS; an EOS ends the row. `thinking_budget` caps the thinking tokens
(forced "Wait"s included): a row that reaches it gets the end-of-thinking token appended, so it answers (s1's way of
enforcing a maximum). `max_new_tokens` caps everything a row generates; a row that reaches it stops there
(finish_reason "length"). `waits` records how many "Wait"s were used.

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


class Forcing:
    """What each row may generate next, and what a round's output does to it (budgets, context, budget forcing).

    Both backends use it the same way: `request(row)` gives the tokens to ask for (0: the row is finished, with its
    finish_reason set), `stop_ids(row)` the tokens that end the request, and `advance(row, new_ids, asked, stop)`
    takes the output and says whether the row needs another request.
    """

    def __init__(self, settings: GenerationSettings, eos_ids: list[int], wait_ids: list[int],
                 end_think: int | None = None, context_len: int | None = None):
        self.eos = set(eos_ids)
        self.end_think = end_think
        self.wait_ids = list(wait_ids)
        self.waits = settings.budget_forcing
        self.max_new = settings.max_new_tokens
        self.thinking_budget = settings.thinking_budget or settings.max_new_tokens
        self.context_len = context_len

    def _limit(self, row: Row) -> int:
        """Tokens the row may have generated at the end of its current phase."""
        if row.thinking and self.end_think is not None:
            return min(self.max_new, self.thinking_budget)
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
        new_ids = list(new_ids[:asked])
        for i, tok in enumerate(new_ids):
            if tok in self.eos or tok == self.end_think:
                if tok == self.end_think and not row.thinking:  # already answering: an ordinary token
                    row.gen_ids += new_ids[: i + 1]
                    return True
                new_ids, stop = new_ids[:i], tok
                break
        row.gen_ids += new_ids
        if stop is not None:
            if row.thinking and row.waits < self.waits and self._fits(row, self.wait_ids, self._limit(row)):
                row.gen_ids += self.wait_ids  # suppress the stop and make the model think on
                row.waits += 1
                return True
            if stop == self.end_think and row.thinking:  # the model closed its thinking: now the answer
                row.gen_ids.append(stop)
                row.thinking = False
                return True
            row.finish_reason = "stop"
            return False
        if row.thinking and self.end_think is not None and len(row.gen_ids) >= self.thinking_budget:
            if self._fits(row, [self.end_think], self.max_new):  # thinking budget spent: close it so the model answers
                row.gen_ids.append(self.end_think)
                row.thinking = False
                return True
            row.finish_reason = "length"
            return False
        return True  # `request` decides: the budget or context is used up, or the backend stopped short of `asked`


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
    """`_rounds` with a progress bar when asked; the generation time in seconds."""
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(rows), desc="generating", unit="response")
    start = time.perf_counter()
    _rounds(rows, forcing, submit, bar)
    if bar:
        bar.close()
    return time.perf_counter() - start


def make_forcing(tokenizer, settings: GenerationSettings, eos_ids: list[int], context_len: int | None) -> Forcing:
    wait_ids = tokenizer(settings.wait_text, add_special_tokens=False)["input_ids"] if settings.budget_forcing else []
    end_think = end_of_thinking_id(tokenizer, settings.end_of_thinking, eos_ids)
    return Forcing(settings, eos_ids, wait_ids, end_think, context_len)
