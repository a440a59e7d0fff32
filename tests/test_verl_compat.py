"""verl compatibility of the verl-named functions (`ops.core_algos`) and of `rexrag_fast.integrations.verl`.

Positional arguments mean what they mean in verl (agg_loss's 4th is dp_size), verl's keywords are accepted
(`config=`, `batch_num_tokens=`, `global_batch_size=`). Where verl installs (`pip install --no-deps verl` plus
omegaconf), the numbers are compared against verl's own functions, and our policy loss and estimators are
registered in verl's registries and called the way verl's actor and trainer call them.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from rexrag_fast.ops import core_algos
from rexrag_fast.testing import assert_close


def _batch(seed: int = 0, b: int = 6, length: int = 9) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(b, length, generator=g) > 0.3).float()
    mask[2] = 0.0  # one fully masked sequence
    return {"loss": torch.randn(b, length, generator=g), "mask": mask,
            "old": -torch.rand(b, length, generator=g) * 3, "new": -torch.rand(b, length, generator=g) * 3,
            "adv": torch.randn(b, 1, generator=g).expand(b, length).contiguous()}


def test_agg_loss_positional_arguments_follow_verl() -> None:
    x = _batch()
    loss, mask = x["loss"], x["mask"]
    with pytest.raises(ValueError, match="batch_num_tokens: the global count is required when dp_size > 1"):
        core_algos.agg_loss(loss, mask, "token-mean", 4)  # the 4th positional argument is dp_size, as verl
    tokens = float(mask.sum())
    got = core_algos.agg_loss(loss, mask, "token-mean", 2, 3 * tokens)  # batch_num_tokens, global count
    assert float(got) == pytest.approx(float((loss * mask).sum()) / (3 * tokens) * 2, rel=1e-6)
    seqs = float((mask.sum(-1) > 0).sum())
    for mode in ("seq-mean-token-sum", "seq-mean-token-mean"):
        local = core_algos.agg_loss(loss, mask, mode)
        got = core_algos.agg_loss(loss, mask, mode, dp_size=2, global_batch_size=2 * seqs)
        assert float(got) == pytest.approx(float(local), rel=1e-6)  # 2 ranks x this rank's share
    norm = core_algos.agg_loss(loss, mask, "seq-mean-token-sum-norm", loss_scale_factor=13.0)
    assert float(norm) == pytest.approx(float((loss * mask).sum()) / 13.0, rel=1e-6)


def test_estimators_accept_verls_config_keyword() -> None:
    rewards = torch.zeros(6, 4)
    rewards[:, -1] = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    mask = torch.ones(6, 4)
    index = np.array(["a", "a", "a", "b", "b", "b"], dtype=object)
    plain, _ = core_algos.compute_grpo_outcome_advantage(rewards, mask, index)
    with_cfg, _ = core_algos.compute_grpo_outcome_advantage(rewards, mask, index, config={"other": 1})
    assert torch.equal(plain, with_cfg)
    # as verl's: the config does not override the explicit argument (verl passes its AlgoConfig to every
    # estimator, dr_grpo included)
    dr, _ = core_algos.get_adv_estimator_fn("dr_grpo")(rewards, mask, index, config={"norm_adv_by_std_in_grpo": True})
    assert torch.equal(dr, core_algos.compute_grpo_outcome_advantage(rewards, mask, index,
                                                                     norm_adv_by_std_in_grpo=False)[0])
    for name in core_algos.adv_estimator_names():  # verl's trainer passes config= to every estimator
        core_algos.get_adv_estimator_fn(name)(token_level_rewards=rewards, response_mask=mask, index=index,
                                              config=None)


# ------------------------------------------------------------------------------ against verl itself


def _verl_missing() -> str | None:
    for mod in ("verl", "omegaconf"):
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed (pip install --no-deps verl; pip install omegaconf)"
    try:
        import verl.trainer.ppo.core_algos  # noqa: F401
    except Exception as e:  # verl's import pulls its own dependencies; name what failed
        return f"verl.trainer.ppo.core_algos does not import here: {type(e).__name__}: {e}"
    return None


VERL_MISSING = _verl_missing()
needs_verl = pytest.mark.skipif(VERL_MISSING is not None, reason=str(VERL_MISSING))


@needs_verl
def test_agg_loss_matches_verl() -> None:
    from verl.trainer.ppo import core_algos as verl_algos

    x = _batch(1)
    # seq-mean-token-sum-norm: verl 0.9 divides by the sequence count as well; ours (and the fused op) keep
    # verl 0.8's sum / loss_scale_factor, checked by formula in the test above.
    for mode in ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean"):
        for args in ((), (2, 100.0, 7.0)):
            ours = core_algos.agg_loss(x["loss"], x["mask"], mode, *args)
            theirs = verl_algos.agg_loss(x["loss"], x["mask"], mode, *args)
            assert_close(ours, theirs.float(), torch.float32, name=f"{mode} {args}")


@needs_verl
def test_our_policy_loss_and_estimators_run_from_verls_registries() -> None:
    from omegaconf import OmegaConf
    from verl.trainer.ppo import core_algos as verl_algos

    from rexrag_fast.integrations import verl as integration

    integration.register()
    integration.register()  # idempotent
    x = _batch(2)
    for mode in ("token-mean", "seq-mean-token-mean"):
        config = OmegaConf.create({"clip_ratio": 0.2, "clip_ratio_low": 0.2, "clip_ratio_high": 0.28,
                                   "clip_ratio_c": 3.0, "loss_agg_mode": mode,
                                   "global_batch_info": {"dp_size": 2, "batch_num_tokens": 40,
                                                         "global_batch_size": 10}})
        kwargs = dict(old_log_prob=x["old"], log_prob=x["new"], advantages=x["adv"], response_mask=x["mask"],
                      loss_agg_mode=mode, config=config, rollout_is_weights=None)
        ours, ours_m = verl_algos.get_policy_loss_fn(integration.POLICY_LOSS_NAME)(**kwargs)
        theirs, theirs_m = verl_algos.get_policy_loss_fn("vanilla")(**kwargs)
        assert_close(ours, theirs.float(), torch.float32, name=mode)
        assert ours_m.keys() <= theirs_m.keys() | {"actor/pg_clipfrac_lower"}
        for k, v in ours_m.items():
            assert v == pytest.approx(theirs_m[k], abs=1e-6), k
    rewards = torch.zeros(6, 4)
    rewards[:, -1] = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    mask = torch.ones(6, 4)
    index = np.array(["u1", "u1", "u1", "u2", "u2", "u2"], dtype=object)
    for ours_name, verl_name in (("rexrag_fast_grpo", "grpo"), ("rexrag_fast_rloo", "rloo")):
        fn = verl_algos.get_adv_estimator_fn(ours_name)
        cfg = OmegaConf.create({"norm_adv_by_std_in_grpo": True})
        adv, ret = fn(token_level_rewards=rewards, response_mask=mask, index=index, config=cfg)
        want, _ = verl_algos.get_adv_estimator_fn(verl_name)(token_level_rewards=rewards, response_mask=mask,
                                                             index=index, config=cfg)
        assert_close(adv, want, torch.float32, name=ours_name)
        assert torch.equal(adv, ret)
