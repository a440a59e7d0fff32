"""Token bookkeeping of one multi-turn trajectory, and packing trajectories into the trainer's batch.

A trajectory is one token sequence [L] = prompt, then turns of model response, each followed by what the
environment inserted. Every token carries a component (who wrote it) and a behaviour log-prob:

    component    written by                                   in loss mask   behaviour log-prob
    PROMPT       the dataset (instruction + question)         no             0
    RESPONSE     the policy (sampled by the engine)           yes            log pi_old(token)
    INVALID_MSG  the loop, after a turn with no valid action  no             0
    INFORMATION  the retriever, "<information>...</information>"  no         0
    EXPLORE_PROMPT  REX-RAG, an exploratory prompt inserted    yes            given by the caller (0 default)

The integer values follow REX-RAG's component_mask (0 prompt, 1 response, 3 invalid-action prompt,
4 information, 5 revision prompt), so masks can be compared with the reference directly. Loss mask =
component in {RESPONSE, EXPLORE_PROMPT}, as REX-RAG trains on its inserted revision prompts.

Turns: `turns` lists closed turns; each spans [start, end) of `token_ids` and holds the parsed action.
The open turn (being generated) starts at `turn_start`. A trajectory also keeps `completion`, the last
engine Completion whose token ids are a prefix of `token_ids`, so the loop can continue it with
engine.extend / engine.fork and reuse the cached KV of that prefix.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from enum import IntEnum
from typing import Any

import torch


class Component(IntEnum):
    """Who wrote a token (values as REX-RAG's component_mask)."""

    PROMPT = 0
    RESPONSE = 1
    INVALID_MSG = 3
    INFORMATION = 4
    EXPLORE_PROMPT = 5


LOSS_COMPONENTS = frozenset({Component.RESPONSE, Component.EXPLORE_PROMPT})


@dataclass
class Turn:
    """One closed turn: tokens [start, end) of the trajectory (response and any explore prompt inside it).

    action is "search", "answer" or None (invalid); content is the query or the answer text;
    finish_reason is the engine's ("stop" | "length" | "eos") for the turn's last generation.
    """

    start: int
    end: int
    action: str | None
    content: str
    finish_reason: str


@dataclass
class Trajectory:
    """One trajectory's tokens and per-token annotations (all lists have the same length L).

    status: "running" while the loop may extend it; when done, "answer" (answered), "max_turns" (final turn
    gave no answer), "length" (token budget spent) or "eos" (the model ended a final turn without answering).
    """

    token_ids: list[int]
    components: list[int]
    logprobs: list[float]
    prompt_len: int
    turns: list[Turn] = field(default_factory=list)
    turn_start: int = -1
    answer: str | None = None
    status: str = "running"
    num_searches: int = 0
    num_invalid: int = 0
    completion: Any = None
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_prompt(cls, prompt_token_ids: Sequence[int], meta: dict[str, Any] | None = None) -> Trajectory:
        """A fresh trajectory holding only the prompt [P] (P >= 1)."""
        ids = [int(t) for t in prompt_token_ids]
        if not ids:
            raise ValueError("a trajectory needs a non-empty prompt")
        return cls(
            token_ids=ids,
            components=[int(Component.PROMPT)] * len(ids),
            logprobs=[0.0] * len(ids),
            prompt_len=len(ids),
            turn_start=len(ids),
            meta=dict(meta or {}),
        )

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def done(self) -> bool:
        return self.status != "running"

    @property
    def num_response_tokens(self) -> int:
        """Tokens after the prompt (generated + inserted): what the total token budget counts."""
        return len(self.token_ids) - self.prompt_len

    @property
    def loss_mask(self) -> list[bool]:
        """[L] True on RESPONSE and EXPLORE_PROMPT tokens."""
        return [c in LOSS_COMPONENTS for c in self.components]

    def append(self, token_ids: Sequence[int], component: Component, logprobs: Sequence[float] | None = None):
        """Append tokens of one component; logprobs [n] default to 0 (only sampled tokens carry one)."""
        ids = [int(t) for t in token_ids]
        if logprobs is None:
            lps = [0.0] * len(ids)
        else:
            lps = [float(x) for x in logprobs]
            if len(lps) != len(ids):
                raise ValueError(f"{len(ids)} tokens but {len(lps)} log-probs")
            if not all(math.isfinite(x) for x in lps):
                raise ValueError(f"log-probs must be finite, got {lps}")
        self.token_ids.extend(ids)
        self.components.extend([int(component)] * len(ids))
        self.logprobs.extend(lps)

    def close_turn(self, action: str | None, content: str, finish_reason: str) -> Turn:
        """Close the open turn [turn_start, current end); what the loop appends next belongs to no turn."""
        turn = Turn(self.turn_start, len(self.token_ids), action, content, finish_reason)
        self.turns.append(turn)
        return turn

    def open_turn(self) -> None:
        """Start the next turn at the current end of the sequence (after the inserted observation)."""
        self.turn_start = len(self.token_ids)

    def fork(
        self,
        keep_tokens: int,
        append_token_ids: Sequence[int] = (),
        component: Component = Component.EXPLORE_PROMPT,
        logprobs: Sequence[float] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> Trajectory:
        """A new running trajectory: this one's first `keep_tokens` tokens, then `append_token_ids`.

        prompt_len <= keep_tokens <= len(self). Turns closed within the kept prefix stay; a turn cut by
        keep_tokens becomes the new open turn (its kept text, the appended tokens and what the model
        writes next are parsed together as one turn); otherwise the new turn starts at keep_tokens.
        The answer and status are reset; `completion` is kept so the loop continues with engine.fork
        and reuses the prefix KV.
        """
        if not self.prompt_len <= keep_tokens <= len(self.token_ids):
            raise ValueError(
                f"keep_tokens must be in [{self.prompt_len}, {len(self.token_ids)}] (prompt length, length), "
                f"got {keep_tokens}"
            )
        kept_turns = [replace(t) for t in self.turns if t.end <= keep_tokens]
        cut = [t for t in self.turns if t.start < keep_tokens < t.end]
        turn_start = cut[0].start if cut else keep_tokens
        child = Trajectory(
            token_ids=self.token_ids[:keep_tokens],
            components=self.components[:keep_tokens],
            logprobs=self.logprobs[:keep_tokens],
            prompt_len=self.prompt_len,
            turns=kept_turns,
            turn_start=turn_start,
            num_searches=sum(t.action == "search" for t in kept_turns),
            num_invalid=sum(t.action is None for t in kept_turns),
            completion=self.completion,
            meta={**self.meta, **(meta or {})},
        )
        child.append(append_token_ids, component, logprobs)
        return child

    def response_text(self, tokenizer: Any, skip_special_tokens: bool = False) -> str:
        """Decoded text of everything after the prompt."""
        return tokenizer.decode(self.token_ids[self.prompt_len :], skip_special_tokens=skip_special_tokens)

    def check(self) -> None:
        """Raise if the annotations are inconsistent (lengths, components, spans, non-finite log-probs)."""
        n = len(self.token_ids)
        if not (len(self.components) == len(self.logprobs) == n):
            raise AssertionError(f"lengths differ: {n} tokens, {len(self.components)} components, "
                                 f"{len(self.logprobs)} log-probs")
        if any(c != Component.PROMPT for c in self.components[: self.prompt_len]):
            raise AssertionError("a prompt token is not marked PROMPT")
        if any(c == Component.PROMPT for c in self.components[self.prompt_len :]):
            raise AssertionError("a token after the prompt is marked PROMPT")
        if not all(math.isfinite(x) for x in self.logprobs):
            raise AssertionError("non-finite behaviour log-prob")
        prev = self.prompt_len
        for t in self.turns:
            if not prev <= t.start <= t.end <= n:
                raise AssertionError(f"turn span [{t.start}, {t.end}) out of order (previous end {prev}, L={n})")
            prev = t.end


def pad_trajectories(
    trajectories: Sequence[Trajectory], pad_token_id: int, device: torch.device | str | None = None
) -> dict[str, torch.Tensor]:
    """Right-padded [B, L] layout (L = longest): input_ids (pad_token_id), attention_mask (bool),
    response_mask (bool), component_mask (int8, -1 on padding), old_logprobs (float32, 0 on padding)."""
    if not trajectories:
        raise ValueError("pad_trajectories needs at least one trajectory")
    b, length = len(trajectories), max(len(t) for t in trajectories)
    input_ids = torch.full((b, length), int(pad_token_id), dtype=torch.int64)
    comp = torch.full((b, length), -1, dtype=torch.int8)
    lps = torch.zeros((b, length), dtype=torch.float32)
    for i, t in enumerate(trajectories):
        n = len(t)
        input_ids[i, :n] = torch.tensor(t.token_ids, dtype=torch.int64)
        comp[i, :n] = torch.tensor(t.components, dtype=torch.int8)
        lps[i, :n] = torch.tensor(t.logprobs, dtype=torch.float32)
    loss_values = torch.tensor(sorted(int(c) for c in LOSS_COMPONENTS), dtype=torch.int8)
    out = {
        "input_ids": input_ids,
        "attention_mask": comp >= 0,
        "response_mask": torch.isin(comp, loss_values),
        "component_mask": comp,
        "old_logprobs": lps,
    }
    return {k: v.to(device) for k, v in out.items()} if device is not None else out
