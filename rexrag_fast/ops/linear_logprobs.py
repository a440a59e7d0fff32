"""Fused lm-head projection -> per-token log-prob of a label (+ entropy), never holding [T, V] logits.

With z = (hidden @ weight.T + bias) / temperature, z: [T, V], for every token t:

    lse_t      = log sum_j exp(z_tj)
    logprob_t  = z_t,y_t - lse_t                       (0 where y_t == ignore_index)
    entropy_t  = lse_t - sum_j p_tj z_tj,  p = softmax(z)   (0 where y_t == ignore_index)

Gradients with respect to z (g_lp, g_H: incoming gradients of logprob and entropy, zeroed on ignored rows):

    d z_tj = g_lp_t (1[j == y_t] - p_tj) - g_H_t p_tj (z_tj - E_t),   E_t = sum_j p_tj z_tj = lse_t - entropy_t
    d(hidden @ weight.T + bias) = d z / temperature

Forward keeps, per token, only lse and E (fp32, [T]); backward recomputes z tile by tile. Two backends compute
the same thing: 'triton' (kernels/linear_logprobs.py) and 'torch', a chunked PyTorch path whose largest
temporary is one [T_chunk, V_chunk] fp32 tile. Both return fp32 log-probs and entropies; gradients come back
in the dtype of the inputs after fp32 accumulation.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from rexrag_fast.ops._checks import check_tensor, resolve_backend

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LABEL_DTYPES = (torch.int64, torch.int32)

# Elements in one fp32 logits tile of the torch backend (4 MiB) and its widest vocab slice: each matmul call
# is still large enough to run near a CPU's peak, and a tile plus its exp() stay far below T x V.
TORCH_TILE_ELEMENTS = 1 << 20
TORCH_MAX_V_CHUNK = 2048


def _torch_chunks(n_rows: int, n_cols: int, tile_elements: int) -> tuple[int, int]:
    """(rows per chunk, columns per chunk) so that one chunk holds at most ~tile_elements fp32 values."""
    v_chunk = max(1, min(n_cols, TORCH_MAX_V_CHUNK, tile_elements))
    t_chunk = max(1, min(n_rows, tile_elements // v_chunk))
    return t_chunk, v_chunk


def _tile_logits(h32: torch.Tensor, w32: torch.Tensor, b32: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """z = (h @ w.T + b) / temperature for one tile, fp32 [t, v]."""
    z = torch.addmm(b32, h32, w32.T) if b32 is not None else h32 @ w32.T
    if temperature != 1.0:
        z.div_(temperature)
    return z


def _label_columns(labels: torch.Tensor, v0: int, v1: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows whose label falls in [v0, v1) and that label's column inside the chunk."""
    rows = ((labels >= v0) & (labels < v1)).nonzero().squeeze(1)
    return rows, labels[rows] - v0


def torch_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    temperature: float,
    with_entropy: bool,
    tile_elements: int = TORCH_TILE_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Chunked forward: (label logit z_y [T], lse [T], E_p[z] [T] or None), all fp32.

    Online log-sum-exp over V chunks: with running max m, s = sum_j exp(z_j - m) and
    a = sum_j exp(z_j - m) (z_j - m), a new chunk of max m' >= m rescales s <- s e^(m - m') and
    a <- e^(m - m') (a + (m - m') s); at the end lse = m + log s and E_p[z] = m + a / s.
    """
    n_tokens, n_vocab = hidden.shape[0], weight.shape[0]
    t_chunk, v_chunk = _torch_chunks(n_tokens, n_vocab, tile_elements)
    h32 = hidden.float()
    dev = hidden.device
    m = torch.full((n_tokens,), float("-inf"), device=dev)
    s = torch.zeros(n_tokens, device=dev)
    a = torch.zeros(n_tokens, device=dev) if with_entropy else None
    z_label = torch.zeros(n_tokens, device=dev)
    for v0 in range(0, n_vocab, v_chunk):
        v1 = min(n_vocab, v0 + v_chunk)
        w32 = weight[v0:v1].float()
        b32 = bias[v0:v1].float() if bias is not None else None
        for t0 in range(0, n_tokens, t_chunk):
            t1 = min(n_tokens, t0 + t_chunk)
            z = _tile_logits(h32[t0:t1], w32, b32, temperature)
            rows, cols = _label_columns(labels[t0:t1], v0, v1)
            z_label[t0 + rows] = z[rows, cols]
            m_old = m[t0:t1]
            m_new = torch.maximum(m_old, z.amax(dim=1))
            z.sub_(m_new[:, None])  # z now holds d = z - m'
            e = torch.exp(z)
            tile_s = e.sum(dim=1)
            if v0 == 0:
                s[t0:t1] = tile_s
                if a is not None:
                    a[t0:t1] = torch.linalg.vecdot(e, z)
            else:
                shift = m_old - m_new
                scale = torch.exp(shift)
                if a is not None:
                    a[t0:t1] = scale * (a[t0:t1] + shift * s[t0:t1]) + torch.linalg.vecdot(e, z)
                s[t0:t1] = scale * s[t0:t1] + tile_s
            m[t0:t1] = m_new
            del z, e
    lse = m + torch.log(s)
    expected_z = m + a / s if a is not None else None
    return z_label, lse, expected_z


def torch_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    temperature: float,
    lse: torch.Tensor,
    expected_z: torch.Tensor | None,
    grad_logprob: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    tile_elements: int = TORCH_TILE_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Chunked backward: (d hidden [T, H], d weight [V, H], d bias [V] or None) in the input dtypes.

    `grad_logprob` / `grad_entropy` are fp32 [T], already zero on ignored rows. Each tile recomputes z, forms
    d z = -p (g_lp + g_H (z - E)) + g_lp 1[j == y], and accumulates d hidden and d weight in fp32.
    """
    n_tokens, n_vocab = hidden.shape[0], weight.shape[0]
    t_chunk, v_chunk = _torch_chunks(n_tokens, n_vocab, tile_elements)
    h32 = hidden.float()
    grad_h = torch.zeros(n_tokens, hidden.shape[1], device=hidden.device)
    grad_w = torch.empty_like(weight)
    grad_b = torch.zeros(n_vocab, device=hidden.device) if bias is not None else None
    for v0 in range(0, n_vocab, v_chunk):
        v1 = min(n_vocab, v0 + v_chunk)
        w32 = weight[v0:v1].float()
        b32 = bias[v0:v1].float() if bias is not None else None
        grad_w32 = torch.zeros(v1 - v0, hidden.shape[1], device=hidden.device)
        for t0 in range(0, n_tokens, t_chunk):
            t1 = min(n_tokens, t0 + t_chunk)
            g_lp = grad_logprob[t0:t1, None]
            z = _tile_logits(h32[t0:t1], w32, b32, temperature)
            dz = torch.exp(z - lse[t0:t1, None])  # p
            if grad_entropy is not None:
                # -(g_lp + g_H (z - E)), built in place in z
                z.sub_(expected_z[t0:t1, None]).mul_(grad_entropy[t0:t1, None]).add_(g_lp).neg_()
                dz.mul_(z)
            else:
                dz.mul_(g_lp.neg())
            del z
            rows, cols = _label_columns(labels[t0:t1], v0, v1)
            dz.index_put_((rows, cols), grad_logprob[t0 + rows], accumulate=True)
            if temperature != 1.0:
                dz.div_(temperature)
            grad_h[t0:t1].addmm_(dz, w32)
            grad_w32.addmm_(dz.T, h32[t0:t1])
            if grad_b is not None:
                grad_b[v0:v1] += dz.sum(dim=0)
            del dz
        grad_w[v0:v1] = grad_w32
    return (
        grad_h.to(hidden.dtype),
        grad_w,
        grad_b.to(bias.dtype) if grad_b is not None and bias is not None else None,
    )


class _LinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, ignore_index, with_entropy, backend):
        if backend == "triton":
            from rexrag_fast.kernels.linear_logprobs import linear_logprobs_forward

            z_label, lse, expected_z = linear_logprobs_forward(
                hidden, weight, bias, labels, temperature, with_entropy
            )
        else:
            z_label, lse, expected_z = torch_forward(hidden, weight, bias, labels, temperature, with_entropy)
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None, not zeros
        valid = labels != ignore_index
        logprobs = torch.where(valid, z_label - lse, 0.0)
        ctx.save_for_backward(hidden, weight, bias, labels, lse, expected_z, valid)
        ctx.temperature = temperature
        ctx.backend = backend
        ctx.with_entropy = with_entropy
        if not with_entropy:
            return logprobs
        entropy = torch.where(valid, lse - expected_z, 0.0)
        return logprobs, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        hidden, weight, bias, labels, lse, expected_z, valid = ctx.saved_tensors
        grad_logprob = grads[0]
        grad_entropy = grads[1] if ctx.with_entropy else None
        if grad_logprob is None and grad_entropy is None:
            return (None,) * 8
        zero = torch.zeros_like(lse)
        grad_logprob = torch.where(valid, grad_logprob.float(), 0.0) if grad_logprob is not None else zero
        if grad_entropy is not None:
            grad_entropy = torch.where(valid, grad_entropy.float(), 0.0)
        if ctx.backend == "triton":
            from rexrag_fast.kernels.linear_logprobs import linear_logprobs_backward

            grad_h, grad_w, grad_b = linear_logprobs_backward(
                hidden, weight, bias, labels, ctx.temperature, lse, expected_z, grad_logprob, grad_entropy
            )
        else:
            grad_h, grad_w, grad_b = torch_backward(
                hidden, weight, bias, labels, ctx.temperature, lse, expected_z, grad_logprob, grad_entropy
            )
        return (
            grad_h if ctx.needs_input_grad[0] else None,
            grad_w if ctx.needs_input_grad[1] else None,
            grad_b if ctx.needs_input_grad[2] else None,
            None, None, None, None, None,
        )


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
    bias: torch.Tensor | None = None,
    backend: str = "auto",
    ignore_index: int = -100,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of `labels` under softmax((hidden @ weight.T + bias) / temperature), without [T, V] logits.

    Args:
        hidden: [T, H] fp32 / bf16 / fp16 final hidden states (one row per token of a packed batch).
        weight: [V, H] lm-head weight, same dtype and device as `hidden`.
        labels: [T] int64 / int32 target token ids in [0, V), or `ignore_index`.
        temperature: > 0; logits are divided by it before the softmax (verl's rollout temperature).
        return_entropy: also return the entropy of each token's distribution.
        bias: optional [V] lm-head bias, same dtype as `weight`.
        backend: 'auto' (Triton on CUDA, PyTorch on CPU), 'triton' or 'torch'.
        ignore_index: label value whose row gets logprob 0, entropy 0 and no gradient.

    Returns:
        logprobs [T] fp32, and entropy [T] fp32 when `return_entropy`. Differentiable w.r.t. hidden, weight
        and bias through both outputs; gradients are accumulated in fp32 and returned in the input dtype.
    """
    check_tensor("hidden", hidden, ndim=2, dtypes=FLOAT_DTYPES)
    n_tokens, n_hidden = hidden.shape
    check_tensor("weight", weight, ndim=2, shape=(None, n_hidden), dtypes=(hidden.dtype,), device=hidden.device)
    n_vocab = weight.shape[0]
    check_tensor("labels", labels, shape=(n_tokens,), dtypes=LABEL_DTYPES, device=hidden.device)
    if bias is not None:
        check_tensor("bias", bias, shape=(n_vocab,), dtypes=(hidden.dtype,), device=hidden.device)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0 \
            or temperature == float("inf"):
        raise ValueError(f"temperature: expected a finite number > 0, got {temperature!r}")
    if n_vocab == 0 or n_hidden == 0:
        raise ValueError(f"weight: expected a non-empty [V, H] matrix, got shape {list(weight.shape)}")
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= n_vocab))
    if n_tokens and bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"labels: expected ids in [0, {n_vocab}) or ignore_index={ignore_index}, "
            f"got {int(labels[first])} at position {first}"
        )
    resolved = resolve_backend(backend, hidden.device)
    if n_tokens == 0:
        resolved = "torch"
    out = _LinearLogprobs.apply(
        hidden.contiguous(),
        weight.contiguous(),
        bias.contiguous() if bias is not None else None,
        labels.contiguous(),
        float(temperature),
        int(ignore_index),
        bool(return_entropy),
        resolved,
    )
    return out


def linear_logprobs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The materialised PyTorch path, in the dtype of the inputs (for tests and the benchmark baseline).

    logits = (hidden @ weight.T + bias) / temperature [T, V]; logprob = log_softmax(logits)[t, y_t];
    entropy = logsumexp(logits) - sum(softmax(logits) * logits) (verl's entropy_from_logits); both 0 where
    labels == ignore_index. Returns [T] (, [T]) in the inputs' dtype.
    """
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    logits = logits / temperature
    log_probs = torch.log_softmax(logits, dim=-1)
    valid = labels != ignore_index
    picked = log_probs.gather(1, torch.where(valid, labels, 0).long()[:, None]).squeeze(1)
    logprobs = torch.where(valid, picked, torch.zeros_like(picked))
    if not return_entropy:
        return logprobs
    entropy = torch.logsumexp(logits, dim=-1) - (torch.softmax(logits, dim=-1) * logits).sum(dim=-1)
    return logprobs, torch.where(valid, entropy, torch.zeros_like(entropy))
