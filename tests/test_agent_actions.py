"""Parsing a turn's action with Search-R1's rule: first complete <search>/<answer> pair, content stripped."""

from __future__ import annotations

import re

import pytest

from rexrag_fast.agent.actions import extract_answer, first_answer, parse_action, parse_actions

# The reference pattern from Search-R1's postprocess_predictions, to check that our parser agrees with it.
_REFERENCE = re.compile(r"<(search|answer)>(.*?)</\1>", re.DOTALL)


@pytest.mark.parametrize(
    "text, kind, content",
    [
        ("<think>need facts</think><search> capital of France </search>", "search", "capital of France"),
        ("<think>I know</think> <answer> Paris </answer>", "answer", "Paris"),
        ("no tags at all", None, ""),
        ("", None, ""),
        # unclosed / mismatched tags do not form an action
        ("<search> capital of France", None, ""),
        ("<search> capital of France</answer>", None, ""),
        ("<answer>Paris", None, ""),
        # a later complete pair still counts after an unclosed one
        ("<search> dangling <answer>Paris</answer>", "answer", "Paris"),
        # nested: the first opening tag pairs with the first closing tag
        ("<search>a <search>b</search>", "search", "a <search>b"),
        ("<answer><answer>x</answer></answer>", "answer", "<answer>x"),
        # several actions in one turn: the earliest complete one wins
        ("<search>q1</search> then <answer>a</answer>", "search", "q1"),
        ("<answer>a</answer><search>q1</search>", "answer", "a"),
        ("<search>q1</search><search>q2</search>", "search", "q1"),
        # a search wrapping an answer is one search whose query contains the markup
        ("<search>x <answer>a</answer> y</search>", "search", "x <answer>a</answer> y"),
        # empty query / empty answer parse, with empty content
        ("<search></search>", "search", ""),
        ("<search>   \n </search>", "search", ""),
        ("<answer> </answer>", "answer", ""),
        # markup inside an answer is kept verbatim; newlines inside are fine
        ("<answer> <b>Paris</b>, France </answer>", "answer", "<b>Paris</b>, France"),
        ("<answer>line one\nline two</answer>", "answer", "line one\nline two"),
        # other tags are not actions
        ("<think>x</think><information>y</information>", None, ""),
        ("<Search>Q</Search>", None, ""),
    ],
)
def test_parse_action_cases(text: str, kind: str | None, content: str) -> None:
    action = parse_action(text)
    assert action.kind == kind
    assert action.content == content
    ref = _REFERENCE.search(text)
    if ref is None:
        assert action.kind is None and action.span is None
    else:
        assert (action.kind, action.content) == (ref.group(1), ref.group(2).strip())
        assert text[action.span[0] : action.span[1]] == ref.group(0)


def test_parse_actions_batch_and_type_error() -> None:
    acts = parse_actions(["<search>a</search>", "junk", "<answer>b</answer>"])
    assert [a.kind for a in acts] == ["search", None, "answer"]
    assert acts[0].is_search and acts[2].is_answer and not acts[1].is_search
    with pytest.raises(TypeError, match="expects a str"):
        parse_action(b"<answer>x</answer>")  # type: ignore[arg-type]


def test_first_answer_ignores_searches() -> None:
    assert first_answer("<search>q</search> so <answer> Rome </answer>").content == "Rome"
    assert first_answer("<search>q</search>").kind is None


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<answer>a</answer> ... <answer> b </answer>", "b"),
        ("<think>x</think><answer>only</answer>", "only"),
        ("<answer>unclosed", None),
        ("nothing", None),
    ],
)
def test_extract_answer_takes_last(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected
