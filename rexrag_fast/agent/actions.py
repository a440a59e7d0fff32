"""Parsing the action of one turn: `<search> query </search>`, `<answer> text </answer>` or none (invalid).

Search-R1's rule (search_r1/llm_agent/generation.py, postprocess_predictions), kept here: the action is
the FIRST complete `<tag>...</tag>` pair with tag in {search, answer}, found by the lazy pattern
`<(search|answer)>(.*?)</\\1>` over the turn's text (dot matches newlines), and its content is stripped.
Consequences, all tested:
- several actions in one turn: the earliest complete one wins (the engine stops at the first closing
  tag anyway, so a turn normally holds at most one);
- nested tags: `<search>a <search>b</search>` opens at the first `<search>`, so the query is "a <search>b";
- unclosed tags (`<search>a`) or mismatched ones (`<search>a</answer>`) do not form an action; a later
  complete pair still does;
- an empty query (`<search> </search>`) parses as a search with content "" (the loop decides what to do);
- markup inside an answer is kept verbatim (normalisation in reward.py removes punctuation only).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

ActionKind = Literal["search", "answer"]

ACTION_PATTERN = re.compile(r"<(search|answer)>(.*?)</\1>", re.DOTALL)
ANSWER_PATTERN = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
STOP_STRINGS: tuple[str, ...] = ("</search>", "</answer>")
"""Where a turn's generation stops: a closing action tag (the tag's text stays in the output)."""


@dataclass(frozen=True)
class Action:
    """One parsed action. kind is None when the text holds no complete action (an invalid turn)."""

    kind: ActionKind | None
    content: str = ""
    span: tuple[int, int] | None = None  # character span of the whole `<tag>...</tag>` in the text

    @property
    def is_search(self) -> bool:
        return self.kind == "search"

    @property
    def is_answer(self) -> bool:
        return self.kind == "answer"


def parse_action(text: str) -> Action:
    """The first complete search/answer action in `text` (see the module docstring for edge cases)."""
    if not isinstance(text, str):
        raise TypeError(f"parse_action expects a str, got {type(text).__name__}")
    m = ACTION_PATTERN.search(text)
    if m is None:
        return Action(kind=None)
    return Action(kind=m.group(1), content=m.group(2).strip(), span=(m.start(), m.end()))  # type: ignore[arg-type]


def parse_actions(texts: list[str]) -> list[Action]:
    """`parse_action` over a batch of turn texts [B]."""
    return [parse_action(t) for t in texts]


def first_answer(text: str) -> Action:
    """The first complete `<answer>...</answer>` in `text` as an Action (kind None if there is none).

    Used on the final turn, where searching is off and only an answer counts.
    """
    m = ANSWER_PATTERN.search(text)
    if m is None:
        return Action(kind=None)
    return Action(kind="answer", content=m.group(1).strip(), span=(m.start(), m.end()))


def extract_answer(text: str) -> str | None:
    """The LAST complete `<answer>...</answer>` in `text`, stripped; None if there is none.

    This is Search-R1's reward-side extraction (qa_em.extract_solution) applied to the response only:
    the reference scans prompt + response and so needs two matches (the prompt's "<answer> Beijing
    </answer>" example is the first); over the response alone one match suffices.
    """
    last = None
    for m in ANSWER_PATTERN.finditer(text):
        last = m
    return None if last is None else last.group(1).strip()
