"""Probe distribution mu: trie frequencies, prefix scaling, alpha, and the whole correction against an
independent implementation written the reference's way (padded responses, probabilities, in-place edits)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rexrag_fast.rexrag.probe_distribution import (
    PromptTrie,
    error_rate,
    explore_spans,
    original_accuracy,
    policy_correction,
    probe_logprobs,
    probe_share,
)
from rexrag_fast.testing import assert_close

POOL = [[1, 2, 3], [1, 2, 4], [1, 5], [1, 2, 3, 6]]


def test_trie_frequencies_by_hand():
    trie = PromptTrie(POOL)
    # After [1]: 3 prompts continue with 2, 1 with 5.
    assert trie.next_token_frequency([1], 2) == pytest.approx(3 / 4)
    assert trie.next_token_frequency([1], 5) == pytest.approx(1 / 4)
    assert trie.next_token_frequency([1], 7) == 0.0
    # After [1, 2]: 3 twice ([1,2,3] and [1,2,3,6]), 4 once.
    assert trie.next_token_frequency([1, 2], 3) == pytest.approx(2 / 3)
    assert trie.next_token_frequency([1, 2], 4) == pytest.approx(1 / 3)
    # After [1, 2, 3]: [1,2,3] ends there and does not count; only 6 follows.
    assert trie.next_token_frequency([1, 2, 3], 6) == pytest.approx(1.0)
    # First token of the pool: empirical frequency over all prompts (all start with 1).
    assert trie.next_token_frequency([], 1) == pytest.approx(1.0)


def test_trie_inserted_token_probs_by_hand():
    trie = PromptTrie(POOL)
    np.testing.assert_allclose(trie.inserted_token_probs([1, 2, 3, 6]), [1.0, 3 / 4, 2 / 3, 1.0])
    np.testing.assert_allclose(trie.inserted_token_probs([1, 5]), [1.0, 1 / 4])
    np.testing.assert_allclose(trie.inserted_token_probs([1, 2]), [1.0, 3 / 4])
    np.testing.assert_allclose(trie.inserted_token_probs([1]), [1.0])


def test_trie_first_token_mu_is_one_even_when_pool_starts_differ():
    trie = PromptTrie([[7, 8], [9, 8], [9, 10]])
    np.testing.assert_allclose(trie.inserted_token_probs([9, 10]), [1.0, 0.5])
    np.testing.assert_allclose(trie.inserted_token_probs([7, 8]), [1.0, 1.0])


def test_trie_duplicates_count_twice():
    trie = PromptTrie([[1, 2], [1, 2], [1, 3]])
    assert trie.next_token_frequency([1], 2) == pytest.approx(2 / 3)


@pytest.mark.parametrize("tokens", [[2], [1, 7], [1, 2, 3, 6, 9]])
def test_trie_rejects_span_that_is_not_a_pool_path(tokens):
    with pytest.raises(ValueError, match="pool"):
        PromptTrie(POOL).inserted_token_probs(tokens)


def test_trie_rejects_unknown_or_terminal_prefix():
    trie = PromptTrie(POOL)
    with pytest.raises(ValueError, match=r"prefix \[9\]"):
        trie.next_token_frequency([9], 1)
    with pytest.raises(ValueError, match=r"prefix \[1, 2, 4\]"):
        trie.next_token_frequency([1, 2, 4], 1)


@pytest.mark.parametrize("bad", [[], [[]], [[1, -2]], "abc"])
def test_trie_rejects_bad_pool(bad):
    with pytest.raises(ValueError):
        PromptTrie(bad)


def _hand_batch(dtype=torch.float64):
    # seq 0: original, 5 tokens, question of 2. seq 1: probe, 10 tokens, question of 2, response prefix of 3
    # (j = 3), inserted [1, 2, 3] at offsets 5..7, then 2 continuation tokens.
    old = torch.tensor(
        [-0.1, -0.2, -0.3, -0.4, -0.5] + [-1.0, -1.1, -1.2, -1.3, -1.4, -1.5, -1.6, -1.7, -1.8, -1.9], dtype=dtype
    )
    ids = torch.tensor([11, 12, 13, 14, 15] + [21, 22, 23, 24, 25, 1, 2, 3, 26, 27])
    explore = torch.zeros(15, dtype=torch.bool)
    explore[10:13] = True
    cu = torch.tensor([0, 5, 15], dtype=torch.int32)
    plens = torch.tensor([2, 2])
    return old, cu, ids, explore, plens


def test_probe_logprobs_by_hand():
    old, cu, ids, explore, plens = _hand_batch()
    err = 0.25
    out = probe_logprobs(old, cu, ids, explore, plens, PromptTrie(POOL), err)
    shift = -math.log(0.25) / 3
    expected = torch.tensor(
        [-math.inf] * 5
        + [-1.0, -1.1]
        + [-1.2 + shift, -1.3 + shift, -1.4 + shift]
        + [0.0, math.log(3 / 4), math.log(2 / 3)]
        + [-1.8, -1.9],
        dtype=torch.float64,
    )
    assert_close(out, expected, name="log mu")
    # The prefix's product of mu is pi_old(prefix) / err.
    prefix_gain = (out[7:10] - old[7:10]).sum().exp()
    assert prefix_gain.item() == pytest.approx(1 / err)


def test_probe_logprobs_keeps_type_dtype_and_accepts_numpy():
    old, cu, ids, explore, plens = _hand_batch(torch.float32)
    trie = PromptTrie(POOL)
    out = probe_logprobs(old, cu, ids, explore, plens, trie, 0.5)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    out_np = probe_logprobs(old.numpy(), cu.numpy(), ids.numpy(), explore.numpy(), plens.numpy(), trie, 0.5)
    assert isinstance(out_np, np.ndarray) and out_np.dtype == np.float32
    np.testing.assert_array_equal(out_np, out.numpy())


def test_branch_at_first_response_token_scales_nothing():
    old = torch.tensor([-0.5, -0.7, -0.9, -1.1], dtype=torch.float64)
    ids = torch.tensor([40, 1, 5, 41])
    explore = torch.tensor([False, True, True, False])
    out = probe_logprobs(old, torch.tensor([0, 4]), ids, explore, torch.tensor([1]), PromptTrie(POOL), 0.1)
    assert_close(out, torch.tensor([-0.5, 0.0, math.log(1 / 4), -1.1], dtype=torch.float64), name="log mu")


def test_accuracy_error_rate_and_alpha_by_hand():
    rewards = [1.0, 0.0, 0.5, 1.0, 0.0]
    is_probe = np.array([False, False, False, True, True])
    assert original_accuracy(rewards, is_probe) == pytest.approx(1 / 3)
    assert error_rate(rewards, is_probe) == pytest.approx(2 / 3)
    assert probe_share(is_probe) == pytest.approx(2 / 5)
    # All originals right: err is floored instead of 0 (the reference would divide by zero).
    assert error_rate([1.0, 1.0, 0.0], np.array([False, False, True]), min_error_rate=1e-3) == 1e-3


def test_policy_correction_by_hand():
    old, cu, ids, explore, plens = _hand_batch()
    rewards = torch.tensor([0.0, 1.0])  # the only original failed: err = 1, no prefix scaling
    corr = policy_correction(old, cu, ids, explore, plens, rewards, PromptTrie(POOL))
    assert corr.alpha == pytest.approx(0.5)
    assert corr.error_rate == pytest.approx(1.0)
    assert_close(corr.probe_logprobs[7:10], old[7:10], name="unscaled prefix")


def test_explore_spans():
    _, cu, _, explore, _ = _hand_batch()
    spans = explore_spans(explore, cu)
    assert spans.is_probe.tolist() == [False, True]
    assert spans.start.tolist() == [-1, 5]
    assert spans.length.tolist() == [0, 3]


def test_bad_inputs_name_the_problem():
    old, cu, ids, explore, plens = _hand_batch()
    trie = PromptTrie(POOL)
    gap = explore.clone()
    gap[11] = False
    with pytest.raises(ValueError, match="contiguous"):
        probe_logprobs(old, cu, ids, gap, plens, trie, 0.5)
    with pytest.raises(ValueError, match="question prompt"):
        probe_logprobs(old, cu, ids, explore, torch.tensor([2, 7]), trie, 0.5)
    with pytest.raises(ValueError, match="error_rate"):
        probe_logprobs(old, cu, ids, explore, plens, trie, 0.0)
    with pytest.raises(ValueError, match="cu_seqlens"):
        probe_logprobs(old, torch.tensor([0, 5, 14]), ids, explore, plens, trie, 0.5)
    with pytest.raises(ValueError, match="prompt_lens"):
        probe_logprobs(old, cu, ids, explore, torch.tensor([2, 11]), trie, 0.5)
    with pytest.raises(TypeError, match="explore_mask"):
        probe_logprobs(old, cu, ids, explore.long(), plens, trie, 0.5)
    wrong = ids.clone()
    wrong[11] = 9
    with pytest.raises(ValueError, match="not a pool prompt"):
        probe_logprobs(old, cu, wrong, explore, plens, trie, 0.5)
    with pytest.raises(ValueError, match="no original"):
        original_accuracy([0.0], np.array([True]))
    with pytest.raises(ValueError, match="finite"):
        original_accuracy([float("nan"), 1.0], np.array([False, False]))


# ---------------------------------------------------------------------------------------------------------
# Independent implementation, written the way the reference computes it: padded response rows, mu in
# probability space, first inserted token set to 1, a dictionary prefix index, then an in-place division of
# the first j response positions by err ** (1 / j).


def _reference_prefix_index(pool):
    counts: dict[tuple[int, ...], dict[int, int]] = {}
    for seq in pool:
        for i in range(len(seq) - 1):
            nxt = counts.setdefault(tuple(seq[: i + 1]), {})
            nxt[seq[i + 1]] = nxt.get(seq[i + 1], 0) + 1
    return {k: {t: c / sum(v.values()) for t, c in v.items()} for k, v in counts.items()}


def _reference_mu(responses, old, revision, original, pool, err):
    """responses/old/revision: lists of per-trajectory response-side rows. Returns mu rows (probabilities)."""
    index = _reference_prefix_index(pool)
    mus = []
    for toks, lp, rev, orig in zip(responses, old, revision, original):
        mu = [0.0 if orig else math.exp(x) for x in lp]
        rev_pos = [t for t, r in enumerate(rev) if r]
        if rev_pos:
            first = rev_pos[0]
            mu[first] = 1.0
            for t in rev_pos[1:]:
                mu[t] = index[tuple(toks[first:t])].get(toks[t], 0.0)
            for t in range(first):
                mu[t] /= err ** (1 / first)
        mus.append(mu)
    return mus


def _random_batch(rng: np.random.Generator):
    vocab = 6  # small, so that pool prompts share prefixes
    pool = [[100] + rng.integers(0, vocab, size=rng.integers(1, 5)).tolist() for _ in range(7)]
    b = int(rng.integers(3, 9))
    rows = []
    for i in range(b):
        qlen = int(rng.integers(1, 4))
        question = (rng.integers(200, 300, size=qlen)).tolist()
        # Row 0 is an original and row 1 a probe, so that both kinds are always present.
        if i == 0 or (i > 1 and rng.random() < 0.5):
            resp = rng.integers(200, 300, size=int(rng.integers(1, 9))).tolist()
            rows.append((question, resp, [False] * len(resp), True))
        else:
            prefix = rng.integers(200, 300, size=int(rng.integers(0, 7))).tolist()
            prompt = pool[int(rng.integers(0, len(pool)))]
            suffix = rng.integers(200, 300, size=int(rng.integers(0, 6))).tolist()
            rev = [False] * len(prefix) + [True] * len(prompt) + [False] * len(suffix)
            rows.append((question, prefix + prompt + suffix, rev, False))
    old = [(-3.0 * rng.random(len(q) + len(r))).tolist() for q, r, _, _ in rows]
    return pool, rows, old


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", range(6))
def test_correction_matches_reference_style_implementation(case, dtype):
    rng = np.random.default_rng(100 + case)
    pool, rows, old = _random_batch(rng)
    rewards = rng.integers(0, 2, size=len(rows)).astype(np.float64)
    is_probe = np.array([not r[3] for r in rows])
    if (rewards[~is_probe] >= 1).all():
        rewards[np.flatnonzero(~is_probe)[0]] = 0.0

    # Packed inputs of our module.
    ids = torch.tensor([t for q, r, _, _ in rows for t in q + r])
    explore = torch.tensor([m for q, _, rev, _ in rows for m in [False] * len(q) + rev])
    lens = [len(q) + len(r) for q, r, _, _ in rows]
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=torch.int32)
    plens = torch.tensor([len(q) for q, _, _, _ in rows])
    old_t = torch.tensor([x for lp in old for x in lp], dtype=dtype)
    corr = policy_correction(old_t, cu, ids, explore, plens, torch.from_numpy(rewards), PromptTrie(pool))

    # Reference-style computation on the response side.
    acc = (rewards[~is_probe] >= 1).sum() / (~is_probe).sum()
    err = 1 - acc
    alpha = is_probe.sum() / len(rows)
    old_rounded = old_t.double().tolist()
    resp_old, k = [], 0
    for (q, _r, _, _), n in zip(rows, lens):
        resp_old.append(old_rounded[k + len(q) : k + n])
        k += n
    mus = _reference_mu(
        [r for _, r, _, _ in rows], resp_old, [rev for _, _, rev, _ in rows], [r[3] for r in rows], pool, err
    )

    assert corr.alpha == pytest.approx(alpha)
    assert corr.error_rate == pytest.approx(err)
    got = corr.probe_logprobs
    tol_scale = 1.0 if dtype == torch.float64 else 2.0
    k = 0
    for i, ((q, _r, _, orig), n) in enumerate(zip(rows, lens)):
        mine = got[k + len(q) : k + n].double()
        theirs = torch.tensor(mus[i], dtype=torch.float64).log()
        if orig:
            assert bool(torch.isneginf(got[k : k + n]).all()), f"original {i} must have log mu = -inf"
        else:
            assert_close(mine, theirs, dtype, name=f"log mu of probe {i}", atol=1e-5 * tol_scale, rtol=1e-5 * tol_scale)
            assert_close(got[k : k + len(q)], old_t[k : k + len(q)], name=f"question tokens of probe {i}")
        # The behaviour log-prob the loss divides by: log((1 - alpha) * pi_old + alpha * mu).
        behaviour_ref = torch.tensor(
            [math.log((1 - alpha) * math.exp(o) + alpha * m) for o, m in zip(resp_old[i], mus[i])], dtype=torch.float64
        )
        behaviour = torch.logaddexp(math.log1p(-alpha) + old_t[k + len(q) : k + n].double(), math.log(alpha) + mine)
        assert_close(behaviour, behaviour_ref, dtype, name=f"behaviour of trajectory {i}", atol=1e-5 * tol_scale)
        k += n
