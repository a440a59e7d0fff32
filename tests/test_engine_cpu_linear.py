"""The AMX linear kernel (engine/cpu_linear.py) against torch, and the runner's choice of it."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import one_thread  # noqa: F401

from rexrag_fast.engine import EngineConfig, LLMEngine, cpu_linear
from rexrag_fast.engine.attention import AttentionMetadata
from rexrag_fast.engine.loaders import tiny_model
from rexrag_fast.testing import assert_close

needs_amx = pytest.mark.skipif(not cpu_linear.available(), reason="this CPU (or OS) does not run AMX-BF16")


@needs_amx
@pytest.mark.parametrize("rows", [1, 5, 16, 17, 64, 130])  # 130: three passes of up to 4 row blocks
@pytest.mark.parametrize("out_features,in_features", [(16, 32), (48, 96), (960, 576)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_matches_torch(rows, out_features, in_features, with_bias):
    g = torch.Generator().manual_seed(rows * 7 + out_features)
    x = torch.randn(rows, in_features, generator=g).bfloat16()
    w = (torch.randn(out_features, in_features, generator=g) / in_features ** 0.5).bfloat16()
    b = torch.randn(out_features, generator=g).bfloat16() if with_bias else None
    y = cpu_linear.PackedLinear(w, b)(x)
    expected = torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float())
    assert y.dtype == torch.bfloat16 and y.shape == (rows, out_features)
    # the fp32 sum in another order, rounded once to bf16 (2^-9 relative)
    assert_close(y.float(), expected, atol=1e-3, rtol=2 ** -8, name="linear")


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match=r"N % 16 == 0 and K % 32 == 0, got torch.bfloat16 \(20, 32\)"):
        cpu_linear.PackedLinear(torch.zeros(20, 32, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="got torch.float32"):
        cpu_linear.PackedLinear(torch.zeros(16, 32))
    with pytest.raises(ValueError, match=r"expected bias \[16\] CPU bf16, got torch.bfloat16 \(8,\)"):
        cpu_linear.PackedLinear(torch.zeros(16, 32, dtype=torch.bfloat16), torch.zeros(8, dtype=torch.bfloat16))
    linear = cpu_linear.PackedLinear(torch.zeros(16, 32, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"expected x \[M, 32\] CPU bf16, got torch.bfloat16 \(2, 64\)"):
        linear(torch.zeros(2, 64, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"got torch.float32 \(2, 32\)"):
        linear(torch.zeros(2, 32))


@needs_amx
def test_runner_takes_amx_for_small_batches_and_agrees_with_onednn():
    """A bf16 tiny Qwen2 (qkv bias; every weight of the kernel's shape) multiplies decode batches on AMX; its
    logits agree with the oneDNN path's to bf16 accuracy."""
    engine = LLMEngine(tiny_model("qwen2"), config=EngineConfig(num_blocks=16, block_size=16, dtype=torch.bfloat16))
    runner = engine.runner
    assert runner.linear_kind == "amx"
    rows = 5
    ids = torch.randint(0, 1024, (rows,))
    positions = torch.zeros(rows, dtype=torch.int64)
    slots = torch.arange(rows, dtype=torch.int64) * 16  # row i writes slot 0 of block i
    tables = torch.arange(rows, dtype=torch.int32)[:, None]
    lens = torch.ones(rows, dtype=torch.int32)

    def logits():
        meta = AttentionMetadata(is_prefill=False, slot_mapping=slots, block_tables=tables, context_lens=lens,
                                 context_lens_list=lens.tolist())
        return runner.forward(ids, positions, meta, torch.arange(rows))

    amx = logits()
    runner.linear_kind = "onednn"
    runner._pack_weights()
    onednn = logits()
    assert_close(amx, onednn, atol=0.05, rtol=0.05, name="logits amx vs onednn")
