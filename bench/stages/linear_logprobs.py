"""Benchmark stage `linear_logprobs`: fused lm-head -> log-prob + entropy vs the materialised PyTorch path.

Both paths compute logprobs and entropies of T tokens against a [V, H] lm head and back-propagate
sum(logprob) + sum(entropy) to hidden and weight. The baseline is `linear_logprobs_reference`
(hidden @ weight.T, log_softmax, gather, softmax-weighted entropy, all [T, V] tensors kept for autograd).
Peers, timed in the same run when installed (the optional extra `[peers]`; skipped with the reason otherwise):
Liger-Kernel's fused linear cross entropy (logprobs only, reduction sum; Triton, so CUDA only) and verl's
linear_cross_entropy kernel (log-probs and entropy, as ours; Triton, CUDA only). Targets: peak extra memory
<= 1/10 of the materialised path's, faster than both peers, >= 75% of the card's bf16 FLOP/s on an H200.

Figures per token count: fwd+bwd tokens/s, TFLOPS counted as 8 T H V (forward logits 2THV, recomputed in
backward 2THV, d hidden and d weight 4THV) for every path, the roofline of the fused call (those FLOPs and
the fewest bytes: hidden and weight read in each pass, their gradients written), and peak extra memory: on a
GPU the CUDA allocator's peak over what was allocated before the call; on the CPU the peak of live tensor
bytes counted per aten op by TensorMemoryTracker (deterministic). Both include the returned gradients.
Preset tiny: CPU, fp32, torch backend, 1 intra-op thread. Preset qwen2.5-3b: Qwen2.5's H=2048,
V=151936, bf16, Triton kernels (block sizes chosen for Hopper, not yet measured on a GPU).
"""

from __future__ import annotations

import torch

from bench.harness import Progress, Roofline, Row, device_peaks, quick, skip, stage, time_fn
from rexrag_fast.ops.linear_logprobs import linear_logprobs, linear_logprobs_reference
from rexrag_fast.testing import TensorMemoryTracker

SHAPES = {  # preset -> (H, V, token counts)
    "tiny": (128, 32000, (512, 2048)),
    "qwen2.5-3b": (2048, 151936, (4096, 16384)),  # Qwen2.5-3B's lm head
    "quick": (64, 8192, (256,)),  # CPU rehearsal (throughput.py --quick)
}
PEERS = {  # path -> (row baseline name, what it computes)
    "liger": "Liger fused linear CE (log-probs only)",
    "verl": "verl linear_cross_entropy (log-probs + entropy)",
}


def _peer_losses(cuda: bool) -> dict:
    """{path: fn(h, w, y) -> scalar loss} for each peer that can run here; the others are recorded as skipped."""
    found = {}
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError as e:
        skip("linear_logprobs", PEERS["liger"], f"liger-kernel not importable ({e}); pip install -e '.[peers]'")
    else:
        if cuda:
            liger = LigerFusedLinearCrossEntropyLoss(reduction="sum")
            found["liger"] = lambda h, w, y: liger(w, h, y)
        else:
            skip("linear_logprobs", PEERS["liger"], "Triton kernel: needs a CUDA device (no torch path)")
    try:
        from verl.utils.kernel.linear_cross_entropy import linear_cross_entropy
    except Exception as e:  # verl's package __init__ pulls its own dependencies; any failure means "absent"
        skip("linear_logprobs", PEERS["verl"], f"verl's kernel not importable ({type(e).__name__}: {e})")
    else:
        if cuda:
            def verl_loss(h, w, y):
                lp, ent = linear_cross_entropy(h, w, y, 1.0, "none")
                return lp.float().sum() + ent.float().sum()

            found["verl"] = verl_loss
        else:
            skip("linear_logprobs", PEERS["verl"], "Triton kernel: needs a CUDA device")
    return found


def _step(kind: str, h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, peers: dict) -> None:
    if kind == "fused":
        lp, ent = linear_logprobs(h, w, y, return_entropy=True, backend="auto")
        loss = lp.sum() + ent.sum()
    elif kind == "materialised":
        lp, ent = linear_logprobs_reference(h, w, y, 1.0, True)
        loss = lp.float().sum() + ent.float().sum()
    else:
        loss = peers[kind](h, w, y)
    torch.autograd.grad(loss, (h, w))


def bytes_moved(n_tokens: int, n_hidden: int, n_vocab: int, itemsize: int) -> int:
    """Fewest bytes of one fwd+bwd call: hidden and weight read by the forward and again by the backward, their
    gradients written once; labels read twice (int64), log-prob, entropy and their gradients (fp32)."""
    operands = (n_tokens + n_vocab) * n_hidden * itemsize
    return 3 * operands + n_tokens * (2 * 8 + 4 * 4)


def _peak_extra_bytes(fn, cuda: bool) -> int:
    if cuda:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with TensorMemoryTracker() as tracker:
        fn()
    return tracker.peak_bytes


@stage("linear_logprobs")
def run(preset: str, progress: Progress) -> list[Row]:
    cuda = preset != "tiny" and torch.cuda.is_available()
    threads = torch.get_num_threads()
    if not cuda:
        # One intra-op thread: on a shared, loaded CPU the OpenMP workers get descheduled and timings turn
        # to noise; every path runs under the same setting.
        torch.set_num_threads(1)
    try:
        n_hidden, n_vocab, token_counts = SHAPES["quick" if quick() and not cuda else preset]
        peers = _peer_losses(cuda)
        return [row for T in token_counts for row in _measure(T, n_hidden, n_vocab, cuda, peers, progress)]
    finally:
        torch.set_num_threads(threads)


def _measure(n_tokens: int, n_hidden: int, n_vocab: int, cuda: bool, peers: dict, progress: Progress) -> list[Row]:
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    card = torch.cuda.get_device_name(device) if cuda else "CPU"
    sync = torch.cuda.synchronize if cuda else None
    gen = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(n_tokens, n_hidden, device=device, generator=gen).to(dtype).requires_grad_()
    w = (torch.randn(n_vocab, n_hidden, device=device, generator=gen) * n_hidden**-0.5).to(dtype).requires_grad_()
    y = torch.randint(0, n_vocab, (n_tokens,), device=device, generator=gen)
    backend = "triton" if cuda else "torch"
    config = (f"T={n_tokens} H={n_hidden} V={n_vocab}, {str(dtype).removeprefix('torch.')}, {backend}, {card}"
              + ("" if cuda else ", 1 thread"))
    flops = 8 * n_tokens * n_hidden * n_vocab
    paths = ["fused", "materialised", *peers]
    seconds: dict[str, float] = {}
    peak: dict[str, int] = {}
    for kind in paths:
        fn = lambda kind=kind: _step(kind, h, w, y, peers)
        progress(f"T={n_tokens}: {kind} (memory)")
        peak[kind] = _peak_extra_bytes(fn, cuda)  # also the warm-up call
        progress(f"T={n_tokens}: {kind} (time)")
        seconds[kind] = time_fn(fn, warmup=1 if cuda else 0, min_repeats=3 if cuda else 2, min_seconds=0.0,
                                sync=sync)
    base = "materialised"
    mib = {k: v / 2**20 for k, v in peak.items()}
    extra = {f"{k}_ms": s * 1e3 for k, s in seconds.items()} | {f"{k}_peak_MiB": m for k, m in mib.items()}
    roof = Roofline(bytes_moved(n_tokens, n_hidden, n_vocab, h.element_size()), flops, seconds["fused"],
                    device_peaks(device))
    rows = [
        Row("linear_logprobs", f"fwd+bwd T={n_tokens}", n_tokens / seconds["fused"], "tokens/s",
            n_tokens / seconds[base], "materialised log_softmax", config, extra, roof),
        Row("linear_logprobs", f"TFLOPS T={n_tokens}", flops / seconds["fused"] / 1e12, "TFLOPS (8THV)",
            flops / seconds[base] / 1e12, "materialised log_softmax", config),
        Row("linear_logprobs", f"peak extra memory T={n_tokens}", mib["fused"], "MiB", None, "", config,
            {"materialised_MiB": mib[base], "logits_fp32_MiB": n_tokens * n_vocab * 4 / 2**20}),
        Row("linear_logprobs", f"memory ratio T={n_tokens}", peak["fused"] / peak[base],
            "fused / materialised peak (target <= 0.1)", None, "", config),
    ]
    for kind in peers:
        rows.append(Row("linear_logprobs", f"fwd+bwd vs {kind} T={n_tokens}", n_tokens / seconds["fused"],
                        "tokens/s", n_tokens / seconds[kind], PEERS[kind], config, {}, roof))
        rows.append(Row("linear_logprobs", f"memory ratio vs {kind} T={n_tokens}", peak["fused"] / peak[kind],
                        f"fused / {kind} peak", None, "", config))
    if cuda:
        target = " (target 0.75)" if "H200" in card else ""
        rows.append(Row("linear_logprobs", f"fraction of bf16 peak T={n_tokens}", roof.flops_fraction,
                        f"fraction of peak FLOP/s{target}", None, "", config, {}, roof))
    return rows
