"""Demonstration trajectories of the embedded world, in the token layout the agent loop produces.

For a world question the demonstration searches each supporting document by its entity's name, reads
what the real retriever returns, reasons in one short sentence per hop and answers:

    <prompt: chat template + Search-R1 instruction + question>
    <think> I need to look up {e1}. </think>\\n<search> {e1} </search>                      RESPONSE
    \\n\\n<information>Doc 1(Title: ...) ...</information>\\n\\n                               INFORMATION
    <think> The document on {e1} names {e2}. Next I look up {e2}. </think>\\n<search> {e2} </search>
    \\n\\n<information>...</information>\\n\\n
    <think> So the answer is {answer}. </think>\\n<answer> {answer} </answer>                  RESPONSE

Each turn is tokenised on its own and each observation exactly as `run_agent_loop` inserts it
(INFORMATION_TEMPLATE over `format_passages`, cut to `max_obs_tokens`), so the token ids, components and
loss mask are those of a rollout in which the model wrote these turns. Query plan by question type:
1-hop: the one supporting entity; 2-hop: the first entity, then the bridge entity named in its document;
comparison: both entities.

Dead ends on purpose: with `dead_end_rate` (per question type) a deterministic share of the questions gets a
confident wrong answer instead, written without any search,

    <think> I already know this. </think>\n<answer> {guess} </answer>                      RESPONSE

where the guess is the golden answer of another question of the same kind (same first three words). A policy
warm-started on such a mix "succeeds sometimes and fails into dead ends sometimes", which is the situation
REX-RAG's probes and the RL phase are meant to fix.

Honesty about retrieval: a demonstration is kept only if every observation, as cut, contains the fact
the next step relies on (the bridge entity's name, or the answer for the last hop). When the retriever
does not surface it, the question is skipped and counted in `DemonstrationSet.skipped`, so the data never
teaches an answer the reading did not support. For comparison questions the documents hold the compared
numbers, not the answer string's relation, so the check is that both entities' documents were returned.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rexrag_fast.agent.loop import INFORMATION_TEMPLATE
from rexrag_fast.agent.template import encode_prompt
from rexrag_fast.agent.trajectory import Component, Trajectory
from rexrag_fast.retrieval import format_passages
from rexrag_fast.retrieval.retriever import Retriever


@dataclass
class Demonstration:
    """One demonstration: the question row (world format) and its finished trajectory (status "answer")."""

    question: dict[str, Any]
    trajectory: Trajectory
    queries: list[str]


@dataclass
class DemonstrationSet:
    """Demonstrations kept, and the ids of questions skipped because retrieval missed a needed fact."""

    demos: list[Demonstration]
    skipped: list[str] = field(default_factory=list)

    @property
    def dead_ends(self) -> int:
        """Demonstrations that answer a wrong guess without searching."""
        return sum(1 for d in self.demos if not d.queries)

    @property
    def coverage(self) -> float:
        """Share of the questions asked for that became demonstrations."""
        total = len(self.demos) + len(self.skipped)
        return len(self.demos) / total if total else 0.0

    def content_hash(self) -> str:
        """sha256 over every demonstration's token ids and components (a cache key for the warm start)."""
        h = hashlib.sha256()
        for d in self.demos:
            h.update(repr((d.trajectory.token_ids, d.trajectory.components)).encode())
        return h.hexdigest()


def _entity_names(world: Any) -> dict[str, str]:
    """doc id -> entity name, over every entity of the world."""
    return {e["doc_id"]: e["name"] for es in world.entities.values() for e in es}


def _plan(question: dict[str, Any], names: dict[str, str]) -> list[str]:
    """The entity names to search, in order (one per supporting document)."""
    return [names[d] for d in question["supporting_docs"]]


def _observation_ids(result: list[dict[str, Any]], tokenizer: Any, max_obs_tokens: int) -> tuple[list[int], str]:
    """Token ids of one observation as the agent loop inserts it, and the text those (cut) ids decode to."""
    obs = INFORMATION_TEMPLATE.format(format_passages(result).strip())
    ids = tokenizer.encode(obs, add_special_tokens=False)[:max_obs_tokens]
    return ids, tokenizer.decode(ids)


def _turn_texts(question: dict[str, Any], plan: list[str]) -> list[str]:
    """The model-written text of each turn: one per search, then the answer turn."""
    answer = question["golden_answers"][0]
    first = plan[0]
    if question["type"] == "comparison":
        texts = [f"<think> I need to compare {plan[0]} and {plan[1]}. First I look up {first}. </think>\n"
                 f"<search> {first} </search>",
                 f"<think> Now I look up {plan[1]}. </think>\n<search> {plan[1]} </search>",
                 f"<think> Comparing the two documents, the answer is {answer}. </think>\n<answer> {answer} </answer>"]
        return texts
    texts = [f"<think> I need to look up {first}. </think>\n<search> {first} </search>"]
    for prev, nxt in zip(plan, plan[1:]):
        texts.append(f"<think> The document on {prev} names {nxt}. Next I look up {nxt}. </think>\n"
                     f"<search> {nxt} </search>")
    texts.append(f"<think> So the answer is {answer}. </think>\n<answer> {answer} </answer>")
    return texts


def _needed_facts(question: dict[str, Any], plan: list[str]) -> list[list[str]]:
    """Per observation, the strings it must contain for the next step to be supported."""
    if question["type"] == "comparison":
        return [[plan[0]], [plan[1]]]
    return [[nxt] for nxt in plan[1:]] + [[question["golden_answers"][0]]]


def _is_dead_end(question: dict[str, Any], rate: float) -> bool:
    """Deterministic draw with probability `rate` from the question id."""
    digest = hashlib.sha256(f"dead-end:{question['id']}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < rate


def _guesses(questions: Sequence[dict[str, Any]]) -> dict[str, str]:
    """question id -> a wrong answer of the same kind: the next question (cyclically) sharing its first three
    words and having a different golden answer."""
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for q in questions:
        by_kind.setdefault(" ".join(q["question"].split()[:3]), []).append(q)
    out: dict[str, str] = {}
    for group in by_kind.values():
        for i, q in enumerate(group):
            others = [o["golden_answers"][0] for o in group[i + 1:] + group[:i]
                      if o["golden_answers"][0] not in q["golden_answers"]]
            if others:
                out[q["id"]] = others[0]
    return out


def make_demonstrations(
    questions: Sequence[dict[str, Any]],
    world: Any,
    retriever: Retriever,
    tokenizer: Any,
    *,
    topk: int = 3,
    max_obs_tokens: int = 128,
    max_start_length: int | None = None,
    dead_end_rate: Mapping[str, float] | None = None,
) -> DemonstrationSet:
    """Demonstration trajectories for world `questions` (dicts with question, golden_answers, type,
    supporting_docs, id), retrieving with the real `retriever` (one batched call per hop).

    topk / max_obs_tokens: as the agent loop's (AgentConfig.topk / max_obs_tokens) so observations match.
    max_start_length: keep the last this-many prompt tokens, as the trainer does (None: the whole prompt).
    dead_end_rate: question type -> share of those questions demonstrated as a wrong answer without search.
    Returns the kept demonstrations (in question order) and the ids of skipped questions.
    """
    if topk < 1 or max_obs_tokens < 1:
        raise ValueError(f"topk and max_obs_tokens must be >= 1, got {topk} and {max_obs_tokens}")
    dead_end_rate = dict(dead_end_rate or {})
    for kind, rate in dead_end_rate.items():
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"dead_end_rate[{kind!r}] must be in [0, 1], got {rate}")
    guesses = _guesses(questions) if dead_end_rate else {}
    names = _entity_names(world)
    plans: list[list[str]] = []
    for q in questions:
        missing = [d for d in q.get("supporting_docs", []) if d not in names]
        if missing or not q.get("supporting_docs"):
            raise ValueError(f"question {q.get('id')!r}: supporting_docs {q.get('supporting_docs')!r} are not "
                             f"documents of this world")
        plans.append(_plan(q, names))
    hops = max((len(p) for p in plans), default=0)
    # observations[i][h]: (ids, text) of question i's hop h
    observations: list[list[tuple[list[int], str]]] = [[] for _ in questions]
    for h in range(hops):
        idx = [i for i, p in enumerate(plans) if h < len(p)]
        results = retriever.retrieve([plans[i][h] for i in idx], topk=topk)
        for i, result in zip(idx, results):
            observations[i].append(_observation_ids(result, tokenizer, max_obs_tokens))

    demos: list[Demonstration] = []
    skipped: list[str] = []
    for q, plan, obs in zip(questions, plans, observations):
        if not all(all(f in text for f in facts) for (_, text), facts in zip(obs, _needed_facts(q, plan))):
            skipped.append(q["id"])
            continue
        prompt = encode_prompt(q["question"], tokenizer)
        if max_start_length is not None:
            prompt = prompt[-max_start_length:]
        traj = Trajectory.from_prompt(prompt, meta={"id": q["id"]})
        if q["id"] in guesses and _is_dead_end(q, dead_end_rate.get(q["type"], 0.0)):
            guess = guesses[q["id"]]
            traj.append(tokenizer.encode(f"<think> I already know this. </think>\n<answer> {guess} </answer>",
                                         add_special_tokens=False), Component.RESPONSE)
            traj.close_turn("answer", guess, "stop")
            traj.answer, traj.status = guess, "answer"
            demos.append(Demonstration(q, traj, []))
            continue
        texts = _turn_texts(q, plan)
        for h, text in enumerate(texts):
            traj.append(tokenizer.encode(text, add_special_tokens=False), Component.RESPONSE)
            if h < len(plan):
                traj.close_turn("search", plan[h], "stop")
                traj.num_searches += 1
                traj.append(obs[h][0], Component.INFORMATION)
                traj.open_turn()
            else:
                answer = q["golden_answers"][0]
                traj.close_turn("answer", answer, "stop")
                traj.answer = answer
                traj.status = "answer"
        demos.append(Demonstration(q, traj, list(plan)))
    return DemonstrationSet(demos, skipped)
