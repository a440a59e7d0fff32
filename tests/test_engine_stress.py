"""Random workloads on a small pool: forks, extends, sampled and greedy requests, tight budgets.

Whatever the scheduler does (eviction, preemption, chunked prefill), greedy outputs must equal those of an
engine with a pool big enough for everything at once, seeded samples must equal their runs there too, and no
block may leak or stay locked.
"""

from __future__ import annotations

import random

import pytest
from engine_helpers import one_thread  # noqa: F401  (autouse fixture)

from rexrag_fast.engine import EngineConfig, LLMEngine, Request, SamplingParams
from rexrag_fast.engine.loaders import tiny_model

VOCAB = 300


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", vocab_size=VOCAB, seed=31, max_position_embeddings=256)


def random_params(rng: random.Random) -> SamplingParams:
    if rng.random() < 0.5:
        return SamplingParams(temperature=0.0, max_tokens=rng.randint(1, 14), stop=())
    return SamplingParams(temperature=rng.choice([0.6, 1.0]), top_k=rng.choice([-1, 20]),
                          top_p=rng.choice([1.0, 0.9]), max_tokens=rng.randint(1, 14), stop=(),
                          seed=rng.randrange(1 << 30))


def check_clean(engine: LLMEngine) -> None:
    bm = engine.block_manager
    bm.cache.check_invariants()
    assert bm.cache.locked_blocks == 0
    assert bm.allocator.num_free + bm.cache.evictable_blocks == bm.allocator.num_blocks


@pytest.mark.parametrize("seed", range(12))
def test_random_workload_small_pool_equals_big_pool(model, seed):
    rng = random.Random(seed)
    block = rng.choice([2, 4, 8])
    # the longest request is 40 + 6 prompt + 14 new tokens: one sequence fits, a few do not
    small = LLMEngine(model, config=EngineConfig(num_blocks=rng.choice([64, 96, 128]) // block, block_size=block,
                                                 max_num_batched_tokens=rng.choice([8, 32, 256]),
                                                 max_num_seqs=rng.choice([2, 4, 8])))
    big = LLMEngine(model, config=EngineConfig(num_blocks=1024, block_size=4, enable_prefix_caching=False))
    completions = []
    for _ in range(3):  # rounds: new prompts, forks and extends of earlier completions
        reqs = []
        for _ in range(rng.randint(3, 7)):
            kind = rng.random() if completions else 0.0
            if kind < 0.4:
                tokens = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 30))]
                reqs.append(Request(tokens, random_params(rng)))
            elif kind < 0.7:
                c = rng.choice(completions)
                keep = rng.randint(1, min(len(c.token_ids), 40))
                reqs.append(small.fork(c, keep, [rng.randrange(VOCAB) for _ in range(rng.randint(0, 6))],
                                       random_params(rng)))
            else:
                c = rng.choice(completions)
                if len(c.token_ids) > 40:
                    continue
                reqs.append(small.extend(c, [rng.randrange(VOCAB) for _ in range(rng.randint(1, 6))],
                                         random_params(rng)))
        outs = small.generate(reqs)
        expected = big.generate(reqs)
        for r, o, e in zip(reqs, outs, expected):
            assert o.token_ids[: len(r.prompt_token_ids)] == r.prompt_token_ids
            assert o.output_token_ids == e.output_token_ids
            assert o.finish_reason == e.finish_reason
            assert o.output_logprobs == pytest.approx(e.output_logprobs, abs=1e-4)
        check_clean(small)
        completions += outs
    assert small.counters.cached_tokens > 0


@pytest.mark.parametrize("max_num_seqs,budget", [(1, 64), (3, 64), (3, 10), (8, 5)])
def test_batches_respect_max_num_seqs_and_token_budget(model, max_num_seqs, budget):
    engine = LLMEngine(model, config=EngineConfig(num_blocks=64, block_size=4, max_num_seqs=max_num_seqs,
                                                  max_num_batched_tokens=budget))
    schedule = engine.scheduler.schedule
    seen = []

    def observed():
        seqs, is_prefill = schedule()
        seen.append((len(engine.scheduler.running), sum(s.num_scheduled for s in seqs), is_prefill))
        return seqs, is_prefill

    engine.scheduler.schedule = observed
    rng = random.Random(max_num_seqs)
    reqs = [Request([rng.randrange(VOCAB) for _ in range(rng.randint(1, 20))],
                    SamplingParams(temperature=0.0, max_tokens=5, stop=())) for _ in range(8)]
    outs = engine.generate(reqs)
    assert all(len(o.output_token_ids) == 5 for o in outs)
    assert max(r for r, _, _ in seen) == min(max_num_seqs, budget)
    assert all(n <= budget for _, n, _ in seen)
