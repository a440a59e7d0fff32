"""The agent loop on the real engine (tiny random Qwen2 sharing SmolLM2's tokenizer) and the real in-process
retriever over a small embedded world. A random model writes garbage, so fresh prompts exercise the invalid-action
path; complete actions placed in explore prompts of forked trajectories (REX-RAG's continuation API) exercise the
search and answer paths deterministically."""

from __future__ import annotations

import pytest
import torch

from rexrag_fast.agent.loop import INVALID_ACTION_MESSAGE, AgentConfig, run_agent_loop
from rexrag_fast.agent.template import encode_prompt
from rexrag_fast.agent.trajectory import Component, Trajectory
from rexrag_fast.testing import assert_close


class CountingRetriever:
    """Forwards to the real retriever and records every call's queries."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.calls: list[list[str]] = []

    def retrieve(self, queries, topk=3, return_scores=True):
        self.calls.append(list(queries))
        return self.inner.retrieve(queries, topk=topk, return_scores=return_scores)


@pytest.fixture(scope="module")
def tokenizer():
    from rexrag_fast.engine.loaders import load_smollm2_tokenizer

    return load_smollm2_tokenizer()


def small_world(tmp_path_factory):
    """A small embedded world (~80 documents), shared by the agent test modules of one session with its index."""
    from rexrag_fast.data.world import generate_world

    wdir = tmp_path_factory.getbasetemp() / "agent-small-world"
    if not (wdir / "world.json").is_file():
        generate_world(n_countries=4, n_cities=12, n_companies=10, n_people=30, n_questions=40).save(wdir)
    return wdir


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return small_world(tmp_path_factory)


@pytest.fixture(scope="module")
def retriever(world):
    from rexrag_fast.retrieval import LocalRetriever

    return LocalRetriever.for_world(world)


@pytest.fixture(scope="module")
def model(tokenizer):
    from rexrag_fast.engine.loaders import tiny_model

    return tiny_model("qwen2", vocab_size=len(tokenizer), seed=0)


def make_engine(model, tokenizer):
    from rexrag_fast.engine import EngineConfig, LLMEngine

    return LLMEngine(model, tokenizer=tokenizer, config=EngineConfig(num_blocks=512, block_size=16,
                                                                     max_num_batched_tokens=2048, max_num_seqs=16))


def prompts(tokenizer, world, n):
    from rexrag_fast.data.datasets import load_world_split

    return [encode_prompt(ex.question, tokenizer) for ex in load_world_split("test", world)[:n]]


@torch.no_grad()
def check_logprobs(model, traj: Trajectory, temperature: float = 1.0) -> None:
    """Behaviour log-probs equal log softmax(logits / T) of a full forward over the final sequence."""
    ids = torch.tensor([traj.token_ids])
    logits = model(input_ids=ids).logits[0].float()
    lp = torch.log_softmax(logits[:-1] / temperature, dim=-1).gather(1, ids[0, 1:, None])[:, 0]
    comps = torch.tensor(traj.components[1:])
    resp = comps == Component.RESPONSE
    assert resp.any()
    got = torch.tensor(traj.logprobs[1:])
    assert_close(got[resp], lp[resp], torch.float32, atol=2e-4, rtol=1e-4, name="behaviour logprobs")
    assert (got[~resp] == 0).all()


def check_masks(traj: Trajectory, tokenizer, cfg: AgentConfig) -> None:
    traj.check()
    loss = torch.tensor(traj.loss_mask)
    comps = torch.tensor(traj.components)
    assert not loss[comps == Component.INFORMATION].any()
    assert not loss[comps == Component.INVALID_MSG].any()
    assert not loss[: traj.prompt_len].any()
    # each inserted block decodes to the text the loop inserted
    runs, start = [], traj.prompt_len
    for i in range(traj.prompt_len + 1, len(traj) + 1):
        if i == len(traj) or traj.components[i] != traj.components[start]:
            runs.append((traj.components[start], start, i))
            start = i
    for comp, a, b in runs:
        text = tokenizer.decode(traj.token_ids[a:b])
        if comp == Component.INVALID_MSG:
            assert text == INVALID_ACTION_MESSAGE[: len(text)]
        elif comp == Component.INFORMATION:
            assert text.startswith("\n\n<information>Doc 1(Title: ")
            assert b - a <= cfg.max_obs_tokens
    # turns cover exactly the loss-masked tokens plus nothing else
    covered = torch.zeros(len(traj), dtype=torch.bool)
    for t in traj.turns:
        covered[t.start : t.end] = True
    assert torch.equal(covered, loss)


def test_fresh_prompts_invalid_path(model, tokenizer, world, retriever):
    engine = make_engine(model, tokenizer)
    counting = CountingRetriever(retriever)
    cfg = AgentConfig(max_turns=2, max_tokens_per_turn=4, max_obs_tokens=48, seed=3)
    trajs = run_agent_loop(engine, counting, prompts(tokenizer, world, 2), cfg)
    assert len(trajs) == 2
    for t in trajs:
        assert t.done
        # garbage never forms an action: max_turns invalid turns, then the final turn, then stop
        assert t.status == "max_turns" and t.answer is None
        assert len(t.turns) == cfg.max_turns + 1
        assert [x.action for x in t.turns] == [None] * 3
        assert t.num_invalid == cfg.max_turns
        assert all(x.end - x.start <= cfg.max_tokens_per_turn for x in t.turns)
        check_masks(t, tokenizer, cfg)
        check_logprobs(model, t)
    assert counting.calls == []
    # turns 2.. continued with engine.extend: the previous turns' full blocks came from the prefix cache
    assert engine.counters.cached_tokens > 0


def test_seeded_loop_is_reproducible(model, tokenizer, world, retriever):
    cfg = AgentConfig(max_turns=1, max_tokens_per_turn=4, seed=11)
    p = prompts(tokenizer, world, 1)
    a = run_agent_loop(make_engine(model, tokenizer), retriever, p, cfg)
    b = run_agent_loop(make_engine(model, tokenizer), retriever, p, cfg)
    assert a[0].token_ids == b[0].token_ids and a[0].logprobs == b[0].logprobs
    c = run_agent_loop(make_engine(model, tokenizer), retriever, p, AgentConfig(max_turns=1, max_tokens_per_turn=4,
                                                                                seed=12))
    assert c[0].token_ids != a[0].token_ids


def _forked(tokenizer, world, engine, texts, cfg):
    """Finished garbage trajectories, forked right after the prompt with `texts` as explore prompts."""
    base = run_agent_loop(engine, None, prompts(tokenizer, world, len(texts)),
                          AgentConfig(max_turns=0, max_tokens_per_turn=2, seed=0))
    out = []
    for t, text in zip(base, texts):
        ids = tokenizer.encode(text, add_special_tokens=False)
        out.append(t.fork(t.prompt_len, ids, meta={"text": text}))
    return base, out


def test_forked_search_and_answer_paths(model, tokenizer, world, retriever):
    engine = make_engine(model, tokenizer)
    counting = CountingRetriever(retriever)
    texts = [
        "<think>who is it</think><search> Gamir born</search>",
        "<search>company headquarters</search>",
        "<answer> Hetrind </answer>",
    ]
    base, forked = _forked(tokenizer, world, engine, texts, AgentConfig())
    cfg = AgentConfig(max_turns=2, max_tokens_per_turn=3, max_obs_tokens=40, topk=2, seed=1)
    engine.reset_counters()
    out = run_agent_loop(engine, counting, forked, cfg)
    assert [o is f for o, f in zip(out, forked)] == [True, True, True]  # continued in place
    # one retrieval call for turn 1 with both queries batched; later turns are garbage (no further calls)
    assert counting.calls == [["Gamir born", "company headquarters"]]
    s1, s2, ans = out
    assert ans.status == "answer" and ans.answer == "Hetrind" and len(ans.turns) == 1
    assert ans.turns[0].action == "answer"
    for t in (s1, s2):
        assert t.turns[0].action == "search" and t.num_searches == 1
        assert t.status == "max_turns" and len(t.turns) == cfg.max_turns + 1
        check_masks(t, tokenizer, cfg)
        comps = torch.tensor(t.components)
        assert (comps == Component.INFORMATION).sum() == 40  # cut to max_obs_tokens
        assert (comps == Component.EXPLORE_PROMPT).sum() > 0
        check_logprobs(model, t)
    # the explore prompt and the garbage generated after it form the first turn; it is in the loss mask
    first = s1.turns[0]
    assert first.start == s1.prompt_len
    assert all(s1.loss_mask[first.start : first.end])
    # the forked branches reused the prompt's KV from the finished base trajectories
    assert engine.counters.cached_tokens >= sum((f.prompt_len // 16) * 16 for f in forked)


def test_total_budget_and_validation(model, tokenizer, world, retriever):
    engine = make_engine(model, tokenizer)
    cfg = AgentConfig(max_turns=3, max_tokens_per_turn=8, max_response_tokens=20, seed=2)
    trajs = run_agent_loop(engine, retriever, prompts(tokenizer, world, 2), cfg)
    for t in trajs:
        assert t.status == "length"
        assert t.num_response_tokens <= cfg.max_response_tokens
        t.check()
    with pytest.raises(ValueError, match="finished trajectory"):
        run_agent_loop(engine, retriever, trajs, cfg)
    with pytest.raises(ValueError, match="max_turns"):
        AgentConfig(max_turns=-1)
    with pytest.raises(ValueError, match="information_template"):
        AgentConfig(information_template="none")


@pytest.mark.slow
def test_smollm2_on_world(tokenizer, world, retriever):
    """The real SmolLM2-135M-Instruct, greedy: bookkeeping and log-probs hold whatever it writes."""
    from rexrag_fast.agent.reward import batch_scores
    from rexrag_fast.data.datasets import load_world_split
    from rexrag_fast.engine.loaders import load_smollm2

    model, tok = load_smollm2()
    engine = make_engine(model, tok)
    counting = CountingRetriever(retriever)
    examples = load_world_split("test", world)[:3]
    cfg = AgentConfig(max_turns=2, max_tokens_per_turn=48, max_obs_tokens=96, temperature=0.0)
    trajs = run_agent_loop(engine, counting, [encode_prompt(e.question, tok) for e in examples], cfg)
    for t in trajs:
        assert t.done and len(t.turns) <= cfg.max_turns + 1
        check_masks(t, tok, cfg)
        check_logprobs(model, t)
    # at most one retrieval call per searching turn, each batching every search of that turn
    assert len(counting.calls) <= cfg.max_turns
    searches = sum(t.num_searches for t in trajs)
    assert sum(len(c) for c in counting.calls) == searches
    scores = batch_scores([t.answer for t in trajs], [e.golden_answers for e in examples])
    assert len(scores["em"]) == 3


class ScriptedPolicy:
    """An engine whose turns are scripted texts (per prompt), for exact multi-turn paths; records each request.

    generate/extend/fork follow LLMEngine's contract: completions in request order, the stop string kept in the
    output, max_tokens honoured, extend/fork build requests on the completion's tokens.
    """

    def __init__(self, tokenizer, scripts: dict[tuple[int, ...], list[str]]) -> None:
        self.tokenizer = tokenizer
        self.scripts = scripts
        self.calls: dict[tuple[int, ...], int] = {p: 0 for p in scripts}
        self.requests = []
        self.generate_calls = 0

    def _script_for(self, ids):
        for p in self.scripts:
            if tuple(ids[: len(p)]) == p:
                return p
        raise AssertionError("request does not continue any scripted prompt")

    def generate(self, requests, progress=False):
        from rexrag_fast.engine import Completion

        self.generate_calls += 1
        out = []
        for r in requests:
            self.requests.append(r)
            p = self._script_for(r.prompt_token_ids)
            text = self.scripts[p][self.calls[p]]
            self.calls[p] += 1
            stop_str = None
            for s in r.sampling.stop:  # cut at the earliest stop string, keeping it
                i = text.find(s)
                if i >= 0 and (stop_str is None or i + len(s) < len(text)):
                    text, stop_str = text[: i + len(s)], s
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            reason = "stop" if stop_str else "eos"
            if len(ids) > r.sampling.max_tokens:
                ids, reason, stop_str = ids[: r.sampling.max_tokens], "length", None
            lps = [-0.01 * (k + 1) for k in range(len(ids))]
            out.append(Completion(list(r.prompt_token_ids) + ids, len(r.prompt_token_ids), ids, lps, reason,
                                  stop_str, self.tokenizer.decode(ids)))
        return out

    def extend(self, completion, new_token_ids, sampling):
        from rexrag_fast.engine import Request

        return Request(list(completion.token_ids) + list(new_token_ids), sampling)

    def fork(self, completion, keep_tokens, append_token_ids, sampling):
        from rexrag_fast.engine import Request

        return Request(list(completion.token_ids[:keep_tokens]) + list(append_token_ids), sampling)


@pytest.mark.parametrize("force_answer", [False, True], ids=["reference-final-turn", "force-answer"])
def test_scripted_multi_turn_paths(tokenizer, world, retriever, force_answer):
    p = [tuple(x) for x in prompts(tokenizer, world, 4)]
    scripts = {
        # search, search, answer
        p[0]: ["<think>a</think><search> Gamir </search> ignored", "<search>city</search>", "<answer> X </answer>"],
        # invalid, search, then the final turn: a search there is not run; by default (the reference) the
        # turn stops at </search> and has no answer; with force_answer it runs on and the answer counts
        p[1]: ["no action", "<search>b</search>", "<search>c</search> no <answer>Y</answer>"],
        # answers at once; text after the answer's closing tag is cut by the stop string
        p[2]: ["<answer>Z</answer> trailing"],
        # never answers: ends with max_turns
        p[3]: ["x", "y", "<search>z</search>"],
    }
    engine = ScriptedPolicy(tokenizer, scripts)
    counting = CountingRetriever(retriever)
    cfg = AgentConfig(max_turns=2, max_tokens_per_turn=50, max_obs_tokens=30, topk=1, force_answer=force_answer)
    t0, t1, t2, t3 = run_agent_loop(engine, counting, [list(x) for x in p], cfg)
    # one retrieval per searching turn, batched across trajectories, in item order
    assert counting.calls == [["Gamir"], ["city", "b"]]
    assert engine.generate_calls == 3
    assert (t0.status, t0.answer, [x.action for x in t0.turns]) == ("answer", "X", ["search", "search", "answer"])
    if force_answer:
        assert (t1.status, t1.answer, [x.action for x in t1.turns]) == ("answer", "Y", [None, "search", "answer"])
    else:
        assert (t1.status, t1.answer, [x.action for x in t1.turns]) == ("max_turns", None, [None, "search", "search"])
        # the cut: the final turn's text ends at the first </search>; nothing after it was generated
        last = t1.turns[-1]
        assert tokenizer.decode(t1.token_ids[last.start:last.end]) == "<search>c</search>"
        assert last.end == len(t1)
    assert (t2.status, t2.answer, len(t2.turns)) == ("answer", "Z", 1)
    assert tokenizer.decode(t2.token_ids[t2.turns[0].start:t2.turns[0].end]) == "<answer>Z</answer>"
    final_action = None if force_answer else "search"
    assert (t3.status, t3.answer, [x.action for x in t3.turns]) == ("max_turns", None, [None, None, final_action])
    assert t3.num_invalid == 2 and t1.num_invalid == 1 and t0.num_searches == 2
    # stop strings: both tags before the final turn; in it only </answer> with force_answer, else both
    stops = [r.sampling.stop for r in engine.requests]
    n_final = 3 if force_answer else 0  # t0, t1, t3 reached the final turn
    assert stops.count(("</answer>",)) == n_final
    assert stops.count(("</search>", "</answer>")) == len(stops) - n_final
    for t in (t0, t1, t2, t3):
        check_masks(t, tokenizer, cfg)
        # scripted log-probs are kept on exactly the generated tokens
        resp = [lp for lp, c in zip(t.logprobs, t.components) if c == Component.RESPONSE]
        assert all(lp < 0 for lp in resp)
    # each of t0's two observations (a whole passage is longer than 30 tokens) is cut to max_obs_tokens
    info = [tok for tok, c in zip(t0.token_ids, t0.components) if c == Component.INFORMATION]
    assert len(info) == 2 * cfg.max_obs_tokens


def test_scripted_budget_caps_max_tokens(tokenizer, world, retriever):
    p = tuple(prompts(tokenizer, world, 1)[0])
    engine = ScriptedPolicy(tokenizer, {p: ["<search>a</search>", "word " * 40]})
    cfg = AgentConfig(max_turns=3, max_tokens_per_turn=30, max_obs_tokens=20, max_response_tokens=40)
    (t,) = run_agent_loop(engine, retriever, [list(p)], cfg)
    first = tokenizer.encode("<search>a</search>", add_special_tokens=False)
    # turn 2 may use only what is left of the 40-token budget after turn 1 and its 20-token observation
    assert engine.requests[1].sampling.max_tokens == 40 - len(first) - 20
    assert t.status == "length" and t.num_response_tokens == 40
