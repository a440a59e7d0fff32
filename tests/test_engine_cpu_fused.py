"""The C++ fused decoder ops against the torch composition they replace (rope + K/V write, residual add + norm,
the sampler with top-k / top-p)."""

from __future__ import annotations

import pytest
import torch

from rexrag_fast.engine import cpu_fused
from rexrag_fast.engine.attention import write_kv_by_dim
from rexrag_fast.engine.model_runner import apply_rope, rms_norm
from rexrag_fast.engine.sampling import truncate_probs
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


def tie_free_logits(vocab: int, seed: int) -> torch.Tensor:
    """[vocab] logits spread like 4 * N(0, 1) with no two equal: the normal quantiles of (i + 0.5) / vocab,
    shuffled (neighbours differ by >= 2e-4 at 49k tokens, far above an fp32 ulp, so no two probabilities tie)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.distributions.Normal(0.0, 4.0).icdf((torch.arange(vocab, dtype=torch.float64) + 0.5) / vocab)
    return q.float()[torch.randperm(vocab, generator=g)]


def reference_kept(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """sampling.truncate_probs of the row's p = exp(log_softmax(logits / T)), as _sample_torch computes it."""
    return truncate_probs(torch.log_softmax(logits / temperature, -1).exp(), top_k, top_p)


def assert_clear_of_the_top_p_cut(probs: torch.Tensor, top_k: int, top_p: float) -> None:
    """The inputs' precondition: no token's preceding mass lies within 1e-6 of top_p, so that rounding cannot
    move the cut (the two sides' p differ by ~1 ulp; torch's mass is an fp32 cumsum, the kernel's a double sum)."""
    if top_p < 1.0:
        kept_k = truncate_probs(probs, top_k, 1.0).double()
        sorted_p = torch.sort(kept_k, descending=True).values
        before = torch.cumsum(sorted_p, 0) - sorted_p
        assert (before - top_p).abs().min() > 1e-6, "test input too close to the top-p cut"


# (top_k, top_p) of rows 0..6. Higher nuclei at 49k tokens and T 1.7 put the cut among tokens whose
# preceding masses lie < 1e-6 apart, where no fp32 implementation can place it as the reference does.
TRUNCATIONS = [(50, 1.0), (1, 1.0), (-1, 0.9), (-1, 0.5), (-1, 0.96), (40, 0.8), (5, 0.99)]


@pytest.mark.parametrize("vocab", [37, 1000, 49159])
@pytest.mark.parametrize("temperature", [0.6, 1.0, 1.7])
def test_top_k_top_p_keep_the_set_truncate_probs_keeps(vocab, temperature):
    logits = torch.stack([tie_free_logits(vocab, seed) for seed in range(len(TRUNCATIONS))])
    kept = torch.full_like(logits, -1.0)
    cpu_fused.sample_rows(logits, [temperature] * len(TRUNCATIONS), [0.5] * len(TRUNCATIONS),
                          [k for k, _ in TRUNCATIONS], [p for _, p in TRUNCATIONS], kept=kept)
    for row, (top_k, top_p) in enumerate(TRUNCATIONS):
        expected = reference_kept(logits[row], temperature, top_k, top_p)
        assert_clear_of_the_top_p_cut(torch.log_softmax(logits[row] / temperature, -1).exp(), top_k, top_p)
        assert torch.equal(kept[row] > 0, expected > 0), f"top_k {top_k}, top_p {top_p}: kept sets differ"
        assert_close(kept[row], expected, atol=1e-7, rtol=1e-5, name=f"kept p (top_k {top_k}, top_p {top_p})")


@pytest.mark.parametrize("vocab", [37, 1000, 49159])
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 50, 1.0), (0.7, -1, 0.9), (1.3, 40, 0.8),
                                                     (1.0, -1, 1.0), (1.0, 3, 1.0)])
def test_draws_invert_the_cdf_of_the_truncated_distribution(vocab, temperature, top_k, top_p):
    """Uniforms on a grid: each token is the one where the CDF (vocabulary order) of torch's truncated,
    renormalised distribution first exceeds the uniform, unless the uniform lies within 1e-6 of a step of
    that CDF; logprobs are the untruncated log_softmax."""
    logits = tie_free_logits(vocab, vocab)
    n = 64 if vocab > 10_000 else 512
    uniforms = (torch.arange(n, dtype=torch.float64) + 0.5) / n  # exact in fp32, as the kernel takes them
    tokens, logprobs = cpu_fused.sample_rows(logits.expand(n, vocab).contiguous(), [temperature] * n,
                                             uniforms.tolist(), [top_k] * n, [top_p] * n)
    q = reference_kept(logits, temperature, top_k, top_p).double()
    cdf = torch.cumsum(q / q.sum(), 0)
    expected = torch.searchsorted(cdf, uniforms, right=True).clamp(max=vocab - 1)
    got = torch.tensor(tokens)
    near_a_step = torch.stack([(cdf[(expected - 1).clamp(min=0)] - uniforms).abs(),
                               (cdf[expected] - uniforms).abs()]).min(0).values < 1e-6
    assert ((got == expected) | near_a_step).all(), f"draws differ at uniforms {uniforms[got != expected]}"
    assert (q[got] > 0).all()
    log_p = torch.log_softmax(logits / temperature, -1)
    assert_close(torch.tensor(logprobs), log_p[got], atol=1e-5, rtol=0.0, name="logprobs")


def test_ties_at_the_cut_go_to_the_lower_index():
    """The kernel's order is a stable descending sort's (torch.sort leaves ties unordered): ties at the top-p
    cut keep the lower indices; ties at the k-th value all stay (p >= kth), as in truncate_probs."""
    vocab = 1000
    logits = torch.full((vocab,), -30.0)
    logits[[900, 10, 500]] = 5.0                 # mass ~0.22 each: top-p 0.6 keeps three tokens ...
    logits[[700, 20, 400, 30]] = 4.0             # ... and top-p 0.7 one of these four (~0.08 each): index 20
    temps, u = [1.0] * 4, [0.5] * 4
    kept = torch.zeros(4, vocab)
    cpu_fused.sample_rows(logits.expand(4, vocab).contiguous(), temps, u, [-1, -1, 2, 4], [0.6, 0.7, 1.0, 0.99],
                          kept=kept)
    assert (kept[0] > 0).nonzero().flatten().tolist() == [10, 500, 900]
    assert (kept[1] > 0).nonzero().flatten().tolist() == [10, 20, 500, 900]
    assert (kept[2] > 0).nonzero().flatten().tolist() == [10, 500, 900]  # k = 2 inside a tie: all three
    assert (kept[3] > 0).nonzero().flatten().tolist() == [10, 20, 30, 400, 500, 700, 900]  # k-th tied at 4.0
    # the rule is top-p over a stable descending sort
    p = torch.softmax(logits, -1)
    order = torch.sort(p, descending=True, stable=True).indices
    before = torch.cumsum(p[order], 0) - p[order]
    assert sorted(order[before < 0.7].tolist()) == [10, 20, 500, 900]


def test_bad_truncation_arguments_are_refused():
    logits = torch.zeros(2, 20)
    args = (logits, [1.0] * 2, [0.5] * 2)
    with pytest.raises(ValueError, match="2 rows, 2 temperatures, 2 uniforms, 1 top_ks, 2 top_ps"):
        cpu_fused.sample_rows(*args, [5], [1.0, 1.0])
    with pytest.raises(ValueError, match=r"top_ks\[1\]: expected -1 \(off\) or a positive int, got 0"):
        cpu_fused.sample_rows(*args, [5, 0], [1.0, 1.0])
    with pytest.raises(ValueError, match=r"top_ks\[0\].*got -2"):
        cpu_fused.sample_rows(*args, [-2, 5], [1.0, 1.0])
    with pytest.raises(ValueError, match=r"top_ps\[0\]: expected a value in \(0, 1\], got 0.0"):
        cpu_fused.sample_rows(*args, [-1, -1], [0.0, 1.0])
    with pytest.raises(ValueError, match=r"top_ps\[1\].*got 1.5"):
        cpu_fused.sample_rows(*args, [-1, -1], [1.0, 1.5])
    with pytest.raises(ValueError, match="kept"):
        cpu_fused.sample_rows(*args, kept=torch.zeros(2, 19))
