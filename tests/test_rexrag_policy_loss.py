"""The REX-RAG correction fed into `fused_policy_loss` equals a straightforward corrected GRPO loss.

The straightforward side is written here from the formulas, token by token: mu by counting pool prompts,
the mixture behaviour log((1 - alpha) pi_old + alpha mu), the group-normalised advantage, the dual-clipped
PPO loss and the token mean; its gradient comes from autograd.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rexrag_fast.ops.policy_loss import fused_policy_loss
from rexrag_fast.rexrag.probe_distribution import PromptTrie, policy_correction
from rexrag_fast.testing import assert_close

CLIP = 0.2
CLIP_C = 3.0
EPS = 1e-6


def _count_mu(pool: list[list[int]], inserted: list[int]) -> list[float]:
    mu = [1.0]
    for k in range(1, len(inserted)):
        longer = [p for p in pool if len(p) > k and p[:k] == inserted[:k]]
        mu.append(sum(p[k] == inserted[k] for p in longer) / len(longer))
    return mu


def _batch(seed: int):
    """Questions x n_agent originals plus probes in their source's group, as packed tensors."""
    rng = np.random.default_rng(seed)
    pool = [[90] + rng.integers(0, 4, size=int(rng.integers(1, 4))).tolist() for _ in range(5)]
    questions, n_agent = 3, 2
    seqs = []  # (question tokens, response tokens, response mask, explore flags, group, reward, source)
    for g in range(questions):
        q = rng.integers(200, 300, size=int(rng.integers(1, 4))).tolist()
        for _ in range(n_agent):
            r = rng.integers(200, 300, size=int(rng.integers(2, 7))).tolist()
            m = (rng.random(len(r)) < 0.8).tolist()  # some retrieved tokens are not trained
            seqs.append((q, r, m, [False] * len(r), g, float(rng.integers(0, 2)), None))
    for i in range(len(seqs)):
        q, r, m, _, g, reward, _ = seqs[i]
        if reward < 1 and rng.random() < 0.7:
            j = int(rng.integers(0, len(r)))
            prompt = pool[int(rng.integers(0, len(pool)))]
            tail = rng.integers(200, 300, size=int(rng.integers(1, 4))).tolist()
            resp = r[:j] + prompt + tail
            mask = m[:j] + [True] * (len(prompt) + len(tail))
            flags = [False] * j + [True] * len(prompt) + [False] * len(tail)
            seqs.append((q, resp, mask, flags, g, float(rng.integers(0, 2)), i))
    if all(s[6] is None for s in seqs):  # make sure there is a probe
        q, r, m, _, g, _, _ = seqs[0]
        seqs[0] = (q, r, m, [False] * len(r), g, 0.0, None)
        seqs.append((q, r[:1] + pool[0], m[:1] + [True] * len(pool[0]), [False] + [True] * len(pool[0]), g, 1.0, 0))
    return pool, seqs


def _straightforward_loss(pool, seqs, old, lp):
    originals = [s for s in seqs if s[6] is None]
    err = max(1 - sum(s[5] >= 1 for s in originals) / len(originals), 1e-6)
    alpha = sum(s[6] is not None for s in seqs) / len(seqs)
    groups: dict[int, list[float]] = {}
    for s in seqs:
        groups.setdefault(s[4], []).append(s[5])
    terms = []
    k = 0
    for q, r, m, flags, g, reward, source in seqs:
        rs = torch.tensor(groups[g], dtype=torch.float64)
        mean, std = (rs.mean(), rs.std()) if len(rs) > 1 else (torch.tensor(0.0), torch.tensor(1.0))
        adv = float((reward - mean) / (std + EPS))
        first = flags.index(True) if source is not None else None
        mu_prompt = _count_mu(pool, [t for t, f in zip(r, flags) if f]) if source is not None else []
        for t in range(len(r)):
            pos = k + len(q) + t
            if not m[t]:
                continue
            o = float(old[pos])
            if source is None:
                mu = 0.0
            elif t < first:
                mu = math.exp(o) / err ** (1 / first)
            elif flags[t]:
                mu = mu_prompt[t - first]
            else:
                mu = math.exp(o)
            beh = math.log((1 - alpha) * math.exp(o) + alpha * mu)
            ratio = torch.exp(torch.clamp(lp[pos] - beh, -20, 20))
            clipped = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - CLIP, 1 + CLIP))
            if adv < 0:
                clipped = torch.minimum(clipped, torch.tensor(-adv * CLIP_C, dtype=lp.dtype))
            terms.append(clipped)
        k += len(q) + len(r)
    return torch.stack(terms).mean(), alpha, err


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fused_loss_with_correction_equals_straightforward_loss(seed, backend):
    pool, seqs = _batch(seed)
    ids = torch.tensor([t for q, r, *_ in seqs for t in q + r])
    lens = [len(q) + len(r) for q, r, *_ in seqs]
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=torch.int32)
    mask = torch.tensor([b for q, _, m, *_ in seqs for b in [False] * len(q) + m])
    explore = torch.tensor([b for q, _, _, f, *_ in seqs for b in [False] * len(q) + f])
    plens = torch.tensor([len(q) for q, *_ in seqs])
    rewards = torch.tensor([s[5] for s in seqs], dtype=torch.float32)
    group_ids = torch.tensor([s[4] for s in seqs])

    gen = torch.Generator().manual_seed(seed)
    old = -3.0 * torch.rand(ids.numel(), generator=gen)
    lp = (old + 0.3 * torch.randn(ids.numel(), generator=gen)).clamp(max=0.0).requires_grad_(True)

    corr = policy_correction(old, cu, ids, explore, plens, rewards, PromptTrie(pool))
    loss, _ = fused_policy_loss(
        lp,
        old,
        mask,
        rewards=rewards,
        group_ids=group_ids,
        cu_seqlens=cu,
        probe_logprobs=corr.probe_logprobs,
        alpha=corr.alpha,
        clip_ratio=CLIP,
        clip_ratio_c=CLIP_C,
        epsilon=EPS,
        loss_agg_mode="token-mean",
        backend=backend,
    )
    (grad,) = torch.autograd.grad(loss, lp)

    lp64 = lp.detach().double().requires_grad_(True)
    expected, alpha, err = _straightforward_loss(pool, seqs, old.double(), lp64)
    (expected_grad,) = torch.autograd.grad(expected, lp64)

    assert corr.alpha == pytest.approx(alpha)
    assert corr.error_rate == pytest.approx(err)
    assert_close(loss.double(), expected, torch.float32, name="loss")
    assert_close(grad.double(), expected_grad, torch.float32, name="d loss / d logprobs")
