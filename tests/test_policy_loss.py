"""fused_policy_loss (Triton under TRITON_INTERPRET=1, and the torch path) against policy_loss_reference:
loss, metrics and d loss / d logprobs (the reference differentiated by torch.autograd)."""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import subprocess
import sys

import pytest
import torch
from rexrag_fast.kernels import policy_loss as kernels

from rexrag_fast.ops import core_algos
from rexrag_fast.ops.policy_loss import METRIC_NAMES, fused_policy_loss, group_advantages, policy_loss_reference
from rexrag_fast.testing import assert_close, tolerance

BACKENDS = ("torch", "triton")
# (tokens T, group size, number of groups): T odd-sized, groups of 1, 2, 5, 16.
SHAPES = ((1, 1, 1), (7, 2, 2), (123, 5, 2), (1025, 16, 2))
ALPHAS = (0.0, 0.1, 0.5)


@dataclasses.dataclass
class Batch:
    lp: torch.Tensor
    old: torch.Tensor
    mask: torch.Tensor
    cu: torch.Tensor
    ref: torch.Tensor
    probe: torch.Tensor
    rewards: torch.Tensor
    group_ids: torch.Tensor
    advantages: torch.Tensor

    @property
    def dtype(self) -> torch.dtype:
        return self.lp.dtype


def make_batch(T: int, group_size: int, n_groups: int, *, dtype=torch.float32, seed: int = 0,
               masked_seqs: tuple[int, ...] = (), binary_rewards: bool = True) -> Batch:
    """A packed batch of B = group_size * n_groups sequences with random lengths summing to T (some empty),
    ratios and KL terms on both sides of every clamp, half the sequences probes, labels not contiguous."""
    g = torch.Generator().manual_seed(seed)
    B = group_size * n_groups
    cuts = torch.sort(torch.randint(0, T + 1, (B - 1,), generator=g)).values
    cu = torch.cat([torch.zeros(1, dtype=torch.long), cuts, torch.tensor([T])]).to(torch.int32)
    lp = -torch.rand(T, generator=g) * 3 - 0.01
    old = lp + torch.randn(T, generator=g) * 0.3
    ref = lp + torch.randn(T, generator=g) * 0.5
    if T >= 7:
        old[1], old[3] = lp[1] - 25.0, lp[3] + 25.0  # beyond the +-20 log-ratio clamp
        ref[2], ref[4] = lp[2] + 4.0, lp[4] - 30.0  # k3 beyond its clamps
    lengths = (cu[1:] - cu[:-1]).long()
    seq_of = torch.repeat_interleave(torch.arange(B), lengths)
    is_probe_seq = torch.rand(B, generator=g) < 0.5
    probe = torch.where(is_probe_seq[seq_of], old + torch.randn(T, generator=g) * 0.7, torch.tensor(-math.inf))
    mask = torch.rand(T, generator=g) < 0.8
    for s in masked_seqs:
        mask[cu[s]:cu[s + 1]] = False
    if binary_rewards:
        rewards = (torch.rand(B, generator=g) < 0.5).float()
    else:
        rewards = torch.randn(B, generator=g)
    group_ids = (torch.randperm(B, generator=g) % n_groups) * 7 - 3
    advantages = torch.randn(T, generator=g)
    cast = lambda t: t.to(dtype)  # noqa: E731
    return Batch(cast(lp), cast(old), mask, cu, cast(ref), cast(probe), rewards, group_ids, cast(advantages))


def batch_kwargs(b: Batch, *, precomputed: bool = False, with_ref: bool = True, alpha: float = 0.1) -> dict:
    kw = dict(cu_seqlens=b.cu, probe_logprobs=b.probe, alpha=alpha)
    if precomputed:
        kw["advantages"] = b.advantages
    else:
        kw.update(rewards=b.rewards, group_ids=b.group_ids)
    if with_ref:
        kw.update(ref_logprobs=b.ref, kl_coef=0.1)
    return kw


def run(fn, b: Batch, **kw) -> tuple[torch.Tensor, dict, torch.Tensor]:
    lp = b.lp.detach().clone().requires_grad_()
    loss, metrics = fn(lp, b.old, b.mask, **kw)
    loss.backward()
    return loss.detach(), metrics, lp.grad


def check_matches_reference(b: Batch, backend: str, **kw) -> None:
    loss_r, m_r, g_r = run(policy_loss_reference, b, **kw)
    loss, m, grad = run(fused_policy_loss, b, backend=backend, **kw)
    dtype = b.dtype
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_close(loss, loss_r, dtype, name="loss")
    assert set(m) == set(METRIC_NAMES)
    for name in METRIC_NAMES:
        assert m[name].dim() == 0, name
        assert_close(m[name], m_r[name], dtype, name=name)
    assert grad.dtype == b.lp.dtype and torch.isfinite(grad).all()
    atol = tolerance(dtype)[0] * max(float(g_r.abs().max()), 1e-6)
    assert_close(grad, g_r, dtype, atol=atol, name="d loss / d logprobs")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"T{s[0]}-g{s[1]}x{s[2]}")
def test_shapes_and_dtypes(shape, dtype, backend):
    b = make_batch(*shape, dtype=dtype, seed=shape[0], masked_seqs=(0,) if shape[0] > 1 else ())
    check_matches_reference(b, backend, **batch_kwargs(b))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("mode", core_algos.LOSS_AGG_MODES)
def test_agg_modes_and_policy_correction(mode, alpha, backend):
    b = make_batch(123, 5, 2, seed=1, masked_seqs=(3,))
    check_matches_reference(b, backend, loss_agg_mode=mode, **batch_kwargs(b, alpha=alpha))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kl_type", core_algos.KL_TYPES_ALL)
def test_kl_types(kl_type, backend):
    b = make_batch(123, 5, 2, seed=2)
    check_matches_reference(b, backend, kl_type=kl_type, loss_agg_mode="seq-mean-token-mean", **batch_kwargs(b))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("group_size", (1, 2, 5, 16))
@pytest.mark.parametrize("estimator", [("grpo", True), ("grpo", False), ("dr_grpo", True), ("rloo", True)],
                         ids=["grpo", "grpo-nostd", "dr_grpo", "rloo"])
def test_advantage_estimators(estimator, group_size, backend):
    b = make_batch(97, group_size, 3, seed=group_size, binary_rewards=group_size > 2)
    check_matches_reference(b, backend, adv_estimator=estimator[0], norm_adv_by_std=estimator[1],
                            **batch_kwargs(b, with_ref=False))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("clip", [dict(clip_ratio=0.2), dict(clip_ratio_low=0.2, clip_ratio_high=0.28),
                                  dict(clip_ratio=0.1, clip_ratio_c=1.5), dict(clip_ratio=0.0, clip_ratio_c=10.0)],
                         ids=["sym", "clip-higher", "tight-dual", "zero"])
def test_clip_settings(clip, backend):
    b = make_batch(123, 5, 2, seed=4, binary_rewards=False)
    check_matches_reference(b, backend, **clip, **batch_kwargs(b, alpha=0.5))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", core_algos.LOSS_AGG_MODES)
def test_precomputed_advantages(mode, backend):
    b = make_batch(123, 5, 2, seed=5, masked_seqs=(1,))
    check_matches_reference(b, backend, loss_agg_mode=mode, **batch_kwargs(b, precomputed=True))


@pytest.mark.parametrize("mode", core_algos.LOSS_AGG_MODES)
@pytest.mark.parametrize("precomputed", [False, True])
def test_triton_segments_across_blocks(mode, precomputed, monkeypatch):
    """Blocks of 16 tokens: sequences span blocks and blocks hold several sequences."""
    monkeypatch.setattr(kernels, "_block_size", lambda T: 16)
    b = make_batch(123, 5, 2, seed=6, masked_seqs=(2,))
    check_matches_reference(b, "triton", loss_agg_mode=mode, **batch_kwargs(b, precomputed=precomputed))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", core_algos.LOSS_AGG_MODES)
def test_padded_layout_equals_packed(mode, backend):
    B, L = 6, 11
    b = make_batch(B * L, 3, 2, seed=7)
    b.cu = torch.arange(B + 1, dtype=torch.int32) * L
    packed = run(fused_policy_loss, b, backend=backend, loss_agg_mode=mode, **batch_kwargs(b))
    pad = lambda t: t.reshape(B, L)  # noqa: E731
    padded = dataclasses.replace(b, lp=pad(b.lp), old=pad(b.old), mask=pad(b.mask), ref=pad(b.ref),
                                 probe=pad(b.probe), advantages=pad(b.advantages))
    kw = batch_kwargs(padded)
    del kw["cu_seqlens"]
    loss, metrics, grad = run(fused_policy_loss, padded, backend=backend, loss_agg_mode=mode, **kw)
    assert_close(loss, packed[0], torch.float32, name="loss")  # the torch path sums padded rows by reshape
    assert_close(grad.reshape(-1), packed[2], torch.float32, atol=1e-7, name="grad")
    check_matches_reference(padded, backend, loss_agg_mode=mode, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_alpha_zero_is_bitwise_plain_ppo(backend):
    b = make_batch(123, 5, 2, seed=8)
    kw = batch_kwargs(b, alpha=0.0)
    with_probe = run(fused_policy_loss, b, backend=backend, **kw)
    del kw["probe_logprobs"]
    plain = run(fused_policy_loss, b, backend=backend, **kw)
    assert torch.equal(with_probe[0], plain[0])
    assert torch.equal(with_probe[2], plain[2])
    assert all(torch.equal(with_probe[1][k], plain[1][k]) for k in METRIC_NAMES)
    assert plain[1]["is_weight_mean"].item() == 1.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_originals_get_log_one_minus_alpha(backend):
    b = make_batch(50, 2, 2, seed=9)
    b.probe = torch.full_like(b.probe, -math.inf)
    alpha = 0.25
    shifted = dataclasses.replace(b, old=b.old + math.log1p(-alpha))
    kw = batch_kwargs(b, alpha=alpha)
    corrected = run(fused_policy_loss, b, backend=backend, **kw)
    kw_plain = batch_kwargs(shifted, alpha=0.0)
    plain = run(fused_policy_loss, shifted, backend=backend, **kw_plain)
    assert_close(corrected[0], plain[0], torch.float32, name="loss")
    assert_close(corrected[2], plain[2], torch.float32, atol=1e-7, name="grad")
    assert_close(corrected[1]["is_weight_mean"], torch.tensor(1 / (1 - alpha)), torch.float32, name="is_weight")


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_variance_groups_have_zero_advantage(backend):
    b = make_batch(60, 4, 3, seed=10)
    b.rewards = torch.ones_like(b.rewards)
    adv = group_advantages(b.rewards, b.group_ids)
    assert adv.abs().max().item() == 0.0
    loss, metrics, grad = run(fused_policy_loss, b, backend=backend, **batch_kwargs(b, with_ref=False))
    assert loss.item() == 0.0 and grad.abs().max().item() == 0.0
    assert all(torch.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", core_algos.LOSS_AGG_MODES)
def test_all_masked_batch_gives_zero_loss_and_no_nan(mode, backend):
    b = make_batch(40, 2, 2, seed=11)
    b.mask = torch.zeros_like(b.mask)
    b.old[5] = float("nan")  # garbage under the mask must not leak
    loss, metrics, grad = run(fused_policy_loss, b, backend=backend, loss_agg_mode=mode, **batch_kwargs(b))
    assert loss.item() == 0.0
    assert all(v.item() == 0.0 for k, v in metrics.items() if k not in ("ratio_mean", "is_weight_mean"))
    assert torch.isfinite(grad).all() and grad.abs().max().item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_garbage_does_not_change_result(backend):
    b = make_batch(123, 5, 2, seed=12)
    clean = run(fused_policy_loss, b, backend=backend, **batch_kwargs(b))
    dirty = dataclasses.replace(b, old=b.old.clone(), ref=b.ref.clone())
    dirty.old[~b.mask] = float("nan")
    dirty.ref[~b.mask] = float("inf")
    noisy = run(fused_policy_loss, dirty, backend=backend, **batch_kwargs(dirty))
    assert torch.equal(clean[0], noisy[0]) and torch.equal(clean[2], noisy[2])


def _kernel_group_advantages(rewards, ids, estimator):
    return kernels.group_advantages(rewards, ids, estimator, 1e-6)


@pytest.mark.parametrize("impl", [group_advantages, _kernel_group_advantages], ids=["torch", "triton"])
@pytest.mark.parametrize("group_size", (1, 2, 5, 16))
@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo"])
def test_group_advantages_match_verl_functions(estimator, group_size, impl):
    g = torch.Generator().manual_seed(group_size)
    B = 3 * group_size
    rewards = torch.randn(B, generator=g)
    rewards[:group_size] = 0.5  # one group of equal rewards (zero variance) when groups are sorted
    ids = (torch.arange(B) // group_size) * 1000 - 17
    perm = torch.randperm(B, generator=g)
    rewards, ids = rewards[perm].contiguous(), ids[perm].contiguous()
    fused = impl(rewards, ids, estimator)
    if estimator == "rloo":
        expected, _ = core_algos.compute_rloo_outcome_advantage(rewards[:, None], torch.ones(B, 1), ids)
    else:
        expected, _ = core_algos.compute_grpo_outcome_advantage(rewards[:, None], torch.ones(B, 1), ids,
                                                                norm_adv_by_std_in_grpo=estimator == "grpo")
    assert_close(fused, expected[:, 0], torch.float32, name=estimator)
    assert torch.isfinite(fused).all()


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the interpreter computing inf - inf
@pytest.mark.parametrize("backend", BACKENDS)
def test_check_inputs_false_skips_only_value_checks(backend):
    b = make_batch(60, 2, 3, seed=16)
    checked = run(fused_policy_loss, b, backend=backend, **batch_kwargs(b))
    unchecked = run(fused_policy_loss, b, backend=backend, check_inputs=False, **batch_kwargs(b))
    assert torch.equal(checked[0], unchecked[0]) and torch.equal(checked[2], unchecked[2])
    b.rewards[0] = math.inf
    with pytest.raises(ValueError, match="rewards"):
        run(fused_policy_loss, b, backend=backend, **batch_kwargs(b))
    run(fused_policy_loss, b, backend=backend, check_inputs=False, **batch_kwargs(b))
    with pytest.raises(ValueError, match="old_logprobs"):
        fused_policy_loss(b.lp, b.old[:3], b.mask, backend=backend, check_inputs=False, **batch_kwargs(b))


def test_metric_and_kl_tables_agree_between_op_and_kernels():
    from rexrag_fast.ops import policy_loss as op

    assert op.METRIC_NAMES == kernels.METRIC_NAMES
    assert set(op._KL_KIND.values()) == set(kernels.KL_KINDS)  # the launcher owns the codes


def test_rejects_bad_arguments():
    b = make_batch(20, 2, 2, seed=13)
    kw = batch_kwargs(b)
    lp = b.lp.clone()
    cases = [
        (dict(old_logprobs=b.old[:-1]), "old_logprobs"),
        (dict(old_logprobs=b.old.to(torch.bfloat16)), "old_logprobs"),
        (dict(old_logprobs=torch.empty(20, device="meta")), "old_logprobs"),
        (dict(response_mask=b.mask[:5]), "response_mask"),
        (dict(ref_logprobs=b.ref.double()), "ref_logprobs"),
        (dict(probe_logprobs=b.probe[:3]), "probe_logprobs"),
        (dict(rewards=b.rewards[:-1]), "rewards"),
        (dict(rewards=torch.tensor([1.0, math.inf, 0.0, 0.0])), "rewards"),
        (dict(rewards=torch.tensor([1.0, math.nan, 0.0, 0.0])), "rewards"),
        (dict(group_ids=b.group_ids.float()), "group_ids"),
        (dict(group_ids=None), "group_ids"),
        (dict(advantages=torch.zeros(20)), "advantages"),
        (dict(cu_seqlens=b.cu.long()), "cu_seqlens"),
        (dict(cu_seqlens=torch.tensor([0, 5, 3, 9, 20], dtype=torch.int32)), "cu_seqlens"),
        (dict(cu_seqlens=torch.tensor([0, 5, 10, 15, 19], dtype=torch.int32)), "cu_seqlens"),
        (dict(cu_seqlens=None), "cu_seqlens"),
        (dict(loss_agg_mode="token-sum"), "loss_agg_mode"),
        (dict(kl_type="k5"), "kl_type"),
        (dict(adv_estimator="ppo"), "adv_estimator"),
        (dict(alpha=1.0), "alpha"),
        (dict(alpha=0.2, probe_logprobs=None), "probe_logprobs"),
        (dict(clip_ratio_c=1.0), "clip_ratio_c"),
        (dict(clip_ratio_low=-0.1), "clip_ratio_low"),
        (dict(backend="cuda"), "backend"),
        (dict(loss_scale_factor=0.0), "loss_scale_factor"),
    ]
    for override, name in cases:
        args = {"old_logprobs": b.old, "response_mask": b.mask, **kw, **override}
        with pytest.raises((ValueError, TypeError, RuntimeError), match=name):
            fused_policy_loss(lp, args.pop("old_logprobs"), args.pop("response_mask"), **args)


def test_rejects_logprobs_of_wrong_rank_or_dtype():
    x = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match="logprobs"):
        fused_policy_loss(x, x, x, advantages=x)
    y = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(TypeError, match="logprobs"):
        fused_policy_loss(y, y, y, advantages=y, cu_seqlens=torch.tensor([0, 4], dtype=torch.int32))


def test_explicit_loss_scale_factor():
    b = make_batch(123, 5, 2, seed=14)
    for backend in BACKENDS:
        check_matches_reference(b, backend, loss_agg_mode="seq-mean-token-sum-norm", loss_scale_factor=512.0,
                                **batch_kwargs(b))


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"T{s[0]}-g{s[1]}x{s[2]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sweep(shape, dtype, backend):
    """Every aggregation x estimator x alpha on every shape and dtype; KL types and clip settings rotate
    through the combinations so that each one meets every shape."""
    b = make_batch(*shape, dtype=dtype, seed=sum(shape), masked_seqs=(0,) if shape[0] > 1 else ())
    kl_types = itertools.cycle(core_algos.KL_TYPES_ALL)
    clips = itertools.cycle([dict(clip_ratio=0.2), dict(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=1.5),
                             dict(clip_ratio=0.0, clip_ratio_c=10.0)])
    estimators = [("grpo", True), ("grpo", False), ("dr_grpo", True), ("rloo", True)]
    for mode, (estimator, by_std), alpha in itertools.product(core_algos.LOSS_AGG_MODES, estimators, ALPHAS):
        check_matches_reference(b, backend, loss_agg_mode=mode, kl_type=next(kl_types), adv_estimator=estimator,
                                norm_adv_by_std=by_std, **next(clips), **batch_kwargs(b, alpha=alpha))


_COMPILE_FOR_SM90 = """
import os
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from rexrag_fast.kernels import policy_loss as K

def build(fn, sig, consts):
    sig = {**sig, **{k: "constexpr" for k in consts}}
    out = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32))
    assert out.asm["cubin"], fn

f = "*fp32"
tok = {"lp_ptr": "*bf16", "old_ptr": "*bf16", "mask_ptr": "*i1", "adv_ptr": f, "ref_ptr": "*bf16",
       "probe_ptr": "*bf16", "cu_ptr": "*i32"}
scal = {"T": "i32", "B": "i32", "lo_bound": "fp32", "hi_bound": "fp32", "clip_c": "fp32", "log1m_alpha": "fp32",
        "log_alpha": "fp32"}
flags = {"ADV_PER_TOKEN": False, "HAS_REF": True, "HAS_PROBE": True, "KL_KIND": 3, "NEED_SEQ": True, "LOG2_B": 9,
         "BLOCK": 1024}
build(K._policy_loss_fwd_kernel, {**tok, "partial_ptr": f, "seq_sum_ptr": f, **scal},
      {**flags, "PER_SEQ": True, "N_COLS": 8})
build(K._policy_loss_bwd_kernel, {**tok, "grad_out_ptr": f, "weight_ptr": f, "dlp_ptr": "*bf16", **scal,
      "kl_coef": "fp32"}, {**flags, "KL_STRAIGHT": False, "WEIGHT_PER_SEQ": True})
build(K._group_advantage_kernel, {"r_ptr": f, "gid_ptr": "*i64", "adv_ptr": f, "B": "i32", "epsilon": "fp32"},
      {"ESTIMATOR": 0, "BLOCK_B": 512})
build(K._policy_loss_finalize_kernel, {"partial_ptr": f, "n_rows": "i32", "seq_sum_ptr": f, "cu_ptr": "*i32",
      "B": "i32", "scale": "fp32", "kl_coef": "fp32", "loss_ptr": f, "weight_ptr": f, "metric_ptr": f},
      {"AGG": 2, "SCALE_FROM_CU": True, "HAS_REF": True, "N_COLS": 8, "BLOCK_R": 256, "BLOCK_B": 512})
print("compiled")
"""


def test_kernels_compile_for_hopper_without_a_gpu():
    """Lower every kernel to a cubin for sm_90 (ptxas ships with Triton), catching GPU-only compile errors
    that the interpreter cannot see. Runs in a subprocess because TRITON_INTERPRET is fixed at import."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE_FOR_SM90], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.parametrize("mode", core_algos.LOSS_AGG_MODES)
def test_cuda_triton_matches_reference(mode):
    b = make_batch(65536, 16, 32, seed=15, masked_seqs=(0, 7))
    cuda = lambda t: t.cuda() if isinstance(t, torch.Tensor) else t  # noqa: E731
    b = Batch(**{f.name: cuda(getattr(b, f.name)) for f in dataclasses.fields(Batch)})
    check_matches_reference(b, "auto", loss_agg_mode=mode, **batch_kwargs(b))
