"""Probe rollouts: branch dead-end trajectories at their answer and let the policy explore again.

As in MiliLab/REX-RAG (search_r1/llm_agent/generation.py `execute_predictions` / `clone_rollout`): a probe
keeps its source's whole history up to the answer, the reasoning of the answer turn included, drops the
`<answer>...</answer>` span (and anything after it), appends one exploratory prompt drawn uniformly from
the pool, and continues the multi-turn loop for the turns its source had left. The answer turn is spent,
as in the reference (where the prompt arrives as that turn's observation): the probe's next generation is a
new turn, parsed on its own, so a source that answered in searching turn s (0-based) gives a probe with
max_turns - s - 1 searching turns and then the final answer turn.

The branch is made with `Trajectory.fork`, which keeps the source's engine completion; the agent loop then
issues `engine.fork(completion, keep_tokens, prompt_ids, ...)`, so the KV of every full block of the kept
prefix comes from the prefix cache instead of being recomputed. A probe carries its source's meta (group id
included: it joins its source's GRPO group) plus `probe_of` (the source's index) and `explore_prompt` (the
pool index of its prompt).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from rexrag_fast.agent.actions import parse_action
from rexrag_fast.agent.loop import AgentConfig, run_agent_loop
from rexrag_fast.agent.trajectory import Component, Trajectory
from rexrag_fast.rexrag.dead_ends import select_dead_ends
from rexrag_fast.rexrag.prompts import sample_prompt_indices

# finish_reason recorded for the answer turn that a probe closes with its exploratory prompt.
EXPLORE_FINISH_REASON = "explore"


def answer_start(traj: Trajectory, tokenizer: Any) -> int:
    """Offset in traj.token_ids of the first token of its final answer's `<answer>` span.

    Every token before it decodes to text lying wholly before the `<answer>` tag of the trajectory's last
    turn (decoded as the agent loop decodes a turn: from the turn's start, special tokens skipped); the
    result is the largest such offset.
    """
    if traj.status != "answer" or not traj.turns or traj.turns[-1].action != "answer":
        raise ValueError(
            f"answer_start: expected a trajectory that ended with an answer turn, got status {traj.status!r} "
            f"and last turn action {traj.turns[-1].action if traj.turns else None!r}"
        )
    turn = traj.turns[-1]
    ids = traj.token_ids[turn.start : turn.end]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    action = parse_action(text)
    if not action.is_answer or action.span is None:
        raise ValueError(f"answer_start: no complete <answer>...</answer> in the last turn's text {text!r}")
    before = text[: action.span[0]]

    def fits(k: int) -> bool:
        piece = tokenizer.decode(ids[:k], skip_special_tokens=True)
        return before.startswith(piece)

    # Binary search for the last fitting prefix, then step on in case decoding is not monotone at a
    # multi-byte character boundary.
    lo, hi = 0, len(ids)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    while lo < len(ids) and fits(lo + 1):
        lo += 1
    return turn.start + lo


def fork_probe(
    traj: Trajectory, prompt_token_ids: Sequence[int], tokenizer: Any, meta: dict[str, Any] | None = None
) -> Trajectory:
    """A running probe: traj's tokens before its answer span, then the prompt tokens (EXPLORE_PROMPT).

    The answer turn is closed with the prompt inside it and the next turn opened after the prompt, so the
    probe continues for the turns its source had left (module docstring). meta is merged into traj.meta.
    """
    if len(prompt_token_ids) == 0:
        raise ValueError("prompt_token_ids: expected the tokens of one exploratory prompt, got none")
    keep = answer_start(traj, tokenizer)
    probe = traj.fork(keep, list(prompt_token_ids), Component.EXPLORE_PROMPT, meta=meta)
    probe.close_turn(None, "", EXPLORE_FINISH_REASON)
    probe.open_turn()
    return probe


@dataclass(frozen=True)
class ProbeBatch:
    """Probes built from one batch: probes [P], sources [P] (index of each probe's source trajectory) and
    prompt_ids [P] (pool index of each probe's exploratory prompt)."""

    probes: list[Trajectory]
    sources: np.ndarray
    prompt_ids: np.ndarray


def make_probes(
    trajs: Sequence[Trajectory],
    rewards: Any,
    pool_token_ids: Sequence[Sequence[int]],
    revision_prob: float,
    rng: np.random.Generator,
    tokenizer: Any,
    *,
    max_turns: int,
    training: bool = True,
) -> ProbeBatch:
    """Pick dead ends among `trajs` and fork one probe from each (not yet run).

    trajs [B] finished trajectories; rewards [B] exact-match reward of each; pool_token_ids: the tokenised
    pool (`prompts.tokenize_prompts`); max_turns: searching turns of the agent loop. A trajectory is a
    candidate when it is an original (no `probe_of` in its meta), ended with an answer given in a searching
    turn (turn index < max_turns), and its reward is below 1; then `select_dead_ends` draws.
    """
    if not pool_token_ids:
        raise ValueError("pool_token_ids: expected the tokenised prompt pool, got an empty list")
    is_original = np.array([t.meta.get("probe_of") is None for t in trajs], dtype=bool)
    can_continue = np.array(
        [t.status == "answer" and bool(t.turns) and len(t.turns) - 1 < max_turns for t in trajs], dtype=bool
    )
    rewards = np.asarray(rewards, dtype=np.float64)
    if rewards.shape != (len(trajs),):
        raise ValueError(f"rewards: expected shape [{len(trajs)}], got {list(rewards.shape)}")
    dead = select_dead_ends(rewards, is_original, revision_prob, rng, training=training, can_continue=can_continue)
    sources = np.flatnonzero(dead).astype(np.int64)
    prompt_ids = sample_prompt_indices(rng, sources.size, len(pool_token_ids))
    probes = [
        fork_probe(trajs[s], pool_token_ids[p], tokenizer, meta={"probe_of": int(s), "explore_prompt": int(p)})
        for s, p in zip(sources.tolist(), prompt_ids.tolist())
    ]
    return ProbeBatch(probes=probes, sources=sources, prompt_ids=prompt_ids)


def run_probes(
    engine: Any,
    retriever: Any,
    probes: Sequence[Trajectory],
    config: AgentConfig,
    *,
    tokenizer: Any = None,
) -> list[Trajectory]:
    """Continue the probes with the agent loop for their remaining turns (the first request of each is an
    `engine.fork` of its source's completion). Returns the finished probes [P], in order."""
    if not probes:
        return []
    return run_agent_loop(engine, retriever, list(probes), config, tokenizer=tokenizer)
