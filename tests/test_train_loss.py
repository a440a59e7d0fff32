"""The config-driven policy loss: fused op and eager reference agree on packed micro-batches; micro-batch
re-weighting in the actor's convention reproduces the loss of the whole batch."""

from __future__ import annotations

import math

import pytest
import torch

from rexrag_fast.testing import assert_close
from rexrag_fast.train.config import load_config
from rexrag_fast.train.loss import _segment_agg, make_policy_loss_fn, sequence_advantages
from rexrag_fast.train.packing import pack_micro_batches, pack_sequences


def _batch(seed: int, n_groups: int = 3, n: int = 3):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 10, (n_groups * n,), generator=g).tolist()
    ids = [torch.randint(0, 50, (k,), generator=g).tolist() for k in lengths]
    masks = [torch.arange(k) >= 2 for k in lengths]
    rewards = torch.bernoulli(torch.full((len(ids),), 0.5), generator=g)
    groups = torch.arange(len(ids)) // n
    per_token = {
        "response_mask": masks,
        "old_logprobs": [-torch.rand(k, generator=g) - 0.1 for k in lengths],
        "ref_logprobs": [-torch.rand(k, generator=g) - 0.1 for k in lengths],
        "probe_logprobs": [(-torch.rand(k, generator=g) - 0.1) if i % n == 1 else torch.full((k,), -math.inf)
                           for i, k in enumerate(lengths)],
        "logprobs": [-torch.rand(k, generator=g) - 0.1 for k in lengths],
        "entropy": [torch.rand(k, generator=g) for k in lengths],
    }
    return ids, per_token, rewards, groups


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"])
@pytest.mark.parametrize(("name", "alpha"), [("grpo", 0.0), ("rexrag", 0.3)])
def test_fused_and_eager_loss_agree(agg: str, name: str, alpha: float) -> None:
    cfg = load_config(None, [f"algorithm.loss_agg_mode={agg}", f"algorithm.name={name}",
                             "algorithm.entropy_coeff=0.01", "algorithm.kl_coef=0.05"])
    ids, per_token, rewards, groups = _batch(0)
    adv = sequence_advantages(rewards, groups, cfg.algorithm)
    per_token["advantages"] = [adv[i] * per_token["response_mask"][i].float() for i in range(len(ids))]
    b = pack_sequences(ids, per_token)
    results = {}
    for fused in (True, False):
        lp = b.per_token["logprobs"].clone().requires_grad_(True)
        loss_fn = make_policy_loss_fn(cfg.algorithm, fused=fused, alpha=alpha)
        loss, metrics = loss_fn(lp, b.per_token["entropy"], b)
        loss.backward()
        results[fused] = (loss.detach(), lp.grad, metrics)
    assert torch.isfinite(results[True][0])
    assert_close(results[True][0], results[False][0], torch.float32, name="loss")
    assert_close(results[True][1], results[False][1], torch.float32, name="d loss / d logprobs")
    for k in ("pg_clipfrac", "kl", "ppo_kl", "is_weight_mean"):
        assert_close(results[True][2][k], results[False][2][k], torch.float32, name=k)


def test_entropy_bonus_lowers_the_loss() -> None:
    ids, per_token, rewards, groups = _batch(1)
    per_token["advantages"] = [torch.zeros(len(t)) for t in ids]
    b = pack_sequences(ids, per_token)
    lp = b.per_token["logprobs"]
    base = load_config(None, ["algorithm.entropy_coeff=0.0"]).algorithm
    bonus = load_config(None, ["algorithm.entropy_coeff=0.1"]).algorithm
    l0, _ = make_policy_loss_fn(base, fused=True)(lp, b.per_token["entropy"], b)
    l1, _ = make_policy_loss_fn(bonus, fused=True)(lp, b.per_token["entropy"], b)
    ent = _segment_agg(b.per_token["entropy"], b.per_token["response_mask"], b.cu_seqlens, "token-mean")
    assert_close(l0 - l1, 0.1 * ent, torch.float32, name="entropy bonus")
    with pytest.raises(ValueError, match="entropy_coeff > 0 needs entropy"):
        make_policy_loss_fn(bonus, fused=True)(lp, None, b)


def test_token_mean_reweighting_reproduces_whole_batch_loss() -> None:
    """sum_mb loss_mb * tokens_mb / tokens_total == loss of the whole batch (the actor's weighting)."""
    cfg = load_config(None, ["algorithm.kl_coef=0.05"])
    ids, per_token, rewards, groups = _batch(2)
    adv = sequence_advantages(rewards, groups, cfg.algorithm)
    per_token["advantages"] = [adv[i] * per_token["response_mask"][i].float() for i in range(len(ids))]
    loss_fn = make_policy_loss_fn(cfg.algorithm, fused=True)
    whole = pack_sequences(ids, per_token)
    want, _ = loss_fn(whole.per_token["logprobs"], None, whole)
    micro = pack_micro_batches(ids, 12, per_token)
    assert len(micro) > 2
    total = sum(float(mb.per_token["response_mask"].sum()) for mb in micro)
    got = sum(loss_fn(mb.per_token["logprobs"], None, mb)[0] * float(mb.per_token["response_mask"].sum()) / total
              for mb in micro)
    assert_close(got, want, torch.float32, name="re-weighted loss")


def test_sequence_advantages_grpo_and_errors() -> None:
    algo = load_config(None).algorithm
    adv = sequence_advantages(torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.tensor([0, 0, 1, 1]), algo)
    s = torch.tensor([1.0, 0.0]).std()
    assert_close(adv, torch.tensor([0.5, -0.5, 0.5, -0.5]) / (s + 1e-6), torch.float32)
    with pytest.raises(ValueError, match="rewards and group_ids: expected two"):
        sequence_advantages(torch.zeros(3), torch.zeros(4, dtype=torch.long), algo)
    with pytest.raises(ValueError, match="algorithm.name is grpo"):
        make_policy_loss_fn(load_config(None, ["algorithm.name=grpo"]).algorithm, fused=True, alpha=0.2)
