"""fork / extend: branches share the cached KV of their prefix and decode exactly like a from-scratch run."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import one_thread  # noqa: F401  (autouse fixture)

from rexrag_fast.engine import EngineConfig, LLMEngine, Request, SamplingParams
from rexrag_fast.engine.hf_reference import hf_greedy
from rexrag_fast.engine.loaders import tiny_model

VOCAB = 512
BLOCK = 8


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen2", vocab_size=VOCAB, seed=21)


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def sp(max_tokens: int = 10) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, stop=())


@pytest.mark.parametrize("keep", [8, 24, 29, 40, 45])
@pytest.mark.parametrize("n_append", [1, 20])
def test_fork_equals_scratch_and_skips_shared_blocks(model, keep, n_append):
    engine = LLMEngine(model, config=EngineConfig(num_blocks=64, block_size=BLOCK))
    parent = engine.generate([Request(tokens(27, seed=1), sp(20))])[0]  # 47 tokens, 46 computed
    engine.reset_counters()
    append = tokens(n_append, seed=2)
    req = engine.fork(parent, keep, append, sp())
    assert req.prompt_token_ids == parent.token_ids[:keep] + append
    child = engine.generate([req])[0]

    shared = keep // BLOCK * BLOCK  # full blocks of the kept prefix: all were computed by the parent
    assert engine.counters.cached_tokens == shared
    assert engine.counters.prefill_tokens == keep + n_append - shared
    scratch = LLMEngine(model, config=EngineConfig(num_blocks=64, block_size=BLOCK)).generate([req])[0]
    assert child.output_token_ids == scratch.output_token_ids == hf_greedy(model, req.prompt_token_ids, 10)


def test_many_probes_from_one_dead_end(model):
    """REX-RAG probe phase: N branches of one trajectory; the shared full blocks are computed once."""
    engine = LLMEngine(model, config=EngineConfig(num_blocks=128, block_size=BLOCK))
    dead_end = engine.generate([Request(tokens(60, seed=3), sp(16))])[0]  # 76 tokens
    engine.reset_counters()
    keep = 64
    probes = [engine.fork(dead_end, keep, tokens(20, seed=10 + i), sp(8)) for i in range(6)]
    outs = engine.generate(probes)
    assert engine.counters.cached_tokens == 6 * keep
    assert engine.counters.prefill_tokens == 6 * 20
    for req, out in zip(probes, outs):
        assert out.output_token_ids == hf_greedy(model, req.prompt_token_ids, 8)


def test_extend_multi_turn(model):
    """Agent loop: generate, append tool output, continue, twice; every turn reuses the previous turns."""
    engine = LLMEngine(model, config=EngineConfig(num_blocks=64, block_size=BLOCK))
    out = engine.generate([Request(tokens(13, seed=4), sp(9))])[0]
    for turn in range(2):
        engine.reset_counters()
        info = tokens(11, seed=5 + turn)
        req = engine.extend(out, info, sp(9))
        assert req.prompt_token_ids == out.token_ids + info
        computed = len(out.token_ids) - 1
        out = engine.generate([req])[0]
        assert engine.counters.cached_tokens == computed // BLOCK * BLOCK
        assert out.output_token_ids == hf_greedy(model, req.prompt_token_ids, 9)


def test_fork_keep_out_of_range(model):
    engine = LLMEngine(model, config=EngineConfig(num_blocks=16, block_size=BLOCK))
    parent = engine.generate([Request(tokens(5, seed=6), sp(3))])[0]
    for keep in (0, len(parent.token_ids) + 1):
        with pytest.raises(ValueError, match="keep_tokens"):
            engine.fork(parent, keep, [1, 2], sp())
