"""Forward/backward parity of the fused kernels on a CUDA device, in fp32, bf16 and fp16 (scripts/gpu_check.sh
runs these with `pytest -m gpu`). Every case compiles the Triton kernels for the card it runs on; the
comparisons are the CPU suite's own (test_linear_logprobs._compare, test_policy_loss.check_matches_reference)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_linear_logprobs import _compare, _inputs
from test_policy_loss import Batch, batch_kwargs, check_matches_reference, make_batch

pytestmark = pytest.mark.gpu
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("n_tokens", "n_hidden", "n_vocab", "temperature", "bias"),
                         [(777, 256, 5003, 0.7, True), (2048, 2048, 32768, 1.0, False)])
def test_linear_logprobs_triton_matches_fp64_reference(seed, dtype, n_tokens, n_hidden, n_vocab, temperature,
                                                        bias):
    h, w, b, y = _inputs(n_tokens, n_hidden, n_vocab, dtype, with_bias=bias, device="cuda",
                         n_ignored=n_tokens // 10)
    _compare("triton", h, w, b, y, temperature, True, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("precomputed", [False, True], ids=["grpo", "given-advantages"])
def test_policy_loss_triton_matches_reference(dtype, precomputed):
    b = make_batch(20000, 8, 16, dtype=dtype, seed=21, masked_seqs=(3,))
    b = Batch(**{f.name: getattr(b, f.name).cuda() for f in dataclasses.fields(Batch)})
    check_matches_reference(b, "triton", loss_agg_mode="token-mean", **batch_kwargs(b, precomputed=precomputed))
