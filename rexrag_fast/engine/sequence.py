"""Requests in, completions out, and the running state of one sequence between them."""

from __future__ import annotations

import dataclasses
import enum

import torch

from rexrag_fast.engine.config import SamplingParams


@dataclasses.dataclass
class Request:
    """A prompt (token ids) and how to sample its continuation."""

    prompt_token_ids: list[int]
    sampling: SamplingParams = dataclasses.field(default_factory=SamplingParams)


@dataclasses.dataclass
class Completion:
    """A finished sequence.

    token_ids = prompt + output; output_logprobs[i] = log softmax(logits / T)[output_token_ids[i]] in fp32 (T = 1
    when greedy), before top-k / top-p truncation. finish_reason: "stop" (stop id or stop string), "eos" or
    "length" (max_tokens or the model's context). A matched stop string is part of `text`.
    """

    token_ids: list[int]
    prompt_len: int
    output_token_ids: list[int]
    output_logprobs: list[float]
    finish_reason: str
    stop_str: str | None = None
    text: str | None = None


def extend_request(completion: Completion, new_token_ids: list[int], sampling: SamplingParams | None = None) -> Request:
    """A request continuing `completion`: prompt = completion.token_ids + new_token_ids."""
    return Request(list(completion.token_ids) + [int(t) for t in new_token_ids], sampling or SamplingParams())


def fork_request(completion: Completion, keep_tokens: int, append_token_ids: list[int],
                 sampling: SamplingParams | None = None) -> Request:
    """A branch of `completion`: prompt = completion.token_ids[:keep_tokens] + append_token_ids.

    Raises ValueError unless 1 <= keep_tokens <= len(completion.token_ids).
    """
    n = len(completion.token_ids)
    if not 0 < keep_tokens <= n:
        raise ValueError(f"fork: keep_tokens must be in [1, {n}] (the completion's length), got {keep_tokens}")
    return Request(completion.token_ids[:keep_tokens] + [int(t) for t in append_token_ids],
                   sampling or SamplingParams())


class Status(enum.Enum):
    WAITING = 0
    RUNNING = 1
    FINISHED = 2


class Sequence:
    """Mutable state of one request inside the engine.

    `block_table[i]` holds the KV of tokens [i*block_size, (i+1)*block_size). The first `num_shared_blocks`
    entries came from the prefix cache (the tree owns them; `cache_handle` is locked while running); the rest
    hold one reference of this sequence. `num_computed` tokens have their KV in the pool.
    """

    def __init__(self, seq_id: int, request: Request, max_len: int, generator: torch.Generator | None) -> None:
        self.seq_id = seq_id
        self.sampling = request.sampling
        self.token_ids: list[int] = list(request.prompt_token_ids)
        self.prompt_len = len(self.token_ids)
        # stop generating at max_tokens new tokens or when the context is full
        self.max_len = min(self.prompt_len + self.sampling.max_tokens, max_len)
        self.logprobs: list[float] = []
        self.generator = generator
        self.status = Status.WAITING
        self.block_table: list[int] = []
        self.num_shared_blocks = 0
        self.cache_handle: int | None = None
        self.num_computed = 0
        self.num_scheduled = 0
        self.finish_reason: str | None = None
        self.stop_str: str | None = None

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.prompt_len

    def to_completion(self, text: str | None) -> Completion:
        assert self.finish_reason is not None
        return Completion(
            token_ids=list(self.token_ids),
            prompt_len=self.prompt_len,
            output_token_ids=self.token_ids[self.prompt_len :],
            output_logprobs=list(self.logprobs),
            finish_reason=self.finish_reason,
            stop_str=self.stop_str,
            text=text,
        )
