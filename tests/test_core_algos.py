"""verl-compatible functions in rexrag_fast.ops.core_algos against scalar, loop-by-loop oracles."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rexrag_fast.ops import core_algos
from rexrag_fast.testing import assert_close

GROUP_SIZES = (1, 2, 5, 16)


def _grouped_scores(group_size: int, n_groups: int, seed: int, binary: bool) -> tuple[torch.Tensor, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    B = group_size * n_groups
    scores = (torch.rand(B, generator=g) < 0.5).float() if binary else torch.randn(B, generator=g)
    labels = np.array([f"uid-{i}" for i in (torch.randperm(B, generator=g) % n_groups).tolist()])
    return scores, labels


def _oracle_group_stats(scores: torch.Tensor, labels: np.ndarray) -> tuple[list[float], list[float], list[int]]:
    """Per sequence (mean, unbiased std, size) of its group, with Python floats."""
    groups: dict[str, list[float]] = {}
    for s, lab in zip(scores.tolist(), labels.tolist()):
        groups.setdefault(lab, []).append(s)
    means, stds, sizes = [], [], []
    for lab in labels.tolist():
        vals = groups[lab]
        n = len(vals)
        m = sum(vals) / n
        means.append(m)
        stds.append(math.sqrt(sum((v - m) ** 2 for v in vals) / (n - 1)) if n > 1 else 0.0)
        sizes.append(n)
    return means, stds, sizes


@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("norm_by_std", [True, False])
@pytest.mark.parametrize("binary", [True, False])
def test_grpo_advantage_matches_group_oracle(group_size, norm_by_std, binary):
    scores, labels = _grouped_scores(group_size, 3, seed=group_size, binary=binary)
    B, L = scores.numel(), 6
    mask = (torch.rand(B, L, generator=torch.Generator().manual_seed(1)) < 0.7).float()
    token_rewards = torch.zeros(B, L)
    token_rewards[:, -1] = scores  # the outcome reward sits on one token; the function sums over L
    adv, returns = core_algos.compute_grpo_outcome_advantage(token_rewards, mask, labels, 1e-6, norm_by_std)
    means, stds, sizes = _oracle_group_stats(scores, labels)
    expected = []
    for r, m, s, n in zip(scores.tolist(), means, stds, sizes):
        m, s = (0.0, 1.0) if n == 1 else (m, s)
        expected.append((r - m) / (s + 1e-6) if norm_by_std else r - m)
    assert_close(adv, torch.tensor(expected).unsqueeze(-1) * mask, torch.float32, name="advantages")
    assert torch.equal(adv, returns)
    assert torch.isfinite(adv).all()


def test_grpo_zero_variance_group_gives_zero_advantage():
    scores = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0])
    adv, _ = core_algos.compute_grpo_outcome_advantage(scores[:, None], torch.ones(5, 1), [7, 7, 7, 8, 8])
    assert adv[:3].abs().max().item() == 0.0
    assert torch.isfinite(adv).all()


def test_grpo_accepts_tensor_and_list_labels():
    scores = torch.randn(6, 1)
    a1, _ = core_algos.compute_grpo_outcome_advantage(scores, torch.ones(6, 1), torch.tensor([5, 5, 2, 2, 9, 9]))
    a2, _ = core_algos.compute_grpo_outcome_advantage(scores, torch.ones(6, 1), ["x", "x", "y", "y", "z", "z"])
    assert torch.equal(a1, a2)
    with pytest.raises(ValueError, match="index"):
        core_algos.compute_grpo_outcome_advantage(scores, torch.ones(6, 1), [1, 2, 3])


@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_rloo_advantage_matches_leave_one_out(group_size):
    scores, labels = _grouped_scores(group_size, 3, seed=10 + group_size, binary=False)
    B = scores.numel()
    mask = torch.ones(B, 3)
    adv, _ = core_algos.compute_rloo_outcome_advantage(scores[:, None].expand(B, 3) / 3, mask, labels)
    expected = []
    for i, (r, lab) in enumerate(zip(scores.tolist(), labels.tolist())):
        others = [s for j, (s, lb) in enumerate(zip(scores.tolist(), labels.tolist())) if lb == lab and j != i]
        expected.append(r - sum(others) / len(others) if others else r)
    assert_close(adv[:, 0], torch.tensor(expected), torch.float32, name="rloo")


def _scalar_ppo(lp: float, old: float, a: float, lo: float, hi: float, c: float) -> tuple[float, bool, bool]:
    d = min(max(lp - old, -20.0), 20.0)
    r = math.exp(d)
    l1, l2 = -a * r, -a * min(max(r, 1 - lo), 1 + hi)
    lc = max(l1, l2)
    l3 = -a * c
    loss = min(l3, lc) if a < 0 else lc
    return loss, l2 > l1, lc > l3 and a < 0


@pytest.mark.parametrize("clip", [(0.2, 0.2, 3.0), (0.2, 0.28, 3.0), (0.1, 0.3, 1.5)])
def test_compute_policy_loss_matches_scalar_oracle(clip):
    lo, hi, c = clip
    g = torch.Generator().manual_seed(3)
    B, L = 4, 9
    lp = -torch.rand(B, L, generator=g) * 3
    old = lp + torch.randn(B, L, generator=g) * 0.6
    old[0, 0] = lp[0, 0] - 30.0  # log-ratio beyond the +-20 clamp
    old[1, 1] = lp[1, 1] + 30.0
    adv = torch.randn(B, L, generator=g) * 2
    mask = (torch.rand(B, L, generator=g) < 0.8).float()
    pg_loss, clipfrac, ppo_kl, clipfrac_lower = core_algos.compute_policy_loss(
        old, lp, adv, mask, cliprange_low=lo, cliprange_high=hi, clip_ratio_c=c, loss_agg_mode="token-mean")
    total = n = n_clip = n_lower = kl = 0.0
    for i in range(B):
        for j in range(L):
            if mask[i, j] == 0:
                continue
            loss, clipped, lower = _scalar_ppo(lp[i, j].item(), old[i, j].item(), adv[i, j].item(), lo, hi, c)
            total += loss
            n += 1
            n_clip += clipped
            n_lower += lower
            kl += -min(max(lp[i, j].item() - old[i, j].item(), -20.0), 20.0)
    assert_close(pg_loss, torch.tensor(total / n), torch.float32, name="pg_loss")
    assert_close(clipfrac, torch.tensor(n_clip / n), torch.float32, name="pg_clipfrac")
    assert_close(clipfrac_lower, torch.tensor(n_lower / n), torch.float32, name="pg_clipfrac_lower")
    assert_close(ppo_kl, torch.tensor(kl / n), torch.float32, name="ppo_kl")


def test_compute_policy_loss_rejects_bad_dual_clip_and_missing_range():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="clip_ratio_c"):
        core_algos.compute_policy_loss(x, x, x, x + 1, cliprange=0.2, clip_ratio_c=1.0)
    with pytest.raises(ValueError, match="cliprange"):
        core_algos.compute_policy_loss(x, x, x, x + 1)


@pytest.mark.parametrize("kl_type", core_algos.KL_TYPES)
def test_kl_penalty_values(kl_type):
    lp = torch.tensor([-1.0, -0.5, -3.0, -0.1, -2.0, -40.0])
    ref = torch.tensor([-1.2, -0.5, -0.2, -2.5, -30.0, -0.1])
    out = core_algos.kl_penalty(lp, ref, kl_type)
    expected = []
    for a, b in zip(lp.tolist(), ref.tolist()):
        x = a - b
        if kl_type in ("kl", "k1"):
            expected.append(x)
        elif kl_type == "abs":
            expected.append(abs(x))
        elif kl_type in ("mse", "k2"):
            expected.append(0.5 * x * x)
        else:
            y = min(max(b - a, -20.0), 20.0)
            expected.append(min(max(math.exp(y) - y - 1, -10.0), 10.0))
    assert_close(out, torch.tensor(expected), torch.float32, name=kl_type)


@pytest.mark.parametrize("kl_type", [k + "+" for k in core_algos.KL_TYPES])
def test_kl_penalty_straight_through_has_value_of_estimator_and_gradient_of_k2(kl_type):
    lp = torch.tensor([-1.0, -0.5, -3.0, -0.1], requires_grad=True)
    ref = torch.tensor([-1.2, -0.4, -0.2, -2.5])
    out = core_algos.kl_penalty(lp, ref, kl_type)
    assert_close(out, core_algos.kl_penalty_forward(lp, ref, kl_type[:-1]), torch.float32, name="value")
    out.sum().backward()
    assert_close(lp.grad, (lp - ref).detach(), torch.float32, name="grad")


def test_kl_penalty_rejects_unknown_type():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="kl_penalty"):
        core_algos.kl_penalty(x, x, "k4")
    with pytest.raises(NotImplementedError):
        core_algos.kl_penalty(x, x, "full")


def _oracle_agg(loss: torch.Tensor, mask: torch.Tensor, mode: str, scale: float | None = None) -> float:
    rows = [(loss[i][mask[i] > 0].tolist()) for i in range(loss.shape[0])]
    nonempty = [r for r in rows if r]
    if mode == "token-mean":
        n = sum(len(r) for r in rows)
        return sum(sum(r) for r in rows) / n if n else 0.0
    if mode == "seq-mean-token-sum":
        return sum(sum(r) for r in nonempty) / len(nonempty) if nonempty else 0.0
    if mode == "seq-mean-token-mean":
        return sum(sum(r) / len(r) for r in nonempty) / len(nonempty) if nonempty else 0.0
    return sum(sum(r) for r in rows) / (loss.shape[1] if scale is None else scale)


@pytest.mark.parametrize("mode", core_algos.LOSS_AGG_MODES)
def test_agg_loss_matches_oracle_and_excludes_fully_masked_sequences(mode):
    g = torch.Generator().manual_seed(5)
    loss = torch.randn(5, 7, generator=g)
    mask = (torch.rand(5, 7, generator=g) < 0.6).float()
    mask[2] = 0  # a fully masked sequence
    loss[mask == 0] = float("nan")  # masked-out garbage must not leak
    out = core_algos.agg_loss(loss, mask, mode)
    assert_close(out, torch.tensor(_oracle_agg(loss, mask, mode)), torch.float32, name=mode)
    if mode == "seq-mean-token-sum-norm":
        out = core_algos.agg_loss(loss, mask, mode, loss_scale_factor=13.0)
        assert_close(out, torch.tensor(_oracle_agg(loss, mask, mode, 13.0)), torch.float32, name="scaled")


@pytest.mark.parametrize("mode", core_algos.LOSS_AGG_MODES)
def test_agg_loss_all_masked_is_zero(mode):
    out = core_algos.agg_loss(torch.randn(3, 4), torch.zeros(3, 4), mode)
    assert out.item() == 0.0


def test_agg_loss_rejects_unknown_mode():
    with pytest.raises(ValueError, match="loss_agg_mode"):
        core_algos.agg_loss(torch.zeros(2, 2), torch.ones(2, 2), "token-sum")


@pytest.mark.parametrize("alpha", [0.1, 0.5, 0.9])
def test_behaviour_log_prob_is_the_mixture(alpha):
    old = torch.tensor([-0.5, -2.0, -30.0, -1.0])
    probe = torch.tensor([-1.0, float("-inf"), -0.1, -60.0])
    out = core_algos.behaviour_log_prob(old, probe, alpha)
    expected = [math.log((1 - alpha) * math.exp(o) + alpha * math.exp(p)) for o, p in zip(old.tolist(), probe.tolist())]
    assert_close(out, torch.tensor(expected), torch.float32, name="beh")
    assert_close(out[1], old[1] + math.log1p(-alpha), torch.float32, name="original")


def test_behaviour_log_prob_alpha_zero_is_old_and_range_is_checked():
    old = torch.randn(5)
    assert core_algos.behaviour_log_prob(old, torch.zeros(5), 0.0) is old
    with pytest.raises(ValueError, match="alpha"):
        core_algos.behaviour_log_prob(old, old, 1.0)
    with pytest.raises(ValueError, match="alpha"):
        core_algos.behaviour_log_prob(old, old, -0.1)


# ----------------------------------------------------------------------------- registries


def test_registries_hold_the_built_in_estimators_and_loss():
    assert core_algos.adv_estimator_names()[:3] == ("grpo", "dr_grpo", "rloo")
    assert core_algos.get_adv_estimator_fn("rloo") is core_algos.compute_rloo_outcome_advantage
    assert core_algos.get_policy_loss_fn("vanilla") is core_algos.compute_policy_loss
    with pytest.raises(ValueError, match=r"adv_estimator: expected one of \['dr_grpo', 'grpo', 'rloo'.*'gae'"):
        core_algos.get_adv_estimator_fn("gae")
    with pytest.raises(ValueError, match="already registered"):
        core_algos.register_adv_est("grpo")(lambda *a, **k: None)


def test_a_registered_estimator_is_one_function_away_from_both_loss_paths(monkeypatch: pytest.MonkeyPatch):
    """A new estimator registered here runs in the fused op (torch backend) and the eager composition."""
    from rexrag_fast.ops.policy_loss import fused_policy_loss, policy_loss_reference

    monkeypatch.setattr(core_algos, "ADV_ESTIMATOR_REGISTRY", dict(core_algos.ADV_ESTIMATOR_REGISTRY))

    @core_algos.register_adv_est("max_baseline")
    def _max_baseline(token_level_rewards, response_mask, index, epsilon=1e-6):
        scores = token_level_rewards.sum(-1)
        labels = np.asarray(index)
        best = torch.tensor([float(scores[labels == g].max()) for g in labels])
        adv = (scores - best).unsqueeze(-1) * response_mask
        return adv, adv

    T = 9
    cu = torch.tensor([0, 3, 7, 9], dtype=torch.int32)
    g = torch.Generator().manual_seed(3)
    lp = (-torch.rand(T, generator=g)).requires_grad_()
    old = lp.detach() + 0.05 * torch.randn(T, generator=g)
    mask = torch.ones(T, dtype=torch.bool)
    rewards, groups = torch.tensor([1.0, 0.0, 0.5]), torch.tensor([0, 0, 1])
    fused, _ = fused_policy_loss(lp, old, mask, rewards=rewards, group_ids=groups, cu_seqlens=cu,
                                 adv_estimator="max_baseline", backend="torch")
    eager, _ = policy_loss_reference(lp, old, mask, rewards=rewards, group_ids=groups, cu_seqlens=cu,
                                     adv_estimator="max_baseline")
    # advantages 0, -1, 0: only the second sequence's 4 tokens carry a gradient
    given, _ = fused_policy_loss(lp, old, mask, advantages=torch.tensor([0.0] * 3 + [-1.0] * 4 + [0.0] * 2),
                                 cu_seqlens=cu, backend="torch")
    assert_close(fused, eager, dtype=torch.float32)
    assert_close(fused, given, dtype=torch.float32)
    assert float(fused.detach()) != 0.0
