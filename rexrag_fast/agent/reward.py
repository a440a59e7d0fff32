"""Rewards for QA trajectories: exact match (EM) and token F1 after Search-R1's answer normalisation.

    normalize(s) = collapse_whitespace(remove_articles(remove_punctuation(lower(s))))
    EM(pred, golds) = 1 if normalize(pred) == normalize(g) for some gold g, else 0
    F1(pred, golds) = max_g 2 * P * R / (P + R),  P = |common| / |pred tokens|, R = |common| / |gold tokens|

(common = multiset intersection of whitespace tokens of the normalised strings). As in FlashRAG / the
HotpotQA evaluator, an F1 where either side normalises to "yes", "no" or "noanswer" and the two differ
scores 0.

The training reward follows Search-R1's qa_em.compute_score_em:

    reward = score          if an answer was given and EM = 1
             format_score   if an answer was given and EM = 0
             0              if no answer was given

and optionally qa_em_format's structure-aware variant (`structured_reward`), which also checks that the
response follows think -> (search -> information -> think)* -> answer.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

from rexrag_fast.agent.actions import extract_answer

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """Search-R1 / SQuAD normalisation: lower-case, drop ASCII punctuation, drop articles, collapse spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _golds(golden_answers: str | Sequence[str]) -> list[str]:
    if isinstance(golden_answers, str):
        return [golden_answers]
    golds = [g for g in golden_answers if isinstance(g, str)]
    if not golds:
        raise ValueError(f"golden_answers must hold at least one string, got {golden_answers!r}")
    return golds


def exact_match(prediction: str | None, golden_answers: str | Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised golden answer, else 0.0 (None scores 0)."""
    golds = _golds(golden_answers)
    if prediction is None:
        return 0.0
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(g) for g in golds))


def _f1_one(pred: str, gold: str) -> float:
    if pred != gold and (pred in ("yes", "no", "noanswer") or gold in ("yes", "no", "noanswer")):
        return 0.0
    pred_tokens, gold_tokens = pred.split(), gold.split()
    common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision = common / len(pred_tokens)
    recall = common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str | None, golden_answers: str | Sequence[str]) -> float:
    """Best token F1 of the normalised prediction against the normalised golden answers (None scores 0)."""
    golds = _golds(golden_answers)
    if prediction is None:
        return 0.0
    pred = normalize_answer(prediction)
    return max(_f1_one(pred, normalize_answer(g)) for g in golds)


def em_reward(
    prediction: str | None,
    golden_answers: str | Sequence[str],
    format_score: float = 0.0,
    score: float = 1.0,
) -> float:
    """Search-R1's EM reward of an extracted answer: score if EM, format_score if wrong, 0 if None."""
    if prediction is None:
        return 0.0
    return score if exact_match(prediction, golden_answers) else format_score


_FORMAT_TAGS = re.compile(r"(</?(?:think|search|information|answer)>)")
# state -> {tag: next state}; text outside tags is allowed only inside think/search/information/answer.
_FORMAT_MACHINE: dict[str, dict[str, str]] = {
    "start": {"<think>": "in_think"},
    "in_think": {"</think>": "after_think"},
    "after_think": {"<search>": "in_search", "<answer>": "in_answer"},
    "in_search": {"</search>": "after_search"},
    "after_search": {"<information>": "in_information"},
    "in_information": {"</information>": "information"},
    "information": {"<think>": "in_think"},
    "in_answer": {"</answer>": "end"},
    "end": {},
}
_FREE_TEXT_STATES = frozenset({"in_think", "in_search", "in_information", "in_answer"})


def is_valid_format(response_text: str) -> bool:
    """Whether the response (text after the prompt) is think -> (search -> information -> think)* -> answer.

    Search-R1's qa_em_format.is_valid_sequence without its assistant-marker search: the caller passes the
    response text. Tags must be balanced and follow the machine above; only whitespace may sit between
    blocks; the response must end right after </answer> (whitespace aside).
    """
    for tag in ("think", "search", "information", "answer"):
        if response_text.count(f"<{tag}>") != response_text.count(f"</{tag}>"):
            return False
    state = "start"
    for part in _FORMAT_TAGS.split(response_text):
        if not part.strip():
            continue
        if _FORMAT_TAGS.fullmatch(part):
            nxt = _FORMAT_MACHINE[state].get(part)
            if nxt is None:
                return False
            state = nxt
        elif state not in _FREE_TEXT_STATES:
            return False
    return state == "end"


def information_has_answer(response_text: str, golden_answers: str | Sequence[str]) -> bool:
    """Whether some <information> block contains a normalised golden answer as a substring."""
    golds = [normalize_answer(g) for g in _golds(golden_answers)]
    for block in re.findall(r"<information>(.*?)</information>", response_text, re.DOTALL):
        norm = normalize_answer(block)
        if any(g in norm for g in golds):
            return True
    return False


def structured_reward(
    response_text: str,
    golden_answers: str | Sequence[str],
    structure_format_score: float = 0.2,
    final_format_score: float = 0.1,
    retrieval_score: float = 0.1,
    score: float = 1.0,
) -> float:
    """Search-R1's format-aware reward (qa_em_format.compute_score_em) of a response text.

        valid = is_valid_format(response); retrieved = valid and information_has_answer(response)
        EM=1:             score if valid else score - structure_format_score
        wrong or missing: structure_format_score (+ retrieval_score if retrieved) if valid,
                          else final_format_score if an answer was given, else 0
    """
    valid = is_valid_format(response_text)
    retrieved = valid and information_has_answer(response_text, golden_answers)
    answer = extract_answer(response_text)
    if answer is not None and exact_match(answer, golden_answers):
        return score if valid else score - structure_format_score
    if valid:
        return structure_format_score + (retrieval_score if retrieved else 0.0)
    return final_format_score if answer is not None else 0.0


def batch_rewards(
    answers: Sequence[str | None],
    golden_answers: Sequence[str | Sequence[str]],
    format_score: float = 0.0,
    score: float = 1.0,
) -> list[float]:
    """`em_reward` over a batch: answers [B], golden_answers [B] (each a string or a list of strings)."""
    if len(answers) != len(golden_answers):
        raise ValueError(f"answers has {len(answers)} items but golden_answers has {len(golden_answers)}")
    return [em_reward(a, g, format_score, score) for a, g in zip(answers, golden_answers)]


def batch_scores(
    answers: Sequence[str | None], golden_answers: Sequence[str | Sequence[str]]
) -> dict[str, list[float]]:
    """EM and F1 per item: {"em": [B], "f1": [B]}."""
    if len(answers) != len(golden_answers):
        raise ValueError(f"answers has {len(answers)} items but golden_answers has {len(golden_answers)}")
    return {
        "em": [exact_match(a, g) for a, g in zip(answers, golden_answers)],
        "f1": [f1_score(a, g) for a, g in zip(answers, golden_answers)],
    }
