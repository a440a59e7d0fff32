"""fused_policy_loss's boundary: the cheap checks that stay on with check_inputs=False (cu_seqlens offsets
on CPU tensors and the torch path, finite in-range scalars), and the value checks of check_inputs (a mask
must be 0/1). Each case used to crash the process or return a NaN, 0 or wrong loss without a word."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from test_policy_loss import BACKENDS, batch_kwargs, make_batch, run

from rexrag_fast.ops.policy_loss import fused_policy_loss

# A negative length used to abort the whole process (`free(): invalid pointer` from repeat_interleave's
# output_size), so the calls run in a child process: a crash there is a failed assertion here.
_NEGATIVE_LENGTH = """
import torch
from rexrag_fast.ops.policy_loss import fused_policy_loss
T = 12
lp = -torch.rand(T)
cu = torch.tensor([0, 9, 4, 12], dtype=torch.int32)  # lengths 9, -5, 8
for backend in ("torch", "triton"):
    for check in (True, False):
        try:
            fused_policy_loss(lp, lp, torch.ones(T, dtype=torch.bool), rewards=torch.tensor([1.0, 0.0, 1.0]),
                              group_ids=torch.tensor([0, 0, 0]), cu_seqlens=cu, backend=backend,
                              check_inputs=check)
            print("accepted", backend, check)
        except ValueError as e:
            print("refused", backend, check, str(e).split(":")[0])
"""


def test_negative_length_in_cu_seqlens_is_refused_even_unchecked() -> None:
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", _NEGATIVE_LENGTH], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split("\n")[:4] == [f"refused {b} {c} cu_seqlens" for b in ("torch", "triton")
                                           for c in (True, False)], done.stdout


def _equal_rewards_batch():
    b = make_batch(40, 2, 2, seed=21)
    b.rewards = torch.ones_like(b.rewards)  # std 0 in every group: the advantage is 0 / (0 + epsilon)
    return b


@pytest.mark.parametrize("check_inputs", [True, False])
@pytest.mark.parametrize(
    ("override", "name"),
    [
        (dict(epsilon=0.0), "epsilon"),
        (dict(epsilon=math.nan), "epsilon"),
        (dict(epsilon=-1e-6), "epsilon"),
        (dict(epsilon=math.inf), "epsilon"),
        (dict(loss_scale_factor=math.inf, loss_agg_mode="seq-mean-token-sum-norm"), "loss_scale_factor"),
        (dict(loss_scale_factor=math.nan, loss_agg_mode="seq-mean-token-sum-norm"), "loss_scale_factor"),
        (dict(clip_ratio_c=math.inf), "clip_ratio_c"),
        (dict(clip_ratio_c=math.nan), "clip_ratio_c"),
        (dict(kl_coef=math.nan), "kl_coef"),
        (dict(alpha=math.nan), "alpha"),
    ],
    ids=lambda x: x if isinstance(x, str) else ",".join(f"{k}={v}" for k, v in x.items()),
)
def test_scalars_must_be_finite_and_in_range(override: dict, name: str, check_inputs: bool) -> None:
    b = _equal_rewards_batch()
    kw = {**batch_kwargs(b), **override}
    with pytest.raises(ValueError, match=rf"^{name}: "):
        run(fused_policy_loss, b, backend="torch", check_inputs=check_inputs, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_equal_rewards_give_a_finite_loss(backend: str) -> None:
    b = _equal_rewards_batch()
    loss, metrics, grad = run(fused_policy_loss, b, backend=backend, epsilon=1e-6, **batch_kwargs(b))
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert float(metrics["pg_loss"]) == 0.0  # every advantage is 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_values_must_be_zero_or_one(backend: str) -> None:
    b = make_batch(40, 2, 2, seed=22)
    kw = batch_kwargs(b)
    as_bool = run(fused_policy_loss, b, backend=backend, **kw)
    lp = b.lp.detach().clone()
    for mask in (b.mask.float(), b.mask.to(torch.int64), b.mask.to(torch.uint8)):  # 0/1 in any dtype: the same
        loss, _ = fused_policy_loss(lp, b.old, mask, backend=backend, **kw)
        assert torch.equal(loss, as_bool[0])
    half = b.mask.float()
    half[half > 0] = 0.5
    with pytest.raises(ValueError, match=r"response_mask: expected 0/1 values .* such as \[0\.5"):
        fused_policy_loss(lp, b.old, half, backend=backend, **kw)
    two = b.mask.to(torch.int32) * 2
    with pytest.raises(ValueError, match=r"response_mask: expected 0/1 values"):
        fused_policy_loss(lp, b.old, two, backend=backend, **kw)
    # check_inputs=False reads no values: a non-bool mask then selects every non-zero token (documented).
    loss, _ = fused_policy_loss(lp, b.old, half, backend=backend, check_inputs=False, **kw)
    assert torch.equal(loss, as_bool[0])


def test_nan_logprobs_give_a_nan_loss_that_the_trainer_must_catch() -> None:
    """The op does not read log-prob values (that would cost a pass and a sync): NaN gives a NaN loss, which
    rexrag_fast.train.finite_guard turns into a skipped update."""
    b = make_batch(40, 2, 2, seed=23)
    b.old[b.mask.nonzero()[0, 0]] = math.nan
    loss, _, _ = run(fused_policy_loss, b, backend="torch", **batch_kwargs(b))
    assert math.isnan(float(loss))
