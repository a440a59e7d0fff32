"""rexrag_fast/engine/cuda_graphs.py: buckets, padding, and a real decode forward through the padded path.

The padded path runs eagerly on a CPU (the same code path as a replay, minus the graph); the capture itself
runs only on a GPU machine (gpu mark).
"""

from __future__ import annotations

import pytest
import torch
from engine_helpers import one_thread  # noqa: F401  (autouse fixture)
from rexrag_fast.kernels.paged_attention import paged_decode_attention

from rexrag_fast.engine.attention import AttentionMetadata, write_kv
from rexrag_fast.engine.cuda_graphs import DecodeGraphRunner, DecodeInputs, bucket_for, bucket_sizes
from rexrag_fast.engine.loaders import tiny_model
from rexrag_fast.engine.model_runner import ModelRunner
from rexrag_fast.testing import assert_close, tolerance

VOCAB = 256
BLOCK_SIZE = 4
NUM_BLOCKS = 40
PAD_SLOT = (NUM_BLOCKS - 1) * BLOCK_SIZE  # the last block is kept out of every block table


def test_bucket_sizes():
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(6) == [1, 2, 4, 6]
    assert bucket_sizes(8) == [1, 2, 4, 8]
    assert bucket_sizes(40) == [1, 2, 4, 8, 16, 32, 40]
    assert bucket_sizes(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    with pytest.raises(ValueError, match="max_batch: expected >= 1, got 0"):
        bucket_sizes(0)


def test_bucket_for():
    buckets = bucket_sizes(40)
    assert [bucket_for(b, buckets) for b in (1, 2, 3, 5, 8, 9, 16, 17, 33, 40)] == [1, 2, 4, 8, 8, 16, 16, 32, 40, 40]
    assert bucket_for(41, buckets) is None


def test_fill_copies_rows_and_pads_the_rest():
    inputs = DecodeInputs.allocate(8, 5, torch.device("cpu"))
    inputs.block_tables.fill_(77)  # stale values of an earlier, wider step
    tables = torch.tensor([[3, 1], [2, 0], [4, 6]], dtype=torch.int32)
    inputs.fill(torch.tensor([11, 12, 13]), torch.tensor([5, 6, 7]), torch.tensor([13, 9, 17]), tables,
                torch.tensor([6, 7, 8], dtype=torch.int32), padded=4, pad_slot=99)
    ids, pos, slots, tab, lens = inputs.rows(4)
    assert ids.tolist() == [11, 12, 13, 0]
    assert pos.tolist() == [5, 6, 7, 0]
    assert slots.tolist() == [13, 9, 17, 99]
    assert tab.tolist() == [[3, 1, 0, 0, 0], [2, 0, 0, 0, 0], [4, 6, 0, 0, 0], [0, 0, 0, 0, 0]]
    assert lens.tolist() == [6, 7, 8, 0]
    assert inputs.block_tables[4:].eq(77).all()  # rows past the bucket are not touched


def test_runner_argument_errors():
    with pytest.raises(ValueError, match="max_blocks: expected >= 1"):
        DecodeGraphRunner(lambda *a: a[0], max_batch=4, max_blocks=0, pad_slot=0, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="pad_slot: expected a KV-pool slot >= 0"):
        DecodeGraphRunner(lambda *a: a[0], max_batch=4, max_blocks=2, pad_slot=-1, device=torch.device("cpu"))
    runner = DecodeGraphRunner(lambda *a: a[0], max_batch=4, max_blocks=2, pad_slot=0, device=torch.device("cpu"))
    with pytest.raises(RuntimeError, match="CUDA graphs need a CUDA device"):
        runner.capture()


def make_runner(device: torch.device, dtype: torch.dtype, backend: str = "torch") -> ModelRunner:
    model = tiny_model("qwen2", vocab_size=VOCAB, seed=3)
    return ModelRunner(model, model.config, num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE, device=device,
                       dtype=dtype, attention_backend=backend)


def decode_forward(runner: ModelRunner):
    """The DecodeForward of a ModelRunner: logits of every row."""
    rows = torch.arange(64, device=runner.device)

    def forward(input_ids, positions, slot_mapping, block_tables, context_lens):
        meta = AttentionMetadata(is_prefill=False, slot_mapping=slot_mapping, block_tables=block_tables,
                                 context_lens=context_lens)
        return runner.forward(input_ids, positions, meta, rows[:input_ids.shape[0]])

    return forward


def decode_batch(contexts: list[int], device: torch.device) -> tuple[torch.Tensor, ...]:
    """One decode step: sequence i holds contexts[i] - 1 cached keys in its own blocks, its new token is last."""
    tables, slots, block = [], [], 0
    width = max(-(-c // BLOCK_SIZE) for c in contexts)
    for c in contexts:
        n = -(-c // BLOCK_SIZE)
        ids = list(range(block, block + n))
        block += n
        tables.append(ids + [0] * (width - n))
        slots.append(ids[(c - 1) // BLOCK_SIZE] * BLOCK_SIZE + (c - 1) % BLOCK_SIZE)
    assert block < NUM_BLOCKS - 1
    g = torch.Generator().manual_seed(len(contexts))
    return (torch.randint(0, VOCAB, (len(contexts),), generator=g).to(device),
            torch.tensor([c - 1 for c in contexts], device=device),
            torch.tensor(slots, device=device),
            torch.tensor(tables, dtype=torch.int32, device=device),
            torch.tensor(contexts, dtype=torch.int32, device=device))


def fill_pool(runner: ModelRunner) -> None:
    g = torch.Generator().manual_seed(0)
    runner.kv.data.copy_(torch.randn(runner.kv.data.shape, generator=g).to(runner.kv.data.dtype))


@pytest.mark.parametrize("contexts", [[5], [3, 9, 14], [1, 2, 3, 4, 5, 6, 7, 8, 9]])
def test_padded_decode_matches_unpadded_forward(contexts):
    device = torch.device("cpu")
    model_runner = make_runner(device, torch.float32)
    forward = decode_forward(model_runner)
    batch = decode_batch(contexts, device)
    fill_pool(model_runner)
    initial = model_runner.kv.data.clone()
    expected = forward(*batch)
    pool_eager = model_runner.kv.data.clone()

    fill_pool(model_runner)
    graphs = DecodeGraphRunner(forward, max_batch=16, max_blocks=6, pad_slot=PAD_SLOT, device=device)
    out = graphs.run(*batch)
    assert out.shape == expected.shape
    # a padded batch may take another GEMM kernel: fp32 rounding differs, hence 10x the fp32 tolerance
    atol, rtol = tolerance(torch.float32, 10)
    assert_close(out, expected, atol=atol, rtol=rtol, name="logits")
    # the same slots were written as by the unpadded forward, plus the pad slot when the batch was padded
    pool = model_runner.kv.data
    written = (pool != initial).flatten(4).any(-1)  # [layers, 2, blocks, block_size]
    written_eager = (pool_eager != initial).flatten(4).any(-1)
    pad_block, pad_row = divmod(PAD_SLOT, BLOCK_SIZE)
    padded = bucket_for(len(contexts), graphs.buckets) > len(contexts)
    assert bool(written[:, :, pad_block, pad_row].all()) == padded
    written[:, :, pad_block, pad_row] = False
    assert torch.equal(written, written_eager)
    pool[:, :, pad_block, pad_row] = pool_eager[:, :, pad_block, pad_row]
    assert_close(pool, pool_eager, atol=atol, rtol=rtol, name="KV pool")


def test_batches_above_the_largest_bucket_run_eagerly():
    device = torch.device("cpu")
    model_runner = make_runner(device, torch.float32)
    forward = decode_forward(model_runner)
    fill_pool(model_runner)
    batch = decode_batch([2, 3, 4], device)
    graphs = DecodeGraphRunner(forward, max_batch=2, max_blocks=1, pad_slot=PAD_SLOT, device=device)
    out = graphs.run(*batch)
    assert_close(out, forward(*batch), torch.float32)
    assert graphs.inputs.input_ids.eq(0).all()  # the static buffers were never used


@pytest.mark.gpu
def test_gpu_captured_decode_matches_eager():
    device = torch.device("cuda")
    model_runner = make_runner(device, torch.bfloat16, backend="auto")
    forward = decode_forward(model_runner)
    graphs = DecodeGraphRunner(forward, max_batch=16, max_blocks=6, pad_slot=PAD_SLOT, device=device)
    graphs.capture()
    assert sorted(graphs.graphs) == graphs.buckets
    for contexts in ([5], [3, 9, 14], [1, 2, 3, 4, 5, 6, 7, 8, 9], [4] * 16):
        batch = decode_batch(contexts, device)
        fill_pool(model_runner)
        expected = forward(*batch).clone()
        fill_pool(model_runner)
        out = graphs.run(*batch).clone()
        assert_close(out, expected, torch.bfloat16, atol=5e-2, rtol=5e-2, name=f"logits, batch {len(contexts)}")


def triton_attention_forward(device: torch.device, heads: int = 4, kv_heads: int = 2, head_dim: int = 16):
    """A one-layer DecodeForward on the Triton decode kernel: embed(id) + embed(position) -> q, k, v -> write the
    new K/V -> paged decode attention. Returns (forward, k_cache, v_cache)."""
    g = torch.Generator().manual_seed(7)
    hidden = heads * head_dim

    def weight(*shape):
        return torch.randn(*shape, generator=g).to(device)

    tokens, places = weight(VOCAB, hidden), weight(64, hidden)
    wq, wk, wv = weight(hidden, hidden), weight(hidden, kv_heads * head_dim), weight(hidden, kv_heads * head_dim)
    k_cache = weight(NUM_BLOCKS, BLOCK_SIZE, kv_heads, head_dim)
    v_cache = weight(NUM_BLOCKS, BLOCK_SIZE, kv_heads, head_dim)

    def forward(input_ids, positions, slot_mapping, block_tables, context_lens):
        x = tokens[input_ids] + places[positions]
        k, v = (x @ wk).view(-1, kv_heads, head_dim), (x @ wv).view(-1, kv_heads, head_dim)
        write_kv(k_cache, v_cache, k, v, slot_mapping)
        return paged_decode_attention((x @ wq).view(-1, heads, head_dim), k_cache, v_cache, block_tables,
                                      context_lens, head_dim ** -0.5, check_values=False)

    return forward, k_cache, v_cache


def test_padded_decode_on_the_triton_kernel():
    device = torch.device("cpu")
    forward, k_cache, v_cache = triton_attention_forward(device)
    batch = decode_batch([3, 9, 14], device)
    expected = forward(*batch)
    graphs = DecodeGraphRunner(forward, max_batch=8, max_blocks=6, pad_slot=PAD_SLOT, device=device)
    out = graphs.run(*batch).clone()
    atol, rtol = tolerance(torch.float32, 10)
    assert_close(out, expected, atol=atol, rtol=rtol, name="attention output")
    # what the step computed on its static inputs, 3 rows + 1 padding row (its K/V rewritten, to the same values)
    padded_out = graphs.forward(*graphs.inputs.rows(4))
    assert torch.equal(padded_out[:3], out)
    assert torch.equal(padded_out[3], torch.zeros_like(padded_out[3]))  # context length 0: attends nothing


@pytest.mark.gpu
def test_gpu_captured_triton_decode_matches_eager():
    device = torch.device("cuda")
    forward, k_cache, v_cache = triton_attention_forward(device)
    graphs = DecodeGraphRunner(forward, max_batch=32, max_blocks=6, pad_slot=PAD_SLOT, device=device)
    graphs.capture()
    for contexts in ([5], [3, 9, 14], [1, 2, 3, 4, 5, 6, 7, 8, 9], [4] * 20):
        batch = decode_batch(contexts, device)
        expected = forward(*batch).clone()
        out = graphs.run(*batch)
        assert_close(out, expected, torch.float32, atol=1e-4, rtol=1e-4, name=f"batch {len(contexts)}")


def engine_pair(device: torch.device, dtype: torch.dtype, backend: str, num_blocks: int = 64):
    """Two engines on one model: decode through the padded graph runner, and plain."""
    from rexrag_fast.engine import EngineConfig, LLMEngine

    model = tiny_model("qwen2", vocab_size=VOCAB, seed=3).to(device)
    kwargs = dict(num_blocks=num_blocks, block_size=BLOCK_SIZE, max_num_seqs=8, dtype=dtype, device=device,
                  attention_backend=backend)
    return (LLMEngine(model, config=EngineConfig(cuda_graphs=True, **kwargs)),
            LLMEngine(model, config=EngineConfig(cuda_graphs=False, **kwargs)))


def mixed_requests(n: int, seed: int):
    """n greedy requests of different prompt and output lengths: decode batches shrink as they finish, so
    most steps pad up to a bucket."""
    from rexrag_fast.engine import Request, SamplingParams

    g = torch.Generator().manual_seed(seed)
    return [Request(torch.randint(0, VOCAB, (3 + 4 * i,), generator=g).tolist(),
                    SamplingParams(temperature=0.0, max_tokens=5 + 3 * i, stop=(), ignore_eos=True))
            for i in range(n)]


def test_engine_decode_through_the_padded_runner_matches_plain_decode():
    graphs, plain = engine_pair(torch.device("cpu"), torch.float32, "torch")
    assert graphs.decode_graphs is not None and plain.decode_graphs is None
    pad_block = graphs.config.num_blocks - 1
    assert graphs.block_manager.allocator.num_blocks == pad_block  # the scratch block is never handed out
    before = graphs.runner.kv.data[:, :, pad_block].clone()
    for seed in range(3):
        reqs = mixed_requests(7, seed)
        for got, want in zip(graphs.generate(reqs), plain.generate(reqs)):
            assert got.output_token_ids == want.output_token_ids
            assert got.output_logprobs == pytest.approx(want.output_logprobs, abs=1e-4)
    assert not torch.equal(graphs.runner.kv.data[:, :, pad_block], before)  # padding rows wrote their scratch


def test_engine_graph_options_are_checked():
    from rexrag_fast.engine import EngineConfig, LLMEngine, cpu_attention

    with pytest.raises(ValueError, match="cuda_graphs: expected None, True or False"):
        EngineConfig(cuda_graphs="yes")
    with pytest.raises(ValueError, match="cuda_graphs reserve one block"):
        EngineConfig(cuda_graphs=True, num_blocks=1)
    if cpu_attention.available():
        with pytest.raises(ValueError, match="the 'cpp' backend cannot run the padded decode path"):
            LLMEngine(tiny_model("qwen2", vocab_size=VOCAB, seed=3),
                      config=EngineConfig(cuda_graphs=True, attention_backend="cpp", num_blocks=8))
    engine = LLMEngine(tiny_model("qwen2", vocab_size=VOCAB, seed=3), config=EngineConfig(num_blocks=8))
    assert engine.decode_graphs is None  # None = on only for CUDA


@pytest.mark.gpu
def test_gpu_engine_with_captured_graphs_matches_plain_engine():
    graphs, plain = engine_pair(torch.device("cuda"), torch.bfloat16, "auto")
    assert graphs.decode_graphs.captured
    agree = total = 0
    for got, want in zip(graphs.generate(mixed_requests(7, 0)), plain.generate(mixed_requests(7, 0))):
        agree += sum(a == b for a, b in zip(got.output_token_ids, want.output_token_ids))
        total += len(want.output_token_ids)
    # bf16: a replay may pick another GEMM kernel than an eager step of the padded size, so near-ties can flip
    assert agree / total >= 0.9, f"captured decode agreed with eager on {agree}/{total} tokens"
