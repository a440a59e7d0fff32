"""linear_logprobs (both backends) against the materialised log_softmax: values, gradients, memory, errors."""

from __future__ import annotations

import importlib

import pytest
import torch
from rexrag_fast.kernels import linear_logprobs as kernel

from rexrag_fast.ops.linear_logprobs import linear_logprobs, linear_logprobs_reference
from rexrag_fast.testing import TensorMemoryTracker, assert_close

# The module, not the function of the same name that rexrag_fast.ops re-exports.
llp = importlib.import_module("rexrag_fast.ops.linear_logprobs")
IGNORE = -100


def _inputs(n_tokens, n_hidden, n_vocab, dtype, *, with_bias, scale=1.0, device="cpu", n_ignored=0):
    hidden = (torch.randn(n_tokens, n_hidden, device=device) * scale).to(dtype)
    # Unit-variance logits: a spread-out softmax so that every gradient term matters.
    weight = (torch.randn(n_vocab, n_hidden, device=device) * n_hidden**-0.5 * 2).to(dtype)
    bias = torch.randn(n_vocab, device=device).to(dtype) if with_bias else None
    labels = torch.randint(0, n_vocab, (n_tokens,), device=device)
    labels[torch.randperm(n_tokens, device=device)[:n_ignored]] = IGNORE
    return hidden, weight, bias, labels


def _run(fn, hidden, weight, bias, labels, temperature, return_entropy, g_lp, g_ent, dtype=None):
    """Outputs and (d hidden, d weight, d bias) of sum(g_lp * logprob + g_ent * entropy), inputs cast to dtype."""
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() if t is not None else None
              for t in (hidden, weight, bias)]
    out = fn(leaves[0], leaves[1], labels, temperature=temperature, return_entropy=return_entropy, bias=leaves[2])
    outs = out if return_entropy else (out,)
    loss = (outs[0].float() * g_lp).sum()
    if return_entropy:
        loss = loss + (outs[1].float() * g_ent).sum()
    params = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(loss, params)
    return [o.detach() for o in outs], list(grads)


def _compare(backend, hidden, weight, bias, labels, temperature, return_entropy, dtype):
    """fp32: ours within fp32 tolerance of an fp64 reference. bf16/fp16: ours at most 2x the error of the
    materialised same-dtype PyTorch path against the fp64 reference, plus a floor of 1/256 of the
    reference's magnitude (one half-precision rounding of the largest value)."""
    n_tokens = hidden.shape[0]
    g_lp = torch.randn(n_tokens, device=hidden.device)
    g_ent = torch.randn(n_tokens, device=hidden.device)
    ours_fn = lambda *a, **k: linear_logprobs(*a, **k, backend=backend)
    ours, ours_g = _run(ours_fn, hidden, weight, bias, labels, temperature, return_entropy, g_lp, g_ent)
    ref, ref_g = _run(linear_logprobs_reference, hidden, weight, bias, labels, temperature, return_entropy,
                      g_lp, g_ent, dtype=torch.float64)
    names = ["logprobs", "entropy"][: len(ours)] + ["d_hidden", "d_weight", "d_bias"][: len(ours_g)]
    for o in ours:
        assert o.dtype == torch.float32
    for o, g in zip(ours_g, (hidden, weight, bias)):
        assert o.dtype == g.dtype and o.shape == g.shape
    if dtype == torch.float32:
        for name, a, e in zip(names, ours + ours_g, ref + ref_g):
            scale = max(1.0, float(e.abs().max()))
            assert_close(a, e, torch.float32, atol=2e-5 * scale, rtol=2e-4, name=name)
        return
    same, same_g = _run(linear_logprobs_reference, hidden, weight, bias, labels, temperature, return_entropy,
                        g_lp, g_ent)
    for name, a, s, e in zip(names, ours + ours_g, same + same_g, ref + ref_g):
        err_ours = float((a.double() - e).abs().max())
        err_same = float((s.double() - e).abs().max())
        floor = float(e.abs().max()) / 256 + 1e-6
        assert err_ours <= 2 * err_same + floor, f"{name}: ours {err_ours:.3g} vs same-dtype torch {err_same:.3g}"


CASES = [  # (T, H, V, temperature, bias, entropy)
    (1, 16, 123, 1.0, False, True),
    (37, 24, 123, 0.7, True, True),
    (37, 40, 123, 1.0, False, False),
    (1025, 32, 1000, 1.3, True, True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("n_tokens", "n_hidden", "n_vocab", "temperature", "with_bias", "entropy"), CASES)
@pytest.mark.parametrize("tile", ["default", "tiny"])
def test_torch_backend_matches_reference(seed, monkeypatch, dtype, n_tokens, n_hidden, n_vocab, temperature,
                                         with_bias, entropy, tile):
    if tile == "tiny":  # force many T and V chunks through the online merge
        monkeypatch.setattr(llp, "TORCH_TILE_ELEMENTS", 512)
        monkeypatch.setattr(llp, "TORCH_MAX_V_CHUNK", 50)
    h, w, b, y = _inputs(n_tokens, n_hidden, n_vocab, dtype, with_bias=with_bias, n_ignored=n_tokens // 5)
    _compare("torch", h, w, b, y, temperature, entropy, dtype)


def test_torch_backend_float16(seed):
    h, w, b, y = _inputs(37, 24, 123, torch.float16, with_bias=True, n_ignored=5)
    _compare("torch", h, w, b, y, 0.8, True, torch.float16)


TRITON_CASES = [(1, 16, 123, 1.0, False, True), (37, 40, 123, 0.7, True, True), (37, 24, 123, 1.0, True, False)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("n_tokens", "n_hidden", "n_vocab", "temperature", "with_bias", "entropy"), TRITON_CASES)
def test_triton_backend_matches_reference(seed, dtype, n_tokens, n_hidden, n_vocab, temperature, with_bias,
                                          entropy):
    h, w, b, y = _inputs(n_tokens, n_hidden, n_vocab, dtype, with_bias=with_bias, n_ignored=n_tokens // 5)
    _compare("triton", h, w, b, y, temperature, entropy, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_vocab_splits_and_backward_chunks_match_torch_backend(seed, dtype):
    """Several vocab splits in the forward merge, several d-logits chunks in the backward."""
    h, w, b, y = _inputs(37, 24, 123, dtype, with_bias=True, n_ignored=5)
    fwd_one = kernel.linear_logprobs_forward(h, w, b, y, 0.9, True, num_splits=1)
    fwd_many = kernel.linear_logprobs_forward(h, w, b, y, 0.9, True, num_splits=3)
    fwd_torch = llp.torch_forward(h, w, b, y, 0.9, True)
    for name, one, many, ref in zip(("z_label", "lse", "E[z]"), fwd_one, fwd_many, fwd_torch):
        assert_close(many, one, torch.float32, name=name + " splits")
        assert_close(many, ref, torch.float32, name=name + " vs torch")
    _, lse, ez = fwd_torch
    g_lp = torch.where(y != IGNORE, torch.randn(37), 0.0)
    g_ent = torch.where(y != IGNORE, torch.randn(37), 0.0)
    ours = kernel.linear_logprobs_backward(h, w, b, y, 0.9, lse, ez, g_lp, g_ent, dlogits_budget=37 * 40)
    ref = llp.torch_backward(h, w, b, y, 0.9, lse, ez, g_lp, g_ent)
    for name, a, e in zip(("d_hidden", "d_weight", "d_bias"), ours, ref):
        assert a.dtype == e.dtype == dtype
        assert_close(a.float(), e.float(), dtype, name=name)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ignored_rows_give_zero_and_no_gradient(seed, backend):
    h, w, b, y = _inputs(37, 16, 123, torch.float32, with_bias=True)
    ignored = torch.zeros(37, dtype=torch.bool)
    ignored[[0, 5, 36]] = True
    y[ignored] = IGNORE
    h.requires_grad_()
    w.requires_grad_()
    b.requires_grad_()
    lp, ent = linear_logprobs(h, w, y, return_entropy=True, bias=b, backend=backend)
    assert torch.equal(lp[ignored], torch.zeros(3)) and torch.equal(ent[ignored], torch.zeros(3))
    assert (lp[~ignored] < 0).all() and (ent[~ignored] > 0).all()
    # Upstream gradient only on ignored rows: nothing may reach the parameters.
    g = ignored.float() * 7.0
    dh, dw, db = torch.autograd.grad((lp * g).sum() + (ent * g).sum(), (h, w, b))
    assert torch.count_nonzero(dh) == 0 and torch.count_nonzero(dw) == 0 and torch.count_nonzero(db) == 0


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gradient_through_entropy_alone(seed, backend):
    h, w, _, y = _inputs(37, 16, 123, torch.float32, with_bias=False)
    h.requires_grad_()
    w.requires_grad_()
    _, ent = linear_logprobs(h, w, y, return_entropy=True, temperature=0.8, backend=backend)
    dh, dw = torch.autograd.grad(ent.sum(), (h, w))
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    _, ent_ref = linear_logprobs_reference(h64, w64, y, 0.8, True)
    rh, rw = torch.autograd.grad(ent_ref.sum(), (h64, w64))
    assert_close(dh, rh, torch.float32, name="d_hidden")
    assert_close(dw, rw, torch.float32, name="d_weight")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_entropy_returned_but_unused_gives_logprob_gradient(seed, backend):
    h, w, _, y = _inputs(37, 16, 123, torch.float32, with_bias=False, n_ignored=3)
    h.requires_grad_()
    lp, _ = linear_logprobs(h, w, y, return_entropy=True, backend=backend)
    (ours,) = torch.autograd.grad(lp.sum(), (h,))
    h64 = h.detach().double().requires_grad_()
    (ref,) = torch.autograd.grad(linear_logprobs_reference(h64, w.double(), y).sum(), (h64,))
    assert_close(ours, ref, torch.float32, name="d_hidden")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_extreme_logits_stay_finite(seed, backend, temperature):
    """Hidden scaled by 1e3: logits of magnitude ~1e3-1e4, where a naive exp() overflows."""
    h, w, b, y = _inputs(37, 16, 123, torch.float32, with_bias=True, scale=1e3, n_ignored=4)
    g = torch.randn(37)
    ours, ours_g = _run(lambda *a, **k: linear_logprobs(*a, **k, backend=backend), h, w, b, y, temperature, True,
                        g, g)
    ref, ref_g = _run(linear_logprobs_reference, h, w, b, y, temperature, True, g, g, dtype=torch.float64)
    for name, a, e in zip(("logprobs", "entropy", "d_hidden", "d_weight", "d_bias"), ours + ours_g, ref + ref_g):
        assert torch.isfinite(a).all(), name
        scale = float(e.abs().max())
        # fp32 logits of size ~1e4 carry an absolute rounding of ~1e-3.
        assert_close(a, e, torch.float32, atol=2e-6 * scale + 1e-5, rtol=1e-4, name=name)


def test_torch_backend_peak_memory_is_far_below_logits():
    """Tensor bytes alive at once during forward + backward, counted per aten op (not timed, not sampled)."""
    n_tokens, n_hidden, n_vocab = 1024, 32, 32000
    logits_bytes = n_tokens * n_vocab * 4
    h, w, _, y = _inputs(n_tokens, n_hidden, n_vocab, torch.float32, with_bias=False)
    h.requires_grad_()
    w.requires_grad_()
    peaks = {}
    for name, fn in (("ours", lambda: linear_logprobs(h, w, y, return_entropy=True, backend="torch")),
                     ("materialised", lambda: linear_logprobs_reference(h, w, y, 1.0, True))):
        with TensorMemoryTracker() as tracker:
            lp, ent = fn()
            torch.autograd.grad((lp + ent).sum(), (h, w))
            del lp, ent
        peaks[name] = tracker.peak_bytes
    params_bytes = (n_tokens + n_vocab) * n_hidden * 4  # the two gradients, which both paths must return
    assert peaks["materialised"] >= 3 * logits_bytes  # the tracker sees the [T, V] tensors
    assert peaks["ours"] - params_bytes <= logits_bytes / 10, peaks


def test_zero_tokens(seed):
    h, w, _, y = _inputs(0, 8, 20, torch.float32, with_bias=False)
    h.requires_grad_()
    lp = linear_logprobs(h, w, y)
    assert lp.shape == (0,)
    (dh,) = torch.autograd.grad(lp.sum(), (h,))
    assert dh.shape == (0, 8)


def test_bad_arguments_are_named():
    h = torch.randn(4, 8)
    w = torch.randn(10, 8)
    y = torch.tensor([1, 2, 3, IGNORE])
    with pytest.raises(ValueError, match="weight"):
        linear_logprobs(h, torch.randn(10, 9), y)
    with pytest.raises(TypeError, match="weight"):
        linear_logprobs(h, w.double(), y)
    with pytest.raises(TypeError, match="labels"):
        linear_logprobs(h, w, y.float())
    with pytest.raises(ValueError, match="labels"):
        linear_logprobs(h, w, y[:3])
    with pytest.raises(ValueError, match=r"got 10 at position 2"):
        linear_logprobs(h, w, torch.tensor([1, 2, 10, 0]))
    with pytest.raises(ValueError, match="bias"):
        linear_logprobs(h, w, y, bias=torch.randn(9))
    with pytest.raises(ValueError, match="temperature"):
        linear_logprobs(h, w, y, temperature=0.0)
    with pytest.raises(ValueError, match="backend"):
        linear_logprobs(h, w, y, backend="cuda")


GPU_CASES = [(1025, 256, 32000), (4096, 2048, 151936)]


@pytest.mark.gpu
@pytest.mark.parametrize(("n_tokens", "n_hidden", "n_vocab"), GPU_CASES)
def test_gpu_triton_bf16_large_vocab(seed, n_tokens, n_hidden, n_vocab):
    """bf16 rule at real vocab sizes: error vs an fp32 materialised reference at most 2x that of bf16 torch."""
    h, w, _, y = _inputs(n_tokens, n_hidden, n_vocab, torch.bfloat16, with_bias=False, device="cuda",
                         n_ignored=n_tokens // 10)
    g_lp = torch.randn(n_tokens, device="cuda")
    g_ent = torch.randn(n_tokens, device="cuda")
    ours, ours_g = _run(lambda *a, **k: linear_logprobs(*a, **k, backend="auto"), h, w, None, y, 1.0, True,
                        g_lp, g_ent)
    ref, ref_g = _run(linear_logprobs_reference, h, w, None, y, 1.0, True, g_lp, g_ent, dtype=torch.float32)
    same, same_g = _run(linear_logprobs_reference, h, w, None, y, 1.0, True, g_lp, g_ent)
    for name, a, s, e in zip(("logprobs", "entropy", "d_hidden", "d_weight"), ours + ours_g, same + same_g,
                             ref + ref_g):
        assert torch.isfinite(a).all(), name
        err_ours = float((a.float() - e).abs().max())
        err_same = float((s.float() - e).abs().max())
        assert err_ours <= 2 * err_same + float(e.abs().max()) / 256, f"{name}: {err_ours:.3g} vs {err_same:.3g}"
