"""Rooflines for benchmark rows: bytes moved and FLOPs per call against the device's two ceilings.

A row that claims a target carries a Roofline: the fewest bytes the call must move through memory (each input
read once, each output written once), the FLOPs it must do, and the measured seconds per call. Its fractions
say how close the call came to the device's peak bandwidth and peak FLOP/s; the larger of the two times
bytes / peak_bandwidth and flops / peak_flops is the floor no implementation beats.

Ceilings (`device_peaks`): on a known card the figures measured on such a card (H200: ~4.3 TB/s device copy
counting read + write, ~790 TFLOP/s for an 8192^3 bf16 matmul on random data); on an unknown card both are
measured once per process; on the CPU the read bandwidth (a torch sum over 512 MB of fp32) and the fp32
matmul rate are measured once per thread count, since the CPU stages pin torch to one thread.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import torch

# (device-name substring, bytes/s, bf16 FLOP/s, where the figures come from); the first match wins.
KNOWN_CARDS = (
    ("H200", 4.3e12, 790e12, "measured on an H200: device copy and 8192^3 bf16 matmul, random data"),
    ("H100 PCIe", 2.0e12, 756e12, "datasheet"),
    ("H100", 3.35e12, 989e12, "datasheet"),
    ("A100", 2.0e12, 312e12, "datasheet"),
)
CPU_READ_BYTES = 512 * 2**20
CPU_GEMM_SIZE = 1024


@dataclasses.dataclass(frozen=True)
class Peaks:
    """The two ceilings of one device: memory bandwidth (bytes/s) and matmul rate (FLOP/s)."""

    device: str
    bandwidth: float
    flops: float
    flops_dtype: str
    source: str

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Roofline:
    """One call's work (`bytes`, `flops`) and measured time (`seconds`) against `peaks`."""

    bytes: float
    flops: float
    seconds: float
    peaks: Peaks

    def __post_init__(self) -> None:
        if self.seconds <= 0 or self.bytes < 0 or self.flops < 0:
            raise ValueError(f"Roofline: expected seconds > 0 and bytes, flops >= 0, got seconds={self.seconds}, "
                             f"bytes={self.bytes}, flops={self.flops}")

    @property
    def bandwidth_fraction(self) -> float:
        """Achieved bytes/s over the device's peak bandwidth."""
        return self.bytes / self.seconds / self.peaks.bandwidth

    @property
    def flops_fraction(self) -> float:
        """Achieved FLOP/s over the device's peak matmul rate."""
        return self.flops / self.seconds / self.peaks.flops

    @property
    def bound(self) -> str:
        """'memory' or 'compute': which ceiling sets the floor time of this call."""
        return "memory" if self.bytes / self.peaks.bandwidth >= self.flops / self.peaks.flops else "compute"

    def summary(self) -> str:
        """One table cell, e.g. '1.2 GB, 3.4 GFLOP: 81% BW, 0.2% FLOP/s (memory)'."""
        return (f"{_si(self.bytes)}B, {_si(self.flops)}FLOP: {self.bandwidth_fraction:.1%} BW, "
                f"{self.flops_fraction:.1%} FLOP/s ({self.bound})")

    def to_json(self) -> dict[str, Any]:
        return {"bytes_per_call": self.bytes, "flops_per_call": self.flops, "seconds_per_call": self.seconds,
                "bandwidth_fraction": self.bandwidth_fraction, "flops_fraction": self.flops_fraction,
                "bound": self.bound, "peaks": self.peaks.to_json()}


def _si(x: float) -> str:
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if x >= factor:
            return f"{x / factor:.3g} {prefix}"
    return f"{x:.3g} "


def device_peaks(device: torch.device | str = "cpu") -> Peaks:
    """The ceilings of `device` ('cpu' or a CUDA device): a known card's figures, else measured once."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _cuda_peaks(index)
    if device.type != "cpu":
        raise ValueError(f"device_peaks: expected a 'cpu' or 'cuda' device, got {device}")
    return _cpu_peaks(torch.get_num_threads())


@functools.cache
def _cuda_peaks(index: int) -> Peaks:
    name = torch.cuda.get_device_name(index)
    for key, bandwidth, flops, source in KNOWN_CARDS:
        if key in name:
            return Peaks(name, bandwidth, flops, "bf16", source)
    device = torch.device("cuda", index)
    copy_s = _copy_seconds(device)
    mm_s = _matmul_seconds(device, torch.bfloat16, 8192)
    torch.cuda.empty_cache()
    return Peaks(name, 2 * 2**30 / copy_s, 2 * 8192**3 / mm_s, "bf16",
                 "measured in this run: 1 GiB device copy (read + write), 8192^3 bf16 matmul")


def _copy_seconds(device: torch.device) -> float:
    src = torch.randn(2**28, device=device)  # 1 GiB of fp32
    dst = torch.empty_like(src)
    return _median_seconds(lambda: dst.copy_(src), torch.cuda.synchronize)


def _matmul_seconds(device: torch.device, dtype: torch.dtype, n: int) -> float:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    return _median_seconds(lambda: a @ b, torch.cuda.synchronize if device.type == "cuda" else None)


def _read_seconds() -> float:
    x = torch.rand(CPU_READ_BYTES // 4)
    return _median_seconds(x.sum)


@functools.cache
def _cpu_peaks(threads: int) -> Peaks:
    read_s = _read_seconds()
    n = CPU_GEMM_SIZE
    mm_s = _matmul_seconds(torch.device("cpu"), torch.float32, n)
    from bench.harness import _cpu_name

    return Peaks(f"CPU {_cpu_name()}, {threads} thread{'s' if threads > 1 else ''}", CPU_READ_BYTES / read_s,
                 2 * n**3 / mm_s, "fp32",
                 f"measured in this run: torch sum over {CPU_READ_BYTES // 2**20} MB, {n}^3 fp32 matmul")


def _median_seconds(fn, sync=None, repeats: int = 5) -> float:
    fn()  # warm-up: page faults, kernel selection
    if sync:
        sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t)
    return sorted(times)[repeats // 2]
