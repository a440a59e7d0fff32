"""Benchmark stage `policy_loss`: fused_policy_loss vs the eager verl composition, forward + backward.

The eager baseline runs the verl-compatible functions one op at a time, as verl's actor does:
GRPO advantage, REX-RAG behaviour mixture, ratio / clip / dual clip (compute_policy_loss), k3 KL
(kl_penalty), agg_loss twice, then autograd backward. The fused op gets the same padded [B, L] fp32
batch. On CPU (preset tiny) the fused op runs its torch backend; on a GPU (preset qwen2.5-3b) it runs the
Triton kernels, and two more rows report achieved memory bandwidth as a fraction of the card's peak:
for the whole op (argument checks, launches, autograd) and for the kernels alone (CUDA events).
"""

from __future__ import annotations

import torch

from bench.harness import Progress, Row, stage, time_fn
from rexrag_fast.ops import core_algos
from rexrag_fast.ops.policy_loss import fused_policy_loss

# Peak HBM bandwidth (bytes/s) by device-name substring; the first match wins (PCIe before SXM H100).
PEAK_BANDWIDTH = (("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("H200", 4.8e12))
SEQ_LEN = 512
GROUP_SIZE = 8
TOKENS = {"tiny": (8192, 65536), "qwen2.5-3b": (8192, 65536, 262144)}
OPTIONS = dict(clip_ratio=0.2, clip_ratio_c=3.0, kl_coef=0.001, kl_type="low_var_kl", alpha=0.1,
               loss_agg_mode="token-mean")


def _peak_bandwidth(name: str) -> float | None:
    return next((peak for key, peak in PEAK_BANDWIDTH if key in name), None)


def _batch(T: int, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    B = T // SEQ_LEN
    lp = -torch.rand(B, SEQ_LEN, generator=g) * 3
    old = lp + torch.randn(B, SEQ_LEN, generator=g) * 0.2
    ref = lp + torch.randn(B, SEQ_LEN, generator=g) * 0.2
    probe_rows = torch.rand(B, 1, generator=g) < 0.3
    probe = torch.where(probe_rows, old + torch.randn(B, SEQ_LEN, generator=g) * 0.5, torch.tensor(-float("inf")))
    lengths = torch.randint(SEQ_LEN // 4, SEQ_LEN + 1, (B, 1), generator=g)
    mask = torch.arange(SEQ_LEN)[None, :] < lengths
    rewards = (torch.rand(B, generator=g) < 0.5).float()
    group_ids = torch.arange(B) // GROUP_SIZE
    out = dict(lp=lp, old=old, ref=ref, probe=probe, mask=mask, rewards=rewards, group_ids=group_ids)
    return {k: v.to(device) for k, v in out.items()}


def _eager_step(b: dict[str, torch.Tensor], lp: torch.Tensor) -> torch.Tensor:
    mask = b["mask"].float()
    token_rewards = torch.zeros_like(mask)
    token_rewards[:, 0] = b["rewards"]
    adv, _ = core_algos.compute_grpo_outcome_advantage(token_rewards, mask, b["group_ids"])
    beh = core_algos.behaviour_log_prob(b["old"], b["probe"], OPTIONS["alpha"])
    pg_loss, *_ = core_algos.compute_policy_loss(beh, lp, adv, mask, cliprange=OPTIONS["clip_ratio"],
                                                 clip_ratio_c=OPTIONS["clip_ratio_c"],
                                                 loss_agg_mode=OPTIONS["loss_agg_mode"])
    kld = core_algos.kl_penalty(lp, b["ref"], OPTIONS["kl_type"])
    loss = pg_loss + core_algos.agg_loss(kld, mask, OPTIONS["loss_agg_mode"]) * OPTIONS["kl_coef"]
    loss.backward()
    return loss


def _fused_step(b: dict[str, torch.Tensor], lp: torch.Tensor, backend: str) -> torch.Tensor:
    loss, _ = fused_policy_loss(lp, b["old"], b["mask"], rewards=b["rewards"], group_ids=b["group_ids"],
                                ref_logprobs=b["ref"], probe_logprobs=b["probe"], backend=backend, **OPTIONS)
    loss.backward()
    return loss


def _bytes_moved(b: dict[str, torch.Tensor]) -> int:
    """HBM traffic of the fused op: forward and backward each read lp, old, ref, probe and the mask;
    backward writes d lp. Per-sequence tensors are negligible."""
    per_pass = sum(b[k].numel() * b[k].element_size() for k in ("lp", "old", "ref", "probe", "mask"))
    return 2 * per_pass + b["lp"].numel() * b["lp"].element_size()


def _kernel_seconds(b: dict[str, torch.Tensor], repeats: int = 50) -> float:
    """Device seconds per forward + finalize + backward launch of the Triton kernels alone (no argument
    checks, no autograd), from CUDA events around `repeats` back-to-back calls."""
    import math

    from rexrag_fast.kernels import policy_loss as kernels

    B, L = b["lp"].shape
    flat = {k: b[k].reshape(-1) for k in ("lp", "old", "ref", "probe", "mask")}
    cu = torch.arange(B + 1, dtype=torch.int32, device=b["lp"].device) * L
    adv = kernels.group_advantages(b["rewards"], b["group_ids"], "grpo", 1e-6)
    grad_out = torch.ones((), device=b["lp"].device)
    alpha = OPTIONS["alpha"]
    terms = dict(adv_seq=adv, adv_tok=None, ref=flat["ref"], probe=flat["probe"],
                 lo_bound=1 - OPTIONS["clip_ratio"], hi_bound=1 + OPTIONS["clip_ratio"],
                 clip_c=OPTIONS["clip_ratio_c"], ratio_clamp=20.0, log1m_alpha=math.log1p(-alpha),
                 log_alpha=math.log(alpha), kl_kind="k3")

    def once() -> None:
        _, weight, _ = kernels.policy_loss_forward(flat["lp"], flat["old"], flat["mask"], cu, **terms,
                                                   kl_coef=OPTIONS["kl_coef"], agg_mode="token-mean", scale=None)
        kernels.policy_loss_backward(flat["lp"], flat["old"], flat["mask"], cu, grad_out, weight, **terms,
                                     kl_coef=OPTIONS["kl_coef"], kl_straight=False, weight_per_seq=False)

    for _ in range(3):
        once()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        once()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / repeats


@stage("policy_loss")
def run(preset: str, progress: Progress) -> list[Row]:
    cuda = preset != "tiny" and torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    backend = "triton" if cuda else "torch"
    sync = torch.cuda.synchronize if cuda else None
    card = torch.cuda.get_device_name(device) if cuda else "CPU"
    rows: list[Row] = []
    threads = torch.get_num_threads()
    if not cuda:
        # One intra-op thread: on a shared, loaded CPU OpenMP regions stall on descheduled workers and the
        # timings become noise; both paths run under the same setting.
        torch.set_num_threads(1)
    try:
        for T in TOKENS[preset]:
            rows.extend(_measure(T, device, backend, card, sync, progress))
    finally:
        torch.set_num_threads(threads)
    return rows


def _measure(T: int, device: torch.device, backend: str, card: str, sync, progress: Progress) -> list[Row]:
    """Rows for one token count: tokens/s of fused vs eager, and on a GPU the achieved bandwidth."""
    cuda = device.type == "cuda"
    b = _batch(T, device)
    lp = b["lp"].clone().requires_grad_()
    config = (f"T={T} (B={T // SEQ_LEN} x L={SEQ_LEN}), fp32, grpo, k3, alpha=0.1, {backend}, "
              f"{card}{'' if cuda else ', 1 thread'}")
    progress(f"T={T}: eager")
    eager_s = time_fn(lambda: _eager_step(b, lp), warmup=2, min_repeats=5, min_seconds=0.5, sync=sync)
    progress(f"T={T}: fused ({backend})")
    fused_s = time_fn(lambda: _fused_step(b, lp, backend), warmup=2, min_repeats=5, min_seconds=0.5, sync=sync)
    rows = [Row("policy_loss", f"fwd+bwd T={T}", T / fused_s, "tokens/s", T / eager_s, "eager verl core_algos",
                config, {"fused_ms": fused_s * 1e3, "eager_ms": eager_s * 1e3})]
    if cuda:
        peak = _peak_bandwidth(card)
        kernel_s = _kernel_seconds(b)
        for name, seconds in ((f"bandwidth T={T} (whole op)", fused_s), (f"bandwidth T={T} (kernels)", kernel_s)):
            achieved = _bytes_moved(b) / seconds
            if peak is not None:
                rows.append(Row("policy_loss", name, achieved / peak, "fraction of peak", None, "", config,
                                {"GB/s": achieved / 1e9, "peak GB/s": peak / 1e9, "ms": seconds * 1e3}))
            else:
                rows.append(Row("policy_loss", name, achieved / 1e9, "GB/s", None, "", config,
                                {"note": f"no peak bandwidth known for {card}", "ms": seconds * 1e3}))
    return rows
