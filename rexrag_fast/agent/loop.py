"""The Search-R1 multi-turn rollout on the engine: reason, search, read, answer.

    trajectories = run_agent_loop(engine, retriever, items, AgentConfig(max_turns=4, topk=3))

`items` is a list whose entries are either prompt token ids [P] (a fresh trajectory is started) or
`Trajectory` objects that are not done (they are continued in place). All trajectories advance together,
one turn per step:

1. every running trajectory generates until `</search>`, `</answer>`, EOS, the per-turn token limit
   (`max_tokens_per_turn`) or the total budget (`max_response_tokens` tokens after the prompt); the
   engine's tokens and their log-probs are kept verbatim (no re-tokenisation of the text, so the
   behaviour log-probs belong to exactly the tokens the trainer sees);
2. the turn's text (decoded from the turn's start, special tokens skipped) is parsed with Search-R1's
   rule (`actions.parse_action`): an answer ends the trajectory; a search queues its query (an empty
   query too, as in Search-R1, unless `empty_query_invalid`); anything else is an invalid action;
3. the queries of all trajectories go to the retriever in ONE call, `retriever.retrieve(queries, topk)`;
   each result becomes "\\n\\n<information>{passages}</information>\\n\\n", tokenised and cut to
   `max_obs_tokens` tokens (as Search-R1 does, the cut may drop the closing tag), and an invalid action
   gets the invalid-action message (`AgentConfig.invalid_action_message`); both are appended and the next
   turn continues with `engine.extend`, so the KV of everything before is reused from the prefix cache.

Turns: as in Search-R1, `max_turns` turns may search; then one final turn runs with searching off.
By default (`force_answer=False`, the reference's rule) that final turn stops at the first complete
`</search>` or `</answer>`, like every turn: an answer counts, a search is not run and leaves the
trajectory without an answer (status "max_turns", reward 0), and nothing after the stop is generated, so
nothing after it is trained on. With `force_answer=True` (this project's variant) the final turn stops only
at `</answer>` (or EOS / limits) and the first answer in it counts, whatever the model wrote before it,
including a search and any <information> it invented.

Continuing from a fork point (REX-RAG probes). The REX-RAG sampler builds a started trajectory with

    probe = traj.fork(keep_tokens, explore_prompt_ids)     # Component.EXPLORE_PROMPT, in the loss mask

which keeps the first `keep_tokens` tokens, their components, log-probs and the closed turns (a turn cut
by the fork point is re-opened: its kept text, the explore prompt and what the model writes next are
parsed as one turn), appends the prompt tokens, and keeps `traj.completion`. Passing such trajectories to
`run_agent_loop` continues them for the remaining turns (`max_turns - len(turns)` searching turns, then
the final turn): the first request of a forked trajectory is `engine.fork(completion, n, rest, sp)`,
where n is the length of the common prefix with its completion, so the prefix KV is shared, not
recomputed. Log-probs of explore-prompt tokens are whatever the caller gave to `fork` (0 by default);
REX-RAG's probe log-probs are the caller's to fill.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rexrag_fast.agent.actions import STOP_STRINGS, Action, first_answer, parse_action
from rexrag_fast.agent.template import read_user_text
from rexrag_fast.agent.trajectory import Component, Trajectory
from rexrag_fast.engine import Request, SamplingParams
from rexrag_fast.retrieval import format_passages
from rexrag_fast.retrieval.retriever import Retriever

INFORMATION_TEMPLATE = "\n\n<information>{}</information>\n\n"
INVALID_ACTION_MESSAGE = (
    "\nThat was not a valid action: a search goes between <search> and </search>, a final answer between "
    "<answer> and </answer>. Trying again.\n"
)
"""The project's invalid-action observation (same tags as the protocol); a run can load its own text."""


def load_invalid_action_message(path: str) -> str:
    """The invalid-action observation read verbatim from the UTF-8 text file `path` (not empty)."""
    return read_user_text(path, "invalid-action message")


@dataclass(frozen=True)
class AgentConfig:
    """Limits and sampling of the agent loop (defaults: Search-R1's max_turns=4, topk=3,
    max_obs_length=500, per-generation max_response_length=500, max_prompt_length=4096).

    max_turns: turns that may search (Search-R1's max_turns); one final answer turn follows.
    topk: passages per query. max_obs_tokens: cap on one inserted observation.
    max_tokens_per_turn: new tokens per generation. max_response_tokens: all tokens after the prompt
        (generated and inserted); a trajectory that reaches it ends with status "length".
    temperature / top_p / top_k: sampling (temperature 0 = greedy). seed: None -> the engine's RNG;
        else request seeds derived from (seed, item index, turn, current length): reproducible runs.
    force_answer: False (default, the reference): the final turn stops at </search> or </answer> like any
        turn and a search there ends without an answer; True: it stops only at </answer>, any answer counts.
    empty_query_invalid: treat `<search></search>` as an invalid action (Search-R1 searches for "").
    """

    max_turns: int = 4
    topk: int = 3
    max_obs_tokens: int = 500
    max_tokens_per_turn: int = 500
    max_response_tokens: int = 4096
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    force_answer: bool = False
    empty_query_invalid: bool = False
    information_template: str = INFORMATION_TEMPLATE
    invalid_action_message: str = INVALID_ACTION_MESSAGE

    def __post_init__(self) -> None:
        for name in ("max_turns", "topk", "max_obs_tokens", "max_tokens_per_turn", "max_response_tokens"):
            value = getattr(self, name)
            min_value = 0 if name == "max_turns" else 1
            if not isinstance(value, int) or value < min_value:
                raise ValueError(f"AgentConfig.{name}: expected an int >= {min_value}, got {value!r}")
        if "{}" not in self.information_template:
            raise ValueError(f"AgentConfig.information_template needs a '{{}}' slot, got {self.information_template!r}")


def _common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def continue_request(engine: Any, traj: Trajectory, sampling: SamplingParams) -> Request:
    """The engine request that continues `traj`: extend its completion, fork from it, or a fresh prompt."""
    comp = traj.completion
    if comp is None:
        return Request(list(traj.token_ids), sampling)
    n = _common_prefix_len(comp.token_ids, traj.token_ids)
    rest = traj.token_ids[n:]
    if n == len(comp.token_ids) and rest:
        return engine.extend(comp, rest, sampling)
    if n == 0 or not rest:
        # nothing new to append (or nothing shared): a plain request still matches cached prefixes
        return Request(list(traj.token_ids), sampling)
    return engine.fork(comp, n, rest, sampling)


def _turn_seed(seed: int | None, index: int, turn: int, length: int) -> int | None:
    # the length separates a fork from the trajectory that sat at the same index and turn in another call
    if seed is None:
        return None
    return (seed * 1_000_003 + index * 7919 + turn * 104_729 + length) % (2**31 - 1)


def run_agent_loop(
    engine: Any,
    retriever: Retriever,
    items: Sequence[Trajectory | Sequence[int]],
    config: AgentConfig | None = None,
    *,
    tokenizer: Any = None,
    progress: bool = False,
) -> list[Trajectory]:
    """Run the Search-R1 turn loop for a batch (see the module docstring); returns [B] trajectories.

    engine: an LLMEngine (generate / extend / fork). retriever: anything with retrieve(queries, topk).
    items: [B] prompt token ids or started (not done) Trajectory objects, continued in place.
    tokenizer: defaults to engine.tokenizer; used to decode turns and encode observations.
    """
    config = config or AgentConfig()
    tokenizer = tokenizer if tokenizer is not None else getattr(engine, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("run_agent_loop needs a tokenizer (engine.tokenizer is None and none was passed)")
    trajs: list[Trajectory] = []
    for i, item in enumerate(items):
        if isinstance(item, Trajectory):
            if item.done:
                raise ValueError(f"items[{i}] is a finished trajectory (status {item.status!r}); fork it first")
            trajs.append(item)
        else:
            trajs.append(Trajectory.from_prompt(item))
    invalid_ids = tokenizer.encode(config.invalid_action_message, add_special_tokens=False)
    # the model's context (the engine refuses prompts that fill it): a trajectory that reaches it ends
    context = getattr(getattr(engine, "shape", None), "max_position_embeddings", None) or float("inf")

    while True:
        running = [(i, t) for i, t in enumerate(trajs) if not t.done]
        requests, stepping = [], []
        for i, t in running:
            budget = min(config.max_response_tokens - t.num_response_tokens, context - len(t))
            if budget <= 0:
                t.status = "length"
                continue
            final = len(t.turns) >= config.max_turns
            sampling = SamplingParams(
                temperature=config.temperature,
                top_p=config.top_p,
                top_k=config.top_k,
                max_tokens=min(config.max_tokens_per_turn, budget),
                stop=("</answer>",) if final and config.force_answer else STOP_STRINGS,
                seed=_turn_seed(config.seed, i, len(t.turns), len(t)),
            )
            requests.append(continue_request(engine, t, sampling))
            stepping.append((i, t, final))
        if not requests:
            break
        completions = engine.generate(requests, progress=progress)

        queries: list[str] = []
        searching: list[Trajectory] = []
        for (_i, t, final), comp in zip(stepping, completions):
            t.append(comp.output_token_ids, Component.RESPONSE, comp.output_logprobs)
            t.completion = comp
            text = tokenizer.decode(t.token_ids[t.turn_start :], skip_special_tokens=True)
            action = first_answer(text) if final and config.force_answer else parse_action(text)
            if action.kind == "search" and not action.content and config.empty_query_invalid:
                action = Action(kind=None)
            out_of_budget = t.num_response_tokens >= config.max_response_tokens or len(t) >= context
            if action.is_answer:
                t.close_turn("answer", action.content, comp.finish_reason)
                t.answer = action.content
                t.status = "answer"
            elif final:
                t.close_turn(action.kind, action.content, comp.finish_reason)
                t.status = "length" if out_of_budget else "max_turns"
            elif out_of_budget:
                t.close_turn(action.kind, action.content, comp.finish_reason)
                t.status = "length"
            elif action.is_search:
                t.close_turn("search", action.content, comp.finish_reason)
                t.num_searches += 1
                queries.append(action.content)
                searching.append(t)
            else:
                t.close_turn(None, "", comp.finish_reason)
                t.num_invalid += 1
                _append_observation(t, invalid_ids, Component.INVALID_MSG, config, context)

        if queries:
            results = retriever.retrieve(queries, topk=config.topk)
            if len(results) != len(queries):
                raise RuntimeError(f"retriever returned {len(results)} results for {len(queries)} queries")
            for t, result in zip(searching, results):
                obs = config.information_template.format(format_passages(result).strip())
                obs_ids = tokenizer.encode(obs, add_special_tokens=False)[: config.max_obs_tokens]
                _append_observation(t, obs_ids, Component.INFORMATION, config, context)
    return trajs


def _append_observation(
    t: Trajectory, ids: Sequence[int], component: Component, config: AgentConfig, context: float
) -> None:
    """Append an observation, cut to the remaining budget, and open the next turn after it."""
    budget = int(min(config.max_response_tokens - t.num_response_tokens, context - 1 - len(t)))
    t.append(list(ids)[: max(budget, 0)], component)
    t.open_turn()
    if t.num_response_tokens >= config.max_response_tokens or len(t) >= context - 1:
        t.status = "length"
