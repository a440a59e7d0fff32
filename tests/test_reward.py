"""EM / F1 / format rewards against hand-checked examples (Search-R1 normalisation)."""

from __future__ import annotations

import pytest

from rexrag_fast.agent.reward import (
    batch_rewards,
    batch_scores,
    em_reward,
    exact_match,
    f1_score,
    information_has_answer,
    is_valid_format,
    normalize_answer,
    structured_reward,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The Eiffel Tower", "eiffel tower"),
        ("  an   Apple, a day!  ", "apple day"),
        ("U.S.A.", "usa"),
        ("Theater", "theater"),  # "the" only as a whole word
        ("A", ""),
        ("rock-'n'-roll", "rocknroll"),
        ("<b>Paris</b>", "bparisb"),  # markup is not stripped, only its punctuation
        ("Zürich", "zürich"),
    ],
)
def test_normalize_answer(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


@pytest.mark.parametrize(
    "pred, golds, em",
    [
        ("Paris", ["paris"], 1.0),
        ("the Paris.", "Paris", 1.0),
        ("Paris, France", ["Paris"], 0.0),
        ("Barack Obama", ["Obama", "Barack Obama"], 1.0),
        ("", ["Paris"], 0.0),
        (None, ["Paris"], 0.0),
        ("1,000", ["1000"], 1.0),
    ],
)
def test_exact_match(pred, golds, em) -> None:
    assert exact_match(pred, golds) == em


@pytest.mark.parametrize(
    "pred, golds, f1",
    [
        ("Paris", ["Paris"], 1.0),
        # pred tokens {paris, france}, gold {paris}: P = 1/2, R = 1, F1 = 2/3
        ("Paris, France", ["Paris"], 2 / 3),
        # pred {new, york, city}, gold {new, york}: P = 2/3, R = 1 -> 0.8; against "york city state": P=2/3,R=2/3
        ("New York City", ["New York", "York City State"], 0.8),
        ("Rome", ["Paris"], 0.0),
        ("yes", ["no"], 0.0),
        ("yes", ["yes"], 1.0),
        ("no way", ["no"], 0.0),  # gold is "no" and differs: scored 0 as in the HotpotQA evaluator
        # repeated tokens count once per occurrence: pred {the->dropped, a->dropped} "b b c" vs "b c c"
        ("b b c", ["b c c"], 2 / 3),
        (None, ["x"], 0.0),
    ],
)
def test_f1_score(pred, golds, f1) -> None:
    assert f1_score(pred, golds) == pytest.approx(f1)


def test_golden_answers_validation() -> None:
    with pytest.raises(ValueError, match="at least one string"):
        exact_match("a", [])


def test_em_reward_format_score() -> None:
    assert em_reward("Paris", ["Paris"], format_score=0.1) == 1.0
    assert em_reward("Rome", ["Paris"], format_score=0.1) == 0.1
    assert em_reward(None, ["Paris"], format_score=0.1) == 0.0
    assert batch_rewards(["Paris", "Rome", None], [["Paris"], "Paris", ["Paris"]], format_score=0.2) == [1.0, 0.2, 0.0]
    with pytest.raises(ValueError, match="has 1 items but golden_answers has 2"):
        batch_rewards(["a"], [["a"], ["b"]])
    scores = batch_scores(["Paris, France", None], [["Paris"], ["x"]])
    assert scores["em"] == [0.0, 0.0]
    assert scores["f1"] == pytest.approx([2 / 3, 0.0])


VALID = (
    "<think>need it</think>\n<search> q </search>\n\n<information>Doc 1(Title: Paris) capital</information>\n\n"
    "<think>found</think> <answer>Paris</answer>"
)


@pytest.mark.parametrize(
    "text, valid",
    [
        (VALID, True),
        ("<think>x</think><answer>y</answer>", True),
        ("<answer>y</answer>", False),  # must think first
        ("<think>x</think> stray <answer>y</answer>", False),  # text between blocks
        ("<think>x</think><search>q</search><think>y</think><answer>z</answer>", False),  # no information
        ("<think>x</think><answer>y", False),  # unbalanced
        ("<think>x</think><answer>y</answer> trailing", False),
    ],
)
def test_is_valid_format(text: str, valid: bool) -> None:
    assert is_valid_format(text) is valid


def test_structured_reward_cases() -> None:
    assert structured_reward(VALID, ["Paris"]) == 1.0
    # correct but badly formatted: score - structure_format_score
    assert structured_reward("<answer>Paris</answer>", ["Paris"]) == pytest.approx(0.8)
    # wrong, valid format, the information held the answer: structure + retrieval score
    wrong = VALID.replace("<answer>Paris</answer>", "<answer>Rome</answer>")
    assert information_has_answer(wrong, ["capital"])
    assert structured_reward(wrong, ["capital"]) == pytest.approx(0.3)
    assert structured_reward(wrong, ["Berlin"]) == pytest.approx(0.2)
    assert structured_reward("<answer>Rome</answer>", ["Paris"]) == pytest.approx(0.1)
    assert structured_reward("nothing", ["Paris"]) == 0.0
