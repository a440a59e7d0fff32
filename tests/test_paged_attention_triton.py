"""kernels/paged_attention.py against the engine's PyTorch decode path (rexrag_fast/engine/attention.py), in fp64.

On a CPU the kernel runs under TRITON_INTERPRET=1 (tests/conftest.py): tiny shapes only.
"""

from __future__ import annotations

import math

import pytest
import torch
from rexrag_fast.kernels import paged_attention as kernel

from rexrag_fast.engine.attention import AttentionMetadata, _decode_torch
from rexrag_fast.testing import assert_close

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
JUNK = 1000.0  # value of every cache slot no sequence owns: a read of one shows up as a large error
PAD_BLOCK = -1  # block-table padding past a sequence's blocks: never read


def make_case(contexts: list[int], heads: int, kv_heads: int, head_dim: int, page: int, dtype: torch.dtype,
              spare_blocks: int = 3, device: str = "cpu") -> tuple[torch.Tensor, ...]:
    """(q [B, H, D], k_cache, v_cache [N, page, KV, D], block_tables [B, max_blocks] int32, context_lens [B] int32).

    Blocks are handed out in a random order (tables are permutations, not ranges); slots past each context
    and blocks nobody owns hold JUNK.
    """
    n_blocks = [-(-c // page) for c in contexts]
    total = sum(n_blocks) + spare_blocks
    k_cache = torch.full((total, page, kv_heads, head_dim), JUNK, dtype=dtype, device=device)
    v_cache = torch.full_like(k_cache, JUNK)
    order = torch.randperm(total).tolist()
    width = max(n_blocks) + 1
    tables = torch.full((len(contexts), width), PAD_BLOCK, dtype=torch.int32)
    for b, (c, n) in enumerate(zip(contexts, n_blocks)):
        ids = [order.pop() for _ in range(n)]
        tables[b, :n] = torch.tensor(ids, dtype=torch.int32)
        t = torch.arange(c)
        slots = (torch.tensor(ids)[t // page] * page + t % page).to(device)
        k_cache.view(-1, kv_heads, head_dim)[slots] = torch.randn(c, kv_heads, head_dim).to(dtype).to(device)
        v_cache.view(-1, kv_heads, head_dim)[slots] = torch.randn(c, kv_heads, head_dim).to(dtype).to(device)
    q = torch.randn(len(contexts), heads, head_dim).to(dtype)
    lens = torch.tensor(contexts, dtype=torch.int32)
    return q.to(device), k_cache, v_cache, tables.to(device), lens.to(device)


def reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
              lens: torch.Tensor, scale: float) -> torch.Tensor:
    """The engine's decode path in fp64; its softmax scale is 1/sqrt(D), so q is rescaled to give `scale`."""
    meta = AttentionMetadata(is_prefill=False, slot_mapping=torch.empty(0, dtype=torch.int64),
                             block_tables=tables.long(), context_lens=lens)
    q64 = q.double() * (scale * math.sqrt(q.shape[-1]))
    return _decode_torch(q64, k_cache.double(), v_cache.double(), meta)


# (contexts, heads, kv_heads, head_dim, block_size, num_splits)
CASES = [
    ([1, 13, 40], 4, 2, 16, 4, 1),    # GQA 2, one split, contexts ending mid-block
    ([7, 33], 4, 1, 16, 8, 2),        # GQA 4 (one KV head), two splits
    ([40, 17, 5], 4, 4, 16, 16, 3),   # MHA, three splits: the 5-key sequence leaves two of them empty
    ([23, 9], 4, 2, 24, 5, 2),        # head_dim and block_size not powers of two
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("contexts", "heads", "kv_heads", "head_dim", "page", "splits"), CASES)
def test_matches_engine_decode(seed, dtype, contexts, heads, kv_heads, head_dim, page, splits):
    q, k_cache, v_cache, tables, lens = make_case(contexts, heads, kv_heads, head_dim, page, dtype)
    scale = head_dim ** -0.5
    out = kernel.paged_decode_attention(q, k_cache, v_cache, tables, lens, scale, num_splits=splits)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close(out, reference(q, k_cache, v_cache, tables, lens, scale), dtype, name="decode attention")


def test_scale_strided_q_and_split_counts_agree(seed):
    # q as a view of a wider projection (non-contiguous), a scale that is not 1/sqrt(D); 1, 2 and 3 splits.
    q, k_cache, v_cache, tables, lens = make_case([38, 21], 4, 2, 16, 4, torch.float32)
    wide = torch.randn(2, 4, 40)
    wide[:, :, 8:24] = q
    q_view = wide[:, :, 8:24]
    expected = reference(q, k_cache, v_cache, tables, lens, 0.3)
    for splits in (1, 2, 3):
        out = kernel.paged_decode_attention(q_view, k_cache, v_cache, tables, lens, 0.3, num_splits=splits)
        assert_close(out, expected, torch.float32, name=f"{splits} splits")


def test_empty_context_gives_zeros_and_leaves_others_exact(seed):
    q, k_cache, v_cache, tables, lens = make_case([9, 1], 4, 2, 16, 4, torch.float32)
    lens_padded = torch.tensor([9, 0, 1], dtype=torch.int32)
    q_padded = torch.cat([q[:1], torch.randn(1, 4, 16), q[1:]])
    tables_padded = torch.cat([tables[:1], torch.zeros_like(tables[:1]), tables[1:]])
    expected = reference(q, k_cache, v_cache, tables, lens, 0.25)
    for splits in (1, 2):
        out = kernel.paged_decode_attention(q_padded, k_cache, v_cache, tables_padded, lens_padded, 0.25,
                                            num_splits=splits)
        assert torch.equal(out[1], torch.zeros(4, 16))
        assert_close(out[[0, 2]], expected, torch.float32, name=f"{splits} splits")


def test_default_num_splits_on_cpu_is_one_split(seed):
    q, k_cache, v_cache, tables, lens = make_case([30, 3], 4, 2, 16, 8, torch.float32)
    out = kernel.paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.25)
    assert_close(out, reference(q, k_cache, v_cache, tables, lens, 0.25), torch.float32)


def test_choose_num_splits():
    h200_sms = 132
    # one long sequence on a big GPU: split as far as the cap allows
    assert kernel.choose_num_splits(1, 8, 32768, h200_sms) == kernel.MAX_SPLITS
    # short contexts never split below MIN_TOKENS_PER_SPLIT keys
    assert kernel.choose_num_splits(1, 8, kernel.MIN_TOKENS_PER_SPLIT - 1, h200_sms) == 1
    assert kernel.choose_num_splits(1, 8, 3 * kernel.MIN_TOKENS_PER_SPLIT, h200_sms) == 3
    # a full batch already fills the GPU
    assert kernel.choose_num_splits(64, 8, 32768, h200_sms) == 1
    assert kernel.choose_num_splits(8, 8, 32768, h200_sms) == 5  # ceil(264 / 64)
    assert kernel.choose_num_splits(4, 2, 32768, 1) == 1


def _valid_args() -> dict:
    q, k_cache, v_cache, tables, lens = make_case([5, 9], 4, 2, 16, 4, torch.float32)
    return {"q": q, "k_cache": k_cache, "v_cache": v_cache, "block_tables": tables, "context_lens": lens,
            "scale": 0.25}


def _replace(name: str, value) -> dict:
    args = _valid_args()
    args[name] = value
    return args


ERROR_CASES = [
    ("q 2-d", lambda: _replace("q", torch.randn(2, 64)), ValueError, "q: expected 3 dimensions"),
    ("q int", lambda: _replace("q", torch.ones(2, 4, 16, dtype=torch.int32)), TypeError, "q: expected dtype"),
    ("kv dtype", lambda: _replace("k_cache", _valid_args()["k_cache"].half()), TypeError, "k_cache: expected dtype"),
    ("v shape", lambda: _replace("v_cache", _valid_args()["v_cache"][:, :2]), ValueError,
     "v_cache: expected the shape"),
    ("head_dim", lambda: _replace("q", torch.randn(2, 4, 8)), ValueError, "expected head_dim 8"),
    ("heads", lambda: _replace("q", torch.randn(2, 3, 16)), ValueError, "3 heads, not a multiple"),
    ("tables int64", lambda: _replace("block_tables", _valid_args()["block_tables"].long()), TypeError,
     "block_tables: expected dtype"),
    ("lens int64", lambda: _replace("context_lens", torch.tensor([5, 9])), TypeError, "context_lens: expected dtype"),
    ("tables rows", lambda: _replace("block_tables", _valid_args()["block_tables"][:1]), ValueError,
     "block_tables: expected 2 rows"),
    ("lens size", lambda: _replace("context_lens", torch.tensor([5, 9, 1], dtype=torch.int32)), ValueError,
     r"context_lens: expected shape \[2\]"),
    ("lens too long", lambda: _replace("context_lens", torch.tensor([5, 17], dtype=torch.int32)), ValueError,
     r"context_lens\[1\] = 17: expected 0 <= length <= 16"),
    ("lens negative", lambda: _replace("context_lens", torch.tensor([-1, 9], dtype=torch.int32)), ValueError,
     r"context_lens\[0\] = -1"),
    ("block id", lambda: _bad_block_id(), ValueError, r"block_tables\[1, 2\] = 99: expected a block id in \[0, "),
    ("scale", lambda: _replace("scale", float("nan")), ValueError, "scale: expected a finite float"),
    ("head_dim stride", lambda: _replace("k_cache", _valid_args()["k_cache"].transpose(2, 3).contiguous()
                                         .transpose(2, 3)), ValueError, "k_cache: expected its head_dim axis"),
]


def _bad_block_id() -> dict:
    args = _valid_args()
    args["block_tables"][1, 2] = 99  # context 9 at block size 4 uses entries 0..2
    return args


@pytest.mark.parametrize(("build", "error", "match"), [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_argument_errors(build, error, match):
    with pytest.raises(error, match=match):
        kernel.paged_decode_attention(**build())


def test_num_splits_error_and_unread_padding():
    with pytest.raises(ValueError, match="num_splits: expected None or an int >= 1, got 0"):
        kernel.paged_decode_attention(**_valid_args(), num_splits=0)
    args = _valid_args()
    expected = reference(args["q"], args["k_cache"], args["v_cache"], args["block_tables"], args["context_lens"],
                         args["scale"])
    args["block_tables"][0, 2:] = 12345  # past context 5's two blocks: neither checked nor read
    assert_close(kernel.paged_decode_attention(**args), expected, torch.float32)


def make_prefix_case(prefixes: list[int], groups: list[int], contexts: list[int], heads: int, kv_heads: int,
                     head_dim: int, page: int, dtype: torch.dtype, device: str = "cpu") -> tuple[torch.Tensor, ...]:
    """A decode batch whose sequences share prefixes physically: make_case's tensors, then prefix_block_tables
    [G, w] int32, prefix_lens [G] int32, prefix_groups [B] int32.

    Sequence b (contexts[b] keys) starts with prefix groups[b] (or none: -1). Its table reuses the prefix's
    full blocks; a prefix ending mid-block is copied into each member's own next block (copy-on-write), and the
    group's prefix table points at its first member's copy.
    """
    full = [p // page for p in prefixes]
    n_blocks = sum(-(-c // page) for c in contexts) + sum(full) + 2
    k_cache = torch.full((n_blocks, page, kv_heads, head_dim), JUNK, dtype=dtype, device=device)
    v_cache = torch.full_like(k_cache, JUNK)
    order = torch.randperm(n_blocks).tolist()
    shared = [[order.pop() for _ in range(n)] for n in full]
    prefix_keys = [(torch.randn(p, kv_heads, head_dim), torch.randn(p, kv_heads, head_dim)) for p in prefixes]
    tables = torch.full((len(contexts), max(-(-c // page) for c in contexts) + 1), PAD_BLOCK, dtype=torch.int32)
    prefix_tables = torch.full((len(prefixes), max(-(-p // page) for p in prefixes) + 1), PAD_BLOCK,
                               dtype=torch.int32)
    for b, (c, gid) in enumerate(zip(contexts, groups)):
        p = prefixes[gid] if gid >= 0 else 0
        own = shared[gid] if gid >= 0 else []
        ids = own + [order.pop() for _ in range(-(-c // page) - len(own))]
        tables[b, :len(ids)] = torch.tensor(ids, dtype=torch.int32)
        if gid >= 0 and prefix_tables[gid, 0] == PAD_BLOCK:
            prefix_tables[gid, :-(-p // page)] = tables[b, :-(-p // page)]
        keys, values = torch.randn(c - p, kv_heads, head_dim), torch.randn(c - p, kv_heads, head_dim)
        if gid >= 0:
            keys, values = torch.cat([prefix_keys[gid][0], keys]), torch.cat([prefix_keys[gid][1], values])
        t = torch.arange(c)
        slots = (torch.tensor(ids, dtype=torch.long)[t // page] * page + t % page).to(device)
        k_cache.view(-1, kv_heads, head_dim)[slots] = keys.to(dtype).to(device)
        v_cache.view(-1, kv_heads, head_dim)[slots] = values.to(dtype).to(device)
    q = torch.randn(len(contexts), heads, head_dim).to(dtype)
    as_int = {"dtype": torch.int32, "device": device}
    return (q.to(device), k_cache, v_cache, tables.to(device), torch.tensor(contexts, **as_int),
            prefix_tables.to(device), torch.tensor(prefixes, **as_int), torch.tensor(groups, **as_int))


# (prefix lengths, group of each sequence, contexts, heads, kv_heads, block_size, num_splits)
PREFIX_CASES = [
    ([9, 16], [0, 1, 0, -1, 0], [14, 30, 10, 7, 25], 4, 2, 4, 1),  # one sequence outside every group
    ([0, 20], [1, 1, 0], [33, 21, 5], 4, 1, 8, 2),                  # an empty prefix; GQA 4
    ([12], [0, 0, 0], [12, 40, 13], 4, 4, 5, 3),                    # prefix = whole context; mid-block prefix
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("prefixes", "groups", "contexts", "heads", "kv_heads", "page", "splits"), PREFIX_CASES)
def test_shared_prefix_matches_engine_decode(seed, dtype, prefixes, groups, contexts, heads, kv_heads, page, splits):
    q, k_cache, v_cache, tables, lens, prefix_tables, prefix_lens, prefix_groups = make_prefix_case(
        prefixes, groups, contexts, heads, kv_heads, 16, page, dtype)
    out = kernel.paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.25, num_splits=splits,
                                        prefix_block_tables=prefix_tables, prefix_lens=prefix_lens,
                                        prefix_groups=prefix_groups)
    assert_close(out, reference(q, k_cache, v_cache, tables, lens, 0.25), dtype, name="decode with shared prefix")


def _prefix_args(**changes) -> dict:
    q, k_cache, v_cache, tables, lens, prefix_tables, prefix_lens, prefix_groups = make_prefix_case(
        [6], [0, -1, 0], [9, 5, 6], 4, 2, 16, 4, torch.float32)
    args = {"q": q, "k_cache": k_cache, "v_cache": v_cache, "block_tables": tables, "context_lens": lens,
            "scale": 0.25, "prefix_block_tables": prefix_tables, "prefix_lens": prefix_lens,
            "prefix_groups": prefix_groups}
    args.update(changes)
    return args


PREFIX_ERROR_CASES = [
    ("partial", lambda: _prefix_args(prefix_lens=None, prefix_groups=None), ValueError,
     "pass prefix_block_tables, prefix_lens and prefix_groups together, got only prefix_block_tables"),
    ("groups int64", lambda: _prefix_args(prefix_groups=torch.tensor([0, -1, 0])), TypeError,
     "prefix_groups: expected dtype"),
    ("groups size", lambda: _prefix_args(prefix_groups=torch.tensor([0, 0], dtype=torch.int32)), ValueError,
     r"prefix_groups: expected shape \[3\]"),
    ("lens size", lambda: _prefix_args(prefix_lens=torch.tensor([6, 2], dtype=torch.int32)), ValueError,
     r"prefix_lens: expected shape \[1\]"),
    ("group id", lambda: _prefix_args(prefix_groups=torch.tensor([0, 1, 0], dtype=torch.int32)), ValueError,
     r"prefix_groups\[1\] = 1: expected -1 \(no shared prefix\) or a group in \[0, 1\)"),
    ("short member", lambda: _prefix_args(prefix_groups=torch.tensor([0, 0, 0], dtype=torch.int32)), ValueError,
     r"context_lens\[1\] = 5 is shorter than the shared prefix of its group 0 \(prefix_lens = 6\)"),
    ("prefix too long", lambda: _prefix_args(prefix_lens=torch.tensor([13], dtype=torch.int32)), ValueError,
     r"prefix_lens\[0\] = 13: expected 0 <= length <= 12"),
]


@pytest.mark.parametrize(("build", "error", "match"), [c[1:] for c in PREFIX_ERROR_CASES],
                         ids=[c[0] for c in PREFIX_ERROR_CASES])
def test_shared_prefix_argument_errors(build, error, match):
    with pytest.raises(error, match=match):
        kernel.paged_decode_attention(**build())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim", "page"), [(32, 8, 128, 16), (16, 16, 64, 256),
                                                                     (28, 4, 128, 32)])
def test_gpu_large_shapes(seed, dtype, heads, kv_heads, head_dim, page):
    contexts = [1, 77, 1000, 4096, 257, 3000, 15, 2048]
    q, k_cache, v_cache, tables, lens = make_case(contexts, heads, kv_heads, head_dim, page, dtype, device="cuda")
    tables[tables < 0] = 0
    expected = reference(q, k_cache, v_cache, tables, lens, head_dim ** -0.5)
    for splits in (None, 1, 7):
        out = kernel.paged_decode_attention(q, k_cache, v_cache, tables, lens, head_dim ** -0.5, num_splits=splits)
        # fp16/bf16 probabilities enter the P @ V tensor-core product in the KV dtype (as in flash-attn)
        assert_close(out, expected, dtype, name=f"splits={splits}", atol=2e-2 if dtype != torch.float32 else 1e-4)


@pytest.mark.gpu
def test_gpu_cuda_graph_capture_replays(seed):
    q, k_cache, v_cache, tables, lens = make_case([100, 600, 3], 8, 2, 64, 16, torch.bfloat16, device="cuda")
    tables[tables < 0] = 0
    out = kernel.paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.125, check_values=False)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = kernel.paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.125)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, out)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_gpu_shared_prefix_large(seed, dtype):
    # 2 groups of 8 and 5 rollouts over 1500- and 700-key prompts, 3 sequences without a group
    groups = [0] * 8 + [1] * 5 + [-1] * 3
    contexts = [1500 + 37 * i for i in range(8)] + [700 + 5 * i for i in range(5)] + [90, 2000, 1]
    q, k_cache, v_cache, tables, lens, prefix_tables, prefix_lens, prefix_groups = make_prefix_case(
        [1500, 700], groups, contexts, 32, 8, 128, 16, dtype, device="cuda")
    tables[tables < 0] = 0
    prefix_tables[prefix_tables < 0] = 0
    expected = reference(q, k_cache, v_cache, tables, lens, 128 ** -0.5)
    for splits in (None, 1, 4):
        out = kernel.paged_decode_attention(q, k_cache, v_cache, tables, lens, 128 ** -0.5, num_splits=splits,
                                            prefix_block_tables=prefix_tables, prefix_lens=prefix_lens,
                                            prefix_groups=prefix_groups)
        assert_close(out, expected, dtype, name=f"splits={splits}", atol=2e-2 if dtype != torch.float32 else 1e-4)


# Run in a child process without TRITON_INTERPRET: compiles every kernel in the configurations its launcher
# picks on CUDA (kernel._config) for sm_90.
HOPPER_COMPILE = """
import torch
from rexrag_fast.kernels import paged_attention as K
from rexrag_fast.kernels.launch import compile_for_gpu, dot_options

INT_POINTERS = {"tables_ptr", "lens_ptr", "starts_ptr", "ptables_ptr", "plens_ptr", "group_starts_ptr", "members_ptr"}
CASES = ((torch.float16, "fp16", 32, 8, 128), (torch.bfloat16, "bf16", 20, 4, 80), (torch.float32, "fp32", 16, 16, 64))
for dtype, kv, heads, kv_heads, head_dim in CASES:
    group = heads // kv_heads
    cfg = K._config(dtype, head_dim, group)
    block_m = cfg.pop("BLOCK_M")
    launch = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}
    common = {"NUM_HEADS": heads, "GROUP": group, "HEAD_DIM": head_dim, "PAGE": 16, **dot_options(dtype)}

    def types(fn):
        return {n: ("*i32" if n in INT_POINTERS else "*fp32" if n in ("m_ptr", "l_ptr", "acc_ptr") else "*" + kv)
                if n.endswith("_ptr") else "fp32" if n == "scale_log2" else "i32" for n in fn.arg_names}

    for single, starts in ((True, False), (False, True)):
        compile_for_gpu(K._decode_partial_kernel, types(K._decode_partial_kernel),
                        {**common, **cfg, "HAS_STARTS": starts, "SINGLE_SPLIT": single}, **launch)
    compile_for_gpu(K._prefix_partial_kernel, types(K._prefix_partial_kernel),
                    {**common, "BLOCK_M": block_m, "BLOCK_D": cfg["BLOCK_D"], "BLOCK_N": cfg["BLOCK_N"]}, **launch)
    compile_for_gpu(K._merge_splits_kernel, types(K._merge_splits_kernel),
                    {"NUM_HEADS": heads, "HEAD_DIM": head_dim, "BLOCK_S": 8, "BLOCK_D": cfg["BLOCK_D"]})
    print("compiled", kv, heads, kv_heads, head_dim, flush=True)
"""


@pytest.mark.slow
def test_kernels_compile_for_hopper():
    # The interpreter skips Triton's GPU lowering: a kernel it accepts may still fail to compile for a GPU.
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", HOPPER_COMPILE], env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("compiled") == 3
