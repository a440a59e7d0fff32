"""Rollout engine vs transformers: greedy tokens, log-probs, prefix reuse, preemption, chunked prefill."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import one_thread  # noqa: F401  (autouse fixture)

from rexrag_fast.engine import EngineConfig, LLMEngine, Request, SamplingParams
from rexrag_fast.engine.hf_reference import hf_greedy, hf_logprobs
from rexrag_fast.engine.loaders import tiny_model
from rexrag_fast.testing import assert_close

VOCAB = 512
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, stop=())


def prompts_of(lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def qwen():
    return tiny_model("qwen2", vocab_size=VOCAB, seed=0)


@pytest.mark.parametrize("arch,tied", [("qwen2", True), ("llama", False)])
@pytest.mark.parametrize("block_size", [4, 16])
def test_greedy_batch_matches_transformers(arch, tied, block_size):
    model = tiny_model(arch, vocab_size=VOCAB, seed=1, tie_word_embeddings=tied)
    prompts = prompts_of([1, 5, 16, 23, 40])
    engine = LLMEngine(model, config=EngineConfig(num_blocks=64, block_size=block_size))
    outs = engine.generate([Request(p, GREEDY) for p in prompts])
    for p, out in zip(prompts, outs):
        assert out.token_ids[: len(p)] == p and out.prompt_len == len(p)
        assert out.output_token_ids == hf_greedy(model, p, GREEDY.max_tokens)
        assert out.finish_reason == "length"
        assert len(out.output_logprobs) == len(out.output_token_ids)
    assert engine.counters.prompt_tokens == sum(map(len, prompts))
    assert engine.counters.prefill_tokens == sum(map(len, prompts))
    assert engine.counters.generated_tokens == GREEDY.max_tokens * len(prompts)


@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.3])
def test_logprobs_match_full_forward(qwen, temperature):
    prompts = prompts_of([7, 19, 33], seed=3)
    sp = SamplingParams(temperature=temperature, max_tokens=10, stop=(), seed=5)
    engine = LLMEngine(qwen, config=EngineConfig(num_blocks=32, block_size=8))
    for p, out in zip(prompts, engine.generate([Request(p, sp) for p in prompts])):
        expected = hf_logprobs(qwen, out.token_ids, len(p), temperature or 1.0)
        assert_close(torch.tensor(out.output_logprobs), expected, torch.float32, name="output_logprobs")


def test_prefix_reuse_keeps_greedy_tokens(qwen):
    """Second round: prompts extending the first round's completions reuse their cached full blocks."""
    engine = LLMEngine(qwen, config=EngineConfig(num_blocks=96, block_size=4))
    first = engine.generate([Request(p, GREEDY) for p in prompts_of([6, 13, 21], seed=4)])
    engine.reset_counters()
    tails = prompts_of([3, 9, 1], seed=5)
    reqs = [engine.extend(c, t, GREEDY) for c, t in zip(first, tails)]
    outs = engine.generate(reqs)
    for req, out in zip(reqs, outs):
        assert out.output_token_ids == hf_greedy(qwen, req.prompt_token_ids, GREEDY.max_tokens)
    # each first-round completion had len - 1 tokens computed; their full blocks are reused
    expected_cached = sum((len(c.token_ids) - 1) // 4 * 4 for c in first)
    assert engine.counters.cached_tokens == expected_cached
    assert engine.counters.prefill_tokens == sum(len(r.prompt_token_ids) for r in reqs) - expected_cached


def test_shared_prompt_prefix_in_one_batch(qwen):
    """Requests submitted together that share a prefix: the later ones reuse what earlier ones cached."""
    base = prompts_of([24], seed=6)[0]
    engine = LLMEngine(qwen, config=EngineConfig(num_blocks=64, block_size=8, max_num_seqs=1))
    prompts = [base + t for t in prompts_of([2, 5, 9], seed=7)]
    outs = engine.generate([Request(p, GREEDY) for p in prompts])
    for p, out in zip(prompts, outs):
        assert out.output_token_ids == hf_greedy(qwen, p, GREEDY.max_tokens)
    assert engine.counters.cached_tokens == 2 * 24  # max_num_seqs=1: each later one finds the first's 3 blocks


def test_shared_prefix_in_one_batch_is_computed_once(qwen):
    """Running sequences publish their prefilled blocks: of requests submitted together on one 40-token
    prefix, the first prefills it and the others are admitted one step later onto its cached blocks, whose KV
    every decode step then reads once for all of them."""
    base = prompts_of([40], seed=8)[0]
    engine = LLMEngine(qwen, config=EngineConfig(num_blocks=64, block_size=8))
    prompts = [base + t for t in prompts_of([3, 6, 11, 1], seed=9)]
    outs = engine.generate([Request(p, GREEDY) for p in prompts])
    for p, out in zip(prompts, outs):
        assert out.output_token_ids == hf_greedy(qwen, p, GREEDY.max_tokens)
    assert engine.counters.cached_tokens == 3 * 40
    assert engine.counters.prefill_tokens == sum(map(len, prompts)) - 3 * 40
    assert engine.runner.decode_kv_blocks_saved > 0
    engine.block_manager.cache.check_invariants()
    assert engine.block_manager.allocator.num_free + engine.block_manager.cache.evictable_blocks == 64


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_preemption_under_small_pool(qwen, prefix_caching):
    prompts = prompts_of([5, 9, 14, 3, 11, 7], seed=8)
    sp = SamplingParams(temperature=0.0, max_tokens=20, stop=())
    # each sequence needs up to ceil(34 / 4) = 9 blocks; 6 of them never fit in 12 blocks at once
    engine = LLMEngine(qwen, config=EngineConfig(num_blocks=12, block_size=4,
                                                 enable_prefix_caching=prefix_caching))
    outs = engine.generate([Request(p, sp) for p in prompts])
    assert engine.counters.preemptions > 0
    for p, out in zip(prompts, outs):
        assert out.output_token_ids == hf_greedy(qwen, p, sp.max_tokens)
        assert_close(torch.tensor(out.output_logprobs), hf_logprobs(qwen, out.token_ids, len(p)),
                     torch.float32, name="logprobs after preemption")
    allocator = engine.block_manager.allocator
    cache = engine.block_manager.cache
    cache.check_invariants()
    assert cache.locked_blocks == 0
    assert allocator.num_free + cache.evictable_blocks == allocator.num_blocks  # nothing leaked


def test_chunked_prefill_and_token_budget(qwen):
    prompts = prompts_of([37, 4, 50], seed=9)
    engine = LLMEngine(qwen, config=EngineConfig(num_blocks=64, block_size=8, max_num_batched_tokens=16))
    outs = engine.generate([Request(p, GREEDY) for p in prompts])
    for p, out in zip(prompts, outs):
        assert out.output_token_ids == hf_greedy(qwen, p, GREEDY.max_tokens)


def test_context_limit_finishes_with_length():
    model = tiny_model("qwen2", vocab_size=VOCAB, seed=2, max_position_embeddings=24)
    engine = LLMEngine(model, config=EngineConfig(num_blocks=16, block_size=4))
    out = engine.generate([Request(prompts_of([20])[0], SamplingParams(temperature=0, max_tokens=50, stop=()))])[0]
    assert len(out.token_ids) == 24 and out.finish_reason == "length"


def test_update_weights_in_place_and_new_namespace(qwen):
    other = tiny_model("qwen2", vocab_size=VOCAB, seed=11)
    engine = LLMEngine(qwen, config=EngineConfig(num_blocks=32, block_size=4))
    prompt = prompts_of([18], seed=12)[0]
    engine.generate([Request(prompt, GREEDY)])
    pool = engine.runner.kv.data
    engine.reset_counters()
    engine.update_weights(other.state_dict())
    assert engine.runner.kv.data is pool and engine.weights_version == 1
    out = engine.generate([Request(prompt, GREEDY)])[0]
    assert engine.counters.cached_tokens == 0  # the old weights' KV is never reused
    assert out.output_token_ids == hf_greedy(other, prompt, GREEDY.max_tokens)
    engine.update_weights(qwen)
    assert engine.generate([Request(prompt, GREEDY)])[0].output_token_ids == hf_greedy(qwen, prompt, 12)


def test_state_dict_with_model_config(qwen):
    engine = LLMEngine(qwen.state_dict(), model_config=qwen.config, config=EngineConfig(num_blocks=16))
    prompt = prompts_of([9], seed=13)[0]
    assert engine.generate([Request(prompt, GREEDY)])[0].output_token_ids == hf_greedy(qwen, prompt, 12)


def test_load_weights_from_a_stream_of_named_tensors(qwen):
    """The trainer's weight sync: (name, tensor) pairs one at a time, tied lm_head absent."""
    other = tiny_model("qwen2", vocab_size=VOCAB, seed=14)
    engine = LLMEngine(qwen, config=EngineConfig(num_blocks=32, block_size=4))
    prompt = prompts_of([10], seed=15)[0]
    engine.load_weights((name, p.detach().clone()) for name, p in other.named_parameters())
    assert engine.generate([Request(prompt, GREEDY)])[0].output_token_ids == hf_greedy(other, prompt, 12)
    partial = ((n, p) for n, p in qwen.named_parameters() if "layers.1." not in n)
    with pytest.raises(KeyError, match="lacked"):
        engine.load_weights(partial)
    assert engine.weights_version == 2  # bumped even by the failed update: no stale KV reuse


@pytest.mark.parametrize("dtype,atol", [(torch.float16, 0.05), (torch.bfloat16, 0.3)])
def test_half_precision_pool_and_weights(qwen, dtype, atol):
    """16-bit weights and KV: the log-probs of the tokens it chose stay near the fp32 model's."""
    engine = LLMEngine(qwen, config=EngineConfig(num_blocks=32, block_size=8, dtype=dtype))
    assert engine.runner.kv.data.dtype == dtype
    prompts = prompts_of([12, 30], seed=16)
    outs = engine.generate([Request(p, GREEDY) for p in prompts], progress=True)
    for p, out in zip(prompts, outs):
        assert len(out.output_token_ids) == GREEDY.max_tokens
        assert_close(torch.tensor(out.output_logprobs), hf_logprobs(qwen, out.token_ids, len(p)),
                     atol=atol, rtol=0.0, name=f"{dtype} log-probs")


def test_cpp_backend_reads_shared_cached_prefixes(qwen):
    """The C++ kernel is the CPU default; with 4 requests on one cached 40-token prefix, the decode steps read
    its full blocks once for all of them, and the greedy tokens stay those of transformers (fp32)."""
    engine = LLMEngine(qwen, config=EngineConfig(num_blocks=64, block_size=8))
    assert engine.runner.backend == "cpp"
    prefix = prompts_of([40], seed=21)[0]
    prompts = [prefix + tail for tail in prompts_of([3, 9, 1, 14], seed=22)]
    engine.generate([Request(prefix + [1], GREEDY)])  # caches the prefix's 5 full blocks
    outs = engine.generate([Request(p, GREEDY) for p in prompts])
    assert engine.runner.decode_kv_blocks_saved > 0
    for p, out in zip(prompts, outs):
        assert out.output_token_ids == hf_greedy(qwen, p, GREEDY.max_tokens)


def test_bf16_update_weights_refreshes_packed_matmul_weights(qwen):
    """In bf16 on a CPU with oneDNN bf16 the matmuls read packed copies: a weight update must reach them."""
    other = tiny_model("qwen2", vocab_size=VOCAB, seed=1)
    cfg = EngineConfig(num_blocks=16, block_size=8, dtype=torch.bfloat16)
    engine, fresh = LLMEngine(qwen, config=cfg), LLMEngine(other, config=cfg)
    engine.update_weights(other)
    prompt = prompts_of([13], seed=24)[0]
    got, want = (e.generate([Request(prompt, GREEDY)])[0] for e in (engine, fresh))
    assert got.output_token_ids == want.output_token_ids and got.output_logprobs == want.output_logprobs


def test_auto_dtype_follows_the_cpu(qwen):
    from rexrag_fast.engine.config import cpu_has_native_bf16

    engine = LLMEngine(qwen, config=EngineConfig(num_blocks=16, block_size=8, dtype="auto"))
    expected = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    assert engine.runner.dtype == expected and engine.runner.kv.data.dtype == expected
    out = engine.generate([Request(prompts_of([10], seed=23)[0], GREEDY)])[0]
    assert len(out.output_logprobs) == GREEDY.max_tokens


@pytest.mark.gpu
def test_cuda_greedy_matches_transformers():
    model = tiny_model("qwen2", vocab_size=VOCAB, seed=0).cuda()
    engine = LLMEngine(model, config=EngineConfig(num_blocks=16, block_size=16, dtype=torch.float32))
    assert engine.runner.backend == "torch" and engine.runner.kv.data.is_cuda
    prompts = prompts_of([3, 17, 40], seed=17)
    first = engine.generate([Request(p, GREEDY) for p in prompts])
    for p, out in zip(prompts, first):
        assert out.output_token_ids == hf_greedy(model, p, GREEDY.max_tokens)
    forks = [engine.fork(c, len(c.token_ids) - 3, [7, 8, 9], GREEDY) for c in first]
    for req, out in zip(forks, engine.generate(forks)):
        assert out.output_token_ids == hf_greedy(model, req.prompt_token_ids, GREEDY.max_tokens)


@pytest.mark.gpu
def test_cuda_flash_attn_backend():
    """flash-attn runs in bf16 with 256-token pages: its log-probs match the fp32 model's within bf16 error."""
    pytest.importorskip("flash_attn")
    model = tiny_model("qwen2", vocab_size=VOCAB, seed=0).cuda()
    engine = LLMEngine(model, config=EngineConfig(num_blocks=8, block_size=256, dtype=torch.bfloat16,
                                                  attention_backend="flash_attn"))
    assert engine.runner.backend == "flash_attn"
    prompts = prompts_of([3, 17, 300], seed=17)
    first = engine.generate([Request(p, GREEDY) for p in prompts])
    forks = [engine.fork(c, len(c.token_ids) - 3, [7, 8, 9], GREEDY) for c in first]
    engine.reset_counters()
    outs = engine.generate(forks)
    assert engine.counters.cached_tokens == 256  # the one full page of the 300-token prompt
    for req, out in zip(forks + [Request(p, GREEDY) for p in prompts], outs + first):
        expected = hf_logprobs(model, out.token_ids, len(req.prompt_token_ids))
        assert_close(torch.tensor(out.output_logprobs), expected, atol=0.3, rtol=0.0, name="flash-attn log-probs")
