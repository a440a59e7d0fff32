"""The benchmark harness behind bench/throughput.py: stage registry, timing, environment, table and JSON.

A stage is a function `(preset: str, progress: Progress) -> list[Row]` registered with `@stage("name")`
in a module bench/stages/<name>.py. Each row compares our value with a baseline measured in the same run.
"""

from __future__ import annotations

import dataclasses
import gc
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.roofline import Peaks, Roofline, device_peaks

__all__ = ["PRESETS", "QWEN25_3B", "STAGES", "Peaks", "Progress", "Roofline", "Row", "Skip", "device_peaks",
           "environment", "format_skips", "format_table", "quick", "skip", "stage", "time_fn"]

PRESETS = ("tiny", "qwen2.5-3b")
# Qwen2.5-3B's architecture (its config.json on the Hugging Face hub): the qwen2.5-3b preset's model shape.
QWEN25_3B = dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                 num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6,
                 rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu")
# Set by `throughput.py --quick` (the CPU rehearsal of scripts/gpu_check.sh): stages that honour it measure
# only their smallest case, so that every code path runs in seconds; its figures are not for reports.
QUICK = False


def quick() -> bool:
    """True when this run only rehearses the stages (throughput.py --quick)."""
    return QUICK


@dataclasses.dataclass
class Row:
    """One measured figure. `speedup` = value / baseline_value (higher is better; units must agree).

    `roofline`, on rows that claim a target, says how close the measured call came to the device's limits."""

    stage: str
    name: str
    value: float
    unit: str
    baseline_value: float | None = None
    baseline: str = ""
    config: str = ""
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    roofline: Roofline | None = None

    @property
    def speedup(self) -> float | None:
        if self.baseline_value is None or self.baseline_value == 0:
            return None
        return self.value / self.baseline_value

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["speedup"] = self.speedup
        d["roofline"] = self.roofline.to_json() if self.roofline else None
        return d


class Progress:
    """Progress lines on stderr so a long stage shows it is alive."""

    def __init__(self, stage_name: str) -> None:
        self.stage_name = stage_name
        self.t0 = time.perf_counter()

    def __call__(self, msg: str) -> None:
        print(f"  [{self.stage_name} +{time.perf_counter() - self.t0:6.1f}s] {msg}", file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True)
class Skip:
    """A comparison a stage could not run here (a peer library missing, a path the device lacks), and why."""

    stage: str
    what: str
    reason: str


SKIPS: list[Skip] = []


def skip(stage_name: str, what: str, reason: str) -> None:
    """Record (and print to stderr) that `what` was not measured in this run, with the reason."""
    SKIPS.append(Skip(stage_name, what, reason))
    print(f"  [{stage_name}] skipped {what}: {reason}", file=sys.stderr, flush=True)


StageFn = Callable[[str, Progress], list[Row]]
STAGES: dict[str, StageFn] = {}


def stage(name: str) -> Callable[[StageFn], StageFn]:
    def register(fn: StageFn) -> StageFn:
        if name in STAGES:
            raise ValueError(f"benchmark stage {name!r} registered twice")
        STAGES[name] = fn
        return fn

    return register


def time_fn(fn: Callable[[], Any], *, warmup: int = 1, min_repeats: int = 3, min_seconds: float = 0.2,
            sync: Callable[[], None] | None = None) -> float:
    """Median seconds per call of `fn` after `warmup` calls; repeats until both minimums are met."""
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_repeats or time.perf_counter() - start < min_seconds:
        gc.disable()
        t = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t)
        gc.enable()
    times.sort()
    return times[len(times) // 2]


def environment(preset: str) -> dict[str, Any]:
    env: dict[str, Any] = {"preset": preset, "python": platform.python_version(), "cpu": _cpu_name()}
    try:
        env["git_sha"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                        cwd=Path(__file__).parent, check=True).stdout.strip()
    except Exception:
        env["git_sha"] = None
    try:
        import torch

        env["torch"] = torch.__version__
        env["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:
        env["torch"] = None
        env["gpu"] = None
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    return env


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if x == 0:
        return "0"
    if abs(x) >= 1e5 or abs(x) < 1e-2:
        return f"{x:.3g}"
    return f"{x:,.2f}"


def format_table(rows: list[Row]) -> str:
    """A Markdown table, one line per row; a roofline column when any row carries one."""
    header = ("stage", "name", "config", "value", "unit", "baseline", "baseline value", "speed-up")
    body = [
        (r.stage, r.name, r.config, _fmt(r.value), r.unit, r.baseline, _fmt(r.baseline_value),
         "-" if r.speedup is None else f"{r.speedup:.2f}x")
        for r in rows
    ]
    if any(r.roofline for r in rows):
        header += ("roofline (per call: bytes, FLOPs; fraction of peak)",)
        body = [b + (r.roofline.summary() if r.roofline else "-",) for b, r in zip(body, rows)]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *body)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(b) for b in body)])


def format_skips(skips: list[Skip]) -> str:
    """One line per skipped comparison, for under the table."""
    return "\n".join(f"skipped: {s.stage}: {s.what}: {s.reason}" for s in skips)
