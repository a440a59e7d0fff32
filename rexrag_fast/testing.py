"""Test helpers shared by tests/ and bench/: per-dtype tolerances and a comparison that shows the worst elements."""

from __future__ import annotations

import torch

# (atol, rtol) per dtype: fp32 results accumulate in fp32; bf16/fp16 inputs carry 8/11 mantissa bits.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (1e-5, 1e-4),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1e-2, 1.6e-2),
}


def tolerance(dtype: torch.dtype, scale: float = 1.0) -> tuple[float, float]:
    """(atol, rtol) for results computed from inputs of `dtype`, each multiplied by `scale`."""
    atol, rtol = TOLERANCES.get(dtype, TOLERANCES[torch.float32])
    return atol * scale, rtol * scale


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    dtype: torch.dtype | None = None,
    *,
    atol: float | None = None,
    rtol: float | None = None,
    name: str = "tensor",
    show: int = 8,
) -> None:
    """Assert |actual - expected| <= atol + rtol * |expected| elementwise (NaN == NaN, inf == inf).

    Tolerances default to `tolerance(dtype or expected.dtype)`. On failure the message lists the `show`
    worst elements with their indices, both values and the excess over the allowed error.
    """
    actual = torch.as_tensor(actual)
    expected = torch.as_tensor(expected)
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    d_atol, d_rtol = tolerance(dtype or expected.dtype)
    atol = d_atol if atol is None else atol
    rtol = d_rtol if rtol is None else rtol
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    same_special = (a.isnan() & e.isnan()) | ((a == e) & e.isinf())
    err = (a - e).abs()
    allowed = atol + rtol * e.abs()
    bad = ~(same_special | (err <= allowed))
    if not bool(bad.any()):
        return
    excess = torch.where(bad, (err - allowed).nan_to_num(float("inf")), torch.zeros_like(err))
    flat = excess.flatten()
    k = min(show, int(bad.sum()))
    worst = torch.topk(flat, k).indices
    lines = [
        f"{name}: {int(bad.sum())} of {bad.numel()} elements differ (atol={atol:g}, rtol={rtol:g}); worst:"
    ]
    for i in worst.tolist():
        idx = tuple(int(x) for x in torch.unravel_index(torch.tensor(i), bad.shape)) if bad.dim() else ()
        lines.append(
            f"  at {idx}: actual={a.flatten()[i].item():.8g} expected={e.flatten()[i].item():.8g} "
            f"|diff|={err.flatten()[i].item():.3g} allowed={allowed.flatten()[i].item():.3g}"
        )
    raise AssertionError("\n".join(lines))


class TensorMemoryTracker:
    """Live and peak bytes of tensor storages created by aten ops run inside `with TensorMemoryTracker():`.

    Deterministic (independent of timing and of the allocator's caching): every op's outputs are seen
    through a TorchDispatchMode; a storage counts from the op that created it until its last tensor is
    freed. Views and in-place results on storages that existed before (the op's inputs) are not counted,
    nor are scratch buffers internal to one aten kernel. Autograd's backward ops run under the mode too.
    """

    def __init__(self) -> None:
        self.live_bytes = 0
        self.peak_bytes = 0
        self._storages: dict[int, list[int]] = {}  # data_ptr -> [live tensors, bytes]
        self._mode = None

    def __enter__(self) -> TensorMemoryTracker:
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                tracker._record(args, kwargs, out)
                return out

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._mode is not None
        self._mode.__exit__(*exc)
        self._mode = None

    def _record(self, args: object, kwargs: object, out: object) -> None:
        import weakref

        from torch.utils._pytree import tree_leaves

        def counted(t: object) -> bool:
            # Opaque tensors (oneDNN-packed weights of the rollout engine) expose no storage to count.
            return isinstance(t, torch.Tensor) and t.layout == torch.strided and not t.is_mkldnn

        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if counted(t)}
        for t in tree_leaves(out):
            if not counted(t):
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            entry = self._storages.get(key)
            if entry is None:
                if key in inputs or storage.nbytes() == 0:
                    continue
                entry = self._storages[key] = [0, storage.nbytes()]
                self.live_bytes += entry[1]
                self.peak_bytes = max(self.peak_bytes, self.live_bytes)
            entry[0] += 1
            weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        entry = self._storages[key]
        entry[0] -= 1
        if entry[0] == 0:
            del self._storages[key]
            self.live_bytes -= entry[1]
