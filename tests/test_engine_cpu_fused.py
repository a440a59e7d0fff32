"""The C++ fused decoder ops against the torch composition they replace (rope + K/V write, residual add + norm)."""

from __future__ import annotations

import pytest
import torch

from rexrag_fast.engine import cpu_fused
from rexrag_fast.engine.attention import write_kv_by_dim
from rexrag_fast.engine.model_runner import apply_rope, rms_norm
from rexrag_fast.testing import assert_close

pytestmark = pytest.mark.skipif(not cpu_fused.available(), reason="rexrag_fast._C built without the fused ops")


def rope_tables(positions: int, head_dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.outer(torch.arange(positions).float(), inv)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,heads,kv_heads,head_dim,block_size",
                         [(16, 9, 3, 64, 16), (70, 4, 2, 8, 4), (1, 2, 1, 40, 32)])
def test_rope_write_kv_is_the_torch_composition_bit_for_bit(dtype, tokens, heads, kv_heads, head_dim,
                                                            block_size):
    g = torch.Generator().manual_seed(tokens)
    num_blocks = 3 * -(-tokens // block_size) + 2
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=g).to(dtype)
    positions = torch.randint(0, 500, (tokens,), generator=g)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:tokens]
    cos, sin = rope_tables(512, head_dim, dtype)
    pool = lambda: (torch.zeros(num_blocks, kv_heads, head_dim, block_size, dtype=dtype),  # noqa: E731
                    torch.zeros(num_blocks, block_size, kv_heads, head_dim, dtype=dtype))

    k_ref, v_ref = pool()
    qk = apply_rope(qkv[:, :(heads + kv_heads) * head_dim].view(tokens, heads + kv_heads, head_dim),
                    cos[positions], sin[positions])
    v = qkv[:, (heads + kv_heads) * head_dim:].reshape(tokens, kv_heads, head_dim)
    write_kv_by_dim(k_ref, v_ref, qk[:, heads:], v, slots)

    k_cache, v_cache = pool()
    q = cpu_fused.rope_write_kv(qkv, positions, cos, sin, slots, k_cache, v_cache, heads)
    assert torch.equal(q, qk[:, :heads])
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_delta", [False, True])
def test_add_rms_norm_matches_torch(dtype, with_delta):
    g = torch.Generator().manual_seed(1)
    x = (3 * torch.randn(37, 576, generator=g)).to(dtype)
    delta = torch.randn(37, 576, generator=g).to(dtype) if with_delta else None
    weight = torch.randn(576, generator=g).to(dtype)
    x_ref = x + delta if with_delta else x.clone()
    expected = rms_norm(x_ref, weight, 1e-5)
    out = cpu_fused.add_rms_norm(x, delta, weight, 1e-5)
    assert torch.equal(x, x_ref)  # the residual add is the same rounded sum
    # only the order of the fp32 sum of squares differs: fp32 within a few ulps; in bf16 that rarely moves a
    # rounding by one bf16 step (2^-8 relative) of the normalised value, which the weight then scales
    assert_close(out.float(), expected.float(), atol=1e-5 if dtype == torch.float32 else 0.0,
                 rtol=1e-5 if dtype == torch.float32 else 2 ** -7, name="add_rms_norm")


def test_bad_inputs_are_refused():
    cos, sin = rope_tables(8, 8, torch.float32)
    k_cache, v_cache = torch.zeros(2, 1, 8, 4), torch.zeros(2, 4, 1, 8)
    slots, positions = torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="does not fit 2 heads"):
        cpu_fused.rope_write_kv(torch.zeros(2, 5 * 8), positions, cos, sin, slots, k_cache, v_cache, 2)
    with pytest.raises(ValueError, match="contiguous CPU torch.int64"):
        cpu_fused.rope_write_kv(torch.zeros(2, 4 * 8), positions.int(), cos, sin, slots, k_cache, v_cache, 2)
    with pytest.raises(ValueError, match="contiguous CPU torch.float32"):
        cpu_fused.rope_write_kv(torch.zeros(2, 4 * 8), positions, cos.bfloat16(), sin, slots, k_cache, v_cache, 2)
    with pytest.raises(ValueError, match="do not fit"):
        cpu_fused.add_rms_norm(torch.zeros(2, 8), None, torch.ones(7), 1e-6)


@pytest.mark.parametrize("vocab", [5, 16, 49159])
def test_sample_rows_greedy_is_the_first_argmax_with_its_log_softmax(vocab):
    g = torch.Generator().manual_seed(vocab)
    logits = 4 * torch.randn(6, vocab, generator=g)
    logits[1, vocab // 2] = logits[1, vocab - 1] = logits[1].max() + 1  # a tie: the first index wins
    logits[2, 0] = float("-inf")
    tokens, logprobs = cpu_fused.sample_rows(logits, [0.0] * 6, [0.5] * 6)
    assert tokens == torch.argmax(logits, dim=-1).tolist() and tokens[1] == vocab // 2
    expected = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(tokens).unsqueeze(1)).squeeze(1)
    assert_close(torch.tensor(logprobs), expected, atol=1e-5, rtol=1e-5, name="greedy logprobs")


@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.5])
def test_sample_rows_inverts_the_cdf_of_the_tempered_softmax(temperature):
    """Uniforms on a grid (k + 0.5) / N: token i is drawn for a share of them equal to its probability (within
    the grid's 1/N and the fp32 rounding of the running sum); a -inf logit is never drawn."""
    g = torch.Generator().manual_seed(3)
    logits = 2 * torch.randn(37, generator=g)
    logits[11] = float("-inf")
    n = 4000
    uniforms = ((torch.arange(n) + 0.5) / n).tolist()
    tokens, logprobs = cpu_fused.sample_rows(logits.expand(n, 37).contiguous(), [temperature] * n, uniforms)
    log_p = torch.log_softmax(logits / temperature, dim=-1)
    share = torch.bincount(torch.tensor(tokens), minlength=37).float() / n
    assert share[11] == 0
    assert_close(share, log_p.exp(), atol=2.0 / n, rtol=0.0, name="draw shares")
    assert_close(torch.tensor(logprobs), log_p[torch.tensor(tokens)], atol=1e-5, rtol=1e-5, name="logprobs")


def test_sample_rows_refuses_rows_without_a_distribution():
    logits = torch.zeros(3, 20)
    logits[1] = float("-inf")
    with pytest.raises(ValueError, match=r"rows \[1\] hold a NaN or no finite value"):
        cpu_fused.sample_rows(logits, [1.0] * 3, [0.5] * 3)
    logits[1] = 0.0
    logits[2, 7] = float("nan")
    with pytest.raises(ValueError, match=r"rows \[2\]"):
        cpu_fused.sample_rows(logits, [0.0] * 3, [0.5] * 3)
    with pytest.raises(ValueError, match="3 rows, 2 temperatures"):
        cpu_fused.sample_rows(logits, [1.0] * 2, [0.5] * 3)
