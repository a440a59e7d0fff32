"""Benchmark stage `policy_loss`: fused_policy_loss vs the eager verl composition, forward + backward.

The eager baseline runs the verl-compatible functions one op at a time, as verl's actor does:
GRPO advantage, REX-RAG behaviour mixture, ratio / clip / dual clip (compute_policy_loss), k3 KL
(kl_penalty), agg_loss twice, then autograd backward. The fused op gets the same padded [B, L] fp32
batch. On CPU (preset tiny) the fused op runs its torch backend; on a GPU (preset qwen2.5-3b) it runs the
Triton kernels, and two more rows report achieved memory bandwidth as a fraction of the card's peak:
for the whole op (argument checks, launches, autograd) and for the kernels alone (CUDA events); the target is
>= 80% of HBM bandwidth for the kernels. Every fused row carries its roofline (bytes and FLOPs per call
against the device's ceilings; on the CPU the measured read bandwidth of this machine).
"""

from __future__ import annotations

import torch

from bench.harness import Progress, Roofline, Row, device_peaks, quick, skip, stage, time_fn
from rexrag_fast.ops import core_algos
from rexrag_fast.ops.linear_logprobs import linear_logprobs
from rexrag_fast.ops.policy_loss import fused_policy_loss

# Arithmetic per token, forward + backward, transcendentals counted as one: ratio exp, mixture logaddexp,
# clip / dual clip, k3 KL (exp), aggregation, and their derivatives. Negligible next to the bytes moved.
FLOPS_PER_TOKEN = 40
SEQ_LEN = 512
GROUP_SIZE = 8
TOKENS = {"tiny": (8192, 65536), "qwen2.5-3b": (8192, 65536, 262144)}
# The peer comparison with Liger's GRPO loss, which starts from hidden states and the lm head: sequences x
# length, hidden size, vocabulary (CPU: small enough for one thread; GPU: Qwen2.5-3B's head, 16k tokens).
LIGER_SHAPES = {"tiny": (8, 128, 128, 32000), "qwen2.5-3b": (32, 512, 2048, 151936), "quick": (4, 64, 64, 4096)}
OPTIONS = dict(clip_ratio=0.2, clip_ratio_c=3.0, kl_coef=0.001, kl_type="low_var_kl", alpha=0.1,
               loss_agg_mode="token-mean")


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
                 clip_c=OPTIONS["clip_ratio_c"], log1m_alpha=math.log1p(-alpha), log_alpha=math.log(alpha),
                 kl_kind="k3")

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
        for T in TOKENS[preset][:1] if quick() else TOKENS[preset]:
            rows.extend(_measure(T, device, backend, card, sync, progress))
        rows.extend(_liger_grpo_rows(preset, device, card, sync, progress))
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
    peaks = device_peaks(device)
    work = dict(bytes=_bytes_moved(b), flops=FLOPS_PER_TOKEN * T, peaks=peaks)
    rows = [Row("policy_loss", f"fwd+bwd T={T}", T / fused_s, "tokens/s", T / eager_s, "eager verl core_algos",
                config, {"fused_ms": fused_s * 1e3, "eager_ms": eager_s * 1e3}, Roofline(seconds=fused_s, **work))]
    if cuda:
        kernel_s = _kernel_seconds(b)
        for name, seconds in ((f"bandwidth T={T} (whole op)", fused_s), (f"bandwidth T={T} (kernels)", kernel_s)):
            roof = Roofline(seconds=seconds, **work)
            rows.append(Row("policy_loss", name, roof.bandwidth_fraction, "fraction of peak BW (target 0.8)", None,
                            "", config, {"GB/s": work["bytes"] / seconds / 1e9, "ms": seconds * 1e3}, roof))
    return rows


def _liger_grpo_rows(preset: str, device: torch.device, card: str, sync, progress: Progress) -> list[Row]:
    """Hidden states -> GRPO loss (token-mean, clip 0.2, k3 KL 0.001), forward + backward to hidden and head:
    ours (linear_logprobs, then fused_policy_loss) vs Liger-Kernel's chunked LigerFusedLinearGRPOLoss
    (loss_type 'dapo' = token-mean over the batch). Liger's loss math runs eager (compiled=False): its
    torch.compile would take a large share of the GPU check's time budget; the chunked matmuls dominate."""
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    except ImportError as e:
        skip("policy_loss", "Liger GRPO loss (peer)", f"liger-kernel not importable ({e}); pip install -e '.[peers]'")
        return []
    cuda = device.type == "cuda"
    B, L, H, V = LIGER_SHAPES["quick" if quick() and not cuda else preset]
    dtype = torch.bfloat16 if cuda else torch.float32
    g = torch.Generator(device=device).manual_seed(1)
    h = torch.randn(B, L, H, device=device, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(V, H, device=device, generator=g) * H**-0.5).to(dtype).requires_grad_()
    y = torch.randint(0, V, (B, L), device=device, generator=g)
    mask = torch.ones(B, L, dtype=torch.bool, device=device)
    with torch.no_grad():
        lp0 = linear_logprobs(h.reshape(-1, H), w, y.reshape(-1)).reshape(B, L).float()
    old = lp0 + 0.1 * torch.randn(B, L, device=device, generator=g)
    ref = lp0 + 0.1 * torch.randn(B, L, device=device, generator=g)
    rewards = (torch.rand(B, device=device, generator=g) < 0.5).float()
    group_ids = torch.arange(B, device=device) // GROUP_SIZE
    adv, _ = core_algos.compute_grpo_outcome_advantage(
        torch.zeros(B, L, device=device).index_fill_(1, torch.tensor([0], device=device), 1.0) * rewards[:, None],
        mask.float(), group_ids)
    liger = LigerFusedLinearGRPOLoss(beta=OPTIONS["kl_coef"], compiled=False, use_ref_model=True,
                                     epsilon_low=OPTIONS["clip_ratio"], epsilon_high=OPTIONS["clip_ratio"],
                                     loss_type="dapo")

    def ours() -> None:
        lp = linear_logprobs(h.reshape(-1, H), w, y.reshape(-1)).reshape(B, L)
        loss, _ = fused_policy_loss(lp, old, mask, rewards=rewards, group_ids=group_ids, ref_logprobs=ref,
                                    kl_coef=OPTIONS["kl_coef"], kl_type="k3", clip_ratio=OPTIONS["clip_ratio"],
                                    clip_ratio_c=1e9, loss_agg_mode="token-mean")
        torch.autograd.grad(loss, (h, w))

    def theirs() -> None:
        loss, _ = liger(h, w, y, mask.long(), adv[:, 0], ref_per_token_logps=ref, old_per_token_logps=old)
        torch.autograd.grad(loss, (h, w))

    progress(f"Liger GRPO peer: B={B} L={L} H={H} V={V}")
    kw = dict(warmup=1, min_repeats=3 if cuda else 2, min_seconds=0.0, sync=sync)
    ours_s = time_fn(ours, **kw)
    theirs_s = time_fn(theirs, **kw)
    T = B * L
    config = (f"B={B} x L={L}, H={H}, V={V}, {str(dtype).removeprefix('torch.')}, {card}"
              + ("" if cuda else ", 1 thread"))
    flops = 8 * T * H * V
    roof = Roofline(bytes=3 * (T + V) * H * h.element_size() + 5 * T * 4, flops=flops, seconds=ours_s,
                    peaks=device_peaks(device))
    return [Row("policy_loss", f"hidden -> GRPO loss fwd+bwd T={T}", T / ours_s, "tokens/s", T / theirs_s,
                "Liger chunked GRPO loss (eager)", config, {"ours_ms": ours_s * 1e3, "liger_ms": theirs_s * 1e3}, roof)]
